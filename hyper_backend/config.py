"""Settings: the `HyperConfig` dataclass and the one place that reads `HYPER_*` environment variables.

Precedence, highest first: explicit keyword arguments / ``options={...}``, then ``HYPER_*`` environment
variables, then the autotuner's entries for the call's length (a table of length buckets resolved before the op
runs: at compile time for a compiled model, at call time for `hyper_attention`), then the `HyperConfig`
defaults. The op receives the result as `OpSettings` and reads neither the environment nor a file.

Every environment variable is documented in the README's table and read by :func:`read_env` only.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

DETECTORS = ("topk", "lsh")  # how the large entries are found (see `HyperConfig`)
RESIDUALS = ("importance", "uniform", "stratified", "vnorm")  # how the residual keys are drawn
_RESIDUALS_OF = {"topk": ("importance", "uniform", "vnorm"), "lsh": ("uniform", "stratified", "vnorm")}
PUBLISHED = {"sink_keys": 0, "local_window": 0, "residual": "uniform", "detector": "lsh"}  # `HyperConfig.published`
CAUSAL_WINDOW = 128  # local_window=None: the window of causal attention (non-causal attention gets none)
# min_seq_len=None: each detector's own threshold. "topk" spends a fixed budget per query block (its tile, top-k,
# sinks and draws: about 3300 keys at the defaults) and pays off only once a query sees many times that many keys:
# from 65536 the CPU path is 2.9x faster than exact attention causal, at 32768 only 1.5x, too little for its
# +3% perplexity there (docs/performance.md). "lsh": the threshold of earlier releases.
MIN_SEQ_LEN = {"topk": 65536, "lsh": 4096}
# sample_size=None: each detector's own residual draws. "topk" draws per query block of 64 queries; at equal keys
# per query more draws cut the row error further than more top-k keys (docs/performance.md). "lsh": per
# sub-problem, the value of earlier releases.
SAMPLE_SIZE = {"topk": 1024, "lsh": 256}


@dataclass(frozen=True)
class HyperConfig:
    """Parameters of HyperAttention: the one settings type of the package.

    Every path (``options={...}``, ``HYPER_*`` variables, the autotuner's cache, an explicit ``config=``) ends
    in one of these, through `resolve` (explicit fields over a tuned entry over the defaults); the op receives
    them as `OpSettings`.

    The estimator splits every query's keys into exact parts (the sinks, a local window, the keys the detector
    finds) and a residual estimated from ``sample_size`` reweighted draws over the keys that remain. Two detectors:

    - ``"topk"`` (the default): queries in positional blocks of ``query_block``; each block's mean query scores
      every key it may see, and the block attends exactly to its ``top_k`` highest-scoring keys. Causal attention
      is one flat pass (no recursion): each block also attends exactly to its own rows and the ``w`` keys
      before them. The residual is drawn by importance, in proportion to exp(score), weight 1 / (m p).
    - ``"lsh"``: the paper's sortLSH: queries and keys sorted by an angular LSH into blocks of ``block_size``,
      block i attending to block i; causal attention by recursive halving with exact leaves of at most
      ``min_seq_len``. ``HyperConfig(detector="lsh")`` is the estimator of earlier releases, bit for bit.

    Args:
        block_size: ``"lsh"``: queries per LSH-sorted block; keys per block scale with n_k / n_q.
        sample_size: m, the number of residual keys drawn (per query block for ``"topk"``, per sub-problem for
            ``"lsh"``; 0 disables the residual). ``None`` (the default): the detector's own, `SAMPLE_SIZE`
            (`draws` is the value in force).
        lsh_num_projs: ``"lsh"``: r, the number of random hyperplanes of the angular LSH (2**r buckets).
        min_seq_len: below this length attention is exact. ``None`` (the default): the detector's own threshold,
            `MIN_SEQ_LEN` (`min_len` is the value in force).
        causal_depth: ``"lsh"``: levels of recursive halving for causal attention; ``None`` halves until a
            piece is at most ``min_seq_len``.
        seed: seeds the LSH projections and the residual samples.
        sink_keys: the first ``sink_keys`` valid keys are attended to exactly by every query that may see
            them (attention sinks), and are removed from the LSH blocks and the residual.
        local_window: w. Causal: every query attends exactly to the w most recent keys, ending at itself,
            across every leaf and quadrant boundary. Non-causal self-attention (n_q == n_k): to the w keys
            centred on its own position, clipped at the ends. Cross-attention (n_q != n_k, non-causal): no
            window. Window keys are removed from the estimator for the queries that see them exactly. ``None``
            (the default) is `CAUSAL_WINDOW` keys for causal attention and no window for non-causal attention,
            whose banded exact part costs per-pair masks (see the README's Performance section).
        residual: how the residual is drawn over the keys that remain (n' of them), every draw reweighted so
            the estimate stays unbiased: ``"importance"`` (``"topk"`` only: p proportional to exp(detector
            score), weight 1 / (m p)), ``"uniform"`` (weight n'/m), ``"stratified"`` (``"lsh"`` only: one draw
            from each of m equal strata of the LSH-sorted key order, weight = stratum size) or ``"vnorm"`` (the
            paper's AMM step: p proportional to the squared norm of the value row, weight 1 / (m p)). ``None``
            (the default): ``"importance"`` for ``"topk"``, ``"uniform"`` for ``"lsh"``.
        detector: ``"topk"`` or ``"lsh"`` (above).
        top_k: ``"topk"``: keys attended exactly per query block (all of them when a block sees fewer).
        query_block: ``"topk"``: queries sharing one selection (and one set of residual draws).
        score_group: ``"topk"``: a block's key scores are the maximum over the means of its consecutive groups of
            ``score_group`` queries (each normalised by its log-sum-exp over the block's keys), so that a key
            that one group of queries weighs heavily is found even when the block's mean query misses it.
    """

    block_size: int = 256
    sample_size: int | None = None
    lsh_num_projs: int = 7
    min_seq_len: int | None = None
    causal_depth: int | None = None
    seed: int = 0
    sink_keys: int = 16
    local_window: int | None = None
    residual: str | None = None
    detector: str = "topk"
    top_k: int = 2048
    query_block: int = 64
    score_group: int = 16

    def __post_init__(self):
        _check_int("block_size", self.block_size, lo=1, hi=2**31 - 1)
        if self.sample_size is not None:
            _check_int("sample_size", self.sample_size, lo=0, hi=2**31 - 1)
        _check_int("lsh_num_projs", self.lsh_num_projs, lo=1, hi=30)
        if self.min_seq_len is not None:
            _check_int("min_seq_len", self.min_seq_len, lo=1, hi=2**62)
        if self.causal_depth is not None:
            _check_int("causal_depth", self.causal_depth, lo=0, hi=30)
        _check_int("seed", self.seed, lo=0, hi=2**62)
        _check_int("sink_keys", self.sink_keys, lo=0, hi=2**31 - 1)
        if self.local_window is not None:
            _check_int("local_window", self.local_window, lo=0, hi=2**31 - 1)
        if self.detector not in DETECTORS:
            raise ValueError(f"HyperConfig.detector must be one of {', '.join(DETECTORS)}, got {self.detector!r}")
        allowed = _RESIDUALS_OF[self.detector]
        if self.residual is not None and self.residual not in allowed:
            raise ValueError(
                f"HyperConfig.residual must be one of {', '.join(allowed)} (or None) with detector={self.detector!r}, "
                f"got {self.residual!r}"
            )
        _check_int("top_k", self.top_k, lo=0, hi=2**31 - 1)
        _check_int("query_block", self.query_block, lo=1, hi=2**31 - 1)
        _check_int("score_group", self.score_group, lo=1, hi=2**31 - 1)

    @property
    def min_len(self) -> int:
        """The length from which attention may be approximated: ``min_seq_len``, or the detector's `MIN_SEQ_LEN`."""
        return MIN_SEQ_LEN[self.detector] if self.min_seq_len is None else self.min_seq_len

    @property
    def draws(self) -> int:
        """The residual draws in force: ``sample_size``, or the detector's `SAMPLE_SIZE` when it is None."""
        return SAMPLE_SIZE[self.detector] if self.sample_size is None else self.sample_size

    @property
    def residual_scheme(self) -> str:
        """The residual actually drawn: ``residual``, or the detector's default when it is None."""
        if self.residual is not None:
            return self.residual
        return "importance" if self.detector == "topk" else "uniform"

    def replace(self, **changes) -> HyperConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def published(cls, *args, **fields) -> HyperConfig:
        """The estimator of the paper and its code: no exact sinks or window, a uniform residual (any field
        may still be given)."""
        return cls(*args, **{**PUBLISHED, **fields})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def label(self) -> str:
        """A short text form: ``topk k=2048 qb=64 g=16 m=1024 min=65536`` or ``lsh b=256 m=256 r=7 min=4096
        depth=auto``, and any sink/window/residual set."""
        if self.detector == "topk":
            text = f"topk k={self.top_k} qb={self.query_block} g={self.score_group} m={self.draws}"
            text += f" min={self.min_len}"
        else:
            depth = "auto" if self.causal_depth is None else str(self.causal_depth)
            text = f"lsh b={self.block_size} m={self.draws} r={self.lsh_num_projs} min={self.min_len}"
            text += f" depth={depth}"
        if self.sink_keys:
            text += f" sinks={self.sink_keys}"
        if self.local_window:
            text += f" w={self.local_window}"
        if self.residual is not None:
            text += f" {self.residual}"
        return text


FIELDS = tuple(f.name for f in dataclasses.fields(HyperConfig))


def _check_int(name: str, value, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"HyperConfig.{name} must be an int, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"HyperConfig.{name} must be {bound}, got {value}")


DEFAULTS = HyperConfig()


def resolve(explicit: Mapping[str, object] | None = None, tuned: Mapping[str, object] | None = None) -> HyperConfig:
    """The one resolver: ``explicit`` fields (options, ``HYPER_*``, a calibration) > ``tuned`` (an autotuner entry's
    params) > the defaults. Returns a complete, validated `HyperConfig`."""
    values = {name: tuned[name] for name in FIELDS if tuned and name in tuned}
    values.update({name: explicit[name] for name in FIELDS if explicit and name in explicit})
    return DEFAULTS.replace(**values)


@dataclass(frozen=True)
class OpSettings:
    """Everything ``hyper::attention`` needs besides its tensors, resolved before the op runs: the op's ``settings``
    argument is `encode`'s canonical JSON of this, and the op is a pure function of its inputs.

    ``configs[i]`` serves calls whose length ``max(n_q, n_k)`` is in ``[starts[i], starts[i + 1])`` (``starts[0]
    == 0``): the autotuner's length buckets, resolved at compile time into one table, so one ``dynamic=True``
    graph serves every length without the op reading a file. ``kernels``: ``"auto"`` (CUDA tensors to Triton,
    CPU to the torch path), ``"cpu"`` or ``"triton"``. ``serial_bookkeeping``: the CPU path runs its small gathers,
    masks and merges on one thread, and its fused attention calls, products and the ``"topk"`` selection's passes
    over whole chunks of blocks on all of them."""

    configs: tuple[HyperConfig, ...] = (DEFAULTS,)
    starts: tuple[int, ...] = (0,)
    kernels: str = "auto"
    serial_bookkeeping: bool = True

    def __post_init__(self):
        if not self.configs or len(self.starts) != len(self.configs) or self.starts[0] != 0:
            raise ValueError("OpSettings needs one config per start, the first start 0")
        if any(b <= a for a, b in zip(self.starts, self.starts[1:])):
            raise ValueError(f"OpSettings.starts must increase, got {self.starts}")
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"OpSettings.kernels must be one of {', '.join(KERNEL_CHOICES)}, got {self.kernels!r}")

    @classmethod
    def of(cls, config: HyperConfig, **execution) -> OpSettings:
        """One config for every length."""
        return cls((config,), (0,), **execution)

    def for_length(self, n: int) -> HyperConfig:
        return self.configs[bisect.bisect_right(self.starts, int(n)) - 1]

    def encode(self) -> str:
        return json.dumps(
            {
                "v": 1,
                "buckets": [[start, c.as_dict()] for start, c in zip(self.starts, self.configs)],
                "kernels": self.kernels,
                "serial_bookkeeping": self.serial_bookkeeping,
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def decode(text: str) -> OpSettings:
        """The settings of `encode`'s text (parsed once per distinct text)."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("v") != 1:
            raise ValueError(f"hyper::attention settings: not a version-1 settings text: {text[:200]!r}")
        starts = tuple(int(start) for start, _ in data["buckets"])
        configs = tuple(HyperConfig(**fields) for _, fields in data["buckets"])
        return OpSettings(configs, starts, data["kernels"], bool(data["serial_bookkeeping"]))


def op_settings(
    explicit: Mapping[str, object] | None, table: Sequence[tuple[int, Mapping[str, object]]] = (), **execution
) -> OpSettings:
    """`OpSettings` from the explicit fields and a tuned table ``[(start, params), ...]`` (starts increasing from
    0; empty: no tuning). Neighbouring buckets that resolve to one config are merged."""
    rows = list(table) or [(0, {})]
    starts, configs = [], []
    for start, params in rows:
        config = resolve(explicit, params)
        if configs and configs[-1] == config:
            continue
        starts.append(0 if not starts else int(start))
        configs.append(config)
    return OpSettings(tuple(configs), tuple(starts), **execution)


# ----------------------------------------------------------------------------------------------------------
# Environment variables: the only place they are read.
# ----------------------------------------------------------------------------------------------------------

ENV_FIELDS = {
    "HYPER_BLOCK_SIZE": "block_size",
    "HYPER_SAMPLE_SIZE": "sample_size",
    "HYPER_LSH_PROJS": "lsh_num_projs",
    "HYPER_MIN_SEQ_LEN": "min_seq_len",
    "HYPER_CAUSAL_DEPTH": "causal_depth",
    "HYPER_SEED": "seed",
    "HYPER_SINK_KEYS": "sink_keys",
    "HYPER_LOCAL_WINDOW": "local_window",
    "HYPER_TOP_K": "top_k",
    "HYPER_QUERY_BLOCK": "query_block",
    "HYPER_SCORE_GROUP": "score_group",
}
INNER_BACKENDS = ("inductor", "aot_eager", "eager")
KERNEL_CHOICES = ("auto", "cpu", "triton")


class EnvError(ValueError):
    """A ``HYPER_*`` variable holds a value outside its accepted forms."""


def _env_int(var: str, raw: str, field: str, allow_none: bool = False):
    text = raw.strip().lower()
    if allow_none and text in ("none", "auto", ""):
        return None
    try:
        value = int(text)
    except ValueError:
        forms = "an integer" + (" or 'none'" if allow_none else "")
        raise EnvError(f"{var}={raw!r}: expected {forms}") from None
    try:
        HyperConfig(**{field: value})
    except ValueError as e:
        raise EnvError(f"{var}={raw!r}: {e}") from None
    return value


def _env_bool(var: str, raw: str) -> bool:
    text = raw.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise EnvError(f"{var}={raw!r}: expected one of 1/0, true/false, yes/no, on/off")


def _env_choice(var: str, raw: str, choices) -> str:
    text = raw.strip().lower()
    if text not in choices:
        raise EnvError(f"{var}={raw!r}: expected one of {', '.join(choices)}")
    return text


def read_env(environ: Mapping[str, str] | None = None) -> dict:
    """Parse and validate every ``HYPER_*`` variable that is set. Returns a dict of backend option names.

    Raises `EnvError` naming the variable and its accepted forms for a bad value.
    """
    env = os.environ if environ is None else environ
    out: dict = {}
    if "HYPER_ATTENTION" in env:
        out["enabled"] = _env_bool("HYPER_ATTENTION", env["HYPER_ATTENTION"])
    for var, field in ENV_FIELDS.items():
        if var in env:
            out[field] = _env_int(
                var, env[var], field, allow_none=(field in ("sample_size", "causal_depth", "local_window"))
            )
    if "HYPER_RESIDUAL" in env:
        out["residual"] = _env_choice("HYPER_RESIDUAL", env["HYPER_RESIDUAL"], RESIDUALS)
    if "HYPER_DETECTOR" in env:
        out["detector"] = _env_choice("HYPER_DETECTOR", env["HYPER_DETECTOR"], DETECTORS)
    if "HYPER_LAYERS" in env:
        try:
            out["layers"] = LayerSelection.parse(env["HYPER_LAYERS"])
        except ValueError as e:
            raise EnvError(f"HYPER_LAYERS={env['HYPER_LAYERS']!r}: {e}") from None
    if "HYPER_TUNE_CACHE" in env:
        out["tune_cache"] = env["HYPER_TUNE_CACHE"].strip()
    if "HYPER_INNER_BACKEND" in env:
        out["inner_backend"] = _env_choice("HYPER_INNER_BACKEND", env["HYPER_INNER_BACKEND"], INNER_BACKENDS)
    if "HYPER_KERNELS" in env:
        out["kernels"] = _env_choice("HYPER_KERNELS", env["HYPER_KERNELS"], KERNEL_CHOICES)
    if "HYPER_SERIAL_BOOKKEEPING" in env:
        out["serial_bookkeeping"] = _env_bool("HYPER_SERIAL_BOOKKEEPING", env["HYPER_SERIAL_BOOKKEEPING"])
    return out


def default_tune_cache() -> str:
    """``$HYPER_TUNE_CACHE``, else ``$XDG_CACHE_HOME/hyper_backend/tune.json`` (``~/.cache`` by default)."""
    if os.environ.get("HYPER_TUNE_CACHE", "").strip():
        return os.environ["HYPER_TUNE_CACHE"].strip()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hyper_backend", "tune.json")


# ----------------------------------------------------------------------------------------------------------
# HYPER_LAYERS / options["layers"]: which attention sites, numbered in model execution order, are swapped.
# ----------------------------------------------------------------------------------------------------------

_RANGE = re.compile(r"^([0-9]{1,100})(?:-([0-9]{1,100}))?$")


@dataclass(frozen=True, init=False)
class LayerSelection:
    """A set of attention-site indices: ``all``, ``none``, ``first:K``, ``last:K`` or ``0,2,10-13``; or ``auto``.

    ``auto``: the per-site assignment the calibration (``python -m hyper_backend.autotune --model ...``) wrote
    to the tuning cache for this model (`hyper_backend.autotune.cache.model_fingerprint`). The backend
    resolves it at compile time; anything that has no calibration to read (`contains`) treats it as ``all``.

    ``last:K`` needs the total number of sites, which is known only once they are all numbered; see
    :meth:`contains`.

    A set is stored as sorted, disjoint, non-adjacent inclusive ranges (``ranges``), never expanded, so
    ``0-100000000000000000`` costs two integers. ``LayerSelection("set", indices={0, 2})`` and
    ``LayerSelection("set", ranges=[(10, 13)])`` both build one; equal sets compare equal however written.
    """

    kind: str  # "all" | "none" | "first" | "last" | "set" | "auto"
    count: int = 0
    ranges: tuple = ()  # ((lo, hi), ...) inclusive, for "set"

    ACCEPTED = "'all', 'none', 'auto', 'first:K', 'last:K', or a list of indices and ranges such as '0,2,10-13'"
    KEY_EXPANDED = 4096  # sets of at most this many indices keep the expanded key "set:0,1,2,3" (stable)

    def __init__(self, kind: str, count: int = 0, indices=(), ranges=()):
        spans = sorted([(int(lo), int(hi)) for lo, hi in ranges] + [(int(i), int(i)) for i in indices])
        merged: list = []
        for lo, hi in spans:
            if hi < lo:
                raise ValueError(f"range {lo}-{hi} is reversed")
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "count", count)
        object.__setattr__(self, "ranges", tuple(merged))

    @property
    def size(self) -> int:
        """How many indices a set holds."""
        return sum(hi - lo + 1 for lo, hi in self.ranges)

    @property
    def indices(self) -> frozenset:
        """A set's indices, expanded; refused (ValueError) above 2**20 of them."""
        if self.size > 1 << 20:
            raise ValueError(f"{self.key()} holds {self.size} indices, too many to expand")
        return frozenset(i for lo, hi in self.ranges for i in range(lo, hi + 1))

    @classmethod
    def parse(cls, text) -> LayerSelection:
        if isinstance(text, LayerSelection):
            return text
        if isinstance(text, (list, tuple, set, frozenset)):
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in text):
                raise ValueError(f"expected non-negative ints; accepted forms: {cls.ACCEPTED}")
            return cls("set", indices=text)
        if not isinstance(text, str):
            raise ValueError(f"expected a string; accepted forms: {cls.ACCEPTED}")
        s = text.strip().lower().replace(" ", "")
        if s in ("all", "none", "auto"):
            return cls(s)
        for kind in ("first", "last"):
            if s.startswith(kind + ":"):
                k = s[len(kind) + 1 :]
                if not k.isdigit():
                    raise ValueError(f"{kind}:K needs a non-negative integer K; accepted forms: {cls.ACCEPTED}")
                return cls(kind, count=int(k))
        spans = []
        for part in s.split(","):
            m = _RANGE.match(part)
            if not m:
                raise ValueError(f"cannot read {part[:120]!r}; accepted forms: {cls.ACCEPTED}")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise ValueError(f"range {part!r} is reversed; accepted forms: {cls.ACCEPTED}")
            spans.append((lo, hi))
        return cls("set", ranges=spans)

    def contains(self, index: int, total: int | None) -> bool:
        if self.kind in ("all", "auto"):
            return True
        if self.kind == "none":
            return False
        if self.kind == "first":
            return index < self.count
        if self.kind == "last":
            if total is None:
                raise ValueError("last:K needs the total number of attention sites")
            return index >= total - self.count
        import bisect

        at = bisect.bisect_right(self.ranges, index, key=lambda r: r[0]) - 1
        return at >= 0 and index <= self.ranges[at][1]

    def key(self) -> str:
        """A stable text form, used in cache keys: ``set:0,1,2,3`` for sets of at most `KEY_EXPANDED` indices
        (as before ranges were stored), else the ranges, ``set:0-5,7,10-100000``."""
        if self.kind in ("all", "none", "auto"):
            return self.kind
        if self.kind in ("first", "last"):
            return f"{self.kind}:{self.count}"
        if self.size <= self.KEY_EXPANDED:
            return "set:" + ",".join(str(i) for lo, hi in self.ranges for i in range(lo, hi + 1))
        return "set:" + ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ranges)
