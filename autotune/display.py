"""Rich output of the autotuner: the stamp, live progress, the trials with predicted beside measured times,
and the final table (config, time, error, speed against exact and against the default config)."""

from __future__ import annotations

import math
import os
import time

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

import hyper_backend

from . import cost, measure, schema
from .calibrate import exact_reason
from .progress import Progress as _Protocol
from .progress import duration
from .search import Contender, CrossoverResult, LengthResult, TuneSettings

_s = duration


def header(console: Console, s: TuneSettings) -> None:
    console.print(
        f"[bold]hyper_backend {hyper_backend.__version__} autotune[/bold] on "
        f"{schema.device_key(s.device)} (torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} cores; other processes running at the same time slow and scatter timings)"
    )
    budget = "auto (the default config's own error)" if s.max_error is None else f"{s.max_error:g}"
    inputs = s.inputs_path or f"synthetic '{s.family}'"
    console.print(
        f"lengths {s.seq_lens}, {'causal' if s.causal else 'non-causal'}, {schema.dtype_name(s.dtype)}, "
        f"head dim {s.head_dim}, batch {s.batch} x heads {s.heads}, inputs {inputs}, "
        f"max error {budget}, time budget {s.time_budget:g} s, cache {s.cache_path}"
    )


def model(console: Console, causal: bool) -> None:
    t = Table(title=f"cost model ({'causal' if causal else 'non-causal'}, per batch-head)")
    t.add_column("quantity")
    t.add_column("expression (n length, d head dim, b block, m samples, r LSH projections, s element bytes)")
    for k, v in cost.describe(causal).items():
        t.add_row(k, v)
    console.print(t)


class RichProgress(_Protocol):
    """`hyper_backend.autotune.progress.Progress` with rich: a timestamped line per phase and note, a spinner for
    the phase and a bar over a counted stage's steps."""

    def __init__(self, console: Console):
        self.console = console
        # transient: the bar is gone once the run ends, so the final tables are not followed by a stale
        # "race 0/63" line; on a pipe rich draws no bar and the logged lines carry the story
        self.bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.task = None

    def __enter__(self):
        self.bar.__enter__()
        self.task = self.bar.add_task("starting", total=None)
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def note(self, text: str) -> None:
        """A timestamped line (without rich's ``file.py:line`` suffix, which points into this module)."""
        self.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {text}")

    def phase(self, text: str) -> None:
        self.note(text)
        self.bar.update(self.task, description=text, total=None, completed=0)

    def steps(self, text: str, total: int) -> None:
        self.bar.update(self.task, description=text, total=total, completed=0)

    def advance(self) -> None:
        self.bar.advance(self.task)


def _label(c: Contender) -> str:
    return "exact attention (SDPA)" if c.candidate is None else c.candidate.label()


def trials(console: Console, r: LengthResult) -> None:
    t = Table(
        title=f"n={r.seq_len}: screening (one run each, seed 0; model prediction beside measurement; "
        f"vs default: against the default re-timed around it)"
    )
    for col in ("config", "predicted", "measured", "predicted vs default", "measured vs default", "error", "status"):
        t.add_column(col, justify="right" if col not in ("config", "status") else "left")
    for x in sorted((x for x in r.trials if x.score is not None), key=lambda x: x.ratio):
        t.add_row(
            x.candidate.label(),
            _s(x.predicted),
            _s(x.time),
            f"{x.predicted_ratio:.2f}",
            f"{x.ratio:.2f}",
            f"{x.score.error:.3f}",
            x.status,
        )
    console.print(t)
    counts = {}
    for x in r.trials:
        if x.score is None:
            counts[x.status] = counts.get(x.status, 0) + 1
    if counts:
        console.print("not run: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    t = Table(title=f"n={r.seq_len}: race (alternating rounds; errors pooled over seeds; budget {r.max_error:.3f})")
    for col in ("", "config", "predicted", "rounds", "median time", "spread", "vs default", "error", "status"):
        t.add_column(col, justify="left" if col in ("", "config", "status") else "right")
    for c in r.race:
        t.add_row(
            c.name,
            _label(c),
            _s(c.predicted),
            str(len(c.rounds)),
            _s(c.time),
            f"±{measure.spread(c.rounds) * 100:.0f}%" if c.rounds else "-",
            f"{c.ratio:.2f}" if c.ratios else "-",
            f"{c.score.error:.3f}",
            c.status,
        )
    console.print(t)


def summary(
    console: Console, s: TuneSettings, results: list[LengthResult], cross: CrossoverResult | None, elapsed: float
) -> None:
    t = Table(title="result (times: medians over the race rounds; vs default: median of per-round ratios)")
    for col in ("n", "choice", "config", "time", "error", "budget", "vs exact", "vs default"):
        t.add_column(col, justify="left" if col in ("choice", "config") else "right")
    for r in results:
        d, w = r.default, r.winner
        budget = f"{r.max_error:.3f}" + (" auto" if r.budget_auto else "")
        exact_note = " (extrapolated)" if r.exact_extrapolated else ""
        choice = (
            "exact" if w.candidate is None or "block_size" not in r.params else ("default wins" if w is d else "tuned")
        )
        rows = [
            (
                choice,
                _label(w) if "block_size" in r.params else f"min_seq_len={r.params['min_seq_len']}",
                w.time,
                w.score.error,
                w.ratio,
            )
        ]
        if w is not d:
            rows.append(("default", _label(d), d.time, d.score.error, 1.0))
        rows.append(("exact" + exact_note, "SDPA", r.exact_time, 0.0, r.exact_time / d.time))
        for name, label, secs, err, ratio in rows:
            t.add_row(
                str(r.seq_len),
                name,
                label,
                _s(secs),
                f"{err:.3f}",
                budget,
                f"{r.exact_time / secs:.1f}x",
                f"{1 / ratio:.2f}x",
            )
    console.print(t)
    if cross is not None and cross.probes:
        c = Table(title="crossover probes: non-causal exact vs HyperAttention (predictions scaled to the probes)")
        for col in ("n", "exact measured", "exact predicted", "hyper measured", "hyper predicted"):
            c.add_column(col, justify="right")
        for x, ex, hy, pe, ph in cross.probes:
            c.add_row(str(x), _s(ex), _s(pe), _s(hy), _s(ph))
        console.print(c)
        if cross.measured is not None:
            console.print(f"approximate attention measured faster from n={cross.measured} among the probes")
    if cross is not None and cross.predicted is not None:
        console.print(
            f"device default min_seq_len = {cross.predicted}: the crossover predicted for the chosen "
            f"block and sample sizes"
        )
    console.print(
        f"wrote {s.cache_path} in {elapsed:.0f} s; the hyper backend reads it when a graph compiles, "
        f"hyper_attention when it is called (explicit config, options and HYPER_* variables still win)"
    )


# ----------------------------------------------------------------------------------------------------------
# the per-model calibration (python -m hyper_backend.autotune --model ...)
# ----------------------------------------------------------------------------------------------------------


def _spans(indices) -> str:
    """``[0, 1, 2, 4]`` -> ``0-2,4``."""
    from hyper_backend.config import LayerSelection

    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in LayerSelection("set", indices=indices).ranges)


def calibration_table(result) -> Table:
    """One row per attention site: status, the chosen config or why exact, error, measured/predicted loss
    effect, time against exact and against the default config."""
    s = result.settings
    t = Table(
        title=f"calibration at {schema.length_text(s.seq)}, budget {100 * s.budget:+.2f}% perplexity: "
        f"{sum(x.choice is not None for x in result.sites)}/{len(result.sites)} sites on HyperAttention"
    )
    for col in (
        "site",
        "layer",
        "status",
        "choice",
        "row error",
        "loss effect",
        "time",
        "exact",
        "default cfg",
        "probes (measured)",
    ):
        t.add_column(col, overflow="fold")
    skipped = {}  # sites that cannot approximate, one row per (status, reason)
    for x in result.sites:
        if x.status != "candidate":
            skipped.setdefault((x.status, x.reason), []).append(x)
    for (status, reason), xs in skipped.items():
        layers = [x.layer for x in xs if x.layer is not None]
        t.add_row(
            _spans([x.index for x in xs]),
            _spans(layers) if layers else "-",
            status,
            f"[dim]{reason}[/dim]",
            "",
            "",
            "",
            "",
            "",
            "",
        )
    for x in result.sites:
        if x.status != "candidate":
            continue
        c = x.choice
        probe = "; ".join(
            f"{p.config.label()}: err {p.error:.3f}, {100 * math.expm1(p.measured_dloss):+.3f}%"
            for p in (x.probe, x.fast_probe)
            if p is not None and p.measured_dloss is not None
        )
        default = "-" if x.default_time is None else f"{_s(x.default_time)}, err {x.default_error:.3f}"
        if c is None:
            why = exact_reason(x, result)
            t.add_row(
                str(x.index),
                str(x.layer),
                "[yellow]exact[/yellow]",
                why,
                "",
                "",
                _s(x.exact_time),
                _s(x.exact_time),
                default,
                probe,
            )
        else:
            how = "measured" if c.measured and c.dloss == abs(c.measured_dloss) else "predicted"
            t.add_row(
                str(x.index),
                str(x.layer),
                "[green]hyper[/green]",
                c.config.label(),
                f"{c.error:.3f}",
                f"{100 * math.expm1(c.dloss):+.3f}% ({how})",
                _s(c.time),
                _s(x.exact_time),
                default,
                probe,
            )
    for i, v in enumerate(result.verifications):
        t.add_row(
            "",
            "",
            f"verify {i + 1}",
            "sites " + ",".join(map(str, sorted(v.assignment))),
            "",
            f"{100 * v.change:+.2f}% (predicted {100 * v.predicted:+.2f}%)",
            "",
            "",
            "",
            "",
        )
    return t
