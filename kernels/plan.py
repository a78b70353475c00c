"""The random choices of one HyperAttention call: the sortLSH permutations and the residual samples.

Every implementation (the eager reference, the CPU path, the Triton kernels) takes its permutation and
samples from :func:`make_plan`, so they can be compared exactly. The plan is a pure function of
(q, k, key_valid, parameters, seed): the backward recomputes it instead of saving it.

Blocks: ``num_blocks = ceil(n_q / block_size)`` query blocks of ``q_block = block_size`` rows in LSH-sorted
order, paired with as many key blocks of ``k_block = ceil(n_k / num_blocks)`` sorted keys. The last blocks
may be ragged: positions past n are padding, never attended to and never returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

NEG_INF = float("-inf")


def inverse_gray(code: torch.Tensor, bits: int) -> torch.Tensor:
    """Rank of a Gray-code word: the b with gray(b) = b ^ (b >> 1) == code.

    Sign patterns ordered by this rank are one bit apart when their ranks are adjacent, so neighbouring
    buckets hold keys at nearby angles (the Hamming ordering of sortLSH).
    """
    out = code.clone()
    shift = 1
    while shift < bits:
        out ^= out >> shift
        shift <<= 1
    return out


def lsh_projections(head_dim: int, num_projs: int, seed: int, device, dtype=torch.float32) -> torch.Tensor:
    """``[D, r]`` Gaussian hyperplanes, drawn on the CPU from ``seed`` so every device sees the same ones."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(head_dim, num_projs, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def lsh_rank(x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Bucket rank of each row: ``[..., N, D] -> [..., N]`` int64 in ``[0, 2**r)``."""
    r = proj.shape[1]
    bits = (x @ proj.to(x.dtype)) > 0  # [..., N, r]
    # pack the sign bits with a matmul against powers of two: exact in float32 for r <= 24
    dt = torch.float32 if r <= 24 else torch.float64
    weights = 2.0 ** torch.arange(r, device=x.device, dtype=dt)
    code = (bits.to(dt) @ weights).to(torch.int64)
    return inverse_gray(code, r)


@dataclass
class Plan:
    q_perm: torch.Tensor  # [B, Hq, Nq]  sorted position -> original query index
    k_perm: torch.Tensor  # [B, Hkv, Nk] sorted position -> original key index (masked keys last)
    num_blocks: int
    q_block: int
    k_block: int
    samples: torch.Tensor | None  # [B, Hkv, m] original key indices, or None when m == 0
    sample_block: torch.Tensor | None  # [B, Hkv, m] block id of each sampled key (sorted position // k_block)
    log_weight: torch.Tensor  # [B] float32: log(n_valid / m), the uniform residual's reweighting
    sample_log_weight: torch.Tensor | None = None  # [B, Hkv, m] float32: log-weight of each draw (-inf: none)


def block_shape(n_q: int, n_k: int, block_size: int):
    """``(num_blocks, q_block, k_block)`` for the block diagonal.

    The shorter side sets the block count, so neither side has trailing blocks left without rows of its own:
    with n_q <= n_k, query blocks hold ``block_size`` rows and key blocks ``ceil(n_k / num_blocks)``; with
    n_q > n_k, key blocks hold at most ``block_size`` keys and query blocks grow instead.
    """
    num_blocks = max(1, math.ceil(min(n_q, n_k) / block_size))
    if num_blocks == 1 or n_q > n_k:
        q_block = math.ceil(n_q / num_blocks)
    else:
        q_block = block_size
    k_block = math.ceil(n_k / num_blocks)
    return num_blocks, q_block, k_block


def make_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    key_valid: torch.Tensor | None,
    block_size: int,
    sample_size: int,
    num_projs: int,
    seed: int,
    stream: int = 0,
    residual: str = "uniform",
) -> Plan:
    """Draw the permutations and samples for non-causal HyperAttention of ``q [B,Hq,Nq,D]`` on ``k [B,Hkv,Nk,D]``.

    ``key_valid [B, Nk]`` (bool) marks the keys of the estimator; the others sort last and are never
    sampled. ``stream`` separates the draws of independent sub-problems (the levels of the causal recursion).
    """
    q_rank, k_rank = lsh_ranks(q, k, num_projs, seed)
    return plan_from_ranks(q_rank, k_rank, key_valid, block_size, sample_size, num_projs, seed, stream, residual)


def lsh_ranks(q: torch.Tensor, k: torch.Tensor, num_projs: int, seed: int):
    """Bucket ranks of every query and key row: ``[B, Hq, Nq]``, ``[B, Hkv, Nk]``. Row-wise, so the ranks of a
    slice are the slice of the ranks: the causal recursion hashes the whole sequence once."""
    proj = lsh_projections(q.shape[-1], num_projs, seed, q.device)
    as_float = lambda x: x if x.dtype in (torch.float32, torch.float64) else x.float()  # noqa: E731
    return lsh_rank(as_float(q), proj), lsh_rank(as_float(k), proj)


def plan_from_ranks(
    q_rank: torch.Tensor,
    k_rank: torch.Tensor,
    key_valid: torch.Tensor | None,
    block_size: int,
    sample_size: int,
    num_projs: int,
    seed: int,
    stream: int = 0,
    residual: str = "uniform",
) -> Plan:
    """`make_plan` from precomputed bucket ranks ``q_rank [B, Hq, Nq]``, ``k_rank [B, Hkv, Nk]``."""
    B, Hq, Nq = q_rank.shape
    Hkv, Nk = k_rank.shape[1], k_rank.shape[2]
    device = q_rank.device
    if key_valid is not None:
        k_rank = torch.where(key_valid[:, None, :], k_rank, torch.full_like(k_rank, 1 << num_projs))
    q_perm = torch.argsort(q_rank, dim=-1, stable=True)
    k_perm = torch.argsort(k_rank, dim=-1, stable=True)
    num_blocks, q_block, k_block = block_shape(Nq, Nk, block_size)

    samples = sample_block = None
    m = sample_size
    if key_valid is None:
        n_valid = torch.full((B,), float(Nk), dtype=torch.float32, device=device)
    else:
        n_valid = key_valid.sum(-1).to(torch.float32)
    sample_lw = None
    log_weight = torch.log(n_valid.clamp(min=1) / max(m, 1))
    if m > 0 and num_blocks > 1:
        g = torch.Generator().manual_seed(_mix(seed, stream))
        u = torch.rand(B, Hkv, m, generator=g, dtype=torch.float64).to(device)
        if residual == "stratified":
            # one draw from each of m equal strata of the sorted order of the estimator's keys (they sort
            # first): stratum t is sorted positions [t n'/m, (t+1) n'/m), weighted by its size
            nv = n_valid.long()[:, None, None]
            t = torch.arange(m, device=device).view(1, 1, m)
            lo, hi = (t * nv) // m, ((t + 1) * nv) // m
            pos = torch.minimum(lo + (u * (hi - lo).to(torch.float64)).long(), (hi - 1).clamp(min=0))
            pos = pos.expand(B, Hkv, m)
            samples = torch.gather(k_perm, 2, pos)
            sample_block = pos // k_block
            sample_lw = torch.log((hi - lo).to(torch.float32)).expand(B, Hkv, m).contiguous()
        else:
            if key_valid is None:
                samples = (u * Nk).long().clamp_(max=Nk - 1)
            else:
                valid_first = torch.argsort((~key_valid).to(torch.int8), dim=-1, stable=True)  # [B, Nk]
                pick = (u * n_valid.to(torch.float64)[:, None, None]).long()
                pick = torch.minimum(pick, (n_valid.long() - 1).clamp(min=0)[:, None, None])
                samples = torch.gather(valid_first[:, None, :].expand(B, Hkv, Nk), 2, pick)
            inv_k = torch.empty_like(k_perm)
            inv_k.scatter_(-1, k_perm, torch.arange(Nk, device=device).expand_as(k_perm))
            sample_block = torch.gather(inv_k, 2, samples) // k_block
            sample_lw = log_weight.view(B, 1, 1).expand(B, Hkv, m).contiguous()
            if key_valid is not None:  # a batch with no estimator keys draws nothing
                sample_lw = sample_lw.masked_fill((n_valid == 0).view(B, 1, 1), NEG_INF)
    return Plan(q_perm, k_perm, num_blocks, q_block, k_block, samples, sample_block, log_weight, sample_lw)


def _mix(seed: int, stream: int) -> int:
    return (int(seed) * 1_000_003 + int(stream) * 7_919 + 0x9E3779B1) % (2**63 - 1)


def causal_depth_for(n: int, min_seq_len: int, causal_depth: int | None) -> int:
    """Levels of halving: explicit, or until a piece is at most ``min_seq_len``."""
    if causal_depth is not None:
        depth = causal_depth
    else:
        depth = 0
        while math.ceil(n / 2**depth) > min_seq_len:
            depth += 1
    # never halve below one row per leaf
    while depth > 0 and 2**depth > n:
        depth -= 1
    return depth


# ----------------------------------------------------------------------------------------------------------
# geometry shared by the fast paths (CPU torch, Triton): the exact/approximate decision and the causal layout
# ----------------------------------------------------------------------------------------------------------


def lse_dtype(dtype):
    """The log-sum-exp and the accumulators are float32, or float64 for float64 inputs (as aten's)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, math.ceil(math.log2(max(int(n), 1))))


def split_keys(mask: torch.Tensor | None, prefix: int):
    """A ``[B, Nk]`` key mask cut into the KV prefix and the causal tail (both None for None)."""
    if mask is None:
        return None, None
    return mask[:, :prefix], mask[:, prefix:]


def hyper_applies(nq: int, nk: int, p) -> bool:
    """Whether non-causal attention of ``nq`` queries on ``nk`` keys approximates (``p``: a `HyperConfig`)."""
    return nq >= p.min_seq_len and nk >= p.min_seq_len and block_shape(nq, nk, p.block_size)[0] > 1


def causal_levels(N: int, p) -> int:
    """Levels of the causal recursion for length ``N`` (0 below ``min_seq_len``)."""
    return 0 if N < p.min_seq_len else causal_depth_for(N, p.min_seq_len, p.causal_depth)


class CausalSchedule(NamedTuple):
    """The recursive-halving layout of causal attention of length N, shared by every implementation.

    The sequence is padded to ``Np = leaf * 2**depth``; ``2**depth`` exact causal leaves of ``leaf`` rows sit on
    the diagonal, and level ``l`` (``levels[l] = (count, size)``) has ``count`` quadrants in which the odd
    chunk ``2i+1`` of ``size`` queries attends to the even chunk ``2i`` before it (non-causal HyperAttention,
    random stream ``l + 1``). The last ``strip`` keys of every even chunk are exact for all its queries: with a
    local window w, ``strip = w - 1`` keeps the w most recent keys of every query exact across boundaries."""

    depth: int
    Np: int
    leaf: int
    levels: tuple[tuple[int, int], ...]
    strip: int


def causal_schedule(N: int, p) -> CausalSchedule:
    depth = causal_levels(N, p)
    pieces = 2**depth
    Np = math.ceil(N / pieces) * pieces
    levels = tuple((2**level, Np // 2 ** (level + 1)) for level in range(depth))
    return CausalSchedule(depth, Np, Np // pieces, levels, window_strip(p))


def window_band(q_len: int, k_len: int, p) -> tuple[int, int] | None:
    """The centred local window of non-causal self-attention: key j is in query i's window iff
    ``i - a <= j <= i + b`` with ``(a, b) = ((w - 1) // 2, w // 2)``; None without a window or for
    cross-attention (``q_len != k_len``), which has none."""
    w = p.local_window or 0  # None (the default): no window for non-causal attention
    return ((w - 1) // 2, w // 2) if w > 0 and q_len == k_len else None


def window_strip(p) -> int:
    """Keys before a boundary that the local window keeps exact for every query after it: ``w - 1``."""
    from hyper_backend.config import CAUSAL_WINDOW

    w = CAUSAL_WINDOW if p.local_window is None else p.local_window
    return max(w - 1, 0)


def causal_approximates(N: int, p) -> bool:
    """Whether causal attention of length N approximates anything (the top quadrant is the largest)."""
    sched = causal_schedule(N, p)
    return bool(sched.levels) and hyper_applies(sched.levels[0][1], sched.levels[0][1], p)


def approximates(nq: int, nk: int, is_causal: bool, p) -> bool:
    """The op's run-time decision for a call: does any part of it approximate?"""
    if is_causal:
        return causal_approximates(nq, p) or (nk > nq and hyper_applies(nq, nk - nq, p))
    return hyper_applies(nq, nk, p)


def sink_mask(
    key_valid: torch.Tensor | None, batch: int, n_k: int, sink_keys: int, device
) -> torch.Tensor | None:
    """``[B, Nk]`` bool marking the first ``sink_keys`` valid keys of each batch row, or None when there are none."""
    if sink_keys <= 0 or n_k == 0:
        return None
    if key_valid is None:
        out = torch.zeros(batch, n_k, dtype=torch.bool, device=device)
        out[:, :sink_keys] = True
        return out
    return key_valid & (key_valid.cumsum(-1) <= sink_keys)


def exact_keys(
    key_valid: torch.Tensor | None, sink: torch.Tensor | None, strip: int, batch: int, n_k: int, device
):
    """Split the keys of one non-causal sub-problem into the estimator's keys and keys kept exact for every query.

    The exact keys are the last ``strip`` keys (the window across a causal boundary) and the sinks
    (``sink [B, Nk]``) outside them. Returns ``(est_valid [B, Nk] or None, pos [B, e], ok [B, e])``: the
    estimator's keys, and the positions of the exact keys with their validity (``e = 0``: none)."""
    strip = min(strip, n_k)
    lo = n_k - strip
    pos_parts, ok_parts = [], []
    est = key_valid
    if strip:
        pos_parts.append(torch.arange(lo, n_k, device=device).expand(batch, strip))
        ok_parts.append(
            torch.ones(batch, strip, dtype=torch.bool, device=device) if key_valid is None else key_valid[:, lo:]
        )
        est = torch.ones(batch, n_k, dtype=torch.bool, device=device) if est is None else est.clone()
        est[:, lo:] = False
    if sink is not None:
        s_in = sink.clone()
        s_in[:, lo:] = False
        count = int(s_in.sum(-1).max().item()) if s_in.numel() else 0
        if count:
            first = torch.argsort((~s_in).to(torch.int8), dim=-1, stable=True)[:, :count]
            pos_parts.append(first)
            ok_parts.append(torch.gather(s_in, 1, first))
            est = (torch.ones(batch, n_k, dtype=torch.bool, device=device) if est is None else est) & ~s_in
    if not pos_parts:
        return est, None, None
    return est, torch.cat(pos_parts, 1), torch.cat(ok_parts, 1)


def _pad_rows(x, n):
    return x if x.shape[2] == n else torch.nn.functional.pad(x, (0, 0, 0, n - x.shape[2]))


def _chunks(x, count, size, parity):
    """Chunks ``parity, parity+2, ...`` of length ``size`` along dim 2, batched: ``[B*count, H, size, ...]``."""
    B, H = x.shape[:2]
    rest = x.shape[3:]
    y = x.reshape(B, H, count, 2, size, *rest)[:, :, :, parity]
    return y.transpose(1, 2).reshape(B * count, H, size, *rest)
