"""Tiny HF transformers models (random weights, built from configs) through ``backend="hyper"``.

For each model: every attention site is lowered; below ``min_seq_len`` the compiled model equals eager (its
error against a float64 run within 4x eager's own); at n >= ``min_seq_len`` the op's approximate path runs; a
training step with backward works; it compiles with ``fullgraph=True`` and, with dynamic shapes, once for
all lengths.

SDPA models run with ``inner_backend="eager"``: the SDPA rewrite happens on the Dynamo graph, so this checks
the lowering and the op's autograd without paying inductor's compile time. `test_hf_inductor` runs the full
inductor pipeline on one model; the ``eager`` attention implementation (HF's ``eager_attention_forward``, with
``repeat_kv`` GQA) is hand-written attention and needs inductor's pattern pass.
"""

from __future__ import annotations

import copy

import pytest
import torch
import zoo

import hyper_backend

pytestmark = pytest.mark.usefixtures("lsh_detector")  # written for the LSH estimator: conftest.py

OPTS = dict(min_seq_len=32, block_size=16, sample_size=16, tune_cache="")


@pytest.fixture(autouse=True)
def fresh():
    with zoo.fresh_compiles():
        yield


def _main(out):
    return out["last_hidden_state"] if "last_hidden_state" in out else out["logits"]


def _double(inputs):
    return {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}


def _expected_hyper(name, n, sites):
    """Sites whose approximate path runs at length n (msl 32, block 16): BART's decoder self-attention has
    n // 4 = 32 tokens, and causal attention of 32 tokens is exact (its pieces are at most min_seq_len)."""
    return 4 if name == "bart" else sites


def _check_exact(model, compiled, inputs):
    with torch.no_grad():
        oracle = _main(copy.deepcopy(model).double()(**_double(inputs)))
        eager = _main(model(**inputs))
    out = _main(compiled(**inputs))
    err = (out.double() - oracle).abs().max().item()
    base = (eager.double() - oracle).abs().max().item()
    assert err <= 4 * base + 1e-6, f"compiled error {err:.3g} vs eager's {base:.3g}"


def _train_step(compiled, inputs):
    loss = _main(compiled(**inputs)).float().square().mean()
    loss.backward()
    return loss


@pytest.mark.parametrize("name", [n for n in zoo.HF_SDPA if n != "vit"])
def test_hf_sdpa(name, call_delta):
    model, make, sites = zoo.hf_model(name)
    model.train()  # every dropout is 0: train mode computes what eval does
    compiled = torch.compile(
        model, backend="hyper", fullgraph=True, dynamic=True, options={**OPTS, "inner_backend": "eager"}
    )
    torch.manual_seed(1)
    _check_exact(model, compiled, make(24, 2))
    assert call_delta() == {"hyper": 0, "exact": sites, "backward": 0}
    _train_step(compiled, make(128, 2))
    assert call_delta() == {
        "hyper": _expected_hyper(name, 128, sites),
        "exact": 2 * sites - _expected_hyper(name, 128, sites),
        "backward": sites,
    }
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    counters = torch._dynamo.utils.counters["hyper_backend"]
    assert counters["rewritten:sdpa"] == sites and counters["exact"] == 0
    assert counters["graphs"] == 1, "one compile must serve both lengths"


def test_hf_vit(call_delta):
    """ViT's length is fixed by the image (257 tokens): exact with min_seq_len above it, approximate below."""
    model, make, sites = zoo.hf_model("vit")
    model.train()
    inputs = make(0, 2)
    exact = torch.compile(
        model, backend="hyper", fullgraph=True, options={**OPTS, "min_seq_len": 512, "inner_backend": "eager"}
    )
    _check_exact(model, exact, inputs)
    assert call_delta() == {"hyper": 0, "exact": sites, "backward": 0}
    torch._dynamo.reset()
    approx = torch.compile(model, backend="hyper", fullgraph=True, options={**OPTS, "inner_backend": "eager"})
    _train_step(approx, inputs)
    assert call_delta() == {"hyper": sites, "exact": sites, "backward": sites}


def test_hf_disabled_is_eager(monkeypatch, call_delta):
    """``HYPER_ATTENTION=0``: nothing is lowered and the output is eager's."""
    monkeypatch.setenv("HYPER_ATTENTION", "0")
    model, make, sites = zoo.hf_model("llama")
    inputs = make(128, 2)
    compiled = torch.compile(model, backend="hyper", fullgraph=True, options={**OPTS, "inner_backend": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(_main(compiled(**inputs)), _main(model(**inputs)), rtol=0, atol=0)
    assert call_delta() == {"hyper": 0, "exact": 0, "backward": 0}
    assert torch._dynamo.utils.counters["hyper_backend"]["exact"] == sites


def test_hf_inductor(call_delta):
    """The full pipeline: Dynamo-level rewrite, then inductor (one layer: inductor's compile is the cost)."""
    model, make, sites = zoo.hf_model("qwen2", layers=1)
    compiled = torch.compile(model, backend="hyper", fullgraph=True, dynamic=True, options=OPTS)
    with torch.no_grad():
        _check_exact(model, compiled, make(24, 2))
        assert torch.isfinite(_main(compiled(**make(128, 2)))).all()
    assert call_delta() == {"hyper": sites, "exact": sites, "backward": 0}
    assert torch._dynamo.utils.counters["hyper_backend"]["graphs"] == 1


def _hf_eager_attention(name, call_delta, train=False):
    model, make, sites = zoo.hf_model(name, attn="eager", layers=1)
    compiled = torch.compile(model, backend="hyper", fullgraph=True, dynamic=True, options=OPTS)
    torch.manual_seed(1)
    if train:
        model.train()
        _train_step(compiled, make(128, 2))
        assert call_delta() == {"hyper": sites, "exact": 0, "backward": sites}
        return
    with torch.no_grad():
        _check_exact(model, compiled, make(24, 2))
        assert call_delta() == {"hyper": 0, "exact": sites, "backward": 0}
        assert torch.isfinite(_main(compiled(**make(128, 2)))).all()
    assert call_delta()["hyper"] == sites
    counters = torch._dynamo.utils.counters["hyper_backend"]
    assert counters["rewritten"] == sites and counters["graphs"] == 1


def test_hf_eager_attention_llama(call_delta):
    """HF's ``eager_attention_forward`` (matmul * scaling + causal mask, fp32 softmax, repeat_kv GQA)."""
    _hf_eager_attention("llama", call_delta)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mistral", "qwen2"])
def test_hf_eager_attention_more(name, call_delta):
    _hf_eager_attention(name, call_delta)


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.HF_EAGER)
def test_hf_eager_attention_training(name, call_delta):
    _hf_eager_attention(name, call_delta, train=True)


@pytest.mark.parametrize(
    "name,kinds",
    [
        ("gemma3", ["window", "sdpa", "window", "sdpa"]),
        pytest.param("mistral_window", ["window", "window"], marks=pytest.mark.slow),  # the same HF mask code
    ],
)
def test_hf_sliding_window_layers_run_the_exact_window_op(name, kinds, call_delta):
    """HF's sliding-window masks (Gemma 3's local layers, Mistral's sliding_window) are proven banded and served
    by hyper::window_attention, exactly, in inference and training; the global layers still go to HyperAttention."""
    from hyper_backend.kernels import op

    model, make, sites = zoo.hf_model(name, layers=len(kinds))
    model.train()  # every dropout is 0
    before = op.path_counts(window=True)
    compiled = torch.compile(model, backend="hyper", dynamic=True, options={**OPTS, "inner_backend": "aot_eager"})
    torch.manual_seed(1)
    _check_exact(model, compiled, make(24, 2))  # the window (16) inside the sequence
    _train_step(compiled, make(128, 2))
    windows = kinds.count("window")
    calls = {k: op.path_counts(window=True)[k] - before[k] for k in before}
    assert calls["window"] == 2 * windows and calls["window_backward"] == windows
    assert calls["hyper"] + calls["exact"] == 2 * (sites - windows)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    report = hyper_backend.explain(model, **make(64, 1), options=OPTS, dynamic=True)
    assert [s.kind for s in report.sites] == kinds
    assert all("sliding window of 16 keys" in s.reason for s in report.sites if s.kind == "window")
