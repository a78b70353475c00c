"""Proving what a mask is, by evaluating the graph that builds it.

A mask that a model builds from sequence lengths and constants alone (``triu(full(n, n, -inf), 1)``, a
comparison of two ``arange``s, a slice of a causal buffer, HF's ``create_causal_mask``) is a pure function of
the symbolic sizes. We re-run that subgraph on the CPU at a few concrete sizes and compare the result with the
causal pattern the op implements (bottom-right aligned). Test sizes:

- every size symbol in range; batch-like symbols small, the sequence symbols (those in the scores' last two
  dims) at 5 and 7, at their hint, and above the largest integer literal in the subgraph, so a sliding window
  or any other constant that would break the pattern at long lengths is exceeded at least once;
- with Nq and Nk distinct symbols, also distinct values, so top-left alignment is told from bottom-right;
- with static shapes, the one real size (if the mask has at most ``MAX_STATIC_ELEMENTS`` elements: 32k x 32k).

A subgraph that reads a tensor input (a user mask, padding) is not input-free and is never classified by
value, except placeholders the backend proved constant (causal buffers, see `hyper_backend.backend`).
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx

MAX_ELEMENTS = 1 << 26  # largest mask evaluated at a test size (dynamic shapes)
# with static shapes the mask is evaluated once at its real size, as the model builds it at run time (a 32k x 32k
# bool mask: 1 GiB, checked row-chunk by row-chunk)
MAX_STATIC_ELEMENTS = 1 << 30
SLICE_END = 1 << 62  # ``x[a:]`` traces as slice(x, dim, a, 2**63 - 1): a sentinel, not a window width
MASKED = -1.0e4  # an additive bias (or fill) at or below this excludes the key
CPU = torch.device("cpu")


class NotInputFree(Exception):
    """The subgraph reads a tensor that is not a compile-time constant."""


UNBOUNDED = 1 << 62  # a window side that reaches every key


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
        return Verdict("band", window=(left, right))

    def describe(self) -> str:
        if self.kind != "band":
            return str(self.kind)
        left, right = self.window
        if right == 0:
            return f"causal sliding window of {left + 1} keys"
        side = lambda x: "all" if x >= UNBOUNDED else str(x)  # noqa: E731
        return f"band of {side(left)} keys before and {side(right)} after the diagonal"


def meta_val(n):
    """The fake value of a node (``val`` in aten graphs, ``example_value`` in Dynamo graphs); non-nodes as is."""
    if not isinstance(n, fx.Node):
        return n
    return n.meta.get("val", n.meta.get("example_value"))


def _is_scalar(v) -> bool:
    return isinstance(v, (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool))


def ancestors(node: fx.Node, constants: dict[fx.Node, torch.Tensor]) -> list[fx.Node]:
    """Nodes the value of ``node`` depends on, stopping at scalars, constants and placeholders."""
    seen, order, stack = set(), [], [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        order.append(n)
        if n in constants or _is_scalar(meta_val(n)) or n.op in ("placeholder", "get_attr"):
            continue
        stack.extend(n.all_input_nodes)
    return order


def _mutates(n: fx.Node) -> bool:
    if n.op == "call_function":
        if n.target is operator.setitem:
            return True
        schema = getattr(n.target, "_schema", None)
        return bool(schema is not None and schema.is_mutable)
    return n.op == "call_method" and n.target.endswith("_") and not n.target.startswith("__")


def mutated(nodes: Sequence[fx.Node]) -> fx.Node | None:
    """A node of ``nodes`` whose value another node changes in place (``mask[i] = x``, ``masked_fill_``): the
    value is then not what its ancestors compute, so it is never classified."""
    # the node itself, and the views of it (select, slice, getitem, view, ...: they share its storage). A mutation
    # that is itself among ``nodes`` (``zeros(...).masked_fill_(m, -inf)`` feeding the mask) is replayed in graph
    # order by `evaluate`, so only the others change the value behind the evaluation's back
    members = set(nodes)
    seen, stack = set(nodes), [(n, 0) for n in nodes]
    while stack:
        n, depth = stack.pop()
        for u in n.users:
            if not (u.args and u.args[0] is n):
                continue
            if _mutates(u) and u not in members:
                return u
            if _aliases(u) and u not in seen and depth < 8:
                seen.add(u)
                stack.append((u, depth + 1))
    return None


_VIEW_METHODS = {
    "view",
    "view_as",
    "reshape",
    "reshape_as",
    "expand",
    "expand_as",
    "transpose",
    "permute",
    "t",
    "select",
    "narrow",
    "unsqueeze",
    "squeeze",
    "flatten",
    "unflatten",
    "diagonal",
    "as_strided",
    "contiguous",
    "detach",
    "unbind",
    "split",
    "chunk",
    "movedim",
    "swapaxes",
    "__getitem__",
    "T",
    "mT",
}
_VIEW_FUNCTIONS = {
    operator.getitem,
    torch.reshape,
    torch.transpose,
    torch.permute,
    torch.select,
    torch.narrow,
    torch.unsqueeze,
    torch.squeeze,
    torch.flatten,
    torch.diagonal,
    torch.t,
    torch.detach,
    torch.as_strided,
    torch.unbind,
    torch.split,
    torch.chunk,
    torch.movedim,
    torch.swapaxes,
}


def _aliases(n: fx.Node) -> bool:
    """``n`` may share its first argument's storage (a view, or an op that returns its input)."""
    if n.op == "call_method":
        return n.target in _VIEW_METHODS
    if n.op != "call_function":
        return False
    schema = getattr(n.target, "_schema", None)
    if schema is not None:  # aten overloads say so
        return any(r.alias_info is not None for r in schema.returns)
    return n.target in _VIEW_FUNCTIONS


def input_free(node: fx.Node, constants: dict[fx.Node, torch.Tensor]) -> bool:
    for n in ancestors(node, constants):
        if n.op == "placeholder" and n not in constants and not _is_scalar(meta_val(n)):
            return False
    return True


@contextlib.contextmanager
def real_mode():
    """Run real CPU ops, outside any fake-tensor or tracing mode active in the compiler."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes(), torch.no_grad():
        yield


def symbols_of(values: Iterable) -> set:
    out = set()
    for v in values:
        if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            out |= v.node.expr.free_symbols
    return out


def concrete(v, subs: dict):
    if isinstance(v, torch.SymInt):
        return int(v.node.expr.xreplace(subs))
    if isinstance(v, torch.SymFloat):
        return float(v.node.expr.xreplace(subs))
    if isinstance(v, torch.SymBool):
        return bool(v.node.expr.xreplace(subs))
    return v


def _to_cpu(x):
    if isinstance(x, torch.device):
        return CPU
    if isinstance(x, torch.Tensor):
        return x.detach().to(CPU)
    return x


def evaluate(node: fx.Node, subs: dict, constants: dict[fx.Node, torch.Tensor]):
    """Value of ``node`` with the size symbols replaced by ``subs``; raises `NotInputFree` on a tensor input.

    Call it under `real_mode`.
    """
    cache: dict[fx.Node, object] = {}
    nodes = ancestors(node, constants)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    for n in sorted(nodes, key=order.__getitem__):
        v = meta_val(n)
        if n in constants:
            cache[n] = constants[n].to(CPU)
        elif _is_scalar(v):
            cache[n] = concrete(v, subs)
        elif n.op == "placeholder":
            raise NotInputFree(n.name)
        elif n.op == "get_attr":
            obj = n.graph.owning_module
            for part in n.target.split("."):
                obj = getattr(obj, part)
            cache[n] = _to_cpu(obj)
        else:
            args = fx.node.map_aggregate(fx.node.map_arg(n.args, cache.__getitem__), _to_cpu)
            kwargs = fx.node.map_aggregate(fx.node.map_arg(n.kwargs, cache.__getitem__), _to_cpu)
            if n.op == "call_function":
                cache[n] = n.target(*args, **kwargs)
            elif n.op == "call_method":
                cache[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
            else:
                raise NotInputFree(n.name)
    return cache[node]


def _literal_max(nodes: Sequence[fx.Node], constants) -> int:
    big = 0

    def visit(a):
        nonlocal big
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) < SLICE_END:
            big = max(big, abs(a))
        return a

    for n in nodes:
        fx.node.map_aggregate(n.args, visit)
        fx.node.map_aggregate(n.kwargs, visit)
        if n in constants:
            c = constants[n]
            big = max([big, *c.shape])
            if c.numel() <= 16 and not c.is_complex() and c.numel():  # a window width kept in a small buffer
                big = max(big, min(int(c.detach().double().abs().nan_to_num(0, 0, 0).max()), MAX_ELEMENTS))
    return big


def shape_env_of(values):
    for v in values:
        if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return v.node.shape_env
    return None


def size_hints(shape_env) -> dict:
    """Symbol -> the size seen when tracing (``backed_var_to_val`` in newer torch)."""
    if shape_env is None:
        return {}
    hints = getattr(shape_env, "backed_var_to_val", None)
    return hints if hints is not None else shape_env.var_to_val


def assignments(
    seq_symbols: set, other_symbols: set, shape_env, literal_max: int, max_side: int, equal: bool = False
) -> list[dict]:
    """Concrete values for the size symbols (see the module docstring); ``equal``: the sequence symbols are known
    (guarded) equal, so they always take one value."""

    def bounds(s):
        r = shape_env.var_to_range.get(s) if shape_env is not None else None
        lo = 2 if r is None else max(2, int(r.lower))
        hi = None
        if r is not None:
            try:
                hi = int(r.upper)
            except (TypeError, ValueError, AttributeError, OverflowError):  # unbounded (int_oo)
                hi = None
        return lo, hi

    def clamp(s, v):
        lo, hi = bounds(s)
        v = max(v, lo)
        return v if hi is None else min(v, hi)

    base = {s: clamp(s, 2) for s in other_symbols}
    seq = sorted(seq_symbols, key=str)
    if not seq:
        return [base]
    sizes = {5, 7, literal_max + 3}
    for s in seq:
        hint = size_hints(shape_env).get(s) if shape_env is not None else None
        if hint is not None and int(hint) <= max_side:
            sizes.add(int(hint))
    out = []
    for v in sorted(sizes):
        if v > max_side:
            continue
        out.append({**base, **{s: clamp(s, v) for s in seq}})
        if len(seq) > 1 and not equal:
            out.append({**base, **{s: clamp(s, v + 2 * i) for i, s in enumerate(seq)}})
            out.append({**base, **{s: clamp(s, v + 2 * (len(seq) - 1 - i)) for i, s in enumerate(seq)}})
    return out


def _keep_mask(value, use: str, fill) -> torch.Tensor | None:
    """Turn an evaluated mask into keep (True = attend), or None if it is not a pure keep/drop mask."""
    if use == "add":
        if value.dtype == torch.bool:
            return None
        keep, drop = value == 0, value <= MASKED  # in the mask's own dtype: no copy of it in float64
        return keep if bool((keep | drop).all()) else None
    if fill is None or not (float(fill) <= MASKED):
        return None
    value = value.bool() if value.dtype != torch.bool else value
    return value if use == "keep" else ~value


def _pattern_of(keep: torch.Tensor, nq: int, nk: int):
    """What a keep-mask broadcastable to ``[..., nq, nk]`` is: ``"shape"``, ``"varies"`` (differs across batch or
    heads), ``"top-left"`` (causal aligned top-left, n_q != n_k), ``"other"``, or ``("band", left, right)`` with
    the intervals of widths it allows (`_band_of`); all-attend and causal are bands too."""
    if keep.dim() < 2:
        keep = keep.reshape((1,) * (2 - keep.dim()) + tuple(keep.shape))
    if keep.shape[-1] not in (1, nk) or keep.shape[-2] not in (1, nq):
        return "shape"
    flat = keep.reshape(-1, *keep.shape[-2:])
    if flat.shape[0] > 1 and not bool((flat == flat[:1]).all()):
        return "varies"
    rows = _row_spans(flat[0].expand(nq, nk))
    first, last, any_key = rows
    i = torch.arange(nq)
    if (
        nq != nk
        and bool(any_key.all())
        and bool((first == 0).all())
        and torch.equal(last, i.clamp(max=nk - 1))
        and not bool((last == nk - 1).all())
    ):
        return "top-left"
    return _band_of(rows, nq, nk)


def _row_spans(keep: torch.Tensor, chunk: int = 2048):
    """``(first, last, any)`` kept key of each row, or None if some row's kept keys are not one contiguous run.
    Memory O(chunk * nk), so a mask as large as the one the model builds at run time can be checked (a 32k
    mask in seconds)."""
    nq, nk = keep.shape
    first = torch.zeros(nq, dtype=torch.long)
    last = torch.full((nq,), -1, dtype=torch.long)
    any_key = torch.zeros(nq, dtype=torch.bool)
    cols = torch.arange(nk)
    for r in range(0, nq, chunk):
        k = keep[r : r + chunk].contiguous().view(torch.uint8)
        f = k.argmax(1)  # the first maximum: the first kept key, or 0 for a row without one
        has = k.gather(1, f[:, None])[:, 0].bool()
        l_ = (nk - 1) - k.flip(1).argmax(1)
        run = (cols >= f[:, None]) & (cols <= l_[:, None]) & has[:, None]
        if not torch.equal(run, k.bool()):
            return None
        first[r : r + chunk], last[r : r + chunk], any_key[r : r + chunk] = f, l_.where(has, -1), has
    return first, last, any_key


def _band_of(rows, nq: int, nk: int):
    """``("band", (lo, hi), (lo, hi))``: the intervals of left and right widths that the rows' kept spans allow (a
    side that reaches the matrix edge is only bounded below), or ``"other"``."""
    if rows is None:
        return "other"
    first, last, any_key = rows
    if not bool(any_key.any()):
        return "other"
    i = torch.arange(nq)
    diag = i + (nk - nq)  # the bottom-right diagonal's key in each row
    lo = int((first - diag)[any_key].min())
    hi = int((last - diag)[any_key].max())
    if lo > 0 or hi < 0:
        return "other"
    want_first, want_last = (diag + lo).clamp(min=0), (diag + hi).clamp(max=nk - 1)
    want_any = want_first <= want_last
    if not (
        torch.equal(any_key, want_any)
        and torch.equal(first[want_any], want_first[want_any])
        and torch.equal(last[want_any], want_last[want_any])
    ):
        return "other"
    left = (-lo, -lo) if lo > -(nk - 1) else (nk - 1, UNBOUNDED)
    right = (hi, hi) if hi < nq - 1 else (nq - 1, UNBOUNDED)
    return ("band", left, right)


def classify(mask: fx.Node, use: str, nq, nk, constants: dict[fx.Node, torch.Tensor], fill=None) -> Verdict:
    with real_mode():
        verdict = _classify(mask, use, nq, nk, constants, fill)
    if verdict.reason.startswith(TOP_LEFT) and _distinct_symbols(nq, nk) and equal_under_guard(nq, nk):
        # A graph resumed after a graph break gives q's and k's lengths their own symbols, so the test sizes
        # pull them apart and a causal mask looks top-left. Equal when traced: decide it under a guard (a call
        # with unequal lengths recompiles) and prove the mask for equal lengths.
        with real_mode():
            verdict = _classify(mask, use, nq, nk, constants, fill, equal=True)
    return verdict


TOP_LEFT = "causal mask aligned top-left"


def equal_under_guard(a, b) -> bool:
    """``a == b`` for sizes: proven, or, for distinct size symbols (a graph resumed after a graph break gets one
    per tensor), decided on the sizes seen and guarded, so a call where they differ recompiles."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if statically_known_true(a == b):
        return True
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return bool(a == b)  # installs the guard
    return False


def _distinct_symbols(a, b) -> bool:
    return isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt) and a.node.expr != b.node.expr


def _classify(mask, use, nq, nk, constants, fill, equal: bool = False) -> Verdict:
    """What ``mask`` does to scores of shape ``[..., nq, nk]`` (SymInts or ints).

    ``use``: ``"add"`` (scores + mask), ``"keep"`` (``where(mask, scores, fill)``), ``"drop"``
    (``masked_fill(scores, mask, fill)`` / ``where(mask, fill, scores)``). ``fill`` may be a number or an
    input-free node.
    """
    if not input_free(mask, constants) or (isinstance(fill, fx.Node) and not input_free(fill, constants)):
        return Verdict(None, "mask depends on a tensor input")
    nodes = ancestors(mask, constants) + (ancestors(fill, constants) if isinstance(fill, fx.Node) else [])
    if mutated(nodes) is not None:
        return Verdict(None, "mask is changed in place (not a pure function of the lengths)")
    values = [meta_val(n) for n in nodes] + [nq, nk]
    seq = symbols_of([nq, nk])
    other = symbols_of(values) - seq
    env = shape_env_of(values)
    lit = _literal_max(nodes, constants)
    max_side = int(math.isqrt(MAX_ELEMENTS // 4))
    if seq and lit + 3 > max_side:  # the test beyond every constant cannot run: a window that wide is unprovable
        return Verdict(None, f"mask built with a constant ({lit}) too large to verify at compile time")
    tests = assignments(seq, other, env, lit, max_side, equal)
    if not tests:
        return Verdict(None, f"mask too large to verify at compile time (constant {lit}); use dynamic shapes")
    seen, left, right = set(), (0, UNBOUNDED), (0, UNBOUNDED)
    for subs in tests:
        q, k = concrete(nq, subs), concrete(nk, subs)
        if q * k > (MAX_ELEMENTS if seq else MAX_STATIC_ELEMENTS):
            return Verdict(None, f"mask of {q}x{k} too large to verify at compile time; use dynamic shapes")
        try:
            value = evaluate(mask, subs, constants)
            f = evaluate(fill, subs, constants) if isinstance(fill, fx.Node) else fill
        except NotInputFree:
            return Verdict(None, "mask depends on a tensor input")
        except Exception as e:  # the subgraph is not valid at these sizes: we cannot tell
            return Verdict(None, f"mask could not be evaluated ({type(e).__name__})")
        if isinstance(f, torch.Tensor):
            f = f.item() if f.numel() == 1 else None
        if not isinstance(value, torch.Tensor):
            return Verdict(None, "mask is not a tensor")
        keep = _keep_mask(value, use, f)
        if keep is None:
            return Verdict(
                None,
                "general mask (values other than 0 / -inf)"
                if use == "add"
                else "general mask (fill value is not -inf-like)",
            )
        pattern = _pattern_of(keep, q, k)
        if isinstance(pattern, tuple):
            left = (max(left[0], pattern[1][0]), min(left[1], pattern[1][1]))
            right = (max(right[0], pattern[2][0]), min(right[1], pattern[2][1]))
            pattern = "band"
        seen.add(pattern)
    if "top-left" in seen and seen <= {"band", "top-left"}:
        return Verdict(None, TOP_LEFT + " with n_q != n_k (the op aligns bottom-right)")
    if seen == {"band"}:
        if left[0] > left[1] or right[0] > right[1]:
            return Verdict(None, "general mask (banded, but its width changes with the length)")
        # a side never reached the matrix edge is bounded by the widest test; at the largest test size it is
        # determined exactly whenever it is narrower than the mask (`assignments` exceeds every literal)
        return Verdict.of_sides(
            left[0] if left[1] == left[0] else UNBOUNDED, right[0] if right[1] == right[0] else UNBOUNDED
        )
    return Verdict(None, "general mask (not causal)")
