"""The call plan: one frozen description of an attention call, computed once from its shapes and config, that
every implementation executes (the eager reference, the CPU path, the Triton launcher), the cost model prices
and `explain` prints.

`plan_call(n_q, n_k, is_causal, config)` returns a `CallPlan`: a tuple of `Part`s. A part is a batch of
*sub-problems* of one kind that one batched computation serves. Sub-problem ``c`` of a part (``c < count``, one
set per batch row) takes query rows ``c * chunk + q_off + [0, sq)`` and key rows ``c * chunk + k_off + [0, sk)``
of the part's operands: the queries padded to ``q_len`` rows and the call's keys ``keys[0]:keys[1]`` padded to
``k_len`` rows (padding is never attended to and never returned). Kinds:

- ``"exact"``: plain attention of the rows to the keys (key padding only);
- ``"causal"``: exact causal attention within each sub-problem (the leaves of the causal recursion);
- ``"hyper"``: non-causal HyperAttention (random stream ``stream``): the sub-problem's keys split into the
  estimator's keys (LSH-sorted blocks, residual draws) and exact extras: the sinks among its keys and its last
  ``strip`` keys; with ``window`` (non-causal self-attention) the pairs inside the centred window are left out;
- ``"band"``: exact attention to the centred ``window`` of every query (beside a ``"hyper"`` part).

The first part writes the output, the later ones merge in through their log-sum-exps, in order: every path
merges in the same order, so paths agree to rounding, and each path is deterministic.

The layouts. Non-causal: one ``"exact"`` part, or ``"hyper"`` (and ``"band"`` with a local window). Causal with
``n_q == n_k == N`` by recursive halving: the sequence is padded to ``Np = leaf * 2**depth``; ``2**depth`` exact
causal leaves of ``leaf`` rows sit on the diagonal, and level ``l`` has ``2**l`` quadrants in which the odd chunk
of ``Np / 2**(l+1)`` queries attends the even chunk before it (``"hyper"``, stream ``l + 1``, the last ``w - 1``
keys of every even chunk exact so that each query's ``w`` most recent keys stay exact across boundaries).
Causal with ``n_q < n_k`` (a continued KV cache, bottom-right aligned): the queries attend the last ``n_q`` keys
as above and the ``n_k - n_q`` earlier keys as one non-causal sub-problem (stream -1) whose last ``w - 1`` keys
are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hyper_backend.config import CAUSAL_WINDOW, HyperConfig

KINDS = ("exact", "causal", "hyper", "band", "topk")


@dataclass(frozen=True)
class Part:
    """One batch of sub-problems of a call (see the module docstring)."""

    kind: str
    keys: tuple[int, int]  # the call's keys this part addresses: keys[0] <= j < keys[1]
    q_len: int  # rows the queries are padded to
    k_len: int  # rows the part's keys are padded to
    count: int  # sub-problems per batch row
    chunk: int  # rows from one sub-problem to the next
    q_off: int
    k_off: int
    sq: int  # query rows per sub-problem
    sk: int  # keys per sub-problem
    stream: int = 0  # "hyper"/"topk": the random stream of its draws
    strip: int = 0  # "hyper": the last `strip` keys of every sub-problem are exact for all its queries;
    # "topk" (causal): the keys before a query block that its tile keeps exact (w - 1)
    window: tuple[int, int] | None = None  # "hyper"/"band"/"topk": the centred window (a, b), j - i in [-a, b]
    causal: bool = False  # "topk": bottom-right aligned causal (key j visible to query i iff j <= i + n_k - n_q)
    block: int = 0  # "topk": queries per block

    def describe(self) -> str:
        what = {
            "exact": "exact",
            "causal": "exact causal",
            "hyper": "HyperAttention",
            "band": "exact window",
            "topk": "top-k query blocks",
        }
        text = f"{self.count} x {what[self.kind]} {self.sq} x {self.sk}"
        if self.keys[0]:
            text += f" (keys {self.keys[0]}..{self.keys[1]})"
        if self.kind == "hyper" and self.strip:
            text += f", last {self.strip} keys exact"
        if self.kind == "topk":
            text += " causal" if self.causal else ""
            text += f", blocks of {self.block}"
            text += f", {self.strip} keys before each and the last block exact" if self.causal else ""
        return text


@dataclass(frozen=True)
class CallPlan:
    """Every sub-problem of one call of ``n_q`` queries on ``n_k`` keys, in merge order, and the config it runs."""

    n_q: int
    n_k: int
    causal: bool
    config: HyperConfig
    parts: tuple[Part, ...]

    @property
    def approximates(self) -> bool:
        return any(p.kind in ("hyper", "topk") for p in self.parts)

    def describe(self) -> str:
        return "; ".join(p.describe() for p in self.parts)


def plan_call(n_q: int, n_k: int, is_causal: bool, config: HyperConfig) -> CallPlan:
    """The plan of a call (``config`` already fitted to it: `op.fit`). Causal needs ``n_q <= n_k``."""
    if is_causal and n_q > n_k:
        raise ValueError("causal attention needs n_q <= n_k (bottom-right aligned)")
    if config.detector == "topk":
        return CallPlan(n_q, n_k, is_causal, config, _topk(n_q, n_k, is_causal, config))
    if not is_causal:
        parts = _noncausal(n_q, n_k, (0, n_k), config, 0, 0, window_band(n_q, n_k, config))
        return CallPlan(n_q, n_k, False, config, parts)
    prefix = n_k - n_q
    parts = _causal(n_q, (prefix, n_k), config)
    if prefix:
        parts += _noncausal(n_q, prefix, (0, prefix), config, -1, window_strip(config), None)
    return CallPlan(n_q, n_k, True, config, parts)


def _topk(n_q: int, n_k: int, causal: bool, p: HyperConfig) -> tuple[Part, ...]:
    """The flat layout of the ``"topk"`` detector (`topk`): one part of query blocks of ``query_block`` rows, each
    with an exact tile (causal: its rows and the ``w - 1`` keys before them; non-causal: its rows' centred windows,
    if any), its sinks, its top-k keys and residual draws over every other key it may see. Exact when no block sees
    more keys than it would select."""
    whole = dict(keys=(0, n_k), q_len=n_q, k_len=n_k, count=1, chunk=0, q_off=0, k_off=0, sq=n_q, sk=n_k)
    if not topk_applies(n_q, n_k, causal, p):
        if not causal:
            return (Part("exact", **whole),)
        prefix = n_k - n_q
        tail = Part(
            "causal", keys=(prefix, n_k), q_len=n_q, k_len=n_q, count=1, chunk=n_q, q_off=0, k_off=0, sq=n_q, sk=n_q
        )
        head = dict(whole, keys=(0, prefix), k_len=prefix, sk=prefix)
        return (tail, Part("exact", **head)) if prefix else (tail,)
    shape = dict(whole, q_len=math.ceil(n_q / p.query_block) * p.query_block, stream=0, causal=causal)
    if causal:
        return (Part("topk", **shape, strip=window_strip(p), block=p.query_block),)
    return (Part("topk", **shape, window=window_band(n_q, n_k, p), block=p.query_block),)


def topk_applies(n_q: int, n_k: int, causal: bool, p) -> bool:
    """Whether the ``"topk"`` detector approximates: both lengths reach ``min_seq_len`` and some query block sees
    more keys outside its tile than its sinks and its top-k hold."""
    if min(n_q, n_k) < p.min_len:
        return False
    last = (math.ceil(n_q / p.query_block) - 1) * p.query_block  # first row of the last block
    if causal:
        seen = last + (n_k - n_q) - window_strip(p)
    else:
        a, b = window_band(n_q, n_k, p) or (0, -1)  # no window: the tile is empty
        seen = n_k - min(n_k, p.query_block + a + b) if b >= 0 else n_k
    return seen > p.top_k + p.sink_keys


def _noncausal(n_q, n_k, keys, p: HyperConfig, stream: int, strip: int, window) -> tuple[Part, ...]:
    whole = dict(keys=keys, q_len=n_q, k_len=n_k, count=1, chunk=0, q_off=0, k_off=0, sq=n_q, sk=n_k)
    if not hyper_applies(n_q, n_k, p):
        return (Part("exact", **whole),)
    if window is None:
        return (Part("hyper", **whole, stream=stream, strip=strip),)
    return (Part("hyper", **whole, stream=stream, strip=strip, window=window), Part("band", **whole, window=window))


def _causal(N: int, keys, p: HyperConfig) -> tuple[Part, ...]:
    depth = causal_levels(N, p)
    pieces = 2**depth
    Np = math.ceil(N / pieces) * pieces
    leaf = Np // pieces
    tail = dict(keys=keys, q_len=Np, k_len=Np)
    parts = [Part("causal", **tail, count=pieces, chunk=leaf, q_off=0, k_off=0, sq=leaf, sk=leaf)]
    for level in range(depth):
        count, size = 2**level, Np // 2 ** (level + 1)
        quadrants = dict(tail, count=count, chunk=2 * size, q_off=size, k_off=0, sq=size, sk=size)
        if hyper_applies(size, size, p):
            parts.append(Part("hyper", **quadrants, stream=level + 1, strip=window_strip(p)))
        else:
            parts.append(Part("exact", **quadrants))
    return tuple(parts)


# ----------------------------------------------------------------------------------------------------------
# the geometry the plan is made of
# ----------------------------------------------------------------------------------------------------------


def block_count(n_q: int, n_k: int, block_size: int) -> int:
    """LSH blocks of a sub-problem: the shorter side sets the count (`draws.block_shape`)."""
    return max(1, math.ceil(min(n_q, n_k) / block_size))


def hyper_applies(nq: int, nk: int, p) -> bool:
    """Whether non-causal attention of ``nq`` queries on ``nk`` keys approximates (``p``: a `HyperConfig`)."""
    return nq >= p.min_len and nk >= p.min_len and block_count(nq, nk, p.block_size) > 1


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


def causal_levels(N: int, p) -> int:
    """Levels of the causal recursion for length ``N`` (0 below ``min_seq_len``)."""
    return 0 if N < p.min_len else causal_depth_for(N, p.min_len, p.causal_depth)


def window_band(q_len: int, k_len: int, p) -> tuple[int, int] | None:
    """The centred local window of non-causal self-attention: key j is in query i's window iff
    ``i - a <= j <= i + b`` with ``(a, b) = ((w - 1) // 2, w // 2)``; None without a window or for
    cross-attention (``q_len != k_len``), which has none."""
    w = p.local_window or 0  # None (the default): no window for non-causal attention
    return ((w - 1) // 2, w // 2) if w > 0 and q_len == k_len else None


def window_strip(p) -> int:
    """Keys before a boundary that the local window keeps exact for every query after it: ``w - 1``."""
    w = CAUSAL_WINDOW if p.local_window is None else p.local_window
    return max(w - 1, 0)


def approximates(nq: int, nk: int, is_causal: bool, p) -> bool:
    """The op's run-time decision for a call: does any part of it approximate?"""
    return plan_call(nq, nk, is_causal, p).approximates


def lse_dtype(dtype):
    """The log-sum-exp and the accumulators are float32, or float64 for float64 inputs (as aten's)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, math.ceil(math.log2(max(int(n), 1))))
