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
Under the interpreter only, bf16 operands are widened to fp32 before ``tl.dot`` (``NUM[2]``, part of the ``NUM``
constexpr and False on GPU, so compiled kernels use bf16 tensor cores).
"""

from __future__ import annotations

import triton
import triton.language as tl

# decided when this module is imported, like the @triton.jit decorators below
INTERPRET = bool(triton.knobs.runtime.interpret)

# kernels may read only constexpr globals
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# the lengths of a launch, in the order of its int32 descriptor ``GEOM`` (`_geometry`): data, not arguments, so
# that no launch specialises on a length and every kernel reads one list
LENGTHS = (
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
)
GEOM_SIZE = 16  # int32 entries of a descriptor: one 64-byte line (zero past the kernel's lengths)
RUNTIME = ["ACCUMULATE"]  # ACCUMULATE (0/1) only branches at entry and exit: not worth a variant
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
def _geometry(GEOM):
    """The ``GEOM_SIZE`` entries of a launch's length descriptor (`triton_configs.geometry`: `LENGTHS` here, the
    kernel's own list in `triton_topk`, then zeros): one scalar load each at entry, from the same line in every
    program; entries a kernel does not name are never used."""
    return (
        tl.load(GEOM),
        tl.load(GEOM + 1),
        tl.load(GEOM + 2),
        tl.load(GEOM + 3),
        tl.load(GEOM + 4),
        tl.load(GEOM + 5),
        tl.load(GEOM + 6),
        tl.load(GEOM + 7),
        tl.load(GEOM + 8),
        tl.load(GEOM + 9),
        tl.load(GEOM + 10),
        tl.load(GEOM + 11),
        tl.load(GEOM + 12),
        tl.load(GEOM + 13),
        tl.load(GEOM + 14),
        tl.load(GEOM + 15),
    )


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
def _side_weights(SBLK, SLW, kv_head, M, sp, blk, NUM: tl.constexpr):
    """Base-2 log-weights of side keys ``sp`` and the block each sits in (-1 for an extra, which no block
    excludes). Whether a key is attended rides in its log-weight: -inf for a key past M, past the tensor (set by
    the launcher), masked, in an empty stratum, or drawn from block ``blk`` (the query tile's own; -2 excludes
    none). So a score plus the log-weight needs no mask."""
    ACC = NUM[0]
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
def _query_state(
    Q,
    QS,
    DO,
    DOS,
    LSE,
    DELTA,
    LS,
    O,
    OS,
    b,
    h,
    rows,
    ok,
    ACCUMULATE,
    GRAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NUM: tl.constexpr,
):
    """What a query tile of head ``h`` brings to its key passes, ``(q, do, lse2, delta)``, and its softmax state
    ``(acc, m, l)`` at the start. Forward: q (the other three ride along unused) and (0, -inf, 1), or with
    ``ACCUMULATE`` the earlier parts' (out, lse, 1) read from ``O`` and ``LSE``. ``GRAD``: q, dO, the final lse
    (base 2) and Delta, zeros for rows that do not exist (which then add nothing to any gradient), and acc 0 (m
    and l ride along unused). ``XS`` is tensor X's (batch, head, row) strides; ``LS`` serves LSE and DELTA."""
    ACC = NUM[0]
    q = _load_rows(Q + b * QS[0] + h * QS[1], rows, ok, QS[2], D, BLOCK_D, True)  # [BM, BD]
    if GRAD:
        do = _load_rows(DO + b * DOS[0] + h * DOS[1], rows, ok, DOS[2], D, BLOCK_D, True)
        row_off = b * LS[0] + h * LS[1] + rows.to(tl.int64)
        lse2 = tl.load(LSE + row_off, mask=ok, other=0.0).to(ACC) * LOG2E
        delta = tl.load(DELTA + row_off, mask=ok, other=0.0).to(ACC)
        state = (tl.zeros([BLOCK_M, BLOCK_D], ACC), lse2, lse2)
    else:
        l_i = tl.full([BLOCK_M], 1.0, ACC)
        if ACCUMULATE:  # resume the softmax of earlier parts: (m, l, acc) = (lse, 1, out)
            m_i = tl.load(LSE + b * LS[0] + h * LS[1] + rows.to(tl.int64), mask=ok, other=float("-inf"))
            acc = _load_rows(O + b * OS[0] + h * OS[1], rows, ok, OS[2], D, BLOCK_D, True).to(ACC)
            state = (acc, m_i.to(ACC) * LOG2E, l_i)
        else:
            state = (tl.zeros([BLOCK_M, BLOCK_D], ACC), tl.full([BLOCK_M], float("-inf"), ACC), l_i)
        do, lse2, delta = q, l_i, l_i
    return (q, do, lse2, delta), state


@_device
def _dot(a, b, NUM: tl.constexpr):
    """``a @ b`` with the launch's numerics ``NUM`` = (accumulator dtype, ``tl.dot`` input precision, widen):
    accumulated in the accumulator dtype. fp32 operands with precision ``"ieee"`` run as fp64 dots (exact
    products, fp64 sums, rounded to it): the fp64 tensor cores (DMMA) keep operands in the MMA register layout,
    where Triton's fp32 FMA dot holds a thread's whole K slice of both operands (255 registers and spills at
    d = 128 even for 16 x 16 tiles); DMMA's rate equals the fp32 FMA rate on A100 and H100."""
    ACC = NUM[0]
    if NUM[2]:  # interpreter only, see the module docstring
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32 and NUM[1] == "ieee":
        out = tl.dot(a.to(tl.float64), b.to(tl.float64), input_precision=NUM[1], out_dtype=tl.float64).to(ACC)
    else:
        out = tl.dot(a, b, input_precision=NUM[1], out_dtype=ACC)
    return out


# ----------------------------------------------------------------------------------------------------------
# query-major passes (forward and dQ): one step per key tile, the diagonal block and the side keys
# ----------------------------------------------------------------------------------------------------------


@_device
def _step(
    state,
    query,
    k,
    v,
    ok,
    bias2,
    scale2,
    MASK: tl.constexpr,
    GRAD: tl.constexpr,
    NUM: tl.constexpr,
):
    """One key tile of a query tile (``query`` and ``state`` as `_query_state` makes them). Forward (``GRAD``
    False): an online-softmax step (base-2 scores) on (acc, m, l). dQ: ``acc += dS K`` (m and l ride along
    unused). ``ok`` masks pairs when ``MASK``."""
    acc, m_i, l_i = state
    q, do, lse2, delta = query
    s = _dot(q, tl.trans(k), NUM) * scale2 + bias2  # [BM, BN]
    if GRAD:
        p = tl.math.exp2(s - lse2[:, None])
        if MASK:
            p = tl.where(ok, p, 0.0)
        dp = _dot(do, tl.trans(v), NUM)
        ds = p * (dp - delta[:, None])
        acc = acc + _dot(ds.to(k.dtype), k, NUM)
    else:
        if MASK:
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        empty = m_new == float("-inf")  # no key yet: keep (m, l, acc) = (-inf, 1, 0)
        m_safe = tl.where(empty, 0.0, m_new)
        alpha = tl.where(empty, 1.0, tl.math.exp2(m_i - m_safe))
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, NUM)
        m_i = m_new
    return acc, m_i, l_i


@_device
def _diag_pass(
    state,
    query,
    keys,
    lo,
    hi,
    pos,
    qidx,
    geo,
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
    NUM: tl.constexpr,
):
    """Key tiles ``[lo, hi)`` of the diagonal block: ``keys`` = (K and V bases, their row strides, the key order,
    the key mask), ``geo`` = (first key row, NK_T, SQ, SK, BAND_LO, BAND_HI). The next tile's rows (a gather
    through the key order when permuted) are loaded one iteration ahead and carried, so the K/V loads of a tile
    depend on no load of the same iteration and the pipeliner can issue them stages ahead. Without ``MASK`` the
    tiles are whole and seen by every row: no pair mask and unmasked loads (the key mask of an unpermuted
    launch still applies)."""
    k_base, v_base, skn, svn, kperm, valid = keys
    k_row0, NK_T, SQ, SK, BAND_LO, BAND_HI = geo
    kpos = lo + tl.arange(0, BLOCK_N)
    krow, k_ok = _diag_keys(kperm, kpos, hi, k_row0, NK_T, valid, PERMUTED, HAS_VALID)
    for _ in range(lo, hi, BLOCK_N):
        nrow, n_ok = _diag_keys(kperm, kpos + BLOCK_N, hi, k_row0, NK_T, valid, PERMUTED, HAS_VALID)
        k = _load_rows(k_base, krow, k_ok, skn, D, BLOCK_D, MASK)
        v = _load_rows(v_base, krow, k_ok, svn, D, BLOCK_D, MASK)
        dpos = kpos[None, :] - pos[:, None]
        didx = (krow - k_row0)[None, :] - qidx[:, None]
        ok = _block_pairs(k_ok[None, :], dpos, didx, SQ, SK, BAND_LO, BAND_HI, IS_CAUSAL, BAND)
        state = _step(state, query, k, v, ok, 0.0, scale2, MASK or HAS_VALID, GRAD, NUM)
        kpos, krow, k_ok = kpos + BLOCK_N, nrow, n_ok
    return state


@_device
def _side_pass(
    state,
    query,
    side,
    blk,
    qidx,
    BAND_LO,
    BAND_HI,
    scale2,
    BAND: tl.constexpr,
    GRAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM: tl.constexpr,
):
    """The side keys, ``side`` = (SKV, SAMP, SBLK, SLW, the kv head's row in them, M): residual draws of other
    blocks (log-weighted), then the exact extras (weight 1), read from the launcher's contiguous copy of their
    K/V rows (`_side_kv`), so that no K/V load waits on an index load. The weights carry validity, so without
    a window no pair mask is needed and no position is read."""
    SKV, SAMP, SBLK, SLW, kv_head, M = side
    for start in range(0, M, BLOCK_N):
        sp = start + tl.arange(0, BLOCK_N)
        lw2, sblk = _side_weights(SBLK, SLW, kv_head, M, sp, blk, NUM)
        k, v = _side_kv(SKV, kv_head, M, sp, BLOCK_D)
        ok = lw2[None, :] > float("-inf")
        if BAND == BAND_EXCLUDE:
            kidx = _side_index(SAMP, kv_head, M, sp)
            ok = _side_pairs(ok, kidx[None, :] - qidx[:, None], (sblk < 0)[None, :], BAND_LO, BAND_HI, BAND)
        state = _step(state, query, k, v, ok, lw2[None, :], scale2, BAND == BAND_EXCLUDE, GRAD, NUM)
    return state


# ----------------------------------------------------------------------------------------------------------
# key-major passes (dK/dV of the diagonal blocks and of the side keys)
# ----------------------------------------------------------------------------------------------------------


@_device
def _dkdv_step(
    grads,
    k,
    v,
    query,
    ok,
    bias2,
    scale2,
    MASK: tl.constexpr,
    NUM: tl.constexpr,
):
    """Key-major step: ``grads`` = (dK, dV) of a key tile, ``query`` a query tile's (q, do, lse2, delta);
    ``ok [BN, BM]`` masks (key, query) pairs when ``MASK``."""
    dk, dv = grads
    q, do, lse2, delta = query
    st = _dot(k, tl.trans(q), NUM) * scale2 + bias2  # [BN, BM]
    pt = tl.math.exp2(st - lse2[None, :])
    if MASK:
        pt = tl.where(ok, pt, 0.0)
    dv = dv + _dot(pt.to(do.dtype), do, NUM)
    dpt = _dot(v, tl.trans(do), NUM)
    dst = pt * (dpt - delta[None, :])
    dk = dk + _dot(dst.to(q.dtype), q, NUM)
    return dk, dv


@_device
def _key_pass(
    grads,
    keys,
    lo,
    hi,
    src,
    geo,
    scale2,
    MASK: tl.constexpr,
    SIDE: tl.constexpr,
    PERMUTED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    BAND: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NUM: tl.constexpr,
):
    """dK, dV (``grads``) of a key tile, ``keys`` = (k, v, sorted positions, positions in the sub-problem, which
    are attended, block, log-weight), from query positions ``[lo, hi)`` of every query head of the kv head's
    group, as one flat loop over (head, tile), so the pipeline fills once per program, not once per head; the
    next tile's rows are loaded one iteration ahead. ``src`` = (Q, QS, DO, DOS, LSE, DELTA, LS, QPERM), ``geo``
    = (sub-problem, batch, kv head, HQ, GROUP, SQ, SK, NQ_T, BQ, first query row, BAND_LO, BAND_HI). ``SIDE``:
    the keys are side keys (block exclusion, log-weights, window of draws)."""
    k, v, kpos, kidx, k_ok, sblk, lw2 = keys
    Q, QS, DO, DOS, LSE, DELTA, LS, QPERM = src
    sub, b, hk, HQ, GROUP, SQ, SK, NQ_T, BQ, q_row0, BAND_LO, BAND_HI = geo
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
        query, _ = _query_state(
            Q, QS, DO, DOS, LSE, DELTA, LS, Q, QS, b, h, qrow, q_ok, 0, True, D, BLOCK_D, BLOCK_M, NUM
        )
        didx = kidx[:, None] - (qrow - q_row0)[None, :]
        if SIDE:
            ok = k_ok[:, None] & (sblk[:, None] != (pos // BQ)[None, :])
            ok = _side_pairs(ok, didx, (sblk < 0)[:, None], BAND_LO, BAND_HI, BAND)
            grads = _dkdv_step(grads, k, v, query, ok, lw2[:, None], scale2, True, NUM)
        else:
            dpos = kpos[:, None] - pos[None, :]
            ok = _block_pairs(k_ok[:, None], dpos, didx, SQ, SK, BAND_LO, BAND_HI, IS_CAUSAL, BAND)
            grads = _dkdv_step(grads, k, v, query, ok, 0.0, scale2, MASK, NUM)
        pos, qrow, q_ok = npos, nrow, n_ok
    return grads


# ----------------------------------------------------------------------------------------------------------
# the query-major kernel: forward and dQ
# ----------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=RUNTIME)
def hyper_query(
    Q,
    K,
    V,
    KVALID,
    KCOUNT,
    QPERM,
    KPERM,
    SAMP,
    SBLK,
    SLW,
    SKV,
    O,
    LSE,
    DO,
    DELTA,
    QS,
    KS,
    VS,
    OS,
    DOS,
    LS,
    svalb,
    GEOM,
    SCALES,
    BQ_BUCKET,
    BK_BUCKET,
    M_BUCKET,
    ACCUMULATE,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PERMUTED: tl.constexpr,
    HAS_SAMPLES: tl.constexpr,
    HAS_VALID: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    BAND: tl.constexpr,
    GRAD: tl.constexpr,
    NUM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One query tile. ``GRAD=False`` (``hyper_fwd``): out into ``O`` and lse into ``LSE``, or with ``ACCUMULATE``
    merged into the (out, lse) already there. ``GRAD`` (``hyper_bwd_dq``): the same loops again given the final
    ``LSE`` and ``DELTA`` (m and l ride along unused), accumulating dQ into ``O`` (the fp32 dQ buffer); ``DO``
    and ``DELTA`` are read only then. ``XS``: tensor X's (batch, head, row) strides (``LS``: LSE's and DELTA's)."""
    HQ, GROUP, COUNT, CHUNK, Q_OFF, K_OFF, SQ, SK, NQ_T, NK_T, BQ, BK, M, BAND_LO, BAND_HI, _ = _geometry(GEOM)
    ACC = NUM[0]
    sub, h, kv_head, hk, blk, t0, pos, qrow, q_ok = _query_tile(
        tl.program_id(0), QPERM, HQ, GROUP, COUNT, CHUNK, Q_OFF, SQ, NQ_T, BQ, PERMUTED, BLOCK_M
    )
    b = (sub // COUNT).to(tl.int64)
    query, state = _query_state(
        Q, QS, DO, DOS, LSE, DELTA, LS, O, OS, b, h, qrow, q_ok, ACCUMULATE, GRAD, D, BLOCK_D, BLOCK_M, NUM
    )
    # every key the tile sees: the diagonal block's whole tiles, its other tiles, then the side keys
    scale2 = tl.load(SCALES + 1).to(ACC)
    k_row0 = (sub % COUNT) * CHUNK + K_OFF
    qidx = qrow - ((sub % COUNT) * CHUNK + Q_OFF)  # query positions in the sub-problem (the window test)
    kperm = KPERM + kv_head * SK
    keys = (K + b * KS[0] + hk * KS[1], V + b * VS[0] + hk * VS[1], KS[2], VS[2], kperm, KVALID + b * svalb)
    k_count = SK
    if PERMUTED:
        k_count = tl.load(KCOUNT + sub.to(tl.int64))
    first = blk * BQ + t0
    spans = _diag_span(
        blk, first, BQ, BK, SQ, SK, k_count, k_row0, NK_T, BAND_LO, BAND_HI, PERMUTED, IS_CAUSAL, BAND, BLOCK_M, BLOCK_N
    )
    geo = (k_row0, NK_T, SQ, SK, BAND_LO, BAND_HI)
    for i in tl.static_range(2):  # the whole tiles (no pair mask), then the rest
        state = _diag_pass(
            state,
            query,
            keys,
            spans[i],
            spans[i + 1],
            pos,
            qidx,
            geo,
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
            NUM,
        )
    if HAS_SAMPLES:
        side = (SKV, SAMP, SBLK, SLW, kv_head, M)
        state = _side_pass(state, query, side, blk, qidx, BAND_LO, BAND_HI, scale2, BAND, GRAD, BLOCK_D, BLOCK_N, NUM)
    acc, m_i, l_i = state
    o_base = O + b * OS[0] + h * OS[1]
    if GRAD:
        out = acc * tl.load(SCALES).to(ACC)
        if ACCUMULATE:
            out += _load_rows(o_base, qrow, q_ok, OS[2], D, BLOCK_D, True)
    else:
        out = acc / l_i[:, None]
        lse = (m_i + tl.math.log2(l_i)) * LN2  # -inf for rows that saw no key
        tl.store(LSE + b * LS[0] + h * LS[1] + qrow.to(tl.int64), lse, mask=q_ok)
    _store_rows(o_base, qrow, q_ok, OS[2], out.to(O.dtype.element_ty), D, BLOCK_D)


# ----------------------------------------------------------------------------------------------------------
# the key-major kernels: dK/dV
# ----------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=RUNTIME)
def hyper_bwd_dkdv(
    K,
    V,
    KVALID,
    KCOUNT,
    KPERM,
    Q,
    QPERM,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    KS,
    VS,
    QS,
    DOS,
    LS,
    DKS,
    DVS,
    svalb,
    GEOM,
    SCALES,
    BQ_BUCKET,
    BK_BUCKET,
    ACCUMULATE,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PERMUTED: tl.constexpr,
    HAS_VALID: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    BAND: tl.constexpr,
    NUM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    HQ, GROUP, COUNT, CHUNK, Q_OFF, K_OFF, SQ, SK, NQ_T, NK_T, BQ, BK, M, BAND_LO, BAND_HI, _ = _geometry(GEOM)
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
    k = _load_rows(K + b * KS[0] + hk * KS[1], krow, k_ok, KS[2], D, BLOCK_D, True)
    v = _load_rows(V + b * VS[0] + hk * VS[1], krow, k_ok, VS[2], D, BLOCK_D, True)
    kidx = krow - k_row0  # key positions in the sub-problem (the window test)
    dk = tl.zeros([BLOCK_N, BLOCK_D], NUM[0])
    dv = tl.zeros([BLOCK_N, BLOCK_D], NUM[0])

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
    keys = (k, v, kpos, kidx, k_ok, kpos, kpos)  # (block, log-weight) unread: not side keys
    src = (Q, QS, DO, DOS, LSE, DELTA, LS, QPERM)
    geo = (sub, b, hk, HQ, GROUP, SQ, SK, NQ_T, BQ, q_row0, BAND_LO, BAND_HI)
    scale2 = tl.load(SCALES + 1).to(NUM[0])
    grads = (dk, dv)
    for i in tl.static_range(2):  # queries that see part of the tile (pair mask), then those that see all of it
        lo = q_lo if i == 0 else q_mid
        hi = q_mid if i == 0 else q_hi
        grads = _key_pass(
            grads, keys, lo, hi, src, geo, scale2, i == 0, False, PERMUTED, IS_CAUSAL, BAND, D, BLOCK_D, BLOCK_M, NUM
        )
    dk, dv = grads

    dk = tl.where(k_ok[:, None], dk * tl.load(SCALES).to(NUM[0]), 0.0)
    dv = tl.where(k_ok[:, None], dv, 0.0)
    dk_base = DK + b * DKS[0] + hk * DKS[1]
    dv_base = DV + b * DVS[0] + hk * DVS[1]
    if ACCUMULATE:
        dk += _load_rows(dk_base, krow, k_in, DKS[2], D, BLOCK_D, True)
        dv += _load_rows(dv_base, krow, k_in, DVS[2], D, BLOCK_D, True)
    _store_rows(dk_base, krow, k_in, DKS[2], dk, D, BLOCK_D)
    _store_rows(dv_base, krow, k_in, DVS[2], dv, D, BLOCK_D)


@triton.jit(do_not_specialize=["ROWS_PER_SPLIT"])
def hyper_bwd_sample(
    Q,
    QPERM,
    SAMP,
    SBLK,
    SLW,
    SKV,
    DO,
    LSE,
    DELTA,
    PART,
    QS,
    DOS,
    LS,
    GEOM,
    SCALES,
    ROWS_PER_SPLIT,
    SQ_BUCKET,
    BQ_BUCKET,
    M_BUCKET,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BAND: tl.constexpr,
    NUM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    HQ, GROUP, COUNT, CHUNK, Q_OFF, K_OFF, SQ, SK, NQ_T, NK_T, BQ, BK, M, BAND_LO, BAND_HI, _ = _geometry(GEOM)
    # pass 1 of the side keys' dK/dV: program -> (sub-problem, kv head, split of query rows, side-key tile);
    # PART [splits, n_sub * Hkv, 2, M, BLOCK_D] fp32 partials (dK then dV)
    pid = tl.program_id(0)
    tiles = tl.cdiv(M, BLOCK_N)
    splits = tl.cdiv(SQ, ROWS_PER_SPLIT)
    kv = pid // (splits * tiles)
    split = (pid // tiles) % splits
    sub = kv // (HQ // GROUP)
    hk = (kv % (HQ // GROUP)).to(tl.int64)
    kv_head = kv.to(tl.int64)
    b = (sub // COUNT).to(tl.int64)
    q_row0 = (sub % COUNT) * CHUNK + Q_OFF
    sp = (pid % tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    lw2, sblk = _side_weights(SBLK, SLW, kv_head, M, sp, -2, NUM)
    k_ok = lw2 > float("-inf")
    k, v = _side_kv(SKV, kv_head, M, sp, BLOCK_D)
    kidx = _side_index(SAMP, kv_head, M, sp)
    dk = tl.zeros([BLOCK_N, BLOCK_D], NUM[0])
    dv = tl.zeros([BLOCK_N, BLOCK_D], NUM[0])
    p_lo = split * ROWS_PER_SPLIT
    p_hi = tl.minimum(p_lo + ROWS_PER_SPLIT, SQ)
    keys = (k, v, sp, kidx, k_ok, sblk, lw2)
    src = (Q, QS, DO, DOS, LSE, DELTA, LS, QPERM)
    geo = (sub, b, hk, HQ, GROUP, SQ, SK, NQ_T, BQ, q_row0, BAND_LO, BAND_HI)
    scale2 = tl.load(SCALES + 1).to(NUM[0])
    dk, dv = _key_pass(
        (dk, dv), keys, p_lo, p_hi, src, geo, scale2, True, True, True, False, BAND, D, BLOCK_D, BLOCK_M, NUM
    )

    offs_d = tl.arange(0, BLOCK_D)
    heads = tl.num_programs(0) // (splits * tiles)  # n_sub * Hkv
    row = ((split.to(tl.int64) * heads + kv_head) * 2) * M + sp  # [BN] rows of PART viewed as [-1, BLOCK_D]
    ptrs = PART + row[:, None] * BLOCK_D + offs_d[None, :]
    inside = (sp < M)[:, None]
    tl.store(ptrs, dk * tl.load(SCALES).to(NUM[0]), mask=inside)
    tl.store(ptrs + M * BLOCK_D, dv, mask=inside)
