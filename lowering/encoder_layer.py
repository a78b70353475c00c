"""``nn.TransformerEncoderLayer``'s eval-mode fast path, ``torch._transformer_encoder_layer_fwd``, decomposed.

Its layer norms (``norm_first`` or not), residuals, ReLU/GELU feed-forward, and its attention as `mha` with the
native op's mask convention (a mask is converted to bool, True = masked, whatever its dtype; mask types 0
``[L, S]``, 1 ``[B, S]``, 2 ``[B, H, L, S]``), around one SDPA node.
"""

from __future__ import annotations

import operator

import torch.fx as fx
import torch.nn.functional as F

from .builder import Builder, Unsupported, bind, const
from .graph import tensor_of
from .mha import native_mha_sdpa

_ENCODER_PARAMS = (
    "src",
    "embed_dim",
    "num_heads",
    "qkv_weight",
    "qkv_bias",
    "proj_weight",
    "proj_bias",
    "use_gelu",
    "norm_first",
    "eps",
    "norm_weight_1",
    "norm_bias_1",
    "norm_weight_2",
    "norm_bias_2",
    "ffn_weight_1",
    "ffn_bias_1",
    "ffn_weight_2",
    "ffn_bias_2",
    "mask",
    "mask_type",
)


def encoder_layer_sdpa(b: Builder, node: fx.Node) -> tuple[fx.Node, fx.Node, str]:
    """``torch._transformer_encoder_layer_fwd`` decomposed (aten ``transformer_encoder_layer_forward``)."""
    a = bind(node, _ENCODER_PARAMS, {"mask": None, "mask_type": None})
    E, eps = const(a, "embed_dim", (int,)), const(a, "eps", (int, float))
    norm_first, use_gelu = const(a, "norm_first"), const(a, "use_gelu")
    src = a["src"]
    if tensor_of(src) is None or tensor_of(src).dim() != 3:
        raise Unsupported("the encoder layer's input is not [B, L, E]")

    def norm(x, t):
        return b.fn(F.layer_norm, x, (E,), a[f"norm_weight_{t}"], a[f"norm_bias_{t}"], eps)

    x = norm(src, 1) if norm_first else src
    sdpa, x = native_mha_sdpa(
        b,
        x,
        {
            "embed_dim": E,
            "num_head": a["num_heads"],
            "qkv_weight": a["qkv_weight"],
            "qkv_bias": a["qkv_bias"],
            "proj_weight": a["proj_weight"],
            "proj_bias": a["proj_bias"],
            "mask": a["mask"],
            "mask_type": a["mask_type"],
        },
    )
    x = b.fn(operator.add, x, src)
    if not norm_first:
        x = norm(x, 1)
    pre = x
    if norm_first:
        x = norm(x, 2)
    x = b.fn(F.linear, x, a["ffn_weight_1"], a["ffn_bias_1"])
    x = b.fn(F.gelu, x) if use_gelu else b.fn(F.relu, x)
    x = b.fn(F.linear, x, a["ffn_weight_2"], a["ffn_bias_2"])
    x = b.fn(operator.add, x, pre)
    if not norm_first:
        x = norm(x, 2)
    return sdpa, x, ""
