"""GPU benchmark: the Triton HyperAttention kernels against flash-attn and SDPA, in TFLOP/s, in the same run.

    python bench/gpu.py                                  # the roofline case of docs/gpu.md: n = 131072, d = 64,
                                                         # H = 32, fp16, causal forward, and n = 4k..64k around it
    python bench/gpu.py --seq 32768 --modes fwd fwd+bwd --causal both --dtype bf16 --rounds 5

On a machine without a CUDA device it prints "no CUDA device: GPU benchmark not run" and exits 0 (nothing was
measured, and nothing failed).

Candidates for every (n, causal, mode), each timed by ``triton.testing.do_bench`` (median of its repeats, L2
flushed between them), in rounds that alternate the candidates so that all see the same clocks; the figure is
the median over the rounds:
- ``hyper``: `triton_attention.attention_forward` (+ ``attention_backward``) with the default `HyperConfig`;
- ``triton-exact``: the same kernels with approximation off (min_seq_len above n): our exact attention;
- ``sdpa-flash``: ``F.scaled_dot_product_attention`` restricted to its flash backend (FlashAttention-2);
- ``flash-attn``: ``flash_attn_func`` when the ``[cuda]`` extra is installed.

Three figures are printed. "TFLOP/s" is the work each candidate really does over its time (for hyper: the block
diagonal, the samples and the exact leaves) and says how well a kernel uses the GPU. "exact-equiv TFLOP/s" is
exact attention's FLOP count over the time. "x sdpa-flash" / "x flash-attn" are same-run speed ratios, the only
figures comparable across machines. Results go to a rich table and a JSON file stamped with the device and
versions.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_stamp, summary, write_json  # noqa: E402

from hyper_backend import HyperConfig  # noqa: E402
from hyper_backend.kernels.draws import block_shape  # noqa: E402
from hyper_backend.kernels.plan import causal_levels, hyper_applies, window_band, window_strip  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
BACKWARD_FACTOR = 2.5  # backward FLOPs / forward FLOPs (5 matmuls instead of 2)


def params_from(config: HyperConfig, **changes) -> HyperConfig:
    c = config.replace(**changes)
    return c


def exact_flops(B, H, n, d, causal) -> float:
    """Forward FLOPs of exact attention (two matmuls), halved when causal."""
    return 4.0 * B * H * n * n * d * (0.5 if causal else 1.0)


def _noncausal_flops(B, H, nq, nk, d, p: HyperConfig, extras: int = 0) -> float:
    """Diagonal blocks, residual draws and ``extras`` exact keys per query (sinks, a window strip)."""
    if not hyper_applies(nq, nk, p):
        return 4.0 * B * H * nq * nk * d
    _, _, k_block = block_shape(nq, nk, p.block_size)
    return 4.0 * B * H * nq * d * (k_block + p.draws + extras)


def hyper_flops(B, H, n, d, causal, p: HyperConfig) -> float:
    """Forward FLOPs the HyperAttention kernels spend: diagonal blocks, samples, the exact extras (sinks and the
    window: a strip of w - 1 keys per causal level, the band of non-causal self-attention) and the exact causal
    leaves."""
    if not causal:
        band = window_band(n, n, p)
        width = 0 if band is None else band[0] + band[1] + 1
        return _noncausal_flops(B, H, n, n, d, p, p.sink_keys + width)
    depth = causal_levels(n, p)
    pieces = 2**depth
    leaf = math.ceil(n / pieces)
    total = 2.0 * B * pieces * H * leaf * leaf * d
    for level in range(depth):
        count, size = 2**level, leaf * pieces // 2 ** (level + 1)
        total += _noncausal_flops(B * count, H, size, size, d, p, p.sink_keys + window_strip(p))
    return total


def candidates(q, k, v, do, causal, mode, config: HyperConfig):
    from hyper_backend.kernels import triton_attention as ta

    n = q.shape[2]
    hyper_p, exact_p = params_from(config), params_from(config, min_seq_len=n + 1)
    backward = mode == "fwd+bwd"

    def ours(p):
        def run():
            out, lse = ta.attention_forward(q, k, v, None, causal, None, p)
            if backward:
                ta.attention_backward(do, q, k, v, out, lse, None, causal, None, p)

        return run

    qs, ks, vs = (x.detach().clone().requires_grad_(backward) for x in (q, k, v))

    def sdpa():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=True)
        if backward:
            out.backward(do)

    out = {"hyper": ours(hyper_p), "triton-exact": ours(exact_p), "sdpa-flash": sdpa}
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return out
    qf, kf, vf = (x.transpose(1, 2).contiguous().requires_grad_(backward) for x in (q, k, v))
    dof = do.transpose(1, 2).contiguous()

    def flash():
        o = flash_attn_func(qf, kf, vf, causal=causal)
        if backward:
            o.backward(dof)

    out["flash-attn"] = flash
    return out


def time_interleaved(fns: dict, rounds: int) -> dict:
    """Seconds per call of each candidate: ``triton.testing.do_bench`` medians, ``rounds`` times in turn (the
    first call of each candidate autotunes and is not timed)."""
    from triton.testing import do_bench

    for fn in fns.values():
        fn()
    torch.cuda.synchronize()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(do_bench(fn, warmup=5, rep=50, return_mode="median") / 1e3)
    return {name: summary(ts) for name, ts in times.items()}


def speedup(result: dict, name: str, base: str) -> str:
    """How many times faster ``name`` ran than ``base`` in the same run ("-" when ``base`` did not run)."""
    return f"{result[base]['median'] / result[name]['median']:.2f}" if base in result else "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=None, help="GQA: key/value heads (default: --heads)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    ap.add_argument("--causal", choices=["yes", "no", "both"], default="yes")
    ap.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd"])
    ap.add_argument("--rounds", type=int, default=3, help="do_bench rounds per candidate, alternating")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: GPU benchmark not run")
        return 0

    from rich.console import Console
    from rich.table import Table

    config = HyperConfig()
    dtype, dev = DTYPES[args.dtype], torch.device("cuda")
    B, H, d = args.batch, args.heads, args.head_dim
    Hkv = args.kv_heads or H
    causal_list = {"yes": [True], "no": [False], "both": [False, True]}[args.causal]
    stamp = device_stamp()
    table = Table(title=f"{stamp['gpu']} · {args.dtype} · B={B} H={H}/{Hkv} d={d} · median of {args.rounds} rounds")
    columns = ("n", "causal", "mode", "candidate", "ms (median)", "spread ms", "TFLOP/s", "exact-equiv TFLOP/s")
    for col in columns + ("x sdpa-flash", "x flash-attn"):
        table.add_column(col, justify="right")
    rows = []
    for n in args.seq:
        g = torch.Generator(device=dev).manual_seed(n)
        q = torch.randn(B, H, n, d, device=dev, dtype=dtype, generator=g)
        k = torch.randn(B, Hkv, n, d, device=dev, dtype=dtype, generator=g)
        v = torch.randn(B, Hkv, n, d, device=dev, dtype=dtype, generator=g)
        do = torch.randn(B, H, n, d, device=dev, dtype=dtype, generator=g)
        for causal in causal_list:
            for mode in args.modes:
                scale = 1.0 + (BACKWARD_FACTOR if mode == "fwd+bwd" else 0.0)
                exact = exact_flops(B, H, n, d, causal) * scale
                work = {"hyper": hyper_flops(B, H, n, d, causal, params_from(config)) * scale}
                result = time_interleaved(candidates(q, k, v, do, causal, mode, config), args.rounds)
                for name, t in result.items():
                    done = work.get(name, exact)
                    row = dict(
                        n=n,
                        causal=causal,
                        mode=mode,
                        candidate=name,
                        seconds=t,
                        tflops=done / t["median"] / 1e12,
                        exact_equiv_tflops=exact / t["median"] / 1e12,
                        speedup={base: speedup(result, name, base) for base in ("sdpa-flash", "flash-attn")},
                    )
                    rows.append(row)
                    table.add_row(
                        str(n),
                        str(causal),
                        mode,
                        name,
                        f"{t['median'] * 1e3:.3f}",
                        f"{t['min'] * 1e3:.3f}-{t['max'] * 1e3:.3f}",
                        f"{row['tflops']:.1f}",
                        f"{row['exact_equiv_tflops']:.1f}",
                        row["speedup"]["sdpa-flash"],
                        row["speedup"]["flash-attn"],
                    )
        del q, k, v, do
        torch.cuda.empty_cache()
    Console().print(table)
    write_json(args.out, {"device": stamp, "args": vars(args), "config": config.__dict__, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
