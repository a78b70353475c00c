"""Settings: the `HyperConfig` dataclass and the one place that reads `HYPER_*` environment variables.

Precedence, highest first: explicit keyword arguments / ``options={...}``, then ``HYPER_*`` environment
variables, then the autotuner's cache entry for the actual sequence length (looked up inside the op at run
time), then the `HyperConfig` defaults.

Every environment variable is documented in the README's table and read by :func:`read_env` only.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Sentinels carried in the op's integer parameter list.
UNSET = -1  # "not set explicitly": the op uses the tuned value for its length, else the default
AUTO_DEPTH = -2  # causal_depth=None given explicitly: halve until a piece is at most min_seq_len

RESIDUALS = ("uniform", "stratified")  # how the residual keys are drawn; the op carries the index
PUBLISHED = {"sink_keys": 0, "local_window": 0, "residual": "uniform"}  # see `HyperConfig.published`
CAUSAL_WINDOW = 128  # local_window=None: the window of causal attention (non-causal attention gets none)


@dataclass(frozen=True)
class HyperConfig:
    """Parameters of HyperAttention: the one settings type of the package.

    Every path (``options={...}``, ``HYPER_*`` variables, the autotuner's cache, an explicit ``config=``) ends
    in one of these, through `encode` (settings -> the op's integer list) and `resolve` (the op's list and a
    tuned entry -> a complete config).

    Args:
        block_size: queries per LSH-sorted block; keys per block scale with n_k / n_q.
        sample_size: m, the number of residual keys drawn per call (0 disables the residual).
        lsh_num_projs: r, the number of random hyperplanes of the angular LSH (2**r buckets).
        min_seq_len: below this length attention is exact.
        causal_depth: levels of recursive halving for causal attention; ``None`` halves until a piece
            is at most ``min_seq_len``.
        seed: seeds the LSH projections and the residual samples.
        sink_keys: the first ``sink_keys`` valid keys are attended to exactly by every query that may see
            them (attention sinks), and are removed from the LSH blocks and the residual.
        local_window: w. Causal: every query attends exactly to the w most recent keys, ending at itself,
            across every leaf and quadrant boundary. Non-causal self-attention (n_q == n_k): to the w keys
            centred on its own position, clipped at the ends. Cross-attention (n_q != n_k, non-causal): no
            window. Window keys are removed from the estimator for the queries that see them exactly. ``None``
            (the default) is `CAUSAL_WINDOW` keys for causal attention and no window for non-causal attention,
            whose banded exact part costs per-pair masks (see the README's Performance section).
        residual: ``"uniform"`` (i.i.d. uniform draws, weight n'/m) or ``"stratified"`` (one draw from each
            of m equal strata of the LSH-sorted key order, weight = stratum size).
    """

    block_size: int = 256
    sample_size: int = 256
    lsh_num_projs: int = 7
    min_seq_len: int = 4096
    causal_depth: int | None = None
    seed: int = 0
    sink_keys: int = 16
    local_window: int | None = None
    residual: str = "uniform"

    def __post_init__(self):
        _check_int("block_size", self.block_size, lo=1, hi=2**31 - 1)
        _check_int("sample_size", self.sample_size, lo=0, hi=2**31 - 1)
        _check_int("lsh_num_projs", self.lsh_num_projs, lo=1, hi=30)
        _check_int("min_seq_len", self.min_seq_len, lo=1, hi=2**62)
        if self.causal_depth is not None:
            _check_int("causal_depth", self.causal_depth, lo=0, hi=30)
        _check_int("seed", self.seed, lo=0, hi=2**62)
        _check_int("sink_keys", self.sink_keys, lo=0, hi=2**31 - 1)
        if self.local_window is not None:
            _check_int("local_window", self.local_window, lo=0, hi=2**31 - 1)
        if self.residual not in RESIDUALS:
            raise ValueError(f"HyperConfig.residual must be one of {', '.join(RESIDUALS)}, got {self.residual!r}")

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
        """A short text form: ``b=256 m=256 r=7 min=4096 depth=auto`` and any sink/window/residual set."""
        depth = "auto" if self.causal_depth is None else str(self.causal_depth)
        text = f"b={self.block_size} m={self.sample_size} r={self.lsh_num_projs} min={self.min_seq_len} depth={depth}"
        if self.sink_keys:
            text += f" sinks={self.sink_keys}"
        if self.local_window:
            text += f" w={self.local_window}"
        if self.residual != "uniform":
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


def _to_int(name: str, value) -> int:
    if name in ("causal_depth", "local_window") and value is None:
        return AUTO_DEPTH
    if name == "residual":
        return RESIDUALS.index(value)
    return int(value)


def _from_int(name: str, value: int):
    if name in ("causal_depth", "local_window") and value == AUTO_DEPTH:
        return None
    if name == "residual":
        return RESIDUALS[value]
    return int(value)


def encode(config: HyperConfig | None = None, explicit: Mapping[str, object] | None = None) -> list[int]:
    """Settings -> the op's integer parameter list, one entry per field of `HyperConfig` in `FIELDS` order.

    ``config`` given: every field is explicit and tuning is bypassed. ``explicit`` given: only those fields
    (already validated values) are explicit; the rest are ``UNSET`` and resolved by the op at run time.
    """
    values = dataclasses.asdict(config) if config is not None else dict(explicit or {})
    return [_to_int(name, values[name]) if name in values else UNSET for name in FIELDS]


def resolve(given: Sequence[int], tuned: Mapping[str, object] | None = None) -> HyperConfig:
    """The one resolver: explicit values (``given``, from `encode`) > ``tuned`` (a cache entry's params) >
    the defaults. Returns a complete, validated `HyperConfig`."""
    if len(given) != len(FIELDS):
        raise ValueError(f"expected {len(FIELDS)} parameters ({', '.join(FIELDS)}), got {len(given)}")
    out = {}
    for name, value in zip(FIELDS, given):
        value = int(value)
        if value != UNSET:
            out[name] = _from_int(name, value)
        elif tuned is not None and name in tuned:
            out[name] = tuned[name]
    return DEFAULTS.replace(**out)


def explicit_settings(
    options: Mapping[str, object] | None = None, environ: Mapping[str, str] | None = None
) -> dict:
    """The explicit `HyperConfig` fields of a call or a compile: ``options`` over ``HYPER_*`` variables.

    Both the backend (at compile time) and `hyper_backend.hyper_attention` with ``config=None`` (at call time)
    use this, so an eager call and a compiled call resolve settings by the same rule."""
    merged = {**read_env(environ), **dict(options or {})}
    return {f: merged[f] for f in FIELDS if f in merged}


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
            out[field] = _env_int(var, env[var], field, allow_none=(field in ("causal_depth", "local_window")))
    if "HYPER_RESIDUAL" in env:
        out["residual"] = _env_choice("HYPER_RESIDUAL", env["HYPER_RESIDUAL"], RESIDUALS)
    if "HYPER_LAYERS" in env:
        try:
            out["layers"] = LayerSelection.parse(env["HYPER_LAYERS"])
        except ValueError as e:
            raise EnvError(f"HYPER_LAYERS={env['HYPER_LAYERS']!r}: {e}") from None
    if "HYPER_TUNE_CACHE" in env:
        out["tune_cache"] = env["HYPER_TUNE_CACHE"].strip()
    if "HYPER_INNER_BACKEND" in env:
        out["inner_backend"] = _env_choice("HYPER_INNER_BACKEND", env["HYPER_INNER_BACKEND"], INNER_BACKENDS)
    return out


def kernel_choice(environ: Mapping[str, str] | None = None) -> str:
    """``HYPER_KERNELS``: ``auto`` (CUDA tensors to Triton, CPU to the torch path), ``cpu`` or ``triton``."""
    env = os.environ if environ is None else environ
    if "HYPER_KERNELS" not in env:
        return "auto"
    return _env_choice("HYPER_KERNELS", env["HYPER_KERNELS"], KERNEL_CHOICES)


def serial_bookkeeping(environ: Mapping[str, str] | None = None) -> bool:
    """``HYPER_SERIAL_BOOKKEEPING`` (default on): the CPU path runs its gathers, masks and merges on one
    thread and only the fused attention calls on all of them. Read by the op at each call, like HYPER_KERNELS."""
    env = os.environ if environ is None else environ
    if "HYPER_SERIAL_BOOKKEEPING" not in env:
        return True
    return _env_bool("HYPER_SERIAL_BOOKKEEPING", env["HYPER_SERIAL_BOOKKEEPING"])


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
