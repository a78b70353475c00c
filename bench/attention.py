"""HyperAttention against exact SDPA, measured in the same run.

    python bench/attention.py                      # fwd 2k..131k, fwd+bwd up to 32k, causal and not
    python bench/attention.py --seq 16384 --modes fwd --causal no --repeats 5
    python bench/attention.py --seq 131072 --modes fwd --causal yes --contend   # with a competing CPU-bound process

For every (n, causal, mode) it times ``hyper_attention`` (default `HyperConfig`) and
``F.scaled_dot_product_attention`` alternately, reports median and spread, the ratio exact / hyper, the
relative Frobenius error of hyper's output on randomly sampled rows (against exact rows computed in float64),
and the extra peak resident memory of one hyper call.

The error is reported on two input families. "iid": the timing inputs, i.i.d. Gaussian q, k, v; their softmax is
nearly flat over all n keys, so the exact output is an average of n random vectors with norm ~ 1/sqrt(n), and
any estimator from a few hundred keys has relative error ~ sqrt(n / (b + m)) on it: a worst case that says
little about trained models. "clustered": q and k near a few shared directions, so attention is peaked. Results go to a rich table and a JSON file stamped
with the machine and versions. Only same-run ratios are meaningful on a shared, noisy machine.
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
from common import PeakRSS, device_stamp, interleave, write_json  # noqa: E402

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
        err = rel_error(hyper_attention(q, k, v, is_causal=causal, config=cfg), q.detach(), k.detach(), v.detach(),
                        causal)
        qc, kc, vc = clustered(n, d, dtype)
        err_c = rel_error(hyper_attention(qc, kc, vc, is_causal=causal, config=cfg), qc, kc, vc, causal)
    return {
        "n": n, "causal": causal, "mode": mode,
        "hyper_s": stats["hyper"], "exact_s": stats["exact"],
        "speedup": stats["exact"]["median"] / stats["hyper"]["median"],
        "rel_error": err, "rel_error_clustered": err_c, "hyper_extra_peak_mib": mem.extra / 2**20,
        "approximate": approximate,
    }


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
    proc = subprocess.Popen([sys.executable, "-c", COMPETITOR.format(threads=threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def parse_config(text: str) -> HyperConfig:
    fields = {}
    for part in filter(None, text.replace(" ", "").split(",")):
        name, _, value = part.partition("=")
        fields[name] = value if name == "residual" else (None if value.lower() in ("none", "auto") else int(value))
    return HyperConfig(**fields)


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
    ap.add_argument("--contend", type=int, nargs="?", const=2, default=0, metavar="THREADS",
                    help="run a competing exact-SDPA loop on THREADS threads (default 2) during the benchmark")
    ap.add_argument("--out", default="bench/results/attention.json")
    args = ap.parse_args(argv)

    cfg = parse_config(args.config)
    dtype = getattr(torch, args.dtype)
    causals = {"yes": [True], "no": [False], "both": [False, True]}[args.causal]
    cases = [(n, c, m) for m in args.modes for c in causals for n in args.seq if m == "fwd" or n <= args.bwd_max]
    console = Console()
    stamp = device_stamp()
    console.print(f"[bold]HyperAttention vs exact SDPA[/] on {stamp['cpu']} ({stamp['torch_threads']} threads), "
                  f"torch {stamp['torch']}, B=H=1, d={args.head_dim}, {args.dtype}, {cfg.label()}"
                  + (f", competing process on {args.contend} threads" if args.contend else ""))
    results = []
    load_before = os.getloadavg()[0]
    with Progress(console=console) as progress, \
            (competitor(args.contend) if args.contend else contextlib.nullcontext()):
        task = progress.add_task("benchmarking", total=len(cases))
        for n, causal, mode in cases:
            progress.update(task, description=f"n={n} {'causal' if causal else 'non-causal'} {mode}")
            results.append(bench_case(n, causal, mode, cfg, args.repeats, dtype, args.head_dim, args.exact_budget))
            progress.advance(task)
    load_after = os.getloadavg()[0]
    table = Table(title=f"exact SDPA time / HyperAttention time, same run (median [min-max], runs); {cfg.label()}; "
                        f"load {load_before:.2f} -> {load_after:.2f}" + (" (contended)" if args.contend else ""))
    for col in ("mode", "causal", "n", "exact s", "hyper s", "speed-up", "err iid", "err clustered",
                "extra peak MiB"):
        table.add_column(col, justify="right")
    for r in results:
        e, h = r["exact_s"], r["hyper_s"]
        table.add_row(r["mode"], "yes" if r["causal"] else "no", str(r["n"]),
                      f"{e['median']:.3f} [{e['min']:.3f}-{e['max']:.3f}] x{e['n']}",
                      f"{h['median']:.4f} [{h['min']:.4f}-{h['max']:.4f}] x{h['n']}",
                      f"{r['speedup']:.1f}x" + ("" if r["approximate"] else " (exact)"),
                      f"{r['rel_error']:.3f}", f"{r['rel_error_clustered']:.3f}", f"{r['hyper_extra_peak_mib']:.0f}")
    console.print(table)
    write_json(args.out, {"device": stamp, "config": cfg.__dict__, "dtype": args.dtype, "head_dim": args.head_dim,
                          "contend_threads": args.contend, "load": [load_before, load_after], "results": results})
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
