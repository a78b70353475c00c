"""A cost model of HyperAttention and exact attention, written in sympy, used to rank and prune candidates
before timing anything and to predict the crossover length where exact attention stops being cheaper.

`predict_parts` prices the call plan the op runs (`kernels.plan.plan_call` of the candidate fitted to the call as
the op fits it, `kernels.op.fit`), part by part, per (batch, head) pair:

* ``"hyper"`` (a non-causal HyperAttention sub-problem of ``x`` queries on ``x`` keys): two LSH projections and
  argsorts, gathers of q, k, v into sorted blocks, one fused attention call over the ``x/b`` diagonal ``b x b``
  blocks, one over the ``m`` residual samples followed by the ``e`` exact extras of the sub-problem (its sinks
  and the strip of keys the causal window keeps exact), with a ``[x/b, m + e]`` bias, a log-sum-exp merge and a
  scatter back to the original order (`noncausal_hyper`);
* ``"exact"`` / ``"causal"``: exact attention of the part's sub-problems (``4 sq sk d`` FLOPs, half causal);
* ``"band"``: exact attention of every query to its local window;
* every part after the first is merged into the output (its chunk copies and a float32 merge).

`causal_hyper` is the closed form of the causal recursion of depth ``L`` with every level approximated (a check
on the part-by-part sum, and ``--show-model``). FLOPs and bytes are symbolic in ``n, d, b, m, r, e, depth`` and
the element size ``s``. Time is FLOPs divided by the fused-attention rate measured for the same tile shape, plus
bytes over the measured copy bandwidth, plus sort work over the measured sort rate, plus a fixed overhead per
HyperAttention part (`Rates`, filled in by `measure.calibrate`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import sympy as sp

from hyper_backend.config import HyperConfig
from hyper_backend.kernels.op import fit
from hyper_backend.kernels.plan import CallPlan, Part, plan_call

n, d, b, m, r, e, s, depth, lvl = sp.symbols("n d b m r e s depth l", positive=True)
log2 = lambda x: sp.log(x, 2)  # noqa: E731

# ----------------------------------------------------------------------------------------------------------
# symbolic counts
# ----------------------------------------------------------------------------------------------------------

# index arithmetic of the layout (permutations, padding masks, destinations): about 30 int64 passes per row
_INDEX_BYTES_PER_ROW = 240


def noncausal_hyper(x=n) -> dict[str, sp.Expr]:
    """Counts of one non-causal HyperAttention of ``x`` queries on ``x`` keys (``b < x``)."""
    return {
        "flops_block": 4 * x * b * d,  # QK^T and PV on the n/b diagonal b x b blocks
        "flops_resid": 4 * x * (m + e) * d,  # every query against the m sampled keys and the e exact extras
        "flops_lsh": 4 * x * d * r,  # q and k projected on r hyperplanes
        "bytes": (
            8 * x * d * s  # gather q, k, v (read + write) and scatter the output back
            + 6 * 4 * x * d  # float32 merge of the block and residual parts
            + 2 * 4 * (x / b) * (m + e)  # the [n/b, m + e] residual bias, built then read
            + _INDEX_BYTES_PER_ROW * x
        ),
        "sort": 2 * x * log2(x),  # two argsorts (compare-swap work)
        "calls": sp.Integer(1),
    }


def exact(x=n, causal: bool = False) -> dict[str, sp.Expr]:
    """Counts of exact attention of ``x`` queries on ``x`` keys."""
    return {"flops_exact": (2 if causal else 4) * x**2 * d, "bytes": 4 * x * d * s}


def causal_hyper(x=n, levels=depth) -> dict[str, sp.Expr]:
    """Causal HyperAttention with ``levels`` halvings, every level approximated (closed form)."""
    leaf = x / 2**levels
    parts = {"flops_leaf": 2 * x * leaf * d}  # 2**L causal leaves of size x / 2**L
    per_level = dict(noncausal_hyper(x / 2 ** (lvl + 1)))
    per_level["bytes"] += 3 * 2 * (x / 2 ** (lvl + 1)) * d * s + 6 * 4 * (x / 2 ** (lvl + 1)) * d  # chunks, merge
    for name, expr in per_level.items():
        total = sp.summation(2**lvl * expr if name != "calls" else expr, (lvl, 0, levels - 1))
        parts[name] = sp.simplify(total)
    parts["bytes"] = sp.simplify(parts["bytes"] + 4 * x * d * s)  # leaves read q, k, v and write out
    return parts


def total_flops(parts: dict[str, sp.Expr]) -> sp.Expr:
    return sp.simplify(sum((v for k, v in parts.items() if k.startswith("flops")), sp.Integer(0)))


# numeric versions of the per-call parts, for the level-by-level evaluation
_ARGS = (n, d, b, m, r, e, s)
_NC = {k: sp.lambdify(_ARGS, v, "math") for k, v in noncausal_hyper().items()}


# ----------------------------------------------------------------------------------------------------------
# device rates and the time prediction
# ----------------------------------------------------------------------------------------------------------

TileKey = tuple[int, int, bool, bool]  # (query rows, keys, keys shared by all tiles (residual), causal)


@dataclass
class Rates:
    """Measured device constants (see `measure.calibrate`)."""

    flash: dict[TileKey, float] = field(default_factory=dict)  # FLOP/s of fused attention by tile shape
    bandwidth: float = 1e10  # bytes/s of a row gather
    sort: float = 1e8  # compare-swap work per second of argsort
    call: float = 1e-3  # seconds of fixed overhead per non-causal HyperAttention call
    scale_flash: float = 1.0  # measured / modelled, refitted as candidates are timed (see `refit`)
    scale_other: float = 1.0

    def flash_rate(self, rows: int, keys: int, shared: bool = False, causal: bool = False) -> float:
        """The rate of the nearest measured tile shape (log distance), same kind if measured."""
        if not self.flash:
            raise ValueError("Rates.flash is empty: run measure.calibrate first")
        same = [k for k in self.flash if k[2] == shared and k[3] == causal] or list(self.flash)

        def dist(k):
            return abs(math.log2(k[0]) - math.log2(max(rows, 1))) + abs(math.log2(k[1]) - math.log2(max(keys, 1)))

        return self.flash[min(same, key=dist)]


def call_plan(seq_len: int, causal: bool, c: HyperConfig) -> CallPlan:
    """The plan the op runs for ``c`` on a self-attention call of ``seq_len`` (``c`` fitted as the op fits it)."""
    return plan_call(seq_len, seq_len, causal, fit(c, seq_len, seq_len))


def extras(part: Part, sink_keys: int) -> int:
    """The exact extra keys every sub-problem of a ``"hyper"`` part attends besides its draws (padded to the
    widest, the first: the sinks are the call's first keys): its last ``strip`` keys and the sinks before them."""
    strip = min(part.strip, part.sk)
    start = part.keys[0] + part.k_off
    return strip + max(0, min(sink_keys - start, part.sk - strip))


def _part_tiles(part: Part, f: HyperConfig) -> list[TileKey]:
    if part.kind == "hyper":
        side = f.draws + extras(part, f.sink_keys)
        return [(f.block_size, f.block_size, False, False)] + ([(f.block_size, side, True, False)] if side else [])
    if part.kind == "band":
        return [(f.block_size, f.block_size, False, False)]
    return [_exact_tile(part.sq, part.kind == "causal")]


def tile_shapes(seq_len: int, causal: bool, c: HyperConfig) -> list[TileKey]:
    """The fused-attention tile shapes `predict_time` will ask `Rates` for (to calibrate them first)."""
    plan = call_plan(seq_len, causal, c)
    return sorted({t for part in plan.parts for t in _part_tiles(part, plan.config)})


# beyond this many rows and keys the fused kernel's rate is flat: larger tiles are not worth calibrating
_TILE_PLATEAU = 4096


def _exact_tile(x: int, causal: bool) -> TileKey:
    t = min(x, _TILE_PLATEAU)
    return (t, t, False, causal)


def _hyper_seconds(part: Part, f: HyperConfig, d_: int, s_: int, rates: Rates) -> tuple[float, float]:
    """(fused-attention seconds, other seconds) of one ``"hyper"`` sub-problem, per batch-head."""
    ex = extras(part, f.sink_keys)
    args = (part.sq, d_, f.block_size, f.draws, f.lsh_num_projs, ex, s_)
    flash = _NC["flops_block"](*args) / rates.flash_rate(f.block_size, f.block_size)
    if f.draws + ex:
        flash += _NC["flops_resid"](*args) / rates.flash_rate(f.block_size, f.draws + ex, shared=True)
    other = _NC["flops_lsh"](*args) / rates.flash_rate(f.block_size, f.block_size)
    other += _NC["bytes"](*args) / rates.bandwidth + _NC["sort"](*args) / rates.sort
    return flash, other


def _exact_seconds(x: int, causal: bool, d_: int, s_: int, rates: Rates) -> tuple[float, float]:
    rows, keys, _, _ = _exact_tile(x, causal)
    flops = (2 if causal else 4) * x * x * d_
    return flops / rates.flash_rate(rows, keys, causal=causal), 4 * x * d_ * s_ / rates.bandwidth


def _part_seconds(part: Part, first: bool, f: HyperConfig, d_: int, s_: int, rates: Rates) -> tuple[float, float]:
    """(fused-attention seconds, other seconds) of every sub-problem of ``part``, per batch-head (without the
    fixed overhead of a call, `Rates.call`)."""
    if part.kind == "hyper":
        flash, other = _hyper_seconds(part, f, d_, s_, rates)
        flash, other = flash * part.count, other * part.count
    elif part.kind == "band":
        lo, hi = part.window
        flash = 4 * part.count * part.sq * (lo + hi + 1) * d_ / rates.flash_rate(f.block_size, f.block_size)
        other = 0.0
    else:
        causal = part.kind == "causal"
        rows, keys, _, _ = _exact_tile(part.sq, causal)
        flops = (2 if causal else 4) * part.count * part.sq * part.sk * d_
        flash, other = flops / rates.flash_rate(rows, keys, causal=causal), 0.0
    if first:  # read q, k, v and write the output
        other += 4 * part.q_len * d_ * s_ / rates.bandwidth
    else:  # chunk copies of q, k, v and the float32 merge into the output
        other += (3 * 2 * part.sq * d_ * s_ + 6 * 4 * part.sq * d_) * part.count / rates.bandwidth
    return flash, other


def predict_parts(
    seq_len: int, causal: bool, c: HyperConfig, *, head_dim: int, elem_bytes: int, batch_heads: int, rates: Rates
) -> tuple[float, float]:
    """Unscaled (fused-attention seconds, other seconds) of ``hyper::attention`` with candidate ``c`` on
    ``batch_heads`` sequences of ``seq_len``: the sum over the parts of its call plan (`call_plan`)."""
    plan = call_plan(seq_len, causal, c)
    flash = other = 0.0
    for i, part in enumerate(plan.parts):
        f, o = _part_seconds(part, i == 0, plan.config, head_dim, elem_bytes, rates)
        flash, other = flash + f, other + o
    calls = sum(part.kind == "hyper" for part in plan.parts)
    return flash * batch_heads, other * batch_heads + calls * rates.call


def predict_time(
    seq_len: int, causal: bool, c, *, head_dim: int, elem_bytes: int, batch_heads: int, rates: Rates
) -> float:
    """Predicted seconds: the parts of `predict_parts`, each scaled by its factor fitted to measurements."""
    f, o = predict_parts(
        seq_len, causal, c, head_dim=head_dim, elem_bytes=elem_bytes, batch_heads=batch_heads, rates=rates
    )
    return rates.scale_flash * f + rates.scale_other * o


def exact_parts(
    seq_len: int, causal: bool, *, head_dim: int, elem_bytes: int, batch_heads: int, rates: Rates
) -> tuple[float, float]:
    """Unscaled (fused-attention seconds, other seconds) of exact attention."""
    f, o = _exact_seconds(seq_len, causal, head_dim, elem_bytes, rates)
    return f * batch_heads, o * batch_heads


def refit(rates: Rates, points: list[tuple[float, float, float]]) -> None:
    """Fit ``rates.scale_flash`` and ``rates.scale_other`` to measured ``(flash, other, seconds)`` points by
    least squares on relative error; one common factor (the median ratio) if the two-factor fit is
    ill-conditioned or implausible."""
    if not points:
        return
    rows = [(f / t, o / t) for f, o, t in points if t > 0]
    if len(rows) >= 3:
        aa = sum(a * a for a, _ in rows)
        ab = sum(a * c for a, c in rows)
        bb = sum(c * c for _, c in rows)
        ya, yb = sum(a for a, _ in rows), sum(c for _, c in rows)
        det = aa * bb - ab * ab
        if det > 1e-6 * aa * bb:
            alpha, beta = (ya * bb - yb * ab) / det, (yb * aa - ya * ab) / det
            if 0.2 < alpha < 5 and 0.2 < beta < 5:  # else the two parts are too alike to tell apart
                rates.scale_flash, rates.scale_other = alpha, beta
                return
    ratios = sorted(t / (f + o) for f, o, t in points if f + o > 0)
    rates.scale_flash = rates.scale_other = ratios[len(ratios) // 2]


def crossover(
    c,
    *,
    head_dim: int,
    elem_bytes: int,
    batch_heads: int,
    rates: Rates,
    exact_scale: float = 1.0,
    hyper_scale: float = 1.0,
    hi: int = 1 << 24,
) -> int | None:
    """The smallest length at which non-causal HyperAttention with ``c``'s sizes (block, samples, LSH
    projections, sinks, window) is predicted faster than exact attention (None if not below ``hi``). Causal
    HyperAttention approximates quadrants of at least ``min_seq_len``, so the same length serves as its threshold.

    ``exact_scale`` and ``hyper_scale`` multiply the unscaled predictions: measured / predicted ratios near the
    crossover (see ``search.Tuner.calibrate_crossover``), where fixed overheads matter most."""
    forced = c.replace(min_seq_len=1, causal_depth=None)
    kw = dict(head_dim=head_dim, elem_bytes=elem_bytes, batch_heads=batch_heads, rates=rates)

    def hyper_wins(x: int) -> bool:
        return hyper_scale * sum(predict_parts(x, False, forced, **kw)) < exact_scale * sum(exact_parts(x, False, **kw))

    lo = 2 * c.block_size  # at least two blocks
    if hyper_wins(lo):
        return lo
    x = lo
    while not hyper_wins(x):
        if x >= hi:
            return None
        x *= 2
    below = x // 2
    while x - below > 1:  # bisect between a losing and a winning length
        mid = (x + below) // 2
        below, x = (below, mid) if hyper_wins(mid) else (mid, x)
    return x


def describe(causal: bool) -> dict[str, str]:
    """The symbolic FLOP and byte counts, as text (``--show-model``)."""
    hyper = causal_hyper() if causal else noncausal_hyper()
    ex = exact(causal=causal)
    return {
        "hyper FLOPs": str(total_flops(hyper)),
        "hyper bytes": str(hyper["bytes"]),
        "hyper sort work": str(hyper["sort"]),
        "exact FLOPs": str(ex["flops_exact"]),
    }
