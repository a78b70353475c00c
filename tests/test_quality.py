"""The quality harness (bench/quality.py) and attention-site capture (hyper_backend.capture) on tiny random HF
models: chunked loss, site numbering, capture shapes, the direct swap path, and the backend path when present."""

import importlib.util
import math
import os
import sys

import pytest
import torch

from hyper_backend import HyperConfig
from hyper_backend.capture import capture_attention, count_sites, save_records, swap_attention
from hyper_backend.kernels import op as hyper_op

pytestmark = pytest.mark.usefixtures("lsh_detector")  # written for the LSH estimator: conftest.py

transformers = pytest.importorskip("transformers")

_BENCH = os.path.join(os.path.dirname(__file__), "..", "bench", "quality.py")
_spec = importlib.util.spec_from_file_location("bench_quality", _BENCH)
quality = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = quality  # dataclasses look their module up
_spec.loader.exec_module(quality)

N = 64  # window length: longer than the sliding window, so sliding layers get an explicit mask
GLOBAL = 5  # the one full-attention layer of the tiny Gemma-3 below
SMALL = HyperConfig.published(
    block_size=8, sample_size=8, lsh_num_projs=3, min_seq_len=16
)  # makes HyperAttention run at N


def tiny_gemma(softcap=None, kv_heads=1):
    cfg = transformers.Gemma3TextConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=16,
        sliding_window=8,
        max_position_embeddings=256,
        final_logit_softcapping=softcap,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(cfg).eval()


def tiny_llama():
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def gemma():
    return tiny_gemma()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    return quality.windows(torch.randint(3, 96, (3 * (N - 1),), generator=g), N, bos=2)  # [3, N]


def ppl(model, data, run=None):
    body, head, softcap = quality.body_and_head(model)
    run = run or quality.plain_runner(body)
    total, count = 0.0, 0
    for w in range(data.shape[0]):
        s, c = quality.window_nll(run, head, softcap, data[w : w + 1], chunk=16)
        total, count = total + s.item(), count + c
    return math.exp(total / count)


# ---------------------------------------------------------------------------------------------------------
# windows and loss
# ---------------------------------------------------------------------------------------------------------


def test_windows_start_with_bos_and_cover_the_text_in_order():
    tokens = torch.arange(10, 40)
    w = quality.windows(tokens, 8, bos=1)
    assert w.shape == (4, 8) and (w[:, 0] == 1).all()
    assert torch.equal(w[:, 1:].reshape(-1), tokens[:28])
    w = quality.windows(tokens, 8, bos=None)
    assert w.shape == (3, 8) and torch.equal(w.reshape(-1), tokens[:24])
    with pytest.raises(ValueError):
        quality.windows(tokens[:5], 8, bos=1)


@pytest.mark.parametrize(
    "make", [tiny_gemma, lambda: tiny_gemma(softcap=3.0), tiny_llama], ids=["gemma3", "gemma3-softcap", "llama"]
)
def test_chunked_loss_equals_the_models_own_loss(make, data):
    model = make()
    ids = data[:1]
    body, head, softcap = quality.body_and_head(model)
    with torch.no_grad():
        hidden = body(input_ids=ids, use_cache=False).last_hidden_state
        ref = model(input_ids=ids, labels=ids, use_cache=False).loss.item()
    for chunk in (7, 16, N):  # ragged chunks, even chunks, and one chunk (unchunked)
        s, c = quality.chunked_nll(hidden[:, :-1], ids[:, 1:], head, softcap, chunk)
        assert c == N - 1
        assert abs(s.item() / c - ref) < 1e-5 * max(1.0, ref), chunk
    assert quality.check_head(model, data, chunk=5) < 1e-4


def test_softcap_is_applied(data):
    capped, plain = tiny_gemma(softcap=0.5), tiny_gemma()
    assert abs(ppl(capped, data[:1]) - ppl(plain, data[:1])) > 1e-3


def test_text_tokens_takes_a_prefix():
    class CharTokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(ch) for ch in text]}

    text = "abcdefgh" * 2000
    ids = quality.text_tokens(CharTokenizer(), text, 9000)
    assert ids.tolist() == [ord(ch) for ch in text[:9000]]
    with pytest.raises(ValueError):
        quality.text_tokens(CharTokenizer(), "short", 10)


def test_default_rows_add_global_layers_one_at_a_time(gemma, monkeypatch):
    assert quality.default_site_rows(gemma, None) == ["5"]
    monkeypatch.setattr(
        gemma.config, "layer_types", ["full_attention" if i % 3 == 2 else "sliding_attention" for i in range(9)]
    )
    assert quality.default_site_rows(gemma, None) == ["2", "2,5", "2,5,8"]
    from hyper_backend.config import LayerSelection

    assert quality.default_site_rows(gemma, LayerSelection.parse("1,3-4")) == ["1,3,4"]


# ---------------------------------------------------------------------------------------------------------
# capture
# ---------------------------------------------------------------------------------------------------------


def test_capture_returns_qkv_as_attention_sees_them(gemma, data, tmp_path):
    ids = data[:1]
    assert count_sites(lambda: gemma(ids[:, :4])) == 6
    with torch.no_grad(), capture_attention("all") as records:
        gemma(ids)
    assert [r["layer"] for r in records] == list(range(6))
    glob = records[GLOBAL]
    assert glob["q"].shape == (1, 4, N, 16) and glob["k"].shape == (1, 1, N, 16) and glob["v"].shape == (1, 1, N, 16)
    assert glob["causal"] and not glob["masked"] and glob["enable_gqa"]
    assert glob["scale"] == pytest.approx(256**-0.5)  # query_pre_attn_scalar, not 1/sqrt(D)
    for r in records[:GLOBAL]:  # sliding-window layers: explicit mask, K/V already repeated by HF
        assert r["masked"] and not r["causal"] and r["q"].shape == (1, 4, N, 16)
    # the captured tensors reproduce the layer's attention output
    with torch.no_grad(), capture_attention("5", max_len=40, dtype=torch.float64) as short:
        gemma(ids)
    assert len(short) == 1 and short[0]["q"].shape == (1, 4, 40, 16) and short[0]["q"].dtype == torch.float64
    assert torch.equal(short[0]["q"].float(), glob["q"][:, :, :40])
    path = tmp_path / "qkv.pt"
    save_records(records[GLOBAL:], str(path))
    back = torch.load(path, weights_only=True)
    assert isinstance(back, list) and torch.equal(back[0]["k"], glob["k"]) and back[0]["name"] == "site 5"


def test_capture_last_k_needs_the_total(gemma, data):
    with pytest.raises(ValueError, match="total"):
        with torch.no_grad(), capture_attention("last:1"):
            gemma(data[:1])
    with torch.no_grad(), capture_attention("last:1", total=6) as records:
        gemma(data[:1])
    assert [r["layer"] for r in records] == [GLOBAL]


def test_autotuner_reads_captured_records(gemma, data, tmp_path):
    inputs = pytest.importorskip("hyper_backend.autotune.inputs")
    with torch.no_grad(), capture_attention("5") as records:
        gemma(data[:1])
    path = tmp_path / "qkv.pt"
    save_records(records, str(path))
    samples = inputs.load_inputs(str(path), dtype=torch.float32, device=torch.device("cpu"), min_len=N)
    assert len(samples) == 1 and samples[0].q.shape == (1, 4, N, 16)


# ---------------------------------------------------------------------------------------------------------
# the direct swap path
# ---------------------------------------------------------------------------------------------------------


def test_swap_nothing_is_eager(gemma, data):
    body = quality.body_and_head(gemma)[0]
    row = quality.Row("none", "direct", "none", SMALL)
    run, _ = quality.make_runner(row, body, 6)
    assert ppl(gemma, data, run) == ppl(gemma, data)


def test_swap_below_min_seq_len_is_exact(gemma, data):
    before = hyper_op.path_counts()
    with swap_attention("5", config=HyperConfig()) as swapped:  # N=64 < min_seq_len=4096
        p = ppl(gemma, data[:1])
    assert swapped.sites == [GLOBAL]
    assert hyper_op.path_counts()["hyper"] == before["hyper"] and hyper_op.path_counts()["exact"] == before["exact"] + 1
    assert p == pytest.approx(ppl(gemma, data[:1]), rel=1e-5)


def test_swap_runs_hyper_on_global_site_only(gemma, data):
    """A selected sliding layer reaches hyper_attention with its mask and stays exact; the global one runs hyper."""
    exact = ppl(gemma, data)
    before = hyper_op.path_counts()
    with swap_attention("0,5", config=SMALL, module=gemma.model) as swapped:  # ppl() calls the body
        p = ppl(gemma, data)
    assert swapped.sites == [0, GLOBAL] * 3
    assert hyper_op.path_counts()["hyper"] - before["hyper"] == 3  # one per window: site 5
    assert hyper_op.path_counts()["exact"] == before["exact"]  # site 0's mask never reaches the op
    assert math.isfinite(p) and p != exact and abs(p / exact - 1) < 0.5


def test_evaluate_rows_and_counts(gemma, data):
    from rich.console import Console

    rows = [
        quality.Row("exact", "exact"),
        quality.Row("direct:5", "direct", "5", SMALL),
        quality.Row("direct:0", "direct", "0", SMALL),
    ]
    res = quality.evaluate(rows, gemma, data, 16, Console(quiet=True), total_sites=6)
    assert [r["num_sites"] for r in res] == [0, 1, 1]
    assert res[0]["change_vs_exact"] == 0.0 and res[0]["tokens"] == 3 * (N - 1)
    assert res[1]["hyper_calls_per_window"] == 1 and res[1]["ppl"] != res[0]["ppl"]
    assert res[2]["hyper_calls_per_window"] == 0 and res[2]["ppl"] == pytest.approx(res[0]["ppl"], rel=1e-6)
    assert res[0]["ppl"] == pytest.approx(ppl(gemma, data), rel=1e-9)


def test_config_from_args_precedence():
    import argparse

    args = argparse.Namespace(
        tuned=False,
        block_size=128,
        sample_size=None,
        lsh_projs=None,
        min_seq_len=None,
        causal_depth=-1,
        seed=None,
        sink_keys=None,
        local_window=None,
        residual=None,
    )
    cfg = quality.config_from_args(args, {"sample_size": 512, "block_size": 64, "detector": "lsh"})
    assert cfg == HyperConfig(detector="lsh", block_size=128, sample_size=512, causal_depth=None)
    assert quality.config_from_args(argparse.Namespace(tuned=True), {}) is None
    assert quality.parse_overrides("block_size=64, causal_depth=none") == {"block_size": 64, "causal_depth": None}
    assert quality.config_text(cfg) == "128/512/7"
    assert quality.config_text(cfg.replace(min_seq_len=2048)) == "128/512/7 min_seq_len=2048"


# ---------------------------------------------------------------------------------------------------------
# the backend path (skipped until hyper_backend.backend imports)
# ---------------------------------------------------------------------------------------------------------

_NO_BACKEND = quality.backend_available()


@pytest.mark.skipif(_NO_BACKEND is not None, reason=f"hyper_backend.backend not available: {_NO_BACKEND}")
def test_backend_disabled_is_eager(gemma, data, monkeypatch):
    monkeypatch.setenv("HYPER_ATTENTION", "0")
    monkeypatch.setenv("HYPER_INNER_BACKEND", "eager")
    torch._dynamo.reset()
    body = quality.body_and_head(gemma)[0]
    before = hyper_op.path_counts()
    compiled = torch.compile(body, backend="hyper", dynamic=False)
    try:
        p = ppl(gemma, data, quality.plain_runner(compiled))
    finally:
        torch._dynamo.reset()
    assert hyper_op.path_counts() == before
    assert p == pytest.approx(ppl(gemma, data), rel=1e-6)


@pytest.mark.skipif(_NO_BACKEND is not None, reason=f"hyper_backend.backend not available: {_NO_BACKEND}")
def test_backend_matches_direct_path(data, monkeypatch):
    """Same op, same arguments, same random draws. Multi-head K/V: under torch.compile, HF (torch < 2.14) passes
    global layers a dense causal mask and K/V repeated to every query head, so with GQA the backend's op sees
    Hkv = Hq and draws its residual samples per query head, which the eager path (enable_gqa) does not."""
    monkeypatch.setenv("HYPER_INNER_BACKEND", "eager")
    model = tiny_gemma(kv_heads=4)
    body = quality.body_and_head(model)[0]
    with swap_attention("5", config=SMALL, module=body):
        direct = ppl(model, data)
    before = hyper_op.path_counts()
    run, done = quality.make_runner(quality.Row("backend:5", "backend", "5", SMALL), body, 6)
    try:
        compiled = ppl(model, data, run)
    finally:
        done()
    assert hyper_op.path_counts()["hyper"] - before["hyper"] == 3
    assert compiled == pytest.approx(direct, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# the error study's pieces (bench/error_study.py)
# ---------------------------------------------------------------------------------------------------------

_ES = os.path.join(os.path.dirname(__file__), "..", "bench", "error_study.py")
_es_spec = importlib.util.spec_from_file_location("bench_error_study", _ES)
error_study = importlib.util.module_from_spec(_es_spec)
sys.modules[_es_spec.name] = error_study
_es_spec.loader.exec_module(error_study)


@pytest.fixture(scope="module")
def record(gemma):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad(), capture_attention("5") as records:
        gemma(torch.randint(3, 96, (1, 256), generator=g))
    return records[0]


def test_sink_keys_on_a_captured_site_keep_row_zero_exact(record):
    """The op's sinks on real captured Q/K/V: it approximates, and row 0 (which sees only key 0) is exact."""
    v = record["v"]
    cfg = SMALL.replace(min_seq_len=64, sink_keys=1)
    before = hyper_op.path_counts()["hyper"]
    out = error_study.run({**record, "causal": True}, cfg)
    assert hyper_op.path_counts()["hyper"] == before + 1 and torch.isfinite(out).all()
    assert torch.allclose(out[:, :, 0], v[:, :, 0].expand_as(out[:, :, 0]), atol=1e-6)


def test_error_study_measures_zero_error_when_exact(record):
    problem = error_study.make_problem(record, num_rows=32, base=SMALL.replace(min_seq_len=64))
    assert problem.approx.any() and not problem.approx.all()  # the first causal leaf is exact
    assert 0.0 <= problem.profile["sink_mass"] <= 1.0
    assert problem.profile["approximated_mass"] >= problem.profile["approximated_mass_without_sink"]
    exact = error_study.errors(problem, HyperConfig())  # n=256 < 4096: the op runs exact
    assert exact["frob_rel"] < 1e-5 and exact["row_rel_mean"] < 1e-5
    approx = error_study.errors(problem, SMALL.replace(min_seq_len=64))
    assert approx["row_rel_mean"] > 1e-3
    names = [
        (name, value) for name, value, _ in error_study.configs(SMALL, {"block_size": [8, 16], "sink_keys": [0, 2]})
    ]
    assert names == [("base", None), ("block_size", 16), ("sink_keys", 2)]
    assert error_study.parse_config(SMALL, "sink_keys=4, residual=stratified") == SMALL.replace(
        sink_keys=4, residual="stratified"
    )


def test_frontier_rows_and_plot(record, tmp_path):
    pytest.importorskip("matplotlib", reason="the frontier picture needs matplotlib (the bench extra)")
    base = SMALL.replace(min_seq_len=64)
    problems = [error_study.make_problem(record, num_rows=16, base=base)]
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(quiet=True)) as progress:
        rows = error_study.frontier(problems, [base, base.replace(sink_keys=1)], seeds=1, repeats=1, progress=progress)
    assert [r["config"]["sink_keys"] for r in rows] == [0, 1]
    assert all(r["speedup"] > 0 and r["hyper_seconds"] > 0 and r["row_rel_mean"] > 0 for r in rows)
    path = tmp_path / "frontier.png"
    error_study.plot_frontier(rows, base, str(path), "test")
    assert path.stat().st_size > 1000
