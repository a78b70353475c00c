"""``python -m hyper_backend.autotune --model PATH ...``: calibrate a model per attention site
(`hyper_backend.autotune.calibrate`) and write the result to the tuning cache for ``layers="auto"``."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence

import torch

from hyper_backend.config import default_tune_cache

from . import writer
from .calibrate import CalibrationSettings, SiteResult, calibrate, record
from .cli import add_space_arguments, parse_length, space_from_args
from .fingerprint import UnstableConfig, config_hash
from .models import DEFAULT_MODEL, load_model, load_text, model_path, text_tokens, windows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hyper_backend.autotune --model",
        description="Calibrate a model: per attention site, HyperAttention with a tuned config or exact, within a "
        "perplexity budget verified on held-out text; written to the tuning cache for layers='auto'.",
    )
    p.add_argument("--model", required=True, help=f"HF directory, .gguf file, or {DEFAULT_MODEL}")
    p.add_argument("--text", default="kjv", help="kjv, or a UTF-8 text file")
    p.add_argument("--seq", type=parse_length, required=True, help="context length (e.g. 8192, 8k)")
    p.add_argument("--budget", type=float, default=0.01, help="relative perplexity increase allowed (0.01 = 1%%)")
    p.add_argument("--offset", type=int, default=0, help="text token where the calibration window starts")
    p.add_argument(
        "--verify-offset",
        type=int,
        default=None,
        help="text token where the held-out verification window starts (default: 100000, or right "
        "after the calibration window when the text is shorter)",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    add_space_arguments(p)
    p.add_argument("--error-rows", type=int, default=256, help="query rows sampled for the error")
    p.add_argument("--max-verify", type=int, default=3, help="verification runs at most (each may tighten)")
    p.add_argument(
        "--perplexity",
        action="store_true",
        help="score every held-out position, to print absolute perplexities (the verified change needs "
        "only the positions the assignment moves)",
    )
    p.add_argument("--loss-chunk", type=int, default=512, help="positions per output-head projection")
    p.add_argument(
        "--cache",
        default=None,
        metavar="PATH",
        help="cache file (default $HYPER_TUNE_CACHE, else $XDG_CACHE_HOME/hyper_backend/tune.json)",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="also write the full result as JSON")
    p.add_argument("--no-bos", action="store_true", help="do not start the windows with BOS")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from rich.console import Console

    from .display import RichProgress, calibration_table

    console = Console(width=None if sys.stdout.isatty() else 160)
    path = args.cache or default_tune_cache()
    try:
        writer.check_writable(path)
    except OSError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    s = CalibrationSettings(
        seq=args.seq,
        budget=args.budget,
        space=space_from_args(args, parser),
        error_rows=args.error_rows,
        max_verify=args.max_verify,
        perplexity=args.perplexity,
    )
    started = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    with console.status("loading the model and the text"):
        where = model_path(args.model)
        model, tokenizer = load_model(where, dtype)
        text = load_text(args.text)
        bos = None if args.no_bos else tokenizer.bos_token_id
        step = args.seq - (bos is not None)
        voff = 100000 if args.verify_offset is None else args.verify_offset
        try:  # one tokenization of the prefix that holds both windows
            ids = text_tokens(tokenizer, text, max(args.offset, voff) + step)
        except ValueError:
            if args.verify_offset is not None:
                raise
            voff = args.offset + step  # a short text: the window right after the calibration one
            ids = text_tokens(tokenizer, text, voff + step)
        calib = windows(ids[args.offset : args.offset + step], args.seq, bos)
        verify = windows(ids[voff : voff + step], args.seq, bos)
    try:  # refuse now, not after the calibration, a model whose config cannot identify it later
        config_hash(model.config)
    except UnstableConfig as e:
        print(f"error: {where}: the model's config cannot be fingerprinted for layers='auto': {e}", file=sys.stderr)
        return 1
    load_s = time.perf_counter() - started
    console.print(
        f"[bold]calibrating[/bold] {os.path.basename(where)} at {args.seq} tokens, budget "
        f"{100 * args.budget:+.2f}% perplexity; calibration tokens {args.offset}+, held-out tokens {voff}+ "
        f"(loaded in {load_s:.0f} s)"
    )
    with RichProgress(console) as progress:
        result = calibrate(model, calib, verify, s, progress, chunk=args.loss_chunk)
    console.print(calibration_table(result))
    extra = {"model": where, "text": args.text, "offset": args.offset, "verify_offset": voff, "load_s": load_s}
    entry = record(path, model, result, dtype, extra)
    times = result.attention_times()
    last = result.verifications[-1] if result.verifications else None
    if last is not None:
        ppl = "" if math.isnan(last.ppl) else f"perplexity {last.ppl_exact:.4f} exact -> {last.ppl:.4f}, "
        console.print(
            f"verified on tokens {voff}+: {ppl}change {100 * last.change:+.2f}% (budget "
            f"{100 * args.budget:+.2f}%): "
            f"{'[green]passed[/green]' if result.passed else '[red]failed: every site kept exact[/red]'}"
        )
    else:
        console.print("no site could be approximated within the budget: every site stays exact (nothing to verify)")
    saved = times["exact"] - times["assignment"]
    line = (
        f"attention time of the approximable sites per forward: exact {times['exact']:.3f} s, assignment "
        f"{times['assignment']:.3f} s (saves {saved:.3f} s, {100 * saved / max(times['exact'], 1e-12):.1f}%)"
    )
    if not math.isnan(times["default_all"]):
        line += f"; the default config on all of them: {times['default_all']:.3f} s"
    console.print(line)
    console.print(
        f"calibration took {result.seconds:.0f} s (+{load_s:.0f} s loading); wrote model "
        f"{entry['fingerprint']} ({entry['dtype']}, bucket {entry['bucket']}) to {path}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "record": entry,
                    "phases": result.phases,
                    "load_s": load_s,
                    "sites": [_site_json(x) for x in result.sites],
                },
                f,
                indent=1,
                default=str,
            )
    return 0


def _site_json(site: SiteResult) -> dict:
    return {
        "index": site.index,
        "layer": site.layer,
        "n": site.n,
        "status": site.status,
        "reason": site.reason,
        "exact_s": site.exact_time,
        "screened": site.screened,
        "default": {"time_s": site.default_time, "error": site.default_error},
        "probes": [
            {"config": p.config.label(), "error": p.error, "time_s": p.time, "measured": p.measured_dloss}
            for p in (site.probe, site.fast_probe)
            if p is not None
        ],
        "frontier": [
            {"config": o.config.label(), "time_s": o.time, "error": o.error, "dloss": o.dloss} for o in site.options
        ],
        "choice": None if site.choice is None else site.choice.config.label(),
    }
