"""The ``"topk"`` detector (`hyper_backend.kernels.topk`): its estimator's identities on the dense reference, the
op against the reference (forward, log-sum-exp, gradients) over GQA, padding, causal and n_q != n_k, a planted
needle of the kind real retrieval heads have, gradcheck, and compiled == eager."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hyper_backend import HyperConfig, hyper_attention
from hyper_backend.config import OpSettings
from hyper_backend.kernels import reference, topk
from hyper_backend.kernels.plan import plan_call

F64 = torch.float64
SMALL = HyperConfig(min_seq_len=16, top_k=8, query_block=8, score_group=4, sample_size=6, sink_keys=2, local_window=6)
CASES = [  # B, Hq, Hkv, n_q, n_k, causal, padded
    (1, 2, 1, 40, 40, True, False),
    (2, 4, 2, 37, 53, True, True),
    (1, 2, 2, 45, 45, False, False),
    (2, 2, 1, 33, 61, False, True),
    (1, 3, 1, 64, 64, True, True),
]


def _qkv(B, Hq, Hkv, n_q, n_k, D=16, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    make = lambda h, n: torch.randn(B, h, n, D, generator=g, dtype=F64).to(dtype)  # noqa: E731
    return make(Hq, n_q), make(Hkv, n_k), make(Hkv, n_k)


def _valid(B, n_k, padded):
    if not padded:
        return None
    valid = torch.ones(B, n_k, dtype=torch.bool)
    valid[0, 3:8] = False  # a hole: every causal row keeps a key (the reference has no gradient for empty rows)
    valid[-1, -7:] = False
    return valid


def _visible(n_q, n_k, causal, valid, B):
    i = torch.arange(n_q)[:, None] + (n_k - n_q)
    j = torch.arange(n_k)[None, :]
    vis = (j <= i) if causal else torch.ones(n_q, n_k, dtype=torch.bool)
    vis = vis[None].expand(B, -1, -1)
    return vis if valid is None else vis & valid[:, None, :]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("residual", ["importance", "uniform", "vnorm"])
def test_weights_count_every_key_once_and_only_visible_ones(case, residual):
    B, Hq, Hkv, n_q, n_k, causal, padded = case
    q, k, v = _qkv(B, Hq, Hkv, n_q, n_k)
    valid = _valid(B, n_k, padded)
    cfg = SMALL.replace(residual=residual)
    assert plan_call(n_q, n_k, causal, cfg).parts[0].kind == "topk"
    w = reference.log_weights(q, k, valid, causal, cfg, v=v).exp()
    vis = _visible(n_q, n_k, causal, valid, B)[:, None]
    assert (w[~vis.expand_as(w)] == 0).all(), "a masked or future key has weight"
    exact = w == 1.0
    # every query keeps its sinks, its w most recent keys (causal) and at least top_k others exactly
    if causal:
        i = torch.arange(n_q)[:, None] + (n_k - n_q)
        recent = (torch.arange(n_k)[None, :] > i - cfg.local_window) & (torch.arange(n_k)[None, :] <= i)
        assert (exact | ~(recent[None, None] & vis)).all()
    kept = (exact & vis).sum(-1)
    assert (kept >= torch.minimum(vis.sum(-1), torch.tensor(cfg.top_k))).all()
    # the draws' weights are 1 / (m q) >= 1: a drawn key never weighs less than an exact one
    assert (w[(w > 0) & ~exact] >= 1.0 - 1e-12).all()


@pytest.mark.parametrize("residual", ["importance", "uniform", "vnorm"])
def test_the_residual_is_unbiased(residual):
    """Averaged over seeds, every visible key that is not exact has expected weight 1."""
    B, Hq, Hkv, n_q, n_k = 1, 1, 1, 24, 40
    q, k, v = _qkv(B, Hq, Hkv, n_q, n_k, seed=3)
    cfg = SMALL.replace(residual=residual, sample_size=4, top_k=4, sink_keys=1, local_window=4)
    part = plan_call(n_q, n_k, True, cfg).parts[0]
    seeds, total, squares = 600, 0.0, 0.0
    for s in range(seeds):
        sel = topk.select(q, k, v, None, None, part, 0.25, cfg.replace(seed=s))
        w = topk.dense_log_weights(sel, part, n_q, n_k, None, "cpu")
        total, squares = total + w, squares + w * w
    mean = total / seeds
    stderr = ((squares / seeds - mean * mean).clamp_min(0) / seeds).sqrt()
    vis = _visible(n_q, n_k, True, None, B)[:, None].expand_as(mean)
    # per key, the weight is exact (1) on some seeds and a draw weight on others: both average to 1, within the
    # Monte Carlo error of 600 seeds
    z = (mean[vis] - 1).abs() / stderr[vis].clamp_min(1e-3)
    assert z.max() < 5.5 and z.mean() < 1.2, (z.max(), z.mean())


@pytest.mark.parametrize("causal", [False, True])
def test_a_budget_that_holds_every_key_is_exact_attention(causal):
    q, k, v = _qkv(1, 2, 1, 40, 40)
    cfg = SMALL.replace(top_k=40, sample_size=0)
    out, _ = reference.hyper_attention_reference(q, k, v, None, causal, None, cfg)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=causal)
    torch.testing.assert_close(out, ref)
    # below the budget the plan is exact too (no topk part at all)
    assert not plan_call(40, 40, causal, cfg.replace(top_k=10**6)).approximates


def _op(q, k, v, valid, causal, cfg):
    return torch.ops.hyper.attention(q, k, v, valid, causal, None, OpSettings.of(cfg).encode())


def _matches_reference(q, k, v, valid, causal, cfg):
    """The op equals the float64 reference: forward, log-sum-exp and the gradients of q, k, v."""
    out, lse = _op(q, k, v, valid, causal, cfg)
    ref, ref_lse = reference.hyper_attention_reference(q, k, v, valid, causal, None, cfg)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("residual", ["importance", "vnorm"])
def test_op_matches_the_reference_with_gradients(case, residual):
    B, Hq, Hkv, n_q, n_k, causal, padded = case
    q, k, v = (x.requires_grad_(True) for x in _qkv(B, Hq, Hkv, n_q, n_k, seed=1))
    valid = _valid(B, n_k, padded)
    cfg = SMALL.replace(residual=residual)
    _matches_reference(q, k, v, valid, causal, cfg)


def _top_sets(q, k, v, valid, causal, cfg):
    """Each block's top-k positions, sorted, -1 for an unused slot (from the op's own selection)."""
    plan = plan_call(q.shape[2], k.shape[2], causal, cfg)
    sel = topk._inputs(plan, q, k, v, valid, None)[1]
    s = min(cfg.sink_keys, k.shape[2])
    kept = sel.lw[..., s : s + cfg.top_k].isfinite()
    return torch.where(kept, sel.pos[..., s : s + cfg.top_k], -1).sort(-1).values


@pytest.mark.parametrize("case", CASES[:2] + CASES[3:4])
def test_chunks_of_blocks_and_key_tiles(monkeypatch, case):
    """One block per chunk in `select` and `attend`, key tiles of 16: the op equals the reference (forward, lse,
    gradients) and keeps the same top-k keys as in one chunk."""
    B, Hq, Hkv, n_q, n_k, causal, padded = case
    q, k, v = (x.requires_grad_(True) for x in _qkv(B, Hq, Hkv, n_q, n_k, seed=4))
    valid = _valid(B, n_k, padded)
    whole = _top_sets(q, k, v, valid, causal, SMALL)
    monkeypatch.setattr(topk, "_BUDGET", 1)
    monkeypatch.setattr(topk, "_CHUNK", 1)
    monkeypatch.setattr(topk, "_KEY_TILE", 16)
    assert torch.equal(_top_sets(q, k, v, valid, causal, SMALL), whole)
    _matches_reference(q, k, v, valid, causal, SMALL)


def test_bfloat16_products_rank_the_same_keys_for_every_input_dtype(monkeypatch):
    """With the detector's products in bfloat16 (forced at this size; float32 on bfloat16-rounded operands where
    the CPU has no native bfloat16), a float32 call keeps the keys its float64 reference keeps."""
    monkeypatch.setattr(topk, "_NATIVE", 0)
    q, k, v = (x.float().double() for x in _qkv(1, 4, 2, 72, 72, D=32, seed=6))
    cfg = SMALL.replace(query_block=16, score_group=8)
    assert torch.equal(_top_sets(q, k, v, None, True, cfg), _top_sets(q.float(), k.float(), v.float(), None, True, cfg))
    out, _ = _op(q.float(), k.float(), v.float(), None, True, cfg)
    ref, _ = reference.hyper_attention_reference(q, k, v, None, True, None, cfg)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_within_eager_error(dtype):
    """The op in float32/bf16 is as close to the float64 reference as eager SDPA in that dtype is to its own
    float64 result (a small factor above)."""
    q, k, v = (x.to(dtype).double() for x in _qkv(1, 4, 2, 72, 72, D=32, seed=5))  # the inputs both see
    cfg = SMALL.replace(query_block=16, score_group=8)
    ref, _ = reference.hyper_attention_reference(q, k, v, None, True, None, cfg)
    out, _ = _op(q.to(dtype), k.to(dtype), v.to(dtype), None, True, cfg)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    eager = F.scaled_dot_product_attention(q.to(dtype), kk.to(dtype), vv.to(dtype), is_causal=True)
    eager_err = (eager.double() - F.scaled_dot_product_attention(q, kk, vv, is_causal=True)).abs().max()
    assert (out.double() - ref).abs().max() <= 4 * eager_err + 1e-6


def test_gradcheck():
    """The gradient of the approximation for its selection (uniform draws: importance weights are a function of
    the scores, which the estimator treats as fixed, as it does the choice of keys)."""
    q, k, v = (x.requires_grad_(True) for x in _qkv(1, 2, 1, 20, 20, D=4, seed=2))
    cfg = SMALL.replace(top_k=4, query_block=4, score_group=2, sample_size=3, local_window=3, residual="uniform")
    assert plan_call(20, 20, True, cfg).parts[0].kind == "topk"
    torch.autograd.gradcheck(lambda a, b, c: _op(a, b, c, None, True, cfg)[0], (q, k, v))


def test_cell_maxima_and_in_place_log_sum_exp_match_torch():
    """`select`'s two helpers: the pooled cell maxima equal ``amax`` over cells, and the in-place log-sum-exp equals
    ``torch.logsumexp``, -inf rows included (a representative whose domain is empty)."""
    x = torch.randn(5, 4 * topk.CELL, dtype=torch.float32)
    x[1] = -math.inf
    x[2, 3] = math.inf
    want = x.view(5, 4, topk.CELL).amax(-1)
    assert torch.equal(topk._cell_max(x), want)
    lse = torch.logsumexp(x[[0, 1, 3, 4]], -1)
    assert torch.equal(topk._logsumexp_(x[[0, 1, 3, 4]].clone()), lse)


def test_selection_is_deterministic_and_seeded():
    q, k, v = _qkv(1, 2, 1, 40, 40)
    part = plan_call(40, 40, True, SMALL).parts[0]
    a = topk.select(q, k, v, None, None, part, 0.25, SMALL)
    b = topk.select(q, k, v, None, None, part, 0.25, SMALL)
    c = topk.select(q, k, v, None, None, part, 0.25, SMALL.replace(seed=1))
    assert torch.equal(a.pos, b.pos) and torch.equal(a.lw, b.lw)
    assert not torch.equal(a.pos, c.pos)


def _needle(n=2048, d=64, at=300, seed=0):
    """Queries of one direction at the end, a key at ``at`` with a moderate cosine to it and a high norm: its
    score for the last queries is far above every other key's, as a retrieval head's needle is."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, n, d, generator=g, dtype=F64)
    k = torch.randn(1, 1, n, d, generator=g, dtype=F64)
    v = torch.randn(1, 1, n, d, generator=g, dtype=F64)
    u = torch.randn(d, generator=g, dtype=F64)
    u = u / u.norm()
    q[0, 0, -64:] = 0.15 * q[0, 0, -64:] + 4.0 * u
    other = torch.randn(d, generator=g, dtype=F64)
    other = other - (other @ u) * u
    needle = 0.35 * u + math.sqrt(1 - 0.35**2) * other / other.norm()  # cosine 0.35 with the queries' direction
    k[0, 0, at] = 60.0 * needle
    return q, k, v, at


def test_a_planted_needle_is_kept_exactly_where_lsh_misses_it():
    q, k, v, at = _needle()
    scores = (q[0, 0, -64:] @ k[0, 0].T) / 8
    assert (scores.argmax(-1) == at).all() and (scores.softmax(-1)[:, at] > 0.5).all()
    common = dict(min_seq_len=256, sink_keys=16, sample_size=256)
    detect = HyperConfig(**common, top_k=256, query_block=64)
    lsh = HyperConfig(**common, detector="lsh", block_size=256)
    kept = lambda cfg: (reference.log_weights(q, k, None, True, cfg, v=v)[0, 0, -64:, at] == 0).double().mean()  # noqa: E731
    assert kept(detect) == 1.0
    assert kept(lsh) < 0.5, "the needle is no longer a case LSH misses: make it harder"
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)[0, 0, -64:]
    out, _ = reference.hyper_attention_reference(q, k, v, None, True, None, detect)
    rel = ((out[0, 0, -64:] - exact).norm(dim=-1) / exact.norm(dim=-1)).max()
    assert rel < 0.05


@pytest.mark.parametrize("causal", [False, True])
def test_compiled_equals_eager(causal):
    """``backend="hyper"`` with the detector's options gives the op's eager result and gradients bit for bit."""
    torch._dynamo.reset()
    fields = dict(min_seq_len=16, top_k=8, query_block=8, score_group=4, sample_size=6, sink_keys=2, local_window=6)
    cfg = HyperConfig(**fields)
    opts = dict(fields, inner_backend="aot_eager", tune_cache="")

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    q, k, v = (x.float().requires_grad_(True) for x in _qkv(1, 2, 2, 48, 48, seed=4))
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


def test_explain_prints_each_calls_plan():
    """`explain` shows the detector's config and call plan of an approximated call, and why a call above the
    threshold stayed exact."""
    import hyper_backend

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q = torch.randn(1, 2, 256, 16)
    opts = dict(top_k=16, query_block=16, min_seq_len=64, tune_cache="")
    (run,) = hyper_backend.explain(f, q, q, q, options=opts).runtime.values()
    assert run.decision == "hyper"
    assert "top-k query blocks 256 x 256 causal" in run.text() and "the last block exact" in run.text()
    (run,) = hyper_backend.explain(f, q, q, q, options=dict(opts, top_k=4096)).runtime.values()
    assert run.decision == "exact" and "no query block sees more than top_k keys" in run.text()
