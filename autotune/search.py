"""The search: candidates ranked by the cost model, screened cheapest first, the best few raced against the
default config in alternating rounds, the fastest one within the error budget written to the cache.

Per length ``n``:

1. inputs (the ``--inputs`` file's first ``n`` positions, or a synthetic family) and the exact outputs of a
   few hundred random query rows (`measure.reference`);
2. the default `HyperConfig` runs twice (seeds 0 and 1); the error budget is ``max_error``, or, when that is
   None (``auto``), the pooled error of the default parameters approximating at this length;
3. exact attention is timed when the model predicts it short, else extrapolated from a timed slice of rows;
4. screening: the candidate grid (`hyper_backend.autotune.grid`, shared with the per-model calibration: block
   size x samples x LSH projections x sinks x window x residual x ``min_seq_len`` near the predicted crossover
   x ``causal_depth``), deduplicated by what it computes at ``n``, is ranked by predicted time and pruned above
   the default's predicted time. Candidates run once, cheapest first. One over 1.25 x the budget also prunes the
   candidates no more accurate than it (smaller blocks and samples, more approximated levels: a heuristic);
5. race: the default, the three fastest screened candidates within 1.25 x budget, and exact attention when it
   was measured competitive, run in alternating rounds (each round sees the same machine load; a new seed
   each round, errors pooled). A contender's speed is the median over rounds of its time divided by the
   default's time in the same round. Contenders over budget, or not faster after three rounds, drop out;
6. the winner is the fastest contender within budget that beats the default by 2% or more; else the default,
   or exact attention if that was faster. Its parameters are written to the cache.

After all lengths, the crossover predicted for the winner's sizes (the model scaled to timings of exact and
approximate attention around it, measured first) becomes the device's default ``min_seq_len``.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass, field, replace

import torch

import hyper_backend
from hyper_backend.config import HyperConfig
from hyper_backend.kernels.plan import next_pow2

from . import cost, measure, schema, writer
from .grid import Space, approximated, approximates, grid, structure
from .inputs import Sample, load_inputs, synthetic
from .measure import Score
from .progress import Progress, duration

DEFAULT = HyperConfig(detector="lsh")  # the tuner searches the LSH estimator's sizes


@dataclass
class TuneSettings:
    """What to tune (the CLI's arguments)."""

    seq_lens: list[int]
    causal: bool = True
    dtype: torch.dtype = torch.float32
    head_dim: int = 64
    heads: int = 1
    batch: int = 1
    max_error: float | None = None  # None: the default parameters' own error at each length
    time_budget: float = 540.0  # seconds for the whole run (setup, screening, race), over all lengths
    cache_path: str = ""
    inputs_path: str | None = None
    family: str = "mixed"
    error_rows: int = 512
    space: Space = field(default_factory=Space)  # the candidate grid's axes
    race_size: int = 3  # contenders besides the default
    race_rounds: int = 7  # at most
    check_crossover: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    seed: int = 0


@dataclass
class Trial:
    """A screened candidate: its predicted time, and its first run (time, error) if it ran."""

    candidate: HyperConfig
    predicted: float
    score: Score | None = None
    status: str = "untimed"  # pass | near | over budget | dominated | predicted slower | out of time
    ratio: float = math.inf  # its time / the default's, timed just before and after (machine load drifts)
    predicted_ratio: float = math.inf

    @property
    def time(self) -> float:
        return self.score.time if self.score else math.inf


@dataclass
class Contender:
    """A configuration in the race (``candidate`` None: exact attention)."""

    name: str
    candidate: HyperConfig | None
    score: Score  # the screening run(s) and every round: errors pooled
    predicted: float
    rounds: list[float] = field(default_factory=list)  # race times
    ratios: list[float] = field(default_factory=list)  # race time / default's time in the same round
    status: str = "racing"

    @property
    def time(self) -> float:
        return measure.median(self.rounds) if self.rounds else math.inf

    @property
    def ratio(self) -> float:
        return measure.median(self.ratios) if self.ratios else math.inf


@dataclass
class LengthResult:
    seq_len: int
    max_error: float
    budget_auto: bool
    exact_time: float
    exact_predicted: float
    exact_extrapolated: bool
    trials: list[Trial]
    race: list[Contender]  # race[0] is the default
    winner: Contender
    params: dict  # written to the cache
    seconds: float
    inputs: str

    @property
    def default(self) -> Contender:
        return self.race[0]


@dataclass
class CrossoverResult:
    predicted: int | None  # by the model scaled to the probes
    probes: list[tuple[int, float, float, float, float]]  # n, exact measured, hyper measured, exact pred, hyper pred
    measured: int | None  # the smallest probe from which approximate attention was faster
    unscaled: int | None  # by the model before the probes


def no_more_accurate(a: HyperConfig, b: HyperConfig, n: int, causal: bool) -> bool:
    """Heuristic order: ``a`` approximates at least where ``b`` does, with blocks and samples no larger."""
    if not (approximates(n, causal, a) and approximates(n, causal, b)) or a.lsh_num_projs != b.lsh_num_projs:
        return False
    if (a.sink_keys, a.local_window, a.residual) != (b.sink_keys, b.local_window, b.residual):
        return False
    if a.block_size > b.block_size or a.draws > b.draws:
        return False
    if causal:
        (leaf_a, sizes_a), (leaf_b, sizes_b) = approximated(n, True, a), approximated(n, True, b)
        return sizes_a >= sizes_b and leaf_a <= leaf_b
    return True


# ----------------------------------------------------------------------------------------------------------
# one length
# ----------------------------------------------------------------------------------------------------------


class Tuner:
    def __init__(self, settings: TuneSettings, progress: Progress | None = None):
        self.s = settings
        self.progress = progress or Progress()
        self.rates: cost.Rates | None = None
        self.fit_points: list[tuple[float, float, float]] = []
        self.elem = torch.empty((), dtype=settings.dtype).element_size()
        self.file_samples: list[Sample] | None = None
        # measured / modelled times near the crossover (`calibrate_crossover`), for exact and approximate calls
        self.exact_scale = self.hyper_scale = 1.0

    # -- model helpers --------------------------------------------------------------------------------------
    def _kw(self):
        return dict(
            head_dim=self.s.head_dim, elem_bytes=self.elem, batch_heads=self.s.batch * self.s.heads, rates=self.rates
        )

    def predict(self, n: int, c: HyperConfig) -> float:
        measure.calibrate(
            self.rates, cost.tile_shapes(n, self.s.causal, c), self.s.head_dim, self.s.dtype, self.s.device
        )
        return cost.predict_time(n, self.s.causal, c, **self._kw())

    def crossover_of(self, c: HyperConfig) -> int:
        """Predicted crossover for ``c``'s sizes (the model, scaled by the probes near the crossover)."""
        measure.calibrate(
            self.rates,
            cost.tile_shapes(1 << 14, False, replace(c, min_seq_len=1)),
            self.s.head_dim,
            self.s.dtype,
            self.s.device,
        )
        found = cost.crossover(c, exact_scale=self.exact_scale, hyper_scale=self.hyper_scale, **self._kw())
        return found if found is not None else 1 << 24

    def predict_exact(self, n: int, causal: bool) -> float:
        return self.exact_scale * sum(cost.exact_parts(n, causal, **self._kw()))

    def _learn(self, n: int, c: HyperConfig, seconds: float) -> None:
        f, o = cost.predict_parts(n, self.s.causal, c, **self._kw())
        self.fit_points.append((f, o, seconds))
        cost.refit(self.rates, self.fit_points)

    # -- inputs ---------------------------------------------------------------------------------------------
    def samples(self, n: int) -> list[Sample]:
        s = self.s
        if s.inputs_path:
            if self.file_samples is None:
                self.file_samples = load_inputs(s.inputs_path, dtype=s.dtype, device=s.device, min_len=max(s.seq_lens))
            return [x.prefix(n) for x in self.file_samples]
        return [
            synthetic(
                s.family,
                n=n,
                head_dim=s.head_dim,
                heads=s.heads,
                batch=s.batch,
                dtype=s.dtype,
                device=s.device,
                seed=s.seed,
            )
        ]

    # -- exact attention time -------------------------------------------------------------------------------
    def exact_time(self, sample: Sample, n: int) -> tuple[float, bool]:
        """Measured when predicted under ~20 s, else extrapolated from the last rows' share of the work."""
        predicted = self.predict_exact(n, self.s.causal)
        dev = self.s.device
        if predicted < 20.0:
            times = [
                measure.time_once(lambda: measure.run_exact(sample, self.s.causal), dev)
                for _ in range(1 if predicted > 5 else 3)
            ]
            return measure.median(times), False
        return self.exact_slice_time(sample, n, repeats=2), True

    def exact_slice_time(self, sample: Sample, n: int, repeats: int) -> float:
        """Exact attention time extrapolated from its last 512 query rows (which see every key)."""
        rows = min(n, 512)
        part = Sample(sample.q[:, :, -rows:], sample.k, sample.v, sample.scale, sample.name)
        times = [measure.time_once(lambda: measure.run_exact(part, False), self.s.device) for _ in range(repeats)]
        share = rows * n / (n * (n + 1) / 2) if self.s.causal else rows / n
        return measure.median(times) / share

    # -- one length -----------------------------------------------------------------------------------------
    def tune_length(self, n: int, until: float) -> LengthResult:
        """Tune length ``n``, finishing by ``until`` (a `time.monotonic` deadline)."""
        s, P = self.s, self.progress
        t_start = time.monotonic()
        P.phase(f"n={n}: inputs and exact reference rows")
        samples = self.samples(n)
        refs = [measure.reference(x, s.causal, s.error_rows, seed=s.seed) for x in samples]
        self.ensure_rates()

        P.phase(f"n={n}: default config")
        default = Contender("default", DEFAULT, Score(), self.predict(n, DEFAULT))
        for seed in (0, 1):
            self._learn(
                n,
                DEFAULT,
                measure.run_and_score(default.score, samples, refs, s.causal, DEFAULT, seed, all_samples=True),
            )
        max_error = s.max_error
        if max_error is None:
            if approximates(n, s.causal, DEFAULT):
                max_error = default.score.error
            else:  # the defaults are exact here: budget = their error if they approximated at this length
                probe = replace(DEFAULT, min_seq_len=_auto_threshold(n, s.causal))
                sc = Score()
                for seed in (0, 1):
                    measure.run_and_score(sc, samples, refs, s.causal, probe, seed, all_samples=True)
                max_error = sc.error

        P.phase(f"n={n}: exact attention")
        exact_pred = self.predict_exact(n, s.causal)
        exact_t, extrapolated = self.exact_time(samples[0], n)

        trials = self._screen(n, samples, refs, max_error, default, exact_t, until)
        race, exact_t = self._race(n, samples, refs, max_error, default, trials, exact_t, extrapolated, until)
        winner = self._winner(race, max_error)
        params = self._params(n, winner)
        return LengthResult(
            n,
            max_error,
            s.max_error is None,
            exact_t,
            exact_pred,
            extrapolated,
            trials,
            race,
            winner,
            params,
            time.monotonic() - t_start,
            samples[0].name,
        )

    def _screen(self, n, samples, refs, max_error, default, exact_t, until) -> list[Trial]:
        s, P = self.s, self.progress
        same_as_default = structure(n, s.causal, DEFAULT)
        candidates = [
            c for c in grid(n, s.causal, s.space, self.crossover_of) if structure(n, s.causal, c) != same_as_default
        ]
        trials = [Trial(c, self.predict(n, c)) for c in candidates]
        trials.sort(key=lambda t: t.predicted)
        # half the remaining time, and at least three race rounds of the default and the contenders, for the race
        now = time.monotonic()
        deadline = min(now + 0.5 * (until - now), until - 3 * (s.race_size + 1) * default.score.time)
        default_ok = approximates(n, s.causal, DEFAULT) and default.score.error <= max_error
        P.steps(f"n={n}: candidates", len(trials))
        failures: list[HyperConfig] = []
        # the default is re-timed before every third candidate; a candidate's ratio is its time over the mean
        # of the default's times just before and just after it
        pending: list[Trial] = []
        last_default = [default.score.times[-1]]

        def time_default() -> None:
            seconds = measure.run_and_score(default.score, samples, refs, s.causal, DEFAULT, len(default.score.times))
            for p in pending:
                p.ratio = p.time / (0.5 * (last_default[0] + seconds))
            pending.clear()
            last_default[0] = seconds

        def screen(t: Trial) -> None:
            if len(pending) == 3:
                time_default()
            t.score = Score()
            seconds = measure.run_and_score(t.score, samples, refs, s.causal, t.candidate, 0, all_samples=True)
            self._learn(n, t.candidate, seconds)
            t.ratio = seconds / last_default[0]  # refined by the next default run
            pending.append(t)
            err = t.score.error
            t.status = "pass" if err <= max_error else "near" if err <= 1.25 * max_error else "over budget"
            if t.status != "pass":
                failures.append(t.candidate)

        for t in trials:
            t.predicted = cost.predict_time(n, s.causal, t.candidate, **self._kw())  # refitted model
            predicted_default = cost.predict_time(n, s.causal, DEFAULT, **self._kw())
            t.predicted_ratio = t.predicted / predicted_default
            bound = min(predicted_default if default_ok else math.inf, exact_t)
            if t.predicted > 1.2 * bound:
                t.status = "predicted slower"
            elif time.monotonic() + t.predicted > deadline:
                t.status = "out of time"
            elif any(no_more_accurate(t.candidate, f, n, s.causal) for f in failures):
                t.status = "dominated"
            else:
                screen(t)
            P.advance()
            if t.score is not None:
                P.note(_trial_line(t))
        if pending:
            time_default()
        return trials

    def _race(
        self, n, samples, refs, max_error, default, trials, exact_t, extrapolated, until
    ) -> tuple[list[Contender], float]:
        s, P = self.s, self.progress
        P.phase(f"n={n}: race against the default")
        # one screening run is noisy and the model is rough: rank by the geometric mean of the measured and the
        # predicted speed relative to the default, those with some error margin first (errors vary with the seed)
        ranked = sorted(
            (t for t in trials if t.status in ("pass", "near")),
            key=lambda t: (
                t.status != "pass",
                t.score.error > 0.95 * max_error,
                math.sqrt(t.ratio * t.predicted_ratio),
            ),
        )
        race = [default] + [
            Contender(f"#{i + 1}", t.candidate, replace(t.score, times=list(t.score.times)), t.predicted)
            for i, t in enumerate(ranked[: s.race_size])
        ]
        if not extrapolated and exact_t < 1.5 * default.score.time:
            race.append(Contender("exact", None, Score(), exact_t))
        exact_rounds: list[float] = []  # the extrapolated exact time, re-measured under each round's load
        for rnd in range(s.race_rounds):
            alive = [c for c in race if c.status == "racing"]
            cost_round = sum(c.time if c.rounds else c.score.time for c in alive)
            out_of_time = rnd >= 3 and time.monotonic() + cost_round > until
            if out_of_time or (len(alive) == 1 and rnd >= 1):  # at least one round times the default
                break
            order = alive[rnd % len(alive) :] + alive[: rnd % len(alive)]  # rotate who runs first
            times = {}
            for c in order:
                times[c.name] = measure.run_and_score(c.score, samples, refs, s.causal, c.candidate, 2 + rnd)
                c.rounds.append(times[c.name])
            if extrapolated:
                exact_rounds.append(self.exact_slice_time(samples[0], n, repeats=1))
            for c in alive:
                c.ratios.append(times[c.name] / times["default"])
                if c is default:
                    continue
                if len(c.rounds) >= 2 and c.score.error > max_error:
                    c.status = "over budget"
                elif len(c.rounds) >= 3 and c.ratio > 1.0:
                    c.status = "not faster"
            P.note(_race_line(rnd, race))
        for c in race:
            if c.status == "racing":
                c.status = "finished"
        raced_exact = [c.time for c in race if c.candidate is None and c.rounds]
        if raced_exact:
            exact_t = raced_exact[0]
        return race, (measure.median(exact_rounds) if exact_rounds else exact_t)

    def _winner(self, race: list[Contender], max_error: float) -> Contender:
        default = race[0]
        # a 2% margin: a contender indistinguishable from the default does not replace it
        fine = [c for c in race[1:] if c.status == "finished" and c.score.error <= max_error and c.ratio < 0.98]
        best = min(fine, key=lambda c: (round(c.ratio, 2), c.score.error), default=default)  # ties: more accurate
        best.status = "winner"
        return best

    def _params(self, n: int, winner: Contender) -> dict:
        if winner.candidate is None or not approximates(n, self.s.causal, winner.candidate):
            # exact attention at this length: a threshold above the bucket's lengths
            c = self.crossover_of(DEFAULT)
            return {"min_seq_len": c if c > 2 * n else 2 * n}
        return winner.candidate.as_dict()

    # -- crossover ------------------------------------------------------------------------------------------
    def ensure_rates(self) -> None:
        if self.rates is None:
            self.progress.phase("calibrating the cost model")
            self.rates = measure.calibrate_base(self.s.head_dim, self.s.dtype, self.s.device)

    def calibrate_crossover(self, c: HyperConfig = DEFAULT, repeats: int = 5) -> CrossoverResult:
        """Time exact and approximate non-causal attention at three powers of two around the crossover the
        model predicts for ``c``'s sizes, and scale the model's exact and approximate times to them (fixed
        overheads, which decide the crossover, are what a cost model knows least)."""
        self.ensure_rates()
        self.progress.phase("crossover: exact vs approximate around the predicted length")
        raw = self.crossover_of(c)
        forced = replace(c, min_seq_len=1, causal_depth=None)
        center = min(max(next_pow2(raw), 8 * c.block_size), 4096)  # probes up to 8192: a few seconds
        kw = self._kw()
        probes = []
        for x in (center // 2, center, center * 2):
            samp = synthetic(
                "mixed",
                n=x,
                head_dim=self.s.head_dim,
                heads=self.s.heads,
                batch=self.s.batch,
                dtype=self.s.dtype,
                device=self.s.device,
            )
            ex, hy = [], []
            for _ in range(repeats if x <= 4096 else 3):
                ex.append(measure.time_once(lambda samp=samp: measure.run_exact(samp, False), self.s.device))
                hy.append(measure.time_once(lambda samp=samp: measure.run_hyper(samp, False, forced), self.s.device))
            probes.append(
                (
                    x,
                    measure.median(ex),
                    measure.median(hy),
                    sum(cost.exact_parts(x, False, **kw)),
                    sum(cost.predict_parts(x, False, forced, **kw)),
                )
            )
        self.exact_scale = measure.median([e / pe for _, e, _, pe, _ in probes])
        self.hyper_scale = measure.median([h / ph for _, _, h, _, ph in probes])
        probes = [(x, e, h, pe * self.exact_scale, ph * self.hyper_scale) for x, e, h, pe, ph in probes]
        measured = None
        for x, e, h, _, _ in probes:
            if h < e and all(hh < ee for xx, ee, hh, _, _ in probes if xx >= x):
                measured = x
                break
        return CrossoverResult(self.crossover_of(c), probes, measured, raw)

    # -- everything -----------------------------------------------------------------------------------------
    def run(self) -> tuple[list[LengthResult], CrossoverResult]:
        s = self.s
        start = time.monotonic()
        dev_key, dt = schema.device_key(s.device), schema.dtype_name(s.dtype)
        if s.check_crossover:
            probe = self.calibrate_crossover()
        else:
            self.ensure_rates()
            probe = None
        results = []
        for i, n in enumerate(s.seq_lens):
            now = time.monotonic()
            left = start + s.time_budget - now
            result = self.tune_length(n, now + max(left, 0.0) / (len(s.seq_lens) - i))
            results.append(result)
            writer.record(
                s.cache_path,
                [
                    schema.make_entry(
                        device=dev_key,
                        dtype=dt,
                        head_dim=s.head_dim,
                        causal=s.causal,
                        seq_len=n,
                        params=result.params,
                        tuned=self._provenance(result),
                    )
                ],
            )
        winners = [r.winner.candidate for r in results if r.winner.candidate is not None]
        base = winners[-1] if winners else DEFAULT
        predicted = self.crossover_of(base)
        cross = CrossoverResult(
            predicted if predicted < 1 << 24 else None,
            probe.probes if probe else [],
            probe.measured if probe else None,
            None,
        )
        if cross.predicted is not None:
            info = {
                "predicted": cross.predicted,
                "measured_between_probes": cross.measured,
                "block_size": base.block_size,
                "sample_size": base.draws,
                "lsh_num_projs": base.lsh_num_projs,
                "exact_scale": self.exact_scale,
                "hyper_scale": self.hyper_scale,
                "batch_heads": s.batch * s.heads,
                "probes": [
                    dict(n=x, exact_s=e, hyper_s=h, exact_pred_s=pe, hyper_pred_s=ph)
                    for x, e, h, pe, ph in cross.probes
                ],
                **_stamp(s),
            }
            writer.record(
                s.cache_path,
                defaults=[
                    schema.make_default(
                        device=dev_key, dtype=dt, head_dim=s.head_dim, min_seq_len=cross.predicted, crossover=info
                    )
                ],
            )
        return results, cross

    def _provenance(self, r: LengthResult) -> dict:
        w, d = r.winner, r.default
        choice = "exact" if "min_seq_len" in r.params and len(r.params) == 1 else ("default" if w is d else "tuned")
        return {
            "seq_len": r.seq_len,
            "choice": choice,
            "time_s": w.time,
            "error": w.score.error,
            "time_vs_default": w.ratio,
            "default_time_s": d.time,
            "default_error": d.score.error,
            "rounds": len(d.rounds),
            "max_error": r.max_error,
            "max_error_auto": r.budget_auto,
            "exact_time_s": r.exact_time,
            "exact_time_extrapolated": r.exact_extrapolated,
            "predicted_s": w.predicted,
            "inputs": r.inputs,
            "heads": self.s.heads,
            "batch": self.s.batch,
            "tune_s": r.seconds,
            **_stamp(self.s),
        }


def _auto_threshold(n: int, causal: bool) -> int:
    """A ``min_seq_len`` that makes the default sizes approximate at ``n`` (for the auto error budget)."""
    return max(2 * DEFAULT.block_size, n // 4 if causal else n)


def _trial_line(t: Trial) -> str:
    return (
        f"screen {t.candidate.label():48s} predicted {duration(t.predicted):>9s}  measured "
        f"{duration(t.time):>9s} (x{t.ratio:.2f} default)  error {t.score.error:.3f}  {t.status}"
    )


def _race_line(index: int, race: list[Contender]) -> str:
    parts = [f"{c.name} {duration(c.rounds[-1])} x{c.ratios[-1]:.2f}" for c in race if len(c.rounds) == index + 1]
    return f"race round {index + 1}: " + ", ".join(parts)


def _stamp(s: TuneSettings) -> dict:
    return {
        "torch": torch.__version__,
        "hyper_backend": hyper_backend.__version__,
        "threads": torch.get_num_threads(),
        "host": platform.node(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
