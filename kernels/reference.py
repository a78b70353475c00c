"""The eager oracle: HyperAttention written as dense softmax attention with a log-weight matrix.

Given the call plan (`plan.plan_call`) and its random choices (`parts.hyper_inputs`), HyperAttention is ordinary
attention in which query i gives key j the weight W[i, j]:

* 1 if j is kept exact for i: a sink, in i's local window, in i's causal leaf, or in the same LSH-sorted block,
* the sum of the draws' weights if j was drawn for the residual (n'/m each for uniform draws over the n'
  estimator keys, the stratum size for stratified ones) and lies in another block,
* 0 otherwise (and for masked keys, and keys above the diagonal when causal).

No key is counted twice: exact keys are removed from the estimator of the queries that see them exactly, and the
plan's parts cover disjoint keys of every query; this module builds each part's weights on its own and adds them.

``out_i = sum_j W_ij exp(s_ij) v_j / sum_j W_ij exp(s_ij)``: softmax of ``s + log W``. Building W densely
costs O(n^2) memory, so this runs only at test sizes, but it is plain torch: autograd through it gives the
exact gradient of the approximation for a fixed plan. Every fast path is checked against it.
"""

from __future__ import annotations

import math

import torch

from . import topk
from .parts import call_sinks, hyper_inputs, operands, part_ranks
from .plan import Part, plan_call

NEG_INF = float("-inf")


def _estimator_weights(part: Part, inputs, Hq: int, Hkv: int, device) -> torch.Tensor:
    """``[S, Hq, sq, sk]`` weights of the LSH blocks and the residual over the estimator's keys of the ``S``
    sub-problems of a ``"hyper"`` part."""
    draws, est = inputs.draws, inputs.est
    S = draws.q_perm.shape[0]
    weights = torch.zeros(S, Hq, part.sq, part.sk, dtype=torch.float64, device=device)
    if draws.num_blocks == 1:  # a single block holds every key: exact over the estimator's keys
        weights += 1.0
        return weights if est is None else weights * est[:, None, None, :]
    group = Hq // Hkv
    for b in range(S):
        for h in range(Hq):
            hk = h // group
            for i in range(draws.num_blocks):
                rows = draws.q_perm[b, h, i * draws.q_block : (i + 1) * draws.q_block]
                cols = draws.k_perm[b, hk, i * draws.k_block : (i + 1) * draws.k_block]
                weights[b, h, rows[:, None], cols[None, :]] = 1.0
            if draws.samples is not None:
                q_block_of = torch.empty(part.sq, dtype=torch.long, device=device)
                q_block_of[draws.q_perm[b, h]] = torch.arange(part.sq, device=device) // draws.q_block
                lw = draws.sample_log_weight[b, hk].tolist()
                for s, sb, w in zip(draws.samples[b, hk].tolist(), draws.sample_block[b, hk].tolist(), lw):
                    weights[b, h, q_block_of != sb, s] += math.exp(w)
    if est is not None:
        weights.masked_fill_(~est[:, None, None, :], 0.0)
    return weights


def _in_window(part: Part, device) -> torch.Tensor:
    """``[sq, sk]`` bool: the pairs of a sub-problem inside the part's centred window."""
    a, b = part.window
    d = torch.arange(part.sk, device=device)[None, :] - torch.arange(part.sq, device=device)[:, None]
    return (d >= -a) & (d <= b)


def part_weights(part: Part, ops, q, k, p) -> torch.Tensor:
    """``[B * count, Hq, sq, sk]`` float64 weights of one part's sub-problems (0: not attended)."""
    from .parts import batched, exact_keys, sub_view

    B, Hq = ops.q.shape[:2]
    Hkv, dev = ops.k.shape[1], ops.q.device  # q, k: the call's (for the LSH ranks)
    S = B * part.count
    valid = None if ops.valid is None else batched(sub_view(ops.valid, part, False))
    if part.kind == "hyper":
        inputs = hyper_inputs(part, ops.valid, ops.sink, part_ranks(part, q, k, p), p)
        weights = _estimator_weights(part, inputs, Hq, Hkv, dev)
        if part.window is not None:  # the window's pairs are the "band" part's
            weights.masked_fill_(_in_window(part, dev), 0.0)
        if inputs.extras is not None:
            pos, ok = inputs.extras
            for b in range(S):
                weights[b, :, :, pos[b][ok[b]]] = 1.0
        return weights
    weights = torch.ones(S, Hq, part.sq, part.sk, dtype=torch.float64, device=dev)
    if part.kind == "causal":
        weights = weights.tril()
    elif part.kind == "band":  # over the estimator's keys: the sinks are the "hyper" part's extras
        sink = None if ops.sink is None else batched(sub_view(ops.sink, part, False))
        valid = exact_keys(valid, sink, 0, S, part.sk, dev)[0]
        weights = weights * _in_window(part, dev)
    if valid is not None:
        weights = weights * valid[:, None, None, :]
    return weights


def log_weights(q, k, key_valid, is_causal, p, *, v=None, scale=None):
    """``[B, Hq, Nq, Nk]`` log-weights of the whole call (``p``: a `HyperConfig`): each part of the plan's
    weights, added at its sub-problems' rows and keys. The ``"topk"`` detector scores with ``scale`` (default
    ``1 / sqrt(D)``) and its ``"vnorm"`` residual reads ``v``."""
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    plan = plan_call(Nq, Nk, is_causal, p)
    sink = call_sinks(plan, key_valid, B, q.device)
    if plan.parts[0].kind == "topk":
        scale = D**-0.5 if scale is None else scale
        sel = topk.select(q, k, k if v is None else v, key_valid, sink, plan.parts[0], scale, p)
        return topk.dense_log_weights(sel, plan.parts[0], Nq, Nk, key_valid, q.device).log()
    weights = torch.zeros(B, Hq, Nq, Nk, dtype=torch.float64, device=q.device)
    for part in plan.parts:
        ops = operands(part, q, k, k[..., :0], key_valid, sink)
        w = part_weights(part, ops, q, k, p).view(B, part.count, Hq, part.sq, part.sk)
        for c in range(part.count):
            q0 = c * part.chunk + part.q_off
            k0 = c * part.chunk + part.k_off
            rows = min(part.sq, Nq - q0)
            keys = min(part.sk, part.keys[1] - part.keys[0] - k0)
            if rows <= 0 or keys <= 0:
                continue
            cols = slice(part.keys[0] + k0, part.keys[0] + k0 + keys)
            weights[:, :, q0 : q0 + rows, cols] += w[:, c, :, :rows, :keys]
    return weights.log()


def hyper_attention_reference(q, k, v, key_valid=None, is_causal=False, scale=None, config=None):
    """Reference HyperAttention. ``q [B,Hq,Nq,D]``, ``k, v [B,Hkv,Nk,D]``, ``key_valid [B,Nk]`` bool,
    ``config``: a `hyper_backend.HyperConfig` (the defaults when None).

    Returns ``(out [B,Hq,Nq,D], lse [B,Hq,Nq])``, computed in float64 and cast back to q's dtype.
    Differentiable with autograd.
    """
    from hyper_backend.config import DEFAULTS

    p = DEFAULTS if config is None else config
    Hq, Hkv = q.shape[1], k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    with torch.no_grad():
        logw = log_weights(q.detach(), k.detach(), key_valid, is_causal, p, v=v.detach(), scale=scale)
    k64 = k.double().repeat_interleave(Hq // Hkv, dim=1)
    v64 = v.double().repeat_interleave(Hq // Hkv, dim=1)
    scores = (q.double() @ k64.transpose(-1, -2)) * scale + logw
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    return (probs @ v64).to(q.dtype), lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def window_attention_reference(q, k, v, key_padding_mask=None, left=0, right=0, scale=None):
    """Reference of ``hyper::window_attention``: dense masked softmax attention in float64.

    ``q [B,Hq,Nq,D]``, ``k [B,Hkv,Nk,D]``, ``v [B,Hkv,Nk,Dv]`` (GQA by repetition), ``key_padding_mask [B,Nk]``
    bool or None. Query i attends key j iff ``-left <= j - i - (Nk - Nq) <= right`` and the key is not padded.
    Returns ``(out [B,Hq,Nq,Dv]`` in q's dtype, ``lse [B,Hq,Nq]`` float32, float64 for float64 inputs); a row with
    no allowed key gets out 0 and lse -inf. Differentiable with autograd. O(Nq Nk) memory: test sizes only.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    d = torch.arange(Nk, device=q.device)[None, :] - torch.arange(Nq, device=q.device)[:, None] - (Nk - Nq)
    keep = ((d >= -left) & (d <= right))[None, None]
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, :]
    group = Hq // Hkv if Hkv else 1
    k64 = k.double().repeat_interleave(group, dim=1)
    v64 = v.double().repeat_interleave(group, dim=1)
    scores = ((q.double() @ k64.transpose(-1, -2)) * scale).masked_fill(~keep, NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    return (probs @ v64).to(q.dtype), lse.detach().to(torch.float64 if q.dtype == torch.float64 else torch.float32)
