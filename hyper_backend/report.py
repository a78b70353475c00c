"""`explain`: what the hyper backend does to each attention site of a model, as a table."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional

import torch

from hyper_backend.backend import Session, Settings, compile_graph, resolve_settings
from hyper_backend.lowering.sites import Site


@dataclass
class Report:
    """``sites``: one `Site` per attention site, in execution order (name, kind, decision, reason, ...)."""

    sites: List[Site] = field(default_factory=list)
    settings: Optional[Settings] = None
    graphs: int = 0
    tuning: List[str] = field(default_factory=list)  # the autotuner entries the run used (one line each)

    @property
    def rewritten(self) -> int:
        return sum(s.decision == "hyper" for s in self.sites)

    def table(self):
        from rich.table import Table

        title = f"hyper backend: {self.rewritten}/{len(self.sites)} attention sites lowered"
        if self.graphs > 1:
            title += f" ({self.graphs} graphs)"
        t = Table(title=title)
        for col, style in (("#", "dim"), ("site", ""), ("kind", "cyan"), ("decision", ""), ("reason", "dim")):
            t.add_column(col, style=style or None, overflow="fold")
        for s in self.sites:
            colour = "green" if s.decision == "hyper" else "yellow"
            t.add_row(str(s.index), s.name, s.kind, f"[{colour}]{s.decision}[/{colour}]", s.reason)
        if self.tuning:
            t.caption = "tuned: " + "; ".join(self.tuning)
        return t

    def __rich__(self):
        return self.table()

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=140, record=True, file=open("/dev/null", "w"))
        console.print(self.table())
        return console.export_text()


def explain(model, *args, options: Optional[Mapping[str, Any]] = None, dynamic: Optional[bool] = None,
            **kwargs) -> Report:
    """Compile ``model`` with the hyper backend, run it once on ``*args, **kwargs`` (without grad) and report.

    Args:
        model: an ``nn.Module`` or function.
        options: backend options as for ``torch.compile(..., backend="hyper", options=...)``.
        dynamic: passed to ``torch.compile``.

    The compile bypasses inductor's FX-graph and AOTAutograd caches, so every decision is made (and seen)
    now. Site numbers start at 0 for this call.
    """
    settings = resolve_settings(options)
    session = Session()

    def backend(gm, example_inputs):
        return compile_graph(gm, example_inputs, settings, session)

    from hyper_backend.kernels import op

    op.tuning_lookups = lookups = []
    try:
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False), torch.no_grad():
            torch.compile(model, backend=backend, dynamic=dynamic)(*args, **kwargs)
    finally:
        op.tuning_lookups = None
    return Report(sorted(session.sites.values(), key=lambda s: s.index), settings, session.graphs,
                  _tuning_lines(lookups))


def _tuning_lines(lookups) -> List[str]:
    """One line per distinct tuned entry the op applied during the run (``lookup_tuned``'s provenance)."""
    from hyper_backend.autotune.cache import describe_entry

    lines = []
    for path, where in lookups:
        entry = describe_entry(path, **where)
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
