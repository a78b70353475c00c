"""The CUDA path: HyperAttention as fused Triton kernels (forward, dQ, dK/dV), same semantics as `cpu`.

Every launch handles a batch of *sub-problems* that read the caller's tensors in place: sub-problem
``s = b * count + c`` takes query rows ``c * chunk + q_off + [0, sq)`` and key rows ``c * chunk + k_off +
[0, sk)`` of batch ``b``. So one launch covers the whole non-causal call (count = 1), all exact causal leaves
(count = 2**depth), or all off-diagonal quadrants of one causal level (count = 2**level, chunk = 2 * size,
q_off = size): each level of the recursion is one launch, and no chunk of Q/K/V is copied for attention.
Row indices go through the plan's permutations inside the kernels (gather on load, scatter on store): no
sorted copy of Q, K, V, dO or O is ever made. GQA maps query head h to key head h // (Hq / Hkv).


Causal: exact leaves use ``flash_attn.flash_attn_func`` when the optional ``[cuda]`` extra is installed
(fp16/bf16 CUDA tensors without a key mask), else ``_hyper_fwd_kernel`` with ``IS_CAUSAL``. The backward of the
leaves is always ours (flash-attn's backward entry points are private and change between versions).

LSH hashing stays in torch ops (`plan.make_plan`): the projection is an [N, D] x [D, r] product with r = 7,
bandwidth-bound at one read of Q and K, which cuBLAS already does at memory speed; the sign/Gray-rank step is
elementwise on [N, r]; and the cost that matters, the argsort, is torch's radix sort. A fused hashing kernel
would save one [N, r] intermediate, well under 1% of the forward's traffic.

Launch configuration: ``triton.Config`` lists pruned by block lengths and head dim (tiles never larger than
the block they cover; a tile-bytes budget per dtype keeps shared memory under ~100 KiB). Autotune keys
are power-of-two *buckets* of the block lengths plus BLOCK_D, never raw n, and every length argument is
``do_not_specialize``: one compile and one tuning per bucket, not per sequence length. Ragged n, ragged
blocks and ragged sample tiles are masked; head dims are padded to ``BLOCK_D = next_pow2(max(D, 16))`` in
registers only (masked loads/stores). fp16 and bf16 run tensor-core dots with fp32 accumulation; fp32 uses
``input_precision="ieee"`` (no TF32, to match eager fp32); fp64 accumulates in fp64.

Design targets (non-causal, defaults b = m = 256, D = 128, fp16, BLOCK_M = 128, BLOCK_N = 64):
- FLOPs per query: 4 * D * (b_k + m) = 4 * 128 * 512 ~ 0.26 MFLOP (exact attention: 4 * D * n, 256x more
  at n = 131072). Backward ~2.5x that (5 dots instead of 2).
- Bytes per query, forward: Q and O rows 2 * D * 2 = 512 B; the diagonal K/V block is read once per query tile,
  2 * b_k * D * 2 / BLOCK_M = 1 KiB per query; sampled K/V are the same m rows for every tile of a head and stay
  in L2 (1 KiB per query from L2, ~m * D * 4 / (rows per head) from DRAM); indices and lse ~16 B.
  About 1.5 KiB of DRAM traffic per 0.26 MFLOP: ~170 FLOP/B, compute-bound on A100/H100 fp16.
- Tiles: forward/dQ BLOCK_M in {64, 128} query rows x BLOCK_N in {32, 64, 128} keys; dK/dV BLOCK_N in
  {64, 128} keys x BLOCK_M in {32, 64} queries; 32 x 32 is the fallback for wide heads and fp64, and the
  interpreter runs 64 x 64. These are targets: GPU speed has not been measured (no GPU was available).
  Correctness was checked under ``TRITON_INTERPRET=1`` against the reference, and the kernels were built
  ahead of time to sm_80/sm_90 cubins with Triton's bundled ptxas (shared memory per block within limits):
  see tests/test_triton.py.

The kernels themselves (``@triton.jit``) live in `triton_kernels`; this module holds their launch
configurations, the autotuning wrappers and pruning, the host launchers and the public entry points.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import triton_kernels as tk
from .plan import Plan, _chunks, _pad_rows, causal_levels, hyper_applies, lse_dtype, make_plan

try:  # optional: the [cuda] extra
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    _flash_attn_func = None

# whether the kernels run under the interpreter (decided when `triton_kernels` is imported)
_INTERPRET = tk.INTERPRET

# ----------------------------------------------------------------------------------------------------------
# launch configurations
# ----------------------------------------------------------------------------------------------------------

def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(int(n), 1))))


def _bucket(n: int, cap: int = 16384) -> int:
    """Autotune key for a length: its next power of two, capped."""
    return min(_next_pow2(n), cap)


def _config(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# (BLOCK_M query rows, BLOCK_N keys, warps, stages); the (32, 32) entry is the interpreter's and a fallback
_QUERY_MAJOR = [_config(*c) for c in [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (128, 32, 4, 4),
                                      (64, 64, 4, 3), (64, 128, 4, 2), (64, 32, 4, 4), (32, 32, 4, 2)]]
_KEY_MAJOR = [_config(*c) for c in [(64, 128, 8, 2), (32, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3),
                                    (32, 32, 4, 2)]]


def _prune(configs, named_args, rows_arg, keys_args, **kwargs):
    args = {**named_args, **kwargs}
    small = [c for c in configs if c.kwargs["BLOCK_M"] == 32 and c.kwargs["BLOCK_N"] == 32]
    if _INTERPRET:  # one config, no benchmarking; every op costs the same at any tile size there
        return [c for c in configs if c.kwargs["BLOCK_M"] == 64 and c.kwargs["BLOCK_N"] == 64][:1]
    rows = max(32, _next_pow2(args[rows_arg]))
    keys = max(32, _next_pow2(max(args[k] for k in keys_args)))
    # tile bytes: BLOCK_M * BLOCK_N * BLOCK_D * 2 <= 2 MiB for 16-bit inputs; fp32 counts double, and fp64
    # (no tensor cores, 8-byte operands) keeps to the smallest tiles, which stay under 100 KiB of shared memory
    itemsize = args["Q"].element_size()
    budget = 2**21 if itemsize <= 4 else 2**18
    keep = [c for c in configs
            if c.kwargs["BLOCK_M"] <= rows and c.kwargs["BLOCK_N"] <= keys
            and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * args["BLOCK_D"] * max(2, itemsize) <= budget]
    return keep or small[:1]


def _prune_query_major(configs, named_args, **kwargs):
    return _prune(configs, named_args, "BQ", ("BK", "M"), **kwargs)


def _prune_key_major(configs, named_args, **kwargs):
    return _prune(configs, named_args, "BQ", ("BK",), **kwargs)


def _prune_samples(configs, named_args, **kwargs):
    return _prune(configs, named_args, "SQ", ("M",), **kwargs)


_KEYS = ["BQ_BUCKET", "BK_BUCKET", "M_BUCKET", "BLOCK_D", "PERMUTED", "IS_CAUSAL", "HAS_SAMPLES"]


# ----------------------------------------------------------------------------------------------------------
# the kernels of `triton_kernels`, autotuned
# ----------------------------------------------------------------------------------------------------------

_hyper_fwd_kernel = triton.autotune(
    configs=_QUERY_MAJOR, key=_KEYS, prune_configs_by={"early_config_prune": _prune_query_major},
    restore_value=["O", "LSE"])(tk.hyper_fwd)
_hyper_bwd_dq_kernel = triton.autotune(
    configs=_QUERY_MAJOR, key=_KEYS, prune_configs_by={"early_config_prune": _prune_query_major},
    restore_value=["DQ"])(tk.hyper_bwd_dq)
_hyper_bwd_dkdv_kernel = triton.autotune(
    configs=_KEY_MAJOR, key=_KEYS, prune_configs_by={"early_config_prune": _prune_key_major},
    restore_value=["DK", "DV"])(tk.hyper_bwd_dkdv)
_hyper_bwd_sample_kernel = triton.autotune(
    configs=_KEY_MAJOR, key=_KEYS, prune_configs_by={"early_config_prune": _prune_samples})(tk.hyper_bwd_sample)


# ----------------------------------------------------------------------------------------------------------
# host launchers
# ----------------------------------------------------------------------------------------------------------

class _Sub(NamedTuple):
    """The sub-problems of one launch: ``count`` per batch; see the module docstring."""

    count: int
    chunk: int
    q_off: int
    k_off: int
    sq: int  # query rows per sub-problem (padded coordinates)
    sk: int  # key rows per sub-problem
    causal: bool
    plan: Optional[Plan]  # None: exact attention, one block


class _Grads(NamedTuple):
    do: torch.Tensor  # [B, Hq, Nq, D]
    lse: torch.Tensor  # [B, Hq, Nq] final lse, -inf replaced by 0
    delta: torch.Tensor  # [B, Hq, Nq] rowsum(dO * O)
    dq: torch.Tensor  # [B, Hq, Nq, D] fp32 accumulators
    dk: torch.Tensor  # [B, Hkv, Nk, D]
    dv: torch.Tensor


def _rowmajor(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _common(q, k, v, key_valid, sub: _Sub, scale):
    """Keyword arguments shared by every kernel, and the grid geometry ``(heads, nb, bq, bk, m)``."""
    B, Hq, NQ_T, D = q.shape
    Hkv, NK_T = k.shape[1], k.shape[2]
    plan = sub.plan
    dev = q.device
    dummy_i = torch.zeros(1, dtype=torch.int32, device=dev)
    if plan is None:
        nb, bq, bk = 1, sub.sq, sub.sk
    else:
        nb, bq, bk = plan.num_blocks, plan.q_block, plan.k_block
    has_samples = plan is not None and plan.samples is not None
    m = plan.samples.shape[-1] if has_samples else 0
    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    if key_valid is None:
        valid = torch.zeros(1, 1, dtype=torch.uint8, device=dev)
    else:  # rows may be strided (slices, broadcasts), keys must be adjacent
        valid = key_valid.to(torch.bool)
        valid = (valid if valid.stride(-1) == 1 else valid.contiguous()).view(torch.uint8)
    args = dict(
        KVALID=valid,
        QPERM=i32(plan.q_perm) if plan is not None else dummy_i,
        KPERM=i32(plan.k_perm) if plan is not None else dummy_i,
        SAMP=i32(plan.samples) if has_samples else dummy_i,
        SBLK=i32(plan.sample_block) if has_samples else dummy_i,
        LOGW=plan.log_weight.float().contiguous() if plan is not None else dummy_i.float(),
        sqb=q.stride(0), sqh=q.stride(1), sqn=q.stride(2),
        skb=k.stride(0), skh=k.stride(1), skn=k.stride(2),
        svb=v.stride(0), svh=v.stride(1), svn=v.stride(2), svalb=valid.stride(0),
        HQ=Hq, GROUP=Hq // Hkv, COUNT=sub.count, CHUNK=sub.chunk, Q_OFF=sub.q_off, K_OFF=sub.k_off,
        SQ=sub.sq, SK=sub.sk, NQ_T=NQ_T, NK_T=NK_T, BQ=bq, BK=bk, M=m,
        scale=scale, scale2=scale * math.log2(math.e),
        BQ_BUCKET=_bucket(bq), BK_BUCKET=_bucket(bk), M_BUCKET=_bucket(m),
        D=D, BLOCK_D=max(16, _next_pow2(D)), PERMUTED=plan is not None, HAS_SAMPLES=has_samples,
        HAS_VALID=key_valid is not None, IS_CAUSAL=sub.causal,
        ACC=tl.float64 if q.dtype == torch.float64 else tl.float32,
        PRECISION="ieee" if q.dtype in (torch.float32, torch.float64) else "tf32",
        WIDEN=_INTERPRET and q.dtype == torch.bfloat16,
    )
    return args, (B * sub.count, nb, bq, bk, m)


def _launch(kernel, grid, args):
    kernel[grid](**{name: value for name, value in args.items() if name in kernel.arg_names})


def _launch_fwd(q, k, v, key_valid, sub: _Sub, out, lse, scale, accumulate: bool):
    """Attention of the sub-problems into ``out [B,Hq,Nq,D]``, ``lse [B,Hq,Nq]`` (merged in if accumulate)."""
    args, (n_sub, nb, bq, _, _) = _common(q, k, v, key_valid, sub, scale)
    args.update(Q=q, K=k, V=v, O=out, LSE=lse, sob=out.stride(0), soh=out.stride(1), son=out.stride(2),
                slb=lse.stride(0), slh=lse.stride(1), ACCUMULATE=accumulate)
    heads = n_sub * q.shape[1]
    _launch(_hyper_fwd_kernel, lambda meta: (heads * nb * triton.cdiv(bq, meta["BLOCK_M"]),), args)


def _rows_per_split(sq: int, heads: int, m: int, device) -> int:
    """Query rows per split of the sampled keys' dK/dV: about 4 programs per SM, at most 64 splits."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = max(1, math.ceil(4 * sms / (heads * math.ceil(m / 64))))
    rows = math.ceil(sq / min(want, 64))
    return max(128, math.ceil(rows / 128) * 128)


def _launch_bwd(q, k, v, key_valid, sub: _Sub, g: _Grads, scale, accumulate_q: bool, accumulate_k: bool):
    """Adds the sub-problems' gradients into ``g.dq, g.dk, g.dv``."""
    args, (n_sub, nb, bq, bk, m) = _common(q, k, v, key_valid, sub, scale)
    Hq, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]
    args.update(Q=q, K=k, V=v, DO=g.do, LSE=g.lse, DELTA=g.delta, DQ=g.dq, DK=g.dk, DV=g.dv,
                sdob=g.do.stride(0), sdoh=g.do.stride(1), sdon=g.do.stride(2),
                sdqb=g.dq.stride(0), sdqh=g.dq.stride(1), sdqn=g.dq.stride(2),
                sdkb=g.dk.stride(0), sdkh=g.dk.stride(1), sdkn=g.dk.stride(2),
                slb=g.lse.stride(0), slh=g.lse.stride(1))
    _launch(_hyper_bwd_dq_kernel, lambda meta: (n_sub * Hq * nb * triton.cdiv(bq, meta["BLOCK_M"]),),
            dict(args, ACCUMULATE=accumulate_q))
    _launch(_hyper_bwd_dkdv_kernel, lambda meta: (n_sub * Hkv * nb * triton.cdiv(bk, meta["BLOCK_N"]),),
            dict(args, ACCUMULATE=accumulate_k))
    if not args["HAS_SAMPLES"]:
        return
    rows = _rows_per_split(sub.sq, n_sub * Hkv, m, q.device)
    splits = math.ceil(sub.sq / rows)
    part = torch.empty(splits, n_sub * Hkv, 2, m, args["BLOCK_D"], dtype=g.dk.dtype, device=q.device)
    _launch(_hyper_bwd_sample_kernel,
            lambda meta: (n_sub * Hkv * splits * triton.cdiv(m, meta["BLOCK_N"]),),
            dict(args, PART=part, ROWS_PER_SPLIT=rows))
    # pass 2: sum the splits, add each sampled key's gradient to its row (repeated draws add up)
    grad = part.sum(0)[..., :D].view(n_sub, Hkv, 2, m, D)
    plan = sub.plan
    s = torch.arange(n_sub, device=q.device)
    b = (s // sub.count).view(n_sub, 1, 1).expand(n_sub, Hkv, m)
    h = torch.arange(Hkv, device=q.device).view(1, Hkv, 1).expand(n_sub, Hkv, m)
    row = ((s % sub.count) * sub.chunk + sub.k_off).view(n_sub, 1, 1) + plan.samples
    # a sub-problem without valid keys may draw a padding row past the tensor: its gradient is 0, add it anywhere
    index = (b, h, row.clamp(max=k.shape[2] - 1))
    g.dk.index_put_(index, grad[:, :, 0], accumulate=True)
    g.dv.index_put_(index, grad[:, :, 1], accumulate=True)


# ----------------------------------------------------------------------------------------------------------
# non-causal and causal HyperAttention
# ----------------------------------------------------------------------------------------------------------

def _noncausal_sub(q, k, key_valid, p, stream) -> _Sub:
    Nq, Nk = q.shape[2], k.shape[2]
    plan = None
    if hyper_applies(Nq, Nk, p):
        plan = make_plan(q, k, key_valid, p.block_size, p.sample_size, p.lsh_num_projs, p.seed, stream)
    return _Sub(1, 0, 0, 0, Nq, Nk, False, plan)


def _causal_subs(q, k, key_valid, p):
    """The launches of causal attention with n_q == n_k, in order: ``(leaves, leaf geometry), [levels]``.

    Plans are drawn from the same batched ``[B * 2**level, H, size, D]`` chunks as `cpu.causal_forward`.
    """
    B, _, N, _ = q.shape
    depth = causal_levels(N, p)
    pieces = 2**depth
    Np = math.ceil(N / pieces) * pieces
    leaf = Np // pieces
    leaves = _Sub(pieces, leaf, 0, 0, leaf, leaf, True, None)
    levels = []
    if depth:
        valid = key_valid
        if Np != N:
            valid = torch.zeros(B, Np, dtype=torch.bool, device=q.device)
            valid[:, :N] = True if key_valid is None else key_valid
        qp, kp = _pad_rows(q, Np), _pad_rows(k, Np)
    for level in range(depth):
        count, size = 2**level, Np // 2 ** (level + 1)
        plan = None
        if hyper_applies(size, size, p):
            kv_s = None if valid is None else valid.reshape(B, count, 2, size)[:, :, 0].reshape(B * count, size)
            plan = make_plan(_chunks(qp, count, size, 1), _chunks(kp, count, size, 0), kv_s, p.block_size,
                             p.sample_size, p.lsh_num_projs, p.seed, stream=level + 1)
        levels.append(_Sub(count, 2 * size, size, 0, size, size, False, plan))
    return leaves, levels


def _flash_leaves_ok(q, key_valid) -> bool:
    """flash-attn runs the exact leaves: installed, CUDA, fp16/bf16, no key mask, head dim <= 256."""
    return (_flash_attn_func is not None and q.is_cuda and key_valid is None
            and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256)


def _flash_leaves(q, k, v, leaves: _Sub, scale, out, lse):
    """Exact causal leaves through ``flash_attn_func`` ([B*pieces, leaf, H, D] layout) into ``out``, ``lse``."""
    B, Hq, N, D = q.shape
    pieces, leaf = leaves.count, leaves.sq
    Np = pieces * leaf

    def fold(x):  # [B, H, N, D] -> [B * pieces, leaf, H, D]
        H = x.shape[1]
        return _pad_rows(x, Np).reshape(B, H, pieces, leaf, D).permute(0, 2, 3, 1, 4).reshape(B * pieces, leaf, H, D)

    o, l, _ = _flash_attn_func(fold(q), fold(k), fold(v), softmax_scale=scale, causal=True, return_attn_probs=True)
    out.copy_(o.reshape(B, pieces, leaf, Hq, D).permute(0, 3, 1, 2, 4).reshape(B, Hq, Np, D)[:, :, :N])
    lse.copy_(l[..., :leaf].reshape(B, pieces, Hq, leaf).permute(0, 2, 1, 3).reshape(B, Hq, Np)[:, :, :N])


def _causal_forward(q, k, v, key_valid, scale, p, out, lse):
    leaves, levels = _causal_subs(q, k, key_valid, p)
    if _flash_leaves_ok(q, key_valid):
        _flash_leaves(q, k, v, leaves, scale, out, lse)
    else:
        _launch_fwd(q, k, v, key_valid, leaves, out, lse, scale, accumulate=False)
    for sub in levels:  # one launch per level, merged into the leaves' result
        _launch_fwd(q, k, v, key_valid, sub, out, lse, scale, accumulate=True)


def _split(key_valid, prefix):
    if key_valid is None:
        return None, None
    return key_valid[:, :prefix], key_valid[:, prefix:]


def _check(q, k, v, p=None):
    if v.shape[-1] != q.shape[-1] or k.shape[-1] != q.shape[-1]:
        raise NotImplementedError("the Triton path needs one head dim for query, key and value")
    if p is not None and (p.sink_keys or p.local_window or p.residual != "uniform"):
        raise NotImplementedError("the Triton kernels do not implement sink_keys, local_window or the stratified "
                                  "residual yet: use HYPER_KERNELS=cpu or set them to 0 / 'uniform'")


def attention_forward(q, k, v, key_valid, is_causal, scale, p):
    """HyperAttention with Triton kernels: same contract as `cpu.attention_forward`.

    ``q [B,Hq,Nq,D]``, ``k, v [B,Hkv,Nk,D]`` (Hq a multiple of Hkv), ``key_valid [B,Nk]`` bool or None; causal
    is bottom-right aligned (n_q <= n_k). ``p``: a `HyperConfig`. Returns ``(out [B,Hq,Nq,D], lse [B,Hq,Nq])``,
    lse float32 (float64 for float64 inputs), -inf for rows without any key.
    """
    _check(q, k, v, p)
    B, Hq, Nq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q, k, v = _rowmajor(q), _rowmajor(k), _rowmajor(v)
    lse = torch.empty(B, Hq, Nq, dtype=lse_dtype(q.dtype), device=q.device)
    if not is_causal:
        out = torch.empty(B, Hq, Nq, D, dtype=q.dtype, device=q.device)
        _launch_fwd(q, k, v, key_valid, _noncausal_sub(q, k, key_valid, p, 0), out, lse, scale, accumulate=False)
        return out, lse
    prefix = k.shape[2] - Nq
    if prefix < 0:
        raise ValueError("causal attention needs n_q <= n_k (bottom-right aligned)")
    acc = torch.empty(B, Hq, Nq, D, dtype=_acc_dtype(q.dtype), device=q.device)
    kv_head, kv_tail = _split(key_valid, prefix)
    kt, vt = k[:, :, prefix:], v[:, :, prefix:]
    _causal_forward(q, kt, vt, kv_tail, scale, p, acc, lse)
    if prefix:
        kh, vh = k[:, :, :prefix], v[:, :, :prefix]
        _launch_fwd(q, kh, vh, kv_head, _noncausal_sub(q, kh, kv_head, p, -1), acc, lse, scale, accumulate=True)
    return acc.to(q.dtype), lse


def attention_backward(do, q, k, v, out, lse, key_valid, is_causal, scale, p):
    """Gradients ``(dq, dk, dv)`` of `attention_forward` given its final ``out`` and ``lse``.

    Shapes as in `attention_forward`; ``do`` like ``out``. Same contract as `cpu.attention_backward`.
    """
    _check(q, k, v, p)
    B, Hq, Nq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q, k, v, do = _rowmajor(q), _rowmajor(k), _rowmajor(v), _rowmajor(do)
    acc_dt = _acc_dtype(q.dtype)
    g = _Grads(
        do=do,
        lse=lse.to(acc_dt).masked_fill(torch.isneginf(lse), 0.0).contiguous(),  # rows with no keys: no NaN
        delta=(do.to(acc_dt) * out.to(acc_dt)).sum(-1).contiguous(),
        dq=torch.empty(q.shape, dtype=acc_dt, device=q.device),
        dk=torch.empty(k.shape, dtype=acc_dt, device=q.device),
        dv=torch.empty(v.shape, dtype=acc_dt, device=q.device),
    )
    if not is_causal:
        _launch_bwd(q, k, v, key_valid, _noncausal_sub(q, k, key_valid, p, 0), g, scale, False, False)
    else:
        prefix = k.shape[2] - Nq
        kv_head, kv_tail = _split(key_valid, prefix)
        kt, vt = k[:, :, prefix:], v[:, :, prefix:]
        gt = g._replace(dk=g.dk[:, :, prefix:], dv=g.dv[:, :, prefix:])
        leaves, levels = _causal_subs(q, kt, kv_tail, p)
        _launch_bwd(q, kt, vt, kv_tail, leaves, gt, scale, False, False)
        for sub in levels:
            _launch_bwd(q, kt, vt, kv_tail, sub, gt, scale, True, True)
        if prefix:
            kh, vh = k[:, :, :prefix], v[:, :, :prefix]
            gh = g._replace(dk=g.dk[:, :, :prefix], dv=g.dv[:, :, :prefix])
            _launch_bwd(q, kh, vh, kv_head, _noncausal_sub(q, kh, kv_head, p, -1), gh, scale, True, False)
    return g.dq.to(q.dtype), g.dk.to(k.dtype), g.dv.to(v.dtype)
