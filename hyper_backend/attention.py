"""`hyper_attention`: a drop-in for ``F.scaled_dot_product_attention`` that runs HyperAttention where it applies."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from hyper_backend.config import HyperConfig, OpSettings
from hyper_backend.kernels import op as _op  # noqa: F401  (registers torch.ops.hyper.*)


def key_padding_mask(attn_mask: Tensor | None, batch: int, n_k: int) -> Tensor | None:
    """``[B, Nk]`` bool if ``attn_mask`` is a boolean key-padding mask broadcastable to ``[B, 1, 1, Nk]``, else None."""
    if attn_mask is None or attn_mask.dtype != torch.bool or attn_mask.dim() > 4:
        return None
    shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    if shape[1] != 1 or shape[2] != 1 or shape[3] != n_k or shape[0] not in (1, batch):
        return None
    return attn_mask.reshape(shape[0], n_k).expand(batch, n_k)


def hyper_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    config: HyperConfig | None = None,
    return_lse: bool = False,
):
    """HyperAttention with the signature of ``torch.nn.functional.scaled_dot_product_attention``.

    Args:
        query: ``[B, Hq, Nq, D]``.
        key: ``[B, Hkv, Nk, D]``; ``Hkv`` may divide ``Hq`` when ``enable_gqa=True``.
        value: ``[B, Hkv, Nk, Dv]``.
        attn_mask: None, or a boolean key-padding mask broadcastable to ``[B, 1, 1, Nk]`` (True = attend).
            Any other mask gives exact attention.
        dropout_p: anything above 0 gives exact attention (with dropout).
        is_causal: causal attention, which may be combined with a key-padding mask. With ``Nq < Nk`` the
            diagonal is aligned bottom-right (as when a KV cache is continued), unlike SDPA's top-left;
            ``Nq > Nk`` falls back to exact SDPA and its top-left alignment.
        scale: defaults to ``1 / sqrt(D)``.
        enable_gqa: as in SDPA.
        config: a `HyperConfig`; every field is then explicit. ``None`` resolves each field as the backend does:
            its ``HYPER_*`` variable if set, else the autotuner's cache entry for the actual length, else the
            default.
        return_lse: also return the ``[B, Hq, Nq]`` log-sum-exp of the (weighted) scores: float32, or float64
            for float64 inputs. It carries no gradient.

    Returns:
        ``out [B, Hq, Nq, Dv]``, or ``(out, lse)`` with ``return_lse=True``.

    Attention is exact below ``min_seq_len``, and wherever the approximation cannot serve the call as written.
    """
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            f"hyper_attention takes [B, H, N, D] tensors, got query {tuple(query.shape)}, "
            f"key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    B, Hq, Nq, _ = query.shape
    Hkv, Nk = key.shape[1], key.shape[2]
    if Hq != Hkv and not (enable_gqa and Hkv and Hq % Hkv == 0):
        raise ValueError(f"query has {Hq} heads and key/value {Hkv}: pass enable_gqa=True with Hq a multiple of Hkv")
    _op.check_inputs(query, key, value, None, False, where="hyper_attention")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p <= 1.0):  # NaN fails both comparisons
        raise ValueError(f"hyper_attention: dropout_p must be a probability in [0, 1], got {dropout_p!r}")
    if any(torch.autograd.forward_ad.unpack_dual(x).tangent is not None for x in (query, key, value)):
        raise NotImplementedError(
            "hyper_attention has no forward-mode AD (jvp) formula; use reverse mode (backward / torch.func.vjp / grad)"
        )
    kpm = key_padding_mask(attn_mask, B, Nk)
    if dropout_p > 0.0 or (attn_mask is not None and kpm is None) or (is_causal and Nq > Nk):
        return _exact(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse)
    settings = _call_settings(query, is_causal, config)
    out, lse = torch.ops.hyper.attention(query, key, value, kpm, is_causal, scale, settings.encode())
    return (out, lse) if return_lse else out


def _call_settings(query: Tensor, is_causal: bool, config: HyperConfig | None) -> OpSettings:
    """The backend's rule, applied now: an explicit ``config`` (every field), else the ``HYPER_*`` fields over the
    tuning cache's entries for this device, dtype, head dim and causality over the defaults; the kernel choice and
    the bookkeeping threads from ``HYPER_KERNELS`` / ``HYPER_SERIAL_BOOKKEEPING``."""
    from hyper_backend.settings import resolve_settings

    s = resolve_settings()
    if config is not None:
        return OpSettings.of(config, kernels=s.kernels, serial_bookkeeping=s.serial_bookkeeping)
    return s.op_settings(device=query.device, dtype=query.dtype, head_dim=query.shape[-1], causal=is_causal)


def window_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    window: tuple[int, int],
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Exact attention to a band of keys (sliding-window attention) at O(n w): ``torch.ops.hyper.window_attention``.

    Args:
        query: ``[B, Hq, Nq, D]``.
        key: ``[B, Hkv, Nk, D]``, with ``Hq`` a multiple of ``Hkv`` (GQA needs no flag).
        value: ``[B, Hkv, Nk, Dv]``.
        window: ``(left, right)``, both >= 0: query i attends key j iff ``-left <= j - i - (Nk - Nq) <= right``
            (bottom-right aligned, like `hyper_attention`'s causal). ``(w - 1, 0)`` is a causal sliding window of
            w keys (HF ``sliding_window=w``), ``(w, w)`` a symmetric band, ``(Nk, 0)`` plain causal; values
            >= Nk are unbounded.
        key_padding_mask: ``[B, Nk]`` bool (True = attend), or None.
        scale: defaults to ``1 / sqrt(D)``.

    Returns:
        ``out [B, Hq, Nq, Dv]``, contiguous. A query row with no allowed key gets zeros (and no gradient).
    """
    from hyper_backend.settings import resolve_settings

    if len(window) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in window):
        raise TypeError(f"window_attention: window must be two ints (left, right), got {window!r}")
    left, right = (min(x, _UNBOUNDED) for x in window)  # a side past every key reaches every key (the op's int64)
    s = resolve_settings()
    return torch.ops.hyper.window_attention(
        query, key, value, key_padding_mask, left, right, scale, s.kernels, s.serial_bookkeeping
    )[0]


_UNBOUNDED = 1 << 62


def _exact(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse):
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
    )
    if not return_lse:
        return out
    if dropout_p > 0.0:
        raise ValueError("return_lse=True is not defined with dropout")
    # The log-sum-exp of the exact fallback, written out (this path is O(Nq * Nk) anyway).
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, 1) if group > 1 else key
    wide = torch.float64 if query.dtype == torch.float64 else torch.float32
    s = (query.to(wide) @ k.to(wide).transpose(-1, -2)) * (
        scale if scale is not None else 1 / math.sqrt(query.shape[-1])
    )
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.float()
    lse = torch.logsumexp(s, -1).detach()
    return out, lse.double() if query.dtype == torch.float64 else lse
