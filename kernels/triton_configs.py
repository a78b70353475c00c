"""Launch configurations of the Triton kernels: config lists per operand width, the pruning per GPU target, and
the autotuned kernels that `triton_attention` launches.

Every config a launcher can pick was compiled ahead of time for sm_80 and sm_90 (``bench/triton_resources.py``,
run by ``tests/test_triton.py``): none spills a register or exceeds the target's shared memory per block, and
the shared-memory model below bounds what each build really allocates. docs/gpu.md has the resource table.

Pruning (`Pruner`, the autotuners' ``early_config_prune``), for the actual call and GPU:
- the list of the dot operands' width: 16-bit inputs run fp16/bf16 tensor-core dots and get the large tiles;
  fp64 and fp32 (whose dots run in fp64 on the DMMA units, `triton_kernels._dot`: no TF32, at least eager
  fp32's accuracy) get small tiles sized so operands and accumulators stay in registers;
- tiles never larger than what they cover (the block's rows, its keys or the side keys), so a short block does
  not run a mostly masked tile;
- the shared-memory model (`shared_bytes`) within the GPU's per-block limit (`Target`).
The autotune keys are power-of-two buckets of the block lengths plus BLOCK_D, the flags and the dtype, never
raw n: one tuning per bucket, not per sequence length.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import triton_kernels as tk
from .plan import next_pow2

# opt-in shared memory per block (bytes) by compute capability; other GPUs are asked through the driver
SHARED_PER_BLOCK = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}


class Target(NamedTuple):
    arch: int  # compute capability, 10 * major + minor
    shared_per_block: int  # bytes

    @classmethod
    def of(cls, arch: int) -> Target:
        return cls(arch, SHARED_PER_BLOCK[arch])


@functools.lru_cache(maxsize=8)
def device_target(index: int) -> Target:
    """The target of CUDA device ``index``: its capability and the driver's shared memory per block."""
    import torch

    major, minor = torch.cuda.get_device_capability(index)
    props = triton.runtime.driver.active.utils.get_device_properties(index)
    return Target(10 * major + minor, int(props["max_shared_mem"]))


def bucket(n: int, cap: int = 16384) -> int:
    """Autotune key for a length: its next power of two, capped."""
    return min(next_pow2(n), cap)


def _config(bm, bn, warps, stages, maxnreg=None):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages, maxnreg=maxnreg)


# (BLOCK_M query rows, BLOCK_N keys, warps, stages) per kernel, by (width of the dot operands, head-dim class):
# 2 bytes (fp16, bf16: tensor cores) or 8 (fp64, and fp32, whose dots run in fp64: `triton_kernels._dot`);
# BLOCK_D up to 64, or above; a third element 90 marks a list for sm_90 and later only. Each list holds only
# configs that built without a spill for every flag combination on sm_80 and sm_90 (an sm_90 list: on sm_90)
# (docs/gpu.md); the last entry is the fallback when nothing else fits.
# 8-byte operands: larger tiles spill (the fp64 accumulators and operands). A fifth element 255 (and `_SMALL`'s)
# is ptxas's own register limit made explicit: left unset, ptxas held some builds of those configs at 128 or 168
# registers (4 or 3 CTAs of 4 warps per SM) and moved 8-24 bytes (row predicates and lengths live across every
# loop) to local memory.
_SMALL = [_config(16, 16, 4, 1, maxnreg=255)]
CONFIGS = {
    "fwd": {
        (2, 64): [_config(*c) for c in [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 2), (64, 32, 4, 3)]],
        (2, 128): [_config(128, 32, 8, 3)],
        (8, 64): _SMALL,
        (8, 128): _SMALL,
    },
    "dq": {
        # 64 x 32 at 4 warps: 255 registers and 8 B of local memory (sm_80, permuted with samples)
        (2, 64): [_config(*c) for c in [(128, 32, 8, 3), (64, 32, 8, 3)]],
        (2, 128): [_config(*c) for c in [(64, 32, 4, 2), (64, 32, 4, 3)]],
        (8, 64): _SMALL,
        (8, 128): _SMALL,
    },
    "dkdv": {
        (2, 64): [_config(*c) for c in [(32, 128, 8, 2), (32, 32, 4, 2)]],  # 32x64 w4 s3: 16 B local memory (sm_80)
        (2, 128): [_config(*c) for c in [(32, 64, 8, 2), (32, 32, 4, 2)]],
        (8, 64): _SMALL,
        (8, 128): _SMALL,
    },
    "sample": {
        (2, 64): [_config(*c) for c in [(64, 64, 8, 2), (32, 128, 8, 2), (32, 64, 4, 3)]],
        (2, 128): [_config(*c) for c in [(32, 64, 8, 2), (32, 32, 4, 2)]],
        (8, 64): _SMALL,
        (8, 128): _SMALL,
    },
    # `triton_topk`: BLOCK_M rows of a query block (the whole default block of 64: its side keys are gathered
    # once, and the backward's atomics are one per key and block), BLOCK_N side keys (gathered) or keys per step.
    # sm_90 gets lists of its own where they differ: wgmma, and the backward's fp32 atomics as 4-wide vectors
    # (sm_80 issues one per element, each with its own address registers, so the wider tiles spill there).
    "topk_fwd": {
        (2, 64): [_config(*c) for c in [(64, 64, 8, 2), (64, 64, 8, 3), (64, 128, 8, 2), (16, 64, 4, 2)]],
        (2, 64, 90): [
            _config(*c) for c in [(64, 64, 4, 2), (64, 64, 8, 2), (64, 64, 8, 3), (64, 128, 8, 2), (16, 64, 4, 2)]
        ],
        (2, 128): [_config(*c) for c in [(64, 64, 8, 2), (64, 64, 8, 3), (64, 32, 4, 3), (16, 64, 4, 2, 255)]],
        (2, 128, 90): [
            _config(*c) for c in [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (64, 64, 8, 3), (16, 64, 4, 2)]
        ],
        (8, 64): _SMALL,
        (8, 128): _SMALL,
    },
    "topk_bwd": {
        (2, 64): [_config(*c) for c in [(64, 32, 8, 2), (32, 32, 4, 2, 255), (16, 32, 4, 2)]],
        (2, 128): [_config(*c) for c in [(64, 16, 8, 2), (32, 32, 8, 2), (16, 32, 8, 2)]],
        (2, 128, 90): [_config(*c) for c in [(64, 32, 8, 2), (64, 32, 8, 3), (64, 16, 8, 2), (16, 32, 8, 2)]],
        (8, 64): [_config(16, 16, 8, 2, maxnreg=255)],  # 8 warps: at 4, the fp64 operands of the five dots spill
        (8, 128): [_config(16, 16, 8, 2, maxnreg=255)],
    },
}


def config_list(kernel: str, itemsize: int, block_d: int, arch: int = 0) -> list:
    """The list of a call: by kernel, its dot operands' width and head-dim class, and the GPU's list for sm_90
    and later where the kernel has one."""
    lists, key = CONFIGS[kernel], (dot_width(itemsize), 64 if block_d <= 64 else 128)
    return lists.get(key + (90,), lists[key]) if arch >= 90 else lists[key]


def dot_width(itemsize: int) -> int:
    """Bytes per dot operand for inputs of ``itemsize`` bytes: 2 for 16-bit inputs, else 8."""
    return 2 if itemsize <= 2 else 8


INTERPRETER = _config(64, 64, 4, 1)  # one config, no benchmarking: every op costs the same at any tile size there


def shared_bytes(kind: str, c: triton.Config, block_d: int, itemsize: int) -> int:
    """An upper bound of the shared memory a build allocates (the sweep checks it against every build): the
    streamed operand tiles, one buffer per pipeline stage, two resident tiles staged for the dots, and the
    per-row vectors (indices, lse, Delta) of each stage. Query-major kernels stream K and V [BN, BD] past Q
    (and dO) [BM, BD]; key-major ones stream Q and dO [BM, BD] past K and V [BN, BD]. ``"query_grad"``, the
    query-major backward that also forms dK and dV (`triton_topk`), streams K and V past Q and dO staged in both
    operand roles (four resident tiles), stages P^T and dS^T [BN, BM] for its dK/dV dots, and converts [BM, BN]
    accumulators between the two orientations (a scratch tile)."""
    bm, bn, stages = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], max(c.num_stages, 2)  # 1 stage still stages one
    streamed, resident = (bm, bn) if kind == "key" else (bn, bm)
    tiles = stages * 2 * streamed * block_d + 2 * resident * block_d
    width = dot_width(itemsize)
    scratch = 0
    if kind == "query_grad":
        tiles += 2 * resident * block_d + 2 * bn * bm
        scratch = bm * bn * max(4, width)
    return width * tiles + scratch + 16 * (bm + bn) * stages


class Pruner(NamedTuple):
    """``early_config_prune`` of one kernel: ``kernel`` names its lists in `CONFIGS`, ``kind`` is "query",
    "query_grad" or "key" (which tile is streamed, `shared_bytes`), ``rows`` and ``keys`` the length buckets
    (`bucket`) whose (largest) value bounds BLOCK_M and BLOCK_N (the lengths themselves are in ``GEOM``)."""

    kernel: str
    kind: str
    rows: str
    keys: tuple

    def __call__(self, configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        if tk.INTERPRET:
            return [INTERPRETER]
        q = args["Q"]
        return self.for_target(configs, args, device_target(q.device.index if q.device.index is not None else 0))

    def for_target(self, configs, args: dict, target: Target | int) -> list:
        """The configs this call keeps on ``target`` (a `Target`, or a compute capability)."""
        if isinstance(target, int):
            target = Target.of(target)
        mine = config_list(self.kernel, args["Q"].element_size(), args["BLOCK_D"], target.arch)
        rows = max(16, next_pow2(args[self.rows]))
        keys = max(16, next_pow2(max(args[k] for k in self.keys)))
        keep = [
            c
            for c in configs
            if c in mine
            and c.kwargs["BLOCK_M"] <= rows
            and c.kwargs["BLOCK_N"] <= keys
            and self.shared(c, args) <= target.shared_per_block
        ]
        return keep or mine[-1:]

    def shared(self, c: triton.Config, args: dict) -> int:
        """`shared_bytes` of config ``c`` for this call's head dim and dtype."""
        return shared_bytes(self.kind, c, args["BLOCK_D"], args["Q"].element_size())


def all_configs(kernel: str) -> list:
    """Every config of a kernel's lists (the autotuner's candidates, which `Pruner` narrows per call)."""
    out = []
    for configs in CONFIGS[kernel].values():
        out += [c for c in configs if c not in out]
    return out


_FLAGS = ["BLOCK_D", "PERMUTED", "IS_CAUSAL", "BAND"]

# `triton_kernels.hyper_query` twice: its forward (GRAD=False) and its dQ (GRAD) have their own config lists
hyper_fwd = triton.autotune(
    configs=all_configs("fwd"),
    key=["BQ_BUCKET", "BK_BUCKET", "M_BUCKET", "HAS_SAMPLES", "HAS_VALID"] + _FLAGS,
    prune_configs_by={"early_config_prune": Pruner("fwd", "query", "BQ_BUCKET", ("BK_BUCKET", "M_BUCKET"))},
    restore_value=["O", "LSE"],
)(tk.hyper_query)
hyper_bwd_dq = triton.autotune(
    configs=all_configs("dq"),
    key=["BQ_BUCKET", "BK_BUCKET", "M_BUCKET", "HAS_SAMPLES", "HAS_VALID"] + _FLAGS,
    prune_configs_by={"early_config_prune": Pruner("dq", "query", "BQ_BUCKET", ("BK_BUCKET", "M_BUCKET"))},
    restore_value=["O"],
)(tk.hyper_query)
hyper_bwd_dkdv = triton.autotune(
    configs=all_configs("dkdv"),
    key=["BQ_BUCKET", "BK_BUCKET", "HAS_VALID"] + _FLAGS,
    prune_configs_by={"early_config_prune": Pruner("dkdv", "key", "BQ_BUCKET", ("BK_BUCKET",))},
    restore_value=["DK", "DV"],
)(tk.hyper_bwd_dkdv)
hyper_bwd_sample = triton.autotune(
    configs=all_configs("sample"),
    key=["BQ_BUCKET", "M_BUCKET", "BLOCK_D", "BAND"],
    prune_configs_by={"early_config_prune": Pruner("sample", "key", "SQ_BUCKET", ("M_BUCKET",))},
)(tk.hyper_bwd_sample)


def row_strides(**tensors) -> dict:
    """The ``<NAME>S`` launch arguments: the (batch, head, row) strides of each named ``[B, H, N, ...]`` tensor
    as one tuple (the kernels take the last dim as contiguous); a tuple's elements are specialised like plain
    integer arguments (1 folded in, multiples of 16 marked)."""
    return {f"{name.upper()}S": tuple(x.stride(i) for i in range(3)) for name, x in tensors.items()}


def geometry(names: tuple, device, **lengths: int) -> torch.Tensor:
    """A launch's length descriptor ``GEOM``: ``lengths`` in the kernel's order ``names``, as 16 int32 (one
    64-byte line, zero-padded) on ``device``, read once per program by `triton_kernels._geometry`."""
    values = [lengths[name] for name in names]
    if len(values) > tk.GEOM_SIZE or any(not -(2**31) <= x < 2**31 for x in values):
        raise ValueError(f"lengths that do not fit a descriptor of {tk.GEOM_SIZE} int32: {dict(zip(names, values))}")
    return torch.tensor(values + [0] * (tk.GEOM_SIZE - len(values)), dtype=torch.int32, device=device)


def numerics(dtype: torch.dtype, interpret: bool) -> tuple:
    """The kernels' ``NUM`` constexpr for inputs of ``dtype``: (accumulator dtype, ``tl.dot`` input precision,
    whether bf16 operands are widened to fp32 before ``tl.dot``, which only the interpreter needs)."""
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    precision = "ieee" if dtype in (torch.float32, torch.float64) else "tf32"
    return acc, precision, interpret and dtype == torch.bfloat16
