"""The estimator with exact parts: attention sinks, a local window, and the residual schemes.

Checked on the dense log-weight reference (what every fast path must compute), then end to end through the op:
exact keys are exact and counted once, the limits are exact attention, a sink-heavy input is served almost
exactly with ``sink_keys >= 1``, the stratified residual is unbiased, gradients pass gradcheck, and compiled
equals eager.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hyper_backend import HyperConfig, hyper_attention
from hyper_backend.kernels import cpu, reference
from hyper_backend.kernels.draws import make_draws
from hyper_backend.kernels.parts import sink_mask
from hyper_backend.kernels.plan import plan_call

F64 = torch.float64
BASE = HyperConfig(
    detector="lsh",
    block_size=16,
    sample_size=16,
    lsh_num_projs=4,
    min_seq_len=32,
    sink_keys=0,
    local_window=0,
    residual="uniform",
)  # the published estimator; tests add the exact parts


def _qkv(B, H, Nq, Nk, D, seed=0, Hkv=None, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    Hkv = Hkv or H
    return (
        torch.randn(B, H, Nq, D, generator=g, dtype=F64).to(dtype),
        torch.randn(B, Hkv, Nk, D, generator=g, dtype=F64).to(dtype),
        torch.randn(B, Hkv, Nk, D, generator=g, dtype=F64).to(dtype),
    )


def _weights(q, k, key_valid, causal, cfg):
    return reference.log_weights(q, k, key_valid, causal, cfg).exp()


def _window_pairs(Nq, Nk, causal, w):
    """``[Nq, Nk]`` bool: key j lies in query i's local window (bottom-right alignment when causal)."""
    i = torch.arange(Nq)[:, None] + (Nk - Nq if causal else 0)
    j = torch.arange(Nk)[None, :]
    if causal:
        return (j <= i) & (j > i - w)
    if Nq != Nk:
        return torch.zeros(Nq, Nk, dtype=torch.bool)
    return (j - i >= -((w - 1) // 2)) & (j - i <= w // 2)


# ----------------------------------------------------------------------------------------------------------
# identities of the reference weights
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "causal,nq,nk,padded",
    [
        (True, 257, 257, False),
        (True, 200, 257, True),
        (True, 63, 63, True),
        (False, 257, 257, True),
        (False, 200, 257, False),
    ],
)
@pytest.mark.parametrize("residual", ["uniform", "stratified"])
def test_sinks_and_window_keys_have_weight_exactly_one(causal, nq, nk, padded, residual):
    """Every visible sink and window key has weight 1 for every query: exact, and never counted twice
    (a key in two parts would weigh 2, or 1 + its sample weight)."""
    w, s = 9, 3
    cfg = BASE.replace(sink_keys=s, local_window=w, residual=residual)
    q, k, _ = _qkv(2, 2, nq, nk, 16, seed=nq, Hkv=1)
    valid = None
    if padded:
        valid = torch.rand(2, nk, generator=torch.Generator().manual_seed(1)) > 0.3
        valid[:, :2] = False  # the sinks are the first *valid* keys
    W = _weights(q, k, valid, causal, cfg)  # [B, H, Nq, Nk]
    ok = torch.ones(2, nk, dtype=torch.bool) if valid is None else valid
    visible = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq) if causal else torch.ones(nq, nk, dtype=torch.bool)
    sinks = sink_mask(valid, 2, nk, s, q.device)
    assert sinks.sum(-1).tolist() == [s, s] and not (sinks & ~ok).any()
    want = (_window_pairs(nq, nk, causal, w)[None] | sinks[:, None, :]) & visible[None] & ok[:, None, :]
    got = W.permute(1, 0, 2, 3)[:, want]
    assert torch.equal(got, torch.ones_like(got))
    # masked keys and future keys weigh nothing; no other weight is negative
    assert (W.permute(1, 0, 2, 3)[:, ~(visible[None] & ok[:, None, :])] == 0).all() and (W >= 0).all()


def test_sink_and_window_zero_reproduce_the_previous_estimator():
    q, k, _ = _qkv(1, 2, 257, 257, 16)
    for causal in (False, True):
        a = reference.log_weights(q, k, None, causal, BASE)
        b = reference.log_weights(q, k, None, causal, BASE.replace(sink_keys=0, local_window=0))
        assert torch.equal(a, b)
    # and they change it when set
    assert not torch.equal(
        reference.log_weights(q, k, None, True, BASE),
        reference.log_weights(q, k, None, True, BASE.replace(local_window=4)),
    )


def test_causal_window_runs_across_leaf_and_quadrant_boundaries():
    """The first query of every leaf sees its w - 1 predecessors in the previous leaf exactly."""
    n, w = 256, 8
    cfg = BASE.replace(local_window=w)
    parts = plan_call(n, n, True, cfg).parts
    leaf, levels = parts[0].sq, [p for p in parts if p.kind == "hyper"]
    assert parts[0].kind == "causal" and len(levels) >= 2 and all(p.strip == w - 1 for p in levels)
    q, k, _ = _qkv(1, 1, n, n, 16)
    W = _weights(q, k, None, True, cfg)[0, 0]
    for start in range(leaf, n, leaf):
        assert torch.equal(W[start, start - w + 1 : start + 1], torch.ones(w, dtype=F64))
    # without the window the same pairs are approximated (some weight differs from 1)
    W0 = _weights(q, k, None, True, BASE)[0, 0]
    assert any((W0[s, s - w + 1 : s] != 1).any() for s in range(leaf, n, leaf))


# ----------------------------------------------------------------------------------------------------------
# limits: exact attention
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("field", ["local_window", "sink_keys"])
def test_window_or_sinks_covering_every_key_is_exact(causal, field):
    n = 200
    q, k, v = _qkv(1, 2, n, n, 16, seed=3)
    # a non-causal window of 2n - 1 keys centres on every query and reaches both ends; causal needs n
    size = 2 * n if field == "local_window" and not causal else n
    cfg = BASE.replace(**{field: size})
    out, _ = cpu.attention_forward(q, k, v, None, causal, None, cfg)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal), rtol=0, atol=1e-12)
    # the public op too (fitted to the call: values above n are clamped, still exact)
    got = hyper_attention(q, k, v, is_causal=causal, config=cfg.replace(**{field: 10 * n}))
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, is_causal=causal), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# what sinks are for: a head that puts most of its weight on key 0
# ----------------------------------------------------------------------------------------------------------


def _sink_heavy(n, D=32, seed=0):
    """Key 0 has a large norm along a direction every query leans to (as real attention sinks do), so it takes
    most of every row's weight, while its angle to most queries keeps it out of their LSH blocks."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, n, D, generator=g, dtype=F64) * 0.3
    k = torch.randn(1, 1, n, D, generator=g, dtype=F64) * 0.3
    v = torch.randn(1, 1, n, D, generator=g, dtype=F64)
    q[..., 0] += 1.0
    k[..., 0, :] = 0.0
    k[..., 0, 0] = 60.0  # s_i0 = 60 / sqrt(32) = 10.6: about e^10.6 = 40000 times any other key
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
def test_sink_keys_serve_a_sink_heavy_head_where_the_plain_estimator_misses(causal):
    n = 1024
    q, k, v = _sink_heavy(n)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    cfg = BASE.replace(block_size=64, sample_size=64, min_seq_len=256)

    def err(c):
        out = hyper_attention(q, k, v, is_causal=causal, config=c)
        return ((out - exact).norm(dim=-1) / exact.norm(dim=-1))[0, 0, n // 2 :].median().item()

    plain, sunk = err(cfg), err(cfg.replace(sink_keys=1))
    assert sunk < 0.02, f"with the sink exact: median relative error {sunk:.3f}"
    assert plain > 5 * sunk, f"the plain estimator should miss the sink: {plain:.3f} vs {sunk:.3f}"


# ----------------------------------------------------------------------------------------------------------
# the residual schemes
# ----------------------------------------------------------------------------------------------------------


def _residual_sum(plan, e, key_valid):
    """The residual's estimate of sum_{j outside i's block} e_ij, ``[B, Hq, Nq]`` (Hq == Hkv here)."""
    B, H, Nq, Nk = e.shape
    q_block = torch.empty(B, H, Nq, dtype=torch.long)
    q_block.scatter_(-1, plan.q_perm, (torch.arange(Nq) // plan.q_block).expand(B, H, Nq))
    es = torch.gather(e, 3, plan.samples[:, :, None, :].expand(B, H, Nq, plan.samples.shape[-1]))
    outside = plan.sample_block[:, :, None, :] != q_block[..., None]
    return (es * outside * plan.sample_log_weight.exp()[:, :, None, :]).sum(-1)


@pytest.mark.parametrize("residual", ["uniform", "stratified"])
@pytest.mark.parametrize("padded", [False, True])
def test_residual_is_unbiased(residual, padded, one_thread):
    g = torch.Generator().manual_seed(5)
    Nq = Nk = 96
    q = torch.randn(1, 2, Nq, 16, generator=g, dtype=F64) * 0.8
    k = torch.randn(1, 2, Nk, 16, generator=g, dtype=F64) * 0.8
    valid = (torch.rand(1, Nk, generator=g) < 0.75) if padded else None
    e = ((q @ k.transpose(-1, -2)) / 4.0).exp()
    if valid is not None:
        e = e.masked_fill(~valid[:, None, None, :], 0.0)
    seeds, total, total_sq = 1500, 0.0, 0.0
    for seed in range(seeds):
        plan = make_draws(q, k, valid, 16, 12, 5, seed, 0, residual)
        q_block = torch.empty(1, 2, Nq, dtype=torch.long)
        q_block.scatter_(-1, plan.q_perm, (torch.arange(Nq) // plan.q_block).expand(1, 2, Nq))
        k_block = torch.empty(1, 2, Nk, dtype=torch.long)
        k_block.scatter_(-1, plan.k_perm, (torch.arange(Nk) // plan.k_block).expand(1, 2, Nk))
        outside = (k_block[:, :, None, :] != q_block[..., None]).to(F64)
        z_true = (e * outside).sum(-1)  # the block layout changes with the seed's projections
        z = _residual_sum(plan, e, valid)
        total += z - z_true
        total_sq += (z - z_true) ** 2
    mean = total / seeds
    std_err = (total_sq / seeds - mean**2).clamp(min=0).sqrt() / math.sqrt(seeds)
    z_score = mean / std_err.clamp(min=1e-12)
    assert z_score.abs().max() < 5, f"{residual}: max |z| = {z_score.abs().max():.2f}"


def test_stratified_draws_cover_the_sorted_order_once_per_stratum():
    q, k, _ = _qkv(1, 2, 300, 300, 16, seed=2)
    valid = torch.ones(1, 300, dtype=torch.bool)
    valid[:, 250:] = False
    plan = make_draws(q, k, valid, 16, 25, 5, 0, 0, "stratified")
    inv = torch.empty_like(plan.k_perm)
    inv.scatter_(-1, plan.k_perm, torch.arange(300).expand_as(plan.k_perm))
    pos = torch.gather(inv, 2, plan.samples)  # sorted positions of the draws
    assert torch.equal(pos // 10, torch.arange(25).expand_as(pos))  # 250 valid keys, 25 strata of 10
    assert torch.allclose(plan.sample_log_weight, torch.full_like(plan.sample_log_weight, math.log(10)))
    assert valid[0, plan.samples].all()


# ----------------------------------------------------------------------------------------------------------
# gradients and the compiled path
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal,nq,nk", [(True, 40, 40), (True, 30, 40), (False, 40, 40), (False, 30, 40)])
def test_gradcheck_with_sinks_window_and_stratified(causal, nq, nk, one_thread):
    cfg = HyperConfig(
        detector="lsh",
        block_size=8,
        sample_size=6,
        lsh_num_projs=3,
        min_seq_len=8,
        sink_keys=2,
        local_window=5,
        residual="stratified",
    )
    q, k, v = (x.requires_grad_(True) for x in _qkv(1, 2, nq, nk, 4, seed=nq, Hkv=1))
    f = lambda q, k, v: hyper_attention(q, k, v, is_causal=causal, enable_gqa=True, config=cfg)  # noqa: E731
    exact = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=causal and nq == nk
    )
    if nq == nk:
        assert (f(q, k, v) - exact).abs().max() > 1e-3  # the approximation is active
    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("causal", [False, True])
def test_compiled_equals_eager_with_the_new_fields(causal):
    torch._dynamo.reset()
    opts = {
        "block_size": 16,
        "sample_size": 16,
        "min_seq_len": 32,
        "sink_keys": 2,
        "local_window": 12,
        "residual": "stratified",
        "detector": "lsh",
        "inner_backend": "aot_eager",
        "tune_cache": "",
    }
    cfg = HyperConfig(
        **{
            f: opts[f]
            for f in ("block_size", "sample_size", "min_seq_len", "sink_keys", "local_window", "residual", "detector")
        }
    )

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    q, k, v = (x.float().requires_grad_(True) for x in _qkv(1, 2, 200, 200, 16, seed=9))
    out = torch.compile(f, backend="hyper", options=opts)(q, k, v)
    out.sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    ref = hyper_attention(q, k, v, is_causal=causal, config=cfg)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for a, b in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch._dynamo.reset()
