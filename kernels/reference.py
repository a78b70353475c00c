"""The eager oracle: HyperAttention written as dense softmax attention with a log-weight matrix.

Given the plan (permutations and samples), HyperAttention is ordinary attention in which query i gives key j
the weight W[i, j]:

* 1 if j sits in the same LSH-sorted block as i (the exact block diagonal),
* c * n/m if j was drawn c times among the m residual samples and lies in another block,
* 0 otherwise (and for masked keys, and keys above the diagonal when causal).

``out_i = sum_j W_ij exp(s_ij) v_j / sum_j W_ij exp(s_ij)``: softmax of ``s + log W``. Building W densely
costs O(n^2) memory, so this runs only at test sizes, but it is plain torch: autograd through it gives the
exact gradient of the approximation for a fixed plan. Every fast path is checked against it.

The causal recursion and the n_q < n_k prefix split are laid out exactly as :mod:`cpu` lays them out, so both
draw the same plans from :func:`plan.make_plan`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .plan import causal_depth_for, make_plan

NEG_INF = float("-inf")


def noncausal_log_weights(q, k, key_valid, block_size, sample_size, num_projs, min_seq_len, seed, stream):
    """``[B, Hq, Nq, Nk]`` log-weights of non-causal HyperAttention (0 / -inf everywhere when exact)."""
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    logw = torch.zeros(B, Hq, Nq, Nk, dtype=torch.float64, device=q.device)
    if key_valid is not None:
        logw.masked_fill_(~key_valid[:, None, None, :], NEG_INF)
    if Nq < min_seq_len or Nk < min_seq_len:
        return logw
    plan = make_plan(q, k, key_valid, block_size, sample_size, num_projs, seed, stream)
    if plan.num_blocks == 1:
        return logw
    group = Hq // Hkv
    weights = torch.zeros(B, Hq, Nq, Nk, dtype=torch.float64, device=q.device)
    for b in range(B):
        for h in range(Hq):
            hk = h // group
            for i in range(plan.num_blocks):
                rows = plan.q_perm[b, h, i * plan.q_block:(i + 1) * plan.q_block]
                cols = plan.k_perm[b, hk, i * plan.k_block:(i + 1) * plan.k_block]
                weights[b, h, rows[:, None], cols[None, :]] = 1.0
            if plan.samples is not None:
                scale_w = math.exp(plan.log_weight[b].item())
                q_block_of = torch.empty(Nq, dtype=torch.long, device=q.device)
                q_block_of[plan.q_perm[b, h]] = torch.arange(Nq, device=q.device) // plan.q_block
                for s, sb in zip(plan.samples[b, hk].tolist(), plan.sample_block[b, hk].tolist()):
                    other = q_block_of != sb
                    weights[b, h, other, s] += scale_w
    if key_valid is not None:
        weights.masked_fill_(~key_valid[:, None, None, :], 0.0)
    return weights.log()


def causal_log_weights(q, k, key_valid, block_size, sample_size, num_projs, min_seq_len, causal_depth, seed):
    """``[B, Hq, N, N]`` log-weights of causal HyperAttention by recursive halving (n_q == n_k == N)."""
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    if N < min_seq_len:
        depth = 0
    else:
        depth = causal_depth_for(N, min_seq_len, causal_depth)
    pieces = 2**depth
    Np = math.ceil(N / pieces) * pieces
    qp, kp = _pad(q, Np), _pad(k, Np)
    valid = torch.zeros(B, Np, dtype=torch.bool, device=q.device)
    valid[:, :N] = True if key_valid is None else key_valid
    logw = torch.full((B, Hq, Np, Np), NEG_INF, dtype=torch.float64, device=q.device)
    # exact causal leaves on the diagonal
    leaf = Np // pieces
    tril = torch.ones(leaf, leaf, dtype=torch.bool, device=q.device).tril()
    for p in range(pieces):
        sl = slice(p * leaf, (p + 1) * leaf)
        block = torch.where(tril, 0.0, NEG_INF).to(torch.float64)
        logw[:, :, sl, sl] = block
    # off-diagonal quadrants, one batched sub-problem per level (as the fast path batches them)
    for level in range(depth):
        count, size = 2**level, Np // 2 ** (level + 1)
        qs = torch.stack([qp[:, :, (2 * i + 1) * size:(2 * i + 2) * size] for i in range(count)], 1)
        ks = torch.stack([kp[:, :, 2 * i * size:(2 * i + 1) * size] for i in range(count)], 1)
        vs = torch.stack([valid[:, 2 * i * size:(2 * i + 1) * size] for i in range(count)], 1)
        sub = noncausal_log_weights(
            qs.reshape(B * count, Hq, size, D), ks.reshape(B * count, Hkv, size, D),
            None if key_valid is None and Np == N else vs.reshape(B * count, size),
            block_size, sample_size, num_projs, min_seq_len, seed, stream=level + 1,
        ).view(B, count, Hq, size, size)
        for i in range(count):
            logw[:, :, (2 * i + 1) * size:(2 * i + 2) * size, 2 * i * size:(2 * i + 1) * size] = sub[:, i]
    logw = logw.masked_fill(~valid[:, None, None, :], NEG_INF)
    return logw[:, :, :N, :N]


def log_weights(q, k, key_valid, is_causal, block_size, sample_size, num_projs, min_seq_len, causal_depth, seed):
    """Log-weights of the whole call, including the bottom-right causal split for n_q < n_k."""
    Nq, Nk = q.shape[2], k.shape[2]
    if not is_causal:
        return noncausal_log_weights(q, k, key_valid, block_size, sample_size, num_projs, min_seq_len, seed, 0)
    if Nq > Nk:
        raise ValueError("causal attention needs n_q <= n_k (bottom-right aligned)")
    prefix = Nk - Nq
    kv_tail = None if key_valid is None else key_valid[:, prefix:]
    tail = causal_log_weights(q, k[:, :, prefix:], kv_tail, block_size, sample_size, num_projs,
                              min_seq_len, causal_depth, seed)
    if prefix == 0:
        return tail
    kv_head = None if key_valid is None else key_valid[:, :prefix]
    head = noncausal_log_weights(q, k[:, :, :prefix], kv_head, block_size, sample_size, num_projs,
                                 min_seq_len, seed, stream=-1)
    return torch.cat([head, tail], dim=-1)


def hyper_attention_reference(q, k, v, key_valid=None, is_causal=False, scale=None, *, block_size=256,
                              sample_size=256, num_projs=7, min_seq_len=4096, causal_depth=None, seed=0):
    """Reference HyperAttention. ``q [B,Hq,Nq,D]``, ``k, v [B,Hkv,Nk,D]``, ``key_valid [B,Nk]`` bool.

    Returns ``(out [B,Hq,Nq,D], lse [B,Hq,Nq])``, computed in float64 and cast back to q's dtype.
    Differentiable with autograd.
    """
    Hq, Hkv = q.shape[1], k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    with torch.no_grad():
        logw = log_weights(q.detach(), k.detach(), key_valid, is_causal, block_size, sample_size, num_projs,
                           min_seq_len, causal_depth, seed)
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
