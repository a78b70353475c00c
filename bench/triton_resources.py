"""Ahead-of-time GPU builds of the Triton kernels without a GPU: what a real launch compiles, and what it costs.

    python bench/triton_resources.py                 # the full sweep: sm_80 and sm_90, every variant and config
    python bench/triton_resources.py --quick         # the CI subset
    python bench/triton_resources.py --jobs 2 --doc docs/gpu.md --out bench/results/triton_resources.json

Three steps, each a plain function, so `tests/test_triton.py` runs the same code:

1. `record`: run the public entry points (`hyper_attention` forward and backward with either detector,
   `window_attention`) on small CPU tensors with ``HYPER_KERNELS=triton`` in a process without
   ``TRITON_INTERPRET``. Every ``kernel[grid](...)`` reaches `triton.runtime.autotuner.Autotuner.run` (or
   `JITFunction.run`), which is intercepted: nothing runs, the call's arguments are kept. So the sweep sees
   exactly the launches the host code makes, however it plans them.
2. `variants`: for a GPU target, each recorded launch is expanded into the configs the launcher's own pruning keeps
   for that target (`triton_configs.Pruner.for_target`), and each is bound by the JIT's own binder
   (``create_function_from_signature`` + ``JITFunction._pack_args``, as `JITFunction.run` does): the same
   signature, constexprs, 16-byte alignment hints and compile options as a launch on that GPU. Duplicates collapse.
3. `build`: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` with the wheel's ptxas, then
   `cuobjdump` for registers and local memory (spills) and the SASS for the instruction mix of every loop
   (tensor-core ops, async copies, global loads, byte loads), and the TTGIR for the pipeline buffers.

The build cache is Triton's own (``TRITON_CACHE_DIR``): a repeated sweep re-reads cubins instead of compiling.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

# the limits that decide whether a build launches and how many CTAs share an SM
SHARED_PER_BLOCK = {80: 163 * 1024, 90: 227 * 1024}  # opt-in dynamic shared memory per block (bytes)
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
REGS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048
MAX_CTAS_PER_SM = 32


@dataclass(frozen=True)
class Scenario:
    """One call of the public API whose launches are recorded: shapes, dtype, layout and estimator settings."""

    name: str
    dtype: str  # torch dtype name: float16, bfloat16, float32, float64
    d: int
    nq: int
    nk: int
    causal: bool = False
    masked: bool = False  # a key-padding mask
    hq: int = 2
    hkv: int = 1
    config: dict = field(default_factory=dict)  # HyperConfig fields over the defaults
    window: tuple | None = None  # a hyper::window_attention call with this (left, right) band instead
    quick: bool = True  # in the CI subset (`all_scenarios(quick=True)`)


def scenarios(d: int, dtype: str) -> list[Scenario]:
    """Calls that reach every launch the host code can make: non-causal self- and cross-attention, exact calls,
    causal with leaves and levels, causal with a KV prefix, key masks, GQA, sinks and windows on and off, the
    window op's causal and symmetric bands; the ``"topk"`` detector causal (with GQA, a KV prefix and a key mask)
    and non-causal (without and with a window). Lengths above ``min_seq_len`` with the default blocks, so the
    pruning sees full-size blocks and keeps every config it can keep; calls with small blocks reach the fallback
    tiles. The CI subset (``quick``) leaves out the topk calls whose flag combinations lie between the ones kept
    (each topk build costs 5-10 s, and every combination of the full sweep builds without a spill)."""
    s = lambda name, **kw: Scenario(f"{name}-d{d}-{dtype}", dtype, d, **kw)  # noqa: E731
    published = dict(sink_keys=0, local_window=0)
    topk = dict(detector="topk", min_seq_len=4096)  # below its default threshold: small recorded calls
    no_residual = dict(published, sample_size=0)
    return [
        s("noncausal", nq=8192, nk=8192),
        s("noncausal-masked-window", nq=8192, nk=8192, masked=True, config=dict(local_window=64)),
        s("noncausal-published", nq=8192, nk=8192, config=published),
        s("noncausal-stratified-gqa", nq=8192, nk=8192, hq=4, config=dict(residual="stratified")),
        s("noncausal-no-residual", nq=8192, nk=8192, config=no_residual),
        s("cross", nq=4096, nk=8192, masked=True),
        s("exact", nq=1024, nk=1024),
        s("exact-masked", nq=1024, nk=1232, masked=True),
        s("causal", nq=8192, nk=8192, causal=True),
        s("causal-published", nq=8192, nk=8192, causal=True, config=published),
        s("causal-masked", nq=8192, nk=8192, causal=True, masked=True),
        s("causal-prefix-masked", nq=6144, nk=8192, causal=True, masked=True),
        s("causal-exact", nq=1024, nk=1024, causal=True),
        s("small-blocks", nq=8192, nk=8192, causal=True, config=dict(block_size=16, sample_size=16, min_seq_len=64)),
        s("window-causal", nq=2048, nk=2048, window=(255, 0)),
        s("window-symmetric-masked", nq=2048, nk=2048, masked=True, window=(128, 128)),
        s("topk-causal-prefix-masked", nq=6144, nk=8192, causal=True, masked=True, config=topk),
        s("topk-noncausal", nq=8192, nk=8192, config=topk),
        s("topk-causal-gqa", nq=8192, nk=8192, causal=True, hq=4, config=topk, quick=False),
        s(
            "topk-noncausal-window-masked",
            nq=8192,
            nk=8192,
            masked=True,
            config=dict(topk, local_window=64),
            quick=False,
        ),
        s(
            "topk-small-blocks",
            nq=8192,
            nk=8192,
            causal=True,
            config=dict(topk, query_block=16, score_group=4),
            quick=False,
        ),
    ]


# ----------------------------------------------------------------------------------------------------------
# 1. recording the launches
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Launch:
    """One ``kernel[grid](...)`` call: the kernel object (an Autotuner or a JITFunction) and its arguments."""

    kernel: object
    args: tuple
    kwargs: dict
    scenario: str


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Intercept every Triton launch in this process (nothing runs) and collect it."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    saved = Autotuner.run, JITFunction.run

    def run(self, *args, **kwargs):  # the launchers pass every argument by name
        launches.append(Launch(self, args, _launch_kwargs(kwargs), ""))

    Autotuner.run, JITFunction.run = run, run
    try:
        yield launches
    finally:
        Autotuner.run, JITFunction.run = saved


class TensorSpec:
    """What binding and pruning read of a tensor argument (dtype, address, element size), without its data: the
    recorded launches of a sweep would otherwise keep every tensor of every scenario alive."""

    def __init__(self, t):
        self.dtype, self._ptr, self._size = t.dtype, t.data_ptr(), t.element_size()

    def data_ptr(self) -> int:
        return self._ptr

    def element_size(self) -> int:
        return self._size


def _launch_kwargs(kwargs: dict) -> dict:
    import torch

    spec = lambda v: TensorSpec(v) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return {k: spec(v) for k, v in kwargs.items() if k not in ("grid", "warmup")}


def _call(sc: Scenario) -> None:
    """The scenario's forward and backward through the public API, on CPU tensors."""
    import torch

    from hyper_backend import HyperConfig, hyper_attention, window_attention

    dtype = getattr(torch, sc.dtype)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, sc.hq, sc.nq, sc.d, generator=g).to(dtype).requires_grad_()
    k = torch.randn(1, sc.hkv, sc.nk, sc.d, generator=g).to(dtype).requires_grad_()
    v = torch.randn(1, sc.hkv, sc.nk, sc.d, generator=g).to(dtype).requires_grad_()
    mask = None
    if sc.masked:
        mask = torch.rand(1, sc.nk, generator=g) > 0.1
        mask[:, 0] = True
    if sc.window is not None:
        out = window_attention(q, k, v, sc.window, mask)
    else:
        attn_mask = None if mask is None else mask[:, None, None, :]
        config = HyperConfig(detector="lsh").replace(**sc.config)  # LSH unless the scenario names a detector
        out = hyper_attention(q, k, v, attn_mask, is_causal=sc.causal, enable_gqa=True, config=config)
    out.backward(torch.ones_like(out))


def record(cases: list[Scenario]) -> list[Launch]:
    """Every launch the scenarios make (forward and backward), in order."""
    os.environ["HYPER_KERNELS"] = "triton"
    out = []
    for sc in cases:
        with recording() as launches:
            _call(sc)
        out += [Launch(x.kernel, x.args, x.kwargs, sc.name) for x in launches]
    return out


# ----------------------------------------------------------------------------------------------------------
# 2. the variants a launch compiles for one GPU target
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Variant:
    """One compile: a kernel bound as a launch on ``arch`` would bind it."""

    kernel: str
    arch: int
    fn: object  # the JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    flags: dict  # the constexpr flags and tile, by name (for tables)
    scenarios: list
    shared_model: int = 0  # the pruning's shared-memory model for this config (0: none)

    @property
    def key(self) -> str:
        text = repr(
            (self.kernel, self.arch, sorted(self.signature.items()), sorted(map(repr, self.constexprs.items())))
        )
        text += repr((sorted(map(repr, self.attrs.items())), sorted(map(repr, self.options.items()))))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _configs(kernel, kwargs: dict, arch: int) -> list[tuple[object, dict, int]]:
    """(JITFunction, keyword arguments, the pruning's shared-memory model or 0) per config the launcher's
    pruning keeps on ``arch``."""
    from triton.runtime.autotuner import Autotuner

    if not isinstance(kernel, Autotuner):
        return [(kernel, kwargs, 0)]
    pruner = kernel.early_config_prune
    if pruner is not None and hasattr(pruner, "for_target"):
        configs = pruner.for_target(kernel.configs, kwargs, arch)
    elif pruner is not None:
        configs = pruner(kernel.configs, {}, **kwargs)
    else:
        configs = kernel.configs
    model = getattr(pruner, "shared", lambda c, args: 0)
    return [(kernel.fn, {**kwargs, **c.all_kwargs()}, model(c, kwargs)) for c in configs]


def _bind(fn, args: tuple, kwargs: dict, arch: int):
    """The JIT's own binding for a launch on ``arch``: (options, signature, constexprs, attrs)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = dict(kwargs)
    # what JITFunction.run adds before binding
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    return fn._pack_args(backend, kwargs, bound, specialization, options)


# a kernel that serves two launches (its ``GRAD`` constexpr) is reported under the launch's name
LAUNCH_NAMES = {
    ("hyper_query", False): "hyper_fwd",
    ("hyper_query", True): "hyper_bwd_dq",
    ("topk_attention", False): "topk_fwd",
    ("topk_attention", True): "topk_bwd",
}


def variants(launches: list[Launch], arch: int) -> dict[str, Variant]:
    """The distinct compiles of the launches on ``arch``, keyed by `Variant.key`."""
    out: dict[str, Variant] = {}
    for launch in launches:
        for fn, kwargs, model in _configs(launch.kernel, launch.kwargs, arch):
            options, signature, constexprs, attrs = _bind(fn, launch.args, kwargs, arch)
            names = {path[0]: value for path, value in constexprs.items() if len(path) == 1}
            flags = {fn.arg_names[i]: v for i, v in names.items() if fn.params[i].is_constexpr}
            flags.update(zip(("ACC", "PRECISION", "WIDEN"), flags.pop("NUM", ())))  # the numerics, by part
            flags = {name: _plain(v) for name, v in flags.items()}
            flags.update(num_warps=options.num_warps, num_stages=options.num_stages, DTYPE=signature["Q"].lstrip("*"))
            name = LAUNCH_NAMES.get((fn.__name__, flags.get("GRAD")), fn.__name__)
            var = Variant(name, arch, fn, signature, constexprs, attrs, options.__dict__, flags, [], model)
            var = out.setdefault(var.key, var)
            if launch.scenario not in var.scenarios:
                var.scenarios.append(launch.scenario)
    return out


def _plain(value):
    return value if isinstance(value, (bool, int, float, str)) else str(value)


# ----------------------------------------------------------------------------------------------------------
# 3. building and reading the compiled code
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Loop:
    """One loop of the SASS (a backward branch): its instruction mix per iteration."""

    instructions: int
    mma: int  # tensor-core instructions (HMMA / HGMMA / DMMA)
    fma: int  # FFMA / DFMA (dots without tensor cores)
    async_copies: int  # LDGSTS (cp.async)
    global_loads: int  # LDG
    byte_loads: int  # LDG of 8 bits
    shared_loads: int  # LDS / LDSM


@dataclass
class Resources:
    kernel: str
    arch: int
    key: str
    flags: dict
    scenarios: list
    seconds: float = 0.0
    error: str = ""
    registers: int = 0
    spill_bytes: int = 0  # local memory per thread (spill stores land there)
    spill_instructions: int = 0  # STL + LDL in the SASS
    shared: int = 0  # dynamic shared memory per block (bytes)
    shared_limit: int = 0
    shared_model: int = 0  # the pruning's model (an upper bound of ``shared``; 0: none)
    ctas_per_sm: int = 0
    tensor_cores: str = ""
    async_copies: int = 0
    buffers: list = field(default_factory=list)  # shapes of the shared-memory allocations (TTGIR)
    loops: list = field(default_factory=list)
    i32_offsets: list = field(default_factory=list)  # pointer arguments offset by an i32 scalar (TTIR)

    @property
    def ok(self) -> bool:
        within_model = not self.shared_model or self.shared <= self.shared_model
        fits = self.shared <= self.shared_limit and self.spill_bytes == 0 and within_model
        return not self.error and fits and not self.i32_offsets


def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def ptxas_available() -> bool:
    try:
        return os.path.exists(_tool("ptxas"))
    except Exception:  # pragma: no cover - depends on the wheel
        return False


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def _sass(cubin: bytes) -> list[tuple[int, str]]:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.check_output([_tool("cuobjdump"), "-sass", f.name], text=True)
        usage = subprocess.check_output([_tool("cuobjdump"), "-res-usage", f.name], text=True)
    return [(int(m.group(1), 16), m.group(2).strip()) for m in _SASS_LINE.finditer(text)], usage


def _opcode(ins: str) -> str:
    ins = re.sub(r"^@!?U?P\w+\s+", "", ins)
    return ins.split()[0] if ins else ""


def _mix(body: list[str]) -> Loop:
    ops = [_opcode(i) for i in body]
    return Loop(
        instructions=len(ops),
        mma=sum(o.startswith(("HMMA", "HGMMA", "DMMA")) for o in ops),
        fma=sum(o.startswith(("FFMA", "DFMA")) for o in ops),
        async_copies=sum(o.startswith("LDGSTS") for o in ops),
        global_loads=sum(o.startswith("LDG.") or o == "LDG" for o in ops),
        byte_loads=sum(o.startswith(("LDG.E.U8", "LDG.E.S8")) for o in ops),
        shared_loads=sum(o.startswith(("LDS", "LDSM")) for o in ops),
    )


def _loops(sass: list[tuple[int, str]]) -> list[Loop]:
    """Innermost loops: backward branches whose body holds no other backward branch's target range."""
    addr = [a for a, _ in sass]
    spans = []
    for i, (a, ins) in enumerate(sass):
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < a:
            spans.append((addr.index(int(m.group(1), 16)) if int(m.group(1), 16) in addr else 0, i))
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    return [_mix([ins for _, ins in sass[lo : hi + 1]]) for lo, hi in sorted(inner)]


def _buffers(ttgir: str) -> list[str]:
    return re.findall(r"ttg\.local_alloc[^\n]*?-> !ttg\.memdesc<([0-9x]+x[a-z0-9]+)", ttgir)


def i32_offsets(ttir: str, arg_names: list) -> list:
    """Pointer arguments offset by an i32 scalar: ``base + b * stride`` computed in 32 bits, which wraps once a
    tensor holds 2**31 elements (n * H * D at long n). Row offsets are int64 products and head/batch bases int64
    scalars, so no argument should appear here. A constant offset (``SCALES + 1``) cannot wrap and is not
    counted."""
    constants = set(re.findall(r"%([\w#]+) = arith\.constant [-\d]+ : i32\b", ttir))
    found = re.findall(r"tt\.addptr %(\w+), %([\w#]+) : !tt\.ptr<[^>]+>, i32\b", ttir)
    return sorted({ptr for ptr, offset in found if offset not in constants} & set(arg_names))


def occupancy(registers: int, warps: int, shared: int, arch: int) -> int:
    """CTAs per SM allowed by registers (allocated per warp in 256-register units), shared memory (1 KiB
    reserved per CTA) and threads."""
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * warps)
    by_shared = SHARED_PER_SM[arch] // (shared + 1024)
    by_threads = MAX_THREADS_PER_SM // (32 * warps)
    return min(by_regs, by_shared, by_threads, MAX_CTAS_PER_SM)


def build(var: Variant) -> Resources:
    """Compile one variant to a cubin and read its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = Resources(
        var.kernel,
        var.arch,
        var.key,
        var.flags,
        var.scenarios,
        shared_limit=SHARED_PER_BLOCK[var.arch],
        shared_model=var.shared_model,
    )
    start = time.perf_counter()
    try:
        src = ASTSource(var.fn, var.signature, var.constexprs, var.attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", var.arch, 32), options=var.options)
    except Exception as e:  # a compile error is a result, reported per variant
        res.error = f"{type(e).__name__}: {str(e)[:2000]}"
        res.seconds = time.perf_counter() - start
        return res
    res.seconds = time.perf_counter() - start
    sass, usage = _sass(compiled.asm["cubin"])
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    res.registers, stack, static_shared, local = (int(x) for x in m.groups())
    res.spill_bytes = max(stack, local)
    res.spill_instructions = sum(_opcode(i).startswith(("STL", "LDL")) for _, i in sass)
    res.shared = compiled.metadata.shared + static_shared
    res.ctas_per_sm = occupancy(res.registers, var.options["num_warps"], res.shared, var.arch)
    ops = [_opcode(i) for _, i in sass]
    if any(o.startswith("HGMMA") for o in ops):
        res.tensor_cores = "wgmma"
    elif any(o.startswith("HMMA") for o in ops):
        res.tensor_cores = "mma.sync"
    elif any(o.startswith("DMMA") for o in ops):
        res.tensor_cores = "dmma"
    else:
        res.tensor_cores = "none (FMA)"
    res.async_copies = sum(o.startswith("LDGSTS") for o in ops)
    res.buffers = _buffers(compiled.asm["ttgir"])
    res.i32_offsets = i32_offsets(compiled.asm["ttir"], var.fn.arg_names)
    res.loops = [asdict(x) for x in _loops(sass)]
    return res


def _build_by_key(job):
    """Worker entry (spawned processes): re-record the scenarios and build the variants named by key."""
    cases, arch, keys, cache = job
    os.environ["TRITON_CACHE_DIR"] = cache
    found = variants(record(cases), arch)
    return [build(found[k]) for k in keys]


def sweep(cases: list[Scenario], archs=(80, 90), jobs: int = 1, cache: str | None = None, pick=None) -> list[Resources]:
    """Record the scenarios, then build every variant for every arch (``pick(variants) -> variants`` may keep a
    subset). ``jobs > 1`` builds in spawned processes, each re-recording (cheap) and building its share."""
    if cache:
        os.environ["TRITON_CACHE_DIR"] = cache
    launches = record(cases)
    todo = []
    for arch in archs:
        found = variants(launches, arch)
        chosen = list(found.values()) if pick is None else pick(list(found.values()))
        todo += [(arch, v) for v in chosen]
    if jobs <= 1:
        return [build(v) for _, v in todo]
    import concurrent.futures
    import multiprocessing

    shares = [todo[i::jobs] for i in range(jobs)]
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = []
        for share in shares:
            by_arch: dict[int, list[str]] = {}
            for arch, v in share:
                by_arch.setdefault(arch, []).append(v.key)
            for arch, keys in by_arch.items():
                names = {n for _, v in share if v.arch == arch for n in v.scenarios}
                mine = [sc for sc in cases if sc.name in names]
                futures.append(pool.submit(_build_by_key, (mine, arch, keys, os.environ.get("TRITON_CACHE_DIR", ""))))
        return [r for f in futures for r in f.result()]


def quick_pick(found: list[Variant]) -> list[Variant]:
    """The CI subset: every kernel and flag combination once, at its largest kept tile (the one most likely to
    spill or overflow shared memory)."""
    best: dict[tuple, Variant] = {}
    for v in found:
        flags = tuple(
            sorted((k, x) for k, x in v.flags.items() if k not in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
        )
        size = v.flags.get("BLOCK_M", 0) * v.flags.get("BLOCK_N", 0)
        cur = best.get((v.kernel, flags))
        if cur is None or size > cur.flags.get("BLOCK_M", 0) * cur.flags.get("BLOCK_N", 0):
            best[(v.kernel, flags)] = v
    return list(best.values())


def all_scenarios(dims=(64, 128), dtypes=("float16", "bfloat16", "float32", "float64"), quick=False) -> list[Scenario]:
    """The scenarios at every head dim and dtype; ``quick``: only those of the CI subset."""
    return [sc for d in dims for dt in dtypes for sc in scenarios(d, dt) if sc.quick or not quick]


def summary_rows(results: list[Resources]) -> list[dict]:
    """One row per (kernel, arch, dtype, head dim, tile config) over every flag combination built."""
    groups: dict[tuple, list[Resources]] = {}
    for r in results:
        f = r.flags
        tile = f"{f['BLOCK_M']}x{f['BLOCK_N']} w{f['num_warps']} s{f['num_stages']}"
        groups.setdefault((r.kernel, r.arch, f["DTYPE"], f["BLOCK_D"], tile), []).append(r)
    rows = []
    for (kernel, arch, dtype, block_d, tile), rs in sorted(groups.items()):
        rows.append(
            dict(
                kernel=kernel,
                arch=f"sm_{arch}",
                dtype=dtype,
                d=block_d,
                tile=tile,
                variants=len(rs),
                registers=(min(r.registers for r in rs), max(r.registers for r in rs)),
                spill_bytes=max(r.spill_bytes for r in rs),
                shared_kib=round(max(r.shared for r in rs) / 1024, 1),
                model_kib=round(max(r.shared_model for r in rs) / 1024, 1),
                ctas_per_sm=min(r.ctas_per_sm for r in rs),
                tensor_cores="/".join(sorted({r.tensor_cores for r in rs})),
                async_copies=min(r.async_copies for r in rs) > 0,
                errors=sum(bool(r.error) for r in rs),
            )
        )
    return rows


def markdown(rows: list[dict]) -> str:
    cols = ["kernel", "arch", "dtype", "d", "tile (M x N, warps, stages)", "variants", "registers", "spill B"]
    cols += ["shared KiB (model)", "CTAs/SM", "tensor cores", "async copies"]
    head = "| " + " | ".join(cols) + " |"
    out = [head, "|" + "---|" * 12]
    for r in rows:
        lo, hi = r["registers"]
        regs = str(lo) if lo == hi else f"{lo}-{hi}"
        out.append(
            f"| `{r['kernel']}` | {r['arch']} | {r['dtype']} | {r['d']} | {r['tile']} | {r['variants']} | {regs} | "
            f"{r['spill_bytes']} | {r['shared_kib']} ({r['model_kib']}) | {r['ctas_per_sm']} | {r['tensor_cores']} | "
            f"{'yes' if r['async_copies'] else 'no'} |"
        )
    return "\n".join(out)


def rich_table(rows: list[dict]):
    from rich.table import Table

    table = Table(title="Triton kernels built ahead of time (worst case over flag combinations)")
    for col in (
        "kernel",
        "arch",
        "dtype",
        "d",
        "tile",
        "n",
        "regs",
        "spill B",
        "shared KiB",
        "model KiB",
        "CTAs/SM",
        "TC",
        "async",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        lo, hi = r["registers"]
        table.add_row(
            r["kernel"],
            r["arch"],
            r["dtype"],
            str(r["d"]),
            r["tile"],
            str(r["variants"]),
            str(lo) if lo == hi else f"{lo}-{hi}",
            str(r["spill_bytes"]),
            str(r["shared_kib"]),
            str(r["model_kib"]),
            str(r["ctas_per_sm"]),
            r["tensor_cores"],
            "yes" if r["async_copies"] else "no",
        )
    return table


def write_doc(path: str, text: str, begin: str = "<!-- resources:begin -->", end: str = "<!-- resources:end -->"):
    """Replace the generated section of ``path`` (between the markers) with ``text``."""
    doc = open(path).read()
    i, j = doc.index(begin) + len(begin), doc.index(end)
    with open(path, "w") as f:
        f.write(doc[:i] + "\n" + text + "\n" + doc[j:])


def _versions() -> dict:
    import platform

    import torch
    import triton

    return dict(
        triton=triton.__version__, torch=torch.__version__, python=platform.python_version(), load=os.getloadavg()
    )


def _compact(r: Resources) -> dict:
    out = asdict(r)
    out["scenarios"] = len(out["scenarios"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="the CI subset (its scenarios, the largest tile per kernel variant)"
    )
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16", "float32", "float64"])
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--cache", default=os.path.join("/tmp", "hyper-triton-aot-cache"))
    ap.add_argument("--out", default=None, help="write every build's resources as JSON here")
    ap.add_argument("--doc", default=None, help="rewrite the generated resource table of this markdown file")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the sweep compiles for real GPUs")
        return 2
    if not ptxas_available():
        print("this Triton ships no ptxas: cannot build cubins")
        return 2
    start = time.perf_counter()
    results = sweep(
        all_scenarios(args.dims, args.dtypes, args.quick),
        args.arch,
        args.jobs,
        args.cache,
        quick_pick if args.quick else None,
    )
    seconds = time.perf_counter() - start
    print(f"{len(results)} builds in {seconds:.0f} s")
    rows = summary_rows(results)
    from rich.console import Console

    Console(width=200).print(rich_table(rows))
    if args.out:
        stamp = dict(archs=args.arch, dims=args.dims, dtypes=args.dtypes, quick=args.quick, seconds=round(seconds))
        stamp.update(_versions())
        with open(args.out, "w") as f:
            json.dump(dict(stamp=stamp, summary=rows, builds=[_compact(r) for r in results]), f)
    if args.doc:
        write_doc(args.doc, markdown(rows))
    bad = [r for r in results if not r.ok]
    for r in bad:
        print("FAIL", r.kernel, r.arch, r.flags, r.error[:200], r.registers, r.spill_bytes, r.shared)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
