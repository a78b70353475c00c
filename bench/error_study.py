"""HyperAttention against exact attention on real Q/K/V captured from a model: per-row output error, and how it
moves with block size, sample size and LSH projections.

    # capture the global layers of Gemma-3-270m on the first 8k window of the KJV (one exact forward), then sweep
    python bench/error_study.py --capture --context 8192 --sites 5,11,17 --inputs bench/results/qkv_gemma_8k.pt
    # sweep again on the saved tensors (no model needed)
    python bench/error_study.py --inputs bench/results/qkv_gemma_8k.pt --seeds 3
    # the error/time frontier: listed configs, timed against exact SDPA on the same tensors, drawn as a picture
    python bench/error_study.py --inputs bench/results/qkv_gemma_8k.pt --frontier "sink_keys=4,local_window=128" \
        "block_size=512,sample_size=512" --plot bench/results/frontier.png

Inputs: the capture format of ``hyper_backend.capture`` (the autotuner's ``--inputs`` format): a dict or a list
of dicts with ``q [B, Hq, N, D]``, ``k, v [B, Hkv, N, D]``, ``causal``, ``scale``, ``layer``.

For each record it samples query rows, computes their exact attention in float64, and reports for every
configuration the relative error ``|o_hyper - o_exact| / |o_exact|`` of those rows: mean and 90th percentile
over the *approximated* rows (for causal attention the first leaf of the recursion is exact and left out), and
the Frobenius relative error of all sampled rows. One parameter moves at a time from the base configuration
(defaults, or the flags), averaged over ``--seeds`` seeds. It also reports where the exact attention mass of the
approximated rows lies (on the first key, the attention sink; within the last 512 keys; in the keys the causal
recursion approximates), which is what decides whether a configuration can work.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_stamp, parse_config, parse_value, write_json  # noqa: E402

from hyper_backend import HyperConfig, hyper_attention  # noqa: E402
from hyper_backend.kernels.plan import causal_depth_for  # noqa: E402

GRID = {  # one parameter at a time
    "block_size": [64, 128, 256, 512, 1024],
    "sample_size": [0, 128, 256, 512, 1024, 2048],
    "lsh_num_projs": [2, 4, 7, 10],
    "sink_keys": [0, 1, 4, 16],
    "local_window": [0, 64, 128, 256, 512],
    "residual": ["uniform", "stratified"],
    "min_seq_len": [1024, 2048, 4096],
}
LOCAL = 512


def load_records(path: str) -> list[dict]:
    data = torch.load(path, weights_only=True, map_location="cpu")
    records = data if isinstance(data, (list, tuple)) else [data]
    for i, r in enumerate(records):
        r.setdefault("causal", False)
        r.setdefault("layer", i)
        r.setdefault("scale", 1.0 / math.sqrt(r["q"].shape[-1]))
    return list(records)


def capture_from_model(args, console: Console) -> list[dict]:
    """One exact forward over the first window of the text, recording ``--sites``; saved to ``--inputs``."""
    import quality

    from hyper_backend.capture import capture_attention, save_records

    path = quality.model_path(args.model)
    model, tokenizer = quality.load_model(path)
    bos = tokenizer.bos_token_id
    data = quality.windows(
        quality.text_tokens(tokenizer, quality.load_text(args.text), args.context - 1), args.context, bos
    )
    body = quality.body_and_head(model)[0]
    t0 = time.perf_counter()
    with torch.no_grad(), capture_attention(args.sites, module=body) as records:
        quality.plain_runner(body)(data[:1])
    console.print(
        f"captured sites {[r['layer'] for r in records]} at n={args.context} in {time.perf_counter() - t0:.0f} s"
    )
    save_records(records, args.inputs)
    return records


# ----------------------------------------------------------------------------------------------------------
# exact rows and the error of a configuration
# ----------------------------------------------------------------------------------------------------------


def exact_probs(q, k, rows, causal, scale):
    """Exact attention probabilities of the chosen query rows in float64: ``[B, Hq, len(rows), Nk]``."""
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, 1) if group > 1 else k.double()
    s = (q[:, :, rows].double() @ kk.transpose(-1, -2)) * scale
    if causal:
        offset = k.shape[2] - q.shape[2]
        keep = torch.arange(k.shape[2])[None, :] <= (rows[:, None] + offset)
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1)


def exact_out(p, v):
    group = p.shape[1] // v.shape[1]
    vv = v.double().repeat_interleave(group, 1) if group > 1 else v.double()
    return p @ vv  # [B, Hq, rows, Dv]


@dataclasses.dataclass
class Problem:
    """One captured site with its sampled rows and their exact outputs."""

    record: dict
    rows: torch.Tensor  # [r] sorted query positions
    approx: torch.Tensor  # [r] bool: the row's attention is (partly) approximated
    ref: torch.Tensor  # [B, Hq, r, Dv] float64
    profile: dict[str, float]


def first_exact_rows(n: int, causal: bool, config: HyperConfig) -> int:
    """Rows before this position are computed exactly (the first leaf of the causal recursion)."""
    if n < config.min_len:
        return n
    if not causal:
        return 0
    depth = causal_depth_for(n, config.min_len, config.causal_depth)
    return math.ceil(n / 2**depth) if depth else n


def make_problem(record: dict, num_rows: int, base: HyperConfig, seed: int = 0) -> Problem:
    q, k, v = record["q"], record["k"], record["v"]
    n = q.shape[2]
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(n, generator=g)[:num_rows].sort().values
    p = exact_probs(q, k, rows, record["causal"], record["scale"])
    leaf = first_exact_rows(n, record["causal"], base)
    approx = rows >= leaf
    pa = p[:, :, approx]  # [B, Hq, ra, Nk]
    profile = {}
    if pa.numel():
        ra = rows[approx]
        key_pos = torch.arange(k.shape[2])
        local = (key_pos[None, :] > ra[:, None] - LOCAL) & (key_pos[None, :] <= ra[:, None])
        # keys the recursion approximates for a row in [leaf, n): those before the row's own leaf
        own_leaf_start = (ra // leaf) * leaf if leaf else torch.zeros_like(ra)
        far = key_pos[None, :] < own_leaf_start[:, None]
        profile = {
            "sink_mass": pa[..., 0].mean().item(),
            "local_mass": (pa * local).sum(-1).mean().item(),
            "approximated_mass": (pa * far).sum(-1).mean().item(),
            "approximated_mass_without_sink": (pa[..., 1:] * far[:, 1:]).sum(-1).mean().item(),
            "row_entropy_nats": -(pa * pa.clamp_min(1e-300).log()).sum(-1).mean().item(),
        }
    return Problem(record, rows, approx, exact_out(p, v), profile)


def run(record: dict, config: HyperConfig | None) -> torch.Tensor:
    """The site's attention: HyperAttention with ``config``, or exact SDPA for None."""
    r = record
    gqa = r["q"].shape[1] != r["k"].shape[1]
    with torch.no_grad():
        if config is None:
            return torch.nn.functional.scaled_dot_product_attention(
                r["q"], r["k"], r["v"], is_causal=r["causal"], scale=r["scale"], enable_gqa=gqa
            )
        return hyper_attention(
            r["q"], r["k"], r["v"], is_causal=r["causal"], scale=r["scale"], enable_gqa=gqa, config=config
        )


def errors(problem: Problem, config: HyperConfig) -> dict:
    t0 = time.perf_counter()
    out = run(problem.record, config)
    seconds = time.perf_counter() - t0
    o = out[:, :, problem.rows].double()
    diff = (o - problem.ref).norm(dim=-1)  # [B, Hq, r]
    rel = diff / problem.ref.norm(dim=-1).clamp_min(1e-30)
    approx = rel[:, :, problem.approx].reshape(-1)
    return {
        "frob_rel": ((o - problem.ref).norm() / problem.ref.norm()).item(),
        "row_rel_mean": approx.mean().item() if approx.numel() else 0.0,
        "row_rel_p90": approx.quantile(0.9).item() if approx.numel() else 0.0,
        "seconds": seconds,
    }


def mean_over_seeds(problem: Problem, config: HyperConfig, seeds: int) -> dict:
    runs = [errors(problem, config.replace(seed=config.seed + s)) for s in range(seeds)]
    return {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]}


def configs(base: HyperConfig, grid: dict[str, list]):
    """``(parameter, value, config)``: the base first, then one parameter moved at a time."""
    yield "base", None, base
    for name, values in grid.items():
        for value in values:
            if value != getattr(base, name):
                yield name, value, base.replace(**{name: value})


def median_seconds(record: dict, config: HyperConfig | None, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(record, config)
        times.append(time.perf_counter() - t0)
    return times


def frontier(problems: list[Problem], points: list[HyperConfig], seeds: int, repeats: int, progress) -> list[dict]:
    """Error and time of each config, with exact SDPA timed alternately on the same tensors: one row a config,
    errors averaged over sites and seeds, time summed over sites (median of ``repeats``)."""
    task = progress.add_task("frontier", total=len(points))
    rows = []
    for cfg in points:
        per_site, hyper_s, exact_s = {}, [], []
        for pr in problems:
            per_site[str(pr.record["layer"])] = mean_over_seeds(pr, cfg, seeds)
            h = median_seconds(pr.record, cfg, repeats)
            e = median_seconds(pr.record, None, repeats)
            hyper_s.append(sorted(h)[len(h) // 2])
            exact_s.append(sorted(e)[len(e) // 2])
        err = sum(s["row_rel_mean"] for s in per_site.values()) / len(per_site)
        rows.append(
            {
                "config": dataclasses.asdict(cfg),
                "label": cfg.label(),
                "row_rel_mean": err,
                "hyper_seconds": sum(hyper_s),
                "exact_seconds": sum(exact_s),
                "speedup": sum(exact_s) / sum(hyper_s),
                "sites": per_site,
            }
        )
        progress.advance(task)
    return rows


def short_label(config: dict, default: HyperConfig) -> str:
    """The fields where ``config`` differs from ``default``, e.g. ``sink_keys=4 local_window=128``."""
    names = {
        "block_size": "b",
        "sample_size": "m",
        "lsh_num_projs": "r",
        "min_seq_len": "min",
        "causal_depth": "depth",
        "sink_keys": "sinks",
        "local_window": "w",
        "residual": "",
    }
    parts = [
        f"{names[k]}={v}" if names[k] else str(v) for k, v in config.items() if k in names and v != getattr(default, k)
    ]
    return " ".join(parts) or "default"


def plot_frontier(rows: list[dict], default: HyperConfig, path: str, title: str) -> None:
    """Error against speed-up over exact, one point a config, the default marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    for r in rows:
        is_default = r["config"] == dataclasses.asdict(default)
        ax.scatter(
            r["speedup"],
            r["row_rel_mean"],
            s=80 if is_default else 30,
            c="crimson" if is_default else "steelblue",
            marker="*" if is_default else "o",
            zorder=3,
        )
        ax.annotate(
            "default" if is_default else short_label(r["config"], default),
            (r["speedup"], r["row_rel_mean"]),
            fontsize=7,
            xytext=(4, 3),
            textcoords="offset points",
        )
    ax.set_xlabel("attention speed-up over exact SDPA on the same tensors (same run)")
    ax.set_ylabel("mean relative error of approximated rows")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", required=True, help="captured Q/K/V (.pt); written first with --capture")
    p.add_argument("--capture", action="store_true", help="capture --sites from --model on --text first")
    p.add_argument("--model", default="gemma3-270m-gguf")
    p.add_argument("--text", default="kjv")
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--sites", default="5,11,17")
    p.add_argument("--rows", type=int, default=256, help="query rows sampled per site")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--block-size", type=int, default=HyperConfig.block_size)
    p.add_argument("--sample-size", type=int, default=HyperConfig.sample_size)
    p.add_argument("--lsh-projs", type=int, default=HyperConfig.lsh_num_projs)
    p.add_argument("--min-seq-len", type=int, default=HyperConfig.min_seq_len)
    p.add_argument("--sink-keys", type=int, default=HyperConfig.sink_keys)
    p.add_argument("--local-window", type=int, default=HyperConfig.local_window)
    p.add_argument("--residual", choices=("uniform", "stratified"), default=HyperConfig.residual)
    p.add_argument(
        "--grid",
        nargs="*",
        default=None,
        metavar="NAME=V1,V2",
        help="override the sweep, e.g. block_size=128,256 sample_size=512",
    )
    p.add_argument(
        "--frontier",
        nargs="*",
        default=None,
        metavar="FIELD=V,...",
        help="instead of the sweep: these configs (over the base; 'base' for the base itself), timed "
        "against exact SDPA, plus the HyperConfig defaults",
    )
    p.add_argument("--repeats", type=int, default=3, help="timing repeats per config and site (--frontier)")
    p.add_argument("--plot", default=None, help="PNG of the frontier (needs matplotlib: the bench extra)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    console = Console()
    records = capture_from_model(args, console) if args.capture else load_records(args.inputs)
    base = HyperConfig(
        block_size=args.block_size,
        sample_size=args.sample_size,
        lsh_num_projs=args.lsh_projs,
        min_seq_len=args.min_seq_len,
        sink_keys=args.sink_keys,
        local_window=args.local_window,
        residual=args.residual,
    )
    grid = (
        GRID
        if args.grid is None
        else {
            kv.split("=")[0]: [parse_value(kv.split("=")[0], x) for x in kv.split("=")[1].split(",")]
            for kv in args.grid
        }
    )
    problems = [make_problem(r, args.rows, base) for r in records]
    for pr in problems:
        prof = ", ".join(f"{k} {v:.3f}" for k, v in pr.profile.items())
        console.print(f"site {pr.record['layer']} n={pr.record['q'].shape[2]} causal={pr.record['causal']}: {prof}")

    errors(problems[0], base)  # warm-up, so the first timing is not the first call's
    if args.frontier is not None:
        return frontier_main(args, problems, base, console)
    todo = list(configs(base, grid))
    results = []
    with Progress(console=console) as progress:
        task = progress.add_task("configs", total=len(todo) * len(problems))
        for name, value, cfg in todo:
            per_site = {}
            for pr in problems:
                per_site[str(pr.record["layer"])] = mean_over_seeds(pr, cfg, args.seeds)
                progress.advance(task)
            results.append({"parameter": name, "value": value, "config": dataclasses.asdict(cfg), "sites": per_site})

    t = Table(
        title=f"HyperAttention vs exact on captured Q/K/V ({args.inputs}), mean row rel. error of "
        f"approximated rows (p90), {args.seeds} seed(s)"
    )
    t.add_column("parameter")
    t.add_column("value", justify="right")
    for pr in problems:
        t.add_column(f"site {pr.record['layer']}", justify="right")
    t.add_column("ms/call", justify="right")
    for res in results:
        cells = [f"{s['row_rel_mean']:.3f} ({s['row_rel_p90']:.3f})" for s in res["sites"].values()]
        ms = 1000 * sum(s["seconds"] for s in res["sites"].values()) / len(res["sites"])
        t.add_row(res["parameter"], "" if res["value"] is None else str(res["value"]), *cells, f"{ms:.0f}")
    console.print(t)
    payload = {
        "inputs": args.inputs,
        "rows": args.rows,
        "seeds": args.seeds,
        "base": dataclasses.asdict(base),
        "profiles": {str(pr.record["layer"]): pr.profile for pr in problems},
        "shapes": {str(pr.record["layer"]): list(pr.record["q"].shape) for pr in problems},
        "results": results,
        "device": device_stamp(),
    }
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "error_study.json")
    write_json(out, payload)
    console.print(f"wrote {out}")
    return payload


def frontier_main(args, problems: list[Problem], base: HyperConfig, console: Console) -> dict:
    default = HyperConfig()
    points = [base if text == "base" else parse_config(base, text) for text in args.frontier]
    if default not in points:
        points.insert(0, default)
    load_before = os.getloadavg()[0]
    with Progress(console=console) as progress:
        rows = frontier(problems, points, args.seeds, args.repeats, progress)
    load_after = os.getloadavg()[0]
    shapes = ", ".join(f"site {pr.record['layer']} {list(pr.record['q'].shape)}" for pr in problems)
    t = Table(title=f"error/time frontier on {args.inputs} ({shapes}); load {load_before:.2f} -> {load_after:.2f}")
    for col in ("config", "mean row rel. err", "hyper s", "exact s", "speed-up"):
        t.add_column(col, justify="right")
    for r in sorted(rows, key=lambda r: r["speedup"]):
        mark = " (default)" if r["config"] == dataclasses.asdict(default) else ""
        t.add_row(
            r["label"] + mark,
            f"{r['row_rel_mean']:.4f}",
            f"{r['hyper_seconds']:.3f}",
            f"{r['exact_seconds']:.3f}",
            f"{r['speedup']:.2f}x",
        )
    console.print(t)
    payload = {
        "inputs": args.inputs,
        "rows": args.rows,
        "seeds": args.seeds,
        "repeats": args.repeats,
        "load": [load_before, load_after],
        "default": dataclasses.asdict(default),
        "frontier": rows,
        "device": device_stamp(),
    }
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "frontier.json")
    write_json(out, payload)
    console.print(f"wrote {out}")
    if args.plot:
        plot_frontier(
            rows,
            default,
            args.plot,
            f"HyperAttention on captured Q/K/V: {shapes}\n{device_stamp().get('cpu', '')} load {load_before:.2f}",
        )
        console.print(f"wrote {args.plot}")
    return payload


if __name__ == "__main__":
    main()
