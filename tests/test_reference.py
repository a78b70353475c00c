"""The fast CPU path against the eager oracle, the oracle against exact attention, and the estimator's statistics.

Tolerances for fp32/bf16 are tied to eager's own error at that precision: the same weighted attention written
in plain torch in the low dtype (``eager_lp``), measured against float64 on the same rounded inputs and the same
plan (``ref64``). The fast path must stay within ``C_*`` times that error.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hyper_backend import HyperConfig
from hyper_backend.config import OpSettings
from hyper_backend.kernels import cpu, reference
from hyper_backend.kernels.draws import make_draws

pytestmark = pytest.mark.usefixtures("one_thread")

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16


def Cfg(block_size, sample_size, min_seq_len, num_projs=7, causal_depth=None, seed=0, **more) -> HyperConfig:
    """A `HyperConfig` from the fields these sweeps vary, in their order (the published estimator unless the
    exact parts are given)."""
    return HyperConfig.published(block_size, sample_size, num_projs, min_seq_len, causal_depth, seed, **more)


SMALL, MID, BIG = Cfg(16, 16, 32), Cfg(64, 64, 256), Cfg(256, 32, 256)
# the estimator with exact parts: sinks, a local window, the stratified residual
SINKS = Cfg(16, 16, 32, sink_keys=4)
WINDOW = Cfg(16, 16, 32, local_window=9)
ALL = Cfg(16, 16, 32, sink_keys=3, local_window=40, residual="stratified")
STRAT = Cfg(64, 64, 256, residual="stratified", sink_keys=1, local_window=64)

# fast-path error allowed, in units of eager's own error at the same precision
C_OUT, C_LSE = 4.0, 4.0
FP64_ATOL = 1e-10


def exact64(q, k, v, key_valid, is_causal, scale=None):
    """Exact attention in float64 with bottom-right causal alignment, through SDPA with an explicit mask."""
    Nq, Nk = q.shape[2], k.shape[2]
    mask = torch.ones(q.shape[0], 1, Nq, Nk, dtype=torch.bool)
    if is_causal:
        mask = mask & torch.ones(Nq, Nk, dtype=torch.bool).tril(Nk - Nq)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.nan_to_num(0.0)


def finite_max(x):
    x = x[torch.isfinite(x)]
    return x.abs().max().item() if x.numel() else 0.0


def oracle(q, k, v, key_valid, is_causal, cfg: Cfg, dense_attention, scale=None):
    """``(ref64_out, ref64_lse, eager_out_err, eager_lse_err)`` on the plan drawn from the inputs as given.

    ``eager_*_err``: max error of eager attention in q's dtype against float64 (0 for float64 inputs). Above
    1024 queries it is measured on every 4th row and the last 64 (low-precision eager is slow on CPU).
    """
    with torch.no_grad():
        logw = reference.log_weights(q, k, key_valid, is_causal, cfg)
        o64, l64 = dense_attention(q, k, v, logw, scale, torch.float64)
        if q.dtype == torch.float64:
            return o64, l64, 0.0, 0.0
        Nq = q.shape[2]
        rows = torch.arange(Nq)
        if Nq > 1024:
            rows = torch.cat([rows[:-64:4], rows[-64:]])
        olp, llp = dense_attention(q[:, :, rows], k, v, logw[:, :, rows], scale, q.dtype)
    return o64, l64, finite_max(olp.double() - o64[:, :, rows]), finite_max(llp.double() - l64[:, :, rows])


def assert_close_to_oracle(fast, ref64, eager_err, dtype, what, c):
    err = finite_max(fast.double() - ref64.double())
    if dtype == torch.float64:
        assert err <= FP64_ATOL, f"{what}: |fast - ref64| = {err:.3g} (fp64)"
        return
    assert err <= c * eager_err, f"{what}: |fast - ref64| = {err:.3g} > {c} * eager {dtype} error {eager_err:.3g}"


# (B, Hq, Hkv, Nq, Nk, D, causal, padded, dtype, cfg): a covering set, not the cartesian product.
FORWARD_CASES = [
    (2, 2, 2, 63, 63, 40, False, False, F64, SMALL),
    (2, 2, 1, 63, 63, 128, True, True, F32, SMALL),
    (1, 4, 2, 257, 257, 64, False, True, BF16, SMALL),
    (2, 4, 1, 257, 257, 80, True, False, F64, SMALL),
    (1, 2, 1, 257, 1000, 64, False, False, F32, SMALL),  # n_q < n_k
    (2, 2, 2, 1000, 257, 40, False, True, F64, SMALL),  # n_q > n_k (some query blocks get no block keys)
    (1, 2, 1, 257, 1000, 80, True, True, BF16, SMALL),  # causal, bottom-right
    (2, 2, 1, 257, 300, 40, True, True, F64, SMALL),  # causal, bottom-right, B > 1 with key padding
    (1, 2, 1, 100, 1000, 40, True, False, F64, SMALL),  # causal, long prefix
    (1, 1, 1, 1000, 1000, 128, True, False, F32, MID),
    (1, 2, 2, 1000, 1000, 40, False, False, BF16, MID),
    (1, 2, 1, 1000, 1000, 64, True, True, F64, MID),
    (1, 2, 1, 1000, 1000, 40, True, False, F32, Cfg(64, 64, 128, causal_depth=1)),  # explicit depth
    (1, 1, 1, 4097, 4097, 64, True, False, F32, BIG),
    (1, 1, 1, 4097, 4097, 80, False, True, BF16, BIG),
    (2, 2, 2, 63, 63, 40, True, True, F64, SINKS),
    (1, 4, 2, 257, 257, 80, False, True, F64, SINKS),
    (2, 2, 1, 257, 257, 40, True, False, F64, WINDOW),
    (1, 2, 1, 257, 257, 64, False, True, F32, WINDOW),  # non-causal self-attention: centred window
    (1, 2, 1, 257, 1000, 40, False, False, F64, WINDOW),  # cross-attention: no window
    (2, 4, 2, 200, 257, 80, True, True, F64, ALL),  # causal, bottom-right, window reaches into the prefix
    (1, 2, 2, 1000, 1000, 40, True, True, BF16, ALL),
    (1, 2, 1, 1000, 1000, 64, False, False, F64, ALL),
    (1, 1, 1, 4097, 4097, 40, True, False, F32, STRAT),
]
SLOW_FORWARD_CASES = [
    (2, 4, 2, 4097, 4097, 80, True, True, F32, STRAT),
    (1, 2, 1, 1000, 4097, 64, True, True, F64, STRAT),
    (1, 2, 1, 4097, 4097, 40, False, True, BF16, STRAT),
    (1, 1, 1, 1000, 4097, 128, True, True, F64, BIG),
    (2, 2, 1, 4097, 4097, 40, True, True, F32, BIG),
    (1, 4, 2, 1000, 1000, 80, True, True, BF16, SMALL),
    (2, 4, 2, 1000, 1000, 128, False, True, F32, SMALL),
    (1, 2, 1, 4097, 4097, 128, False, False, F64, BIG),
    (1, 1, 1, 4097, 4097, 40, True, True, BF16, Cfg(256, 64, 256, causal_depth=2)),
]


def case_id(case):
    B, Hq, Hkv, Nq, Nk, D, causal, padded, dtype, cfg = case
    return (
        f"B{B}-H{Hq}/{Hkv}-n{Nq}x{Nk}-d{D}-{'causal' if causal else 'full'}{'-pad' if padded else ''}-"
        f"{str(dtype)[6:]}-b{cfg.block_size}m{cfg.sample_size}"
        + ("" if cfg.causal_depth is None else f"-depth{cfg.causal_depth}")
        + (f"-s{cfg.sink_keys}" if cfg.sink_keys else "")
        + (f"-w{cfg.local_window}" if cfg.local_window else "")
        + ("-strat" if cfg.residual == "stratified" else "")
    )


def run_forward_case(case, make_qkv, padding_mask, dense_attention, call_delta):
    B, Hq, Hkv, Nq, Nk, D, causal, padded, dtype, cfg = case
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, seed=Nq + D)
    key_valid = padding_mask(B, Nk, seed=Nk) if padded else None
    out, lse = cpu.attention_forward(q, k, v, key_valid, causal, None, cfg)
    assert out.shape == (B, Hq, Nq, D) and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (B, Hq, Nq) and lse.dtype == (F64 if dtype == F64 else F32)

    # the op runs the same code: identical bits, and its counter says the approximation ran
    op_out, op_lse = torch.ops.hyper.attention(q, k, v, key_valid, causal, None, OpSettings.of(cfg).encode())
    assert torch.equal(op_out, out) and torch.equal(op_lse, lse)
    assert call_delta()["hyper"] == 1 and call_delta()["exact"] == 0

    o64, l64, eager_out_err, eager_lse_err = oracle(q, k, v, key_valid, causal, cfg, dense_attention)
    assert_close_to_oracle(out, o64, eager_out_err, dtype, "out", C_OUT)
    assert_close_to_oracle(lse, l64, eager_lse_err, dtype, "lse", C_LSE)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(l64))  # rows with no key at all agree
    # the approximation really ran: it is far from exact attention
    assert (o64 - exact64(q, k, v, key_valid, causal)).abs().max() > 0.05


@pytest.mark.parametrize("case", FORWARD_CASES, ids=case_id)
def test_fast_forward_matches_reference(case, make_qkv, padding_mask, dense_attention, call_delta):
    run_forward_case(case, make_qkv, padding_mask, dense_attention, call_delta)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_FORWARD_CASES, ids=case_id)
def test_fast_forward_matches_reference_slow(case, make_qkv, padding_mask, dense_attention, call_delta):
    run_forward_case(case, make_qkv, padding_mask, dense_attention, call_delta)


def test_dense_helper_is_the_reference(make_qkv, padding_mask, dense_attention):
    # the tests' float64 dense oracle and hyper_attention_reference are the same computation
    q, k, v = make_qkv(2, 4, 2, 257, 300, 40, F64)
    kv = padding_mask(2, 300)
    for causal in (False, True):
        o64, l64, _, _ = oracle(q, k, v, kv, causal, SMALL, dense_attention)
        ro, rl = reference.hyper_attention_reference(q, k, v, kv, causal, config=SMALL)
        torch.testing.assert_close(ro, o64, rtol=0, atol=1e-12)
        torch.testing.assert_close(rl, l64, rtol=0, atol=1e-12)


def test_custom_scale(make_qkv, dense_attention):
    q, k, v = make_qkv(1, 2, 2, 257, 257, 64, F64)
    out, lse = cpu.attention_forward(q, k, v, None, True, 0.3, SMALL)
    o64, l64, _, _ = oracle(q, k, v, None, True, SMALL, dense_attention, scale=0.3)
    torch.testing.assert_close(out, o64, rtol=0, atol=FP64_ATOL)
    torch.testing.assert_close(lse, l64, rtol=0, atol=FP64_ATOL)


# ----------------------------------------------------------------------------------------------------------
# backward: the fast gradient against autograd through the oracle
# ----------------------------------------------------------------------------------------------------------

BACKWARD_CASES = [
    (1, 4, 2, 257, 257, 64, True, True, F64, SMALL),
    (2, 2, 1, 100, 257, 40, True, False, F64, SMALL),
    (1, 2, 2, 257, 130, 80, False, True, F64, SMALL),
    (1, 2, 1, 1000, 1000, 64, True, False, F32, MID),
    (2, 2, 1, 257, 257, 40, False, True, F32, SMALL),
    (1, 2, 1, 257, 257, 64, True, True, BF16, SMALL),
    (1, 4, 2, 257, 257, 40, True, True, F64, ALL),
    (2, 2, 1, 150, 257, 64, True, False, F64, ALL),
    (1, 2, 1, 257, 257, 80, False, True, F64, ALL),
    (1, 2, 2, 257, 130, 40, False, True, F64, SINKS),
    (1, 2, 1, 1000, 1000, 40, True, True, F32, STRAT),
]


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=case_id)
def test_fast_backward_matches_autograd_through_reference(case, make_qkv, padding_mask, dense_attention, call_delta):
    B, Hq, Hkv, Nq, Nk, D, causal, padded, dtype, cfg = case
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, seed=7, requires_grad=True)
    key_valid = padding_mask(B, Nk, seed=3) if padded else None
    g = torch.Generator().manual_seed(11)
    do = torch.randn(B, Hq, Nq, D, generator=g, dtype=torch.float64).to(dtype)

    out, _ = torch.ops.hyper.attention(
        q, k, v, key_valid, causal, None, OpSettings.of(cfg.replace(causal_depth=None)).encode()
    )
    fast = torch.autograd.grad(out, (q, k, v), do)
    assert call_delta() == {"hyper": 1, "exact": 0, "backward": 1}

    with torch.no_grad():
        logw = reference.log_weights(q, k, key_valid, causal, cfg.replace(causal_depth=None))

    def grads(dt):
        qq, kk, vv = (x.detach().to(dt).requires_grad_(True) for x in (q, k, v))
        if dtype == torch.float64:  # autograd through the reference itself
            o, _ = reference.hyper_attention_reference(qq, kk, vv, key_valid, causal, config=cfg)
        else:  # the same weighted attention on the low-precision inputs' plan, in dt
            o, _ = dense_attention(qq, kk, vv, logw, None, dt)
        return torch.autograd.grad(o, (qq, kk, vv), do.to(dt))

    ref64 = grads(torch.float64)
    eager_lp = ref64 if dtype == torch.float64 else grads(dtype)
    for name, f, r, e in zip("qkv", fast, ref64, eager_lp):
        assert f.shape == r.shape and f.dtype == dtype
        assert_close_to_oracle(f, r, finite_max(e.double() - r.double()), dtype, f"d{name}", C_OUT)
    if padded:  # masked keys get no gradient
        assert torch.all(fast[1].transpose(1, 2)[~key_valid] == 0)
        assert torch.all(fast[2].transpose(1, 2)[~key_valid] == 0)


# ----------------------------------------------------------------------------------------------------------
# the oracle itself
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("limit", ["block_size", "min_seq_len"])
def test_reference_is_exact_where_the_approximation_does_not_apply(limit, causal, make_qkv, padding_mask):
    q, k, v = make_qkv(2, 4, 2, 200, 257, 40, F64)
    kv = padding_mask(2, 257)
    cfg = Cfg(256, 16, 32) if limit == "block_size" else Cfg(16, 16, 258)
    ro, _ = reference.hyper_attention_reference(q, k, v, kv, causal, config=cfg)
    torch.testing.assert_close(ro, exact64(q, k, v, kv, causal), rtol=0, atol=1e-12)


def test_reference_weights_are_causal_bottom_right(make_qkv):
    q, k, _ = make_qkv(1, 2, 1, 300, 1000, 16, F64)
    logw = reference.log_weights(q, k, None, True, HyperConfig.published(16, 16, 7, 32, None, 0))
    future = ~torch.ones(300, 1000, dtype=torch.bool).tril(700)
    assert torch.all(torch.isneginf(logw[..., future]))
    # the leaves are exact: every query sees its own key with weight 1
    assert torch.all(logw[0, :, torch.arange(300), torch.arange(700, 1000)] == 0)


# ----------------------------------------------------------------------------------------------------------
# statistics of the residual estimator
# ----------------------------------------------------------------------------------------------------------


def estimator_parts(plan, s, key_valid):
    """The pieces of the denominator estimator a plan defines, for scores ``s [B, H, Nq, Nk]`` (MHA):
    ``(block_part [B,H,Nq], picked [B,H,Nq,m], outside [B,H,Nq,m], weight [B,1,1])``: the exact sum over the
    query's own block, the sampled terms, which samples lie outside the query's block, and n/m."""
    B, H, Nq, Nk = s.shape
    e = s.exp()
    if key_valid is not None:
        e = e.masked_fill(~key_valid[:, None, None, :], 0.0)
    q_block = torch.empty(B, H, Nq, dtype=torch.long)
    q_block.scatter_(-1, plan.q_perm, (torch.arange(Nq) // plan.q_block).expand(B, H, Nq))
    k_block = torch.empty(B, H, Nk, dtype=torch.long)
    k_block.scatter_(-1, plan.k_perm, (torch.arange(Nk) // plan.k_block).expand(B, H, Nk))
    block_part = (e * (q_block[..., :, None] == k_block[..., None, :])).sum(-1)
    picked = torch.gather(e, 3, plan.samples[:, :, None, :].expand(B, H, Nq, -1))
    outside = plan.sample_block[:, :, None, :] != q_block[..., None]
    weight = plan.log_weight.double().exp()[:, None, None]
    return block_part, picked, outside, weight


def plan_denominator(plan, s, key_valid):
    """HyperAttention's estimate of ``sum_j exp(s_ij)``: own block exactly + samples outside it times n/m."""
    block_part, picked, outside, weight = estimator_parts(plan, s, key_valid)
    return block_part + weight * (picked * outside).sum(-1)


def _stats_problem(padded):
    g = torch.Generator().manual_seed(21)
    Nq, Nk, D = (100, 120, 16) if padded else (128, 128, 16)
    q = torch.randn(1, 2, Nq, D, generator=g, dtype=F64) * 0.8
    k = torch.randn(1, 2, Nk, D, generator=g, dtype=F64) * 0.8
    key_valid = None
    if padded:
        key_valid = torch.rand(1, Nk, generator=g) < 0.75
    s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    return q, k, key_valid, s


@pytest.mark.parametrize("padded", [False, True])
def test_estimator_is_what_the_fast_path_and_reference_compute(padded):
    q, k, key_valid, s = _stats_problem(padded)
    v = torch.randn_like(k)
    for seed in range(3):
        cfg = Cfg(16, 8, 1, seed=seed)
        plan = make_draws(q, k, key_valid, 16, 8, 7, seed)
        z = plan_denominator(plan, s, key_valid)
        _, lse = cpu.attention_forward(q, k, v, key_valid, False, None, cfg)
        _, rlse = reference.hyper_attention_reference(q, k, v, key_valid, False, config=cfg)
        torch.testing.assert_close(lse, z.log(), rtol=0, atol=1e-12)
        torch.testing.assert_close(rlse, z.log(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("padded", [False, True])
def test_residual_estimator_of_the_denominator_is_unbiased(padded):
    q, k, key_valid, s = _stats_problem(padded)
    e = s.exp()
    if key_valid is not None:
        e = e.masked_fill(~key_valid[:, None, None, :], 0.0)
    true_z = e.sum(-1)  # [1, 2, Nq]
    seeds = 2000
    total, total_sq, double_counted = (torch.zeros_like(true_z) for _ in range(3))
    for seed in range(seeds):
        plan = make_draws(q, k, key_valid, 16, 8, 7, seed)
        block_part, picked, outside, weight = estimator_parts(plan, s, key_valid)
        z = block_part + weight * (picked * outside).sum(-1)
        total += z
        total_sq += z * z
        # control, the authors' defect: samples from the query's own block are counted a second time
        double_counted += block_part + weight * picked.sum(-1)
    mean = total / seeds
    std_err = (total_sq / seeds - mean**2).clamp(min=0).sqrt() / math.sqrt(seeds)
    z_score = (mean - true_z) / std_err
    assert z_score.abs().max() < 5, f"max |z| = {z_score.abs().max():.2f}"
    assert (mean / true_z - 1).abs().max() < 0.05
    # the same test detects the double-counting estimator's bias
    assert ((double_counted / seeds - true_z) / std_err).median() > 10
