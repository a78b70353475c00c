"""Measurement: run the op with explicit parameters, time it (median of repeats), and estimate its error
against exact attention on a random subset of query rows, so tuning at 131k never computes full attention.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from hyper_backend.config import HyperConfig, OpSettings
from hyper_backend.kernels import op as _op  # noqa: F401  (registers torch.ops.hyper.*)

from .inputs import Sample


def run_hyper(s: Sample, causal: bool, c: HyperConfig) -> torch.Tensor:
    """``torch.ops.hyper.attention`` on ``s`` with every parameter explicit (no cache lookup)."""
    out, _ = torch.ops.hyper.attention(s.q, s.k, s.v, None, causal, s.scale, OpSettings.of(c).encode())
    return out


def run_exact(s: Sample, causal: bool) -> torch.Tensor:
    g = s.q.shape[1] // s.k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        s.q, s.k, s.v, is_causal=causal, scale=s.scale, enable_gqa=g > 1
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def median(times: Sequence[float]) -> float:
    return statistics.median(times)


def spread(times: Sequence[float]) -> float:
    """Half the min-max range relative to the median (0 for one sample)."""
    return (max(times) - min(times)) / (2 * median(times)) if len(times) > 1 else 0.0


# ----------------------------------------------------------------------------------------------------------
# error on sampled rows
# ----------------------------------------------------------------------------------------------------------


@dataclass
class RowReference:
    """Exact attention output of a few query rows of one sample: ``rows [R]`` and ``out [B, Hq, R, Dv]``."""

    rows: torch.Tensor
    out: torch.Tensor


def exact_rows(s: Sample, causal: bool, rows: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """``softmax(q[rows] k^T * scale) v`` for the chosen rows only: ``[B, Hq, R, Dv]`` float64 (computed in
    float32, or float64 for float64 inputs).

    Causal masks keys after each row (``n_q == n_k``). Cost O(R * N * D): cheap for a few hundred rows.
    """
    B, Hq, N, D = s.q.shape
    g = Hq // s.k.shape[1]
    scale = s.scale if s.scale is not None else 1.0 / math.sqrt(D)
    acc = torch.float64 if s.q.dtype == torch.float64 else torch.float32  # float32 is ample for errors >= 1e-4
    k = s.k.to(acc).repeat_interleave(g, 1) if g > 1 else s.k.to(acc)  # [B, Hq, N, D]
    v = s.v.to(acc).repeat_interleave(g, 1) if g > 1 else s.v.to(acc)
    outs = []
    for start in range(0, rows.numel(), chunk):
        r = rows[start : start + chunk]
        logits = (s.q[:, :, r].to(acc) @ k.transpose(-1, -2)) * scale  # [B, Hq, r, N]
        if causal:
            future = torch.arange(N, device=r.device)[None, :] > r[:, None]  # [r, N]
            logits.masked_fill_(future, float("-inf"))
        outs.append(torch.softmax(logits, -1) @ v)
    return torch.cat(outs, 2).double()


def reference(s: Sample, causal: bool, num_rows: int, seed: int = 0) -> RowReference:
    """Exact outputs of ``num_rows`` query rows drawn uniformly without replacement (all rows if fewer)."""
    N = s.q.shape[2]
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(N, generator=g)[:num_rows].sort().values.to(s.q.device)
    return RowReference(rows, exact_rows(s, causal, rows))


def row_error(outs: Sequence[torch.Tensor], refs: Sequence[RowReference]) -> float:
    """Relative Frobenius error of the sampled rows, pooled over samples: ``||out - ref|| / ||ref||``."""
    num, den = _squares(outs, refs)
    return math.sqrt(num / den) if den > 0 else 0.0


def _squares(outs, refs) -> tuple[float, float]:
    num = den = 0.0
    for out, ref in zip(outs, refs):
        got = out[:, :, ref.rows].double()
        num += float((got - ref.out).pow(2).sum())
        den += float(ref.out.pow(2).sum())
    return num, den


# ----------------------------------------------------------------------------------------------------------
# accumulated runs of one configuration
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Score:
    """Accumulated runs of one configuration: times on sample 0 and the squared errors of the sampled rows,
    pooled over runs whose seeds differ (so one lucky draw of samples does not decide)."""

    times: list[float] = field(default_factory=list)
    num: float = 0.0
    den: float = 0.0

    @property
    def time(self) -> float:
        return median(self.times) if self.times else math.inf

    @property
    def error(self) -> float:
        return math.sqrt(self.num / self.den) if self.den > 0 else 0.0


def run_and_score(
    score: Score,
    samples: Sequence[Sample],
    refs: Sequence[RowReference],
    causal: bool,
    c: HyperConfig | None,
    seed: int,
    *,
    all_samples: bool = False,
) -> float:
    """One timed run of ``c`` (exact attention if None) with ``seed`` on sample 0 (and, with ``all_samples``,
    untimed runs on the others), added to ``score``. Returns the time."""
    device = samples[0].q.device
    run = None if c is None else replace(c, seed=seed)
    elapsed = 0.0
    for j, s in enumerate(samples if all_samples else samples[:1]):
        holder = {}
        fn = (
            (lambda holder=holder, s=s: holder.setdefault("out", run_exact(s, causal)))
            if run is None
            else (lambda holder=holder, s=s: holder.setdefault("out", run_hyper(s, causal, run)))
        )
        t = time_once(fn, device)
        if j == 0:
            elapsed = t
            score.times.append(t)
        a, b = _squares([holder.pop("out")], [refs[j]])
        score.num, score.den = score.num + a, score.den + b
    return elapsed


# ----------------------------------------------------------------------------------------------------------
# device rates for the cost model
# ----------------------------------------------------------------------------------------------------------


def _best_of(fn, device, repeats=2) -> float:
    """The fastest of ``repeats`` runs after a warm-up: the device's own speed, without the stalls other
    processes cause (those are absorbed by `cost.Rates.scale`, refitted on the real candidates)."""
    fn()
    return min(time_once(fn, device) for _ in range(repeats))


def tile_rate(key, head_dim: int, dtype, device, flops_target: float = 4e8) -> float:
    """FLOP/s of fused attention on many independent tiles of ``rows`` queries by ``keys`` keys (``shared``:
    every tile sees the same keys, with an additive bias, as the residual does; ``causal``: causal tiles)."""
    rows, keys, shared, causal = key
    flops_per_tile = (2 if causal else 4) * rows * keys * head_dim
    tiles = max(1, min(1024, int(flops_target // flops_per_tile)))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, tiles, rows, head_dim, generator=g).to(device=device, dtype=dtype)
    kv_heads = 1 if shared else tiles
    k = torch.randn(1, kv_heads, keys, head_dim, generator=g).to(device=device, dtype=dtype)
    v = torch.randn_like(k)
    bias = torch.zeros(1, tiles, 1, keys, device=device, dtype=dtype) if shared else None
    fn = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q, k, v, attn_mask=bias, is_causal=causal, enable_gqa=shared
    )
    return tiles * flops_per_tile / _best_of(fn, device)


def calibrate(rates, shapes, head_dim: int, dtype, device) -> None:
    """Measure the fused-attention rate of every tile shape in ``shapes`` not yet in ``rates.flash``."""
    for key in shapes:
        if key not in rates.flash:
            rates.flash[key] = tile_rate(key, head_dim, dtype, device)


def calibrate_base(head_dim: int, dtype, device):
    """A `cost.Rates` with the copy bandwidth, the sort rate and the fixed call overhead measured here."""
    from . import cost

    rates = cost.Rates()
    rows = 1 << 16
    x = torch.randn(rows, head_dim, device=device).to(dtype)
    idx = torch.randperm(rows, device=device)
    t = _best_of(lambda: x.index_select(0, idx), device)
    rates.bandwidth = 2 * rows * head_dim * x.element_size() / t
    keys = torch.randint(1 << 7, (rows,), device=device)
    t = _best_of(lambda: torch.argsort(keys, stable=True), device)
    rates.sort = rows * math.log2(rows) / t
    # fixed overhead: a tiny approximate call, minus what the model says its work costs
    small = HyperConfig(
        detector="lsh", block_size=128, sample_size=64, lsh_num_projs=7, min_seq_len=1, causal_depth=None
    )
    calibrate(rates, cost.tile_shapes(1024, False, small), head_dim, dtype, device)
    rates.call = 0.0
    s = Sample(*(torch.randn(1, 1, 1024, head_dim, device=device).to(dtype) for _ in range(3)), None, "calibration")
    t = _best_of(lambda: run_hyper(s, False, small), device, repeats=3)
    work = cost.predict_time(
        1024, False, small, head_dim=head_dim, elem_bytes=x.element_size(), batch_heads=1, rates=rates
    )
    rates.call = max(t - work, 0.0)
    return rates
