"""The autotuner: cost model, cache (lookup, corruption, concurrent writers), inputs, the error oracle, the CLI,
and an end-to-end tune whose cache the op then uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import sympy as sp
import torch
import torch.nn.functional as F

from hyper_backend import HyperConfig as _Config
from hyper_backend import hyper_attention
from hyper_backend.autotune import cost, measure, schema, store, writer
from hyper_backend.autotune.cli import main, parse_seq
from hyper_backend.autotune.grid import Space, grid, structure
from hyper_backend.autotune.inputs import InputError, Sample, load_inputs, synthetic
from hyper_backend.config import CAUSAL_WINDOW, OpSettings, op_settings
from hyper_backend.kernels import cpu
from hyper_backend.kernels.op import fit
from hyper_backend.kernels.plan import plan_call

pytestmark = pytest.mark.usefixtures("lsh_detector")  # written for the LSH estimator: conftest.py


def HyperConfig(*args, **fields):  # noqa: N802
    """The tuner and the calibration search the LSH estimator's sizes: these tests' configs are LSH configs."""
    return _Config(*args, **{"detector": "lsh", **fields})


CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------
# cost model
# ----------------------------------------------------------------------------------------------------------


def _rates(flash=2e10, bandwidth=5e9, sort=2e8, call=2e-3):
    return cost.Rates(flash={(256, 256, False, False): flash}, bandwidth=bandwidth, sort=sort, call=call)


def test_symbolic_counts_grow_with_n():
    for parts in (cost.noncausal_hyper(), cost.causal_hyper(), cost.exact(), cost.exact(causal=True)):
        for name, expr in parts.items():
            if name == "calls":
                continue
            grad = sp.diff(expr, cost.n)
            point = {
                cost.n: 2**17,
                cost.d: 64,
                cost.b: 256,
                cost.m: 256,
                cost.r: 7,
                cost.e: 143,
                cost.s: 4,
                cost.depth: 5,
            }
            assert float(grad.subs(point)) > 0, (name, expr)


def test_causal_closed_form_matches_level_by_level_evaluation():
    # with a flash rate of 1 FLOP/s and free memory, predicted seconds are FLOPs
    unit = cost.Rates(flash={(1, 1, False, False): 1.0}, bandwidth=1e300, sort=1e300, call=0.0)
    n, d, b, m, r, L = 1 << 16, 64, 256, 128, 5, 4
    c = HyperConfig(b, m, r, min_seq_len=n >> L, causal_depth=None)
    f, o = cost.predict_parts(n, True, c, head_dim=d, elem_bytes=4, batch_heads=1, rates=unit)
    extras = CAUSAL_WINDOW - 1 + c.sink_keys  # every quadrant's exact strip, and the sinks (in its first one)
    closed = cost.total_flops(cost.causal_hyper()).subs(
        {cost.n: n, cost.d: d, cost.b: b, cost.m: m, cost.r: r, cost.e: extras, cost.depth: L}
    )
    assert f + o == pytest.approx(float(closed), rel=1e-9)


@pytest.mark.parametrize(
    "n, causal, c",
    [
        (3000, True, HyperConfig(256, 256, 7, min_seq_len=512, sink_keys=64)),  # padded leaves, exact quadrants
        (5000, True, HyperConfig(512, 1024, 7, min_seq_len=1024, causal_depth=2, local_window=32)),
        (6000, False, HyperConfig(256, 256, 7, min_seq_len=1024, local_window=128)),  # hyper + band
        (700, False, HyperConfig(256, 2048, 7, min_seq_len=1024)),  # exact below min_seq_len
    ],
)
def test_the_cost_model_prices_the_call_plan_the_op_runs(n, causal, c):
    # with a flash rate of 1 FLOP/s and free memory, predicted seconds are the FLOPs of the parts the op computes
    unit = cost.Rates(flash={(1, 1, False, False): 1.0}, bandwidth=1e300, sort=1e300, call=0.0)
    d = 64
    f = fit(c, n, n)
    flops = 0
    for part in plan_call(n, n, causal, f).parts:
        if part.kind == "hyper":
            side = f.sample_size + cost.extras(part, f.sink_keys)
            lsh = 4 * part.sq * d * f.lsh_num_projs
            flops += part.count * (4 * part.sq * f.block_size * d + 4 * part.sq * side * d + lsh)
        elif part.kind == "band":
            flops += 4 * part.count * part.sq * (sum(part.window) + 1) * d
        else:
            flops += (2 if part.kind == "causal" else 4) * part.count * part.sq * part.sk * d
    got = sum(cost.predict_parts(n, causal, c, head_dim=d, elem_bytes=4, batch_heads=1, rates=unit))
    assert got == pytest.approx(flops, rel=1e-9)
    more = sum(
        cost.predict_parts(
            n, causal, c.replace(sink_keys=c.sink_keys + 32), head_dim=d, elem_bytes=4, batch_heads=1, rates=unit
        )
    )
    assert more > got if cost.call_plan(n, causal, c).approximates else more == got


def test_predicted_time_is_monotone_in_n_and_a_crossover_exists():
    rates = _rates()
    kw = dict(head_dim=64, elem_bytes=4, batch_heads=1, rates=rates)
    for causal in (False, True):
        c = HyperConfig(256, 256, 7, 4096, None)
        times = [cost.predict_time(1 << k, causal, c, **kw) for k in range(13, 21)]
        assert all(a < b for a, b in zip(times, times[1:])), times
    c = HyperConfig(256, 256, 7, 1, None)
    x = cost.crossover(c, **kw)
    assert x is not None and 2 * 256 < x < 1 << 20
    hyper = lambda n: sum(cost.predict_parts(n, False, c, **kw))  # noqa: E731
    exact = lambda n: sum(cost.exact_parts(n, False, **kw))  # noqa: E731
    assert hyper(x) < exact(x) and hyper(x - 1) >= exact(x - 1)
    assert all(hyper(y) < exact(y) for y in (2 * x, 4 * x, 64 * x))
    assert all(hyper(y) >= exact(y) for y in range(2 * 256 + 1, x, 37))
    # slower approximate calls (bigger fixed overhead) move the crossover up
    slow = cost.crossover(c, **dict(kw, rates=_rates(call=0.2)))
    assert slow > x


# ----------------------------------------------------------------------------------------------------------
# error oracle and inputs
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_exact_rows_match_full_attention(causal):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 1000, 40, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 1000, 40, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 1000, 40, generator=g, dtype=torch.float64)
    s = Sample(q, k, v, 0.3, "t")
    ref = measure.reference(s, causal, 63, seed=3)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(ref.out, full[:, :, ref.rows], rtol=1e-10, atol=1e-10)
    assert measure.row_error([full], [ref]) < 1e-10
    # float32 inputs: the oracle computes in float32, far below the errors being measured
    s32 = Sample(q.float(), k.float(), v.float(), 0.3, "t")
    assert measure.row_error([full], [measure.reference(s32, causal, 63, seed=3)]) < 1e-5


def test_load_inputs_format_and_errors(tmp_path):
    q, k, v = torch.randn(1, 4, 300, 16), torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
    path = str(tmp_path / "qkv.pt")
    torch.save([{"q": q, "k": k, "v": v, "name": "layer 3", "scale": 0.5}], path)
    (s,) = load_inputs(path, dtype=torch.float32, device=CPU, min_len=256)
    assert s.name == "layer 3" and s.scale == 0.5 and s.prefix(256).q.shape == (1, 4, 256, 16)
    with pytest.raises(InputError, match="fewer than"):
        load_inputs(path, dtype=torch.float32, device=CPU, min_len=512)
    torch.save({"q": q, "k": k}, path)
    with pytest.raises(InputError, match="'q', 'k', 'v'"):
        load_inputs(path, dtype=torch.float32, device=CPU, min_len=1)
    torch.save({"q": q, "k": k[:, :, :200], "v": v}, path)
    with pytest.raises(InputError, match="do not agree"):
        load_inputs(path, dtype=torch.float32, device=CPU, min_len=1)


def test_synthetic_mixed_is_far_from_uniform():
    s = synthetic("mixed", n=4096, head_dim=64, heads=2)
    p = torch.softmax(s.q[:, :, -64:] @ s.k.transpose(-1, -2) / 8, -1)
    top = p.topk(256, -1).values.sum(-1).mean()  # mass on the top 1/16 of keys
    g = synthetic("gaussian", n=4096, head_dim=64, heads=2)
    p_g = torch.softmax(g.q[:, :, -64:] @ g.k.transpose(-1, -2) / 8, -1)
    assert top > 0.5 > p_g.topk(256, -1).values.sum(-1).mean()


# ----------------------------------------------------------------------------------------------------------
# cache
# ----------------------------------------------------------------------------------------------------------

DEV = schema.device_key(CPU)


def _entry(n, causal=True, **params):
    params = {
        "block_size": 128,
        "sample_size": 64,
        "lsh_num_projs": 5,
        "min_seq_len": 1024,
        "causal_depth": None,
        "seed": 0,
        **params,
    }
    return schema.make_entry(
        device=DEV,
        dtype="float32",
        head_dim=64,
        causal=causal,
        seq_len=n,
        params=params,
        tuned={"seq_len": n, "time_s": 1.0, "error": 0.1},
    )


def _lookup(path, n, causal=True, dtype=torch.float32, head_dim=64):
    return store.lookup_tuned(path, device=CPU, dtype=dtype, head_dim=head_dim, causal=causal, seq_len=n)


def test_cache_nearest_bucket_and_keys(tmp_path):
    path = str(tmp_path / "tune.json")
    assert _lookup(path, 4096) is None  # no file
    writer.record(path, [_entry(4096, block_size=64), _entry(65536, block_size=512)])
    assert schema.bucket(5000) == 4096 and schema.bucket(6000) == 8192
    assert _lookup(path, 4096)["block_size"] == 64
    assert _lookup(path, 11000)["block_size"] == 64  # log2 distance 1.4 to 4096, 2.6 to 65536
    assert _lookup(path, 40000)["block_size"] == 512
    assert _lookup(path, 1 << 20)["block_size"] == 512
    assert _lookup(path, 4096, causal=False) is None
    assert _lookup(path, 4096, dtype=torch.bfloat16) is None
    assert _lookup(path, 4096, head_dim=128) is None
    writer.record(
        path,
        defaults=[
            schema.make_default(
                device=DEV, dtype="float32", head_dim=64, min_seq_len=3000, crossover={"predicted": 3000}
            )
        ],
    )
    assert _lookup(path, 4096, causal=False) == {"min_seq_len": 3000}
    assert _lookup(path, 4096)["causal_depth"] is None and _lookup(path, 4096)["lsh_num_projs"] == 5
    d = store.describe_entry(path, device=CPU, dtype=torch.float32, head_dim=64, causal=True, seq_len=50000)
    assert d["source"] == "entry" and d["bucket"] == 65536 and "bucket 65536" in d["summary"]
    d = store.describe_entry(path, device=CPU, dtype=torch.float32, head_dim=64, causal=False, seq_len=50000)
    assert d["source"] == "device default" and d["params"] == {"min_seq_len": 3000}
    data = json.load(open(path))
    assert data["schema"] == schema.SCHEMA and data["version"] == schema.VERSION


def test_cache_lookup_parses_once_per_file_version(tmp_path, monkeypatch):
    path = str(tmp_path / "tune.json")
    writer.record(path, [_entry(4096)])
    reads = []
    real = store.read
    monkeypatch.setattr(store, "read", lambda *a, **k: reads.append(1) or real(*a, **k))
    for _ in range(20):
        _lookup(path, 4096)
    assert len(reads) <= 1
    writer.record(path, [_entry(4096, block_size=32)])
    os.utime(path, ns=(1, 10**18))  # a distinct mtime even on coarse clocks
    before = len(reads)  # record() read the file too, to merge
    assert _lookup(path, 4096)["block_size"] == 32 and _lookup(path, 4096) and len(reads) == before + 1


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        json.dumps({"schema": schema.SCHEMA, "version": 99, "entries": {}}),
        json.dumps([1, 2]),
        json.dumps({"schema": schema.SCHEMA, "version": 1, "entries": {"x": {"params": "bad"}}}),
    ],
)
def test_corrupted_or_foreign_cache_is_ignored_with_a_warning(tmp_path, content, monkeypatch):
    path = str(tmp_path / "tune.json")
    with open(path, "w") as f:
        f.write(content)
    with pytest.warns(store.CacheWarning):
        assert _lookup(path, 4096) is None
    # the op still runs, on defaults
    q = torch.randn(1, 1, 64, 16)
    monkeypatch.setenv("HYPER_TUNE_CACHE", path)
    out = hyper_attention(q, q, q, is_causal=True)
    assert out.shape == q.shape
    if content.startswith(("{not", "[")):  # not ours: the tuner refuses to replace it (issue 12; see
        with pytest.raises(writer.CachePathError):  # tests/test_reliability.py)
            writer.record(path, [_entry(4096)])
        assert open(path).read() == content and os.listdir(tmp_path) == ["tune.json"]
        return
    # the next write sets a file of our schema it cannot use aside and starts a valid cache; a file of this
    # version keeps the entries it can use, and a copy of itself as it was (issue 18 item 11: nothing is lost)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        writer.record(path, [_entry(4096)])
    assert _lookup(path, 4096)["block_size"] == 128
    assert len(json.load(open(path))["entries"]) == 1
    set_aside = [name for name in os.listdir(tmp_path) if name.startswith("tune.json.") and name != "tune.json.lock"]
    kept = "tune.json.rejected" if "entries" in content and "params" in content else "tune.json.v99"
    assert set_aside == [kept] and open(tmp_path / kept).read() == content


_WRITER = textwrap.dedent("""
    import os, sys, time
    from hyper_backend.autotune import schema, store, writer
    path, tag, count, tags = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    open(path + ".ready-" + tag, "w").close()
    while not all(os.path.exists(path + ".ready-" + t) for t in tags):  # start together
        time.sleep(0.001)
    for i in range(count):
        e = schema.make_entry(device="cpu:test-" + tag, dtype="float32", head_dim=64, causal=True,
                             seq_len=2 ** (i + 6), params={"block_size": 64 + i}, tuned={})
        writer.record(path, [e])
""")


def test_concurrent_writers_keep_every_entry(tmp_path):
    os.makedirs(tmp_path / "sub")
    path = str(tmp_path / "sub" / "tune.json")
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, path, tag, "20", "ab"]) for tag in "ab"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    data = json.load(open(path))
    assert data["version"] == schema.VERSION
    assert len(data["entries"]) == 40
    assert not [f for f in os.listdir(tmp_path / "sub") if f.startswith(".tune-")]  # no temporary files left


# ----------------------------------------------------------------------------------------------------------
# the one candidate grid
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, causal", [(8192, True), (32768, True), (131072, True), (8192, False), (1000, False)])
def test_one_grid_every_candidate_distinct_and_approximating(n, causal):
    space = Space(block_sizes=(128, 256), sample_sizes=(64, 256), sink_keys=(0, 16), min_seq_len=1024)
    for crossover in (None, lambda c: 4 * c.block_size + c.sample_size):
        cands = grid(n, causal, space, crossover)
        keys = [structure(n, causal, c) for c in cands]
        assert len(set(keys)) == len(keys) and all(keys)  # distinct computations, none exact
        assert all(c.min_seq_len >= space.min_seq_len and c.block_size < n for c in cands)
        assert {(c.block_size, c.sample_size, c.sink_keys) for c in cands} <= {
            (b, m, k) for b in space.block_sizes for m in space.sample_sizes for k in space.sink_keys
        }
    assert grid(1000, False, Space(min_seq_len=4096)) == []  # below the smallest threshold: nothing approximates


def test_the_tuner_and_the_calibration_take_the_same_grid():
    from hyper_backend.autotune.calibrate import CalibrationSettings, candidates
    from hyper_backend.autotune.search import TuneSettings

    assert TuneSettings(seq_lens=[8192]).space == CalibrationSettings(seq=8192).space == Space()
    space = Space(block_sizes=(128,), sample_sizes=(64, 128), min_seq_len=512)
    assert candidates(8192, True, CalibrationSettings(seq=8192, space=space)) == grid(8192, True, space)


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def test_parse_seq_forms():
    assert parse_seq("4k:32k") == [4096, 8192, 16384, 32768]
    assert parse_seq("1000,128k") == [1000, 131072]


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "--seq"),
        (["--seq", "abc"], "not a length"),
        (["--seq", "10"], "outside"),
        (["--seq", "8k:4k"], "reversed"),
        (["--seq", "4096", "--max-error", "-1"], "positive"),
        (["--seq", "4096", "--max-error", "lots"], "a number or 'auto'"),
        (["--seq", "4096", "--time-budget", "0"], "positive"),
        (["--seq", "4096", "--dtype", "int8"], "invalid choice"),
        (["--seq", "4096", "--head-dim", "30"], "multiple of 4"),
        (["--seq", "4096", "--inputs", "/nonexistent/qkv.pt"], "no such file"),
        (["--seq", "4096", "--lsh-projs", "7,40"], "at most 30"),
        (["--seq", "4096", "--device", "gpu9"], "not a torch device"),
    ],
)
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# end to end: tune at a short length, then the op runs with the tuned parameters
# ----------------------------------------------------------------------------------------------------------


def test_tune_writes_cache_and_the_op_uses_it(tmp_path, monkeypatch, capsys):
    path = str(tmp_path / "tune.json")
    code = main(
        [
            "--seq",
            "8192",
            "--no-causal",
            "--cache",
            path,
            "--max-error",
            "0.95",
            "--time-budget",
            "25",
            "--block-sizes",
            "128,256",
            "--sample-sizes",
            "64,128",
            "--lsh-projs",
            "5,7",
            "--rounds",
            "3",
            "--error-rows",
            "64",
            "--no-crossover-check",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "screening" in out and "race" in out and "vs default" in out
    data = json.load(open(path))
    (entry,) = data["entries"].values()
    assert not entry["causal"] and entry["bucket"] == 8192 and entry["tuned"]["seq_len"] == 8192
    assert entry["tuned"]["error"] <= 0.95
    assert data["defaults"]  # the predicted crossover
    tuned = dict(HyperConfig().__dict__, **entry["params"])

    seen = []
    real = cpu.attention_forward
    monkeypatch.setattr(cpu, "attention_forward", lambda *a, **kw: seen.append(a[-1]) or real(*a, **kw))
    monkeypatch.setenv("HYPER_TUNE_CACHE", path)
    q = torch.randn(1, 1, 7000, 64)  # bucket 8192
    hyper_attention(q, q, q)
    expected = HyperConfig(**tuned)
    assert seen[-1] == expected

    # explicit values win over tuned ones, field by field
    monkeypatch.setenv("HYPER_BLOCK_SIZE", "64")
    hyper_attention(q, q, q)
    assert seen[-1] == expected.replace(block_size=64)
    monkeypatch.delenv("HYPER_BLOCK_SIZE")
    # a full config bypasses the cache
    cfg = HyperConfig(block_size=32, sample_size=16, lsh_num_projs=3, min_seq_len=512, causal_depth=2)
    hyper_attention(q, q, q, config=cfg)
    assert seen[-1] == HyperConfig(32, 16, 3, 512, 2, 0)


def test_written_params_reach_the_op(tmp_path, monkeypatch):
    """A hand-written entry with every field non-default arrives intact (the tuner's own choice above may
    legitimately be exact attention, i.e. only min_seq_len)."""
    path = str(tmp_path / "tune.json")
    writer.record(
        path,
        [
            _entry(
                1024,
                causal=False,
                block_size=96,
                sample_size=48,
                lsh_num_projs=4,
                min_seq_len=300,
                causal_depth=3,
                seed=5,
            )
        ],
    )
    seen = []
    real = cpu.attention_forward
    monkeypatch.setattr(cpu, "attention_forward", lambda *a, **kw: seen.append(a[-1]) or real(*a, **kw))
    monkeypatch.setenv("HYPER_TUNE_CACHE", path)
    q = torch.randn(1, 1, 1000, 64)
    hyper_attention(q, q, q)
    assert seen[-1] == HyperConfig(96, 48, 4, 300, 3, 5)
    monkeypatch.setenv("HYPER_TUNE_CACHE", str(tmp_path / "missing.json"))
    hyper_attention(q, q, q)
    d = HyperConfig()
    # the op receives the defaults fitted to the call: sample_size=None resolved to the detector's draws
    assert seen[-1] == HyperConfig(d.block_size, d.draws, d.lsh_num_projs, d.min_seq_len, None, d.seed)


def test_compiled_backend_uses_tuned_params_and_explicit_settings_win(tmp_path, monkeypatch):
    """Through ``torch.compile(backend="hyper")``: tuned entry, then options and HYPER_* env overriding it."""
    pytest.importorskip("hyper_backend.backend", reason="the hyper backend module is not in this tree")
    path = str(tmp_path / "tune.json")
    writer.record(
        path,
        [
            _entry(
                1024,
                causal=True,
                block_size=96,
                sample_size=48,
                lsh_num_projs=4,
                min_seq_len=300,
                causal_depth=3,
                seed=5,
            )
        ],
    )
    seen = []
    real = cpu.attention_forward
    monkeypatch.setattr(cpu, "attention_forward", lambda *a, **kw: seen.append(a[-1]) or real(*a, **kw))
    for var in [v for v in os.environ if v.startswith("HYPER_") and v != "HYPER_DETECTOR"]:
        monkeypatch.delenv(var)

    def f(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    q = torch.randn(1, 2, 1000, 64)

    def run(**options):
        torch._dynamo.reset()
        torch.compile(f, backend="hyper", options={"tune_cache": path, "inner_backend": "eager", **options})(q, q, q)
        return seen[-1]

    assert run() == HyperConfig(96, 48, 4, 300, 3, 5)
    assert run(block_size=64) == HyperConfig(64, 48, 4, 300, 3, 5)
    monkeypatch.setenv("HYPER_SAMPLE_SIZE", "32")
    assert run() == HyperConfig(96, 32, 4, 300, 3, 5)
    torch._dynamo.reset()


def test_explain_names_the_tuned_entry_it_used(tmp_path, monkeypatch):
    """`hyper_backend.explain` reports which tuning-cache entry the op applied during its run."""
    pytest.importorskip("hyper_backend.backend", reason="the hyper backend module is not in this tree")
    from hyper_backend import explain

    path = str(tmp_path / "tune.json")
    writer.record(
        path,
        [
            _entry(
                1024,
                causal=True,
                block_size=96,
                sample_size=48,
                lsh_num_projs=4,
                min_seq_len=300,
                causal_depth=3,
                seed=5,
            )
        ],
    )
    for var in [v for v in os.environ if v.startswith("HYPER_") and v != "HYPER_DETECTOR"]:
        monkeypatch.delenv(var)

    def f(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    q = torch.randn(1, 2, 1000, 64)
    torch._dynamo.reset()
    report = explain(f, q, q, q, options={"tune_cache": path, "inner_backend": "eager"})
    expected = store.describe_entry(path, device=q.device, dtype=q.dtype, head_dim=64, causal=True, seq_len=1000)
    assert report.tuning == [expected["summary"]]
    assert expected["summary"].split()[0] in str(report)
    torch._dynamo.reset()
    untuned = explain(f, q, q, q, options={"tune_cache": "", "inner_backend": "eager"})
    assert untuned.tuning == []
    torch._dynamo.reset()


def test_tuned_table_agrees_with_the_lookup_at_every_length(tmp_path):
    """The compile-time table (`tuned_table`) gives each length what `lookup_tuned` gives it, at the bucket
    boundaries too, so one dynamic graph resolves lengths as the per-call lookup did."""
    path = str(tmp_path / "tune.json")
    writer.record(path, [_entry(4096, block_size=64), _entry(65536, block_size=512), _entry(8192, block_size=96)])
    table = store.tuned_table(path, device=CPU, dtype=torch.float32, head_dim=64, causal=True)
    settings = op_settings({}, table)
    for n in (1, 4095, 4096, 5792, 5793, 5794, 8192, 23170, 23171, 23172, 65536, 1 << 22):
        assert settings.for_length(n).block_size == _lookup(path, n)["block_size"], n
    assert store.tuned_table(path, device=CPU, dtype=torch.float32, head_dim=32, causal=True) == ()


def test_a_cache_rewrite_between_forward_and_backward_changes_nothing(tmp_path, monkeypatch):
    """The op is a pure function of its inputs: the settings resolved at compile time travel with the call into
    its backward, so a tuner writing the cache in between cannot give gradients of another approximation."""
    path = str(tmp_path / "tune.json")
    writer.record(path, [_entry(512, causal=False, block_size=32, sample_size=16, min_seq_len=64)])
    q0 = torch.randn(1, 2, 512, 64)

    def grads(rewrite: bool):
        torch._dynamo.reset()
        f = torch.compile(
            lambda q: F.scaled_dot_product_attention(q, q, q),
            backend="hyper",
            options={"tune_cache": path, "inner_backend": "aot_eager"},
        )
        q = q0.clone().requires_grad_()
        out = f(q)
        if rewrite:
            writer.record(path, [_entry(512, causal=False, block_size=128, sample_size=64, min_seq_len=64)])
        out.sum().backward()
        return out.detach(), q.grad

    first = grads(rewrite=True)
    writer.record(path, [_entry(512, causal=False, block_size=32, sample_size=16, min_seq_len=64)])
    second = grads(rewrite=False)
    torch._dynamo.reset()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_the_op_reads_no_file(monkeypatch):
    """A call of the op with every file access failing: it needs nothing but its arguments."""
    import builtins

    q = torch.randn(1, 1, 256, 16, requires_grad=True)
    settings = OpSettings.of(HyperConfig(min_seq_len=64, block_size=32, sample_size=16)).encode()

    def refuse(*args, **kwargs):
        raise AssertionError("the op touched the file system")

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(os, "stat", refuse)
    out, _ = torch.ops.hyper.attention(q, q, q, None, True, None, settings)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
