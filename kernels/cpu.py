"""The CPU path: HyperAttention as a few batched calls to aten's fused flash-attention for CPU.

Layout trick. Sorted query blocks are gathered straight into ``[B, Hkv*nb*g, bq, D]`` (kv head, block, query
head within the group, row), and sorted key blocks into ``[B, Hkv*nb, bk, D]``. aten's GQA maps folded query
head j to key head j // g, which is exactly "block i of query head h sees block i of kv head h // g": the whole
block diagonal is one fused call, and K/V are never expanded. The residual uses the same query layout against
``[B, Hkv, m, D]`` sampled keys, with group nb*g; a broadcast ``[.., 1, m]`` bias excludes each block's own keys
and carries the log(n/m) reweighting, so its log-sum-exp is already weighted. The parts merge through their
log-sum-exps, and one ``index_copy_`` puts rows back in their original order.

Causal attention halves recursively: the diagonal leaves are one fused causal call, and each level's
off-diagonal quadrants are one batched non-causal HyperAttention. Memory stays O(n).

Exact banded attention (``hyper::window_attention``, and the centred local window of non-causal self-attention):
tiles of queries folded into the batch dim, each against the ``tile + a + b`` key slots its rows can reach, in one
fused call for the interior tiles (one shared broadcast bias, K/V read through an overlapping strided view) and
one for the edge tiles; `window_schedule` picks plain, causal or dense calls instead where tiles would not pay.

Backward: the approximation is attention with fixed log-weights, so each part's gradient is aten's flash
backward for that part, fed the *final* output and log-sum-exp (the standard split-softmax identity). Sampled
keys' gradients are scattered back with ``index_add_``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import torch

from hyper_backend.config import HyperConfig

from .plan import (
    Plan,
    _chunks,
    _pad_rows,
    causal_schedule,
    exact_keys,
    hyper_applies,
    lse_dtype,
    lsh_ranks,
    make_plan,
    plan_from_ranks,
    sink_mask,
    split_keys,
    window_band,
    window_strip,
)

aten = torch.ops.aten
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------------
# exact attention parts
# ----------------------------------------------------------------------------------------------------------


class _Threads:
    """Bookkeeping (gathers, masks, merges) runs on one thread; the fused attention calls on all of them.

    On a shared machine every parallel region of a small op is a fork-join that waits for a descheduled
    thread: a 1M-element merge took 44 ms on two busy cores instead of about 1 ms. The attention calls are
    the work worth splitting; the rest is memory-bound and gains little from a second thread even when idle.
    `serial()` wraps an entry point; `_flash` and `_flash_bwd` restore the caller's thread count inside."""

    full = 0  # the caller's thread count while a serial() block runs, else 0

    @staticmethod
    @contextlib.contextmanager
    def serial(enabled: bool = True):
        if _Threads.full or not enabled:
            yield
            return
        _Threads.full = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(_Threads.full)
            _Threads.full = 0

    @staticmethod
    @contextlib.contextmanager
    def parallel():
        if not _Threads.full:
            yield
            return
        torch.set_num_threads(_Threads.full)
        try:
            yield
        finally:
            torch.set_num_threads(1)


def _flash(q, k, v, mask, causal, scale):
    with _Threads.parallel():
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)


def _flash_bwd(do, q, k, v, out, lse, mask, causal, scale):
    with _Threads.parallel():
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale
        )


def _key_bias(key_valid, dtype):
    """``[B, Nk]`` bool -> ``[B, 1, 1, Nk]`` additive bias, or None."""
    if key_valid is None:
        return None
    return torch.zeros(key_valid.shape, dtype=dtype, device=key_valid.device).masked_fill_(~key_valid, NEG_INF)[
        :, None, None, :
    ]


def _mask_dtype(dtype):
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _no_keys(lse, any_key):
    """aten returns lse = 0 for a row whose keys are all masked; make it -inf so merging ignores the part."""
    if any_key is None:
        return lse
    return lse.masked_fill(~any_key, NEG_INF)


def merge_(acc_o, acc_l, o, l):
    """In place: ``(acc_o, acc_l) <- merge of two attention parts over disjoint key sets``."""
    new_l = torch.logaddexp(acc_l, l)
    # the two weights sum to 1, so the merge is one lerp toward the new part
    w_new = torch.exp(l - new_l).nan_to_num_(0.0)  # both parts empty: -inf - -inf
    acc_o.lerp_(o.to(acc_o.dtype), w_new[..., None].to(acc_o.dtype))
    acc_l.copy_(new_l)


# ----------------------------------------------------------------------------------------------------------
# non-causal HyperAttention
# ----------------------------------------------------------------------------------------------------------


class Rows(NamedTuple):
    """A logical ``[B', H, S, D]`` operand addressed as rows of a contiguous 2-D tensor:
    row ``(b', h, s)`` is ``data[base[b', h] + s]``. Lets the causal recursion gather quadrant rows straight
    from the whole sequence instead of copying each level's chunks out first."""

    data: torch.Tensor  # [R, D]
    base: torch.Tensor  # [B', H] int64
    shape: tuple  # (B', H, S, D)
    whole: torch.Tensor | None = None  # the operand itself, when it is a whole tensor

    @staticmethod
    def of(x: torch.Tensor) -> Rows:
        """All of ``x [B, H, S, D]``."""
        B, H, S, D = x.shape
        base = (torch.arange(B * H, device=x.device) * S).view(B, H)
        x = x.contiguous()
        return Rows(x.view(-1, D), base, tuple(x.shape), x)

    @staticmethod
    def chunks(x: torch.Tensor, count: int, size: int, parity: int) -> Rows:
        """Chunks ``parity, parity + 2, ...`` of length ``size`` of contiguous ``x [B, H, N, D]``, batched as
        ``[B*count, H, size, D]`` (the layout of `plan._chunks`)."""
        B, H, N, D = x.shape
        dev = x.device
        b = torch.arange(B, device=dev).view(B, 1, 1)
        i = torch.arange(count, device=dev).view(1, count, 1)
        h = torch.arange(H, device=dev).view(1, 1, H)
        base = ((b * H + h) * N + (2 * i + parity) * size).view(B * count, H)
        return Rows(x.view(-1, D), base, (B * count, H, size, D))

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Rows at logical positions ``index [B', H, ...]`` -> ``[B', H, ..., D]``."""
        flat = index + self.base.view(*self.base.shape, *([1] * (index.dim() - 2)))
        return self.data.index_select(0, flat.reshape(-1)).view(*index.shape, self.shape[-1])

    def flat_index(self, index: torch.Tensor) -> torch.Tensor:
        return (index + self.base.view(*self.base.shape, *([1] * (index.dim() - 2)))).reshape(-1)

    def dense(self) -> torch.Tensor:
        """The operand itself, ``[B', H, S, D]`` contiguous (a copy unless it is the whole tensor)."""
        if self.whole is not None:
            return self.whole
        S = self.shape[2]
        pos = torch.arange(S, device=self.base.device).expand(*self.base.shape, S)
        return self.gather(pos)


class _Layout(NamedTuple):
    q_pos: torch.Tensor  # [B, Hkv, nb, g, bq] logical query position of each folded slot (pads -> 0)
    q_inv: torch.Tensor  # [B*Hq*Nq] folded slot of each logical query row (unsorts with one index_select)
    k_pos: torch.Tensor  # [B, Hkv, nb*bk] logical key position of each sorted slot (pads -> 0)
    k_inv: torch.Tensor  # [B*Hkv*Nk] sorted slot of each logical key row
    block_bias: torch.Tensor | None  # [B, Hkv*nb*g, 1, bk] or None
    block_any: torch.Tensor | None  # [B, Hkv*nb*g, 1] rows that have at least one block key
    side_pos: torch.Tensor | None  # [B, Hkv, t] logical positions of the residual draws, then the exact keys
    res_bias: torch.Tensor | None  # [B, Hkv*nb*g, 1, t]
    res_any: torch.Tensor | None  # [B, Hkv*nb*g, 1]
    q_padded: torch.Tensor | None  # [B, Hkv, nb, g, bq] bool: padding slots (None when there are none); with
    # n_q > n_k whole trailing blocks can be padding


def _inverse(dest: torch.Tensor, total: int) -> torch.Tensor:
    """``inv[row] = slot`` for ``dest[slot] = row``; padding slots point at the dummy row ``total``."""
    inv = torch.empty(total + 1, dtype=torch.int64, device=dest.device)
    inv.index_copy_(0, dest, torch.arange(dest.numel(), device=dest.device))
    return inv[:-1]


def _in_band(q_pos, k_pos, band):
    """Whether key position ``k_pos`` lies in the local window ``band = (a, b)`` of query ``q_pos``: -a <= j-i <= b."""
    d = k_pos - q_pos
    return (d >= -band[0]) & (d <= band[1])


def _layout(plan: Plan, B, Hq, Hkv, Nq, Nk, key_valid, mask_dtype, extras=None, band=None) -> _Layout:
    dev = plan.q_perm.device
    g, nb, bq, bk = Hq // Hkv, plan.num_blocks, plan.q_block, plan.k_block
    q_pad, k_pad = nb * bq - Nq, nb * bk - Nk
    # queries: [B, Hq, nb*bq] -> folded [B, Hkv, nb, g, bq]
    qp = torch.nn.functional.pad(plan.q_perm, (0, q_pad), value=-1) if q_pad else plan.q_perm
    qp = qp.view(B, Hkv, g, nb, bq).permute(0, 1, 3, 2, 4)
    q_pos = qp.clamp(min=0)
    q_group = (torch.arange(B * Hq, device=dev) * Nq).view(B, Hkv, 1, g, 1)
    q_inv = _inverse((q_pos + q_group).masked_fill(qp < 0, B * Hq * Nq).reshape(-1), B * Hq * Nq)
    # keys: [B, Hkv, nb*bk]
    kp = torch.nn.functional.pad(plan.k_perm, (0, k_pad), value=-1) if k_pad else plan.k_perm
    k_group = (torch.arange(B * Hkv, device=dev) * Nk).view(B, Hkv, 1)
    k_inv = _inverse((kp.clamp(min=0) + k_group).masked_fill(kp < 0, B * Hkv * Nk).reshape(-1), B * Hkv * Nk)
    k_ok = kp >= 0
    if key_valid is not None:
        k_ok = k_ok & torch.gather(key_valid[:, None, :].expand(B, Hkv, Nk), 2, kp.clamp(min=0))
    block_bias = block_any = None
    if band is not None:  # per (query, key): a key in the query's window is served by the band part instead
        ok = k_ok.view(B, Hkv, nb, 1, 1, bk) & ~_in_band(
            q_pos[..., None], kp.clamp(min=0).view(B, Hkv, nb, 1, 1, bk), band
        )
        block_bias = torch.zeros(ok.shape, dtype=mask_dtype, device=dev).masked_fill_(~ok, NEG_INF)
        block_bias = block_bias.reshape(B, Hkv * nb * g, bq, bk)
        block_any = ok.any(-1).reshape(B, Hkv * nb * g, bq)
    elif k_pad or key_valid is not None:
        ok = k_ok.view(B, Hkv, nb, 1, 1, bk).expand(B, Hkv, nb, g, 1, bk)
        block_bias = torch.zeros(ok.shape, dtype=mask_dtype, device=dev).masked_fill_(~ok, NEG_INF)
        block_bias = block_bias.reshape(B, Hkv * nb * g, 1, bk)
        block_any = ok.any(-1).reshape(B, Hkv * nb * g, 1)
    side_pos, res_bias, res_any = _side_keys(
        plan, B, Hkv, g, key_valid, extras, mask_dtype, None if band is None else (q_pos, band)
    )
    return _Layout(
        q_pos,
        q_inv,
        kp.clamp(min=0),
        k_inv,
        block_bias,
        block_any,
        side_pos,
        res_bias,
        res_any,
        (qp < 0) if q_pad else None,
    )


def _side_keys(plan: Plan, B, Hkv, g, key_valid, extras, mask_dtype, band=None):
    """Keys every block attends to besides its own: the residual draws (log-weighted, excluding the block's
    own keys) followed by the exact keys of ``extras = (pos [B, e], ok [B, e])`` (log-weight 0).

    Returns ``(pos [B, Hkv, t], bias [B, Hkv*nb*g, 1, t], any [B, Hkv*nb*g, 1])``, or Nones when t = 0. With
    ``band = (q_pos, (a, b))`` the bias is per query row (``[.., bq, t]``): draws inside a query's local window
    are dropped for that query (the window serves them exactly)."""
    nb, dev = plan.num_blocks, plan.q_perm.device
    pos, bias = [], []
    neg = torch.full((), NEG_INF, dtype=mask_dtype, device=dev)
    if plan.samples is not None:
        blk = torch.arange(nb, device=dev).view(1, 1, nb, 1)
        ok = plan.sample_block[:, :, None, :] != blk  # [B, Hkv, nb, m]
        if key_valid is not None:
            s_valid = torch.gather(key_valid[:, None, :].expand(B, Hkv, key_valid.shape[-1]), 2, plan.samples)
            ok = ok & s_valid[:, :, None, :]
        bias.append(torch.where(ok, plan.sample_log_weight.to(mask_dtype)[:, :, None, :], neg))
        pos.append(plan.samples)
    if extras is not None:
        e_pos, e_ok = extras
        e = e_pos.shape[-1]
        pos.append(e_pos[:, None, :].expand(B, Hkv, e))
        bias.append(
            torch.where(e_ok, torch.zeros((), dtype=mask_dtype, device=dev), neg).view(B, 1, 1, e).expand(B, Hkv, nb, e)
        )
    if not pos:
        return None, None, None
    bias = torch.cat(bias, -1) if len(bias) > 1 else bias[0]
    pos = torch.cat(pos, -1) if len(pos) > 1 else pos[0]
    t = bias.shape[-1]
    if band is None:
        bias = bias[:, :, :, None, None, :].expand(B, Hkv, nb, g, 1, t).reshape(B, Hkv * nb * g, 1, t)
    else:
        q_pos, ab = band
        bq = q_pos.shape[-1]
        full = bias[:, :, :, None, None, :].expand(B, Hkv, nb, g, bq, t).clone()
        if plan.samples is not None:
            drop = _in_band(q_pos[..., None], plan.samples[:, :, None, None, None, :], ab)  # [B, Hkv, nb, g, bq, m]
            full[..., : plan.samples.shape[-1]].masked_fill_(drop, NEG_INF)
        bias = full.reshape(B, Hkv * nb * g, bq, t)
    return pos, bias, torch.isfinite(bias).any(-1)


def _folded_rows(src: Rows, q_pos: torch.Tensor, Hkv: int) -> torch.Tensor:
    """Flat row index of every folded query slot ``[B, Hkv, nb, g, bq]`` of ``src`` (``[B, Hq, Nq, D]``)."""
    B, Hq = src.base.shape
    g = Hq // Hkv
    return (q_pos + src.base.view(B, Hkv, 1, g, 1)).reshape(-1)


def _sub_problem(B, Nk, key_valid, sink, strip, device, approx: bool):
    """Estimator keys and exact extras of one non-causal sub-problem (see `plan.exact_keys`)."""
    if not approx:
        return key_valid, None
    est, pos, ok = exact_keys(key_valid, sink, strip, B, Nk, device)
    return est, (None if pos is None else (pos, ok))


# ----------------------------------------------------------------------------------------------------------
# exact banded attention: tiles of queries against the keys their windows reach, batched into few fused
# calls. Serves the centred local window of `noncausal_forward` and the whole of hyper::window_attention.
# ----------------------------------------------------------------------------------------------------------


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
    pattern = _in_band(r[:, None], s[None, :], (0, a + b))  # [tile, S]
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
    x = _pad_rows(x, L.nt * L.tile) if x.dim() == 4 else torch.nn.functional.pad(x, (0, L.nt * L.tile - x.shape[2]))
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


def _window_any(B, Nq, Nk, band, keys, device):
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
    L = _band_layout(B, Nq, Nk, band, keys, _mask_dtype(q.dtype), q.device, tile)
    q5, k, v = _row_tiles(q, L), k.contiguous(), v.contiguous()
    out, out5 = _tiled(B, Hq, L, D, q.dtype, q.device)
    lse, lse5 = _tiled(B, Hq, L, None, torch.float64 if q.dtype == torch.float64 else torch.float32, q.device)
    for g in L.groups:
        o, l = _flash(_pick(q5, g), _slots(k, L, g), _slots(v, L, g), g.bias, False, scale)
        _put(out5, g, o)
        _put(lse5, g, l)
    lse = lse[:, :, :Nq]
    if not _every_row_has_a_key(Nq, Nk, band, keys):
        lse = _no_keys(lse, _window_any(B, Nq, Nk, band, keys, q.device))
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
    L = _band_layout(B, Nq, Nk, band, keys, _mask_dtype(q.dtype), q.device, tile)
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
        dq_t, dk_t, dv_t = _flash_bwd(
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


def noncausal_forward(
    q, k, v, key_valid, scale, p: HyperConfig, stream: int = 0, ranks=None, sink=None, strip=0, band=None
):
    """``q [B,Hq,Nq,D]``, ``k, v [B,Hkv,Nk,D]`` (tensors or `Rows`) -> contiguous ``(out [B,Hq,Nq,D], lse [B,Hq,Nq])``.

    ``ranks``: precomputed ``(q_rank, k_rank)`` bucket ranks of these rows (see `plan.lsh_ranks`).
    ``sink [B, Nk]`` and ``strip``: keys kept exact for every query (see `plan.exact_keys`). ``band = (a, b)``
    (self-attention only): the keys of each query's local window are exact for it (`band_forward`)."""
    q, k, v = (x if isinstance(x, Rows) else Rows.of(x) for x in (q, k, v))
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    dtype = q.data.dtype
    mdt = _mask_dtype(dtype)
    if not hyper_applies(Nq, Nk, p):
        out, lse = _flash(q.dense(), k.dense(), v.dense(), _key_bias(key_valid, mdt), False, scale)
        if key_valid is not None:
            lse = _no_keys(lse, key_valid.any(-1)[:, None, None].expand_as(lse))
        return out.contiguous(), lse.to(lse_dtype(dtype)).contiguous()
    est, extras = _sub_problem(B, Nk, key_valid, sink, strip, q.data.device, True)
    plan = _plan(q, k, est, p, stream, ranks)
    L = _layout(plan, B, Hq, Hkv, Nq, Nk, est, mdt, extras, band)
    g, nb, bq, bk = Hq // Hkv, plan.num_blocks, plan.q_block, plan.k_block
    q_rows = _folded_rows(q, L.q_pos, Hkv)
    q_s = q.data.index_select(0, q_rows).view(B, Hkv * nb * g, bq, D)  # [B, Hkv*nb*g, bq, D]
    k_b = k.gather(L.k_pos).view(B, Hkv * nb, bk, D)  # [B, Hkv*nb, bk, D]
    v_b = v.gather(L.k_pos).view(B, Hkv * nb, bk, D)
    o, lse = _flash(q_s, k_b, v_b, L.block_bias, False, scale)  # [B, Hkv*nb*g, bq, D], [B, Hkv*nb*g, bq]
    lse = _no_keys(lse, L.block_any)
    if L.side_pos is not None:  # residual draws and exact keys: one call for every block
        o2, lse2 = _flash(q_s, k.gather(L.side_pos), v.gather(L.side_pos), L.res_bias, False, scale)
        lse2 = _no_keys(lse2, L.res_any)
        acc = o.float() if o.dtype not in (torch.float32, torch.float64) else o.contiguous()
        lse = lse.contiguous()
        merge_(acc, lse, o2, lse2)
        o = acc.to(dtype)
    out = o.reshape(-1, D).index_select(0, L.q_inv).view(B, Hq, Nq, D)
    lse = lse.reshape(-1).index_select(0, L.q_inv).view(B, Hq, Nq).to(lse_dtype(dtype))
    if band is not None:
        o3, lse3 = band_forward(q.dense(), k.dense(), v.dense(), est, band, scale)
        acc = out.float() if dtype not in (torch.float32, torch.float64) else out
        merge_(acc, lse, o3, lse3.to(lse.dtype))
        out = acc.to(dtype)
    return out, lse


def _plan(q: Rows, k: Rows, key_valid, p: HyperConfig, stream, ranks):
    args = (key_valid, p.block_size, p.sample_size, p.lsh_num_projs, p.seed, stream, p.residual)
    if ranks is None:
        return make_plan(q.dense(), k.dense(), *args)
    return plan_from_ranks(ranks[0], ranks[1], *args)


def noncausal_backward(
    do, q, k, v, out, lse, key_valid, scale, p: HyperConfig, stream: int = 0, ranks=None, sink=None, strip=0, band=None
):
    """Gradient of `noncausal_forward` given the *final* ``out``/``lse`` of the rows (which may include other
    parts merged in by the caller). Operands are tensors or `Rows`; returns contiguous ``(dq, dk, dv)``."""
    do, q, k, v, out = (x if isinstance(x, Rows) else Rows.of(x) for x in (do, q, k, v, out))
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    dtype = q.data.dtype
    mdt = _mask_dtype(dtype)
    lse = lse.to(lse_dtype(dtype)).masked_fill(torch.isneginf(lse), 0.0)  # rows with no keys: no NaN
    if not hyper_applies(Nq, Nk, p):
        dq, dk, dv = _flash_bwd(
            do.dense(),
            q.dense(),
            k.dense(),
            v.dense(),
            out.dense(),
            lse.contiguous(),
            _key_bias(key_valid, mdt),
            False,
            scale,
        )
        return dq, dk, dv
    est, extras = _sub_problem(B, Nk, key_valid, sink, strip, q.data.device, True)
    plan = _plan(q, k, est, p, stream, ranks)
    L = _layout(plan, B, Hq, Hkv, Nq, Nk, est, mdt, extras, band)
    g, nb, bq, bk = Hq // Hkv, plan.num_blocks, plan.q_block, plan.k_block
    fold = (B, Hkv * nb * g, bq, D)
    q_s = q.data.index_select(0, _folded_rows(q, L.q_pos, Hkv)).view(fold)
    do_s = do.data.index_select(0, _folded_rows(do, L.q_pos, Hkv)).view(fold)
    o_s = out.data.index_select(0, _folded_rows(out, L.q_pos, Hkv)).view(fold)
    lse_rows = Rows.of(lse[..., None])
    lse_s = lse_rows.data.index_select(0, _folded_rows(lse_rows, L.q_pos, Hkv)).view(fold[:3])
    if L.q_padded is not None:  # padding slots gathered row 0: silence them
        do_s.view(B, Hkv, nb, g, bq, D).masked_fill_(L.q_padded[..., None], 0)
    k_b = k.gather(L.k_pos).view(B, Hkv * nb, bk, D)
    v_b = v.gather(L.k_pos).view(B, Hkv * nb, bk, D)
    dq_s, dk_b, dv_b = _flash_bwd(do_s, q_s, k_b, v_b, o_s, lse_s, L.block_bias, False, scale)
    dk = dk_b.reshape(-1, D).index_select(0, L.k_inv).view(B, Hkv, Nk, D)
    dv = dv_b.reshape(-1, D).index_select(0, L.k_inv).view(B, Hkv, Nk, D)
    if L.side_pos is not None:
        # A sink key takes one part from every query block, and the parts cancel: in a half dtype, rounding each
        # part before the sum costs up to 8x eager's error at 256 blocks. So the side call runs in fp32 and the
        # parts are summed in fp32, rounded once.
        acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        up = lambda x: x.to(acc)  # noqa: E731
        dq2, dk_s, dv_s = _flash_bwd(
            up(do_s),
            up(q_s),
            up(k.gather(L.side_pos)),
            up(v.gather(L.side_pos)),
            up(o_s),
            lse_s,
            L.res_bias.to(acc) if L.res_bias is not None else None,
            False,
            scale,
        )
        dq_s = dq_s + dq2.to(dtype)
        s_rows = Rows.of(dk).flat_index(L.side_pos)
        dk = up(dk).view(-1, D).index_add_(0, s_rows, dk_s.reshape(-1, D)).to(dtype).view(dk.shape)
        dv = up(dv).view(-1, D).index_add_(0, s_rows, dv_s.reshape(-1, D)).to(dtype).view(dv.shape)
    dq = dq_s.reshape(-1, D).index_select(0, L.q_inv).view(B, Hq, Nq, D)
    if band is not None:
        dq3, dk3, dv3 = band_backward(do.dense(), q.dense(), k.dense(), v.dense(), out.dense(), lse, est, band, scale)
        dq, dk, dv = dq + dq3, dk + dk3.to(dk.dtype), dv + dv3.to(dv.dtype)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------
# causal HyperAttention: recursive halving (`plan.causal_schedule`), one batched call per level
# ----------------------------------------------------------------------------------------------------------


def _unchunk_view(x, count, size, parity):
    """A view of ``x [B, H, N, ...]`` onto the same chunks as `_chunks`, shaped ``[B, count, H, size, ...]``."""
    B, H = x.shape[:2]
    rest = x.shape[3:]
    return x.view(B, H, count, 2, size, *rest)[:, :, :, parity].transpose(1, 2)


def _leaf_view(x, pieces):
    B, H, N = x.shape[:3]
    return (
        x.reshape(B, H, pieces, N // pieces, *x.shape[3:])
        .transpose(1, 2)
        .reshape(B * pieces, H, N // pieces, *x.shape[3:])
    )


class _Causal(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor | None  # [B, Np] (None: every key valid, no padding)
    sink: torch.Tensor | None  # [B, Np]
    sched: object  # `plan.CausalSchedule`


def _causal_setup(q, k, v, key_valid, sink, p: HyperConfig) -> _Causal:
    B, Hq, N, D = q.shape
    sched = causal_schedule(N, p)
    Np = sched.Np
    valid = None if key_valid is None else key_valid.contiguous()  # sliced/expanded masks are viewed below
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if Np != N:
        q, k, v = _pad_rows(q, Np), _pad_rows(k, Np), _pad_rows(v, Np)
        valid = torch.zeros(B, Np, dtype=torch.bool, device=q.device)
        valid[:, :N] = True if key_valid is None else key_valid
        if sink is not None:
            sink = torch.nn.functional.pad(sink, (0, Np - N))
    return _Causal(q, k, v, valid, None if sink is None else sink.contiguous(), sched)


def _even(mask, B, count, size):
    return None if mask is None else mask.view(B, count, 2, size)[:, :, 0].reshape(B * count, size)


def causal_forward(q, k, v, key_valid, scale, p: HyperConfig, sink=None):
    """Causal HyperAttention with n_q == n_k: ``(out [B,Hq,N,D], lse [B,Hq,N])``."""
    B, Hq, N, D = q.shape
    mdt = _mask_dtype(q.dtype)
    c = _causal_setup(q, k, v, key_valid, sink, p)
    if key_valid is None and c.sched.depth == 0:  # exact: hand straight to aten
        out, lse = _flash(q, k, v, None, True, scale)
        return out.contiguous(), lse.to(lse_dtype(q.dtype)).contiguous()
    q, k, v, valid = c.q, c.k, c.v, c.valid
    Np, leaf = c.sched.Np, c.sched.leaf
    pieces = Np // leaf
    # leaves: [B*pieces, H, leaf, D], exact causal
    leaf_bias = None if valid is None else _key_bias(valid.view(B * pieces, leaf), mdt)
    o, lse = _flash(_leaf_view(q, pieces), _leaf_view(k, pieces), _leaf_view(v, pieces), leaf_bias, True, scale)
    if valid is not None:  # a row whose visible keys are all masked
        lse = _no_keys(lse, (valid.view(B * pieces, 1, leaf).cumsum(-1) > 0).expand_as(lse))
    acc_dtype = lse_dtype(q.dtype)
    out = o.to(acc_dtype).reshape(B, pieces, Hq, leaf, D).transpose(1, 2).reshape(B, Hq, Np, D).contiguous()
    lse_all = lse.reshape(B, pieces, Hq, leaf).transpose(1, 2).reshape(B, Hq, Np).contiguous()
    if c.sched.depth:  # hashed once; each level takes its chunks
        q_rank, k_rank = lsh_ranks(q, k, p.lsh_num_projs, p.seed)
    for level, (count, size) in enumerate(c.sched.levels):
        ranks = (_chunks(q_rank, count, size, 1), _chunks(k_rank, count, size, 0))
        o_l, lse_l = noncausal_forward(
            Rows.chunks(q, count, size, 1),
            Rows.chunks(k, count, size, 0),
            Rows.chunks(v, count, size, 0),
            _even(valid, B, count, size),
            scale,
            p,
            level + 1,
            ranks,
            _even(c.sink, B, count, size),
            c.sched.strip,
        )
        acc_o = _unchunk_view(out, count, size, 1)  # [B, count, Hq, size, D] view into out
        acc_l = _unchunk_view(lse_all, count, size, 1)
        merge_(acc_o, acc_l, o_l.view(B, count, Hq, size, D), lse_l.view(B, count, Hq, size))
    return out[:, :, :N].to(q.dtype).contiguous(), lse_all[:, :, :N].to(lse_dtype(q.dtype)).contiguous()


def causal_backward(do, q, k, v, out, lse, key_valid, scale, p: HyperConfig, sink=None):
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    mdt = _mask_dtype(q.dtype)
    c = _causal_setup(q, k, v, key_valid, sink, p)
    q, k, v, valid = c.q, c.k, c.v, c.valid
    Np, leaf = c.sched.Np, c.sched.leaf
    do, out = _pad_rows(do, Np), _pad_rows(out, Np)
    lse = lse.to(lse_dtype(q.dtype)).masked_fill(torch.isneginf(lse), 0.0)
    if Np != N:
        lse = torch.nn.functional.pad(lse, (0, Np - N))
    pieces = Np // leaf
    leaf_bias = None if valid is None else _key_bias(valid.view(B * pieces, leaf), mdt)
    lv = lambda x: _leaf_view(x, pieces)  # noqa: E731
    dq, dk, dv = _flash_bwd(lv(do), lv(q), lv(k), lv(v), lv(out), lv(lse), leaf_bias, True, scale)
    unleaf = lambda x, H: x.view(B, pieces, H, leaf, D).transpose(1, 2).reshape(B, H, Np, D)  # noqa: E731
    dq, dk, dv = unleaf(dq, Hq).clone(), unleaf(dk, Hkv).clone(), unleaf(dv, Hkv).clone()
    if c.sched.depth:
        q_rank, k_rank = lsh_ranks(q, k, p.lsh_num_projs, p.seed)
    do, out, lse = do.contiguous(), out.contiguous(), lse.contiguous()
    for level, (count, size) in enumerate(c.sched.levels):
        odd = lambda x, count=count, size=size: Rows.chunks(x, count, size, 1)
        even = lambda x, count=count, size=size: Rows.chunks(x, count, size, 0)
        ranks = (_chunks(q_rank, count, size, 1), _chunks(k_rank, count, size, 0))
        dq_l, dk_l, dv_l = noncausal_backward(
            odd(do),
            odd(q),
            even(k),
            even(v),
            odd(out),
            _chunks(lse, count, size, 1),
            _even(valid, B, count, size),
            scale,
            p,
            level + 1,
            ranks,
            _even(c.sink, B, count, size),
            c.sched.strip,
        )
        _unchunk_view(dq, count, size, 1).add_(dq_l.view(B, count, Hq, size, D))
        _unchunk_view(dk, count, size, 0).add_(dk_l.view(B, count, Hkv, size, D))
        _unchunk_view(dv, count, size, 0).add_(dv_l.view(B, count, Hkv, size, D))
    return dq[:, :, :N].contiguous(), dk[:, :, :N].contiguous(), dv[:, :, :N].contiguous()


# ----------------------------------------------------------------------------------------------------------
# entry points: any n_q <= n_k when causal (bottom-right aligned), any lengths otherwise
# ----------------------------------------------------------------------------------------------------------


def _sinks(q, k, key_valid, p):
    return sink_mask(key_valid, q.shape[0], k.shape[2], p.sink_keys, q.device)


def attention_forward(q, k, v, key_valid, is_causal, scale, p: HyperConfig, serial: bool = True):
    """HyperAttention on CPU tensors. Returns contiguous ``(out, lse fp32)``."""
    with _Threads.serial(serial):
        return _attention_forward(q, k, v, key_valid, is_causal, scale, p)


def attention_backward(do, q, k, v, out, lse, key_valid, is_causal, scale, p: HyperConfig, serial: bool = True):
    with _Threads.serial(serial):
        return _attention_backward(do, q, k, v, out, lse, key_valid, is_causal, scale, p)


def _attention_forward(q, k, v, key_valid, is_causal, scale, p: HyperConfig):
    sink = _sinks(q, k, key_valid, p)
    if not is_causal:
        return noncausal_forward(q, k, v, key_valid, scale, p, sink=sink, band=_band(q, k, p))
    prefix = k.shape[2] - q.shape[2]
    if prefix == 0:
        return causal_forward(q, k, v, key_valid, scale, p, sink)
    (kv_head, kv_tail), (s_head, s_tail) = split_keys(key_valid, prefix), split_keys(sink, prefix)
    out, lse = causal_forward(q, k[:, :, prefix:], v[:, :, prefix:], kv_tail, scale, p, s_tail)
    o2, l2 = noncausal_forward(
        q, k[:, :, :prefix], v[:, :, :prefix], kv_head, scale, p, -1, None, s_head, window_strip(p)
    )
    acc = out.to(lse_dtype(q.dtype))
    merge_(acc, lse, o2, l2)
    return acc.to(q.dtype), lse


def _attention_backward(do, q, k, v, out, lse, key_valid, is_causal, scale, p: HyperConfig):
    sink = _sinks(q, k, key_valid, p)
    if not is_causal:
        return noncausal_backward(do, q, k, v, out, lse, key_valid, scale, p, sink=sink, band=_band(q, k, p))
    prefix = k.shape[2] - q.shape[2]
    if prefix == 0:
        return causal_backward(do, q, k, v, out, lse, key_valid, scale, p, sink)
    (kv_head, kv_tail), (s_head, s_tail) = split_keys(key_valid, prefix), split_keys(sink, prefix)
    dq, dk2, dv2 = causal_backward(do, q, k[:, :, prefix:], v[:, :, prefix:], out, lse, kv_tail, scale, p, s_tail)
    dq1, dk1, dv1 = noncausal_backward(
        do, q, k[:, :, :prefix], v[:, :, :prefix], out, lse, kv_head, scale, p, -1, None, s_head, window_strip(p)
    )
    return dq + dq1, torch.cat([dk1, dk2], 2), torch.cat([dv1, dv2], 2)


def _band(q, k, p):
    """The centred local window of non-causal self-attention, or None (cross-attention has none)."""
    return window_band(q.shape[2], k.shape[2], p)


# ----------------------------------------------------------------------------------------------------------
# hyper::window_attention: exact attention to a band of keys (`band_forward`), or one plain call when the band
# covers (nearly) every key
# ----------------------------------------------------------------------------------------------------------

_DENSE_BIAS_ELEMENTS = 1 << 25  # the dense schedule's bias is built for this many (query, key) pairs at a time


_TILES = (32, 64, 128, 256, 512, 1024)
_BAND_MARGIN = 0.8  # tiles are used only when the model predicts them at least 1/0.8 = 1.25x cheaper
# the band schedule's fixed cost (its gathers, masks and scatters: ~2 ms on the busy 2 cores) in the same units,
# (query, key) pairs of one head at d = 64: at H = 1 it keeps n = 1024-2048 on the dense call, where tiles measured
# 0.8-1.0x SDPA (bench/attention.py --window 128 512 --heads 1)
_BAND_OVERHEAD = 3e5


def band_cost(Nq: int, band, tile: int) -> float:
    """Modelled cost of `band_forward` in (query, key) pairs of one dense fused call: every tile computes all of
    its ``tile + a + b`` slots, and a tile of t rows runs at about ``1 / (1 + 64 / t)`` of the dense kernel's
    rate (aten's CPU kernel splits a tile below 192 rows into 32-row blocks; per-tile overhead).

    Measured (2 shared cores, load 3.1-3.8, H=8, d=64, fp32, forward; dense schedule time / band time, the
    model's prediction in brackets; ``*`` = the tile `window_schedule` picks, ``-`` = it picks dense):
      n=256  causal w=128: T64 0.42 [0.67] -   symmetric w=128: T64 0.88 [0.40] -
      n=512  causal w=128: T64 1.88 [1.34] *   symmetric w=128: T128 0.72 [0.89] -
      n=1024 causal w=128: T64 3.02 [2.68] *   symmetric w=128: T128 2.17 [1.78] *
      n=1024 causal w=512: T256 1.53 [1.07] -  symmetric w=512: T256 0.66 [0.64] -
      n=2048 causal w=128: T64 5.96 [5.36] *   symmetric w=128: T128 4.11 [3.56] *
      n=2048 causal w=512: T128 2.06 [2.14] *  symmetric w=512: T256 1.45 [1.28] *
    So the crossover is at n ~ 512 for w = 128 and n ~ 1024-2048 for w = 512; below it the dense schedule (one
    fused call with the band as a bias, which costs what SDPA with the dense mask costs) is the faster one, and
    the model errs on the side of dense (it never picks tiles that measured slower)."""
    a, b = band
    t = max(1, min(tile, Nq))
    return math.ceil(Nq / t) * t * (t + a + b) * (1.0 + 64.0 / t)


def window_schedule(Nq: int, Nk: int, band, heads: int = 1, head_dim: int = 64) -> tuple:
    """How `window_forward` computes a band ``(a, b)`` (already clamped: a <= Nk - 1, b <= Nq - 1):

    - ``("full", 0)``: the band holds every key: one plain fused call (key padding as a [B, 1, 1, Nk] bias);
    - ``("causal", 0)``: it is exactly top-left causal (j <= i; unbounded left and Nk - Nq + b == 0): one fused
      causal call, which skips the blocks above the diagonal;
    - ``("band", tile)``: `band_forward` with the tile of least `band_cost`, when that (times ``heads``, the
      batch times the query heads, and head_dim / 64, plus ``_BAND_OVERHEAD``) is below ``_BAND_MARGIN`` times
      the dense call's Nq * Nk pairs (times the same);
    - ``("dense", 0)``: otherwise (the band covers most keys, or n is small): one fused call per chunk of query
      rows with the band as a dense bias, which costs what SDPA with the dense mask costs.
    """
    a, b = band
    if a >= Nk - 1 and b >= Nq - 1:
        return "full", 0
    if a >= Nk - 1 and Nk - Nq + b == 0:
        return "causal", 0  # aten's causal flag is top-left aligned: key j <= query i
    cost, tile = min((band_cost(Nq, band, t), t) for t in _TILES if t < 2 * Nq or t == _TILES[0])
    work = max(1, heads) * max(1, head_dim) / 64.0
    return ("band", tile) if cost * work + _BAND_OVERHEAD < _BAND_MARGIN * Nq * Nk * work else ("dense", 0)


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


def _every_row_has_a_key(Nq, Nk, band, keys) -> bool:
    """Without key padding row i's window [i + Nk - Nq - a, i + Nk - Nq + b] meets [0, Nk) iff Nk - Nq + b >= 0."""
    return keys is None and Nk - Nq + band[1] >= 0


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
    with _Threads.serial(serial):  # masks and gathers on one thread, the fused calls on all (`_Threads`)
        mdt = _mask_dtype(q.dtype)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if kind == "band":
            out, lse = band_forward(q, k, v, key_valid, band, scale, tile)
        elif kind in ("full", "causal"):
            out, lse = _flash(q, k, v, _key_bias(key_valid, mdt), kind == "causal", scale)
        else:
            out = torch.empty(B, Hq, Nq, D, dtype=q.dtype, device=q.device)
            lse = torch.empty(B, Hq, Nq, dtype=lse_dtype(q.dtype), device=q.device)
            for rows in _row_chunks(Nq, Nk, 1 if key_valid is None else B):
                sl = slice(rows.start, rows.stop)
                bias = _dense_window_bias(B, rows, Nq, Nk, band, key_valid, mdt, q.device)
                o, l = _flash(q[:, :, sl], k, v, bias, False, scale)
                out[:, :, sl], lse[:, :, sl] = o, l
        if kind != "band" and not _every_row_has_a_key(Nq, Nk, band, key_valid):  # band_forward did it
            lse = _no_keys(lse, _window_any(B, Nq, Nk, band, key_valid, q.device))
        return out.contiguous(), lse.to(lse_dtype(q.dtype)).contiguous()


def window_backward(do, q, k, v, out, lse, key_valid, band, scale, schedule=None, serial: bool = True):
    """Gradients ``(dq, dk, dv)`` of `window_forward` (contiguous, in the inputs' dtypes)."""
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    kind, tile = schedule or window_schedule(Nq, Nk, band, B * Hq, D)
    with _Threads.serial(serial):
        mdt = _mask_dtype(q.dtype)
        lse = lse.to(lse_dtype(q.dtype)).masked_fill(torch.isneginf(lse), 0.0).contiguous()
        do, q, k, v, out = (x.contiguous() for x in (do, q, k, v, out))
        if kind == "band":
            acc = lse_dtype(q.dtype)
            dq, dk, dv = band_backward(do, q, k, v, out, lse, key_valid, band, scale, tile, acc)
        elif kind in ("full", "causal"):
            dq, dk, dv = _flash_bwd(do, q, k, v, out, lse, _key_bias(key_valid, mdt), kind == "causal", scale)
        else:
            acc = lse_dtype(q.dtype)
            dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            dk = torch.zeros(k.shape, dtype=acc, device=q.device)
            dv = torch.zeros(v.shape, dtype=acc, device=q.device)
            for rows in _row_chunks(Nq, Nk, 1 if key_valid is None else B):
                sl = slice(rows.start, rows.stop)
                bias = _dense_window_bias(B, rows, Nq, Nk, band, key_valid, mdt, q.device)
                dq_c, dk_c, dv_c = _flash_bwd(
                    do[:, :, sl], q[:, :, sl], k, v, out[:, :, sl], lse[:, :, sl].contiguous(), bias, False, scale
                )
                dq[:, :, sl] = dq_c
                dk += dk_c
                dv += dv_c
        return (dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous())
