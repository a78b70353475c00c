"""Dynamo-level lowering of ``F.scaled_dot_product_attention`` calls to ``torch.ops.hyper.attention``.

In the Dynamo graph an SDPA call is one node with its arguments as written; after AOTAutograd it is a
device-specific aten op with ``enable_gqa`` gone and bool masks turned into ``where``. So SDPA is rewritten
here, before the graph is handed to the inner backend.

A call is lowered when the op computes exactly what SDPA would, up to the approximation:

- ``q, k, v`` are ``[B, H, N, D]`` (the value head dim may differ);
- ``dropout_p`` is 0 (HF models pass 0.0 in eval mode). A symbolic float (``dynamic=True`` makes float
  attributes symbolic) is decided on its value, under a guard;
- ``scale`` is None, a number, or a symbolic float (``dynamic=True`` makes float attributes symbolic): that
  one is multiplied into q and the op gets scale 1;
- q, k and v have one batch size (a K/V broadcast over the batch stays exact);
- ``attn_mask`` is None, or a bool mask that is an AND of key-padding terms broadcastable to ``[B, 1, 1, Nk]``
  (bool tensors, passed as the op's ``[B, Nk]`` key_padding_mask; a cast to bool such as ``am.bool()`` is a term
  of its own, never looked through) and of input-free terms that `masks.Prover` proves all-True, causal or
  banded (HF's padded causal mask is exactly that); a float mask if proven all-zero, causal or banded, or if it
  is such a mask plus key-padding terms built from bool masks (``zeros.masked_fill(m, -inf)``, as
  ``nn.MultiheadAttention`` builds them; `_plan_float_mask`);
- ``is_causal=True`` only with ``Nq == Nk`` provably: SDPA aligns the diagonal top-left, the op bottom-right,
  and the two agree only when the lengths are equal (``Nq != Nk`` stays exact); a mask proven causal or banded
  is bottom-right by construction and must leave no query without a key (`masks.Verdict.rows_reason`).

A band runs the exact ``hyper::window_attention`` whatever ``layers`` says (`sites.Policy.layers_reason`).
Anything else stays an SDPA call, and the site's reason says why.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from hyper_backend.kernels import op as _op  # noqa: F401  (registers torch.ops.hyper.attention)

from . import masks
from .graph import ancestors, input_free, meta_val, mutated
from .sites import Policy, Site

_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
_MASK_PASSTHROUGH_METHODS = ("expand", "contiguous", "bool", "to", "expand_as")  # looked through when dtype-preserving


def key_padding(batch_like: torch.Tensor, *terms: torch.Tensor) -> torch.Tensor:
    """AND of bool terms broadcastable to ``[B, 1, 1, Nk]`` as one ``[B, Nk]`` bool key-padding mask.

    A float term is an additive one proven to hold only 0 and -inf-like values (`zero_or_masked`): it keeps
    where it is 0.

    ``batch_like`` is a ``[B, ...]`` tensor (the query) giving B. Each term's shape was proven at compile time.
    """
    out = None
    for t in terms:
        t = t.reshape(t.shape[0] if t.dim() == 4 else 1, t.shape[-1])
        t = t == 0 if t.is_floating_point() else t.to(torch.bool)  # an additive term (0 / -inf) keeps at 0
        t = t.expand(batch_like.shape[0], t.shape[-1])
        out = t if out is None else out & t
    return out.contiguous()


def sdpa_args(node: fx.Node) -> dict:
    out = dict(_SDPA_DEFAULTS)
    out.update(zip(_SDPA_PARAMS, node.args))
    out.update(node.kwargs)
    return out


def _eq(a, b) -> bool:
    return statically_known_true(a == b)


def _mask_terms(mask: fx.Node) -> list[fx.Node]:
    """Split a bool mask into its AND terms, looking through expand / contiguous and casts of a bool tensor to
    bool. A cast that changes the dtype (``am.bool()`` of a float 0/1 mask) is a term: its values are the
    cast's, not the float tensor's."""
    n = mask
    while (
        n.op == "call_method"
        and n.target in _MASK_PASSTHROUGH_METHODS
        and isinstance(n.args[0], fx.Node)
        and getattr(meta_val(n.args[0]), "dtype", None) == torch.bool
    ):
        n = n.args[0]
    if (
        n.op == "call_function"
        and n.target in (operator.and_, torch.logical_and, torch.bitwise_and)
        and all(isinstance(a, fx.Node) for a in n.args[:2])
    ):
        return _mask_terms(n.args[0]) + _mask_terms(n.args[1])
    return [n]


def _padding_shape_ok(term: fx.Node, batch, n_k) -> bool:
    v = meta_val(term)
    if not isinstance(v, torch.Tensor) or v.dim() > 4 or v.dim() == 0:
        return False
    shape = (1,) * (4 - v.dim()) + tuple(v.shape)
    return _eq(shape[1], 1) and _eq(shape[2], 1) and _eq(shape[3], n_k) and (_eq(shape[0], 1) or _eq(shape[0], batch))


# float masks ----------------------------------------------------------------------------------------------

_ADD_TARGETS = (operator.add, torch.add)
_FLOAT_PASSTHROUGH_METHODS = ("expand", "contiguous", "expand_as")  # shape-only: SDPA broadcasts
_VIEW_METHODS = ("view", "reshape", "unsqueeze", "expand", "contiguous", "expand_as")


def _additive_terms(mask: fx.Node) -> list[fx.Node]:
    """Split a float mask into its addends, looking through expand / contiguous."""
    n = mask
    while n.op == "call_method" and n.target in _FLOAT_PASSTHROUGH_METHODS:
        n = n.args[0]
    is_add = (n.op == "call_function" and n.target in _ADD_TARGETS) or (
        n.op == "call_method" and n.target in ("add", "__add__")
    )
    if (
        is_add
        and len(n.args) == 2
        and not n.kwargs
        and all(isinstance(a, fx.Node) and isinstance(meta_val(a), torch.Tensor) for a in n.args)
    ):
        return _additive_terms(n.args[0]) + _additive_terms(n.args[1])
    return [n]


def zero_or_masked(n: fx.Node, hops: int = 8) -> bool:
    """``n`` is structurally ``zeros.masked_fill(bool mask, fill)`` with an -inf-like fill, through views,
    indexing and float casts: every value is 0 or masks its key, whatever the bool mask holds. This is how
    ``F._canonical_mask`` (``nn.MultiheadAttention``, the Transformer layers) turns a bool key_padding_mask into
    a float one."""
    for _ in range(hops):  # views, indexing and float casts keep the values in {0, fill}
        if (
            (
                n.op == "call_method"
                and n.target in _VIEW_METHODS + ("to", "float", "half", "bfloat16")
                or n.op == "call_function"
                and n.target is operator.getitem
            )
            and isinstance(meta_val(n), torch.Tensor)
            and meta_val(n).is_floating_point()
        ):
            n = n.args[0]
        else:
            break
    fill = (
        n.op == "call_method"
        and n.target in ("masked_fill", "masked_fill_")
        or (n.op == "call_function" and n.target is torch.masked_fill)
    )
    if not fill or len(n.args) + len(n.kwargs) != 3:
        return False
    args = dict(zip(("self", "mask", "value"), n.args), **n.kwargs)
    zeros, keep, value = args.get("self"), args.get("mask"), args.get("value")
    made_of_zeros = isinstance(zeros, fx.Node) and (
        (zeros.op == "call_function" and zeros.target in (torch.zeros_like, torch.zeros))
        or (zeros.op == "call_method" and zeros.target == "new_zeros")
    )
    kv = meta_val(keep)
    return (
        made_of_zeros
        and isinstance(kv, torch.Tensor)
        and kv.dtype == torch.bool
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and value <= masks.MASKED
    )


def _plan_float_mask(mask: fx.Node, batch, nq, nk, prover: masks.Prover, padding: list[fx.Node]):
    """``(verdict, reason)`` for an additive float mask; key-padding addends are appended to ``padding``.

    An input-free mask is classified as a whole (`masks.classify`). Otherwise it must be a sum whose input-free
    addends classify (the verdict is their AND) and whose other addends are key padding: `zero_or_masked` (0 or
    -inf-like by construction) and broadcastable to ``[B, 1, 1, Nk]``. A float mask read from an input with
    unknown values stays exact."""
    if input_free(mask, prover.constants):
        verdict = prover.classify(mask, "add", nq, nk)
        return verdict, verdict.reason if verdict.kind is None else ""
    shape = masks.Verdict("none")
    for term in _additive_terms(mask):
        if input_free(term, prover.constants):
            verdict = prover.classify(term, "add", nq, nk)
            if verdict.kind is None:
                return verdict, verdict.reason
            shape = shape & verdict  # addends of 0 / -inf: keep where every addend keeps
        elif zero_or_masked(term):
            if not _padding_shape_ok(term, batch, nk):
                return shape, "general mask (a masked_fill(-inf) mask not broadcastable to [B, 1, 1, Nk])"
            padding.append(term)
        else:
            return shape, (
                "mask depends on a tensor input with unknown values (float key padding is lowered "
                "when built as zeros.masked_fill(bool mask, -inf), as nn.MultiheadAttention builds it; "
                "bool masks are lowered too)"
            )
    return shape, ""


class SdpaPlan:
    """What to emit for one SDPA node, or why it stays exact.

    ``window = (left, right)``: the mask is a band (`masks.Verdict`), served exactly by
    ``hyper::window_attention``; otherwise ``hyper::attention`` (``causal`` or not).
    """

    def __init__(
        self,
        reason: str = "",
        padding: tuple[fx.Node, ...] = (),
        causal: bool = False,
        window: tuple[int, int] | None = None,
    ):
        self.reason, self.padding, self.causal, self.window = reason, padding, causal, window


def plan_sdpa(node: fx.Node, prover: masks.Prover) -> SdpaPlan:
    a = sdpa_args(node)
    q, k, v = (meta_val(a[x]) for x in ("query", "key", "value"))
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return SdpaPlan("query/key/value are not [B, H, N, D]")
    if isinstance(a["dropout_p"], fx.Node) and isinstance(meta_val(a["dropout_p"]), torch.SymFloat):
        # dynamic=True makes float attributes symbolic; decide on the value seen, under a guard (a model
        # whose dropout probability changes recompiles)
        a["dropout_p"] = 0.0 if bool(meta_val(a["dropout_p"]) == 0.0) else float(meta_val(a["dropout_p"]))
    for name in ("dropout_p", "is_causal", "enable_gqa"):
        if isinstance(a[name], fx.Node):
            return SdpaPlan(f"{name} is not a compile-time constant")
    if isinstance(a["scale"], fx.Node) and not isinstance(meta_val(a["scale"]), (torch.SymFloat, float)):
        return SdpaPlan("scale is neither a number nor a symbolic float")
    if a["dropout_p"] > 0.0:
        return SdpaPlan(f"dropout_p={a['dropout_p']} (dropout is kept exact)")
    hq, hkv = q.shape[1], k.shape[1]
    if not _eq(hq, hkv) and not a["enable_gqa"]:
        return SdpaPlan("query and key head counts differ without enable_gqa")
    if not _eq(hkv, v.shape[1]):
        return SdpaPlan("key and value head counts differ")
    if not (masks.equal_under_guard(q.shape[0], k.shape[0]) and masks.equal_under_guard(k.shape[0], v.shape[0])):
        return SdpaPlan("q, k and v batch sizes differ (broadcast over the batch)")
    nq, nk, batch = q.shape[2], k.shape[2], q.shape[0]
    causal = bool(a["is_causal"])
    padding: list[fx.Node] = []
    mask = a["attn_mask"]
    if mask is not None:
        if causal:
            return SdpaPlan("attn_mask together with is_causal")
        mval = meta_val(mask)
        if isinstance(mask, fx.Node) and mutated(ancestors(mask, prover.constants)) is not None:
            return SdpaPlan(f"attn_mask: {masks.CHANGED}")
        if not isinstance(mval, torch.Tensor):
            return SdpaPlan("attn_mask is not a tensor")
        if mval.dtype != torch.bool:
            shape, reason = _plan_float_mask(mask, batch, nq, nk, prover, padding)
            if reason:
                return SdpaPlan(f"float attn_mask: {reason}")
        else:
            shape = masks.Verdict("none")
            for term in _mask_terms(mask):
                if input_free(term, prover.constants):
                    verdict = prover.classify(term, "keep", nq, nk, fill=float("-inf"))
                    if verdict.kind is None:
                        return SdpaPlan(f"attn_mask: {verdict.reason}")
                    shape = shape & verdict
                elif meta_val(term).dtype == torch.bool and _padding_shape_ok(term, batch, nk):
                    padding.append(term)
                else:
                    return SdpaPlan(
                        "general attn_mask (read from a tensor input, and not a bool key-padding mask broadcastable to "
                        "[B, 1, 1, Nk]; only registered buffers are compile-time constants)"
                    )
        empty_rows = shape.rows_reason(nq, nk)
        if empty_rows:
            return SdpaPlan(empty_rows)
        if shape.kind == "band":
            return SdpaPlan(padding=tuple(padding), window=shape.window)
        causal = shape.kind == "causal"
    elif causal and not masks.equal_under_guard(nq, nk):
        return SdpaPlan("is_causal with n_q != n_k: SDPA aligns the diagonal top-left, the op bottom-right")
    return SdpaPlan(padding=tuple(padding), causal=causal)


def _emit(graph: fx.Graph, like: fx.Node, target, args, op: str = "call_function") -> fx.Node:
    node = graph.create_node(op, target, args, {})
    for key in ("stack_trace", "nn_module_stack"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    fake_mode = None
    for a in like.all_input_nodes:
        fv = meta_val(a)
        if isinstance(fv, torch.Tensor) and hasattr(fv, "fake_mode"):
            fake_mode = fv.fake_mode
            break
    if fake_mode is not None:
        fake_args = fx.node.map_arg(args, meta_val)
        with fake_mode:
            node.meta["example_value"] = target(*fake_args) if op == "call_function" else None
    return node


def rewrite_sdpa(gm: fx.GraphModule, sites: dict[str, Site], policy: Policy, prover: masks.Prover) -> int:
    """Lower the selected, eligible SDPA sites of ``gm`` in place, and every site whose mask is a band (to the exact
    ``hyper::window_attention``, selected or not); record every decision on its `Site`.

    ``policy`` gives which sites are selected and the trailing arguments of their op calls; ``prover`` the graph's
    mask proofs (shared with `canonical`, so a canonicalised site's mask is proven once). Returns the number of
    rewritten calls.
    """
    done = 0
    graph = gm.graph
    for node in list(graph.nodes):
        site = sites.get(node.name)
        if site is None or site.kind != "sdpa":
            continue
        plan = plan_sdpa(node, prover)
        reason = policy.layers_reason(site, banded=plan.window is not None) or plan.reason
        if reason:
            site.decide("exact", reason)
            continue
        a = sdpa_args(node)
        with graph.inserting_before(node):
            kpm = None
            if plan.padding:
                kpm = _emit(graph, node, key_padding, (a["query"], *plan.padding))
            query, scale = a["query"], a["scale"]
            if isinstance(scale, fx.Node):  # a symbolic float (dynamic=True): fold it into q, op scale 1
                query, scale = _emit(graph, node, operator.mul, (query, scale)), 1.0
            if plan.window is not None:
                call = _emit(
                    graph,
                    node,
                    torch.ops.hyper.window_attention.default,
                    (query, a["key"], a["value"], kpm, *plan.window, scale, *policy.window_args),
                )
            else:
                call = _emit(
                    graph,
                    node,
                    torch.ops.hyper.attention.default,
                    (
                        query,
                        a["key"],
                        a["value"],
                        kpm,
                        plan.causal,
                        scale,
                        *policy.hyper_args(site, meta_val(query), plan.causal),
                    ),
                )
            out = _emit(graph, node, operator.getitem, (call, 0))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        padded = ", key padding" if plan.padding else ""
        if plan.window is not None:
            site.decide(
                "window", masks.Verdict("band", window=plan.window).describe() + padded + " (exact)", kind="window"
            )
        else:
            site.decide("hyper", ("causal" if plan.causal else "non-causal") + padded)
        done += 1
    if done:
        graph.eliminate_dead_code()
        gm.recompile()
    return done
