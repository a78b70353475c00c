"""``torch.ops.hyper.attention``: the opaque custom op the backend lowers attention to.

Layers under one stem: the fast paths (`cpu.attention_forward`, the Triton launcher in ``triton_attention``)
-> this op with its fake and autograd registrations -> the public `hyper_backend.hyper_attention`.

Integer parameters equal to ``UNSET`` (-1) are resolved here, at run time, for the call's actual length: the
autotuner's cache entry if ``tune_cache`` names one that matches, else the `HyperConfig` default. So one
compiled graph serves every sequence length. No Triton is imported until a Triton path runs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from hyper_backend.config import AUTO_DEPTH, UNSET, HyperConfig, kernel_choice

from . import cpu
from .cpu import Params

_DEFAULTS = HyperConfig()
_FIELDS = ("block_size", "sample_size", "lsh_num_projs", "min_seq_len", "causal_depth", "seed")

# calls per path since import; tests and `explain` read it
call_counts = {"hyper": 0, "exact": 0, "backward": 0}
# while a list (set by `hyper_backend.explain`), every tuned lookup appends what it looked up
tuning_lookups = None


def resolve_params(query: Tensor, key: Tensor, is_causal: bool, given: Tuple[int, ...], tune_cache: str) -> Params:
    """Explicit values win; then the tuned entry for this (device, dtype, head dim, causal, length); then defaults."""
    values = dict(zip(_FIELDS, given))
    tuned = None
    if tune_cache and any(v == UNSET for v in values.values()):
        from hyper_backend.autotune.cache import lookup_tuned

        where = dict(device=query.device, dtype=query.dtype, head_dim=query.shape[-1], causal=is_causal,
                     seq_len=max(query.shape[2], key.shape[2]))
        tuned = lookup_tuned(tune_cache, **where)
        if tuning_lookups is not None:
            tuning_lookups.append((tune_cache, where))
    out = {}
    for name, value in values.items():
        if value == UNSET and tuned is not None and name in tuned:
            value = tuned[name]
            value = AUTO_DEPTH if value is None else value
        if value == UNSET:
            default = getattr(_DEFAULTS, name)
            value = AUTO_DEPTH if default is None else default
        out[name] = None if (name == "causal_depth" and value == AUTO_DEPTH) else int(value)
    return Params(out["block_size"], out["sample_size"], out["lsh_num_projs"], out["min_seq_len"],
                  out["causal_depth"], out["seed"])


def _path(query: Tensor):
    choice = kernel_choice()
    if choice == "triton" or (choice == "auto" and query.is_cuda):
        from . import triton_attention

        return triton_attention
    return cpu


def _is_hyper(query, key, is_causal, p: Params) -> bool:
    nq, nk = query.shape[2], key.shape[2]
    if is_causal:
        return cpu.causal_uses_hyper(nq, p) or (nk > nq and cpu._use_hyper(nq, nk - nq, p))
    return cpu._use_hyper(nq, nk, p)


def _check(query, key, value, is_causal):
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError("hyper::attention takes [B, H, N, D] query, key and value")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of key/value heads ({key.shape[1]})")
    if is_causal and query.shape[2] > key.shape[2]:
        raise ValueError("causal hyper::attention needs n_q <= n_k (it aligns the diagonal bottom-right)")


def _pad_last(x: Tensor, size: int) -> Tensor:
    return x if x.shape[-1] == size else torch.nn.functional.pad(x, (0, size - x.shape[-1]))


def _common_head_dim(query, key, value, scale):
    """aten's CPU kernel needs one head dim: zero-pad the narrower side (exact: zero columns add nothing to
    q.k, and zero value columns are sliced off). Returns padded q, k, v, the explicit scale and the width."""
    d, dv = query.shape[-1], value.shape[-1]
    scale = d**-0.5 if scale is None else scale
    width = max(d, dv)
    return _pad_last(query, width), _pad_last(key, width), _pad_last(value, width), scale, width


@torch.library.custom_op("hyper::attention", mutates_args=())
def attention(
    query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor], is_causal: bool,
    scale: Optional[float], block_size: int, sample_size: int, lsh_num_projs: int, min_seq_len: int,
    causal_depth: int, seed: int, tune_cache: str,
) -> Tuple[Tensor, Tensor]:
    _check(query, key, value, is_causal)
    p = resolve_params(query, key, is_causal, (block_size, sample_size, lsh_num_projs, min_seq_len, causal_depth,
                                               seed), tune_cache)
    call_counts["hyper" if _is_hyper(query, key, is_causal, p) else "exact"] += 1
    dv = value.shape[-1]
    if query.shape[-1] != dv:
        query, key, value, scale, _ = _common_head_dim(query, key, value, scale)
    out, lse = _path(query).attention_forward(query, key, value, key_padding_mask, is_causal, scale, p)
    return out[..., :dv].contiguous(), lse.contiguous()


@attention.register_fake
def _(query, key, value, key_padding_mask, is_causal, scale, block_size, sample_size, lsh_num_projs, min_seq_len,
      causal_depth, seed, tune_cache):
    B, H, N, _ = query.shape
    out = query.new_empty(B, H, N, value.shape[-1])
    lse = query.new_empty(B, H, N, dtype=cpu.lse_dtype(query.dtype))
    return out, lse


@torch.library.custom_op("hyper::attention_backward", mutates_args=())
def attention_backward(
    grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
    key_padding_mask: Optional[Tensor], is_causal: bool, scale: Optional[float], block_size: int,
    sample_size: int, lsh_num_projs: int, min_seq_len: int, causal_depth: int, seed: int, tune_cache: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    p = resolve_params(query, key, is_causal, (block_size, sample_size, lsh_num_projs, min_seq_len, causal_depth,
                                               seed), tune_cache)
    call_counts["backward"] += 1
    d, d_v = query.shape[-1], value.shape[-1]
    q, k, v = query, key, value
    if d != d_v:
        q, k, v, scale, width = _common_head_dim(query, key, value, scale)
        grad_out, out = _pad_last(grad_out, width), _pad_last(out, width)
    dq, dk, dv = _path(q).attention_backward(grad_out, q, k, v, out, lse, key_padding_mask, is_causal, scale, p)
    return (dq[..., :d].to(query.dtype).contiguous(), dk[..., :d].to(key.dtype).contiguous(),
            dv[..., :d_v].to(value.dtype).contiguous())


@attention_backward.register_fake
def _(grad_out, query, key, value, out, lse, key_padding_mask, is_causal, scale, *args):
    return (torch.empty_like(query, memory_format=torch.contiguous_format),
            torch.empty_like(key, memory_format=torch.contiguous_format),
            torch.empty_like(value, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    query, key, value, key_padding_mask, is_causal, scale, *params = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse)
    ctx.key_padding_mask = key_padding_mask
    ctx.is_causal, ctx.scale, ctx.params = is_causal, scale, params
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    query, key, value, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.hyper.attention_backward(
        grad_out, query, key, value, out, lse, ctx.key_padding_mask, ctx.is_causal, ctx.scale, *ctx.params)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)
