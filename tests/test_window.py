"""``torch.ops.hyper.window_attention`` and ``hyper_backend.window_attention``: exact banded attention.

Truth is dense masked attention: ``F.scaled_dot_product_attention`` with the band as a dense bool mask in float64
(and `reference.window_attention_reference` where rows have no key, which SDPA leaves as NaN). Low-precision
tolerances are tied to eager's own error: the same SDPA call at the inputs' dtype, against float64.

Every CPU schedule (`cpu.window.window_schedule`: full, causal, dense, band tiles) is checked on its own, whatever the
cost model would pick for the shape; the Triton path runs under ``TRITON_INTERPRET=1`` in a spawned worker (as
in tests/test_triton.py, the test process never imports triton).
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import math
import multiprocessing
import os

import pytest
import torch
import torch.nn.functional as F

import hyper_backend
from hyper_backend.kernels import cost
from hyper_backend.kernels import op as hyper_op
from hyper_backend.kernels.cpu import band as cpu_band
from hyper_backend.kernels.cpu import window as cpu_window
from hyper_backend.kernels.reference import window_attention_reference

pytestmark = pytest.mark.usefixtures("one_thread")

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16


def band_mask(Nq, Nk, left, right):
    """The band as SDPA's dense bool mask, written independently of the op: bottom-right aligned."""
    i = torch.arange(Nq)[:, None] + (Nk - Nq)
    j = torch.arange(Nk)[None, :]
    return (j >= i - left) & (j <= i + right)


def sdpa_band(q, k, v, key_valid, left, right, scale=None):
    mask = band_mask(q.shape[2], k.shape[2], left, right)[None, None]
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def window_op(q, k, v, key_valid, left, right, scale=None):
    return torch.ops.hyper.window_attention(q, k, v, key_valid, left, right, scale)


def grads(fn, leaves, do):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    out = fn(*leaves)
    out.backward(do)
    return (out.detach(),) + tuple(x.grad for x in leaves)


def max_err(a, b):
    a, b = a.double(), b.double()
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))  # inf == inf, and NaN only where both are
    return torch.where(same, torch.zeros_like(a), a - b).abs().max().item() if a.numel() else 0.0


def inputs(B, Hq, Hkv, Nq, Nk, D, dtype, seed=0, Dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=g, dtype=F64).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=g, dtype=F64).to(dtype)
    v = torch.randn(B, Hkv, Nk, D if Dv is None else Dv, generator=g, dtype=F64).to(dtype)
    do = torch.randn(B, Hq, Nq, D if Dv is None else Dv, generator=g, dtype=F64).to(dtype)
    return q, k, v, do


def padding(B, Nk, seed=0, keep=0.7):
    g = torch.Generator().manual_seed(seed + 99)
    return torch.rand(B, Nk, generator=g) < keep


def window_of(kind, w, n):
    """(left, right) of a causal sliding window of w keys or a symmetric band of half-width w."""
    return (w - 1, 0) if kind == "causal" else (w, w)


# ----------------------------------------------------------------------------------------------------------
# against dense masked SDPA in float64: outputs, lse and gradients
# ----------------------------------------------------------------------------------------------------------

SIZES = [1, 63, 257, 1000]
WIDTHS = [1, 7, 512, "n"]  # "n": w >= n, the band covers every key


def check_against_sdpa(n, w, kind):
    w = n + 3 if w == "n" else w
    left, right = window_of(kind, w, n)
    q, k, v, do = inputs(1, 4, 2, n, n, 16, F64, seed=n + w)
    ours = grads(lambda q, k, v: window_op(q, k, v, None, left, right)[0], (q, k, v), do)
    truth = grads(lambda q, k, v: sdpa_band(q, k, v, None, left, right), (q, k, v), do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, truth):
        assert max_err(a, b) < 1e-10, name
    _, lse = window_op(q, k, v, None, left, right)
    _, ref_lse = window_attention_reference(q, k, v, None, left, right)
    assert max_err(lse, ref_lse) < 1e-10


def test_a_long_sequence_matches_dense_masked_sdpa():
    """n = 4097 (ragged against every tile size), w = 512 causal: the band tiles at a length where they win."""
    n, (left, right) = 4097, (511, 0)
    assert cpu_window.window_schedule(n, n, (left, right))[0] == "band"
    q, k, v, _ = inputs(1, 2, 1, n, n, 16, F64, seed=3)
    out, lse = window_op(q, k, v, None, left, right)
    assert max_err(out, sdpa_band(q, k, v, None, left, right)) < 1e-10
    assert max_err(lse, window_attention_reference(q, k, v, None, left, right)[1]) < 1e-10


@pytest.mark.parametrize("kind", ["causal", "symmetric"])
@pytest.mark.parametrize("w", WIDTHS, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_matches_dense_masked_sdpa_fp64(n, w, kind):
    check_against_sdpa(n, w, kind)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["causal", "symmetric"])
@pytest.mark.parametrize("w", WIDTHS, ids=str)
@pytest.mark.parametrize("n", [2049, 4097])
def test_matches_dense_masked_sdpa_fp64_long(n, w, kind):
    check_against_sdpa(n, w, kind)


# (B, Hq, Hkv, Nq, Nk, D, Dv, left, right, padded): GQA, key padding, n_q != n_k both ways, head dims that differ
LAYOUTS = [
    (2, 4, 2, 257, 257, 16, 16, 6, 0, True),
    (2, 4, 1, 100, 300, 16, 16, 20, 3, True),  # n_q < n_k: the band sits bottom-right
    (1, 2, 1, 300, 100, 16, 16, 20, 3, False),  # n_q > n_k: the first rows see no key
    (2, 2, 2, 200, 200, 24, 8, 0, 0, True),  # w = 1, Dv != D
    (1, 3, 1, 150, 150, 8, 8, 2**40, 0, True),  # unbounded left: plain causal
    (1, 2, 2, 90, 130, 8, 8, 0, 2**40, False),  # unbounded right
]


@pytest.mark.parametrize("schedule", [None, ("dense", 0), ("band", 32), ("band", 128)], ids=str)
@pytest.mark.parametrize("case", LAYOUTS, ids=str)
def test_layouts_and_every_schedule_match_the_reference(case, schedule, monkeypatch):
    """GQA, padding (incl. rows with no key), n_q != n_k, Dv != D; each CPU schedule forced in turn."""
    B, Hq, Hkv, Nq, Nk, D, Dv, left, right, padded = case
    q, k, v, do = inputs(B, Hq, Hkv, Nq, Nk, D, F64, seed=Nq, Dv=Dv)
    key_valid = None
    if padded:
        key_valid = padding(B, Nk, seed=Nk)
        key_valid[0, : max(Nk - Nq, 0) + min(Nq, Nk) // 3] = False  # batch 0: its first rows see no key
    if schedule is not None:
        monkeypatch.setattr(cpu_window, "window_schedule", lambda *args: schedule)
    ours = grads(lambda q, k, v: window_op(q, k, v, key_valid, left, right)[0], (q, k, v), do)
    truth = grads(lambda q, k, v: window_attention_reference(q, k, v, key_valid, left, right)[0], (q, k, v), do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, truth):
        assert a.shape == b.shape and a.is_contiguous()
        assert max_err(a, b) < 1e-10, name
    out, lse = window_op(q, k, v, key_valid, left, right)
    ref_out, ref_lse = window_attention_reference(q, k, v, key_valid, left, right)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert max_err(lse, ref_lse) < 1e-10
    empty = torch.isneginf(ref_lse)
    if padded or Nq > Nk:
        assert empty.any()  # the case does exercise rows without keys
        assert (out[empty] == 0).all()
        assert (ours[1][empty] == 0).all()  # and they pass no gradient to q


@pytest.mark.parametrize("kind", ["full", "causal"])
def test_full_and_causal_schedules(kind):
    """w >= n is one plain (or causal) fused call, still the band's semantics, with key padding."""
    n = 70
    left, right = (n, n) if kind == "full" else (n, 0)
    assert cpu_window.window_schedule(n, n, hyper_op.window_bounds(n, n, left, right)) == (kind, 0)
    q, k, v, do = inputs(2, 2, 1, n, n, 16, F64, seed=1)
    key_valid = padding(2, n, seed=2)
    key_valid[1, :10] = False
    ours = grads(lambda q, k, v: window_op(q, k, v, key_valid, left, right)[0], (q, k, v), do)
    truth = grads(lambda q, k, v: window_attention_reference(q, k, v, key_valid, left, right)[0], (q, k, v), do)
    for a, b in zip(ours, truth):
        assert max_err(a, b) < 1e-10


# ----------------------------------------------------------------------------------------------------------
# float32 and bfloat16: no worse than eager at that precision
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("n,left,right", [(257, 6, 0), (1000, 511, 0), (1000, 7, 7), (300, 2**20, 0), (63, 512, 512)])
def test_low_precision_within_eager_error(dtype, n, left, right):
    q, k, v, do = inputs(2, 4, 2, n, n, 32, dtype, seed=n + left)
    key_valid = padding(2, n, seed=n)
    key_valid[:, -1] = True  # every row keeps a key, so dense SDPA is defined everywhere
    key_valid[:, :: max(1, left + right + 1)] = True
    fast = grads(lambda q, k, v: window_op(q, k, v, key_valid, left, right)[0], (q, k, v), do)
    eager = grads(lambda q, k, v: sdpa_band(q, k, v, key_valid, left, right), (q, k, v), do)
    truth = grads(
        lambda q, k, v: sdpa_band(q, k, v, key_valid, left, right), tuple(x.double() for x in (q, k, v)), do.double()
    )
    eps = torch.finfo(dtype).eps
    for name, f, e, t in zip(("out", "dq", "dk", "dv"), fast, eager, truth):
        assert f.dtype == dtype
        bound = 2.0 * max_err(e, t) + 4 * eps * max(1.0, t.abs().max().item())
        assert max_err(f, t) <= bound, f"{name}: {max_err(f, t):.3g} > {bound:.3g} (eager {max_err(e, t):.3g})"
    _, lse = window_op(q, k, v, key_valid, left, right)
    assert lse.dtype == F32
    ref = window_attention_reference(q.double(), k.double(), v.double(), key_valid, left, right)[1]
    assert max_err(lse, ref) < 1e-4


# ----------------------------------------------------------------------------------------------------------
# gradcheck, opcheck, compile, counters, validation, degenerate shapes
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [None, ("band", 4)], ids=str)
def test_gradcheck(schedule, monkeypatch):
    if schedule is not None:
        monkeypatch.setattr(cpu_window, "window_schedule", lambda *args: schedule)
    q, k, v, _ = inputs(2, 2, 1, 9, 13, 4, F64, seed=5)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    key_valid = padding(2, 13, seed=4)
    key_valid[0, :6] = False
    assert torch.autograd.gradcheck(lambda q, k, v: window_op(q, k, v, key_valid, 2, 1)[0], (q, k, v))


OPCHECK_CASES = [  # (dtype, transposed, Hq, Hkv, Nq, Nk, left, right, padded)
    (F32, False, 4, 2, 40, 40, 6, 0, True),
    (F32, True, 4, 2, 300, 300, 6, 0, False),  # band tiles on non-contiguous (HF layout) inputs
    (F32, True, 2, 2, 24, 40, 3, 3, True),
    (BF16, True, 4, 1, 300, 280, 20, 2, True),
    (F64, False, 2, 1, 33, 33, 100, 0, False),  # causal schedule
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_opcheck(case):
    dtype, transposed, Hq, Hkv, Nq, Nk, left, right, padded = case
    g = torch.Generator().manual_seed(Nq)

    def rand(H, N):
        x = torch.randn(2, N, H, 16, generator=g).to(dtype)
        return (x.transpose(1, 2) if transposed else x.transpose(1, 2).contiguous()).requires_grad_()

    q, k, v = rand(Hq, Nq), rand(Hkv, Nk), rand(Hkv, Nk)
    assert q.is_contiguous() != transposed
    key_valid = padding(2, Nk, seed=1) if padded else None
    torch.library.opcheck(torch.ops.hyper.window_attention, (q, k, v, key_valid, left, right, None))
    out, lse = window_op(q, k, v, key_valid, left, right)
    do = torch.randn(out.shape, generator=g).to(dtype)
    torch.library.opcheck(
        torch.ops.hyper.window_attention_backward,
        (do, [q.detach(), k.detach(), v.detach(), out.detach(), lse], key_valid, [left, right], None),
    )


def test_compiled_equals_eager():
    torch._dynamo.reset()

    def f(q, k, v, key_valid):
        q = q * 1.5  # something around the op for inductor to fuse
        out = hyper_backend.window_attention(q, k, v, (31, 0), key_padding_mask=key_valid)
        return out.sin().sum(-1)

    q, k, v, _ = inputs(2, 4, 2, 300, 300, 16, F32, seed=8)
    key_valid = padding(2, 300, seed=8)
    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    before = hyper_op.path_counts(window=True)
    results = []
    for fn in (f, compiled):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves, key_valid)
        out.sum().backward()
        results.append((out.detach(),) + tuple(x.grad for x in leaves))
    after = hyper_op.path_counts(window=True)
    assert after["window"] - before["window"] == 2 and after["window_backward"] - before["window_backward"] == 2
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dispatch_counters():
    q, k, v, do = inputs(1, 2, 2, 50, 50, 8, F32)
    q.requires_grad_()
    before = hyper_op.path_counts(window=True)
    out = hyper_backend.window_attention(q, k, v, (3, 0))
    mid = hyper_op.path_counts(window=True)
    out.backward(do)
    after = hyper_op.path_counts(window=True)
    assert {key: mid[key] - before[key] for key in before} == {
        "hyper": 0,
        "exact": 0,
        "backward": 0,
        "window": 1,
        "window_backward": 0,
    }
    assert after["window_backward"] - mid["window_backward"] == 1
    assert set(hyper_op.path_counts()) == {"hyper", "exact", "backward"}  # the default dict is unchanged


def test_public_function_is_the_op():
    q, k, v, _ = inputs(2, 4, 1, 90, 120, 16, F32, Dv=8)
    key_valid = padding(2, 120)
    out = hyper_backend.window_attention(q, k, v, (9, 2), key_padding_mask=key_valid, scale=0.3)
    assert torch.equal(out, window_op(q, k, v, key_valid, 9, 2, 0.3)[0])
    assert out.shape == (2, 4, 90, 8) and out.is_contiguous()
    assert "window_attention" in hyper_backend.__all__


@pytest.mark.parametrize("bad", ["negative-left", "negative-right", "mask-shape", "mask-dtype", "heads", "dims"])
def test_bad_inputs_raise_in_eager_and_fake(bad):
    q, k, v, _ = inputs(2, 4, 2, 20, 20, 8, F32)
    kvm, left, right = None, 3, 0
    if bad == "negative-left":
        left = -1
    elif bad == "negative-right":
        right = -2
    elif bad == "mask-shape":
        kvm = torch.ones(2, 19, dtype=torch.bool)
    elif bad == "mask-dtype":
        kvm = torch.ones(2, 20)
    elif bad == "heads":
        q = torch.randn(2, 3, 20, 8)
    elif bad == "dims":
        k = torch.randn(2, 2, 20, 4)
    with pytest.raises(ValueError):
        window_op(q, k, v, kvm, left, right)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode, pytest.raises(ValueError):
        conv = mode.from_tensor
        window_op(conv(q), conv(k), conv(v), None if kvm is None else conv(kvm), left, right)


@pytest.mark.parametrize("shape", [(2, 2, 0, 10), (2, 2, 10, 0), (0, 2, 10, 10)], ids=str)
def test_degenerate_shapes(shape):
    B, H, Nq, Nk = shape
    q = torch.randn(B, H, Nq, 8, requires_grad=True)
    k = torch.randn(B, H, Nk, 8, requires_grad=True)
    v = torch.randn(B, H, Nk, 8, requires_grad=True)
    out, lse = window_op(q, k, v, None, 2, 0)
    assert out.shape == (B, H, Nq, 8) and lse.shape == (B, H, Nq)
    assert (out == 0).all() and torch.isneginf(lse).all()
    out.sum().backward()
    assert all((x.grad == 0).all() for x in (q, k, v))


# ----------------------------------------------------------------------------------------------------------
# the CPU layout and schedule: O(n w) work and masks
# ----------------------------------------------------------------------------------------------------------


def test_interior_tiles_share_one_bias():
    """At n = 32768, w = 512 the per-tile masks cover only the edge tiles: bias memory is a few tiles, not n w."""
    n, band = 32768, (511, 0)
    kind, tile = cpu_window.window_schedule(n, n, band)
    assert kind == "band"
    L = cpu_band._band_layout(1, n, n, band, None, F32, torch.device("cpu"), tile)
    shared = [g for g in L.groups if g.b is None]
    assert len(shared) == 1 and shared[0].bias.shape == (1, 1, tile, tile + 511)
    per_tile = sum(g.bias.shape[0] for g in L.groups if g.b is not None)
    assert per_tile <= math.ceil(511 / tile) + 1
    # with key padding only the tiles that hold a padded key get their own mask
    keys = torch.ones(2, n, dtype=torch.bool)
    keys[1, :100] = False  # left padding of batch 1
    L = cpu_band._band_layout(2, n, n, band, keys, F32, torch.device("cpu"), tile)
    own = [g for g in L.groups if g.b is not None and g.bias.stride(0) != 0]  # not an expanded shared pattern
    assert sum(g.b.numel() for g in L.groups) == 2 * L.nt  # every tile of every batch row, once
    assert sum(g.bias.shape[0] for g in own) <= 2 * (math.ceil(511 / tile) + 1) + math.ceil((100 + 511) / tile) + 1


def test_schedule():
    sched = cpu_window.window_schedule
    assert sched(32768, 32768, (511, 0))[0] == "band" and sched(32768, 32768, (512, 512))[0] == "band"
    assert sched(64, 64, (63, 0)) == ("causal", 0)  # a causal window wider than n is plain causal
    assert sched(64, 64, (63, 63)) == ("full", 0)
    assert sched(64, 64, (6, 0)) == ("dense", 0)  # too short for tiles to pay
    assert sched(1024, 1024, (512, 512)) == ("dense", 0)  # the band covers most keys
    # the modelled cost of the chosen tiles is below the dense call's for every band the schedule tiles
    for n in (256, 1000, 4096, 32768):
        for band in ((0, 0), (6, 0), (127, 0), (128, 128), (511, 0), (512, 512)):
            band = hyper_op.window_bounds(n, n, *band)
            kind, tile = sched(n, n, band)
            if kind == "band":
                assert cost.band_cost(n, band, tile) < n * n


# ----------------------------------------------------------------------------------------------------------
# Triton, under the interpreter
# ----------------------------------------------------------------------------------------------------------

triton_missing = importlib.util.find_spec("triton") is None


@pytest.fixture(scope="module")
def worker():
    """A spawned process that starts with ``TRITON_INTERPRET=1`` (see tests/test_triton.py for why)."""
    if triton_missing:
        pytest.skip("triton is not installed: pip install -e '.[triton]' to run the Triton interpreter tests")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        assert pool.submit(_interpreting).result()
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    yield pool
    pool.shutdown()


def _interpreting():
    from hyper_backend.kernels import triton_attention

    return triton_attention._INTERPRET


# (B, Hq, Hkv, Nq, Nk, D, left, right, padded, dtype)
TRITON_CASES = [
    (1, 2, 1, 100, 100, 16, 6, 0, True, F32),  # causal window, padding with rows without keys, GQA
    (1, 2, 2, 70, 130, 40, 9, 3, False, F32),  # n_q < n_k, asymmetric, d = 40
    (2, 2, 1, 130, 70, 16, 10, 10, True, F32),  # n_q > n_k: rows without keys
    (1, 2, 1, 100, 100, 16, 2**40, 0, False, F64),  # unbounded left: causal
    (1, 2, 1, 65, 65, 32, 0, 0, False, BF16),  # w = 1
    (1, 1, 1, 200, 200, 16, 64, 64, True, BF16),  # symmetric, spans several key tiles
]


def _run_triton_case(case):
    from hyper_backend.kernels import triton_attention as ta

    B, Hq, Hkv, Nq, Nk, D, left, right, padded, dtype = case
    q, k, v, do = inputs(B, Hq, Hkv, Nq, Nk, D, dtype, seed=Nq + Nk)
    key_valid = None
    if padded:
        key_valid = padding(B, Nk, seed=1)
        key_valid[0, :20] = False
    band = hyper_op.window_bounds(Nq, Nk, left, right)
    out, lse = ta.window_forward(q, k, v, key_valid, band, None)
    dq, dk, dv = ta.window_backward(do, q, k, v, out, lse, key_valid, band, None)
    fast = (out, lse, dq, dk, dv)
    assert all(x.dtype == q.dtype for x in (out, dq, dk, dv))

    def dense(dt):
        leaves = [x.detach().to(dt).clone().requires_grad_() for x in (q, k, v)]
        o, l = (
            window_attention_reference(*leaves, key_valid, left, right)
            if dt == F64
            else _eager(*leaves, key_valid, left, right)
        )
        o.backward(do.to(dt))
        return (o.detach(), l) + tuple(x.grad for x in leaves)

    truth, eager = dense(F64), dense(dtype)
    eps = torch.finfo(dtype).eps
    for name, f, t, e in zip(("out", "lse", "dq", "dk", "dv"), fast, truth, eager):
        if name == "lse":
            assert torch.equal(torch.isneginf(f), torch.isneginf(t))
        bound = 2.0 * max_err(e, t) + 4 * eps * max(1.0, t[torch.isfinite(t)].abs().max().item())
        assert max_err(f, t) <= bound, f"{name}: {max_err(f, t):.3g} > {bound:.3g}"


def _eager(q, k, v, key_valid, left, right):
    """The reference's formula evaluated at the inputs' precision: eager's own error."""
    g = q.shape[1] // k.shape[1]
    keep = hyper_op.window_keep(q.shape[2], k.shape[2], left, right)[None, None]
    if key_valid is not None:
        keep = keep & key_valid[:, None, None, :]
    s = (q @ k.repeat_interleave(g, 1).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s.float(), -1)
    p = torch.exp(s - lse[..., None].to(s.dtype)).nan_to_num(0.0)
    return p @ v.repeat_interleave(g, 1), lse.detach()


@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_matches_reference(worker, case):
    worker.submit(_run_triton_case, case).result()


def _run_triton_dispatch():
    """With HYPER_KERNELS=triton the op runs the Triton path (forward and backward) and agrees with the CPU path."""
    q, k, v, do = inputs(2, 4, 2, 150, 150, 16, F32, seed=4, Dv=8)
    key_valid = padding(2, 150)
    results = {}
    for choice in ("triton", "cpu"):
        os.environ["HYPER_KERNELS"] = choice
        try:
            results[choice] = grads(lambda q, k, v: window_op(q, k, v, key_valid, 15, 0)[0], (q, k, v), do)
        finally:
            del os.environ["HYPER_KERNELS"]
    for a, b in zip(results["triton"], results["cpu"]):
        assert max_err(a, b) < 2e-5


def test_triton_dispatch_through_op(worker):
    worker.submit(_run_triton_dispatch).result()
