"""``hyper::window_attention`` on CPU: exact attention to a band of keys, by the cheapest of four schedules.

`window_schedule` picks, from the band and the shapes (its cost model is `hyper_backend.kernels.cost.band_cost`):
one plain fused call (the band holds every key), one causal call (it is exactly causal), the tiled band
(`band.band_forward`), or one fused call per chunk of query rows with the band as a dense bias.
"""

from __future__ import annotations

import functools

import torch

from ..cost import BAND_MARGIN, BAND_OVERHEAD, BAND_TILES, band_cost
from ..plan import lse_dtype
from .band import band_backward, band_forward, every_row_has_a_key, window_any
from .threads import NEG_INF, Threads, flash, flash_bwd, key_bias, mask_dtype, no_keys

_DENSE_BIAS_ELEMENTS = 1 << 25  # the dense schedule's bias is built for this many (query, key) pairs at a time


def window_schedule(Nq: int, Nk: int, band, heads: int = 1, head_dim: int = 64) -> tuple:
    """How `window_forward` computes a band ``(a, b)`` (already clamped: a <= Nk - 1, b <= Nq - 1):

    - ``("full", 0)``: the band holds every key: one plain fused call (key padding as a [B, 1, 1, Nk] bias);
    - ``("causal", 0)``: it is exactly top-left causal (j <= i; unbounded left and Nk - Nq + b == 0): one fused
      causal call, which skips the blocks above the diagonal;
    - ``("band", tile)``: `band_forward` with the tile of least `band_cost`, when that (times ``heads``, the
      batch times the query heads, and head_dim / 64, plus ``BAND_OVERHEAD``) is below ``BAND_MARGIN`` times
      the dense call's Nq * Nk pairs (times the same);
    - ``("dense", 0)``: otherwise (the band covers most keys, or n is small): one fused call per chunk of query
      rows with the band as a dense bias, which costs what SDPA with the dense mask costs.
    """
    a, b = band
    if a >= Nk - 1 and b >= Nq - 1:
        return "full", 0
    if a >= Nk - 1 and Nk - Nq + b == 0:
        return "causal", 0  # aten's causal flag is top-left aligned: key j <= query i
    cost, tile = min((band_cost(Nq, band, t), t) for t in BAND_TILES if t < 2 * Nq or t == BAND_TILES[0])
    work = max(1, heads) * max(1, head_dim) / 64.0
    return ("band", tile) if cost * work + BAND_OVERHEAD < BAND_MARGIN * Nq * Nk * work else ("dense", 0)


_CACHED_BIAS_ELEMENTS = 1 << 21  # band biases up to this size (8 MiB in fp32) are kept for the next call


@functools.lru_cache(maxsize=4)
def _band_bias(rows: int, Nk: int, shift: int, a: int, b: int, dtype, device) -> torch.Tensor:
    """``[1, 1, rows, Nk]``: 0 where ``shift + i - a <= j <= shift + i + b``, else -inf (two triangles)."""
    full = lambda: torch.full((rows, Nk), NEG_INF, dtype=dtype, device=device)  # noqa: E731
    return (full().triu_(shift + b + 1) + full().tril_(shift - a - 1))[None, None]


def _dense_window_bias(B, rows, Nq, Nk, band, keys, dtype, device):
    """``[B or 1, 1, len(rows), Nk]`` bias of query rows ``rows`` (a range) for the band and the usable keys.

    Without key padding the bias depends on the shapes only; small ones are cached (a model calls every layer
    with the same length, as it builds its dense mask once per forward), so a repeated call is one fused call."""
    a, b = band
    shift = rows.start + Nk - Nq
    if keys is None:
        if len(rows) * Nk <= _CACHED_BIAS_ELEMENTS:
            return _band_bias(len(rows), Nk, shift, a, b, dtype, device)
        return _band_bias.__wrapped__(len(rows), Nk, shift, a, b, dtype, device)
    ok = torch.ones(len(rows), Nk, dtype=torch.bool, device=device).tril_(shift + b).triu_(shift - a)[None]
    ok = ok & keys[:, None, :]
    return torch.zeros(ok.shape, dtype=dtype, device=device).masked_fill_(~ok, NEG_INF)[:, None]


def _row_chunks(Nq, Nk, batch):
    step = max(1, _DENSE_BIAS_ELEMENTS // max(1, Nk * batch))
    return [range(i, min(Nq, i + step)) for i in range(0, Nq, step)]


def window_forward(q, k, v, key_valid, band, scale, schedule=None, serial: bool = True):
    """Exact banded attention on CPU tensors: ``q [B,Hq,Nq,D]``, ``k, v [B,Hkv,Nk,D]``, ``key_valid [B,Nk]`` or
    None, ``band = (a, b)`` as in `_band_layout` (clamped). Returns contiguous ``(out, lse)``; rows with no key:
    out 0, lse -inf."""
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    kind, tile = schedule or window_schedule(Nq, Nk, band, B * Hq, D)
    with Threads.serial(serial):  # masks and gathers on one thread, the fused calls on all (`_Threads`)
        mdt = mask_dtype(q.dtype)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if kind == "band":
            out, lse = band_forward(q, k, v, key_valid, band, scale, tile)
        elif kind in ("full", "causal"):
            out, lse = flash(q, k, v, key_bias(key_valid, mdt), kind == "causal", scale)
        else:
            out = torch.empty(B, Hq, Nq, D, dtype=q.dtype, device=q.device)
            lse = torch.empty(B, Hq, Nq, dtype=lse_dtype(q.dtype), device=q.device)
            for rows in _row_chunks(Nq, Nk, 1 if key_valid is None else B):
                sl = slice(rows.start, rows.stop)
                bias = _dense_window_bias(B, rows, Nq, Nk, band, key_valid, mdt, q.device)
                o, l = flash(q[:, :, sl], k, v, bias, False, scale)
                out[:, :, sl], lse[:, :, sl] = o, l
        if kind != "band" and not every_row_has_a_key(Nq, Nk, band, key_valid):  # band_forward did it
            lse = no_keys(lse, window_any(B, Nq, Nk, band, key_valid, q.device))
        return out.contiguous(), lse.to(lse_dtype(q.dtype)).contiguous()


def window_backward(do, q, k, v, out, lse, key_valid, band, scale, schedule=None, serial: bool = True):
    """Gradients ``(dq, dk, dv)`` of `window_forward` (contiguous, in the inputs' dtypes)."""
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    kind, tile = schedule or window_schedule(Nq, Nk, band, B * Hq, D)
    with Threads.serial(serial):
        mdt = mask_dtype(q.dtype)
        lse = lse.to(lse_dtype(q.dtype)).masked_fill(torch.isneginf(lse), 0.0).contiguous()
        do, q, k, v, out = (x.contiguous() for x in (do, q, k, v, out))
        if kind == "band":
            acc = lse_dtype(q.dtype)
            dq, dk, dv = band_backward(do, q, k, v, out, lse, key_valid, band, scale, tile, acc)
        elif kind in ("full", "causal"):
            dq, dk, dv = flash_bwd(do, q, k, v, out, lse, key_bias(key_valid, mdt), kind == "causal", scale)
        else:
            acc = lse_dtype(q.dtype)
            dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            dk = torch.zeros(k.shape, dtype=acc, device=q.device)
            dv = torch.zeros(v.shape, dtype=acc, device=q.device)
            for rows in _row_chunks(Nq, Nk, 1 if key_valid is None else B):
                sl = slice(rows.start, rows.stop)
                bias = _dense_window_bias(B, rows, Nq, Nk, band, key_valid, mdt, q.device)
                dq_c, dk_c, dv_c = flash_bwd(
                    do[:, :, sl], q[:, :, sl], k, v, out[:, :, sl], lse[:, :, sl].contiguous(), bias, False, scale
                )
                dq[:, :, sl] = dq_c
                dk += dk_c
                dv += dv_c
        return (dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous())
