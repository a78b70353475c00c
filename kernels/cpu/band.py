"""Exact banded attention on CPU: tiles of queries against the keys their windows reach, in few fused calls.

Serves the exact ``"band"`` part of a call plan (the centred local window of non-causal self-attention) and the
tiled schedule of ``hyper::window_attention`` (`window`). Tiles of queries are folded into the batch dim, each
against the ``tile + a + b`` key slots its rows can reach: one fused call for the interior tiles (one shared
broadcast bias, K/V read through an overlapping strided view) and one for the edge tiles.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..parts import pad_rows
from .threads import NEG_INF, flash, flash_bwd, mask_dtype, no_keys


def in_band(q_pos, k_pos, band):
    """Whether key position ``k_pos`` lies in the local window ``band = (a, b)`` of query ``q_pos``: -a <= j-i <= b."""
    d = k_pos - q_pos
    return (d >= -band[0]) & (d <= band[1])


class _BandGroup(NamedTuple):
    """Tiles attended in one fused call, and their bias.

    ``b is None``: tiles ``t`` (a slice) of every batch row, all sharing ``bias [1, 1, tile, S]`` (interior tiles:
    one pattern serves them all). Else tiles ``(b[g], t[g])`` (index tensors ``[G]``) with ``bias [G, 1, tile, S]``
    (edges, and tiles that hold a key the band may not use)."""

    b: torch.Tensor | None
    t: object
    bias: torch.Tensor
    interior: bool  # every tile's slots lie in [0, Nk) and the bias is the shared pattern


class _Band(NamedTuple):
    tile: int  # queries per tile
    nt: int  # tiles
    S: int  # key slots per tile: tile + a + b
    start: int  # key position of slot 0 of tile 0; slot s of tile t is key start + t * tile + s
    inner: tuple  # (t_lo, t_hi): the tiles whose slots all lie in [0, Nk)
    groups: tuple  # of _BandGroup


def _band_layout(B, Nq, Nk, band, keys, mask_dtype, device, tile: int = 128) -> _Band:
    """Tiles of ``tile`` queries, each against the ``tile + a + b`` key slots its rows' windows can reach.

    ``band = (a, b)``, bottom-right aligned: query i sees key j iff ``-a <= j - i - (Nk - Nq) <= b`` (with
    Nq == Nk, the keys i - a .. i + b). ``keys [B, Nk]`` bool (or None): the keys the band may use.

    Row r of any tile sees slot s iff ``0 <= s - r <= a + b``: one ``[tile, S]`` pattern. Tiles whose slots lie
    inside the keys and hold no unusable key (the interior, almost all of them when the band is narrow) share
    it as a broadcast ``[1, 1, tile, S]`` bias, so no per-tile mask is built for them; the rest (the first and
    last tiles, whose slots run past the ends, and tiles with a padded key) get their own ``[G, 1, tile, S]``."""
    a, b = band
    tile = max(1, min(tile, Nq))
    nt = math.ceil(Nq / tile)
    S = tile + a + b
    start = Nk - Nq - a
    r = torch.arange(tile, device=device)
    s = torch.arange(S, device=device)
    pattern = in_band(r[:, None], s[None, :], (0, a + b))  # [tile, S]
    # tiles whose slots all lie in [0, Nk): t_lo <= t < t_hi
    t_lo = min(nt, max(0, -(start // tile)) if start < 0 else 0)
    t_hi = max(t_lo, min(nt, (Nk - S - start) // tile + 1 if Nk - S - start >= 0 else 0))
    t_all = torch.arange(nt, device=device)
    inner = (t_all >= t_lo) & (t_all < t_hi)  # [nt]
    if keys is None:
        inner = inner[None].expand(B, nt)
    else:  # a tile is interior only if every slot in range is a usable key
        bad = torch.nn.functional.pad((~keys).to(torch.int32).cumsum(-1), (1, 0))  # [B, Nk + 1]
        lo = (start + t_all * tile).clamp(0, Nk)
        hi = (start + t_all * tile + S).clamp(0, Nk)
        inner = inner[None] & (bad[:, hi] == bad[:, lo])  # [B, nt]
    groups = []
    n_inner = int(inner.sum())
    if n_inner:
        bias = torch.zeros(1, 1, tile, S, dtype=mask_dtype, device=device).masked_fill_(~pattern, NEG_INF)
        if n_inner == B * (t_hi - t_lo) and t_hi > t_lo:
            groups.append(_BandGroup(None, slice(t_lo, t_hi), bias, True))
        else:
            bi, ti = inner.nonzero(as_tuple=True)
            groups.append(_BandGroup(bi, ti, bias.expand(bi.numel(), 1, tile, S), True))
    if n_inner < B * nt:
        bi, ti = (~inner).nonzero(as_tuple=True)
        kpos = start + ti[:, None] * tile + s[None, :]  # [G, S]
        ok = pattern[None] & ((kpos >= 0) & (kpos < Nk))[:, None, :]
        if keys is not None:
            ok = ok & keys[bi[:, None], kpos.clamp(0, Nk - 1)][:, None, :]
        bias = torch.zeros(ok.shape, dtype=mask_dtype, device=device).masked_fill_(~ok, NEG_INF)[:, None]
        groups.append(_BandGroup(bi, ti, bias, False))
    return _Band(tile, nt, S, start, (t_lo, t_hi), tuple(groups))


def _row_tiles(x, L: _Band):
    """``[B, H, Nq, ...]`` -> the view ``[B, nt, H, tile, ...]`` of its rows (padded to nt * tile)."""
    B, H = x.shape[:2]
    x = pad_rows(x, L.nt * L.tile) if x.dim() == 4 else torch.nn.functional.pad(x, (0, L.nt * L.tile - x.shape[2]))
    return x.reshape(B, H, L.nt, L.tile, *x.shape[3:]).transpose(1, 2)


def _pick(x5, g: _BandGroup, t0: int = 0):
    """The group's tiles of a ``[B, nt, H, R, ...]`` view (tile t at index t - t0): ``[G, H, R, ...]``, a view for
    one batch row."""
    if g.b is not None:
        return x5[g.b, g.t - t0]
    sub = x5[:, g.t.start - t0 : g.t.stop - t0]
    return sub[0] if sub.shape[0] == 1 else sub.reshape(-1, *sub.shape[2:])


def _slots(x, L: _Band, g: _BandGroup):
    """The key slots of the group's tiles, ``[G, H, S, D]``, from ``x [B, H, Nk, D]`` (contiguous).

    Interior tiles (the shared-pattern groups) read an overlapping strided view of ``x`` itself: no copy for one
    batch row. Other tiles gather their slots, clamped to the keys (the bias masks the slots past either end)."""
    B, H, Nk, D = x.shape
    if g.interior:
        t_lo, t_hi = L.inner
        view = x.as_strided(
            (B, t_hi - t_lo, H, L.S, D),
            (H * Nk * D, L.tile * D, Nk * D, D, 1),
            x.storage_offset() + (L.start + t_lo * L.tile) * D,
        )
        return _pick(view, g, t_lo)
    pos = (L.start + g.t[:, None] * L.tile + torch.arange(L.S, device=x.device)).clamp_(0, Nk - 1)  # [G, S]
    return x.transpose(1, 2)[g.b[:, None], pos].transpose(1, 2)  # [G, H, S, D], rows [G, S, H, D]


def _put(dst5, g: _BandGroup, x):
    """Writes the group's tiles ``x [G, H, R, ...]`` into ``dst5 [B, nt, H, R, ...]``."""
    if g.b is not None:
        dst5[g.b, g.t] = x.to(dst5.dtype)
    else:
        dst5[:, g.t] = x.reshape(dst5.shape[0], -1, *x.shape[1:]).to(dst5.dtype)


def _tiled(B, H, L: _Band, width, dtype, device):
    """A ``[B, H, nt * tile, width]`` buffer (``width=None``: no last dim) and its ``[B, nt, H, tile, ...]`` view."""
    shape = (B, H, L.nt * L.tile) + (() if width is None else (width,))
    full = torch.empty(shape, dtype=dtype, device=device)
    return full, full.view(B, H, L.nt, L.tile, *shape[3:]).transpose(1, 2)


def window_any(B, Nq, Nk, band, keys, device):
    """``[B or 1, 1, Nq]``: rows with at least one key in their window (an interval) that the band may use."""
    a, b = band
    p = torch.arange(Nq, device=device) + (Nk - Nq)
    lo, hi = (p - a).clamp(0, Nk), (p + b + 1).clamp(0, Nk)
    if keys is None:
        return (hi > lo)[None, None]
    cnt = torch.nn.functional.pad(keys.to(torch.int32).cumsum(-1), (1, 0))  # [B, Nk + 1]
    return (cnt[:, hi] > cnt[:, lo])[:, None]


def band_forward(q, k, v, keys, band, scale, tile: int = 128):
    """Exact attention of every query to the keys of its window ``band = (a, b)`` (see `_band_layout`):
    ``(out [B,Hq,Nq,D], lse [B,Hq,Nq])``; ``keys [B, Nk]`` bool (or None) are the keys it may use. Rows with no
    such key get out 0 and lse -inf. One fused call per group of tiles (`_band_layout`)."""
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    L = _band_layout(B, Nq, Nk, band, keys, mask_dtype(q.dtype), q.device, tile)
    q5, k, v = _row_tiles(q, L), k.contiguous(), v.contiguous()
    out, out5 = _tiled(B, Hq, L, D, q.dtype, q.device)
    lse, lse5 = _tiled(B, Hq, L, None, torch.float64 if q.dtype == torch.float64 else torch.float32, q.device)
    for g in L.groups:
        o, l = flash(_pick(q5, g), _slots(k, L, g), _slots(v, L, g), g.bias, False, scale)
        _put(out5, g, o)
        _put(lse5, g, l)
    lse = lse[:, :, :Nq]
    if not every_row_has_a_key(Nq, Nk, band, keys):
        lse = no_keys(lse, window_any(B, Nq, Nk, band, keys, q.device))
    return out[:, :, :Nq], lse


def band_backward(do, q, k, v, out, lse, keys, band, scale, tile: int = 128, acc_dtype=None):
    """Gradients of `band_forward` given the *final* ``out``/``lse`` of the rows (which may include other parts
    merged in by the caller; lse -inf must already be 0).

    Slot s of tile t is key ``start + t * tile + s``; cut the slots into chunks of ``tile``: chunk j of tile t
    lands on key block t + j. So the overlapping slots' dK/dV are ``ceil(S / tile)`` shifted block adds, with
    chunk j descending: every key row sums its tiles in ascending tile order, in ``acc_dtype`` (default: the
    kernel's output dtype)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    L = _band_layout(B, Nq, Nk, band, keys, mask_dtype(q.dtype), q.device, tile)
    q5, do5, o5, l5 = _row_tiles(q, L), _row_tiles(do, L), _row_tiles(out, L), _row_tiles(lse, L)
    k, v = k.contiguous(), v.contiguous()
    dq, dq5 = _tiled(B, Hq, L, D, q.dtype, q.device)
    T, nt, S = L.tile, L.nt, L.S
    chunks = math.ceil(S / T)
    base = min(L.start, 0)  # accumulator row r is key r + base
    first = L.start - base  # accumulator row of slot 0 of tile 0
    rows = max(first + (nt + chunks - 1) * T, Nk - base)
    acc = [torch.zeros(B, rows, Hkv, D, dtype=acc_dtype or q.dtype, device=q.device) for _ in range(2)]  # dK, dV
    blocks = [a[:, first : first + (nt + chunks - 1) * T].view(B, nt + chunks - 1, T, Hkv, D) for a in acc]
    parts = []
    for g in L.groups:
        dq_t, dk_t, dv_t = flash_bwd(
            _pick(do5, g),
            _pick(q5, g),
            _slots(k, L, g),
            _slots(v, L, g),
            _pick(o5, g),
            _pick(l5, g).contiguous(),
            g.bias,
            False,
            scale,
        )
        _put(dq5, g, dq_t)
        parts.append((g, (dk_t.transpose(1, 2), dv_t.transpose(1, 2))))  # [G, S, Hkv, D] views
    for j in reversed(range(chunks)):
        w = min(T, S - j * T)
        for g, grads in parts:
            for i, d in enumerate(grads):
                piece = d[:, j * T : j * T + w].to(acc[i].dtype)  # [G, w, Hkv, D]
                if g.b is None:
                    n = g.t.stop - g.t.start
                    blocks[i][:, g.t.start + j : g.t.stop + j, :w] += piece.reshape(B, n, w, Hkv, D)
                else:
                    blocks[i][:, :, :w].index_put_((g.b, g.t + j), piece, accumulate=True)
    dk, dv = (a[:, -base : -base + Nk].transpose(1, 2) for a in acc)  # [B, Hkv, Nk, D]
    return dq[:, :, :Nq], dk, dv


def every_row_has_a_key(Nq, Nk, band, keys) -> bool:
    """Without key padding row i's window [i + Nk - Nq - a, i + Nk - Nq + b] meets [0, Nk) iff Nk - Nq + b >= 0."""
    return keys is None and Nk - Nq + band[1] >= 0
