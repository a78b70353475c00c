"""``torch.ops.hyper.attention``: the opaque custom op the backend lowers attention to.

Layers under one stem: the fast paths (`cpu.attention_forward`, the Triton launcher in ``triton_attention``; for
the ``"topk"`` detector `topk.call_forward` in torch or `triton_topk.call_forward`) -> this op with its fake and
autograd registrations -> the public `hyper_backend.hyper_attention`.

The op is a pure function of its inputs. Its ``settings`` argument (`hyper_backend.config.OpSettings`, resolved at
compile time, or at call time by `hyper_backend.hyper_attention`) holds a config per length bucket, so one
compiled graph serves every sequence length; the op indexes it by the call's actual length and reads no file and
no environment variable. The backward receives the forward's settings. No Triton is imported until a Triton path
runs.

``torch.ops.hyper.window_attention`` (same layers: `cpu.window_forward` / `triton_attention.window_forward` ->
the op -> `hyper_backend.window_attention`) is exact attention to a band of keys, the target for masks proven to
be sliding windows; it never approximates and has no parameters to resolve.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch._dynamo.utils import counters

from hyper_backend.config import HyperConfig, OpSettings

from . import cpu, topk
from .plan import lse_dtype, plan_call

# `counters["hyper"]` counts calls per path ("op_hyper", "op_exact", "op_backward"); `explain` and tests read it.


def path_counts(window: bool = False) -> dict:
    """Calls of the op since import, per path: ``{"hyper": .., "exact": .., "backward": ..}`` (from
    ``torch._dynamo.utils.counters["hyper"]``, which survives ``torch._dynamo.reset()``).

    ``window=True`` adds the calls of ``hyper::window_attention`` (``"window"``) and of its backward
    (``"window_backward"``); they are opt-in so that the three-key dict callers compare against stays as it was."""
    c = counters["hyper"]
    out = {"hyper": c["op_hyper"], "exact": c["op_exact"], "backward": c["op_backward"]}
    if window:
        out.update(window=c["op_window"], window_backward=c["op_window_backward"])
    return out


def fit(p: HyperConfig, n_q: int, n_k: int) -> HyperConfig:
    """Clamp sizes to what a call of ``n_q`` queries on ``n_k`` keys can use, so no setting makes a call
    allocate more than O(n (b + m)), and resolve the detector's defaults (``sample_size=None``: `HyperConfig.draws`).
    Results are unchanged except for ``sample_size > n_k`` (then n_k draws)."""
    n = max(n_q, n_k, 1)
    p = p.replace(
        block_size=min(p.block_size, n),
        sample_size=min(p.draws, max(n_k, 1)),
        sink_keys=min(p.sink_keys, n_k),
        local_window=None if p.local_window is None else min(p.local_window, 2 * n),
    )
    if p.detector != "topk":
        return p
    block = min(p.query_block, max(n_q, 1))
    return p.replace(top_k=min(p.top_k, n_k), query_block=block, score_group=min(p.score_group, block))


def call_config(settings: OpSettings, n_q: int, n_k: int) -> HyperConfig:
    """The config one call runs: the settings' entry for its length ``max(n_q, n_k)``, fitted to the call."""
    return fit(settings.for_length(max(n_q, n_k)), n_q, n_k)


def _uses_triton(query: Tensor, kernels: str) -> bool:
    """The kernel choice: Triton for ``kernels="triton"``, or CUDA tensors with ``"auto"``."""
    return kernels == "triton" or (kernels == "auto" and query.is_cuda)


def _impl(name: str, query: Tensor, kernels: str, serial_bookkeeping: bool):
    """The fast path's entry point ``name`` for this call: Triton (`_uses_triton`), else the CPU path with its
    bookkeeping-thread switch bound."""
    if _uses_triton(query, kernels):
        from . import triton_attention

        return getattr(triton_attention, name)
    return functools.partial(getattr(cpu, name), serial=serial_bookkeeping)


def check_inputs(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None,
    is_causal: bool,
    where: str = "hyper::attention",
) -> None:
    """Every shape, dtype and device relation SDPA checks, as a clear ValueError (never a read out of bounds)."""
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            f"{where} takes [B, H, N, D] query, key and value, got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    (B, Hq, _, D), (Bk, Hk, Nk, Dk), (Bv, Hv, Nv, _) = query.shape, key.shape, value.shape
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"{where}: query, key and value must be on one device, got {query.device}, {key.device}, {value.device}"
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(
            f"{where}: query, key and value must have one dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if not (B == Bk == Bv):
        raise ValueError(f"{where}: batch sizes differ: query {B}, key {Bk}, value {Bv}")
    if Hk != Hv:
        raise ValueError(f"{where}: key has {Hk} heads and value {Hv}; they must be equal")
    if D != Dk:
        raise ValueError(f"{where}: query head dim {D} differs from key head dim {Dk}")
    if Nk != Nv:
        raise ValueError(f"{where}: key length {Nk} differs from value length {Nv}")
    if Hk == 0 and Hq != 0 or Hk and Hq % Hk:
        raise ValueError(f"{where}: query heads ({Hq}) must be a multiple of key/value heads ({Hk})")
    if is_causal and query.shape[2] > Nk:
        raise ValueError(f"causal {where} needs n_q <= n_k (it aligns the diagonal bottom-right)")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, Nk):
            raise ValueError(
                f"{where}: key_padding_mask must be bool [B, Nk] = [{B}, {Nk}], got "
                f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != query.device:
            raise ValueError(f"{where}: key_padding_mask is on {key_padding_mask.device}, query on {query.device}")


def _degenerate(query: Tensor, key: Tensor, value: Tensor) -> bool:
    """Empty batch, heads, lengths or head dim: served by `_dense_math`, as SDPA serves them."""
    return query.numel() == 0 or key.numel() == 0 or value.shape[2] == 0 or query.shape[-1] == 0


def _dense_math(query, key, value, key_padding_mask, is_causal, scale, keep=None):
    """Attention written out (only for degenerate shapes): ``(out, lse, probs)``, float math at the inputs'
    precision; zero keys give zeros and lse -inf. ``keep [Nq, Nk]`` bool (or None): the (query, key) pairs
    allowed besides the causal and padding masks (hyper::window_attention's band)."""
    Hq, Hk = query.shape[1], key.shape[1]
    k, v = key, value
    if Hk and Hq != Hk:
        k, v = key.repeat_interleave(Hq // Hk, 1), value.repeat_interleave(Hq // Hk, 1)
    scale = query.shape[-1] ** -0.5 if scale is None and query.shape[-1] else (1.0 if scale is None else scale)
    s = (query.to(lse_dtype(query.dtype)) @ k.to(lse_dtype(query.dtype)).transpose(-1, -2)) * scale
    nq, nk = query.shape[2], key.shape[2]
    if is_causal:
        keep = torch.ones(nq, nk, dtype=torch.bool, device=query.device).tril(nk - nq)
        s = s.masked_fill(~keep, float("-inf"))
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1) if nk else s.new_full(s.shape[:-1], float("-inf"))
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0) if nk else s
    out = (p @ v.to(p.dtype)).to(query.dtype) if nk else query.new_zeros(*query.shape[:3], value.shape[-1])
    return out.contiguous(), lse.contiguous(), p


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
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None,
    is_causal: bool,
    scale: float | None,
    settings: str,
) -> tuple[Tensor, Tensor]:
    """``out [B, Hq, Nq, Dv]`` (contiguous) and ``lse [B, Hq, Nq]`` (float32, float64 for float64 inputs).

    ``settings``: `hyper_backend.config.OpSettings.encode` (a config per length bucket, the kernel choice),
    resolved before the call; the op reads nothing else, so the backward of a call runs the forward's config."""
    check_inputs(query, key, value, key_padding_mask, is_causal)
    if _degenerate(query, key, value):
        counters["hyper"]["op_exact"] += 1
        out, lse, _ = _dense_math(query, key, value, key_padding_mask, is_causal, scale)
        return out, lse
    s = OpSettings.decode(settings)
    p = call_config(s, query.shape[2], key.shape[2])
    plan = plan_call(query.shape[2], key.shape[2], is_causal, p)
    counters["hyper"]["op_hyper" if plan.approximates else "op_exact"] += 1
    dv = value.shape[-1]
    if query.shape[-1] != dv:
        query, key, value, scale, _ = _common_head_dim(query, key, value, scale)
    if plan.parts[0].kind == "topk" and _uses_triton(query, s.kernels):
        from . import triton_topk

        out, lse = triton_topk.call_forward(plan, query, key, value, key_padding_mask, scale)
    elif plan.parts[0].kind == "topk":
        out, lse = topk.call_forward(plan, query, key, value, key_padding_mask, scale, s.serial_bookkeeping)
    else:
        forward = _impl("attention_forward", query, s.kernels, s.serial_bookkeeping)
        out, lse = forward(query, key, value, key_padding_mask, is_causal, scale, p)
    return out[..., :dv].contiguous(), lse.contiguous()


@attention.register_fake
def _(query, key, value, key_padding_mask, is_causal, scale, settings):
    check_inputs(query, key, value, key_padding_mask, is_causal)
    B, H, N, _ = query.shape
    out = query.new_empty(B, H, N, value.shape[-1])
    lse = query.new_empty(B, H, N, dtype=lse_dtype(query.dtype))
    return out, lse


def _backward_common_head_dim(run, grad_out, query, key, value, out, scale):
    """``run(grad_out, q, k, v, out, scale) -> (dq, dk, dv)`` on inputs of one head dim (`_common_head_dim`),
    its gradients cut back to the inputs' head dims and dtypes."""
    d, d_v = query.shape[-1], value.shape[-1]
    q, k, v = query, key, value
    if d != d_v:
        q, k, v, scale, width = _common_head_dim(query, key, value, scale)
        grad_out, out = _pad_last(grad_out, width), _pad_last(out, width)
    elif scale is None:
        scale = d**-0.5
    dq, dk, dv = run(grad_out, q, k, v, out, scale)
    return (
        dq[..., :d].to(query.dtype).contiguous(),
        dk[..., :d].to(key.dtype).contiguous(),
        dv[..., :d_v].to(value.dtype).contiguous(),
    )


@torch.library.custom_op("hyper::attention_backward", mutates_args=())
def attention_backward(
    grad_out: Tensor,
    saved: list[Tensor],
    key_padding_mask: Tensor | None,
    is_causal: bool,
    scale: float | None,
    settings: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of hyper::attention; ``saved`` is what its forward saved: ``[query, key, value, out, lse]``."""
    counters["hyper"]["op_backward"] += 1
    query, key, value, out, lse = saved
    if _degenerate(query, key, value):
        return _dense_math_backward(grad_out, query, key, value, key_padding_mask, is_causal, scale)
    s = OpSettings.decode(settings)
    p = call_config(s, query.shape[2], key.shape[2])

    def run(grad_out, q, k, v, out, scale):
        plan = plan_call(q.shape[2], k.shape[2], is_causal, p)
        if plan.parts[0].kind == "topk" and _uses_triton(q, s.kernels):
            from . import triton_topk

            return triton_topk.call_backward(plan, grad_out, q, k, v, out, lse, key_padding_mask, scale)
        if plan.parts[0].kind == "topk":
            return topk.call_backward(plan, grad_out, q, k, v, out, key_padding_mask, scale, s.serial_bookkeeping)
        backward = _impl("attention_backward", q, s.kernels, s.serial_bookkeeping)
        return backward(grad_out, q, k, v, out, lse, key_padding_mask, is_causal, scale, p)

    return _backward_common_head_dim(run, grad_out, query, key, value, out, scale)


def _dense_math_backward(grad_out, query, key, value, key_padding_mask, is_causal, scale, keep=None):
    """Gradients of `_dense_math` (degenerate shapes only): with no keys, or a zero-sized side, they are zeros
    except dv = P^T dO (a zero head dim gives uniform attention over the allowed keys)."""
    dq = torch.zeros_like(query, memory_format=torch.contiguous_format)
    dk = torch.zeros_like(key, memory_format=torch.contiguous_format)
    dv = torch.zeros_like(value, memory_format=torch.contiguous_format)
    if query.numel() and key.shape[2] and value.numel() and query.shape[-1] == 0:
        _, _, p = _dense_math(query, key, value, key_padding_mask, is_causal, scale, keep)
        g = query.shape[1] // key.shape[1]
        full = p.transpose(-1, -2) @ grad_out.to(p.dtype)  # [B, Hq, Nk, Dv]
        dv = full.view(key.shape[0], key.shape[1], g, *full.shape[2:]).sum(2).to(value.dtype).contiguous()
    return dq, dk, dv


def _fake_gradients(grad_out, saved, *args):
    """Both backward ops' gradients: shaped like the forward's query, key and value, contiguous."""
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in saved[:3])


attention_backward.register_fake(_fake_gradients)


def _setup_context(ctx, inputs, output):
    query, key, value, key_padding_mask, is_causal, scale, settings = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse)
    ctx.key_padding_mask = key_padding_mask
    ctx.is_causal, ctx.scale, ctx.settings = is_causal, scale, settings
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    dq, dk, dv = torch.ops.hyper.attention_backward(
        grad_out,
        list(ctx.saved_tensors),
        ctx.key_padding_mask,
        ctx.is_causal,
        ctx.scale,
        ctx.settings,
    )
    return dq, dk, dv, None, None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# hyper::window_attention: exact attention to a band of keys (sliding windows), O(n w)
# ----------------------------------------------------------------------------------------------------------


def window_bounds(n_q: int, n_k: int, left: int, right: int) -> tuple[int, int]:
    """``(a, b)``: ``left``/``right`` clamped to the widest reach they can have (a <= n_k - 1, b <= n_q - 1),
    which leaves the band unchanged: query i sees key j iff ``-a <= j - i - (n_k - n_q) <= b``."""
    return min(int(left), max(n_k - 1, 0)), min(int(right), max(n_q - 1, 0))


def window_keep(n_q: int, n_k: int, left: int, right: int, device=None) -> Tensor:
    """``[n_q, n_k]`` bool: the band of hyper::window_attention (bottom-right aligned, like the op's causal)."""
    d = torch.arange(n_k, device=device)[None, :] - torch.arange(n_q, device=device)[:, None] - (n_k - n_q)
    return (d >= -left) & (d <= right)


def _check_window(query, key, value, key_padding_mask, left, right, where="hyper::window_attention"):
    check_inputs(query, key, value, key_padding_mask, False, where=where)
    if left < 0 or right < 0:
        raise ValueError(
            f"{where}: left and right must be >= 0 (keys before / after the diagonal), got left={left}, right={right}"
        )


@torch.library.custom_op("hyper::window_attention", mutates_args=())
def window_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None,
    left: int,
    right: int,
    scale: float | None,
    kernels: str = "auto",
    serial_bookkeeping: bool = True,
) -> tuple[Tensor, Tensor]:
    """Exact attention to a band of keys: query i attends key j iff ``-left <= j - i - (Nk - Nq) <= right``
    and ``key_padding_mask[b, j]`` (True = attend; None: every key). Bottom-right aligned like the causal
    hyper::attention: ``left=w-1, right=0`` is a causal sliding window of w keys (HF ``sliding_window=w``),
    ``left=Nk, right=0`` plain causal, ``left=right=w`` a symmetric band; left/right >= Nk are unbounded.

    ``query [B, Hq, Nq, D]``, ``key [B, Hkv, Nk, D]``, ``value [B, Hkv, Nk, Dv]`` (Hq a multiple of Hkv),
    ``key_padding_mask [B, Nk]`` bool or None. Returns ``out [B, Hq, Nq, Dv]`` (contiguous) and ``lse
    [B, Hq, Nq]`` (float32, float64 for float64 inputs). A row with no allowed key gets out 0 and lse -inf
    (as hyper::attention gives a row whose keys are all padded), and no gradient.

    Cost O(Nq (w + tile) D) with w = left + right + 1: CPU `cpu.window_forward`, CUDA the Triton band kernels.
    ``kernels`` and ``serial_bookkeeping`` as in `hyper_backend.config.OpSettings`.
    """
    _check_window(query, key, value, key_padding_mask, left, right)
    counters["hyper"]["op_window"] += 1
    Nq, Nk = query.shape[2], key.shape[2]
    if _degenerate(query, key, value):
        out, lse, _ = _dense_math(
            query, key, value, key_padding_mask, False, scale, window_keep(Nq, Nk, left, right, query.device)
        )
        return out, lse
    dv = value.shape[-1]
    if query.shape[-1] != dv:
        query, key, value, scale, _ = _common_head_dim(query, key, value, scale)
    elif scale is None:
        scale = query.shape[-1] ** -0.5
    forward = _impl("window_forward", query, kernels, serial_bookkeeping)
    out, lse = forward(query, key, value, key_padding_mask, window_bounds(Nq, Nk, left, right), scale)
    return out[..., :dv].contiguous(), lse.contiguous()


@window_attention.register_fake
def _(query, key, value, key_padding_mask, left, right, scale, kernels="auto", serial_bookkeeping=True):
    _check_window(query, key, value, key_padding_mask, left, right)
    B, H, N, _ = query.shape
    return (query.new_empty(B, H, N, value.shape[-1]), query.new_empty(B, H, N, dtype=lse_dtype(query.dtype)))


@torch.library.custom_op("hyper::window_attention_backward", mutates_args=())
def window_attention_backward(
    grad_out: Tensor,
    saved: list[Tensor],
    key_padding_mask: Tensor | None,
    bounds: list[int],
    scale: float | None,
    kernels: str = "auto",
    serial_bookkeeping: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of hyper::window_attention; ``saved``: ``[query, key, value, out, lse]`` of its forward,
    ``bounds``: its ``[left, right]``."""
    counters["hyper"]["op_window_backward"] += 1
    query, key, value, out, lse = saved
    left, right = window_bounds(query.shape[2], key.shape[2], *bounds)
    if _degenerate(query, key, value):
        keep = window_keep(query.shape[2], key.shape[2], left, right, query.device)
        return _dense_math_backward(grad_out, query, key, value, key_padding_mask, False, scale, keep)

    def run(grad_out, q, k, v, out, scale):
        backward = _impl("window_backward", q, kernels, serial_bookkeeping)
        return backward(grad_out, q, k, v, out, lse, key_padding_mask, (left, right), scale)

    return _backward_common_head_dim(run, grad_out, query, key, value, out, scale)


window_attention_backward.register_fake(_fake_gradients)


def _window_setup_context(ctx, inputs, output):
    query, key, value, key_padding_mask, left, right, scale, kernels, serial_bookkeeping = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse)
    ctx.key_padding_mask, ctx.scale = key_padding_mask, scale
    ctx.bounds = [left, right]
    ctx.execution = (kernels, serial_bookkeeping)
    ctx.mark_non_differentiable(lse)


def _window_backward(ctx, grad_out, grad_lse):
    dq, dk, dv = torch.ops.hyper.window_attention_backward(
        grad_out, list(ctx.saved_tensors), ctx.key_padding_mask, ctx.bounds, ctx.scale, *ctx.execution
    )
    return dq, dk, dv, None, None, None, None, None, None


window_attention.register_autograd(_window_backward, setup_context=_window_setup_context)
