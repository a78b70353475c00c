"""The random choices of one HyperAttention sub-problem: the sortLSH permutations and the residual draws.

Every implementation (the eager reference, the CPU path, the Triton kernels) takes its permutations and draws
from :func:`make_draws` (or :func:`draws_from_ranks`), so they can be compared exactly. The draws are a pure
function of (q, k, key_valid, parameters, seed, stream): the backward recomputes them instead of saving them.

Blocks: ``num_blocks = ceil(n_q / block_size)`` query blocks of ``q_block = block_size`` rows in LSH-sorted
order, paired with as many key blocks of ``k_block = ceil(n_k / num_blocks)`` sorted keys. The last blocks
may be ragged: positions past n are padding, never attended to and never returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
class Draws:
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


def make_draws(q, k, key_valid, block_size, sample_size, num_projs, seed, stream=0, residual="uniform") -> Draws:
    """Draw the permutations and samples for non-causal HyperAttention of ``q [B,Hq,Nq,D]`` on ``k [B,Hkv,Nk,D]``.

    ``key_valid [B, Nk]`` (bool) marks the keys of the estimator; the others sort last and are never
    sampled. ``stream`` separates the draws of independent sub-problems (the levels of the causal recursion).
    """
    q_rank, k_rank = lsh_ranks(q, k, num_projs, seed)
    return draws_from_ranks(q_rank, k_rank, key_valid, block_size, sample_size, num_projs, seed, stream, residual)


def lsh_ranks(q: torch.Tensor, k: torch.Tensor, num_projs: int, seed: int):
    """Bucket ranks of every query and key row: ``[B, Hq, Nq]``, ``[B, Hkv, Nk]``. Row-wise, so the ranks of a
    slice are the slice of the ranks: the causal recursion hashes the whole sequence once."""
    proj = lsh_projections(q.shape[-1], num_projs, seed, q.device)
    as_float = lambda x: x if x.dtype in (torch.float32, torch.float64) else x.float()  # noqa: E731
    return lsh_rank(as_float(q), proj), lsh_rank(as_float(k), proj)


def draws_from_ranks(
    q_rank: torch.Tensor,
    k_rank: torch.Tensor,
    key_valid: torch.Tensor | None,
    block_size: int,
    sample_size: int,
    num_projs: int,
    seed: int,
    stream: int = 0,
    residual: str = "uniform",
) -> Draws:
    """`make_draws` from precomputed bucket ranks ``q_rank [B, Hq, Nq]``, ``k_rank [B, Hkv, Nk]``."""
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
    return Draws(q_perm, k_perm, num_blocks, q_block, k_block, samples, sample_block, log_weight, sample_lw)


def _mix(seed: int, stream: int) -> int:
    return (int(seed) * 1_000_003 + int(stream) * 7_919 + 0x9E3779B1) % (2**63 - 1)
