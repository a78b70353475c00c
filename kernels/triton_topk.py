"""The CUDA path of the ``"topk"`` detector's attention: `topk.attend` and `topk.attend_backward` as Triton kernels.

`topk.select` stays in torch (a GEMM and two top-k selections); these kernels execute its `topk.Selection`
without materialising the gathered K/V or any score tensor. One program per (query block, batch, query head,
tile of ``BLOCK_M`` of the block's rows), in one online softmax over:

- the block's **side keys** ``sel.pos[b, h, blk, :E]`` (sinks, top-k, residual draws), each with its log-weight
  ``sel.lw`` added to its score: ``BLOCK_N`` positions and weights per step (vector loads), then 2D gathered loads
  of their K and V rows from key head ``h // (Hq / Hkv)``. Validity rides in the weight (-inf: an unused slot),
  so these tiles need no pair mask; a K/V row of weight -inf is not read.
- the block's **tile** (`topk.tile`): ``T`` contiguous keys from ``c + T_OFF`` (``c`` the block's first row),
  masked at the sequence's edges, by ``key_valid``, and causal (``j <= i + n_k - n_q``) when causal.
- causal: the **last block** (`topk._tail`) attends instead exactly to every key it sees: whole key tiles that
  every row of the program sees run without a pair mask, the rest (the diagonal) with it. Programs run the
  blocks from the last one backwards, so the longest programs (a last block costs ``block x n_k``) start first.

Blocks end at the last query (`topk.lead` padding rows at the front of block 0): padding rows are never loaded
or stored. Rows that see no key get out 0 and lse -inf, as in `topk.attend`. Outputs: out in q's dtype, lse in
the accumulator's dtype (float32, float64 for float64 inputs).

The backward (`attend_backward`) is the same kernel (`topk_attention`, ``GRAD``), given the final (out, lse): it
owns its rows' dQ, and adds each tile's dK, dV to a float32 (float64) buffer with atomics, because side keys are
shared by many blocks and heads (a key may be in every block's top-k). The sums of those atomics run in no fixed
order, so **the CUDA backward of this detector is not bitwise deterministic** (as flash-attn's dQ is not); the
results agree to rounding. Delta = rowsum(dO * O) is computed once in torch.

Precision as in `triton_kernels` (its ``_dot``, ``_load_rows``, ``_store_rows``, ``_step`` serve here): fp16 and
bf16 run tensor-core dots with fp32 accumulation, fp32 dots run in fp64 (no TF32, so results match eager fp32),
fp64 in fp64; head dims are padded to ``BLOCK_D = next_pow2(max(D, 16))`` in registers only (masked loads and
stores); every row offset is an int64 product. Launch configurations: `triton_configs` (``"topk_fwd"``,
``"topk_bwd"``), pruned per call and GPU by its `Pruner`; autotune keys are length buckets, never raw n.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import topk
from . import triton_kernels as tk
from .plan import Part, lse_dtype, next_pow2
from .triton_configs import Pruner, all_configs, bucket, row_strides

RUNTIME = ["HQ", "GROUP", "BH", "NQ", "NK", "QB", "LEAD", "NB", "E", "T", "T_OFF"]  # lengths: no specialisation

_device = tk._device  # jitted helpers; plain Python under the interpreter (see `triton_kernels`)


# ----------------------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------------------


@_device
def _program(BH, HQ, GROUP, QB, LEAD, NB, BLOCK_M: tl.constexpr):
    """Program -> (block, selection row ``(b * Hq + h) * NB + blk``, batch, query head, key head, the block's
    first row ``c``, the program's first row in the block, its query rows [BM], which are real rows). The last
    block's programs come first; divisions stay in 32 bits, the bases that scale offsets are int64."""
    pid = tl.program_id(0)
    tiles = tl.cdiv(QB, BLOCK_M)
    t0 = pid % tiles * BLOCK_M
    bh = pid // tiles % BH
    blk = NB - 1 - pid // (tiles * BH)
    c = blk * QB - LEAD
    r = t0 + tl.arange(0, BLOCK_M)
    rows = c + r
    h = bh % HQ
    sel = bh.to(tl.int64) * NB + blk
    return (
        blk,
        sel,
        (bh // HQ).to(tl.int64),
        h.to(tl.int64),
        (h // GROUP).to(tl.int64),
        c,
        t0,
        rows,
        (r < QB) & (rows >= 0),
    )


@_device
def _visit(
    acc,
    m_i,
    l_i,
    q,
    do,
    lse2,
    delta,
    k,
    v,
    krow,
    k_ok,
    ok,
    bias2,
    scale2,
    dk_base,
    dv_base,
    sdkn,
    sdvn,
    scale,
    MASK: tl.constexpr,
    GRAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
):
    """One key tile (``krow`` [BN] key rows, ``k_ok`` which exist and are attended, ``ok`` the pairs when
    ``MASK``). Forward: an online-softmax step (`triton_kernels._step`). Backward: ``acc += dS K`` (dQ) and the
    tile's dK = dS^T Q, dV = P^T dO added to the key rows by atomics (dS carries the scale)."""
    if GRAD:
        s = tk._dot(q, tl.trans(k), ACC, PRECISION, WIDEN) * scale2 + bias2  # [BM, BN]
        p = tl.math.exp2(s - lse2[:, None])
        if MASK:
            p = tl.where(ok, p, 0.0)
        dp = tk._dot(do, tl.trans(v), ACC, PRECISION, WIDEN)
        ds = p * (dp - delta[:, None]) * scale
        acc = acc + tk._dot(ds.to(k.dtype), k, ACC, PRECISION, WIDEN)
        offs_d = tl.arange(0, BLOCK_D)
        at = k_ok[:, None] & (offs_d[None, :] < D)
        row = krow.to(tl.int64)[:, None]
        dv = tk._dot(tl.trans(p).to(do.dtype), do, ACC, PRECISION, WIDEN)
        tl.atomic_add(dv_base + row * sdvn + offs_d[None, :], dv, mask=at, sem="relaxed")
        dk = tk._dot(tl.trans(ds).to(q.dtype), q, ACC, PRECISION, WIDEN)
        tl.atomic_add(dk_base + row * sdkn + offs_d[None, :], dk, mask=at, sem="relaxed")
    else:
        acc, m_i, l_i = tk._step(
            acc, m_i, l_i, q, do, lse2, delta, k, v, ok, bias2, scale2, MASK, False, ACC, PRECISION, WIDEN
        )
    return acc, m_i, l_i


@_device
def _side_pass(
    acc,
    m_i,
    l_i,
    q,
    do,
    lse2,
    delta,
    k_base,
    v_base,
    skn,
    svn,
    dk_base,
    dv_base,
    sdkn,
    sdvn,
    POS,
    LW,
    sel,
    side,
    E,
    scale2,
    scale,
    GRAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
):
    """The first ``side`` of the block's ``E`` side keys (all, or none), ``BLOCK_N`` at a time: their positions
    and base-2 log-weights, then their K and V rows gathered by position (rows of weight -inf are not read:
    zeros, and the weight masks them)."""
    base = sel * E
    for start in range(0, side, BLOCK_N):
        sp = start + tl.arange(0, BLOCK_N)
        inside = sp < side
        krow = tl.load(POS + base + sp, mask=inside, other=0)
        lw2 = tl.load(LW + base + sp, mask=inside, other=float("-inf")).to(ACC) * tk.LOG2E
        k_ok = lw2 > float("-inf")
        k = tk._load_rows(k_base, krow, k_ok, skn, D, BLOCK_D, True)
        v = tk._load_rows(v_base, krow, k_ok, svn, D, BLOCK_D, True)
        acc, m_i, l_i = _visit(
            acc,
            m_i,
            l_i,
            q,
            do,
            lse2,
            delta,
            k,
            v,
            krow,
            k_ok,
            k_ok[None, :],
            lw2[None, :],
            scale2,
            dk_base,
            dv_base,
            sdkn,
            sdvn,
            scale,
            False,
            GRAD,
            D,
            BLOCK_D,
            ACC,
            PRECISION,
            WIDEN,
        )
    return acc, m_i, l_i


@_device
def _span_pass(
    acc,
    m_i,
    l_i,
    q,
    do,
    lse2,
    delta,
    k_base,
    v_base,
    skn,
    svn,
    dk_base,
    dv_base,
    sdkn,
    sdvn,
    valid,
    rows,
    lo,
    hi,
    NQ,
    NK,
    scale2,
    scale,
    PAIRS: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_VALID: tl.constexpr,
    GRAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
):
    """Contiguous keys ``[lo, hi)`` within the sequence, masked by ``key_valid`` when ``HAS_VALID``. ``PAIRS``:
    a ragged last tile and, causal, keys after a row's last visible one (``j <= i + NK - NQ``); without it the
    tiles are whole and every row sees every key (unmasked loads)."""
    for start in range(lo, hi, BLOCK_N):
        krow = start + tl.arange(0, BLOCK_N)
        k_ok = krow < hi
        if HAS_VALID:
            k_ok = k_ok & (tl.load(valid + krow, mask=k_ok, other=0) != 0)
        k = tk._load_rows(k_base, krow, k_ok, skn, D, BLOCK_D, PAIRS or HAS_VALID)
        v = tk._load_rows(v_base, krow, k_ok, svn, D, BLOCK_D, PAIRS or HAS_VALID)
        ok = k_ok[None, :]
        if PAIRS and IS_CAUSAL:
            ok = ok & (krow[None, :] <= rows[:, None] + (NK - NQ))
        acc, m_i, l_i = _visit(
            acc,
            m_i,
            l_i,
            q,
            do,
            lse2,
            delta,
            k,
            v,
            krow,
            k_ok,
            ok,
            0.0,
            scale2,
            dk_base,
            dv_base,
            sdkn,
            sdvn,
            scale,
            PAIRS or HAS_VALID,
            GRAD,
            D,
            BLOCK_D,
            ACC,
            PRECISION,
            WIDEN,
        )
    return acc, m_i, l_i


@_device
def _keys(
    acc,
    m_i,
    l_i,
    q,
    do,
    lse2,
    delta,
    k_base,
    v_base,
    skn,
    svn,
    dk_base,
    dv_base,
    sdkn,
    sdvn,
    valid,
    POS,
    LW,
    sel,
    blk,
    c,
    t0,
    rows,
    NQ,
    NK,
    NB,
    E,
    T,
    T_OFF,
    scale2,
    scale,
    IS_CAUSAL: tl.constexpr,
    HAS_VALID: tl.constexpr,
    GRAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
):
    """Every key a program's rows attend to: the block's side keys, then its contiguous keys ``[lo, hi)`` (its
    tile; causal, the last block's every key and no side keys), split at ``mid``: whole tiles of keys that exist
    and that every row of the program sees (no pair mask), then the rest (the diagonal, the sequence's edges)."""
    lo = c + T_OFF
    hi = lo + T
    side = E
    seen = NK  # keys before it are seen by every row of the program
    if IS_CAUSAL:
        tail = blk == NB - 1
        side = tl.where(tail, 0, E)
        lo = tl.where(tail, 0, lo)
        hi = tl.where(tail, NK, hi)
        seen = c + t0 + NK - NQ + 1
    lo = tl.maximum(lo, 0)
    hi = tl.minimum(hi, NK)
    mid = lo + tl.maximum(tl.minimum(hi, seen) - lo, 0) // BLOCK_N * BLOCK_N
    acc, m_i, l_i = _side_pass(
        acc,
        m_i,
        l_i,
        q,
        do,
        lse2,
        delta,
        k_base,
        v_base,
        skn,
        svn,
        dk_base,
        dv_base,
        sdkn,
        sdvn,
        POS,
        LW,
        sel,
        side,
        E,
        scale2,
        scale,
        GRAD,
        D,
        BLOCK_D,
        BLOCK_N,
        ACC,
        PRECISION,
        WIDEN,
    )
    acc, m_i, l_i = _span_pass(
        acc,
        m_i,
        l_i,
        q,
        do,
        lse2,
        delta,
        k_base,
        v_base,
        skn,
        svn,
        dk_base,
        dv_base,
        sdkn,
        sdvn,
        valid,
        rows,
        lo,
        mid,
        NQ,
        NK,
        scale2,
        scale,
        False,
        IS_CAUSAL,
        HAS_VALID,
        GRAD,
        D,
        BLOCK_D,
        BLOCK_N,
        ACC,
        PRECISION,
        WIDEN,
    )
    acc, m_i, l_i = _span_pass(
        acc,
        m_i,
        l_i,
        q,
        do,
        lse2,
        delta,
        k_base,
        v_base,
        skn,
        svn,
        dk_base,
        dv_base,
        sdkn,
        sdvn,
        valid,
        rows,
        mid,
        hi,
        NQ,
        NK,
        scale2,
        scale,
        True,
        IS_CAUSAL,
        HAS_VALID,
        GRAD,
        D,
        BLOCK_D,
        BLOCK_N,
        ACC,
        PRECISION,
        WIDEN,
    )
    return acc, m_i, l_i


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=RUNTIME)
def topk_attention(
    Q,
    K,
    V,
    O,
    LSE,
    DO,
    DELTA,
    DK,
    DV,
    POS,
    LW,
    KVALID,
    sqb,
    sqh,
    sqn,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    sob,
    soh,
    son,
    sdob,
    sdoh,
    sdon,
    sdkb,
    sdkh,
    sdkn,
    sdvb,
    sdvh,
    sdvn,
    slb,
    slh,
    svalb,
    HQ,
    GROUP,
    BH,
    NQ,
    NK,
    QB,
    LEAD,
    NB,
    E,
    T,
    T_OFF,
    SCALES,
    QB_BUCKET,
    E_BUCKET,
    T_BUCKET,
    NK_BUCKET,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_VALID: tl.constexpr,
    GRAD: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One row tile of a query block. ``GRAD=False`` (``topk_fwd``): out into ``O``, lse into ``LSE``. ``GRAD``
    (``topk_bwd``): the same loops given the final ``LSE`` and ``DELTA`` (m and l ride along unused): dQ of the
    program's rows into ``O``, dK/dV added to ``DK``, ``DV`` by atomics; ``DO``, ``DELTA``, ``DK`` and ``DV`` are
    touched only then."""
    blk, sel, b, h, hk, c, t0, rows, q_ok = _program(BH, HQ, GROUP, QB, LEAD, NB, BLOCK_M)
    if GRAD:
        q, do, lse2, delta = tk._grad_rows(
            Q + b * sqb + h * sqh,
            DO + b * sdob + h * sdoh,
            LSE,
            DELTA,
            b * slb + h * slh,
            rows,
            q_ok,
            sqn,
            sdon,
            D,
            BLOCK_D,
            ACC,
        )
        m_i, l_i = lse2, lse2
    else:
        q = tk._load_rows(Q + b * sqb + h * sqh, rows, q_ok, sqn, D, BLOCK_D, True)  # [BM, BD]
        m_i = tl.full([BLOCK_M], float("-inf"), ACC)
        l_i = tl.full([BLOCK_M], 1.0, ACC)
        do, lse2, delta = q, m_i, m_i
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    acc, m_i, l_i = _keys(
        acc,
        m_i,
        l_i,
        q,
        do,
        lse2,
        delta,
        K + b * skb + hk * skh,
        V + b * svb + hk * svh,
        skn,
        svn,
        DK + b * sdkb + hk * sdkh,
        DV + b * sdvb + hk * sdvh,
        sdkn,
        sdvn,
        KVALID + b * svalb,
        POS,
        LW,
        sel,
        blk,
        c,
        t0,
        rows,
        NQ,
        NK,
        NB,
        E,
        T,
        T_OFF,
        tl.load(SCALES + 1).to(ACC),
        tl.load(SCALES).to(ACC),
        IS_CAUSAL,
        HAS_VALID,
        GRAD,
        D,
        BLOCK_D,
        BLOCK_N,
        ACC,
        PRECISION,
        WIDEN,
    )
    if GRAD:
        out = acc
    else:
        out = acc / l_i[:, None]
        tl.store(LSE + b * slb + h * slh + rows.to(tl.int64), (m_i + tl.math.log2(l_i)) * tk.LN2, mask=q_ok)
    tk._store_rows(O + b * sob + h * soh, rows, q_ok, son, out.to(O.dtype.element_ty), D, BLOCK_D)


_KEY = ["QB_BUCKET", "E_BUCKET", "T_BUCKET", "NK_BUCKET", "BLOCK_D", "IS_CAUSAL", "HAS_VALID"]
# the kernel twice: its forward (GRAD=False) and its backward (GRAD) have their own config lists
_fwd = triton.autotune(
    configs=all_configs("topk_fwd"),
    key=_KEY,
    prune_configs_by={"early_config_prune": Pruner("topk_fwd", "query", "QB", ("E", "T"))},
)(topk_attention)
_bwd = triton.autotune(
    configs=all_configs("topk_bwd"),
    key=_KEY,
    prune_configs_by={"early_config_prune": Pruner("topk_bwd", "query_grad", "QB", ("E", "T"))},
    reset_to_zero=["DK", "DV"],
)(topk_attention)


# ----------------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------------


def _tile_span(part: Part, n_q: int, n_k: int) -> tuple[int, int]:
    """``(T_OFF, T)``: block ``c``'s tile is keys ``c + T_OFF + [0, T)`` (`topk.tile`, without its clamping)."""
    if part.causal:
        return n_k - n_q - part.strip, part.block + part.strip
    if part.window is not None:
        a, b = part.window
        return -a, part.block + a + b
    return 0, 0


def _rowmajor(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _common(q, k, v, valid, sel: topk.Selection, part: Part, scale: float) -> tuple[dict, int]:
    """The arguments both launches take besides their outputs and gradients, and the number of programs per row
    tile."""
    B, Hq, n_q, D = q.shape
    Hkv, n_k = k.shape[1], k.shape[2]
    nb, E = topk.blocks(part, n_q), sel.pos.shape[-1]
    t_off, T = _tile_span(part, n_q, n_k)
    if valid is None:
        kvalid = torch.zeros(1, 1, dtype=torch.uint8, device=q.device)
    else:
        kvalid = (valid if valid.stride(-1) == 1 else valid.contiguous()).view(torch.uint8)
    args = dict(
        Q=q,
        K=k,
        V=v,
        POS=sel.pos.contiguous(),
        LW=sel.lw.float().contiguous(),
        KVALID=kvalid,
        **row_strides(q=q, k=k, v=v),
        svalb=kvalid.stride(0),
        HQ=Hq,
        GROUP=Hq // Hkv,
        BH=B * Hq,
        NQ=n_q,
        NK=n_k,
        QB=part.block,
        LEAD=topk.lead(part, n_q),
        NB=nb,
        E=E,
        T=T,
        T_OFF=t_off,
        # the scales as a tensor in the accumulator's dtype: a float argument is fp32 under the interpreter
        SCALES=torch.tensor([scale, scale * math.log2(math.e)], dtype=lse_dtype(q.dtype), device=q.device),
        QB_BUCKET=bucket(part.block),
        E_BUCKET=bucket(E),
        T_BUCKET=bucket(T),
        NK_BUCKET=bucket(n_k),
        D=D,
        BLOCK_D=max(16, next_pow2(D)),
        IS_CAUSAL=part.causal,
        HAS_VALID=valid is not None,
        ACC=tl.float64 if q.dtype == torch.float64 else tl.float32,
        PRECISION="ieee" if q.dtype in (torch.float32, torch.float64) else "tf32",
        WIDEN=tk.INTERPRET and q.dtype == torch.bfloat16,
    )
    return args, B * Hq * nb


def attend(q, k, v, valid, sel: topk.Selection, part: Part, scale: float):
    """`topk.attend` with the Triton kernel: ``(out [B, Hq, Nq, D]`` in q's dtype, ``lse [B, Hq, Nq])``."""
    q, k, v = _rowmajor(q), _rowmajor(k), _rowmajor(v)
    B, Hq, n_q, D = q.shape
    out = torch.empty(B, Hq, n_q, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, n_q, dtype=lse_dtype(q.dtype), device=q.device)
    args, programs = _common(q, k, v, valid, sel, part, scale)
    args.update(O=out, LSE=lse, **row_strides(o=out), slb=lse.stride(0), slh=lse.stride(1), GRAD=False)
    args.update(DO=out, DELTA=lse, DK=k, DV=v, **row_strides(do=out, dk=k, dv=v))  # read only by the backward
    _fwd[lambda meta: (programs * triton.cdiv(part.block, meta["BLOCK_M"]),)](**args)
    return out, lse


def attend_backward(q, k, v, valid, sel: topk.Selection, part: Part, scale: float, do, out, lse):
    """`topk.attend_backward` with the Triton kernel, given the forward's ``out`` and ``lse``: ``(dq, dk, dv)``
    in the inputs' dtypes (dK and dV summed by atomics in float32, float64 for float64: not bitwise
    deterministic)."""
    q, k, v, do = _rowmajor(q), _rowmajor(k), _rowmajor(v), _rowmajor(do)
    acc = lse_dtype(q.dtype)
    lse = lse.to(acc).masked_fill(torch.isneginf(lse), 0.0).contiguous()  # rows with no key: no NaN
    delta = (do.to(acc) * out.to(acc)).sum(-1).contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    args, programs = _common(q, k, v, valid, sel, part, scale)
    args.update(O=dq, LSE=lse, DO=do, DELTA=delta, DK=dk, DV=dv, GRAD=True)
    args.update(**row_strides(o=dq, do=do, dk=dk, dv=dv), slb=lse.stride(0), slh=lse.stride(1))
    _bwd[lambda meta: (programs * triton.cdiv(part.block, meta["BLOCK_M"]),)](**args)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def call_forward(plan, q, k, v, key_valid, scale):
    """`topk.call_forward` on the Triton kernel: the same selection (`topk.select`, torch), attended here."""
    part, sel, scale = topk._inputs(plan, q, k, v, key_valid, scale)
    return attend(q, k, v, key_valid, sel, part, scale)


def call_backward(plan, do, q, k, v, out, lse, key_valid, scale):
    """`topk.call_backward` on the Triton kernel: the selection recomputed (a function of the inputs and the
    seed), then the gradients for it given the forward's ``out`` and ``lse``."""
    part, sel, scale = topk._inputs(plan, q, k, v, key_valid, scale)
    return attend_backward(q, k, v, key_valid, sel, part, scale, do, out, lse)
