"""HyperAttention against exact SDPA, measured in the same run.

    python bench/attention.py                      # fwd 2k..131k, fwd+bwd up to 32k, causal and not
    python bench/attention.py --seq 16384 --modes fwd --causal no --repeats 5
    python bench/attention.py --seq 131072 --modes fwd --causal yes --contend   # with a competing CPU-bound process
    python bench/attention.py --window 512 --seq 32768 --heads 8             # exact window attention vs masked SDPA
    python bench/attention.py --window 128 512 --seq 64 256 1024 4096 --modes fwd   # the length sweep

``--window W [W ...]`` times ``hyper_backend.window_attention`` instead, for a causal sliding window of W keys
(left=W-1, right=0) and a symmetric band (left=right=W), against ``F.scaled_dot_product_attention(q, k, v,
attn_mask=band)`` with the dense [n, n] bool band, built once outside the timed region (as a model builds it once
per forward). Its error column is the max absolute difference on 256 sampled rows against float64 attention to
the band, divided by the largest absolute value of those exact rows; with fwd+bwd, the gradients' max difference
from SDPA's (over the largest SDPA gradient) is reported too.

For every (n, causal, mode) it times ``hyper_attention`` (default `HyperConfig`) and
``F.scaled_dot_product_attention`` alternately, reports median and spread, the ratio exact / hyper, the
relative Frobenius error of hyper's output on randomly sampled rows (against exact rows computed in float64),
and the extra peak resident memory of one hyper call.

The error is reported on two input families. "iid": the timing inputs, i.i.d. Gaussian q, k, v; their softmax is
nearly flat over all n keys, so the exact output is an average of n random vectors with norm ~ 1/sqrt(n), and
any estimator from a few hundred keys has relative error ~ sqrt(n / (b + m)) on it: a worst case that says
little about trained models. "clustered": q and k near a few shared directions, so attention is peaked. Results
go to a rich table and a JSON file stamped with the machine and versions. Only same-run ratios are meaningful on a
shared, noisy machine.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PeakRSS, device_stamp, interleave, parse_config, write_json  # noqa: E402

from hyper_backend import HyperConfig, hyper_attention  # noqa: E402
from hyper_backend.kernels.op import path_counts  # noqa: E402


def exact_rows(q, k, v, rows, causal, scale):
    """Exact attention output for the chosen query rows only, in float64: ``[B, H, len(rows), D]``."""
    qr = q[:, :, rows].double()
    s = (qr @ k.double().transpose(-1, -2)) * scale
    if causal:
        offset = k.shape[2] - q.shape[2]
        keep = torch.arange(k.shape[2])[None, :] <= (rows[:, None] + offset)
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ v.double()


def rel_error(out, q, k, v, causal, num_rows=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(q.shape[2], generator=g)[:num_rows].sort().values
    ref = exact_rows(q, k, v, rows, causal, 1.0 / math.sqrt(q.shape[-1]))
    return ((out[:, :, rows].double() - ref).norm() / ref.norm()).item()


def clustered(n, d, dtype, clusters=64, spread=0.35, sharpness=3.0, seed=1):
    """Structured inputs: queries and keys near one of a few shared directions, so attention is peaked on a
    cluster of keys (as in trained models) instead of the nearly flat softmax of i.i.d. Gaussian inputs."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(clusters, d, generator=g), dim=-1) * sharpness * d**0.25

    def draw():
        z = torch.randint(clusters, (n,), generator=g)
        return (centers[z] + spread * torch.randn(n, d, generator=g) * d**0.25)[None, None].to(dtype)

    return draw(), draw(), torch.randn(1, 1, n, d, generator=g, dtype=torch.float32).to(dtype)


def bench_case(n, causal, mode, cfg, repeats, dtype, d, exact_budget):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, d, dtype=dtype) for _ in range(3))
    if mode == "fwd+bwd":
        for t in (q, k, v):
            t.requires_grad_(True)
        grad = torch.randn(1, 1, n, d, dtype=dtype)

    def run(fn):
        def go():
            if mode == "fwd":
                with torch.no_grad():
                    return fn()
            out = fn()
            out.backward(grad)
            return out

        return go

    hyper = run(lambda: hyper_attention(q, k, v, is_causal=causal, config=cfg))
    exact = run(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    stats = interleave({"hyper": hyper, "exact": exact}, repeats, budget_s={"exact": exact_budget})
    before = path_counts()["hyper"]
    with PeakRSS() as mem:
        hyper()
    approximate = path_counts()["hyper"] > before  # the op's own run-time decision
    with torch.no_grad():
        err = rel_error(
            hyper_attention(q, k, v, is_causal=causal, config=cfg), q.detach(), k.detach(), v.detach(), causal
        )
        qc, kc, vc = clustered(n, d, dtype)
        err_c = rel_error(hyper_attention(qc, kc, vc, is_causal=causal, config=cfg), qc, kc, vc, causal)
    return {
        "n": n,
        "causal": causal,
        "mode": mode,
        "hyper_s": stats["hyper"],
        "exact_s": stats["exact"],
        "speedup": stats["exact"]["median"] / stats["hyper"]["median"],
        "rel_error": err,
        "rel_error_clustered": err_c,
        "hyper_extra_peak_mib": mem.extra / 2**20,
        "approximate": approximate,
    }


def band_mask(n_q, n_k, left, right):
    """The band as SDPA's dense bool mask: query i attends key j iff -left <= j - i - (n_k - n_q) <= right."""
    d = torch.arange(n_k)[None, :] - torch.arange(n_q)[:, None] - (n_k - n_q)
    return (d >= -left) & (d <= right)


def bench_window(n, kind, w, mode, repeats, dtype, d, heads, exact_budget):
    """One (n, kind, w, mode) case of the window mode: `window_attention` against SDPA with the dense band mask."""
    from hyper_backend import window_attention
    from hyper_backend.kernels import cpu
    from hyper_backend.kernels.op import window_bounds

    left, right = (w - 1, 0) if kind == "causal" else (w, w)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, d, dtype=dtype) for _ in range(3))
    mask = band_mask(n, n, left, right)
    grad = torch.randn(1, heads, n, d, dtype=dtype) if mode == "fwd+bwd" else None
    last = {}

    def run(name, fn):
        def go():
            if mode == "fwd":
                with torch.no_grad():
                    return fn(q, k, v)
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]
            out = fn(*leaves)
            out.backward(grad)
            last[name] = [x.grad for x in leaves]
            return out

        return go

    ours = run("window", lambda q, k, v: window_attention(q, k, v, (left, right)))
    exact = run("sdpa", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    before = path_counts(window=True)["window"]
    stats = interleave({"window": ours, "sdpa": exact}, repeats, budget_s={"sdpa": exact_budget})
    assert path_counts(window=True)["window"] > before  # the op ran
    with torch.no_grad():
        out = window_attention(q, k, v, (left, right))
        g = torch.Generator().manual_seed(0)
        rows = torch.randperm(n, generator=g)[:256].sort().values
        s = (q[:, :, rows].double() @ k.double().transpose(-1, -2)) / math.sqrt(d)
        s = s.masked_fill(~mask[rows], float("-inf"))
        ref = torch.softmax(s, -1) @ v.double()
        err = ((out[:, :, rows].double() - ref).abs().max() / ref.abs().max()).item()
    grad_err = None
    if mode == "fwd+bwd":
        grad_err = max(
            ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
            for a, b in zip(last["window"], last["sdpa"])
        )
    return {
        "n": n,
        "kind": kind,
        "w": w,
        "left": left,
        "right": right,
        "mode": mode,
        "heads": heads,
        "schedule": list(cpu.window_schedule(n, n, window_bounds(n, n, left, right), heads, d)),
        "window_s": stats["window"],
        "sdpa_s": stats["sdpa"],
        "speedup": stats["sdpa"]["median"] / stats["window"]["median"],
        "max_rel_error": err,
        "grad_rel_error_vs_sdpa": grad_err,
        "load_after": os.getloadavg()[0],
    }


def main_window(args, console, stamp):
    dtype = getattr(torch, args.dtype)
    kinds = {"yes": ["causal"], "no": ["symmetric"], "both": ["causal", "symmetric"]}[args.causal]
    cases = [
        (n, kind, w, m)
        for m in args.modes
        for w in args.window
        for kind in kinds
        for n in args.seq
        if m == "fwd" or n <= args.bwd_max
    ]
    console.print(
        f"[bold]window_attention vs SDPA with the dense band mask[/] on {stamp['cpu']} "
        f"({stamp['torch_threads']} threads), torch {stamp['torch']}, B=1, H={args.heads}, d={args.head_dim}, "
        f"{args.dtype}"
    )
    uptime = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()  # noqa: E731
    up_before = uptime()
    load_before = os.getloadavg()[0]
    results = []
    with Progress(console=console) as progress:
        task = progress.add_task("benchmarking", total=len(cases))
        for n, kind, w, mode in cases:
            progress.update(task, description=f"n={n} {kind} w={w} {mode}")
            results.append(
                bench_window(n, kind, w, mode, args.repeats, dtype, args.head_dim, args.heads, args.exact_budget)
            )
            progress.advance(task)
    load_after = os.getloadavg()[0]
    up_after = uptime()
    table = Table(
        title=f"SDPA(dense band mask) time / window_attention time, same run (median [min-max], runs); "
        f"H={args.heads}, d={args.head_dim}, {args.dtype}; load {load_before:.2f} -> {load_after:.2f}"
    )
    for col in ("mode", "band", "w", "n", "schedule", "sdpa s", "window s", "speed-up", "max rel err", "grad err"):
        table.add_column(col, justify="right")
    for r in results:
        e, h = r["sdpa_s"], r["window_s"]
        table.add_row(
            r["mode"],
            r["kind"],
            str(r["w"]),
            str(r["n"]),
            "/".join(map(str, r["schedule"])),
            f"{e['median']:.4f} [{e['min']:.4f}-{e['max']:.4f}] x{e['n']}",
            f"{h['median']:.4f} [{h['min']:.4f}-{h['max']:.4f}] x{h['n']}",
            f"{r['speedup']:.2f}x",
            f"{r['max_rel_error']:.1e}",
            "" if r["grad_rel_error_vs_sdpa"] is None else f"{r['grad_rel_error_vs_sdpa']:.1e}",
        )
    console.print(table)
    console.print(f"uptime before: {up_before}\nuptime after:  {up_after}")
    write_json(
        args.out,
        {
            "device": stamp,
            "mode": "window",
            "dtype": args.dtype,
            "head_dim": args.head_dim,
            "heads": args.heads,
            "load": [load_before, load_after],
            "uptime": [up_before, up_after],
            "results": results,
        },
    )
    console.print(f"wrote {args.out}")


COMPETITOR = """
import torch
torch.set_num_threads({threads})
q = torch.randn(1, 1, 8192, 64)
while True:
    torch.nn.functional.scaled_dot_product_attention(q, q, q)
"""


@contextlib.contextmanager
def competitor(threads: int):
    """A second CPU-bound process (an exact SDPA loop on ``threads`` threads) for as long as the block runs: the
    shared-machine condition, made reproducible."""
    proc = subprocess.Popen(
        [sys.executable, "-c", COMPETITOR.format(threads=threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--bwd-max", type=int, default=32768, help="largest n for fwd+bwd")
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--causal", choices=["yes", "no", "both"], default="both")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--exact-budget", type=float, default=60.0, help="seconds of exact timing per case, after 1 run")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--config", default="", metavar="FIELD=V,...", help="HyperConfig fields over the defaults")
    ap.add_argument(
        "--contend",
        type=int,
        nargs="?",
        const=2,
        default=0,
        metavar="THREADS",
        help="run a competing exact-SDPA loop on THREADS threads (default 2) during the benchmark",
    )
    ap.add_argument(
        "--window",
        type=int,
        nargs="+",
        default=None,
        metavar="W",
        help="time exact window attention (causal window of W keys, symmetric band of half-width W) "
        "against SDPA with the dense band mask; --causal yes/no/both picks causal/symmetric",
    )
    ap.add_argument("--heads", type=int, default=1, help="heads (B=1); window mode")
    ap.add_argument(
        "--out",
        default=None,
        help="JSON output (default bench/results/attention.json, bench/results/window.json with --window)",
    )
    args = ap.parse_args(argv)
    if args.window:
        args.out = args.out or "bench/results/window.json"
        return main_window(args, Console(width=200), device_stamp())
    args.out = args.out or "bench/results/attention.json"

    cfg = parse_config(HyperConfig(), args.config)
    dtype = getattr(torch, args.dtype)
    causals = {"yes": [True], "no": [False], "both": [False, True]}[args.causal]
    cases = [(n, c, m) for m in args.modes for c in causals for n in args.seq if m == "fwd" or n <= args.bwd_max]
    console = Console()
    stamp = device_stamp()
    console.print(
        f"[bold]HyperAttention vs exact SDPA[/] on {stamp['cpu']} ({stamp['torch_threads']} threads), "
        f"torch {stamp['torch']}, B=H=1, d={args.head_dim}, {args.dtype}, {cfg.label()}"
        + (f", competing process on {args.contend} threads" if args.contend else "")
    )
    results = []
    load_before = os.getloadavg()[0]
    with Progress(console=console) as progress, competitor(args.contend) if args.contend else contextlib.nullcontext():
        task = progress.add_task("benchmarking", total=len(cases))
        for n, causal, mode in cases:
            progress.update(task, description=f"n={n} {'causal' if causal else 'non-causal'} {mode}")
            results.append(bench_case(n, causal, mode, cfg, args.repeats, dtype, args.head_dim, args.exact_budget))
            progress.advance(task)
    load_after = os.getloadavg()[0]
    table = Table(
        title=f"exact SDPA time / HyperAttention time, same run (median [min-max], runs); {cfg.label()}; "
        f"load {load_before:.2f} -> {load_after:.2f}" + (" (contended)" if args.contend else "")
    )
    for col in ("mode", "causal", "n", "exact s", "hyper s", "speed-up", "err iid", "err clustered", "extra peak MiB"):
        table.add_column(col, justify="right")
    for r in results:
        e, h = r["exact_s"], r["hyper_s"]
        table.add_row(
            r["mode"],
            "yes" if r["causal"] else "no",
            str(r["n"]),
            f"{e['median']:.3f} [{e['min']:.3f}-{e['max']:.3f}] x{e['n']}",
            f"{h['median']:.4f} [{h['min']:.4f}-{h['max']:.4f}] x{h['n']}",
            f"{r['speedup']:.1f}x" + ("" if r["approximate"] else " (exact)"),
            f"{r['rel_error']:.3f}",
            f"{r['rel_error_clustered']:.3f}",
            f"{r['hyper_extra_peak_mib']:.0f}",
        )
    console.print(table)
    write_json(
        args.out,
        {
            "device": stamp,
            "config": cfg.__dict__,
            "dtype": args.dtype,
            "head_dim": args.head_dim,
            "contend_threads": args.contend,
            "load": [load_before, load_after],
            "results": results,
        },
    )
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
