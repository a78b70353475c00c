"""Choosing per site: the time/error frontier of the measured candidates, the predicted loss effect of each
from the one measured, and the assignment within the budget (a multiple-choice knapsack over sites)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hyper_backend.config import HyperConfig


@dataclass
class Option:
    """A candidate config at one site: time (s), row error, predicted mean loss increase (nats/token)."""

    config: HyperConfig
    time: float
    error: float
    times: list[float] = field(default_factory=list)
    dloss: float | None = None  # the loss increase charged (`predict_from`): what `solve` budgets
    measured: bool = False  # a probe: its effect was measured
    measured_dloss: float | None = None  # a probe's measured effect (signed: a decrease is noise of its size)


@dataclass
class SiteResult:
    """One attention site of the calibrated model: where it runs, whether it can approximate (``status``), what
    was measured there, and the choice (None: exact)."""

    index: int
    layer: int | None
    n: int
    causal: bool
    status: str  # "candidate" | "masked" | "short" | "exact-only"
    reason: str = ""
    exact_time: float = 0.0
    options: list[Option] = field(default_factory=list)  # the time/error frontier, fastest first
    probe: Option | None = None  # measured: the most accurate option that saves 10% of the exact time
    fast_probe: Option | None = None  # measured: the fastest option, when it is not the probe
    screened: int = 0
    default_time: float | None = None  # the default HyperConfig at this site (as HYPER_LAYERS=all)
    default_error: float | None = None
    choice: Option | None = None  # None: exact
    module: str = ""  # the path of the module whose forward made the call, from the body

    @property
    def chosen_time(self) -> float:
        return self.choice.time if self.choice is not None else self.exact_time


def frontier(options: list[Option]) -> list[Option]:
    """The options no other is both faster and more accurate than, fastest first."""
    best: list[Option] = []
    for o in sorted(options, key=lambda o: (o.time, o.error)):
        if not best or o.error < best[-1].error:
            best.append(o)
    return best


def predict(probe: Option, error: float) -> float:
    """Loss increase of a config with row error ``error`` at a site whose probe measured ``probe.dloss``:
    scaled by the squared error ratio above the probe's error, by the ratio itself below it. A measured
    decrease counts as an increase of the same size (a loss that fell by chance is noise of that size, not a
    free site)."""
    d = abs(probe.dloss)
    if probe.error <= 0:
        return d
    ratio = error / probe.error
    return d * (ratio**2 if ratio >= 1 else ratio)


def predict_from(probes: list[Option], option: Option) -> float:
    """The loss increase charged for ``option`` at a site with these measured ``probes``: the largest of their
    predictions (`predict`), so a probe whose effect is lost in noise does not make the configs near it look
    free. A probe's own measurement stands, unless a more accurate probe's effect, scaled up to its error, is
    larger: no config is charged less than a more accurate one predicts (a very wrong config can lower the
    loss of one window by chance)."""
    used = [p for p in probes if not option.measured or p is option or p.error <= option.error]
    return max(predict(p, option.error) for p in used)


def solve(sites: list[SiteResult], allowed: float, scale: float = 1.0) -> dict[int, Option]:
    """Per site one option or exact, minimising total time with ``scale * sum(dloss) <= allowed``: dynamic
    programming over the budget in 2000 steps (a multiple-choice knapsack). Returns site -> chosen option."""
    units = 2000
    cand = [s for s in sites if s.status == "candidate"]
    if allowed <= 0 or not cand:
        return {}
    # dp[u] = (time saved, choices) with u budget units spent
    dp: dict[int, tuple[float, dict[int, Option]]] = {0: (0.0, {})}
    for s in cand:
        nxt = dict(dp)
        for o in s.options:
            if o.dloss is None or o.time >= s.exact_time:
                continue
            cost = math.ceil(abs(o.dloss) * scale / allowed * units - 1e-9)
            if cost > units:
                continue
            saved = s.exact_time - o.time
            for u, (gain, picks) in dp.items():
                v = u + cost
                if v > units:
                    continue
                g = gain + saved
                if v not in nxt or nxt[v][0] < g:
                    nxt[v] = (g, {**picks, s.index: o})
        dp = nxt
    return max(dp.values(), key=lambda x: x[0])[1]
