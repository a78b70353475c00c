"""`explain`: what the hyper backend does to each attention site of a model, as a table.

A lowered site calls ``torch.ops.hyper.attention``, and the op decides at run time, for each call's actual
length, whether to approximate: a site shown as lowered may still run exact (below ``min_seq_len``, which may
come from the tuning cache). `explain` therefore also records every op call of its run, and shows the op's own
decision with the length and the threshold that made it (column "at run time").
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hyper_backend.backend import Session, compile_graph
from hyper_backend.config import FIELDS
from hyper_backend.lowering.sites import Site
from hyper_backend.settings import Settings, resolve_settings


@dataclass
class Report:
    """``sites``: one `Site` per attention site, in execution order (name, kind, decision, reason, ...)."""

    sites: list[Site] = field(default_factory=list)
    settings: Settings | None = None
    graphs: int = 0
    tuning: list[str] = field(default_factory=list)  # the autotuner entries the run used (one line each)
    runtime: dict[int, RunTime] = field(default_factory=dict)  # site index -> the op's decision in the run
    configs: dict[int, str] = field(default_factory=dict)  # site index -> its config and where it came from

    def config_of(self, site: Site) -> str:
        """Where a site's parameters come from and what they are: ``auto: tuned for this model at 8k: b=...``
        (``layers="auto"``), else the explicit fields (options / ``HYPER_*``) and what the op resolves at run
        time for the rest (the tuning cache's entry for the length, else the defaults)."""
        if site.index in self.configs:
            return self.configs[site.index]
        if site.decision != "hyper":
            return ""
        explicit = dict(self.settings.explicit) if self.settings is not None else {}
        if not explicit:
            return "tuning cache, else defaults"
        shown = ", ".join(f"{k}={v}" for k, v in explicit.items())
        return f"options/env: {shown}" + ("" if len(explicit) == len(FIELDS) else "; rest: tuning cache, else defaults")

    @property
    def rewritten(self) -> int:
        return sum(s.decision == "hyper" for s in self.sites)

    @property
    def windowed(self) -> int:
        """Sites served by the exact ``hyper::window_attention`` (banded masks)."""
        return sum(s.decision == "window" for s in self.sites)

    @property
    def approximated(self) -> int:
        """Lowered sites whose op calls approximated in the run (the rest ran exact at that length)."""
        return sum(r.decision == "hyper" for r in self.runtime.values())

    def table(self):
        from rich.markup import escape
        from rich.table import Table

        title = f"hyper backend: {self.rewritten}/{len(self.sites)} attention sites lowered"
        if self.windowed:
            title += f", {self.windowed} on the exact window op"
        if self.runtime:
            title += f", {self.approximated} approximate at run time"
        if self.graphs > 1:
            title += f" ({self.graphs} graphs)"
        t = Table(title=title)
        columns = [("#", "dim"), ("site", ""), ("kind", "cyan"), ("decision", ""), ("reason", "dim"), ("config", "")]
        if self.runtime:
            columns.append(("at run time", ""))
        for col, style in columns:
            t.add_column(col, style=style or None, overflow="fold")
        for s in self.sites:
            colour = {"hyper": "green", "window": "blue"}.get(s.decision, "yellow")
            row = [
                str(s.index),
                s.name,
                s.kind,
                f"[{colour}]{s.decision}[/{colour}]",
                s.reason,
                escape(self.config_of(s)),
            ]
            if self.runtime:
                r = self.runtime.get(s.index)
                row.append("" if r is None else r.text())
            t.add_row(*row)
        if self.tuning:
            t.caption = "tuned: " + "; ".join(self.tuning)
        return t

    def __rich__(self):
        return self.table()

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=220, record=True, file=io.StringIO())  # recorded, not shown; wide: six columns
        console.print(self.table())
        return console.export_text()


def explain(model, *args, options: Mapping[str, Any] | None = None, dynamic: bool | None = None, **kwargs) -> Report:
    """Compile ``model`` with the hyper backend, run it once on ``*args, **kwargs`` (without grad) and report.

    Args:
        model: an ``nn.Module`` or function.
        options: backend options as for ``torch.compile(..., backend="hyper", options=...)``.
        dynamic: passed to ``torch.compile``.

    The compile bypasses inductor's FX-graph and AOTAutograd caches, so every decision is made (and seen)
    now. Site numbers start at 0 for this call. ``Report.runtime`` holds, per lowered site, the decision the op
    made for these inputs (`RunTime`).
    """
    settings = resolve_settings(options)
    session = Session()
    graphs: list[tuple] = []  # (lowered sites of one compiled graph in index order, op calls of its runs)
    lookups: list[dict] = []  # the tuning group and length of every op call

    def backend(gm, example_inputs):
        before = {id(s) for s in session.sites.values()}
        compiled = compile_graph(gm, example_inputs, settings, session)
        lowered = sorted(
            (s for s in session.sites.values() if id(s) not in before and s.decision == "hyper"), key=lambda s: s.index
        )
        if not lowered:
            return compiled
        calls: list[RunTime] = []
        graphs.append((lowered, calls))

        def run(*inputs):
            with _OpCalls(settings, calls, lookups):
                return compiled(*inputs)

        return run

    with (
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
        torch.no_grad(),
    ):
        torch.compile(model, backend=backend, dynamic=dynamic)(*args, **kwargs)
    runtime = {}
    for lowered, calls in graphs:
        runtime.update(_match(lowered, calls))
    return Report(
        sorted(session.sites.values(), key=lambda s: s.index),
        settings,
        session.graphs,
        _tuning_lines(settings, lookups),
        runtime,
        dict(session.configs),
    )


# ----------------------------------------------------------------------------------------------------------
# the op's run-time decisions
# ----------------------------------------------------------------------------------------------------------


@dataclass
class RunTime:
    """One ``hyper::attention`` call as the op decided it: ``decision`` is ``"hyper"`` or ``"exact"``;
    ``min_seq_len`` the threshold the op used and ``source`` where it came from (``"explicit"``: options or
    ``HYPER_*``; ``"tuned"``: the tuning cache; ``"default"``). ``calls``: how many calls agree (a graph run
    several times, or shared by repeated modules, calls each site once per run)."""

    decision: str
    n_q: int
    n_k: int
    causal: bool
    min_seq_len: int
    source: str
    calls: int = 1
    of: int = 1
    plan: str = ""  # the call's `plan.CallPlan`, described, and the config it runs
    why_exact: str = ""  # above the threshold, what keeps the call exact

    def text(self) -> str:
        n = f"n={self.n_q}" if self.n_q == self.n_k else f"n_q={self.n_q}, n_k={self.n_k}"
        above = min(self.n_q, self.n_k) >= self.min_seq_len
        line = f"{self.decision}: {n} {'>=' if above else '<'} min_seq_len {self.min_seq_len} ({self.source})"
        if self.decision == "exact" and above:
            line += self.why_exact
        if self.plan:
            line += f" ({self.plan})"
        colour = "green" if self.decision == "hyper" else "yellow"
        more = "" if self.of == 1 else f" in {self.calls} of {self.of} calls"
        return f"[{colour}]{line}[/{colour}]{more}"


def _min_seq_len(settings: Settings, bound: dict):
    """The threshold of one recorded op call (its arguments by name), and where it came from: the op's decision is
    a function of its arguments, so it is recomputed from them."""
    from hyper_backend.config import OpSettings
    from hyper_backend.kernels.op import call_config

    q, k = bound["query"], bound["key"]
    config = call_config(OpSettings.decode(bound["settings"]), q.shape[2], k.shape[2])
    resolved = config.min_len
    if "min_seq_len" in dict(settings.explicit):
        return resolved, "explicit"
    entry = _tuned_entry(settings, q, bool(bound["is_causal"]), k.shape[2])
    if entry is not None and entry["params"].get("min_seq_len") == resolved:
        return resolved, "tuned" if entry["source"] == "entry" else "tuned device default"
    return resolved, "default"


def _tuned_entry(settings: Settings, q, causal: bool, n_k: int) -> dict | None:
    """The tuning cache's entry for a call (`describe_entry`), or None."""
    if not settings.tune_cache:
        return None
    from hyper_backend.autotune.store import describe_entry

    return describe_entry(
        settings.tune_cache,
        device=q.device,
        dtype=q.dtype,
        head_dim=q.shape[-1],
        causal=causal,
        seq_len=max(q.shape[2], n_k),
    )


class _OpCalls(TorchDispatchMode):
    """While a compiled graph runs: records each ``hyper::attention`` call and the decision the op made."""

    def __init__(self, settings: Settings, calls: list[RunTime], lookups: list[dict]):
        super().__init__()
        self.settings, self.calls, self.lookups = settings, calls, lookups

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.ops.hyper.attention.default:
            return func(*args, **kwargs)
        from hyper_backend.config import OpSettings
        from hyper_backend.kernels.op import call_config
        from hyper_backend.kernels.plan import plan_call

        bound = {**dict(zip((a.name for a in func._schema.arguments), args)), **kwargs}
        q, k, causal = bound["query"], bound["key"], bool(bound["is_causal"])
        nq, nk = q.shape[2], k.shape[2]
        config = call_config(OpSettings.decode(bound["settings"]), nq, nk)
        plan = plan_call(nq, nk, causal, config)
        decision = "hyper" if plan.approximates else "exact"
        threshold, source = _min_seq_len(self.settings, bound)
        text = f"{config.label()}: {plan.describe()}" if plan.approximates else ""
        if config.detector == "lsh":
            why = ", but the causal quadrants are shorter" if causal else ", but one block holds every key"
        else:
            why = ", but no query block sees more than top_k keys"
        self.calls.append(RunTime(decision, nq, nk, causal, threshold, source, plan=text, why_exact=why))
        self.lookups.append(
            dict(device=q.device, dtype=q.dtype, head_dim=q.shape[-1], causal=causal, seq_len=max(nq, nk))
        )
        return func(*args, **kwargs)


def _match(lowered: list[Site], calls: list[RunTime]) -> dict[int, RunTime]:
    """Site index -> its run-time decision. A graph calls the op once per lowered site per run, in site order;
    a count that does not fit (a graph that did not run) leaves its sites without one."""
    if not calls or len(calls) % len(lowered):
        return {}
    out = {}
    for j, site in enumerate(lowered):
        mine = calls[j :: len(lowered)]
        first = mine[0]
        same = [c for c in mine if c.decision == first.decision]
        out[site.index] = dataclasses.replace(first, calls=len(same), of=len(mine))
    return out


def _tuning_lines(settings: Settings, lookups: list[dict]) -> list[str]:
    """One line per distinct tuned entry the run's op calls were resolved from (``describe_entry``)."""
    if not settings.tune_cache or len(settings.explicit) == len(FIELDS):  # nothing left to tune
        return []
    from hyper_backend.autotune.store import describe_entry

    lines = []
    for where in lookups:
        entry = describe_entry(settings.tune_cache, **where)
        if entry is not None and entry["summary"] not in lines:
            lines.append(entry["summary"])
    return lines


class _Collector(logging.Handler):
    def __init__(self, report: Report):
        super().__init__(logging.INFO)
        self.report = report

    def emit(self, record: logging.LogRecord) -> None:
        site = getattr(record, "hyper_site", None)
        if site is not None:
            self.report.sites = [s for s in self.report.sites if s.index != site.index or s.graph != site.graph]
            self.report.sites.append(site)
            self.report.sites.sort(key=lambda s: s.index)
            self.report.graphs = max(self.report.graphs, site.graph + 1)


@contextlib.contextmanager
def collect():
    """Gather the sites decided by ``backend="hyper"`` compiles inside the block into a `Report`.

    Unlike `explain` this adds no compile: it listens to the compile-time log of the ``hyper_backend`` logger.
    """
    logger = logging.getLogger("hyper_backend")
    report = Report()
    handler = _Collector(report)
    level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield report
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
