"""Proving what a mask is: all-attend, causal (bottom-right) or a band, for every size the graph serves.

`symbolic.Interpreter` turns the subgraph that builds a mask into an exact formula of the element's position
(the mask language: see `hyper_backend.lowering.symbolic`). Here that formula is decided:

1. the mask is aligned with the scores ``[..., n_q, n_k]``: its last dim is the key index j, the one before the
   query index i (or broadcast), the others batch or heads;
2. every atom ``a·x + c >= 0`` is either constant over the whole index box (checked at its extreme corners, with
   the sizes symbolic) or a half-line in ``d = j - i - (n_k - n_q)``, the distance from the bottom-right diagonal
   the op aligns to, with an integer threshold: ``c`` may involve the sequence lengths only, and the threshold must
   not depend on them (a causal mask aligned top-left with n_q != n_k is refused here; a graph resumed after a
   graph break gives q and k their own length symbols, so it is retried under a guard ``n_q == n_k``);
3. the formula is then a boolean function of d alone: its true set is a union of intervals with integer ends,
   and the mask is the band ``[-left, right]`` if exactly one of them meets the d-range of the scores,
   ``[1 - n_k, n_q - 1]``, for every size, and that one holds the diagonal d = 0.

Anything else (floor division, a float literal compared with an index, a width from a symbol that is not a
sequence length, a tensor input, a constant that is not a band pattern) keeps the site exact, with the reason.
A positive verdict is cross-checked by evaluating the mask once at the traced sizes when it is small (never as
the proof: a disagreement only refuses).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from . import symbolic as sym
from .graph import (
    ancestors,
    concrete,
    evaluate,
    input_free,
    meta_val,
    mutated,
    real_mode,
    shape_env_of,
    size_hints,
    symbols_of,
)
from .symbolic import INPUT, Refused, known

# An additive bias (or fill) at or below this excludes its key: -1e4 as bfloat16 stores it (-9984). With scores
# within 9800 of each other exp underflows to 0 (below -104 in fp32 and bf16, -745 in fp64).
MASKED = -9984.0
UNBOUNDED = 1 << 62  # a window side that reaches every key
CHECK_ELEMENTS = 1 << 20  # the cross-check evaluates masks up to this size
CHANGED = "mask is changed in place (not a pure function of the lengths)"
I, J = -2, -1  # the index variables of the scores' query and key dims


@dataclass(frozen=True)
class Verdict:
    """``kind``: ``"none"`` (attends everywhere), ``"causal"`` (bottom-right), ``"band"`` (see ``window``), or
    None (anything else, ``reason`` says why).

    ``window = (left, right)`` for a band: query i attends key j iff ``-left <= j - i - (nk - nq) <= right``
    (bottom-right aligned, as the op's causal); a side equal to `UNBOUNDED` reaches every key. A causal sliding
    window of w keys is ``(w - 1, 0)``.
    """

    kind: str | None
    reason: str = ""
    window: tuple[int, int] | None = None

    def __and__(self, other: Verdict) -> Verdict:
        """The verdict of the AND of two masks with these verdicts (both classified)."""
        if self.kind is None:
            return self
        if other.kind is None:
            return other
        a, b = self.sides(), other.sides()
        return Verdict.of_sides(min(a[0], b[0]), min(a[1], b[1]))

    def sides(self) -> tuple[int, int]:
        return {"none": (UNBOUNDED, UNBOUNDED), "causal": (UNBOUNDED, 0)}.get(self.kind, self.window)

    @staticmethod
    def of_sides(left: int, right: int) -> Verdict:
        if left >= UNBOUNDED:
            if right >= UNBOUNDED:
                return Verdict("none")
            if right == 0:
                return Verdict("causal")
        return Verdict("band", window=(min(left, UNBOUNDED), min(right, UNBOUNDED)))

    def describe(self) -> str:
        if self.kind != "band":
            return str(self.kind)
        left, right = self.window
        if right == 0:
            return f"causal sliding window of {left + 1} keys"
        side = lambda x: "all" if x >= UNBOUNDED else str(x)  # noqa: E731
        return f"band of {side(left)} keys before and {side(right)} after the diagonal"

    def rows_reason(self, nq, nk) -> str:
        """Why some query may keep no key under this mask, or ''. The op gives such a row 0, where eager gives a
        value that depends on the fill (0 for SDPA's bool masks, the mean of v for a finite fill, NaN for a
        hand-written -inf), so a mask that can leave a row empty is not lowered. Row i keeps a key iff the band
        reaches ``d = -(i + n_k - n_q)``: every row does iff ``n_q - n_k <= right`` (decided under a guard for
        symbolic lengths: a call where it fails recompiles)."""
        if self.kind not in ("causal", "band"):
            return ""
        right = self.sides()[1]
        if right >= UNBOUNDED or holds_under_guard(nq - nk <= right):
            return ""
        more = f" + {right}" if right else ""
        return f"{self.describe()} mask where n_q may exceed n_k{more}: the first queries would attend no key"


# ----------------------------------------------------------------------------------------------------------
# deciding a formula
# ----------------------------------------------------------------------------------------------------------


class _Offset(Refused):
    """The band's width or offset from the bottom-right diagonal depends on the lengths."""


@dataclass(frozen=True, eq=False)
class _D:
    t: int  # d >= t


def _align(v: sym.Val, nq, nk) -> tuple[sym.Val, dict]:
    """``v`` with its last dim renamed J (the keys), the one before I (the queries); ``sizes``: every variable's
    extent. A size-1 dim broadcasts (index 0)."""
    r = len(v.shape)
    m, sizes = {}, {}
    for k, s in enumerate(v.shape):
        if sym.is_one(s):
            m[k] = sym.Lin()
            continue
        target, want = {r - 1: (J, nk), r - 2: (I, nq)}.get(k, (k, s))
        if not known(s == want):
            raise Refused("the mask's shape does not broadcast to the scores' [..., n_q, n_k]")
        m[k], sizes[target] = sym.var(target), want
    return v.remap(v.shape, m), sizes


def _half_line(lin: sym.Lin, sizes: dict, nq, nk, lengths: set):
    """An atom ``lin >= 0`` over the index box as True, False, or a half-line in d (`_D`, negated for ``d <= t``)."""
    extra = sym.free_symbols(lin.const) - lengths
    if extra:
        raise Refused(f"the mask depends on a size that is not a sequence length ({', '.join(map(str, extra))})")
    lo = hi = lin.const
    for d, a in lin.coef:
        span = a * (sizes[d] - 1)
        lo, hi = (lo, hi + span) if a > 0 else (lo + span, hi)
    if known(lo >= 0):
        return True
    if known(hi < 0):
        return False
    coef = dict(lin.coef)
    if set(coef) - {I, J}:
        raise Refused("the mask differs across the batch or heads")
    a = coef.get(J, 0)
    if a == 0 or coef.get(I, 0) != -a:
        raise Refused("the mask depends on the query or key position other than through j - i")
    e = sym.as_int(a * (nk - nq) + lin.const)  # a·d + e >= 0, d = j - i - (nk - nq)
    if e is None:
        raise _Offset(
            "the band's width or its offset from the bottom-right diagonal depends on the lengths (a width computed "
            "from the length, or a causal mask aligned top-left with n_q != n_k: the op aligns bottom-right)"
        )
    return _D(-(e // a)) if a > 0 else sym.neg(_D(e // -a + 1))


def _map(f, leaf):
    if isinstance(f, bool):
        return f
    if isinstance(f, sym.Atom):
        return leaf(f.lin)
    if isinstance(f, sym.Not):
        return sym.neg(_map(f.f, leaf))
    return (sym.conj if isinstance(f, sym.And) else sym.disj)(*(_map(g, leaf) for g in f.fs))


def _holds(f, d: int) -> bool:
    if isinstance(f, bool):
        return f
    if isinstance(f, _D):
        return d >= f.t
    if isinstance(f, sym.Not):
        return not _holds(f.f, d)
    return (all if isinstance(f, sym.And) else any)(_holds(g, d) for g in f.fs)


def _thresholds(f, out: set) -> set:
    if isinstance(f, _D):
        out.add(f.t)
    elif isinstance(f, sym.Not):
        _thresholds(f.f, out)
    elif isinstance(f, (sym.And, sym.Or)):
        for g in f.fs:
            _thresholds(g, out)
    return out


def _live_intervals(f, sizes: dict, nq, nk) -> list[tuple[int | None, int | None]]:
    """The maximal intervals ``[lo, hi]`` of d (None: unbounded) where ``f`` holds that meet the scores'
    d-range ``[1 - n_k, n_q - 1]`` for some size."""
    lengths = sym.free_symbols(nq) | sym.free_symbols(nk)
    f = _map(f, lambda lin: _half_line(lin, sizes, nq, nk, lengths))
    ts = sorted(_thresholds(f, set()))
    bounds = [None, *ts]  # region r: [bounds[r], bounds[r+1] - 1]; the first is (-inf, ts[0] - 1]
    out = []
    for r, lo in enumerate(bounds):
        hi = bounds[r + 1] - 1 if r + 1 < len(bounds) else None
        if not _holds(f, lo if lo is not None else (ts[0] - 1 if ts else 0)):
            continue
        if out and out[-1][1] is not None and lo is not None and out[-1][1] == lo - 1:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return [
        (lo, hi)
        for lo, hi in out
        if not ((hi is not None and known(hi < 1 - nk)) or (lo is not None and known(lo > nq - 1)))
    ]


def decide(keep, sizes: dict, nq, nk, other=False) -> Verdict:
    """The verdict for the aligned keep formula; ``other``: where the mask is neither keep nor drop (must be
    nowhere)."""
    if _live_intervals(other, sizes, nq, nk):
        raise Refused("general mask (values other than 0 / -inf)")
    live = _live_intervals(keep, sizes, nq, nk)
    if not live:
        raise Refused("the mask hides every key")
    if len(live) > 1:
        raise Refused("general mask (not a band: it keeps several separate ranges of j - i)")
    lo, hi = live[0]
    if (lo is not None and lo > 0) or (hi is not None and hi < 0):
        raise Refused(
            "the mask hides the diagonal the op aligns to (bottom-right): a causal mask aligned top-left with "
            "n_q != n_k, or a window without the query itself"
        )
    left = UNBOUNDED if lo is None or known(lo <= 1 - nk) else -lo
    right = UNBOUNDED if hi is None or known(hi >= nq - 1) else hi
    return Verdict.of_sides(left, right)


# ----------------------------------------------------------------------------------------------------------
# the prover
# ----------------------------------------------------------------------------------------------------------


class Prover:
    """The mask proofs of one graph: each (mask node, use, fill, lengths) is proven once.

    ``constants``: placeholders that are compile-time constants (registered buffers), read by value; ``used``: those
    a positive verdict read (the backend guards them: a changed buffer must not reuse the proof)."""

    def __init__(self, constants: dict[fx.Node, torch.Tensor]):
        self.constants = constants
        self.used: set[fx.Node] = set()
        self._interp = sym.Interpreter(constants)
        self._verdicts: dict[tuple, Verdict] = {}

    def classify(self, mask: fx.Node, use: str, nq, nk, fill=None) -> Verdict:
        """What ``mask`` does to scores of shape ``[..., nq, nk]`` (SymInts or ints).

        ``use``: ``"add"`` (scores + mask), ``"keep"`` (``where(mask, scores, fill)``), ``"drop"``
        (``masked_fill(scores, mask, fill)`` / ``where(mask, fill, scores)``). ``fill`` may be a number or an
        input-free node."""
        key = (mask, use, fill if isinstance(fill, fx.Node) else repr(fill), str(nq), str(nk))
        if key not in self._verdicts:
            self._verdicts[key] = self._classify(mask, use, nq, nk, fill)
        return self._verdicts[key]

    def _classify(self, mask, use, nq, nk, fill) -> Verdict:
        fill_node = isinstance(fill, fx.Node)
        if not input_free(mask, self.constants) or (fill_node and not input_free(fill, self.constants)):
            return Verdict(None, INPUT)
        nodes = ancestors(mask, self.constants) + (ancestors(fill, self.constants) if fill_node else [])
        if mutated(nodes) is not None:
            return Verdict(None, CHANGED)
        for attempt in range(2):
            try:
                with real_mode():
                    verdict = self._prove(mask, use, nq, nk, fill)
                break
            except _Offset as e:
                if attempt or not (_distinct_symbols(nq, nk) and equal_under_guard(nq, nk)):
                    return Verdict(None, e.reason)
                # A graph resumed after a graph break gives q's and k's lengths their own symbols. Equal when
                # traced: decided under a guard (a call with unequal lengths recompiles), proven for equal lengths.
            except Refused as e:
                return Verdict(None, e.reason)
        with real_mode():
            disagreement = self._cross_check(mask, use, nq, nk, fill, verdict, nodes)
        if disagreement:
            return Verdict(None, disagreement)
        self.used.update(n for n in nodes if n in self.constants)
        return verdict

    def _prove(self, mask, use, nq, nk, fill) -> Verdict:
        v = self._interp.value(mask)
        v, sizes = _align(v, nq, nk)
        if use == "add":
            if v.keep is not None:
                raise Refused("general mask (values other than 0 / -inf)")
            keep = sym.disj(*(c for c, x in v.pieces if x == 0))
            other = sym.disj(*(c for c, x in v.pieces if not (x == 0 or x <= MASKED)))
            return decide(keep, sizes, nq, nk, other)
        if fill is None or not (self._fill(fill) <= MASKED):
            raise Refused("general mask (fill value is not -inf-like)")
        keep = v.formula()
        return decide(keep if use == "keep" else sym.neg(keep), sizes, nq, nk)

    def _fill(self, fill) -> float:
        if not isinstance(fill, fx.Node):
            if isinstance(fill, bool) or not isinstance(fill, (int, float)):
                raise Refused("general mask (fill value is not -inf-like)")
            return float(fill)
        values = {x for _, x in self._interp.value(fill).as_pieces(torch.float64)}
        if len(values) != 1:
            raise Refused("general mask (the fill value varies)")
        return values.pop()

    def _cross_check(self, mask, use, nq, nk, fill, verdict: Verdict, nodes) -> str:
        """'' unless evaluating the mask at the traced sizes (when small) contradicts ``verdict``."""
        values = [meta_val(n) for n in nodes] + [nq, nk]
        hints = size_hints(shape_env_of(values))
        subs = {s: hints.get(s) for s in symbols_of(values)}
        if any(h is None for h in subs.values()):
            return ""
        subs = {s: int(h) for s, h in subs.items()}
        mv = meta_val(mask)
        q, k = concrete(nq, subs), concrete(nk, subs)
        numel = 1
        for s in mv.shape:
            numel *= concrete(s, subs)
        if max(numel, q * k) > CHECK_ELEMENTS:
            return ""
        try:
            value = evaluate(mask, subs, self.constants)
            f = evaluate(fill, subs, self.constants) if isinstance(fill, fx.Node) else fill
            f = float(f) if isinstance(f, torch.Tensor) else f
            if use == "add":
                keep = value == 0
            else:
                keep = value.bool() if use == "keep" else ~value.bool()
            keep = torch.broadcast_to(keep, (*keep.shape[:-2], q, k)) if keep.dim() >= 2 else keep.expand(q, k)
        except Exception:  # not evaluable at these sizes: no evidence either way
            return ""
        left, right = verdict.sides()
        d = torch.arange(k)[None, :] - torch.arange(q)[:, None] - (k - q)
        want = (d >= -left) & (d <= right)
        if torch.equal(keep, want.expand_as(keep)):
            return ""
        return f"the mask proof ({verdict.describe()}) and an evaluation at n_q={q}, n_k={k} disagree (a bug)"


def classify(mask: fx.Node, use: str, nq, nk, constants: dict[fx.Node, torch.Tensor], fill=None) -> Verdict:
    """`Prover.classify` for one mask."""
    return Prover(constants).classify(mask, use, nq, nk, fill)


def holds_under_guard(cond) -> bool:
    """``cond`` on sizes: proven, or, if it involves symbolic sizes, decided on the sizes seen and guarded, so a call
    where it fails recompiles."""
    if known(cond):
        return True
    return bool(cond) if isinstance(cond, torch.SymBool) else False  # bool() installs the guard


def equal_under_guard(a, b) -> bool:
    """``a == b`` for sizes (`holds_under_guard`): distinct size symbols (a graph resumed after a graph break gets one
    per tensor) that are equal when traced are taken equal under a guard."""
    return holds_under_guard(a == b)


def _distinct_symbols(a, b) -> bool:
    return isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt) and a.node.expr != b.node.expr
