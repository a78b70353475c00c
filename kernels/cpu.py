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

Backward: the approximation is attention with fixed log-weights, so each part's gradient is aten's flash
backward for that part, fed the *final* output and log-sum-exp (the standard split-softmax identity). Sampled
keys' gradients are scattered back with ``index_add_``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .plan import Plan, _chunks, _depth, _pad_rows, _use_hyper, lse_dtype, lsh_ranks, make_plan, plan_from_ranks

aten = torch.ops.aten
NEG_INF = float("-inf")


class Params(NamedTuple):
    block_size: int
    sample_size: int
    num_projs: int
    min_seq_len: int
    causal_depth: Optional[int]
    seed: int


# ----------------------------------------------------------------------------------------------------------
# exact attention parts
# ----------------------------------------------------------------------------------------------------------

def _flash(q, k, v, mask, causal, scale):
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    return out, lse


def _flash_bwd(do, q, k, v, out, lse, mask, causal, scale):
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale)


def _key_bias(key_valid, dtype):
    """``[B, Nk]`` bool -> ``[B, 1, 1, Nk]`` additive bias, or None."""
    if key_valid is None:
        return None
    return torch.zeros(key_valid.shape, dtype=dtype, device=key_valid.device).masked_fill_(
        ~key_valid, NEG_INF)[:, None, None, :]


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
    whole: Optional[torch.Tensor] = None  # the operand itself, when it is a whole tensor

    @staticmethod
    def of(x: torch.Tensor) -> "Rows":
        """All of ``x [B, H, S, D]``."""
        B, H, S, D = x.shape
        base = (torch.arange(B * H, device=x.device) * S).view(B, H)
        x = x.contiguous()
        return Rows(x.view(-1, D), base, tuple(x.shape), x)

    @staticmethod
    def chunks(x: torch.Tensor, count: int, size: int, parity: int) -> "Rows":
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
    block_bias: Optional[torch.Tensor]  # [B, Hkv*nb*g, 1, bk] or None
    block_any: Optional[torch.Tensor]  # [B, Hkv*nb*g, 1] rows that have at least one block key
    res_bias: Optional[torch.Tensor]  # [B, Hkv*nb*g, 1, m]
    res_any: Optional[torch.Tensor]  # [B, Hkv*nb*g, 1]
    q_pad: int  # padded query slots at the end of the last block


def _inverse(dest: torch.Tensor, total: int) -> torch.Tensor:
    """``inv[row] = slot`` for ``dest[slot] = row``; padding slots point at the dummy row ``total``."""
    inv = torch.empty(total + 1, dtype=torch.int64, device=dest.device)
    inv.index_copy_(0, dest, torch.arange(dest.numel(), device=dest.device))
    return inv[:-1]


def _layout(plan: Plan, B, Hq, Hkv, Nq, Nk, key_valid, mask_dtype) -> _Layout:
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
    if k_pad or key_valid is not None:
        ok = k_ok.view(B, Hkv, nb, 1, 1, bk).expand(B, Hkv, nb, g, 1, bk)
        block_bias = torch.zeros(ok.shape, dtype=mask_dtype, device=dev).masked_fill_(~ok, NEG_INF)
        block_bias = block_bias.reshape(B, Hkv * nb * g, 1, bk)
        block_any = ok.any(-1).reshape(B, Hkv * nb * g, 1)
    res_bias = res_any = None
    if plan.samples is not None:
        m = plan.samples.shape[-1]
        blk = torch.arange(nb, device=dev).view(1, 1, nb, 1)
        ok = plan.sample_block[:, :, None, :] != blk  # [B, Hkv, nb, m]
        if key_valid is not None:
            s_valid = torch.gather(key_valid[:, None, :].expand(B, Hkv, Nk), 2, plan.samples)
            ok = ok & s_valid[:, :, None, :]
        ok = ok[:, :, :, None, None, :].expand(B, Hkv, nb, g, 1, m)
        lw = plan.log_weight.to(mask_dtype).view(B, 1, 1, 1, 1, 1)
        res_bias = torch.where(ok, lw, torch.full((), NEG_INF, dtype=mask_dtype, device=dev))
        res_bias = res_bias.reshape(B, Hkv * nb * g, 1, m)
        res_any = ok.any(-1).reshape(B, Hkv * nb * g, 1)
    return _Layout(q_pos, q_inv, kp.clamp(min=0), k_inv, block_bias, block_any, res_bias, res_any, q_pad)


def _folded_rows(src: Rows, q_pos: torch.Tensor, Hkv: int) -> torch.Tensor:
    """Flat row index of every folded query slot ``[B, Hkv, nb, g, bq]`` of ``src`` (``[B, Hq, Nq, D]``)."""
    B, Hq = src.base.shape
    g = Hq // Hkv
    return (q_pos + src.base.view(B, Hkv, 1, g, 1)).reshape(-1)


def noncausal_forward(q, k, v, key_valid, scale, p: Params, stream: int = 0, ranks=None):
    """``q [B,Hq,Nq,D]``, ``k, v [B,Hkv,Nk,D]`` (tensors or `Rows`) -> contiguous ``(out [B,Hq,Nq,D], lse [B,Hq,Nq])``.

    ``ranks``: precomputed ``(q_rank, k_rank)`` bucket ranks of these rows (see `plan.lsh_ranks`)."""
    q, k, v = (x if isinstance(x, Rows) else Rows.of(x) for x in (q, k, v))
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    dtype = q.data.dtype
    mdt = _mask_dtype(dtype)
    if not _use_hyper(Nq, Nk, p):
        out, lse = _flash(q.dense(), k.dense(), v.dense(), _key_bias(key_valid, mdt), False, scale)
        if key_valid is not None:
            lse = _no_keys(lse, key_valid.any(-1)[:, None, None].expand_as(lse))
        return out.contiguous(), lse.to(lse_dtype(dtype)).contiguous()
    plan = _plan(q, k, key_valid, p, stream, ranks)
    L = _layout(plan, B, Hq, Hkv, Nq, Nk, key_valid, mdt)
    g, nb, bq, bk = Hq // Hkv, plan.num_blocks, plan.q_block, plan.k_block
    q_rows = _folded_rows(q, L.q_pos, Hkv)
    q_s = q.data.index_select(0, q_rows).view(B, Hkv * nb * g, bq, D)  # [B, Hkv*nb*g, bq, D]
    k_b = k.gather(L.k_pos).view(B, Hkv * nb, bk, D)  # [B, Hkv*nb, bk, D]
    v_b = v.gather(L.k_pos).view(B, Hkv * nb, bk, D)
    o, lse = _flash(q_s, k_b, v_b, L.block_bias, False, scale)  # [B, Hkv*nb*g, bq, D], [B, Hkv*nb*g, bq]
    lse = _no_keys(lse, L.block_any)
    if plan.samples is not None:
        k_s = k.gather(plan.samples)  # [B, Hkv, m, D]
        v_s = v.gather(plan.samples)
        o2, lse2 = _flash(q_s, k_s, v_s, L.res_bias, False, scale)
        lse2 = _no_keys(lse2, L.res_any)
        acc = o.float() if o.dtype not in (torch.float32, torch.float64) else o.contiguous()
        lse = lse.contiguous()
        merge_(acc, lse, o2, lse2)
        o = acc.to(dtype)
    out = o.reshape(-1, D).index_select(0, L.q_inv).view(B, Hq, Nq, D)
    lse = lse.reshape(-1).index_select(0, L.q_inv).view(B, Hq, Nq).to(lse_dtype(dtype))
    return out, lse


def _plan(q: Rows, k: Rows, key_valid, p: Params, stream, ranks):
    if ranks is None:
        return make_plan(q.dense(), k.dense(), key_valid, p.block_size, p.sample_size, p.num_projs, p.seed, stream)
    return plan_from_ranks(ranks[0], ranks[1], key_valid, p.block_size, p.sample_size, p.num_projs, p.seed, stream)


def noncausal_backward(do, q, k, v, out, lse, key_valid, scale, p: Params, stream: int = 0, ranks=None):
    """Gradient of `noncausal_forward` given the *final* ``out``/``lse`` of the rows (which may include other
    parts merged in by the caller). Operands are tensors or `Rows`; returns contiguous ``(dq, dk, dv)``."""
    do, q, k, v, out = (x if isinstance(x, Rows) else Rows.of(x) for x in (do, q, k, v, out))
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    dtype = q.data.dtype
    mdt = _mask_dtype(dtype)
    lse = lse.to(lse_dtype(dtype)).masked_fill(torch.isneginf(lse), 0.0)  # rows with no keys: no NaN
    if not _use_hyper(Nq, Nk, p):
        dq, dk, dv = _flash_bwd(do.dense(), q.dense(), k.dense(), v.dense(), out.dense(), lse.contiguous(),
                                _key_bias(key_valid, mdt), False, scale)
        return dq, dk, dv
    plan = _plan(q, k, key_valid, p, stream, ranks)
    L = _layout(plan, B, Hq, Hkv, Nq, Nk, key_valid, mdt)
    g, nb, bq, bk = Hq // Hkv, plan.num_blocks, plan.q_block, plan.k_block
    fold = (B, Hkv * nb * g, bq, D)
    q_s = q.data.index_select(0, _folded_rows(q, L.q_pos, Hkv)).view(fold)
    do_s = do.data.index_select(0, _folded_rows(do, L.q_pos, Hkv)).view(fold)
    o_s = out.data.index_select(0, _folded_rows(out, L.q_pos, Hkv)).view(fold)
    lse_rows = Rows.of(lse[..., None])
    lse_s = lse_rows.data.index_select(0, _folded_rows(lse_rows, L.q_pos, Hkv)).view(fold[:3])
    if L.q_pad:  # padded query slots gathered row 0: silence them
        do_s.view(B, Hkv, nb, g, bq, D)[:, :, -1, :, bq - L.q_pad:] = 0
    k_b = k.gather(L.k_pos).view(B, Hkv * nb, bk, D)
    v_b = v.gather(L.k_pos).view(B, Hkv * nb, bk, D)
    dq_s, dk_b, dv_b = _flash_bwd(do_s, q_s, k_b, v_b, o_s, lse_s, L.block_bias, False, scale)
    dk = dk_b.reshape(-1, D).index_select(0, L.k_inv).view(B, Hkv, Nk, D)
    dv = dv_b.reshape(-1, D).index_select(0, L.k_inv).view(B, Hkv, Nk, D)
    if plan.samples is not None:
        k_s = k.gather(plan.samples)
        v_s = v.gather(plan.samples)
        dq2, dk_s, dv_s = _flash_bwd(do_s, q_s, k_s, v_s, o_s, lse_s, L.res_bias, False, scale)
        dq_s = dq_s + dq2
        s_rows = Rows.of(dk).flat_index(plan.samples)
        dk.view(-1, D).index_add_(0, s_rows, dk_s.reshape(-1, D).to(dk.dtype))
        dv.view(-1, D).index_add_(0, s_rows, dv_s.reshape(-1, D).to(dv.dtype))
    dq = dq_s.reshape(-1, D).index_select(0, L.q_inv).view(B, Hq, Nq, D)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------
# causal HyperAttention: recursive halving, one batched call per level
# ----------------------------------------------------------------------------------------------------------

def causal_uses_hyper(N, p: Params) -> bool:
    """Whether causal attention of length N approximates anything (the top quadrant is the largest)."""
    depth = _depth(N, p)
    if depth == 0:
        return False
    half = math.ceil(N / 2**depth) * 2 ** (depth - 1)
    return _use_hyper(half, half, p)


def _unchunk_view(x, count, size, parity):
    """A view of ``x [B, H, N, ...]`` onto the same chunks as `_chunks`, shaped ``[B, count, H, size, ...]``."""
    B, H = x.shape[:2]
    rest = x.shape[3:]
    return x.view(B, H, count, 2, size, *rest)[:, :, :, parity].transpose(1, 2)


def _leaf_view(x, pieces):
    B, H, N = x.shape[:3]
    return x.reshape(B, H, pieces, N // pieces, *x.shape[3:]).transpose(1, 2).reshape(
        B * pieces, H, N // pieces, *x.shape[3:])


def _causal_setup(q, k, v, key_valid, p: Params):
    B, Hq, N, D = q.shape
    depth = _depth(N, p)
    pieces = 2**depth
    Np = math.ceil(N / pieces) * pieces
    valid = None if key_valid is None else key_valid.contiguous()  # sliced/expanded masks are viewed below
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if Np != N:
        q, k, v = _pad_rows(q, Np), _pad_rows(k, Np), _pad_rows(v, Np)
        valid = torch.zeros(B, Np, dtype=torch.bool, device=q.device)
        valid[:, :N] = True if key_valid is None else key_valid
    return q, k, v, valid, depth, Np


def causal_forward(q, k, v, key_valid, scale, p: Params):
    """Causal HyperAttention with n_q == n_k: ``(out [B,Hq,N,D], lse [B,Hq,N])``."""
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    mdt = _mask_dtype(q.dtype)
    if key_valid is None and _depth(N, p) == 0:  # exact: hand straight to aten
        out, lse = _flash(q, k, v, None, True, scale)
        return out.contiguous(), lse.to(lse_dtype(q.dtype)).contiguous()
    q, k, v, valid, depth, Np = _causal_setup(q, k, v, key_valid, p)
    pieces = 2**depth
    leaf = Np // pieces
    # leaves: [B*pieces, H, leaf, D], exact causal
    leaf_bias = None if valid is None else _key_bias(valid.view(B * pieces, leaf), mdt)
    o, lse = _flash(_leaf_view(q, pieces), _leaf_view(k, pieces), _leaf_view(v, pieces), leaf_bias, True, scale)
    if valid is not None:  # a row whose visible keys are all masked
        lse = _no_keys(lse, (valid.view(B * pieces, 1, leaf).cumsum(-1) > 0).expand_as(lse))
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = o.to(acc_dtype).reshape(B, pieces, Hq, leaf, D).transpose(1, 2).reshape(B, Hq, Np, D).contiguous()
    lse_all = lse.reshape(B, pieces, Hq, leaf).transpose(1, 2).reshape(B, Hq, Np).contiguous()
    if depth:  # hashed once; each level takes its chunks
        q_rank, k_rank = lsh_ranks(q, k, p.num_projs, p.seed)
    for level in range(depth):
        count, size = 2**level, Np // 2 ** (level + 1)
        kv_s = None if valid is None else valid.view(B, count, 2, size)[:, :, 0].reshape(B * count, size)
        ranks = (_chunks(q_rank, count, size, 1), _chunks(k_rank, count, size, 0))
        o_l, lse_l = noncausal_forward(Rows.chunks(q, count, size, 1), Rows.chunks(k, count, size, 0),
                                       Rows.chunks(v, count, size, 0), kv_s, scale, p, level + 1, ranks)
        acc_o = _unchunk_view(out, count, size, 1)  # [B, count, Hq, size, D] view into out
        acc_l = _unchunk_view(lse_all, count, size, 1)
        merge_(acc_o, acc_l, o_l.view(B, count, Hq, size, D), lse_l.view(B, count, Hq, size))
    return out[:, :, :N].to(q.dtype).contiguous(), lse_all[:, :, :N].to(lse_dtype(q.dtype)).contiguous()


def causal_backward(do, q, k, v, out, lse, key_valid, scale, p: Params):
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    mdt = _mask_dtype(q.dtype)
    q, k, v, valid, depth, Np = _causal_setup(q, k, v, key_valid, p)
    do, out = _pad_rows(do, Np), _pad_rows(out, Np)
    lse = lse.to(lse_dtype(q.dtype)).masked_fill(torch.isneginf(lse), 0.0)
    if Np != N:
        lse = torch.nn.functional.pad(lse, (0, Np - N))
    pieces = 2**depth
    leaf = Np // pieces
    leaf_bias = None if valid is None else _key_bias(valid.view(B * pieces, leaf), mdt)
    lv = lambda x: _leaf_view(x, pieces)  # noqa: E731
    dq, dk, dv = _flash_bwd(lv(do), lv(q), lv(k), lv(v), lv(out), lv(lse), leaf_bias, True, scale)
    unleaf = lambda x, H: x.view(B, pieces, H, leaf, D).transpose(1, 2).reshape(B, H, Np, D)  # noqa: E731
    dq, dk, dv = unleaf(dq, Hq).clone(), unleaf(dk, Hkv).clone(), unleaf(dv, Hkv).clone()
    if depth:
        q_rank, k_rank = lsh_ranks(q, k, p.num_projs, p.seed)
    do, out, lse = do.contiguous(), out.contiguous(), lse.contiguous()
    for level in range(depth):
        count, size = 2**level, Np // 2 ** (level + 1)
        odd = lambda x: Rows.chunks(x, count, size, 1)  # noqa: E731
        even = lambda x: Rows.chunks(x, count, size, 0)  # noqa: E731
        kv_s = None if valid is None else valid.view(B, count, 2, size)[:, :, 0].reshape(B * count, size)
        ranks = (_chunks(q_rank, count, size, 1), _chunks(k_rank, count, size, 0))
        dq_l, dk_l, dv_l = noncausal_backward(odd(do), odd(q), even(k), even(v), odd(out),
                                              _chunks(lse, count, size, 1), kv_s, scale, p, level + 1, ranks)
        _unchunk_view(dq, count, size, 1).add_(dq_l.view(B, count, Hq, size, D))
        _unchunk_view(dk, count, size, 0).add_(dk_l.view(B, count, Hkv, size, D))
        _unchunk_view(dv, count, size, 0).add_(dv_l.view(B, count, Hkv, size, D))
    return dq[:, :, :N].contiguous(), dk[:, :, :N].contiguous(), dv[:, :, :N].contiguous()


# ----------------------------------------------------------------------------------------------------------
# entry points: any n_q <= n_k when causal (bottom-right aligned), any lengths otherwise
# ----------------------------------------------------------------------------------------------------------

def _split(key_valid, prefix):
    if key_valid is None:
        return None, None
    return key_valid[:, :prefix], key_valid[:, prefix:]


def attention_forward(q, k, v, key_valid, is_causal, scale, p: Params):
    """HyperAttention on CPU tensors. Returns contiguous ``(out, lse fp32)``."""
    if not is_causal:
        return noncausal_forward(q, k, v, key_valid, scale, p)
    prefix = k.shape[2] - q.shape[2]
    if prefix == 0:
        return causal_forward(q, k, v, key_valid, scale, p)
    kv_head, kv_tail = _split(key_valid, prefix)
    out, lse = causal_forward(q, k[:, :, prefix:], v[:, :, prefix:], kv_tail, scale, p)
    o2, l2 = noncausal_forward(q, k[:, :, :prefix], v[:, :, :prefix], kv_head, scale, p, stream=-1)
    acc = out.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    merge_(acc, lse, o2, l2)
    return acc.to(q.dtype), lse


def attention_backward(do, q, k, v, out, lse, key_valid, is_causal, scale, p: Params):
    if not is_causal:
        return noncausal_backward(do, q, k, v, out, lse, key_valid, scale, p)
    prefix = k.shape[2] - q.shape[2]
    if prefix == 0:
        return causal_backward(do, q, k, v, out, lse, key_valid, scale, p)
    kv_head, kv_tail = _split(key_valid, prefix)
    dq, dk2, dv2 = causal_backward(do, q, k[:, :, prefix:], v[:, :, prefix:], out, lse, kv_tail, scale, p)
    dq1, dk1, dv1 = noncausal_backward(do, q, k[:, :, :prefix], v[:, :, :prefix], out, lse, kv_head, scale, p,
                                       stream=-1)
    return dq + dq1, torch.cat([dk1, dk2], 2), torch.cat([dv1, dv2], 2)
