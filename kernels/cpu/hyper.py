"""Non-causal HyperAttention on CPU: a ``"hyper"`` part of a call plan as a few batched aten calls.

Layout trick. Sorted query blocks are gathered straight into ``[B, Hkv*nb*g, bq, D]`` (kv head, block, query
head within the group, row), and sorted key blocks into ``[B, Hkv*nb, bk, D]``. aten's GQA maps folded query
head j to key head j // g, which is exactly "block i of query head h sees block i of kv head h // g": the whole
block diagonal is one fused call, and K/V are never expanded. The residual uses the same query layout against
``[B, Hkv, m, D]`` sampled keys, with group nb*g; a broadcast ``[.., 1, m]`` bias excludes each block's own keys
and carries the log(n/m) reweighting, so its log-sum-exp is already weighted. The parts merge through their
log-sum-exps, and one ``index_copy_`` puts rows back in their original order. Operands are `Rows`: a part's
sub-problems (the quadrants of a causal level) are gathered straight from the whole sequence.

Backward: the approximation is attention with fixed log-weights, so each part's gradient is aten's flash
backward for that part, fed the *final* output and log-sum-exp (the standard split-softmax identity). Sampled
keys' gradients are scattered back with ``index_add_``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..draws import Draws
from ..parts import HyperInputs
from ..plan import Part, lse_dtype
from .band import in_band
from .threads import NEG_INF, flash, flash_bwd, mask_dtype, merge_, no_keys


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
    def of_part(x: torch.Tensor, part: Part, queries: bool) -> Rows:
        """The sub-problems of a plan part in contiguous ``x [B, H, L, D]`` (its queries, or its keys), batched as
        ``[B*count, H, s, D]`` (the layout of `parts.sub_view`)."""
        B, H, L, D = x.shape
        off, s = (part.q_off, part.sq) if queries else (part.k_off, part.sk)
        if part.count == 1 and off == 0 and s == L:
            return Rows.of(x)
        dev = x.device
        b = torch.arange(B, device=dev).view(B, 1, 1)
        c = torch.arange(part.count, device=dev).view(1, part.count, 1)
        h = torch.arange(H, device=dev).view(1, 1, H)
        base = ((b * H + h) * L + c * part.chunk + off).view(B * part.count, H)
        return Rows(x.reshape(-1, D), base, (B * part.count, H, s, D))

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


def _layout(draws: Draws, B, Hq, Hkv, Nq, Nk, key_valid, mask_dtype, extras=None, band=None) -> _Layout:
    dev = draws.q_perm.device
    g, nb, bq, bk = Hq // Hkv, draws.num_blocks, draws.q_block, draws.k_block
    q_pad, k_pad = nb * bq - Nq, nb * bk - Nk
    # queries: [B, Hq, nb*bq] -> folded [B, Hkv, nb, g, bq]
    qp = torch.nn.functional.pad(draws.q_perm, (0, q_pad), value=-1) if q_pad else draws.q_perm
    qp = qp.view(B, Hkv, g, nb, bq).permute(0, 1, 3, 2, 4)
    q_pos = qp.clamp(min=0)
    q_group = (torch.arange(B * Hq, device=dev) * Nq).view(B, Hkv, 1, g, 1)
    q_inv = _inverse((q_pos + q_group).masked_fill(qp < 0, B * Hq * Nq).reshape(-1), B * Hq * Nq)
    # keys: [B, Hkv, nb*bk]
    kp = torch.nn.functional.pad(draws.k_perm, (0, k_pad), value=-1) if k_pad else draws.k_perm
    k_group = (torch.arange(B * Hkv, device=dev) * Nk).view(B, Hkv, 1)
    k_inv = _inverse((kp.clamp(min=0) + k_group).masked_fill(kp < 0, B * Hkv * Nk).reshape(-1), B * Hkv * Nk)
    k_ok = kp >= 0
    if key_valid is not None:
        k_ok = k_ok & torch.gather(key_valid[:, None, :].expand(B, Hkv, Nk), 2, kp.clamp(min=0))
    block_bias = block_any = None
    if band is not None:  # per (query, key): a key in the query's window is served by the band part instead
        ok = k_ok.view(B, Hkv, nb, 1, 1, bk) & ~in_band(
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
        draws, B, Hkv, g, key_valid, extras, mask_dtype, None if band is None else (q_pos, band)
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


def _side_keys(draws: Draws, B, Hkv, g, key_valid, extras, mask_dtype, band=None):
    """Keys every block attends to besides its own: the residual draws (log-weighted, excluding the block's
    own keys) followed by the exact keys of ``extras = (pos [B, e], ok [B, e])`` (log-weight 0).

    Returns ``(pos [B, Hkv, t], bias [B, Hkv*nb*g, 1, t], any [B, Hkv*nb*g, 1])``, or Nones when t = 0. With
    ``band = (q_pos, (a, b))`` the bias is per query row (``[.., bq, t]``): draws inside a query's local window
    are dropped for that query (the window serves them exactly)."""
    nb, dev = draws.num_blocks, draws.q_perm.device
    pos, bias = [], []
    neg = torch.full((), NEG_INF, dtype=mask_dtype, device=dev)
    if draws.samples is not None:
        blk = torch.arange(nb, device=dev).view(1, 1, nb, 1)
        ok = draws.sample_block[:, :, None, :] != blk  # [B, Hkv, nb, m]
        if key_valid is not None:
            s_valid = torch.gather(key_valid[:, None, :].expand(B, Hkv, key_valid.shape[-1]), 2, draws.samples)
            ok = ok & s_valid[:, :, None, :]
        bias.append(torch.where(ok, draws.sample_log_weight.to(mask_dtype)[:, :, None, :], neg))
        pos.append(draws.samples)
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
        if draws.samples is not None:
            drop = in_band(q_pos[..., None], draws.samples[:, :, None, None, None, :], ab)  # [B, Hkv, nb, g, bq, m]
            full[..., : draws.samples.shape[-1]].masked_fill_(drop, NEG_INF)
        bias = full.reshape(B, Hkv * nb * g, bq, t)
    return pos, bias, torch.isfinite(bias).any(-1)


def _folded_rows(src: Rows, q_pos: torch.Tensor, Hkv: int) -> torch.Tensor:
    """Flat row index of every folded query slot ``[B, Hkv, nb, g, bq]`` of ``src`` (``[B, Hq, Nq, D]``)."""
    B, Hq = src.base.shape
    g = Hq // Hkv
    return (q_pos + src.base.view(B, Hkv, 1, g, 1)).reshape(-1)


def _part_layout(q: Rows, k: Rows, inputs: HyperInputs, window) -> _Layout:
    """The `_Layout` of a ``"hyper"`` part's rows, keys and draws."""
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    return _layout(inputs.draws, B, Hq, Hkv, Nq, Nk, inputs.est, mask_dtype(q.data.dtype), inputs.extras, window)


def hyper_forward(q: Rows, k: Rows, v: Rows, inputs: HyperInputs, scale, window=None):
    """A ``"hyper"`` part: ``q [S,Hq,sq,D]``, ``k, v [S,Hkv,sk,D]`` (`Rows`) and its `HyperInputs` -> contiguous
    ``(out [S,Hq,sq,D], lse [S,Hq,sq])``. ``window = (a, b)``: the pairs inside each query's centred window are
    left out (the plan's ``"band"`` part serves them)."""
    B, Hq, Nq, D = q.shape
    Hkv = k.shape[1]
    dtype, L = q.data.dtype, _part_layout(q, k, inputs, window)
    g, nb, bq, bk = Hq // Hkv, inputs.draws.num_blocks, inputs.draws.q_block, inputs.draws.k_block
    q_rows = _folded_rows(q, L.q_pos, Hkv)
    q_s = q.data.index_select(0, q_rows).view(B, Hkv * nb * g, bq, D)  # [B, Hkv*nb*g, bq, D]
    k_b = k.gather(L.k_pos).view(B, Hkv * nb, bk, D)  # [B, Hkv*nb, bk, D]
    v_b = v.gather(L.k_pos).view(B, Hkv * nb, bk, D)
    o, lse = flash(q_s, k_b, v_b, L.block_bias, False, scale)  # [B, Hkv*nb*g, bq, D], [B, Hkv*nb*g, bq]
    lse = no_keys(lse, L.block_any)
    if L.side_pos is not None:  # residual draws and exact keys: one call for every block
        o2, lse2 = flash(q_s, k.gather(L.side_pos), v.gather(L.side_pos), L.res_bias, False, scale)
        lse2 = no_keys(lse2, L.res_any)
        acc = o.float() if o.dtype not in (torch.float32, torch.float64) else o.contiguous()
        lse = lse.contiguous()
        merge_(acc, lse, o2, lse2)
        o = acc.to(dtype)
    out = o.reshape(-1, D).index_select(0, L.q_inv).view(B, Hq, Nq, D)
    lse = lse.reshape(-1).index_select(0, L.q_inv).view(B, Hq, Nq).to(lse_dtype(dtype))
    return out, lse


def hyper_backward(do: Rows, q: Rows, k: Rows, v: Rows, out: Rows, lse, inputs: HyperInputs, scale, window=None):
    """Gradients of `hyper_forward` given the *final* ``out`` (`Rows`) and ``lse [S,Hq,sq]`` (-inf already 0) of
    the rows, which may include other parts merged in. Returns contiguous ``(dq, dk, dv)``."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    dtype, L = q.data.dtype, _part_layout(q, k, inputs, window)
    g, nb, bq, bk = Hq // Hkv, inputs.draws.num_blocks, inputs.draws.q_block, inputs.draws.k_block
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
    dq_s, dk_b, dv_b = flash_bwd(do_s, q_s, k_b, v_b, o_s, lse_s, L.block_bias, False, scale)
    dk = dk_b.reshape(-1, D).index_select(0, L.k_inv).view(B, Hkv, Nk, D)
    dv = dv_b.reshape(-1, D).index_select(0, L.k_inv).view(B, Hkv, Nk, D)
    if L.side_pos is not None:
        # A sink key takes one part from every query block, and the parts cancel: in a half dtype, rounding each
        # part before the sum costs up to 8x eager's error at 256 blocks. So the side call runs in fp32 and the
        # parts are summed in fp32, rounded once.
        acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        up = lambda x: x.to(acc)  # noqa: E731
        dq2, dk_s, dv_s = flash_bwd(
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
    return dq, dk, dv
