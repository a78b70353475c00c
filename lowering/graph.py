"""Reading FX graphs: fake values, the subgraph a value depends on, in-place changes, and real evaluation.

Shared by every pass of the lowering (Dynamo graphs and inductor's aten graphs alike).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Sequence

import torch
import torch.fx as fx

CPU = torch.device("cpu")
SYM_TYPES = (torch.SymInt, torch.SymFloat, torch.SymBool)


def meta_val(n):
    """The fake value of a node (``val`` in aten graphs, ``example_value`` in Dynamo graphs); non-nodes as is."""
    if not isinstance(n, fx.Node):
        return n
    return n.meta.get("val", n.meta.get("example_value"))


def tensor_of(n) -> torch.Tensor | None:
    v = meta_val(n)
    return v if isinstance(v, torch.Tensor) else None


def is_scalar(v) -> bool:
    return isinstance(v, (int, float, bool, *SYM_TYPES))


def is_call(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def is_method(n, *names) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_method" and n.target in names


def ancestors(node: fx.Node, constants: dict[fx.Node, torch.Tensor]) -> list[fx.Node]:
    """Nodes the value of ``node`` depends on, stopping at scalars, constants and placeholders."""
    seen, order, stack = set(), [], [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        order.append(n)
        if n in constants or is_scalar(meta_val(n)) or n.op in ("placeholder", "get_attr"):
            continue
        stack.extend(n.all_input_nodes)
    return order


def input_free(node: fx.Node, constants: dict[fx.Node, torch.Tensor]) -> bool:
    """``node`` reads no tensor input of the graph other than ``constants``."""
    for n in ancestors(node, constants):
        if n.op == "placeholder" and n not in constants and not is_scalar(meta_val(n)):
            return False
    return True


def mutates(n: fx.Node) -> bool:
    """``n`` changes its first argument in place (``setitem``, ``masked_fill_``, a mutable aten overload)."""
    if n.op == "call_function":
        if n.target is operator.setitem:
            return True
        schema = getattr(n.target, "_schema", None)
        return bool(schema is not None and schema.is_mutable)
    return n.op == "call_method" and n.target.endswith("_") and not n.target.startswith("__")


def mutated(nodes: Sequence[fx.Node]) -> fx.Node | None:
    """A node outside ``nodes`` that changes one of them in place (``mask[i] = x``, ``masked_fill_``), directly or
    through a view: the value is then not what its ancestors compute. A mutation that is itself among ``nodes``
    (``zeros(...).masked_fill_(m, -inf)`` feeding the mask) is part of the computation, not a change behind it."""
    members = set(nodes)
    seen, stack = set(nodes), [(n, 0) for n in nodes]
    while stack:
        n, depth = stack.pop()
        for u in n.users:
            if not (u.args and u.args[0] is n):
                continue
            if mutates(u) and u not in members:
                return u
            if aliases(u) and u not in seen and depth < 8:
                seen.add(u)
                stack.append((u, depth + 1))
    return None


_VIEW_METHODS = frozenset(
    {
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
)
_VIEW_FUNCTIONS = frozenset(
    {
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
)


def aliases(n: fx.Node) -> bool:
    """``n`` may share its first argument's storage (a view, or an op that returns its input)."""
    if n.op == "call_method":
        return n.target in _VIEW_METHODS
    if n.op != "call_function":
        return False
    schema = getattr(n.target, "_schema", None)
    if schema is not None:  # aten overloads say so
        return any(r.alias_info is not None for r in schema.returns)
    return n.target in _VIEW_FUNCTIONS


@contextlib.contextmanager
def real_mode():
    """Run real CPU ops, outside any fake-tensor or tracing mode active in the compiler."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes(), torch.no_grad():
        yield


def concrete(v, subs: dict):
    """A size (or symbolic scalar) with its symbols replaced by ``subs``."""
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


class NotInputFree(Exception):
    """The subgraph reads a tensor that is not a compile-time constant."""


def evaluate(node: fx.Node, subs: dict, constants: dict[fx.Node, torch.Tensor]):
    """The real value of ``node`` with the size symbols replaced by ``subs`` (call it under `real_mode`); raises
    `NotInputFree` on a tensor input. Used to cross-check proofs and to read constant scales, never as a proof."""
    cache: dict[fx.Node, object] = {}
    nodes = ancestors(node, constants)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    for n in sorted(nodes, key=order.__getitem__):
        v = meta_val(n)
        if n in constants:
            cache[n] = constants[n].to(CPU)
        elif is_scalar(v):
            cache[n] = concrete(v, subs)
        elif n.op == "placeholder":
            raise NotInputFree(n.name)
        elif n.op == "get_attr":
            cache[n] = _to_cpu(attribute(n))
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


def attribute(n: fx.Node):
    """The value a ``get_attr`` node reads from its graph module."""
    obj = n.graph.owning_module
    for part in n.target.split("."):
        obj = getattr(obj, part)
    return obj


def _scalars(values):
    """The symbolic scalars among ``values`` and in the shapes of the tensors among them."""
    for v in values:
        if isinstance(v, SYM_TYPES):
            yield v
        elif isinstance(v, torch.Tensor):
            yield from (s for s in v.shape if isinstance(s, torch.SymInt))


def symbols_of(values) -> set:
    out = set()
    for v in _scalars(values):
        out |= v.node.expr.free_symbols
    return out


def shape_env_of(values):
    for v in _scalars(values):
        return v.node.shape_env
    return None


def size_hints(shape_env) -> dict:
    """Symbol -> the size seen when tracing (``backed_var_to_val`` in newer torch)."""
    if shape_env is None:
        return {}
    hints = getattr(shape_env, "backed_var_to_val", None)
    return hints if hints is not None else shape_env.var_to_val
