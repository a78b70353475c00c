"""Proving what a mask is, by evaluating the graph that builds it.

A mask that a model builds from sequence lengths and constants alone (``triu(full(n, n, -inf), 1)``, a
comparison of two ``arange``s, a slice of a causal buffer, HF's ``create_causal_mask``) is a pure function of
the symbolic sizes. We re-run that subgraph on the CPU at a few concrete sizes and compare the result with the
causal pattern the op implements (bottom-right aligned). Test sizes:

- every size symbol in range; batch-like symbols small, the sequence symbols (those in the scores' last two
  dims) at 5 and 7, at their hint, and above the largest integer literal in the subgraph, so a sliding window
  or any other constant that would break the pattern at long lengths is exceeded at least once;
- with Nq and Nk distinct symbols, also distinct values, so top-left alignment is told from bottom-right;
- with static shapes, the one real size (if the mask has at most ``MAX_ELEMENTS`` elements).

A subgraph that reads a tensor input (a user mask, padding) is not input-free and is never classified by
value, except placeholders the backend proved constant (causal buffers, see `hyper_backend.backend`).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import sympy
import torch
import torch.fx as fx

MAX_ELEMENTS = 1 << 26  # largest mask evaluated at compile time
MASKED = -1.0e4  # an additive bias (or fill) at or below this excludes the key
CPU = torch.device("cpu")


class NotInputFree(Exception):
    """The subgraph reads a tensor that is not a compile-time constant."""


@dataclass(frozen=True)
class Verdict:
    kind: Optional[str]  # "none" (attends everywhere), "causal" (bottom-right), or None (anything else)
    reason: str = ""


def meta_val(n):
    """The fake value of a node (``val`` in aten graphs, ``example_value`` in Dynamo graphs); non-nodes as is."""
    if not isinstance(n, fx.Node):
        return n
    return n.meta.get("val", n.meta.get("example_value"))


def _is_scalar(v) -> bool:
    return isinstance(v, (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool))


def ancestors(node: fx.Node, constants: Dict[fx.Node, torch.Tensor]) -> List[fx.Node]:
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


def input_free(node: fx.Node, constants: Dict[fx.Node, torch.Tensor]) -> bool:
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


def evaluate(node: fx.Node, subs: dict, constants: Dict[fx.Node, torch.Tensor]):
    """Value of ``node`` with the size symbols replaced by ``subs``; raises `NotInputFree` on a tensor input.

    Call it under `real_mode`.
    """
    cache: Dict[fx.Node, object] = {}
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
        if isinstance(a, int) and not isinstance(a, bool):
            big = max(big, abs(a))
        return a

    for n in nodes:
        fx.node.map_aggregate(n.args, visit)
        fx.node.map_aggregate(n.kwargs, visit)
        if n in constants:
            big = max([big, *constants[n].shape])
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


def assignments(seq_symbols: set, other_symbols: set, shape_env, literal_max: int, max_side: int) -> List[dict]:
    """Concrete values for the size symbols (see the module docstring)."""
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
        if len(seq) > 1:
            out.append({**base, **{s: clamp(s, v + 2 * i) for i, s in enumerate(seq)}})
            out.append({**base, **{s: clamp(s, v + 2 * (len(seq) - 1 - i)) for i, s in enumerate(seq)}})
    return out


def _keep_mask(value, use: str, fill) -> Optional[torch.Tensor]:
    """Turn an evaluated mask into keep (True = attend), or None if it is not a pure keep/drop mask."""
    if use == "add":
        if value.dtype == torch.bool:
            return None
        value = value.double()
        keep, drop = value == 0, value <= MASKED
        return keep if bool((keep | drop).all()) else None
    if fill is None or not (float(fill) <= MASKED):
        return None
    value = value.bool() if value.dtype != torch.bool else value
    return value if use == "keep" else ~value


def _pattern_of(keep: torch.Tensor, nq: int, nk: int) -> str:
    if keep.dim() < 2:
        keep = keep.reshape((1,) * (2 - keep.dim()) + tuple(keep.shape))
    if keep.shape[-1] not in (1, nk) or keep.shape[-2] not in (1, nq):
        return "shape"
    keep = keep.expand(*keep.shape[:-2], nq, nk).reshape(-1, nq, nk)
    if not bool((keep == keep[:1]).all()):
        return "varies"
    keep = keep[0]
    if bool(keep.all()):
        return "none"
    rows = torch.arange(nq)[:, None]
    cols = torch.arange(nk)[None, :]
    if torch.equal(keep, cols <= rows + (nk - nq)):
        return "causal"
    if torch.equal(keep, cols <= rows):
        return "top-left"
    return "other"


def classify(mask: fx.Node, use: str, nq, nk, constants: Dict[fx.Node, torch.Tensor], fill=None) -> Verdict:
    with real_mode():
        return _classify(mask, use, nq, nk, constants, fill)


def _classify(mask, use, nq, nk, constants, fill) -> Verdict:
    """What ``mask`` does to scores of shape ``[..., nq, nk]`` (SymInts or ints).

    ``use``: ``"add"`` (scores + mask), ``"keep"`` (``where(mask, scores, fill)``), ``"drop"``
    (``masked_fill(scores, mask, fill)`` / ``where(mask, fill, scores)``). ``fill`` may be a number or an
    input-free node.
    """
    if not input_free(mask, constants) or (isinstance(fill, fx.Node) and not input_free(fill, constants)):
        return Verdict(None, "mask depends on a tensor input")
    nodes = ancestors(mask, constants) + (ancestors(fill, constants) if isinstance(fill, fx.Node) else [])
    values = [meta_val(n) for n in nodes] + [nq, nk]
    seq = symbols_of([nq, nk])
    other = symbols_of(values) - seq
    env = shape_env_of(values)
    lit = _literal_max(nodes, constants)
    max_side = int(math.isqrt(MAX_ELEMENTS // 4))
    tests = assignments(seq, other, env, lit, max_side)
    if not tests:
        return Verdict(None, f"mask too large to verify at compile time (constant {lit}); use dynamic shapes")
    seen = set()
    for subs in tests:
        q, k = concrete(nq, subs), concrete(nk, subs)
        if q * k > MAX_ELEMENTS:
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
            return Verdict(None, "general mask (values other than 0 / -inf)" if use == "add"
                           else "general mask (fill value is not -inf-like)")
        seen.add(_pattern_of(keep, q, k))
    if seen == {"none"}:
        return Verdict("none")
    if seen == {"causal"}:
        return Verdict("causal")
    if "top-left" in seen and seen <= {"causal", "top-left"}:
        return Verdict(None, "causal mask aligned top-left with n_q != n_k (the op aligns bottom-right)")
    return Verdict(None, "general mask (not causal)")
