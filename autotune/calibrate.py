"""Per-model calibration: which attention sites of a model run HyperAttention, with which config, and which
stay exact, so that the model's perplexity rises by at most a budget.

    python -m hyper_backend.autotune --model PATH --text FILE|kjv --seq 8192 --budget 0.01

Steps, on one window of ``--seq`` tokens (``--offset``: where in the text) and a held-out window
(``--verify-offset``):

1. **capture**: one exact forward; the Q/K/V of every SDPA call (a *site*, numbered in call order as the
   backend numbers them), the hidden state entering every decoder layer, and the exact per-token loss;
2. **sites that cannot approximate** are reported, not timed: an explicit mask (Gemma's sliding-window layers;
   the lowering never approximates those), dropout, ``is_causal`` with ``n_q != n_k``, or a length at which no
   candidate of the grid approximates (below ``--min-seq-len``);
3. **per site, every candidate** of the grid (block size, samples, LSH projections, ``min_seq_len``, causal
   depth, sinks, local window, residual; deduplicated by what it computes at this length) runs once on the captured
   Q/K/V: its time and its relative error on sampled query rows (`measure.reference`); the candidates on the
   time/error frontier are timed again (median of ``repeats`` runs in all) and so is exact attention;
4. **loss effect, measured**: per site, two probes, each swapped in alone with the model run from that site's
   layer on (the layers before it replay their captured output, so a late site costs a few layers, not a
   forward): the most accurate frontier candidate that still saves 10% of the site's exact time, and the fastest
   one. The loss change of the other candidates is predicted from each probe by the squared error ratio (the
   error ratio alone when the candidate is the more accurate: both directions err high), and the larger of the
   two predictions is taken: one probe whose effect is lost in noise (an accurate config at a fragile site) does
   not make the faster configs there look free, and a probe is charged its measurement unless the more accurate
   probe, scaled up, predicts more (`assign.predict_from`);
5. **assignment**: per site the option (a candidate, or exact) minimising total attention time with the
   predicted mean loss increase, summed over sites, at most ``log(1 + budget)`` (a multiple-choice knapsack);
6. **verification**: one real perplexity run of the whole assignment on the held-out window against exact
   attention there (again replaying the layers before the first swapped site). The loss is compared on every
   position whose final hidden state the assignment moved; the others have the exact loss by construction, so
   the change is that of the whole window (``--perplexity`` scores every position, for absolute numbers). If it
   exceeds the budget with several sites approximated, the costliest one is kept exact and the rest are verified
   again; with one left, the predictions are scaled by the observed ratio and the assignment is solved again
   (``--max-verify`` runs at most); if none passes, every site stays exact;
7. `record` writes the verified assignment to the tuning cache (``models`` section, keyed by
   `hyper_backend.autotune.fingerprint.model_fingerprint`, dtype and length bucket, each site with the path of
   its module), where ``layers="auto"`` / ``HYPER_LAYERS=auto`` finds it.

The candidates are `hyper_backend.autotune.grid`'s (the device tuner's grid); the model runs through
`hyper_backend.autotune.replay`; the choice is `hyper_backend.autotune.assign`; the CLI is
`hyper_backend.autotune.calibrate_cli`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from hyper_backend.config import HyperConfig

from . import schema, writer
from .assign import Option, SiteResult, frontier, predict_from, solve
from .grid import Space, grid
from .progress import Progress
from .replay import Runner, run_assignment


@dataclass
class CalibrationSettings:
    """What to calibrate: the length, the perplexity budget, the candidate grid, and how to measure."""

    seq: int
    budget: float = 0.01
    space: Space = field(default_factory=Space)
    error_rows: int = 256
    repeats: int = 3
    probe_stride: int = 4  # the probes' loss on every 4th moved position (verification scores every one)
    perplexity: bool = False  # score every held-out position too, for the absolute perplexities
    max_verify: int = 3


def candidates(n: int, causal: bool, s: CalibrationSettings) -> list[HyperConfig]:
    """The grid at one site's length (`hyper_backend.autotune.grid.grid`, no crossover prediction)."""
    return grid(n, causal, s.space)


@dataclass
class Verification:
    """One verification run: ``dloss`` is the measured mean loss increase per token over the whole held-out
    window (the positions the assignment did not move have the exact loss by construction, so only the moved
    ones are scored); ``ppl_exact``/``ppl`` are the absolute perplexities when every position was scored
    (``CalibrationSettings.perplexity``), else NaN."""

    assignment: dict[int, str]
    predicted: float  # relative perplexity change predicted
    dloss: float
    seconds: float
    ppl_exact: float = float("nan")
    ppl: float = float("nan")

    @property
    def change(self) -> float:
        """The verified relative perplexity change."""
        return math.expm1(self.dloss)


@dataclass
class Calibration:
    settings: CalibrationSettings
    sites: list[SiteResult]
    num_sites: int
    ppl_calib: float
    verifications: list[Verification]
    passed: bool
    seconds: float
    phases: dict[str, float]

    @property
    def assignment(self) -> dict[int, HyperConfig]:
        return {s.index: s.choice.config for s in self.sites if s.choice is not None}

    def attention_times(self) -> dict[str, float]:
        """Seconds per forward of the approximable sites: all exact, the default config on all of them (as
        ``HYPER_LAYERS=all``), and the calibrated assignment."""
        cand = [s for s in self.sites if s.status == "candidate"]
        return {
            "exact": sum(s.exact_time for s in cand),
            "default_all": sum(s.default_time for s in cand)
            if all(s.default_time is not None for s in cand)
            else float("nan"),
            "assignment": sum(s.chosen_time for s in cand),
        }


def _site_status(call, s: CalibrationSettings) -> tuple[str, str]:
    q, k = call.query, call.key
    if call.attn_mask is not None:
        return (
            "masked",
            "explicit attn_mask: not approximated (a sliding window runs exactly on hyper::window_attention)",
        )
    if call.dropout_p and call.dropout_p > 0:
        return "exact-only", f"dropout_p={call.dropout_p}: kept exact"
    if call.is_causal and q.shape[2] != k.shape[2]:
        return "exact-only", "is_causal with n_q != n_k: kept exact"
    if not candidates(k.shape[2], bool(call.is_causal), s):
        return "short", f"n={k.shape[2]}: no candidate approximates below min_seq_len {s.space.min_seq_len}" + (
            " (causal: a quadrant of n/2)" if call.is_causal else ""
        )
    return "candidate", ""


def _time(fn, repeats: int) -> tuple[float, list[float]]:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2], ts


def measure_site(
    sample, causal: bool, s: CalibrationSettings, progress: Progress
) -> tuple[float, list[Option], int, Option | None]:
    """``(exact time, frontier, candidates screened, the default config's option)`` of one captured site."""
    from . import measure

    refs = [measure.reference(sample, causal, s.error_rows, seed=s.space.seed)]
    with torch.no_grad():
        exact_t, _ = _time(lambda: measure.run_exact(sample, causal), s.repeats)
        cands = candidates(sample.q.shape[2], causal, s)
        default = HyperConfig(seed=s.space.seed)  # what HYPER_LAYERS=all runs without other settings
        progress.steps(f"n={sample.q.shape[2]}: {len(cands)} candidates", len(cands) + 1)
        screened = []
        for c in cands + [default]:
            holder = {}
            t, ts = _time(lambda holder=holder, c=c: holder.setdefault("out", measure.run_hyper(sample, causal, c)), 1)
            screened.append(Option(c, t, measure.row_error([holder["out"]], refs), ts))
            progress.advance()
        default_opt = screened.pop()
        front = frontier(screened)
        for o in front + [default_opt]:
            t, ts = _time(lambda o=o: measure.run_hyper(sample, causal, o.config), max(1, s.repeats - 1))
            o.times += ts
            o.time = sorted(o.times)[len(o.times) // 2]
        front = frontier(front)
    return exact_t, front, len(cands), default_opt


def calibrate(
    model,
    calib_ids: torch.Tensor,
    verify_ids: torch.Tensor,
    settings: CalibrationSettings,
    progress: Progress | None = None,
    chunk: int = 512,
) -> Calibration:
    """Calibrate ``model`` on the ``[1, N]`` window ``calib_ids`` and verify on ``verify_ids`` (see the module
    docstring). Writes nothing; `record` stores the result."""
    from hyper_backend.capture import resolved_scale

    from .inputs import Sample

    progress = progress or Progress()
    started = time.perf_counter()
    phases: dict[str, float] = {}
    runner = Runner(model, chunk)
    s = settings
    allowed = math.log1p(s.budget)

    # 1-2. capture
    progress.phase("exact forward on the calibration window: capturing Q/K/V of every site")
    t0 = time.perf_counter()
    sites: list[SiteResult] = []
    samples: dict[int, object] = {}

    def capture(call):
        status, reason = _site_status(call, s)
        sites.append(SiteResult(call.index, None, call.key.shape[2], bool(call.is_causal), status, reason))
        if status == "candidate":
            samples[call.index] = Sample(
                *(x.detach().contiguous().clone() for x in (call.query, call.key, call.value)),
                scale=resolved_scale(call),
                name=f"site {call.index}",
            )
        return None

    exact = runner.run(calib_ids, capture, record=True, loss=False)
    for site in sites:
        site.layer = exact.site_layers.get(site.index)
        site.module = exact.site_modules.get(site.index, "")
    num_sites = len(sites)
    phases["capture"] = time.perf_counter() - t0

    # 3. candidates per site
    t0 = time.perf_counter()
    for site in sites:
        if site.status != "candidate":
            continue
        progress.phase(f"site {site.index}: timing candidates")
        site.exact_time, site.options, site.screened, default_opt = measure_site(
            samples[site.index], site.causal, s, progress
        )
        site.default_time, site.default_error = default_opt.time, default_opt.error
        # the probes: the most accurate frontier option that still saves 10% of the site's exact time (the
        # option a tight budget needs) and the fastest (the one a loose budget takes); the others are predicted
        # from both, erring high
        saving = [o for o in site.options if o.time <= 0.9 * site.exact_time]
        site.probe = min(saving, key=lambda o: o.error) if saving else site.options[0]
        site.fast_probe = site.options[0] if site.options[0] is not site.probe else None
    phases["candidates"] = time.perf_counter() - t0

    # 4. measured loss effect of each site's probes, each alone
    t0 = time.perf_counter()
    for site in sites:
        if site.status != "candidate":
            continue
        probes = [p for p in (site.probe, site.fast_probe) if p is not None]
        for p in probes:
            progress.phase(f"site {site.index}: loss effect of {p.config.label()} alone")
            got = run_assignment(runner, calib_ids, exact, {site.index: p.config})
            p.dloss = p.measured_dloss = runner.delta(got, exact, s.probe_stride)
            p.measured = True
        charged = [predict_from(probes, o) for o in site.options]  # from the measurements, before any is replaced
        for o, d in zip(site.options, charged):
            o.dloss = d
    phases["loss effect"] = time.perf_counter() - t0

    # 5-6. assign, verify, tighten
    t0 = time.perf_counter()
    progress.phase("exact forward on the verification window")
    exact_v = runner.run(verify_ids, record=True, loss=s.perplexity)
    phases["verify exact"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    verifications: list[Verification] = []
    scale, passed, picks = 1.0, False, {}
    tried = set()
    for attempt in range(s.max_verify):
        picks = solve(sites, allowed, scale)
        if not picks:
            passed = True  # every site exact: the exact model, nothing to verify
            break
        key = tuple(sorted((i, o.config) for i, o in picks.items()))
        if key in tried:  # scaling did not change the plan: drop its costliest site
            worst = max(picks, key=lambda i: abs(picks[i].dloss))
            for site in sites:
                if site.index == worst:
                    site.status = "exact-only"
                    site.reason = "verification failed with it approximated"
            continue
        tried.add(key)
        predicted = math.expm1(sum(abs(o.dloss) for o in picks.values()) * scale)
        progress.phase(
            f"verification {attempt + 1}: sites {','.join(map(str, sorted(picks)))} on the held-out "
            f"window (predicted {100 * predicted:+.2f}%)"
        )
        got = run_assignment(runner, verify_ids, exact_v, {i: o.config for i, o in picks.items()})
        observed = runner.delta(got, exact_v)  # every moved position scored
        v = Verification({i: o.config.label() for i, o in picks.items()}, predicted, observed, got.seconds)
        if s.perplexity:
            v.ppl_exact = math.exp(float(exact_v.nll.mean()))
            v.ppl = v.ppl_exact * math.exp(observed)
        verifications.append(v)
        if observed <= allowed:
            passed = True
            break
        if len(picks) > 1:
            # sites are not equally sensitive on held-out text: keep the costliest one exact and retry the rest
            # as they were, before tightening every site at once (which also drops the cheap ones)
            worst = max(picks, key=lambda i: abs(picks[i].dloss))
            for site in sites:
                if site.index == worst:
                    site.status = "exact-only"
                    site.reason = "verification failed with it approximated (the costliest site of the assignment)"
            continue
        pred_log = sum(abs(o.dloss) for o in picks.values()) * scale
        scale *= 1.25 * observed / max(pred_log, 1e-12)
    if not passed:
        picks = {}  # no assignment passed: every site stays exact
    for site in sites:
        site.choice = picks.get(site.index)
    phases["verify"] = time.perf_counter() - t0
    known = exact.nll[~torch.isnan(exact.nll)]
    ppl_calib = math.exp(float(known.mean())) if known.numel() else float("nan")  # of the positions scored
    return Calibration(s, sites, num_sites, ppl_calib, verifications, passed, time.perf_counter() - started, phases)


def exact_reason(site: SiteResult, result: Calibration) -> str:
    """Why a site that could approximate stays exact."""
    if site.reason:
        return site.reason
    if not any(o.time < site.exact_time for o in site.options):
        return "no candidate faster than exact at this length"
    if not result.passed:
        return "no assignment passed verification: every site exact"
    return (
        f"over budget: its fastest candidates cost more loss than the {100 * result.settings.budget:g}% budget allows"
    )


def record(path: str, model, result: Calibration, dtype: torch.dtype, extra: dict | None = None) -> dict:
    """Write the calibration to the tuning cache's ``models`` section. Returns the record."""
    sites = {}
    for site in result.sites:
        info = {"n": site.n, "layer": site.layer}
        if site.choice is not None:
            info.update(
                params=site.choice.config.as_dict(),
                time_s=site.choice.time,
                error=site.choice.error,
                exact_s=site.exact_time,
                predicted_dloss=site.choice.dloss,
            )
        elif site.status == "candidate":
            info.update(exact=exact_reason(site, result), exact_s=site.exact_time)
        else:
            info.update(exact=site.reason)
        sites[site.index] = info
    times = result.attention_times()
    calibrated = {
        "budget": result.settings.budget,
        "seq": result.settings.seq,
        "device": schema.device_key("cpu"),
        "ppl_calibration_exact_scored": result.ppl_calib,
        "seconds": result.seconds,
        "verifications": [
            {
                "sites": {str(k): v for k, v in x.assignment.items()},
                "predicted": x.predicted,
                "ppl_exact": None if math.isnan(x.ppl_exact) else x.ppl_exact,
                "ppl": None if math.isnan(x.ppl) else x.ppl,
                "change": x.change,
            }
            for x in result.verifications
        ],
        "passed": result.passed,
        "attention_s": times,
        **(extra or {}),
    }
    entry = schema.make_model(
        config=model.config,
        num_sites=result.num_sites,
        dtype=schema.dtype_name(dtype),
        seq_len=result.settings.seq,
        sites=sites,
        modules={site.index: site.module for site in result.sites},
        model_type=getattr(model.config, "model_type", ""),
        calibrated=calibrated,
    )
    writer.record(path, models=[entry])
    return entry
