"""The ``nn.MultiheadAttention`` family, rewritten on the Dynamo graph into projections around one SDPA node.

``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` and the Transformer layers run under
``torch.compile`` in every mode: torch 2.13 keeps it as one node in the Dynamo graph, and the module's native fast
path is not taken while Dynamo traces), and ``torch._native_multi_head_attention`` called directly: the same input
projections, an SDPA call with the masks merged as the function merges them, and the output projection.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from .builder import SDPA, Builder, Unsupported, bind, const, same
from .graph import is_call, is_method, tensor_of
from .sdpa import zero_or_masked

_MHA_PARAMS = (
    "query",
    "key",
    "value",
    "embed_dim_to_check",
    "num_heads",
    "in_proj_weight",
    "in_proj_bias",
    "bias_k",
    "bias_v",
    "add_zero_attn",
    "dropout_p",
    "out_proj_weight",
    "out_proj_bias",
    "training",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "use_separate_proj_weight",
    "q_proj_weight",
    "k_proj_weight",
    "v_proj_weight",
    "static_k",
    "static_v",
    "average_attn_weights",
    "is_causal",
)
_MHA_DEFAULTS = {
    "training": True,
    "key_padding_mask": None,
    "need_weights": True,
    "attn_mask": None,
    "use_separate_proj_weight": False,
    "q_proj_weight": None,
    "k_proj_weight": None,
    "v_proj_weight": None,
    "static_k": None,
    "static_v": None,
    "average_attn_weights": True,
    "is_causal": False,
}
_NATIVE_PARAMS = (
    "query",
    "key",
    "value",
    "embed_dim",
    "num_head",
    "qkv_weight",
    "qkv_bias",
    "proj_weight",
    "proj_bias",
    "mask",
    "need_weights",
    "average_attn_weights",
    "mask_type",
)


def _check_users(node: fx.Node, need_weights) -> None:
    if any(not is_call(u, operator.getitem) or u.args[0] is not node for u in node.users):
        raise Unsupported("the result is used other than by indexing")
    if need_weights and any(u.args[1] != 0 for u in node.users):
        raise Unsupported("attention weights are returned")


def _pure(b: Builder, n: fx.Node, hops: int = 6) -> fx.Node:
    """``n``, with ``F._canonical_mask``'s in-place ``zeros_like(m).masked_fill_(m, -inf)`` (through views)
    re-emitted out of place, so the mask proofs can evaluate it (they never evaluate a value changed in place).
    Same values: the zeros are fresh and used by nothing else."""
    if hops and is_method(n, "view", "expand", "reshape", "unsqueeze", "contiguous") and isinstance(n.args[0], fx.Node):
        inner = _pure(b, n.args[0], hops - 1)
        return n if inner is n.args[0] else b.method(n.target, inner, *n.args[1:], **n.kwargs)
    if is_method(n, "masked_fill_") and len(n.args) == 3 and not n.kwargs:
        z = n.args[0]
        if is_call(z, torch.zeros_like, torch.zeros) and len(z.users) == 1:
            return b.method("masked_fill", b.fn(z.target, *z.args, **z.kwargs), *n.args[1:])
    return n


def _float_mask(b: Builder, m: fx.Node, dtype) -> fx.Node:
    """``F._canonical_mask``: a bool mask (True = masked) as an additive float mask; a float one as is."""
    m = _pure(b, m)
    if tensor_of(m).dtype == torch.bool:
        z = b.fn(torch.zeros_like, m, dtype=dtype)
        return b.method("masked_fill", z, m, float("-inf"))
    if not tensor_of(m).is_floating_point():
        raise Unsupported("an integer mask")
    return m


def _projections(b: Builder, a: dict, E: int):
    """q, k, v projected as ``F._in_projection_packed`` / ``F._in_projection`` do (same linear calls)."""
    query, key, value = a["query"], a["key"], a["value"]
    if not a["use_separate_proj_weight"]:
        w, bias = a["in_proj_weight"], a["in_proj_bias"]
        if not isinstance(w, fx.Node):
            raise Unsupported("in_proj_weight is None")
        if key is value and query is key:
            chunks = b.method("chunk", b.fn(F.linear, query, w, bias), 3, -1)
            return tuple(b.fn(operator.getitem, chunks, t) for t in range(3))
        if key is value:
            ws = b.method("split", w, [E, 2 * E])
            bs = b.method("split", bias, [E, 2 * E]) if bias is not None else None
            q = b.fn(F.linear, query, b.fn(operator.getitem, ws, 0), bs and b.fn(operator.getitem, bs, 0))
            kv = b.fn(F.linear, key, b.fn(operator.getitem, ws, 1), bs and b.fn(operator.getitem, bs, 1))
            kv = b.method("chunk", kv, 2, -1)
            return q, b.fn(operator.getitem, kv, 0), b.fn(operator.getitem, kv, 1)
        ws = b.method("chunk", w, 3)
        bs = b.method("chunk", bias, 3) if bias is not None else None
        return tuple(
            b.fn(F.linear, x, b.fn(operator.getitem, ws, t), bs and b.fn(operator.getitem, bs, t))
            for t, x in enumerate((query, key, value))
        )
    ws = [a[f"{x}_proj_weight"] for x in "qkv"]
    if not all(isinstance(w, fx.Node) for w in ws):
        raise Unsupported("use_separate_proj_weight without q/k/v_proj_weight")
    bias = a["in_proj_bias"]
    bs = b.method("chunk", bias, 3) if bias is not None else None
    return tuple(
        b.fn(F.linear, x, w, bs and b.fn(operator.getitem, bs, t))
        for t, (x, w) in enumerate(zip((a["query"], a["key"], a["value"]), ws))
    )


def _heads(b: Builder, x: fx.Node, H: int, D: int) -> fx.Node:
    """``[L, B, H*D]`` -> ``[B, H, L, D]``."""
    return b.method("permute", b.method("unflatten", x, -1, (H, D)), 1, 2, 0, 3)


def mha_sdpa(b: Builder, node: fx.Node) -> tuple[fx.Node, fx.Node, str]:
    """``F.multi_head_attention_forward`` as projections + SDPA + output projection (need_weights=False's path);
    ``(sdpa node, attention output node, description)``. Raises `Unsupported`."""
    a = bind(node, _MHA_PARAMS, _MHA_DEFAULTS)
    for name in ("bias_k", "bias_v", "static_k", "static_v"):
        if a.get(name) is not None:
            raise Unsupported(f"{name} is set (add_bias_kv / static keys)" if "bias" in name else f"{name} is set")
    if const(a, "add_zero_attn"):
        raise Unsupported("add_zero_attn=True")
    need_weights = const(a, "need_weights")
    training, is_causal = const(a, "training"), const(a, "is_causal")
    dropout_p = const(a, "dropout_p", (int, float))
    _check_users(node, need_weights)
    H = const(a, "num_heads", (int,))
    E = const(a, "embed_dim_to_check", (int,))
    tq, tk, tv = tensor_of(a["query"]), tensor_of(a["key"]), tensor_of(a["value"])
    if tq is None or tk is None or tv is None:
        raise Unsupported("query/key/value are not tensors")
    if tq.dim() not in (2, 3) or tk.dim() != tq.dim() or tv.dim() != tq.dim():
        raise Unsupported("query/key/value are not [L, B, E] (or unbatched [L, E])")
    if not same(tq.shape[-1], E) or E % H:
        raise Unsupported("embed_dim does not match the query")
    D = E // H
    batched = tq.dim() == 3
    query, key, value = a["query"], a["key"], a["value"]
    kpm, mask = a["key_padding_mask"], a["attn_mask"]
    if not batched:  # F.mha unsqueezes the batch dim
        same_kv, same_qk = key is value, query is key
        query = b.method("unsqueeze", query, 1)
        key = query if same_qk else b.method("unsqueeze", key, 1)
        value = key if same_kv else b.method("unsqueeze", value, 1)
        if kpm is not None:
            kpm = b.method("unsqueeze", kpm, 0)
        a = {**a, "query": query, "key": key, "value": value}
    L, B = tensor_of(query).shape[0], tensor_of(query).shape[1]
    S = tensor_of(key).shape[0]
    dtype = tq.dtype
    if kpm is not None:
        kv = tensor_of(kpm)
        if kv.dim() != 2 or not (same(kv.shape[0], B) and same(kv.shape[1], S)):
            raise Unsupported("key_padding_mask is not [B, S]")
        kpm = _float_mask(b, kpm, dtype)
    causal = False
    if is_causal and mask is None:
        raise Unsupported("is_causal without attn_mask (F.multi_head_attention_forward raises)")
    if is_causal and kpm is None and not need_weights:
        mask, causal = None, True  # F.mha drops the mask and passes is_causal to SDPA
    elif mask is not None:
        mv = tensor_of(mask)
        if mv.dim() == 2:
            if not (same(mv.shape[0], L) and same(mv.shape[1], S)):
                raise Unsupported("attn_mask is not [L, S]")
            mask = b.method("unsqueeze", b.method("unsqueeze", _float_mask(b, mask, dtype), 0), 0)
        elif mv.dim() == 3:
            if not (same(mv.shape[0], B * H) and same(mv.shape[1], L) and same(mv.shape[2], S)):
                raise Unsupported("attn_mask is not [B*H, L, S]")
            mask = b.method("unflatten", _float_mask(b, mask, dtype), 0, (-1, H))
        else:
            raise Unsupported("attn_mask is not 2-D or 3-D")
    if kpm is not None:
        k4 = b.method("unsqueeze", b.method("unsqueeze", kpm, 1), 1)  # [B, 1, 1, S]
        mask = k4 if mask is None else b.fn(operator.add, mask, k4)
    if not training:
        dropout_p = 0.0
    q, k, v = _projections(b, a, E)
    kwargs = {"attn_mask": mask, "dropout_p": float(dropout_p), "is_causal": causal}
    sdpa = b.fn(SDPA, _heads(b, q, H, D), _heads(b, k, H, D), _heads(b, v, H, D), **kwargs)
    out = b.method("flatten", b.method("permute", sdpa, 2, 0, 1, 3), -2)  # [L, B, E]
    out = b.fn(F.linear, out, a["out_proj_weight"], a["out_proj_bias"])
    if not batched:
        out = b.method("squeeze", out, 1)
    return sdpa, out, "need_weights=True, weights unused" if need_weights else ""


def _native_keep_mask(b: Builder, mask: fx.Node | None, mask_type, B, H, L, S) -> fx.Node | None:
    """The native op's mask (any dtype, converted to bool, True = masked) as an SDPA bool keep mask.

    A merged ``attn + key_padding`` float mask (mask type 2, `nn.MultiheadAttention.merge_masks`) whose padding
    part is ``zeros.masked_fill(bool, -inf)`` is split into ``~attn.bool() & ~padding.bool()``: with one addend
    in {0, -inf}, ``(a + b) != 0`` is ``a != 0 or b != 0`` (NaN included), so the split is exact."""
    if mask is None:
        return None
    mv = tensor_of(mask)
    mask = _pure(b, mask)
    if mask_type == 1:
        if mv.dim() != 2 or not (same(mv.shape[0], B) and same(mv.shape[1], S)):
            raise Unsupported("mask type 1 (key padding) is not [B, S]")
        keep = b.fn(operator.invert, b.method("bool", mask))
        return b.method("unsqueeze", b.method("unsqueeze", keep, 1), 1)
    if mask_type == 0:
        if mv.dim() != 2 or not (same(mv.shape[0], L) and same(mv.shape[1], S)):
            raise Unsupported("mask type 0 is not [L, S]")
        return b.fn(operator.invert, b.method("bool", mask))
    if mask_type != 2:
        raise Unsupported(f"mask_type={mask_type}")
    if mv.dim() != 4:
        raise Unsupported("mask type 2 is not [B, H, L, S]")
    terms = [mask]
    if (
        is_call(mask, operator.add)
        and all(isinstance(t, fx.Node) for t in mask.args)
        and any(zero_or_masked(t) for t in mask.args)
    ):
        terms = list(mask.args)
    keep = None
    for t in terms:
        while is_method(t, "expand"):  # SDPA broadcasts: the AND of the unexpanded terms is the same mask
            t = t.args[0]
        t = _pure(b, t)
        k = b.fn(operator.invert, b.method("bool", t))
        keep = k if keep is None else b.fn(operator.and_, keep, k)
    return keep


def native_mha_sdpa(b: Builder, x: fx.Node, a: dict) -> tuple[fx.Node, fx.Node]:
    """``torch._native_multi_head_attention(x, x, x, ..., need_weights=False)`` on batch-first ``x [B, L, E]``:
    ``(sdpa node, output node)``."""
    E, H = const(a, "embed_dim", (int,)), const(a, "num_head", (int,))
    tx = tensor_of(x)
    if tx is None or tx.dim() != 3 or not same(tx.shape[-1], E) or E % H:
        raise Unsupported("the native attention's input is not [B, L, E]")
    D = E // H
    B, L = tx.shape[0], tx.shape[1]
    keep = _native_keep_mask(b, a.get("mask"), const(a, "mask_type", (int,)), B, H, L, L)
    proj = b.fn(F.linear, x, a["qkv_weight"], a["qkv_bias"])
    chunks = b.method("chunk", proj, 3, -1)
    q, k, v = (
        b.method("transpose", b.method("unflatten", b.fn(operator.getitem, chunks, t), -1, (H, D)), 1, 2)
        for t in range(3)
    )
    sdpa = b.fn(SDPA, q, k, v, attn_mask=keep)
    out = b.method("flatten", b.method("transpose", sdpa, 1, 2), -2)  # [B, L, E]
    return sdpa, b.fn(F.linear, out, a["proj_weight"], a["proj_bias"])


def native_sdpa(b: Builder, node: fx.Node) -> tuple[fx.Node, fx.Node, str]:
    a = bind(
        node, _NATIVE_PARAMS, {"mask": None, "need_weights": True, "average_attn_weights": True, "mask_type": None}
    )
    if not (a["query"] is a["key"] is a["value"]):
        raise Unsupported("torch._native_multi_head_attention with distinct query/key/value")
    _check_users(node, const(a, "need_weights"))
    sdpa, out = native_mha_sdpa(b, a["query"], a)
    return sdpa, out, ""
