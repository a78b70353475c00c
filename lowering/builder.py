"""What the canonical forms share: emitting nodes with fake values, binding call arguments, and the refusal.

The families (`einsum`, `mha`, `encoder_layer`) rewrite a site on the Dynamo graph into projections around one
SDPA node; `canonical` runs them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .graph import meta_val

SDPA = torch._C._nn.scaled_dot_product_attention


class Unsupported(Exception):
    """The site is not the computation a canonical form expresses; the message is the site's reason."""


class Builder:
    """Creates nodes before ``anchor``, each with its ``example_value`` computed on the graph's fake tensors."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node, like: fx.Node):
        self.graph, self.anchor, self.like = graph, anchor, like
        self.created: list[fx.Node] = []
        self.fake_mode = next(
            (
                v.fake_mode
                for v in map(meta_val, graph.nodes)
                if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode")
            ),
            None,
        )
        if self.fake_mode is None:
            raise Unsupported("the graph has no fake values")

    def _make(self, op: str, target, args, kwargs) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.create_node(op, target, tuple(args), dict(kwargs))
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in self.like.meta:
                node.meta[key] = self.like.meta[key]
        fargs = fx.node.map_arg(tuple(args), meta_val)
        fkwargs = fx.node.map_arg(dict(kwargs), meta_val)
        with self.fake_mode:
            if op == "call_function":
                value = target(*fargs, **fkwargs)
            else:
                value = getattr(fargs[0], target)(*fargs[1:], **fkwargs)
        node.meta["example_value"] = value
        self.created.append(node)
        return node

    def fn(self, target, *args, **kwargs) -> fx.Node:
        return self._make("call_function", target, args, kwargs)

    def method(self, name: str, *args, **kwargs) -> fx.Node:
        return self._make("call_method", name, args, kwargs)

    def discard(self) -> None:
        for node in reversed(self.created):
            if not node.users:
                self.graph.erase_node(node)
        self.created = []


def same(a, b) -> bool:
    """Sizes ``a == b``: proven, or, for symbolic sizes (``dynamic=True`` makes every dim symbolic, the embedding
    dim too), decided on the sizes seen under a guard. Used only where the original computation requires the
    equality (it fails otherwise), so the guard specialises nothing that could run."""
    if statically_known_true(a == b):
        return True
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return bool(a == b)
    return False


def bind(node: fx.Node, names: Sequence[str], defaults: dict) -> dict:
    """The call's arguments by name."""
    out = dict(defaults)
    out.update(zip(names, node.args))
    out.update(node.kwargs)
    return out


def const(a: dict, name: str, types=(bool, int, float)):
    """Argument ``name`` of a bound call, which must be a compile-time constant of ``types``."""
    v = a.get(name)
    if isinstance(v, fx.Node) or (v is not None and not isinstance(v, types)):
        raise Unsupported(f"{name} is not a compile-time constant")
    return v
