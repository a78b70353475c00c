"""The one candidate grid of the device tuner and the per-model calibration: `Space` (its axes) and `grid`.

A candidate is a `HyperConfig`: block size x samples x LSH projections x sinks x local window x residual, each
with the ``min_seq_len`` thresholds (and, causal, the recursion depths) that make it approximate at the length
being tuned, one per distinct computation at that length (`structure`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hyper_backend.config import HyperConfig
from hyper_backend.kernels.op import fit
from hyper_backend.kernels.plan import causal_levels, next_pow2, plan_call

_D = HyperConfig(detector="lsh")  # the tuner searches the LSH estimator's sizes


@dataclass(frozen=True)
class Space:
    """The axes of the grid (the ``--block-sizes``, ``--sample-sizes``, ... arguments of both CLIs).

    The default reaches configs far more accurate than the `HyperConfig` defaults (up to 2048 samples and 64
    sinks): a tight budget needs them, and the timings decide whether they still save time. ``min_seq_len`` is
    the smallest threshold a candidate uses: below it attention stays exact."""

    block_sizes: tuple[int, ...] = (256, 512)
    sample_sizes: tuple[int, ...] = (256, 1024, 2048)
    lsh_projs: tuple[int, ...] = (_D.lsh_num_projs,)
    sink_keys: tuple[int, ...] = (_D.sink_keys, 64)
    local_windows: tuple[int | None, ...] = (_D.local_window,)
    residuals: tuple[str, ...] = (_D.residual,)
    min_seq_len: int = _D.min_len
    seed: int = 0

    def __post_init__(self):
        for name in ("block_sizes", "sample_sizes", "lsh_projs", "sink_keys", "local_windows", "residuals"):
            if not getattr(self, name):
                raise ValueError(f"Space.{name} is empty")
        for b, m, r, k, w, res in self.bases():  # every axis value is one HyperConfig accepts
            HyperConfig(
                detector="lsh", block_size=b, sample_size=m, lsh_num_projs=r, sink_keys=k, local_window=w, residual=res
            )
        HyperConfig(min_seq_len=self.min_seq_len, seed=self.seed)

    def bases(self):
        """Every (block, samples, LSH projections, sinks, window, residual) of the space."""
        for b in self.block_sizes:
            for m in self.sample_sizes:
                for r in self.lsh_projs:
                    for k in self.sink_keys:
                        for w in self.local_windows:
                            for res in self.residuals:
                                yield b, m, r, k, w, res


def structure(n: int, causal: bool, c: HyperConfig) -> tuple:
    """What ``c`` computes at length ``n``: the call plan (`kernels.plan.plan_call`: the sub-problems, which are
    approximated, the exact strips and windows) of ``c`` fitted to the call as the op fits it, with the estimator's
    sizes; ``()`` for exact attention. Equal structures give equal outputs."""
    f = fit(c, n, n)  # what the op runs
    plan = plan_call(n, n, causal, f)
    if not plan.approximates:
        return ()
    return (plan.parts, f.block_size, f.sample_size, f.lsh_num_projs, f.sink_keys, f.residual)


def approximated(n: int, causal: bool, c: HyperConfig) -> tuple[int, frozenset]:
    """(the exact leaf, the sizes of the approximated sub-problems) of ``c`` at ``n``: leaf 0 non-causal."""
    parts = plan_call(n, n, causal, fit(c, n, n)).parts
    leaf = parts[0].sq if causal else 0
    return leaf, frozenset(p.sq for p in parts if p.kind == "hyper")


def approximates(n: int, causal: bool, c: HyperConfig) -> bool:
    return plan_call(n, n, causal, fit(c, n, n)).approximates


def thresholds(n: int, causal: bool, block: int, floor: int, crossover: int | None) -> list[int]:
    """``min_seq_len`` values to try at length ``n`` for a block size.

    Causal: powers of two from ``max(floor, 2 * block)`` up to ``n/2`` (the largest quadrant); with a predicted
    ``crossover`` (the tuner's cost model), those within a factor 4 of it (rounded up to a power of two), else
    the three largest. Non-causal:
    one value, the crossover (else ``floor``), at least ``floor`` and at most ``n``: every threshold up to ``n``
    computes the same at ``n``, so it only decides the shorter lengths of the bucket."""
    if not causal:
        t = max(floor, crossover or floor)
        return [min(t, n)] if floor <= n else []
    usable = [1 << k for k in range(n.bit_length()) if max(floor, 2 * block) <= 1 << k <= n // 2]
    if crossover is None:
        return usable
    center = next_pow2(crossover)
    near = [x for x in usable if center // 4 <= x <= center * 4]
    return near or usable[-3:]


def grid(
    n: int, causal: bool, space: Space, crossover: Callable[[HyperConfig], int] | None = None
) -> list[HyperConfig]:
    """The candidates at length ``n``: every base of ``space`` (blocks of fewer than ``n`` queries), at each of
    its `thresholds` (``crossover(base)`` predicts where that base starts to beat exact attention, if given),
    causal also at one and two levels fewer than the automatic depth; one config per `structure` (the automatic
    depth and the first threshold preferred), only those that approximate at ``n``."""
    out: dict[tuple, HyperConfig] = {}
    for b, m, r, k, w, res in space.bases():
        if b >= n:
            continue
        base = HyperConfig(b, m, r, space.min_seq_len, None, space.seed, k, w, res, detector="lsh")
        near = None if crossover is None else crossover(base)
        for t in thresholds(n, causal, b, space.min_seq_len, near):
            auto = base.replace(min_seq_len=t)
            cands = [auto]
            if causal:
                depth = causal_levels(n, auto)
                cands += [auto.replace(causal_depth=d) for d in (depth - 1, depth - 2) if d >= 1]
            for c in cands:
                key = structure(n, causal, c)
                if not key:
                    continue  # exact at n: that option is measured separately
                if key not in out or (out[key].causal_depth is not None and c.causal_depth is None):
                    out[key] = c
    return list(out.values())
