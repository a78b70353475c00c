"""``python -m hyper_backend.autotune``: tune HyperAttention for this device and write the cache.

Example: ``python -m hyper_backend.autotune --seq 131072 --causal`` (see ``--help``). With ``--model PATH`` it
calibrates that model per attention site instead (`hyper_backend.autotune.calibrate_cli`). The argument forms
both share (lengths, the candidate grid) are defined here.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Sequence

import torch

from hyper_backend.config import default_tune_cache

from .grid import Space

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
MAX_LEN = 1 << 24


def parse_length(text: str) -> int:
    t = text.strip().lower()
    mult = 1
    if t.endswith("k"):
        t, mult = t[:-1], 1024
    elif t.endswith("m"):
        t, mult = t[:-1], 1 << 20
    if not t.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a length (use e.g. 131072, 128k, 4k:64k, 4096,8192)")
    n = int(t) * mult
    if not 64 <= n <= MAX_LEN:
        raise argparse.ArgumentTypeError(f"length {n} is outside [64, {MAX_LEN}]")
    return n


def parse_seq(text: str) -> list[int]:
    """``N``, ``N,M,...`` or a range ``A:B`` (A, 2A, 4A, ... up to B). ``k``/``m`` suffixes allowed."""
    out: list[int] = []
    for part in text.split(","):
        if ":" in part:
            lo_text, _, hi_text = part.partition(":")
            lo, hi = parse_length(lo_text), parse_length(hi_text)
            if hi < lo:
                raise argparse.ArgumentTypeError(f"range {part!r} is reversed")
            x = lo
            while x <= hi:
                out.append(x)
                x *= 2
        else:
            out.append(parse_length(part))
    return out


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def _int_list(text: str) -> tuple:
    return tuple(_positive_int(x) for x in text.split(","))


def _positive_float(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number ({what})") from None
    if not (0 < v < math.inf):
        raise argparse.ArgumentTypeError(f"{what} must be a positive number, got {text}")
    return v


def _count_list(text: str) -> tuple:
    """``0,16,64``: integers >= 0."""
    out = []
    for x in text.split(","):
        try:
            v = int(x)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{x!r} is not an integer") from None
        if v < 0:
            raise argparse.ArgumentTypeError(f"{v} must be at least 0")
        out.append(v)
    return tuple(out)


def _window_list(text: str) -> tuple:
    """``default,0,512``: ``default`` (the `HyperConfig` default, 128 keys causal) or integers >= 0."""
    return tuple(None if x.strip() == "default" else _count_list(x)[0] for x in text.split(","))


def add_space_arguments(p: argparse.ArgumentParser) -> None:
    """The grid's axes (`hyper_backend.autotune.grid.Space`), shared by the tuner and the calibration."""
    d = Space()
    shown = lambda axis: ",".join("default" if v is None else str(v) for v in axis)  # noqa: E731
    g = p.add_argument_group("candidate grid (the tuner's and the calibration's)")
    g.add_argument(
        "--block-sizes", type=_int_list, default=None, metavar="B,B,...", help=f"grid default {shown(d.block_sizes)}"
    )
    g.add_argument(
        "--sample-sizes",
        type=_count_list,
        default=None,
        metavar="M,M,...",
        help=f"grid default {shown(d.sample_sizes)}",
    )
    g.add_argument(
        "--lsh-projs", type=_int_list, default=None, metavar="R,R,...", help=f"grid default {shown(d.lsh_projs)}"
    )
    g.add_argument(
        "--sink-keys",
        type=_count_list,
        default=None,
        metavar="S,S,...",
        help=f"exact first keys; grid default {shown(d.sink_keys)}",
    )
    g.add_argument(
        "--local-windows",
        type=_window_list,
        default=None,
        metavar="W,W,...",
        help="exact local windows: integers, or 'default' (the HyperConfig default: 128 keys causal, none "
        f"non-causal); grid default {shown(d.local_windows)}",
    )
    g.add_argument(
        "--residuals",
        type=lambda t: tuple(x.strip() for x in t.split(",")),
        default=None,
        metavar="uniform,stratified",
        help=f"residual schemes; grid default {shown(d.residuals)}",
    )
    g.add_argument(
        "--min-seq-len",
        type=_positive_int,
        default=None,
        help=f"the smallest min_seq_len a candidate uses (default {d.min_seq_len}); the tuner also keeps causal "
        "thresholds within a factor 4 of the crossover its cost model predicts",
    )


def space_from_args(args, parser: argparse.ArgumentParser) -> Space:
    """The `Space` of `add_space_arguments`' values (the defaults for those not given); a bad one is a usage
    error naming it."""
    given = {
        name: getattr(args, name)
        for name in (
            "block_sizes",
            "sample_sizes",
            "lsh_projs",
            "sink_keys",
            "local_windows",
            "residuals",
            "min_seq_len",
        )
        if getattr(args, name) is not None
    }
    if any(r not in ("uniform", "stratified") for r in given.get("residuals", ())):
        parser.error(f"--residuals takes uniform and/or stratified, got {','.join(given['residuals'])}")
    if max(given.get("lsh_projs", (1,))) > 30:
        parser.error("--lsh-projs values must be at most 30")
    try:
        return Space(**given)
    except ValueError as e:
        parser.error(f"candidate grid: {e}")


def _max_error(text: str) -> float | None:
    return None if text.strip().lower() == "auto" else _positive_float(text, "--max-error: a number or 'auto'")


def _seconds(text: str) -> float:
    return _positive_float(text, "--time-budget, in seconds")


def build_parser() -> argparse.ArgumentParser:
    from .inputs import FAMILIES

    p = argparse.ArgumentParser(
        prog="python -m hyper_backend.autotune",
        description="Tune HyperAttention's block size, sample size, LSH projections, causal depth and min_seq_len "
        "for this device, within an error budget, and write them to the tuning cache that "
        "hyper_attention and the hyper backend read when they resolve settings. With --model PATH instead: calibrate "
        "that model per attention site within a perplexity budget, for layers='auto' (see "
        "`python -m hyper_backend.autotune --model X --help`).",
    )
    p.add_argument(
        "--seq",
        type=parse_seq,
        action="append",
        required=True,
        metavar="N",
        help="sequence length(s) to tune: 131072, 128k, 4096,16384, or a doubling range 4k:128k; repeatable",
    )
    p.add_argument(
        "--causal",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="tune causal (default) or non-causal attention",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--head-dim", type=_positive_int, default=None, help="head dimension (default 64, or the file's)")
    p.add_argument(
        "--heads",
        type=_positive_int,
        default=1,
        help="query heads of the synthetic inputs (default 1; --inputs sets its own)",
    )
    p.add_argument(
        "--batch",
        type=_positive_int,
        default=1,
        help="batch of the synthetic inputs (default 1; --inputs sets its own)",
    )
    p.add_argument(
        "--max-error",
        type=_max_error,
        default=None,
        metavar="E",
        help="relative Frobenius error allowed on the sampled rows, or 'auto' (default): the error "
        "the default HyperConfig itself makes at each length, so the tuned config is never "
        "less accurate than the defaults",
    )
    p.add_argument(
        "--time-budget",
        type=_seconds,
        default=540.0,
        metavar="S",
        help="seconds for the whole run, shared by the lengths (default 540); at each length about "
        "half of what is left screens candidates and the rest races the best against the default",
    )
    p.add_argument(
        "--cache",
        default=None,
        metavar="PATH",
        help="cache file (default $HYPER_TUNE_CACHE, else $XDG_CACHE_HOME/hyper_backend/tune.json)",
    )
    p.add_argument(
        "--inputs",
        default=None,
        metavar="FILE",
        help="captured Q/K/V (.pt, torch.load(weights_only=True)): a dict with q, k, v [B, H, N, D] "
        "tensors, or a list of them; see hyper_backend.autotune.inputs",
    )
    p.add_argument("--family", choices=FAMILIES, default="mixed", help="synthetic inputs when --inputs is absent")
    p.add_argument(
        "--rounds",
        type=_positive_int,
        default=7,
        help="at most this many alternating race rounds (at least 3 are run; default 7)",
    )
    p.add_argument("--race-size", type=_positive_int, default=3, help="screened candidates raced against the default")
    p.add_argument("--error-rows", type=_positive_int, default=512, help="query rows sampled for the error")
    add_space_arguments(p)
    p.add_argument(
        "--no-crossover-check",
        action="store_true",
        help="skip timing exact vs approximate attention around the predicted crossover",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--show-model", action="store_true", help="print the symbolic cost model first")
    return p


def settings_from_args(args, parser: argparse.ArgumentParser):
    """The `search.TuneSettings` of the tuner's arguments (usage errors for bad ones)."""
    from .search import TuneSettings

    seq = sorted({n for group in args.seq for n in group})
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    head_dim = args.head_dim
    if args.inputs:
        from .inputs import InputError, load_inputs

        try:
            head = load_inputs(args.inputs, dtype=DTYPES[args.dtype], device=torch.device("cpu"), min_len=max(seq))
        except InputError as e:
            parser.error(f"--inputs: {e}")
        file_dim = head[0].q.shape[-1]
        if head_dim is not None and head_dim != file_dim:
            parser.error(f"--head-dim {head_dim} differs from the inputs' head dim {file_dim}")
        head_dim = file_dim
        heads, batch = head[0].q.shape[1], head[0].q.shape[0]
        del head
    else:
        head_dim = head_dim or 64
        if head_dim < 8 or head_dim % 4:
            parser.error(f"--head-dim must be a multiple of 4 and at least 8 for synthetic inputs, got {head_dim}")
        heads, batch = args.heads, args.batch
    s = TuneSettings(
        seq_lens=seq,
        causal=args.causal,
        dtype=DTYPES[args.dtype],
        head_dim=head_dim,
        heads=heads,
        batch=batch,
        max_error=args.max_error,
        time_budget=args.time_budget,
        cache_path=args.cache or default_tune_cache(),
        inputs_path=args.inputs,
        family=args.family,
        race_rounds=max(args.rounds, 3),
        race_size=args.race_size,
        error_rows=args.error_rows,
        check_crossover=not args.no_crossover_check,
        device=device,
        space=space_from_args(args, parser),
    )
    return s


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--model" or a.startswith("--model=") for a in argv):
        from .calibrate_cli import main as calibrate_model  # per-model calibration

        return calibrate_model(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = settings_from_args(args, parser)

    from .writer import check_writable

    # refuse a cache path we must not write (a directory, a device, someone else's file) or cannot write
    # (an unwritable directory) now, not after the whole tuning run
    try:
        check_writable(settings.cache_path)
    except OSError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1

    from rich.console import Console

    from . import display
    from .search import Tuner
    from .store import CacheWarning
    from .writer import CachePathError

    console = Console(width=None if sys.stdout.isatty() else 160)
    display.header(console, settings)
    if args.show_model:
        display.model(console, settings.causal)
    started = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CacheWarning)
        try:
            with display.RichProgress(console) as progress:
                results, cross = Tuner(settings, progress).run()
        except OSError as e:  # e.g. the path changed while tuning (`record` checks it again)
            from rich.markup import escape

            text = str(e)
            if not isinstance(e, CachePathError):
                text = f"cannot write the tuning cache {settings.cache_path}: {text}"
            console.print(f"[red]error:[/red] {escape(text)}")
            return 1
    for w in caught:
        console.print(f"[yellow]warning:[/yellow] {w.message}")
    for r in results:
        display.trials(console, r)
    display.summary(console, settings, results, cross, time.monotonic() - started)
    return 0
