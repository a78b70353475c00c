"""The eager oracle: HyperAttention written as dense softmax attention with a log-weight matrix.

Given the plan (permutations and samples), HyperAttention is ordinary attention in which query i gives key j
the weight W[i, j]:

* 1 if j is kept exact for i: a sink, in i's local window, in i's causal leaf, or in the same LSH-sorted block,
* the sum of the draws' weights if j was drawn for the residual (n'/m each for uniform draws over the n'
  estimator keys, the stratum size for stratified ones) and lies in another block,
* 0 otherwise (and for masked keys, and keys above the diagonal when causal).

No key is counted twice: exact keys are removed from the estimator of the queries that see them exactly.

``out_i = sum_j W_ij exp(s_ij) v_j / sum_j W_ij exp(s_ij)``: softmax of ``s + log W``. Building W densely
costs O(n^2) memory, so this runs only at test sizes, but it is plain torch: autograd through it gives the
exact gradient of the approximation for a fixed plan. Every fast path is checked against it.

The causal recursion and the n_q < n_k prefix split are laid out exactly as :mod:`cpu` lays them out, so both
draw the same plans from :func:`plan.make_plan`.
"""

from __future__ import annotations

import math

import torch

from .plan import causal_schedule, exact_keys, hyper_applies, make_plan, sink_mask, window_band, window_strip

NEG_INF = float("-inf")


def _estimator_weights(q, k, est_valid, p, stream):
    """``[B, Hq, Nq, Nk]`` weights of the LSH blocks and the residual over the estimator's keys."""
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    plan = make_plan(q, k, est_valid, p.block_size, p.sample_size, p.lsh_num_projs, p.seed, stream, p.residual)
    weights = torch.zeros(B, Hq, Nq, Nk, dtype=torch.float64, device=q.device)
    if plan.num_blocks == 1:  # a single block holds every key: exact over the estimator's keys
        weights += 1.0
        return weights if est_valid is None else weights * est_valid[:, None, None, :]
    group = Hq // Hkv
    for b in range(B):
        for h in range(Hq):
            hk = h // group
            for i in range(plan.num_blocks):
                rows = plan.q_perm[b, h, i * plan.q_block : (i + 1) * plan.q_block]
                cols = plan.k_perm[b, hk, i * plan.k_block : (i + 1) * plan.k_block]
                weights[b, h, rows[:, None], cols[None, :]] = 1.0
            if plan.samples is not None:
                q_block_of = torch.empty(Nq, dtype=torch.long, device=q.device)
                q_block_of[plan.q_perm[b, h]] = torch.arange(Nq, device=q.device) // plan.q_block
                lw = plan.sample_log_weight[b, hk].tolist()
                for s, sb, w in zip(plan.samples[b, hk].tolist(), plan.sample_block[b, hk].tolist(), lw):
                    weights[b, h, q_block_of != sb, s] += math.exp(w)
    if est_valid is not None:
        weights.masked_fill_(~est_valid[:, None, None, :], 0.0)
    return weights


def noncausal_log_weights(q, k, key_valid, p, stream, sink=None, strip=0, window=False):
    """``[B, Hq, Nq, Nk]`` log-weights of one non-causal HyperAttention sub-problem.

    Exact: every valid key when the sub-problem does not approximate. Otherwise the last ``strip`` keys and
    the sinks (``sink [B, Nk]``) get weight 1, the LSH blocks and the residual cover the remaining valid keys,
    and with ``window`` (non-causal self-attention) the keys in each query's centred local window get weight
    1 for that query instead of whatever the estimator gave them."""
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    valid = torch.ones(B, Nk, dtype=torch.bool, device=q.device) if key_valid is None else key_valid
    if not hyper_applies(Nq, Nk, p):
        return torch.zeros(B, Hq, Nq, Nk, dtype=torch.float64, device=q.device).masked_fill_(
            ~valid[:, None, None, :], NEG_INF
        )
    est_valid, pos, ok = exact_keys(key_valid, sink, strip, B, Nk, q.device)
    weights = _estimator_weights(q, k, est_valid, p, stream)
    if pos is not None:
        for b in range(B):
            cols = pos[b][ok[b]]
            weights[b, :, :, cols] = 1.0
    ab = window_band(Nq, Nk, p) if window else None
    if ab is not None:
        i = torch.arange(Nq, device=q.device)[:, None]
        j = torch.arange(Nk, device=q.device)[None, :]
        band = (j - i >= -ab[0]) & (j - i <= ab[1])
        weights = torch.where(band & valid[:, None, None, :], torch.ones((), dtype=torch.float64), weights)
    weights.masked_fill_(~valid[:, None, None, :], 0.0)
    return weights.log()


def causal_log_weights(q, k, key_valid, p, sink=None):
    """``[B, Hq, N, N]`` log-weights of causal HyperAttention by recursive halving (n_q == n_k == N)."""
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    sched = causal_schedule(N, p)
    Np, leaf = sched.Np, sched.leaf
    qp, kp = _pad(q, Np), _pad(k, Np)
    valid = torch.zeros(B, Np, dtype=torch.bool, device=q.device)
    valid[:, :N] = True if key_valid is None else key_valid
    sinks = torch.zeros(B, Np, dtype=torch.bool, device=q.device)
    if sink is not None:
        sinks[:, :N] = sink
    logw = torch.full((B, Hq, Np, Np), NEG_INF, dtype=torch.float64, device=q.device)
    # exact causal leaves on the diagonal
    tril = torch.ones(leaf, leaf, dtype=torch.bool, device=q.device).tril()
    for piece in range(Np // leaf):
        sl = slice(piece * leaf, (piece + 1) * leaf)
        logw[:, :, sl, sl] = torch.where(tril, 0.0, NEG_INF).to(torch.float64)
    # off-diagonal quadrants, one batched sub-problem per level (as the fast path batches them)
    for level, (count, size) in enumerate(sched.levels):
        odd = lambda x, i, size=size: x[:, :, (2 * i + 1) * size : (2 * i + 2) * size]
        even = lambda x, i, size=size: x[:, :, 2 * i * size : (2 * i + 1) * size]
        qs = torch.stack([odd(qp, i) for i in range(count)], 1).reshape(B * count, Hq, size, D)
        ks = torch.stack([even(kp, i) for i in range(count)], 1).reshape(B * count, Hkv, size, D)
        chunk = lambda m, count=count, size=size: torch.stack(
            [m[:, 2 * i * size : (2 * i + 1) * size] for i in range(count)], 1
        )
        kv_s = None if key_valid is None and Np == N else chunk(valid).reshape(B * count, size)
        sink_s = None if sink is None else chunk(sinks).reshape(B * count, size)
        sub = noncausal_log_weights(qs, ks, kv_s, p, level + 1, sink_s, sched.strip).view(B, count, Hq, size, size)
        for i in range(count):
            logw[:, :, (2 * i + 1) * size : (2 * i + 2) * size, 2 * i * size : (2 * i + 1) * size] = sub[:, i]
    logw = logw.masked_fill(~valid[:, None, None, :], NEG_INF)
    return logw[:, :, :N, :N]


def log_weights(q, k, key_valid, is_causal, p):
    """Log-weights of the whole call (``p``: a `HyperConfig`), including the bottom-right causal split for
    n_q < n_k: the queries see the prefix keys as one non-causal sub-problem (stream -1) whose last w - 1 keys
    are exact, and the rest causally."""
    B, _, Nq, _ = q.shape
    Nk = k.shape[2]
    sink = sink_mask(key_valid, B, Nk, p.sink_keys, q.device)
    if not is_causal:
        return noncausal_log_weights(q, k, key_valid, p, 0, sink, 0, window=(Nq == Nk))
    if Nq > Nk:
        raise ValueError("causal attention needs n_q <= n_k (bottom-right aligned)")
    prefix = Nk - Nq
    part = lambda m, sl: None if m is None else m[:, sl]  # noqa: E731
    tail = causal_log_weights(
        q, k[:, :, prefix:], part(key_valid, slice(prefix, None)), p, part(sink, slice(prefix, None))
    )
    if prefix == 0:
        return tail
    head = noncausal_log_weights(
        q,
        k[:, :, :prefix],
        part(key_valid, slice(None, prefix)),
        p,
        -1,
        part(sink, slice(None, prefix)),
        window_strip(p),
    )
    return torch.cat([head, tail], dim=-1)


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
        logw = log_weights(q.detach(), k.detach(), key_valid, is_causal, p)
    k64 = k.double().repeat_interleave(Hq // Hkv, dim=1)
    v64 = v.double().repeat_interleave(Hq // Hkv, dim=1)
    scores = (q.double() @ k64.transpose(-1, -2)) * scale + logw
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    return (probs @ v64).to(q.dtype), lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def _pad(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.shape[2] == n:
        return x
    return torch.nn.functional.pad(x, (0, 0, 0, n - x.shape[2]))


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
