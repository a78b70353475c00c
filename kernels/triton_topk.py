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
from .triton_configs import Pruner, all_configs, bucket, geometry, numerics, row_strides

LENGTHS = ("HQ", "GROUP", "BH", "NQ", "NK", "QB", "LEAD", "NB", "E", "T", "T_OFF")  # the order of ``GEOM``

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
    state,
    query,
    kv,
    krow,
    k_ok,
    ok,
    bias2,
    scales,
    LOAD_MASK: tl.constexpr,
    MASK: tl.constexpr,
    GRAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM: tl.constexpr,
):
    """One key tile: ``krow`` [BN] key rows, ``k_ok`` which exist and are attended (their K/V rows are loaded from
    ``kv`` = (K, V, dK, dV bases and row strides), masked when ``LOAD_MASK``), ``ok`` the pairs when ``MASK``;
    ``scales`` = (scale * log2 e, scale). Forward: an online-softmax step (`triton_kernels._step`). Backward:
    ``acc += dS K`` (dQ) and the tile's dK = dS^T Q, dV = P^T dO added to the key rows by atomics (dS carries
    the scale)."""
    k_base, v_base, skn, svn, dk_base, dv_base, sdkn, sdvn = kv
    scale2, scale = scales
    k = tk._load_rows(k_base, krow, k_ok, skn, D, BLOCK_D, LOAD_MASK)
    v = tk._load_rows(v_base, krow, k_ok, svn, D, BLOCK_D, LOAD_MASK)
    if GRAD:
        acc, m_i, l_i = state
        q, do, lse2, delta = query
        s = tk._dot(q, tl.trans(k), NUM) * scale2 + bias2  # [BM, BN]
        p = tl.math.exp2(s - lse2[:, None])
        if MASK:
            p = tl.where(ok, p, 0.0)
        dp = tk._dot(do, tl.trans(v), NUM)
        ds = p * (dp - delta[:, None]) * scale
        acc = acc + tk._dot(ds.to(k.dtype), k, NUM)
        offs_d = tl.arange(0, BLOCK_D)
        at = k_ok[:, None] & (offs_d[None, :] < D)
        row = krow.to(tl.int64)[:, None]
        dv = tk._dot(tl.trans(p).to(do.dtype), do, NUM)
        tl.atomic_add(dv_base + row * sdvn + offs_d[None, :], dv, mask=at, sem="relaxed")
        dk = tk._dot(tl.trans(ds).to(q.dtype), q, NUM)
        tl.atomic_add(dk_base + row * sdkn + offs_d[None, :], dk, mask=at, sem="relaxed")
        state = (acc, m_i, l_i)
    else:
        state = tk._step(state, query, k, v, ok, bias2, scale2, MASK, False, NUM)
    return state


@_device
def _side_pass(
    state,
    query,
    kv,
    POS,
    LW,
    sel,
    side,
    E,
    scales,
    GRAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM: tl.constexpr,
):
    """The first ``side`` of the block's ``E`` side keys (all, or none), ``BLOCK_N`` at a time: their positions
    and base-2 log-weights, then their K and V rows gathered by position (rows of weight -inf are not read:
    zeros, and the weight masks them)."""
    ACC = NUM[0]
    base = sel * E
    for start in range(0, side, BLOCK_N):
        sp = start + tl.arange(0, BLOCK_N)
        inside = sp < side
        krow = tl.load(POS + base + sp, mask=inside, other=0)
        lw2 = tl.load(LW + base + sp, mask=inside, other=float("-inf")).to(ACC) * tk.LOG2E
        k_ok = lw2 > float("-inf")
        ok, bias2 = k_ok[None, :], lw2[None, :]
        state = _visit(state, query, kv, krow, k_ok, ok, bias2, scales, True, False, GRAD, D, BLOCK_D, NUM)
    return state


@_device
def _span_pass(
    state,
    query,
    kv,
    valid,
    rows,
    lo,
    hi,
    NQ,
    NK,
    scales,
    PAIRS: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_VALID: tl.constexpr,
    GRAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM: tl.constexpr,
):
    """Contiguous keys ``[lo, hi)`` within the sequence, masked by ``key_valid`` when ``HAS_VALID``. ``PAIRS``:
    a ragged last tile and, causal, keys after a row's last visible one (``j <= i + NK - NQ``); without it the
    tiles are whole and every row sees every key (unmasked loads)."""
    for start in range(lo, hi, BLOCK_N):
        krow = start + tl.arange(0, BLOCK_N)
        k_ok = krow < hi
        if HAS_VALID:
            k_ok = k_ok & (tl.load(valid + krow, mask=k_ok, other=0) != 0)
        ok = k_ok[None, :]
        if PAIRS and IS_CAUSAL:
            ok = ok & (krow[None, :] <= rows[:, None] + (NK - NQ))
        masked = PAIRS or HAS_VALID
        state = _visit(state, query, kv, krow, k_ok, ok, 0.0, scales, masked, masked, GRAD, D, BLOCK_D, NUM)
    return state


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def topk_attention(
    Q,
    K,
    V,
    KVALID,
    POS,
    LW,
    O,
    LSE,
    DO,
    DELTA,
    DK,
    DV,
    QS,
    KS,
    VS,
    OS,
    DOS,
    DKS,
    DVS,
    LS,
    svalb,
    GEOM,
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
    NUM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One row tile of a query block. ``GRAD=False`` (``topk_fwd``): out into ``O``, lse into ``LSE``. ``GRAD``
    (``topk_bwd``): the same loops given the final ``LSE`` and ``DELTA`` (m and l ride along unused): dQ of the
    program's rows into ``O``, dK/dV added to ``DK``, ``DV`` by atomics; ``DO``, ``DELTA``, ``DK`` and ``DV`` are
    touched only then. ``XS``: tensor X's (batch, head, row) strides (``LS``: LSE's and DELTA's).

    The keys a program's rows attend to: the block's side keys, then its contiguous keys ``[lo, hi)`` (its tile;
    causal, the last block's every key and no side keys), split at ``mid``: whole tiles of keys that exist and
    that every row of the program sees (no pair mask), then the rest (the diagonal, the sequence's edges)."""
    HQ, GROUP, BH, NQ, NK, QB, LEAD, NB, E, T, T_OFF, _, _, _, _, _ = tk._geometry(GEOM)
    ACC = NUM[0]
    blk, sel, b, h, hk, c, t0, rows, q_ok = _program(BH, HQ, GROUP, QB, LEAD, NB, BLOCK_M)
    query, state = tk._query_state(
        Q, QS, DO, DOS, LSE, DELTA, LS, O, OS, b, h, rows, q_ok, 0, GRAD, D, BLOCK_D, BLOCK_M, NUM
    )
    kv = (
        K + b * KS[0] + hk * KS[1],
        V + b * VS[0] + hk * VS[1],
        KS[2],
        VS[2],
        DK + b * DKS[0] + hk * DKS[1],
        DV + b * DVS[0] + hk * DVS[1],
        DKS[2],
        DVS[2],
    )
    scales = (tl.load(SCALES + 1).to(ACC), tl.load(SCALES).to(ACC))
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
    state = _side_pass(state, query, kv, POS, LW, sel, side, E, scales, GRAD, D, BLOCK_D, BLOCK_N, NUM)
    spans = (lo, mid, hi)
    valid = KVALID + b * svalb
    for i in tl.static_range(2):  # whole tiles (no pair mask), then the rest
        state = _span_pass(
            state,
            query,
            kv,
            valid,
            rows,
            spans[i],
            spans[i + 1],
            NQ,
            NK,
            scales,
            i == 1,
            IS_CAUSAL,
            HAS_VALID,
            GRAD,
            D,
            BLOCK_D,
            BLOCK_N,
            NUM,
        )
    acc, m_i, l_i = state
    if GRAD:
        out = acc
    else:
        out = acc / l_i[:, None]
        tl.store(LSE + b * LS[0] + h * LS[1] + rows.to(tl.int64), (m_i + tl.math.log2(l_i)) * tk.LN2, mask=q_ok)
    tk._store_rows(O + b * OS[0] + h * OS[1], rows, q_ok, OS[2], out.to(O.dtype.element_ty), D, BLOCK_D)


_KEY = ["QB_BUCKET", "E_BUCKET", "T_BUCKET", "NK_BUCKET", "BLOCK_D", "IS_CAUSAL", "HAS_VALID"]
# the kernel twice: its forward (GRAD=False) and its backward (GRAD) have their own config lists
_fwd = triton.autotune(
    configs=all_configs("topk_fwd"),
    key=_KEY,
    prune_configs_by={"early_config_prune": Pruner("topk_fwd", "query", "QB_BUCKET", ("E_BUCKET", "T_BUCKET"))},
)(topk_attention)
_bwd = triton.autotune(
    configs=all_configs("topk_bwd"),
    key=_KEY,
    prune_configs_by={"early_config_prune": Pruner("topk_bwd", "query_grad", "QB_BUCKET", ("E_BUCKET", "T_BUCKET"))},
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
        GEOM=geometry(
            LENGTHS,
            q.device,
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
        ),
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
        NUM=numerics(q.dtype, tk.INTERPRET),
    )
    return args, B * Hq * nb


def attend(q, k, v, valid, sel: topk.Selection, part: Part, scale: float):
    """`topk.attend` with the Triton kernel: ``(out [B, Hq, Nq, D]`` in q's dtype, ``lse [B, Hq, Nq])``."""
    q, k, v = _rowmajor(q), _rowmajor(k), _rowmajor(v)
    B, Hq, n_q, D = q.shape
    out = torch.empty(B, Hq, n_q, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, n_q, dtype=lse_dtype(q.dtype), device=q.device)
    args, programs = _common(q, k, v, valid, sel, part, scale)
    args.update(O=out, LSE=lse, **row_strides(o=out), LS=lse.stride()[:2], GRAD=False)
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
    args.update(**row_strides(o=dq, do=do, dk=dk, dv=dv), LS=lse.stride()[:2])
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
