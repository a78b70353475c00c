"""The Triton kernels of the CUDA path (``@triton.jit`` kernels and device helpers only).

Launch configurations, autotuning and pruning live in `triton_configs` (which wraps each kernel here in
``triton.autotune``), the host launchers in `triton_attention`; see its docstring for the sub-problem layout the
kernels address. docs/gpu.md has what the compiled kernels cost (built ahead of time for sm_80 and sm_90).

Kernels (a plain-torch oracle is `reference.hyper_attention_reference`; `cpu` is the other fast path)
- `hyper_query` with ``GRAD=False`` (launched as ``hyper_fwd``): one program per query tile, in LSH-sorted order.
  One online-softmax pass over (a) the tile's diagonal key block and (b) the *side keys*: the residual draws, with
  draws of the tile's own block excluded and each draw's log-weight (``SLW``: log(n'/m) uniform, log(stratum size)
  stratified) added to its score, followed by the exact extras of `plan.exact_keys` (sinks, the window strip of a
  causal quadrant or KV prefix) with block -1 (never excluded) and log-weight 0. Writes out and lse (natural log)
  straight to the original rows, or, for the causal levels, the prefix and the band, resumes the softmax from the
  accumulator's (out, lse) and merges in place. With no plan (``PERMUTED=False``) the same kernel is exact
  attention, optionally causal: exact calls, leaves.
- `hyper_query` with ``GRAD`` (launched as ``hyper_bwd_dq``): the forward's loop again, accumulating dQ
  (query-major, no atomics).
- `hyper_bwd_dkdv`: one program per key tile of a diagonal block; loops over that block's queries of
  every query head of the group, so each key row has exactly one owner: no atomics.
- `hyper_bwd_sample`: dK/dV of the side keys. **Two-pass, not atomics**: each side key is
  seen by every query tile of every head in its group, so atomics would put all nb * g query tiles on the same
  t x D lines (heavy contention, and non-deterministic sums). Instead pass 1 splits the query rows into
  ``splits`` ranges and each program writes an fp32 partial for (split, side-key tile); pass 2 sums the
  partials in torch and ``index_put_(accumulate=True)`` adds them to the keys' rows (a key drawn twice gets
  both). Deterministic, and the partials cost ``splits * t * D * 8`` bytes per (batch, kv head).
  The backward is fed the *final* out and lse of each row (the split-softmax identity, as in `cpu`), with
  Delta = rowsum(dO * O) computed once in torch.

Validity of a side key rides in its log-weight (-inf: a masked key, an empty stratum, a draw of the query tile's
own block), so side-key tiles need no pair mask. The keys of a permuted launch are valid iff their sorted
position is below ``KCOUNT[sub]`` (the plan sorts the estimator's keys first); the key mask ``KVALID`` is read
by row only by unpermuted launches (exact calls, leaves, the band).

Loops (see docs/gpu.md for their compiled instruction mix): every permuted loop loads the next tile's rows one
iteration ahead and carries them, so the K/V (Q/dO) loads of a tile depend on no load of the same iteration and are
pipelined as asynchronous copies; the side keys' K/V come from the launcher's contiguous copy (``SKV``). The
diagonal block is split into whole tiles that every row of the query tile sees (no pair mask, unmasked loads) and
the rest (the causal diagonal, the band, ragged ends).

The local window of non-causal self-attention (``BAND``, a constexpr): ``BAND_EXCLUDE`` leaves the (query, key)
pairs with ``-BAND_LO <= j - i <= BAND_HI`` out of the blocks and the residual draws (not the extras), and
``BAND_ONLY`` (unpermuted, one block) attends exactly those pairs, visiting only the key (or query) tiles a
tile's window can reach. Every kernel does both, so the band's forward, dQ and dK/dV are the same kernels.
``BAND_ONLY`` is also the whole of ``hyper::window_attention`` (`triton_attention.window_forward`): there the
bounds are any integers (asymmetric, negative when the bottom-right offset Nk - Nq is folded in), and the key
(query) span of a tile is empty when its rows' windows miss the block.

Interpreter note: Triton 3.9's interpreter multiplies bf16 operands of ``tl.dot`` as raw 16-bit integers.
Under the interpreter only, bf16 operands are widened to fp32 before ``tl.dot`` (``WIDEN``, a constexpr that is
False on GPU, so compiled kernels use bf16 tensor cores).
"""

from __future__ import annotations

import triton
import triton.language as tl

# decided when this module is imported, like the @triton.jit decorators below
INTERPRET = bool(triton.knobs.runtime.interpret)

# kernels may read only constexpr globals
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
LENGTHS = [
    "HQ",
    "GROUP",
    "COUNT",
    "CHUNK",
    "Q_OFF",
    "K_OFF",
    "SQ",
    "SK",
    "NQ_T",
    "NK_T",
    "BQ",
    "BK",
    "M",
    "BAND_LO",
    "BAND_HI",
]
RUNTIME = LENGTHS + ["ACCUMULATE"]  # ACCUMULATE (0/1) only branches at entry and exit: not worth a variant
# BAND modes (constexpr) of non-causal self-attention with a local window
BAND_NONE = tl.constexpr(0)
BAND_EXCLUDE = tl.constexpr(1)  # the hyper parts: (query, key) pairs inside the query's window are left out
BAND_ONLY = tl.constexpr(2)  # the exact band: only the pairs inside the window (unpermuted, one block)


# ----------------------------------------------------------------------------------------------------------
# shared device helpers
# ----------------------------------------------------------------------------------------------------------

# The interpreter re-patches triton.language on every call of a jitted helper (~0.6 ms each, most of the
# interpreter's time here); under it, helpers run as plain Python inside the already patched kernel.
_device = (lambda fn: fn) if INTERPRET else triton.jit


@_device
def _rows_of(PERM, pos, inside, row0, N_T, PERMUTED: tl.constexpr):
    """Tensor rows of sub-problem positions ``pos`` (through ``PERM`` if permuted) and which exist."""
    if PERMUTED:
        idx = tl.load(PERM + pos, mask=inside, other=0)
    else:
        idx = pos
    rows = row0 + idx
    return rows, inside & (rows < N_T)


@_device
def _load_rows(base, rows, ok, stride_n, D: tl.constexpr, BLOCK_D: tl.constexpr, MASK: tl.constexpr):
    """``[R, BLOCK_D]`` tile of rows ``rows``: zero where ``ok`` is False (with ``MASK``) or past D. Without
    ``MASK`` every row must exist (whole tiles), so the load needs no row mask."""
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = base + rows.to(tl.int64)[:, None] * stride_n + offs_d[None, :]
    if MASK:
        x = tl.load(ptrs, mask=ok[:, None] & (offs_d[None, :] < D), other=0.0)
    elif D == BLOCK_D:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
    return x


@_device
def _store_rows(base, rows, ok, stride_n, x, D: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = base + rows.to(tl.int64)[:, None] * stride_n + offs_d[None, :]
    tl.store(ptrs, x, mask=ok[:, None] & (offs_d[None, :] < D))


@_device
def _query_tile(
    pid, QPERM, HQ, GROUP, COUNT, CHUNK, Q_OFF, SQ, NQ_T, BQ, PERMUTED: tl.constexpr, BLOCK_M: tl.constexpr
):
    """Query-major program -> (sub-problem, query head, its kv head's row in the plan, the kv head, block, first
    row of the tile in the block, sorted positions [BM], tensor rows [BM], rows that exist). Tiles of a head are
    adjacent, so the programs sharing a diagonal K/V block and the samples run together (L2 reuse). Divisions
    stay in 32 bits (a 64-bit one is a called subroutine); heads are int64 for the offsets they scale."""
    tiles = tl.cdiv(BQ, BLOCK_M)
    per_head = tl.cdiv(SQ, BQ) * tiles
    sh = pid // per_head
    sub = sh // HQ
    h = sh % HQ
    blk = (pid % per_head) // tiles
    t0 = (pid % per_head) % tiles * BLOCK_M
    r = t0 + tl.arange(0, BLOCK_M)
    pos = blk * BQ + r
    q_row0 = (sub % COUNT) * CHUNK + Q_OFF
    qrow, q_ok = _rows_of(QPERM + sh.to(tl.int64) * SQ, pos, (r < BQ) & (pos < SQ), q_row0, NQ_T, PERMUTED)
    kv_head = (sub * (HQ // GROUP) + h // GROUP).to(tl.int64)
    return sub, h.to(tl.int64), kv_head, (h // GROUP).to(tl.int64), blk, t0, pos, qrow, q_ok


@_device
def _diag_keys(kperm, kpos, k_hi, k_row0, NK_T, KVALID, PERMUTED: tl.constexpr, HAS_VALID: tl.constexpr):
    """Tensor rows of diagonal-block key positions ``kpos`` below ``k_hi``, and which are attended to. A
    permuted launch has its estimator's keys sorted first (``k_hi`` stops there); an unpermuted one reads the
    key mask ``KVALID`` by row (contiguous bytes)."""
    krow, k_ok = _rows_of(kperm, kpos, kpos < k_hi, k_row0, NK_T, PERMUTED)
    if HAS_VALID:
        k_ok = k_ok & (tl.load(KVALID + krow, mask=k_ok, other=0) != 0)
    return krow, k_ok


@_device
def _diag_span(
    blk,
    first,
    BQ,
    BK,
    SQ,
    SK,
    k_count,
    k_row0,
    NK_T,
    BAND_LO,
    BAND_HI,
    PERMUTED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    BAND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Diagonal-block key positions ``[k_lo, k_hi)`` a query tile (sorted positions ``first + [0, BLOCK_M)``)
    visits, split at ``k_mid``: ``[k_lo, k_mid)`` are whole tiles of existing keys that every row of the tile
    sees (no pair mask), ``[k_mid, k_hi)`` the rest (the causal diagonal, the band, a ragged end)."""
    k_lo = blk * BK
    k_hi = tl.minimum(k_lo + BK, SK)
    if PERMUTED:
        k_hi = tl.minimum(k_hi, k_count)  # the estimator's keys sort first
        k_full = k_hi
    else:
        k_full = tl.minimum(k_hi, NK_T - k_row0)  # rows past the tensor (padded leaves)
    if IS_CAUSAL:  # bottom-right aligned: position i sees keys <= i + SK - SQ
        k_hi = tl.minimum(k_hi, first + BLOCK_M + SK - SQ)
        k_full = tl.minimum(k_full, first + 1 + SK - SQ)
    if BAND == BAND_ONLY:  # unpermuted: the tile's rows reach keys [first - lo, first + BLOCK_M + hi)
        k_lo = tl.maximum(k_lo, first - BAND_LO)
        k_hi = tl.minimum(k_hi, first + BLOCK_M + BAND_HI)
    k_mid = k_lo
    if BAND == BAND_NONE:
        k_mid = k_lo + tl.maximum(k_full - k_lo, 0) // BLOCK_N * BLOCK_N
    return k_lo, k_mid, k_hi


@_device
def _side_kv(SKV, kv_head, M, sp, BLOCK_D: tl.constexpr):
    """K and V ``[BN, BLOCK_D]`` of side keys ``sp`` from the launcher's contiguous copy ``SKV [n_sub * Hkv, 2, M,
    BLOCK_D]`` (the rows of the residual draws, then of the exact extras; zero-padded to BLOCK_D). The
    addresses are affine in ``sp``, so the pipeliner stages these loads as asynchronous copies ``num_stages``
    deep, as in the unpermuted loops; zeros past M."""
    base = SKV + kv_head * (2 * M * BLOCK_D)
    inside = sp < M
    k = _load_rows(base, sp, inside, BLOCK_D, BLOCK_D, BLOCK_D, True)
    v = _load_rows(base + M * BLOCK_D, sp, inside, BLOCK_D, BLOCK_D, BLOCK_D, True)
    return k, v


@_device
def _side_index(SAMP, kv_head, M, sp):
    """Positions in the sub-problem of side keys ``sp``: only the window test reads them."""
    return tl.load(SAMP + kv_head * M + sp, mask=sp < M, other=0)


@_device
def _side_weights(SBLK, SLW, kv_head, M, sp, blk, ACC: tl.constexpr):
    """Base-2 log-weights of side keys ``sp`` and the block each sits in (-1 for an extra, which no block
    excludes). Whether a key is attended rides in its log-weight: -inf for a key past M, past the tensor (set by
    the launcher), masked, in an empty stratum, or drawn from block ``blk`` (the query tile's own; -2 excludes
    none). So a score plus the log-weight needs no mask."""
    inside = sp < M
    base = kv_head * M
    sblk = tl.load(SBLK + base + sp, mask=inside, other=-1)
    lw = tl.load(SLW + base + sp, mask=inside, other=float("-inf")).to(ACC)
    return tl.where(sblk != blk, lw * LOG2E, float("-inf")), sblk


@_device
def _in_band(d, BAND_LO, BAND_HI):
    """Whether key offset ``d = j - i`` lies in query i's local window: ``-BAND_LO <= d <= BAND_HI``."""
    return (d >= -BAND_LO) & (d <= BAND_HI)


@_device
def _block_pairs(ok, dpos, didx, SQ, SK, BAND_LO, BAND_HI, IS_CAUSAL: tl.constexpr, BAND: tl.constexpr):
    """(query, key) pairs of a block pass: ``ok`` with the causal test on the key - query offsets ``dpos`` of
    sorted positions and the window test on the offsets ``didx`` of positions in the sub-problem."""
    if IS_CAUSAL:  # bottom-right aligned: position i sees keys <= i + SK - SQ
        ok = ok & (dpos <= SK - SQ)
    if BAND == BAND_EXCLUDE:
        ok = ok & ~_in_band(didx, BAND_LO, BAND_HI)
    if BAND == BAND_ONLY:
        ok = ok & _in_band(didx, BAND_LO, BAND_HI)
    return ok


@_device
def _side_pairs(ok, didx, extra, BAND_LO, BAND_HI, BAND: tl.constexpr):
    """(query, key) pairs of a side-key pass: a residual draw in a query's window is the band's, an exact
    extra (``extra``) never is."""
    if BAND == BAND_EXCLUDE:
        ok = ok & ~(_in_band(didx, BAND_LO, BAND_HI) & ~extra)
    return ok


@_device
def _grad_rows(
    q_base,
    do_base,
    LSE,
    DELTA,
    row_base,
    qrow,
    q_ok,
    sqn,
    sdon,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    """What the backward reads per query row: q, dO [R, BLOCK_D], lse (base 2) and Delta [R]; zeros for rows
    that do not exist, which then add nothing to any gradient."""
    q = _load_rows(q_base, qrow, q_ok, sqn, D, BLOCK_D, True)
    do = _load_rows(do_base, qrow, q_ok, sdon, D, BLOCK_D, True)
    row_off = row_base + qrow.to(tl.int64)
    lse2 = tl.load(LSE + row_off, mask=q_ok, other=0.0).to(ACC) * LOG2E
    delta = tl.load(DELTA + row_off, mask=q_ok, other=0.0).to(ACC)
    return q, do, lse2, delta


@_device
def _dot(a, b, ACC: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    """``a @ b`` accumulated in ``ACC``. fp32 operands with ``PRECISION="ieee"`` run as fp64 dots (exact
    products, fp64 sums, rounded to ACC): the fp64 tensor cores (DMMA) keep operands in the MMA register layout,
    where Triton's fp32 FMA dot holds a thread's whole K slice of both operands (255 registers and spills at
    d = 128 even for 16 x 16 tiles); DMMA's rate equals the fp32 FMA rate on A100 and H100."""
    if WIDEN:  # interpreter only, see the module docstring
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32 and PRECISION == "ieee":
        out = tl.dot(a.to(tl.float64), b.to(tl.float64), input_precision=PRECISION, out_dtype=tl.float64).to(ACC)
    else:
        out = tl.dot(a, b, input_precision=PRECISION, out_dtype=ACC)
    return out


# ----------------------------------------------------------------------------------------------------------
# query-major passes (forward and dQ): one step per key tile, the diagonal block and the side keys
# ----------------------------------------------------------------------------------------------------------


@_device
def _step(
    acc,
    m_i,
    l_i,
    q,
    do,
    lse2,
    delta,
    k,
    v,
    ok,
    bias2,
    scale2,
    MASK: tl.constexpr,
    GRAD: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
):
    """One key tile of a query tile. Forward (``GRAD`` False): an online-softmax step (base-2 scores) on
    (acc, m, l). dQ: ``acc += dS K`` (m and l ride along unused). ``ok`` masks pairs when ``MASK``."""
    s = _dot(q, tl.trans(k), ACC, PRECISION, WIDEN) * scale2 + bias2  # [BM, BN]
    if GRAD:
        p = tl.math.exp2(s - lse2[:, None])
        if MASK:
            p = tl.where(ok, p, 0.0)
        dp = _dot(do, tl.trans(v), ACC, PRECISION, WIDEN)
        ds = p * (dp - delta[:, None])
        acc = acc + _dot(ds.to(k.dtype), k, ACC, PRECISION, WIDEN)
    else:
        if MASK:
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        empty = m_new == float("-inf")  # no key yet: keep (m, l, acc) = (-inf, 1, 0)
        m_safe = tl.where(empty, 0.0, m_new)
        alpha = tl.where(empty, 1.0, tl.math.exp2(m_i - m_safe))
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, ACC, PRECISION, WIDEN)
        m_i = m_new
    return acc, m_i, l_i


@_device
def _diag_pass(
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
    kperm,
    KVALID,
    lo,
    hi,
    pos,
    qidx,
    k_row0,
    NK_T,
    SQ,
    SK,
    BAND_LO,
    BAND_HI,
    scale2,
    MASK: tl.constexpr,
    PERMUTED: tl.constexpr,
    HAS_VALID: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    BAND: tl.constexpr,
    GRAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
):
    """Key tiles ``[lo, hi)`` of the diagonal block. The next tile's rows (a gather through ``kperm`` when
    permuted) are loaded one iteration ahead and carried, so the K/V loads of a tile depend on no load of the
    same iteration and the pipeliner can issue them stages ahead. Without ``MASK`` the tiles are whole and seen
    by every row: no pair mask and unmasked loads (the key mask of an unpermuted launch still applies)."""
    kpos = lo + tl.arange(0, BLOCK_N)
    krow, k_ok = _diag_keys(kperm, kpos, hi, k_row0, NK_T, KVALID, PERMUTED, HAS_VALID)
    for _ in range(lo, hi, BLOCK_N):
        nrow, n_ok = _diag_keys(kperm, kpos + BLOCK_N, hi, k_row0, NK_T, KVALID, PERMUTED, HAS_VALID)
        k = _load_rows(k_base, krow, k_ok, skn, D, BLOCK_D, MASK)
        v = _load_rows(v_base, krow, k_ok, svn, D, BLOCK_D, MASK)
        ok = _block_pairs(
            k_ok[None, :],
            kpos[None, :] - pos[:, None],
            (krow - k_row0)[None, :] - qidx[:, None],
            SQ,
            SK,
            BAND_LO,
            BAND_HI,
            IS_CAUSAL,
            BAND,
        )
        acc, m_i, l_i = _step(
            acc, m_i, l_i, q, do, lse2, delta, k, v, ok, 0.0, scale2, MASK or HAS_VALID, GRAD, ACC, PRECISION, WIDEN
        )
        kpos, krow, k_ok = kpos + BLOCK_N, nrow, n_ok
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
    SKV,
    SAMP,
    SBLK,
    SLW,
    kv_head,
    M,
    blk,
    qidx,
    BAND_LO,
    BAND_HI,
    scale2,
    BAND: tl.constexpr,
    GRAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
):
    """The side keys: residual draws of other blocks (log-weighted), then the exact extras (weight 1), read from
    the launcher's contiguous copy of their K/V rows (`_side_kv`), so that no K/V load waits on an index load.
    The weights carry validity, so without a window no pair mask is needed and no position is read."""
    for start in range(0, M, BLOCK_N):
        sp = start + tl.arange(0, BLOCK_N)
        lw2, sblk = _side_weights(SBLK, SLW, kv_head, M, sp, blk, ACC)
        k, v = _side_kv(SKV, kv_head, M, sp, BLOCK_D)
        ok = lw2[None, :] > float("-inf")
        if BAND == BAND_EXCLUDE:
            kidx = _side_index(SAMP, kv_head, M, sp)
            ok = _side_pairs(ok, kidx[None, :] - qidx[:, None], (sblk < 0)[None, :], BAND_LO, BAND_HI, BAND)
        acc, m_i, l_i = _step(
            acc,
            m_i,
            l_i,
            q,
            do,
            lse2,
            delta,
            k,
            v,
            ok,
            lw2[None, :],
            scale2,
            BAND == BAND_EXCLUDE,
            GRAD,
            ACC,
            PRECISION,
            WIDEN,
        )
    return acc, m_i, l_i


# ----------------------------------------------------------------------------------------------------------
# key-major passes (dK/dV of the diagonal blocks and of the side keys)
# ----------------------------------------------------------------------------------------------------------


@_device
def _dkdv_step(
    dk,
    dv,
    k,
    v,
    q,
    do,
    lse2,
    delta,
    ok,
    bias2,
    scale2,
    MASK: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
):
    """Key-major step: ``ok [BN, BM]`` masks (key, query) pairs when ``MASK``."""
    st = _dot(k, tl.trans(q), ACC, PRECISION, WIDEN) * scale2 + bias2  # [BN, BM]
    pt = tl.math.exp2(st - lse2[None, :])
    if MASK:
        pt = tl.where(ok, pt, 0.0)
    dv = dv + _dot(pt.to(do.dtype), do, ACC, PRECISION, WIDEN)
    dpt = _dot(v, tl.trans(do), ACC, PRECISION, WIDEN)
    dst = pt * (dpt - delta[None, :])
    dk = dk + _dot(dst.to(q.dtype), q, ACC, PRECISION, WIDEN)
    return dk, dv


@_device
def _key_pass(
    dk,
    dv,
    k,
    v,
    kpos,
    kidx,
    k_ok,
    sblk,
    lw2,
    lo,
    hi,
    Q,
    DO,
    LSE,
    DELTA,
    QPERM,
    sub,
    b,
    hk,
    sqb,
    sqh,
    sqn,
    sdob,
    sdoh,
    sdon,
    slb,
    slh,
    HQ,
    GROUP,
    SQ,
    SK,
    NQ_T,
    BQ,
    q_row0,
    BAND_LO,
    BAND_HI,
    scale2,
    MASK: tl.constexpr,
    SIDE: tl.constexpr,
    PERMUTED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    BAND: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
):
    """Query positions ``[lo, hi)`` of every query head of the kv head's group, as one flat loop over (head,
    tile), so the pipeline fills once per program, not once per head; the next tile's rows are loaded one
    iteration ahead. ``SIDE``: the keys are side keys (block exclusion, log-weights, window of draws)."""
    tiles = tl.cdiv(hi - lo, BLOCK_M)
    total = GROUP * tiles
    qperm = QPERM + (sub * HQ + hk * GROUP) * SQ
    pos = lo + tl.arange(0, BLOCK_M)
    qrow, q_ok = _rows_of(qperm, pos, pos < hi, q_row0, NQ_T, PERMUTED)
    for it in range(0, total):
        h = hk * GROUP + it // tiles
        # the next tile's rows; after the last tile, the last head's first tile again (in bounds, unused)
        npos = lo + (it + 1) % tiles * BLOCK_M + tl.arange(0, BLOCK_M)
        nh = tl.minimum((it + 1) // tiles, GROUP - 1)
        nrow, n_ok = _rows_of(qperm + nh * SQ, npos, npos < hi, q_row0, NQ_T, PERMUTED)
        q, do, lse2, delta = _grad_rows(
            Q + b * sqb + h * sqh,
            DO + b * sdob + h * sdoh,
            LSE,
            DELTA,
            b * slb + h * slh,
            qrow,
            q_ok,
            sqn,
            sdon,
            D,
            BLOCK_D,
            ACC,
        )
        if SIDE:
            ok = k_ok[:, None] & (sblk[:, None] != (pos // BQ)[None, :])
            ok = _side_pairs(ok, kidx[:, None] - (qrow - q_row0)[None, :], (sblk < 0)[:, None], BAND_LO, BAND_HI, BAND)
            dk, dv = _dkdv_step(dk, dv, k, v, q, do, lse2, delta, ok, lw2[:, None], scale2, True, ACC, PRECISION, WIDEN)
        else:
            ok = _block_pairs(
                k_ok[:, None],
                kpos[:, None] - pos[None, :],
                kidx[:, None] - (qrow - q_row0)[None, :],
                SQ,
                SK,
                BAND_LO,
                BAND_HI,
                IS_CAUSAL,
                BAND,
            )
            dk, dv = _dkdv_step(dk, dv, k, v, q, do, lse2, delta, ok, 0.0, scale2, MASK, ACC, PRECISION, WIDEN)
        pos, qrow, q_ok = npos, nrow, n_ok
    return dk, dv


# ----------------------------------------------------------------------------------------------------------
# the query-major kernel: forward and dQ
# ----------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=RUNTIME)
def hyper_query(
    Q,
    K,
    V,
    O,
    LSE,
    DO,
    DELTA,
    KVALID,
    KCOUNT,
    QPERM,
    KPERM,
    SAMP,
    SBLK,
    SLW,
    SKV,
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
    slb,
    slh,
    svalb,
    HQ,
    GROUP,
    COUNT,
    CHUNK,
    Q_OFF,
    K_OFF,
    SQ,
    SK,
    NQ_T,
    NK_T,
    BQ,
    BK,
    M,
    BAND_LO,
    BAND_HI,
    SCALES,
    ACCUMULATE,
    BQ_BUCKET,
    BK_BUCKET,
    M_BUCKET,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PERMUTED: tl.constexpr,
    HAS_SAMPLES: tl.constexpr,
    HAS_VALID: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    BAND: tl.constexpr,
    GRAD: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One query tile. ``GRAD=False`` (``hyper_fwd``): out into ``O`` and lse into ``LSE``, or with ``ACCUMULATE``
    merged into the (out, lse) already there. ``GRAD`` (``hyper_bwd_dq``): the same loops again given the final
    ``LSE`` and ``DELTA`` (m and l ride along unused), accumulating dQ into ``O`` (the fp32 dQ buffer); ``DO``
    and ``DELTA`` are read only then."""
    sub, h, kv_head, hk, blk, t0, pos, qrow, q_ok = _query_tile(
        tl.program_id(0), QPERM, HQ, GROUP, COUNT, CHUNK, Q_OFF, SQ, NQ_T, BQ, PERMUTED, BLOCK_M
    )
    b = (sub // COUNT).to(tl.int64)
    o_base = O + b * sob + h * soh
    l_ptrs = LSE + b * slb + h * slh + qrow.to(tl.int64)
    if GRAD:
        q, do, lse2, delta = _grad_rows(
            Q + b * sqb + h * sqh,
            DO + b * sdob + h * sdoh,
            LSE,
            DELTA,
            b * slb + h * slh,
            qrow,
            q_ok,
            sqn,
            sdon,
            D,
            BLOCK_D,
            ACC,
        )
        acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
        m_i, l_i = lse2, lse2
    else:
        q = _load_rows(Q + b * sqb + h * sqh, qrow, q_ok, sqn, D, BLOCK_D, True)  # [BM, BD]
        l_i = tl.full([BLOCK_M], 1.0, ACC)
        if ACCUMULATE:  # resume the softmax of earlier parts: (m, l, acc) = (lse, 1, out)
            m_i = tl.load(l_ptrs, mask=q_ok, other=float("-inf")).to(ACC) * LOG2E
            acc = _load_rows(o_base, qrow, q_ok, son, D, BLOCK_D, True).to(ACC)
        else:
            m_i = tl.full([BLOCK_M], float("-inf"), ACC)
            acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
        do, lse2, delta = q, m_i, m_i
    # every key the tile sees: the diagonal block's whole tiles, its other tiles, then the side keys
    scale2 = tl.load(SCALES + 1).to(ACC)
    k_row0 = (sub % COUNT) * CHUNK + K_OFF
    qidx = qrow - ((sub % COUNT) * CHUNK + Q_OFF)  # query positions in the sub-problem (the window test)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    valid = KVALID + b * svalb
    kperm = KPERM + kv_head * SK
    k_count = SK
    if PERMUTED:
        k_count = tl.load(KCOUNT + sub.to(tl.int64))
    lo, mid, hi = _diag_span(
        blk,
        blk * BQ + t0,
        BQ,
        BK,
        SQ,
        SK,
        k_count,
        k_row0,
        NK_T,
        BAND_LO,
        BAND_HI,
        PERMUTED,
        IS_CAUSAL,
        BAND,
        BLOCK_M,
        BLOCK_N,
    )
    for i in tl.static_range(2):  # the whole tiles (no pair mask), then the rest
        acc, m_i, l_i = _diag_pass(
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
            kperm,
            valid,
            lo if i == 0 else mid,
            mid if i == 0 else hi,
            pos,
            qidx,
            k_row0,
            NK_T,
            SQ,
            SK,
            BAND_LO,
            BAND_HI,
            scale2,
            i == 1,
            PERMUTED,
            HAS_VALID,
            IS_CAUSAL,
            BAND,
            GRAD,
            D,
            BLOCK_D,
            BLOCK_N,
            ACC,
            PRECISION,
            WIDEN,
        )
    if HAS_SAMPLES:
        acc, m_i, l_i = _side_pass(
            acc,
            m_i,
            l_i,
            q,
            do,
            lse2,
            delta,
            SKV,
            SAMP,
            SBLK,
            SLW,
            kv_head,
            M,
            blk,
            qidx,
            BAND_LO,
            BAND_HI,
            scale2,
            BAND,
            GRAD,
            BLOCK_D,
            BLOCK_N,
            ACC,
            PRECISION,
            WIDEN,
        )
    if GRAD:
        out = acc * tl.load(SCALES).to(ACC)
        if ACCUMULATE:
            out += _load_rows(o_base, qrow, q_ok, son, D, BLOCK_D, True)
    else:
        out = acc / l_i[:, None]
        tl.store(l_ptrs, (m_i + tl.math.log2(l_i)) * LN2, mask=q_ok)  # -inf for rows that saw no key
    _store_rows(o_base, qrow, q_ok, son, out.to(O.dtype.element_ty), D, BLOCK_D)


# ----------------------------------------------------------------------------------------------------------
# the key-major kernels: dK/dV
# ----------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=RUNTIME)
def hyper_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    KVALID,
    KCOUNT,
    QPERM,
    KPERM,
    sqb,
    sqh,
    sqn,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
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
    COUNT,
    CHUNK,
    Q_OFF,
    K_OFF,
    SQ,
    SK,
    NQ_T,
    NK_T,
    BQ,
    BK,
    BAND_LO,
    BAND_HI,
    SCALES,
    ACCUMULATE,
    BQ_BUCKET,
    BK_BUCKET,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PERMUTED: tl.constexpr,
    HAS_VALID: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    BAND: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # program -> (sub-problem, kv head, diagonal block, key tile); loops over the block's queries of every
    # query head of the group, so it owns its key rows
    tiles = tl.cdiv(BK, BLOCK_N)
    per_head = tl.cdiv(SQ, BQ) * tiles
    pid = tl.program_id(0)
    kv = pid // per_head
    sub = kv // (HQ // GROUP)
    hk = (kv % (HQ // GROUP)).to(tl.int64)
    kv_head = kv.to(tl.int64)
    b = (sub // COUNT).to(tl.int64)
    q_row0 = (sub % COUNT) * CHUNK + Q_OFF
    k_row0 = (sub % COUNT) * CHUNK + K_OFF
    blk = (pid % per_head) // tiles
    t0 = (pid % per_head) % tiles * BLOCK_N
    r = t0 + tl.arange(0, BLOCK_N)
    kpos = blk * BK + r  # [BN]
    krow, k_in = _rows_of(KPERM + kv_head * SK, kpos, (r < BK) & (kpos < SK), k_row0, NK_T, PERMUTED)
    if PERMUTED:  # the estimator's keys sort first
        k_ok = k_in & (kpos < tl.load(KCOUNT + sub.to(tl.int64)))
    else:
        k_ok = k_in
        if HAS_VALID:
            k_ok = k_ok & (tl.load(KVALID + b * svalb + krow, mask=k_in, other=0) != 0)
    k = _load_rows(K + b * skb + hk * skh, krow, k_ok, skn, D, BLOCK_D, True)
    v = _load_rows(V + b * svb + hk * svh, krow, k_ok, svn, D, BLOCK_D, True)
    kidx = krow - k_row0  # key positions in the sub-problem (the window test)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)

    # queries [q_lo, q_hi) see the tile; [q_mid, q_hi) see all of it (no pair mask). Keys that are not attended
    # get their rows zeroed at the end instead of a mask per step.
    first = blk * BK + t0
    q_lo = blk * BQ
    q_hi = tl.minimum(q_lo + BQ, SQ)
    if IS_CAUSAL:  # queries before the tile's first key see none of it
        q_lo = tl.maximum(q_lo, first - (SK - SQ))
    if BAND == BAND_ONLY:  # unpermuted: the tile's keys are in the windows of queries [first - hi, ... + lo)
        q_lo = tl.maximum(q_lo, first - BAND_HI)
        q_hi = tl.minimum(q_hi, first + BLOCK_N + BAND_LO)
    q_mid = q_hi
    if BAND == BAND_NONE:
        q_mid = q_lo
        if IS_CAUSAL:  # from query first + BLOCK_N - 1 - (SK - SQ) on, every key of the tile is seen
            need = tl.maximum(first + BLOCK_N - 1 - (SK - SQ) - q_lo, 0)
            q_mid = tl.minimum(q_lo + tl.cdiv(need, BLOCK_M) * BLOCK_M, q_hi)
    scale2 = tl.load(SCALES + 1).to(ACC)
    dk, dv = _key_pass(
        dk,
        dv,
        k,
        v,
        kpos,
        kidx,
        k_ok,
        kpos,
        kpos,
        q_lo,
        q_mid,
        Q,
        DO,
        LSE,
        DELTA,
        QPERM,
        sub,
        b,
        hk,
        sqb,
        sqh,
        sqn,
        sdob,
        sdoh,
        sdon,
        slb,
        slh,
        HQ,
        GROUP,
        SQ,
        SK,
        NQ_T,
        BQ,
        q_row0,
        BAND_LO,
        BAND_HI,
        scale2,
        True,
        False,
        PERMUTED,
        IS_CAUSAL,
        BAND,
        D,
        BLOCK_D,
        BLOCK_M,
        ACC,
        PRECISION,
        WIDEN,
    )
    dk, dv = _key_pass(
        dk,
        dv,
        k,
        v,
        kpos,
        kidx,
        k_ok,
        kpos,
        kpos,
        q_mid,
        q_hi,
        Q,
        DO,
        LSE,
        DELTA,
        QPERM,
        sub,
        b,
        hk,
        sqb,
        sqh,
        sqn,
        sdob,
        sdoh,
        sdon,
        slb,
        slh,
        HQ,
        GROUP,
        SQ,
        SK,
        NQ_T,
        BQ,
        q_row0,
        BAND_LO,
        BAND_HI,
        scale2,
        False,
        False,
        PERMUTED,
        IS_CAUSAL,
        BAND,
        D,
        BLOCK_D,
        BLOCK_M,
        ACC,
        PRECISION,
        WIDEN,
    )

    dk = tl.where(k_ok[:, None], dk * tl.load(SCALES).to(ACC), 0.0)
    dv = tl.where(k_ok[:, None], dv, 0.0)
    dk_base = DK + b * sdkb + hk * sdkh
    dv_base = DV + b * sdvb + hk * sdvh
    if ACCUMULATE:
        dk += _load_rows(dk_base, krow, k_in, sdkn, D, BLOCK_D, True)
        dv += _load_rows(dv_base, krow, k_in, sdvn, D, BLOCK_D, True)
    _store_rows(dk_base, krow, k_in, sdkn, dk, D, BLOCK_D)
    _store_rows(dv_base, krow, k_in, sdvn, dv, D, BLOCK_D)


@triton.jit(do_not_specialize=[n for n in LENGTHS if n not in ("K_OFF", "NK_T", "BK")] + ["ROWS_PER_SPLIT"])
def hyper_bwd_sample(
    Q,
    DO,
    LSE,
    DELTA,
    PART,
    QPERM,
    SAMP,
    SBLK,
    SLW,
    SKV,
    sqb,
    sqh,
    sqn,
    sdob,
    sdoh,
    sdon,
    slb,
    slh,
    HQ,
    GROUP,
    COUNT,
    CHUNK,
    Q_OFF,
    SQ,
    SK,
    NQ_T,
    BQ,
    M,
    BAND_LO,
    BAND_HI,
    SCALES,
    ROWS_PER_SPLIT,
    BQ_BUCKET,
    M_BUCKET,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BAND: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # pass 1 of the side keys' dK/dV: program -> (sub-problem, kv head, split of query rows, side-key tile);
    # PART [splits, n_sub * Hkv, 2, M, BLOCK_D] fp32 partials (dK then dV)
    tiles = tl.cdiv(M, BLOCK_N)
    splits = tl.cdiv(SQ, ROWS_PER_SPLIT)
    pid = tl.program_id(0)
    kv = pid // (splits * tiles)
    split = (pid // tiles) % splits
    sub = kv // (HQ // GROUP)
    hk = (kv % (HQ // GROUP)).to(tl.int64)
    kv_head = kv.to(tl.int64)
    b = (sub // COUNT).to(tl.int64)
    q_row0 = (sub % COUNT) * CHUNK + Q_OFF
    sp = (pid % tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    lw2, sblk = _side_weights(SBLK, SLW, kv_head, M, sp, -2, ACC)
    k_ok = lw2 > float("-inf")
    k, v = _side_kv(SKV, kv_head, M, sp, BLOCK_D)
    kidx = _side_index(SAMP, kv_head, M, sp)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    p_lo = split * ROWS_PER_SPLIT
    p_hi = tl.minimum(p_lo + ROWS_PER_SPLIT, SQ)
    dk, dv = _key_pass(
        dk,
        dv,
        k,
        v,
        sp,
        kidx,
        k_ok,
        sblk,
        lw2,
        p_lo,
        p_hi,
        Q,
        DO,
        LSE,
        DELTA,
        QPERM,
        sub,
        b,
        hk,
        sqb,
        sqh,
        sqn,
        sdob,
        sdoh,
        sdon,
        slb,
        slh,
        HQ,
        GROUP,
        SQ,
        SK,
        NQ_T,
        BQ,
        q_row0,
        BAND_LO,
        BAND_HI,
        tl.load(SCALES + 1).to(ACC),
        True,
        True,
        True,
        False,
        BAND,
        D,
        BLOCK_D,
        BLOCK_M,
        ACC,
        PRECISION,
        WIDEN,
    )

    offs_d = tl.arange(0, BLOCK_D)
    heads = tl.num_programs(0) // (splits * tiles)  # n_sub * Hkv
    row = ((split.to(tl.int64) * heads + kv_head) * 2) * M + sp  # [BN] rows of PART viewed as [-1, BLOCK_D]
    ptrs = PART + row[:, None] * BLOCK_D + offs_d[None, :]
    inside = (sp < M)[:, None]
    tl.store(ptrs, dk * tl.load(SCALES).to(ACC), mask=inside)
    tl.store(ptrs + M * BLOCK_D, dv, mask=inside)
