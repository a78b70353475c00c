"""The CUDA path: HyperAttention as fused Triton kernels (forward, dQ, dK/dV), same semantics as `cpu`.

Every launch handles a batch of *sub-problems* that read the caller's tensors in place: sub-problem ``s = b * count
+ c`` takes query rows ``c * chunk + q_off + [0, sq)`` and key rows ``c * chunk + k_off + [0, sk)`` of batch ``b``.
So one launch covers the whole non-causal call (count = 1), all exact causal leaves (count = 2**depth), or all
off-diagonal quadrants of one causal level (count = 2**level, chunk = 2 * size, q_off = size): each level of the
recursion is one launch, and no chunk of Q/K/V is copied for attention. Row indices go through the plan's
permutations inside the kernels (gather on load, scatter on store): no sorted copy of Q, K, V, dO or O is ever made.
Only the side keys (`_Side`: t rows per sub-problem and kv head, read by every query tile of the group) are copied,
into one contiguous tensor (`_side_args`), so that their loop loads tiles at affine addresses, which Triton's
pipeliner stages as asynchronous copies. GQA maps query head h to key head h // (Hq / Hkv).

Exact parts (sink_keys, local_window), laid out as in `cpu` and `reference`: every planned sub-problem splits
its keys with `parts.exact_keys` into the estimator's keys (the only ones blocked and sampled: they are the
kernels' key mask) and exact extras, appended to the residual draws as side keys of weight 1 (`_Side`). Causal:
each level's extras are the last ``w - 1`` keys of every even chunk and its sinks, and a KV prefix (n_q < n_k)
is a non-causal sub-problem with the same strip. Non-causal self-attention: the hyper launch leaves each
query's centred window out of its blocks and draws, and one exact banded launch (``BAND_ONLY``) merges it in.
The residual's per-draw log-weights serve the uniform and the stratified schemes alike.

Causal: exact leaves use ``flash_attn.flash_attn_func`` when the optional ``[cuda]`` extra is installed
(fp16/bf16 CUDA tensors without a key mask), else `triton_kernels.hyper_query` with ``IS_CAUSAL``. The backward
of the leaves is always ours (flash-attn's backward entry points are private and change between versions).

LSH hashing stays in torch ops (`draws.lsh_ranks`): the projection is an [N, D] x [D, r] product with r = 7,
bandwidth-bound at one read of Q and K, which cuBLAS already does at memory speed; the sign/Gray-rank step is
elementwise on [N, r]; and the cost that matters, the argsort, is torch's radix sort. A fused hashing kernel
would save one [N, r] intermediate, well under 1% of the forward's traffic.

Launch configuration (`triton_configs`): ``triton.Config`` lists by dot-operand width and head-dim class,
pruned per call and GPU (tiles never larger than the block they cover, shared memory within the GPU's per-block
limit). Autotune keys are power-of-two *buckets* of the block lengths plus BLOCK_D, never raw n, and the lengths
themselves are not arguments but the int32 descriptor ``GEOM`` (`triton_configs.geometry`), read at entry: one
compile and one tuning per bucket, not per sequence length. Ragged
n, ragged blocks and ragged sample tiles are masked; head dims are padded to ``BLOCK_D = next_pow2(max(D, 16))``
in registers only (masked loads/stores). fp16 and bf16 run tensor-core dots with fp32 accumulation; fp32 dots
run in fp64 (no TF32, to match eager fp32) and fp64 accumulates in fp64.

Design targets (non-causal, defaults b = m = 256, D = 128, fp16, BLOCK_M = 128, BLOCK_N = 64):
- FLOPs per query: 4 * D * (b_k + m) = 4 * 128 * 512 ~ 0.26 MFLOP (exact attention: 4 * D * n, 256x more
  at n = 131072). Backward ~2.5x that (5 dots instead of 2).
- Bytes per query, forward: Q and O rows 2 * D * 2 = 512 B; the diagonal K/V block is read once per query tile, 2 *
  b_k * D * 2 / BLOCK_M = 1 KiB per query; sampled K/V are the same m rows for every tile of a head (one contiguous
  copy) and stay in L2 (1 KiB per query from L2, ~m * D * 4 / (rows per head) from DRAM); indices and lse ~16 B.
  About 1.5 KiB of DRAM traffic per 0.26 MFLOP: ~170 FLOP/B, compute-bound on A100/H100 fp16.
- Tiles: the lists of `triton_configs`; the interpreter runs 64 x 64. GPU speed has not been measured (no GPU
  was available). Correctness was checked under ``TRITON_INTERPRET=1`` against the reference, and every
  variant the launchers can start was built ahead of time to sm_80/sm_90 cubins with Triton's bundled ptxas:
  no spills, shared memory within limits (tests/test_triton.py, docs/gpu.md).

The kernels themselves (``@triton.jit``) live in `triton_kernels`; this module holds their launch
configurations, the autotuning wrappers and pruning, the host launchers and the public entry points.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton

from . import triton_kernels as tk
from .draws import Draws
from .parts import call_sinks, exact_keys, hyper_inputs, pad_rows, part_masks, part_ranks, sub_view
from .plan import Part, lse_dtype, next_pow2, plan_call
from .triton_configs import bucket as _bucket
from .triton_configs import geometry, numerics, row_strides
from .triton_configs import hyper_bwd_dkdv as _hyper_bwd_dkdv_kernel
from .triton_configs import hyper_bwd_dq as _hyper_bwd_dq_kernel
from .triton_configs import hyper_bwd_sample as _hyper_bwd_sample_kernel
from .triton_configs import hyper_fwd as _hyper_fwd_kernel

try:  # optional: the [cuda] extra
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    _flash_attn_func = None

NEG_INF = float("-inf")

# whether the kernels run under the interpreter (decided when `triton_kernels` is imported)
_INTERPRET = tk.INTERPRET

# ----------------------------------------------------------------------------------------------------------
# host launchers
# ----------------------------------------------------------------------------------------------------------


class _Side(NamedTuple):
    """Keys every query of a sub-problem attends to besides its own block: the residual draws (excluded from the
    block they sit in, log-weighted), then the exact extras (`parts.exact_keys`: sinks and the window strip;
    block -1 so that no block excludes them, log-weight 0). One pass over them serves both."""

    pos: torch.Tensor  # [n_sub, Hkv, t] key positions in the sub-problem
    blk: torch.Tensor  # [n_sub, Hkv, t] block of each draw (sorted position // k_block); -1 for the extras
    lw: torch.Tensor  # [n_sub, Hkv, t] float32 log-weight; -inf: not attended (masked key, empty stratum)


class _Sub(NamedTuple):
    """The sub-problems of one launch: ``count`` per batch; see the module docstring."""

    count: int
    chunk: int
    q_off: int
    k_off: int
    sq: int  # query rows per sub-problem (padded coordinates)
    sk: int  # key rows per sub-problem
    causal: bool
    plan: Draws | None  # None: exact attention, one block
    valid: torch.Tensor | None = None  # [B, >= key rows] bool, by tensor row: the keys blocks may attend
    side: _Side | None = None
    band: int = 0  # BAND_NONE / BAND_EXCLUDE / BAND_ONLY (`triton_kernels`)
    window: tuple = (0, 0)  # (a, b): the window of query i is keys i - a .. i + b


class _Grads(NamedTuple):
    do: torch.Tensor  # [B, Hq, Nq, D]
    lse: torch.Tensor  # [B, Hq, Nq] final lse, -inf replaced by 0
    delta: torch.Tensor  # [B, Hq, Nq] rowsum(dO * O)
    dq: torch.Tensor  # [B, Hq, Nq, D] fp32 accumulators
    dk: torch.Tensor  # [B, Hkv, Nk, D]
    dv: torch.Tensor

    def launch_args(self) -> dict:
        """The backward kernels' tensor arguments (``DO``, ``LSE``, ...) with their row strides."""
        fields = self._asdict()
        rows = row_strides(**{name: x for name, x in fields.items() if x.dim() == 4})  # lse, delta: [B, Hq, Nq]
        named = {name.upper(): x for name, x in fields.items()}
        return dict(named, **rows, LS=self.lse.stride()[:2])


def _rowmajor(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _common(q, k, v, sub: _Sub, scale):
    """Keyword arguments shared by every kernel, and the grid geometry ``(heads, nb, bq, bk, t)``."""
    B, Hq, NQ_T, D = q.shape
    Hkv, NK_T = k.shape[1], k.shape[2]
    plan, side = sub.plan, sub.side
    dev = q.device
    dummy_i = torch.zeros(1, dtype=torch.int32, device=dev)
    if plan is None:
        nb, bq, bk = 1, sub.sq, sub.sk
    else:
        nb, bq, bk = plan.num_blocks, plan.q_block, plan.k_block
    t = side.pos.shape[-1] if side is not None else 0
    i32 = lambda x: x.to(torch.int32).contiguous()  # noqa: E731
    block_d = max(16, next_pow2(D))
    by_row = sub.valid is not None and plan is None  # a permuted launch counts its keys instead (sorted first)
    if by_row:  # rows may be strided (slices, broadcasts), keys must be adjacent
        valid = sub.valid.to(torch.bool)
        valid = (valid if valid.stride(-1) == 1 else valid.contiguous()).view(torch.uint8)
    else:
        valid = torch.zeros(1, 1, dtype=torch.uint8, device=dev)
    args = dict(
        Q=q,
        K=k,
        V=v,
        KVALID=valid,
        KCOUNT=_key_counts(sub, B, dev) if plan is not None else dummy_i,
        QPERM=i32(plan.q_perm) if plan is not None else dummy_i,
        KPERM=i32(plan.k_perm) if plan is not None else dummy_i,
        SAMP=i32(side.pos) if t else dummy_i,
        SBLK=i32(side.blk) if t else dummy_i,
        **_side_args(k, v, sub, block_d) if t else dict(SLW=dummy_i.float(), SKV=q.new_zeros(1)),
        **row_strides(q=q, k=k, v=v),
        svalb=valid.stride(0),
        GEOM=geometry(
            tk.LENGTHS,
            dev,
            HQ=Hq,
            GROUP=Hq // Hkv,
            COUNT=sub.count,
            CHUNK=sub.chunk,
            Q_OFF=sub.q_off,
            K_OFF=sub.k_off,
            SQ=sub.sq,
            SK=sub.sk,
            NQ_T=NQ_T,
            NK_T=NK_T,
            BQ=bq,
            BK=bk,
            M=t,
            BAND_LO=sub.window[0],
            BAND_HI=sub.window[1],
        ),
        # the scales as a tensor in the accumulator's dtype: a float argument is fp32 under the interpreter
        SCALES=torch.tensor([scale, scale * math.log2(math.e)], dtype=lse_dtype(q.dtype), device=dev),
        SQ_BUCKET=_bucket(sub.sq),
        BQ_BUCKET=_bucket(bq),
        BK_BUCKET=_bucket(bk),
        M_BUCKET=_bucket(t),
        D=D,
        BLOCK_D=block_d,
        PERMUTED=plan is not None,
        HAS_SAMPLES=t > 0,
        HAS_VALID=by_row,
        IS_CAUSAL=sub.causal,
        BAND=sub.band,
        NUM=numerics(q.dtype, _INTERPRET),
    )
    return args, (B * sub.count, nb, bq, bk, t)


def _side_index(sub: _Sub, n_k: int) -> tuple[tuple, torch.Tensor]:
    """Tensor coordinates ``(batch, kv head, row)`` of the side keys ``[n_sub, Hkv, t]``, and which rows exist
    (a sub-problem without valid keys may draw a padding row past the tensor: it indexes the last row instead,
    with weight -inf, so that it adds nothing)."""
    pos = sub.side.pos
    n_sub, Hkv, _ = pos.shape
    s = torch.arange(n_sub, device=pos.device).view(n_sub, 1, 1)
    h = torch.arange(Hkv, device=pos.device).view(1, Hkv, 1)
    row = (s % sub.count) * sub.chunk + sub.k_off + pos
    return ((s // sub.count).expand_as(pos), h.expand_as(pos), row.clamp(max=n_k - 1)), row < n_k


def _side_args(k, v, sub: _Sub, block_d: int) -> dict:
    """The side keys' log-weights ``SLW`` and their K/V rows as one contiguous, zero-padded copy ``SKV [n_sub *
    Hkv, 2, t, block_d]``, which the kernels read by tile (`triton_kernels._side_kv`): t rows per (sub-problem,
    kv head), read by every query tile of the group's heads."""
    index, inside = _side_index(sub, k.shape[2])
    kv = torch.nn.functional.pad(torch.stack((k[index], v[index]), 2), (0, block_d - k.shape[-1]))
    return dict(SLW=sub.side.lw.float().masked_fill(~inside, NEG_INF).contiguous(), SKV=kv.contiguous())


def _key_counts(sub: _Sub, B: int, dev) -> torch.Tensor:
    """``[B * count]`` int32: the estimator's keys of each sub-problem (its key rows marked in ``sub.valid``),
    which the plan sorts first; all ``sk`` keys without a mask."""
    n_sub = B * sub.count
    if sub.valid is None:
        return torch.full((n_sub,), sub.sk, dtype=torch.int32, device=dev)
    rows = sub.valid[:, sub.k_off :]
    if sub.count == 1:
        return rows[:, : sub.sk].sum(-1, dtype=torch.int32)
    return rows.unfold(1, sub.sk, sub.chunk)[:, : sub.count].sum(-1, dtype=torch.int32).reshape(n_sub)


def _launch(kernel, grid, args):
    kernel[grid](**{name: value for name, value in args.items() if name in kernel.arg_names})


def _launch_fwd(q, k, v, sub: _Sub, out, lse, scale, accumulate: bool):
    """Attention of the sub-problems into ``out [B,Hq,Nq,D]``, ``lse [B,Hq,Nq]`` (merged in if accumulate)."""
    args, (n_sub, nb, bq, _, _) = _common(q, k, v, sub, scale)
    args.update(O=out, LSE=lse, **row_strides(o=out), LS=lse.stride()[:2], ACCUMULATE=accumulate)
    args.update(DO=out, DELTA=lse, **row_strides(do=out), GRAD=False)  # read only by the dQ launch
    heads = n_sub * q.shape[1]
    _launch(_hyper_fwd_kernel, lambda meta: (heads * nb * triton.cdiv(bq, meta["BLOCK_M"]),), args)


def _rows_per_split(sq: int, heads: int, m: int, device) -> int:
    """Query rows per split of the side keys' dK/dV: about 4 programs per SM, at most 64 splits."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = max(1, math.ceil(4 * sms / (heads * math.ceil(m / 64))))
    rows = math.ceil(sq / min(want, 64))
    return max(128, math.ceil(rows / 128) * 128)


def _launch_bwd(q, k, v, sub: _Sub, g: _Grads, scale, accumulate_q: bool, accumulate_k: bool):
    """Adds the sub-problems' gradients into ``g.dq, g.dk, g.dv``."""
    args, (n_sub, nb, bq, bk, t) = _common(q, k, v, sub, scale)
    Hq, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]
    args.update(g.launch_args())
    _launch(
        _hyper_bwd_dq_kernel,
        lambda meta: (n_sub * Hq * nb * triton.cdiv(bq, meta["BLOCK_M"]),),
        dict(args, O=g.dq, **row_strides(o=g.dq), GRAD=True, ACCUMULATE=accumulate_q),
    )
    _launch(
        _hyper_bwd_dkdv_kernel,
        lambda meta: (n_sub * Hkv * nb * triton.cdiv(bk, meta["BLOCK_N"]),),
        dict(args, ACCUMULATE=accumulate_k),
    )
    if not args["HAS_SAMPLES"]:
        return
    rows = _rows_per_split(sub.sq, n_sub * Hkv, t, q.device)
    splits = math.ceil(sub.sq / rows)
    part = torch.empty(splits, n_sub * Hkv, 2, t, args["BLOCK_D"], dtype=g.dk.dtype, device=q.device)
    _launch(
        _hyper_bwd_sample_kernel,
        lambda meta: (n_sub * Hkv * splits * triton.cdiv(t, meta["BLOCK_N"]),),
        dict(args, PART=part, ROWS_PER_SPLIT=rows),
    )
    # pass 2: sum the splits, add each side key's gradient to its row (repeated draws add up)
    grad = part.sum(0)[..., :D].view(n_sub, Hkv, 2, t, D)
    index, _ = _side_index(sub, k.shape[2])  # a row past the tensor has gradient 0
    g.dk.index_put_(index, grad[:, :, 0], accumulate=True)
    g.dv.index_put_(index, grad[:, :, 1], accumulate=True)


# ----------------------------------------------------------------------------------------------------------
# the sub-problems: one launch per part of the call plan (`plan.plan_call`, `parts.hyper_inputs`)
# ----------------------------------------------------------------------------------------------------------


def _side(draws: Draws, est, extras, Hkv) -> _Side | None:
    """The side keys of a ``"hyper"`` part: the draws (log-weighted, -inf for a draw outside the estimator's keys
    ``est [n_sub, sk]``), then the exact extras ``(pos, ok) [n_sub, e]`` (log-weight 0)."""
    n_sub = draws.q_perm.shape[0]
    parts = []
    if draws.samples is not None:
        lw = draws.sample_log_weight.float()
        if est is not None:
            drawn = torch.gather(est[:, None, :].expand(n_sub, Hkv, est.shape[-1]), 2, draws.samples)
            lw = lw.masked_fill(~drawn, NEG_INF)
        parts.append((draws.samples, draws.sample_block, lw))
    if extras is not None:
        pos, ok = extras
        e = pos.shape[-1]
        zero = torch.zeros(ok.shape, dtype=torch.float32, device=ok.device).masked_fill_(~ok, NEG_INF)
        heads = lambda x: x[:, None, :].expand(n_sub, Hkv, e)  # noqa: E731
        parts.append((heads(pos), heads(torch.full_like(pos, -1)), heads(zero)))
    if not parts:
        return None
    return _Side(*(torch.cat(x, -1) for x in zip(*parts)))


def _by_row(part: Part, est: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """The estimator's keys ``[B*count, sk]`` of a part's sub-problems by tensor row: ``[B, k_len]`` (the kernels'
    key mask; rows no sub-problem takes as keys are never read)."""
    if est is None:
        return None
    if part.count == 1 and part.k_off == 0 and part.sk == part.k_len:
        return est
    rows = torch.zeros(batch, part.k_len, dtype=torch.bool, device=est.device)
    sub_view(rows, part, False).copy_(est.view(batch, part.count, part.sk))
    return rows


def _sub(part: Part, q, k, key_valid, sink, p) -> _Sub:
    """The launch of one part of the call plan (its keys: ``k[:, :, part.keys[0]:part.keys[1]]``)."""
    B = q.shape[0]
    geometry = (part.count, part.chunk, part.q_off, part.k_off, part.sq, part.sk)
    valid, sinks = part_masks(part, key_valid, sink, B, q.device)
    if part.kind in ("exact", "causal"):
        return _Sub(*geometry, part.kind == "causal", None, valid)
    if part.kind == "band":
        est = exact_keys(valid, sinks, 0, B, part.sk, q.device)[0]  # the sinks are the hyper part's extras
        return _Sub(*geometry, False, None, est, None, tk.BAND_ONLY.value, part.window)
    inputs = hyper_inputs(part, valid, sinks, part_ranks(part, q, k, p), p)
    side = _side(inputs.draws, inputs.est, inputs.extras, k.shape[1])
    band = tk.BAND_NONE.value if part.window is None else tk.BAND_EXCLUDE.value
    return _Sub(*geometry, False, inputs.draws, _by_row(part, inputs.est, B), side, band, part.window or (0, 0))


def _flash_leaves_ok(q, key_valid) -> bool:
    """flash-attn runs the exact leaves: installed, CUDA, fp16/bf16, no key mask, head dim <= 256."""
    return (
        _flash_attn_func is not None
        and q.is_cuda
        and key_valid is None
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] <= 256
    )


def _flash_leaves(q, k, v, leaves: _Sub, scale, out, lse):
    """Exact causal leaves through ``flash_attn_func`` ([B*pieces, leaf, H, D] layout) into ``out``, ``lse``."""
    B, Hq, N, D = q.shape
    pieces, leaf = leaves.count, leaves.sq
    Np = pieces * leaf

    def fold(x):  # [B, H, N, D] -> [B * pieces, leaf, H, D]
        H = x.shape[1]
        return pad_rows(x, Np).reshape(B, H, pieces, leaf, D).permute(0, 2, 3, 1, 4).reshape(B * pieces, leaf, H, D)

    o, l, _ = _flash_attn_func(fold(q), fold(k), fold(v), softmax_scale=scale, causal=True, return_attn_probs=True)
    out.copy_(o.reshape(B, pieces, leaf, Hq, D).permute(0, 3, 1, 2, 4).reshape(B, Hq, Np, D)[:, :, :N])
    lse.copy_(l[..., :leaf].reshape(B, pieces, Hq, leaf).permute(0, 2, 1, 3).reshape(B, Hq, Np)[:, :, :N])


def _check(q, k, v):
    if v.shape[-1] != q.shape[-1] or k.shape[-1] != q.shape[-1]:
        raise NotImplementedError("the Triton path needs one head dim for query, key and value")


def _launches(q, k, key_valid, is_causal, p):
    """Every launch of the call (`plan.plan_call`), in order, as ``(keys, sub)`` pairs: the key rows (a slice of the
    sequence) that the launch addresses, and its `_Sub`. The first launch writes, the rest merge in."""
    plan = plan_call(q.shape[2], k.shape[2], is_causal, p)
    sink = call_sinks(plan, key_valid, q.shape[0], q.device)
    return [(slice(*part.keys), _sub(part, q, k, key_valid, sink, p)) for part in plan.parts]


def attention_forward(q, k, v, key_valid, is_causal, scale, p):
    """HyperAttention with Triton kernels: same contract as `cpu.attention_forward`.

    ``q [B,Hq,Nq,D]``, ``k, v [B,Hkv,Nk,D]`` (Hq a multiple of Hkv), ``key_valid [B,Nk]`` bool or None; causal
    is bottom-right aligned (n_q <= n_k). ``p``: a `HyperConfig`. Returns ``(out [B,Hq,Nq,D], lse [B,Hq,Nq])``,
    lse float32 (float64 for float64 inputs), -inf for rows without any key.
    """
    _check(q, k, v)
    B, Hq, Nq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q, k, v = _rowmajor(q), _rowmajor(k), _rowmajor(v)
    lse = torch.empty(B, Hq, Nq, dtype=lse_dtype(q.dtype), device=q.device)
    launches = _launches(q, k, key_valid, is_causal, p)
    if len(launches) == 1 and not launches[0][1].causal:  # one launch: write the output in its dtype
        out = torch.empty(B, Hq, Nq, D, dtype=q.dtype, device=q.device)
        _launch_fwd(q, k, v, launches[0][1], out, lse, scale, accumulate=False)
        return out, lse
    acc = torch.empty(B, Hq, Nq, D, dtype=lse_dtype(q.dtype), device=q.device)
    for i, (keys, sub) in enumerate(launches):
        kk, vv = k[:, :, keys], v[:, :, keys]
        if i == 0 and sub.causal and _flash_leaves_ok(q, key_valid):
            _flash_leaves(q, kk, vv, sub, scale, acc, lse)
        else:  # one launch per part, merged into the first part's result
            _launch_fwd(q, kk, vv, sub, acc, lse, scale, accumulate=i > 0)
    return acc.to(q.dtype), lse


def _backward_setup(do, q, k, v, out, lse, scale):
    """Row-major operands, the resolved scale and the fp32 (fp64) gradient buffers shared by every backward."""
    _check(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v, do = _rowmajor(q), _rowmajor(k), _rowmajor(v), _rowmajor(do)
    acc_dt = lse_dtype(q.dtype)
    g = _Grads(
        do=do,
        lse=lse.to(acc_dt).masked_fill(torch.isneginf(lse), 0.0).contiguous(),  # rows with no keys: no NaN
        delta=(do.to(acc_dt) * out.to(acc_dt)).sum(-1).contiguous(),
        dq=torch.empty(q.shape, dtype=acc_dt, device=q.device),
        dk=torch.empty(k.shape, dtype=acc_dt, device=q.device),
        dv=torch.empty(v.shape, dtype=acc_dt, device=q.device),
    )
    return q, k, v, g, scale


def attention_backward(do, q, k, v, out, lse, key_valid, is_causal, scale, p):
    """Gradients ``(dq, dk, dv)`` of `attention_forward` given its final ``out`` and ``lse``.

    Shapes as in `attention_forward`; ``do`` like ``out``. Same contract as `cpu.attention_backward`.
    """
    q, k, v, g, scale = _backward_setup(do, q, k, v, out, lse, scale)
    seen = set()  # key ranges written: the first launch on a range writes its dK/dV, the rest add
    for i, (keys, sub) in enumerate(_launches(q, k, key_valid, is_causal, p)):
        gk = g._replace(dk=g.dk[:, :, keys], dv=g.dv[:, :, keys])
        _launch_bwd(q, k[:, :, keys], v[:, :, keys], sub, gk, scale, i > 0, (keys.start, keys.stop) in seen)
        seen.add((keys.start, keys.stop))
    return g.dq.to(q.dtype), g.dk.to(k.dtype), g.dv.to(v.dtype)


# ----------------------------------------------------------------------------------------------------------
# hyper::window_attention: exact banded attention, one launch of the BAND_ONLY kernels
# ----------------------------------------------------------------------------------------------------------


def _window_sub(Nq: int, Nk: int, key_valid, band) -> _Sub:
    """One unpermuted sub-problem whose (query, key) pairs are the band ``band = (a, b)``: query i sees key j iff
    ``-a <= j - i - (Nk - Nq) <= b`` (clamped as `op.window_bounds` clamps it). The kernels' window test is
    ``-BAND_LO <= j - i <= BAND_HI``, so the bottom-right offset moves into the bounds. Each query tile visits
    only the key tiles its rows' windows reach (`triton_kernels._key_span`), each key tile of the dK/dV kernel
    only the query tiles whose windows reach it; edges are masked per pair, padded keys by ``KVALID``."""
    a, b = band
    off = Nk - Nq
    return _Sub(1, 0, 0, 0, Nq, Nk, False, None, key_valid, None, tk.BAND_ONLY.value, (a - off, b + off))


def window_forward(q, k, v, key_valid, band, scale):
    """Exact banded attention (hyper::window_attention) with the Triton kernels: same contract as
    `cpu.window_forward`. ``q [B,Hq,Nq,D]``, ``k, v [B,Hkv,Nk,D]``, ``band = (a, b)``. Returns ``(out, lse)``;
    a row with no key in its band gets out 0 and lse -inf."""
    _check(q, k, v)
    B, Hq, Nq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q, k, v = _rowmajor(q), _rowmajor(k), _rowmajor(v)
    out = torch.empty(B, Hq, Nq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Nq, dtype=lse_dtype(q.dtype), device=q.device)
    _launch_fwd(q, k, v, _window_sub(Nq, k.shape[2], key_valid, band), out, lse, scale, accumulate=False)
    return out, lse


def window_backward(do, q, k, v, out, lse, key_valid, band, scale):
    """Gradients ``(dq, dk, dv)`` of `window_forward` given its ``out`` and ``lse``: the dQ kernel (query-major)
    and the dK/dV kernel (key-major, each key row owned by one program: no atomics)."""
    q, k, v, g, scale = _backward_setup(do, q, k, v, out, lse, scale)
    _launch_bwd(q, k, v, _window_sub(q.shape[2], k.shape[2], key_valid, band), g, scale, False, False)
    return g.dq.to(q.dtype), g.dk.to(k.dtype), g.dv.to(v.dtype)
