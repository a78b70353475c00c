"""The tuning cache's schema: keys, the fields every record must have, and the constructors that build them.

A cache file (``"schema": "hyper_backend.tune"``, ``"version": 1``) holds three sections::

    {
      "schema": "hyper_backend.tune",
      "version": 1,
      "entries": {                      # one per (device, dtype, head_dim, causal, length bucket)
        "cpu:AMD EPYC|float32|d64|causal|131072": {
          "device": "cpu:AMD EPYC", "dtype": "float32", "head_dim": 64, "causal": true, "bucket": 131072,
          "params": {"block_size": 256, "sample_size": 512, "lsh_num_projs": 7, "min_seq_len": 2048, ...},
          "tuned": {...}                # how it was chosen: length, times, errors, budget, inputs, versions
        }
      },
      "defaults": {                     # one per (device, dtype, head_dim): the predicted crossover
        "cpu:AMD EPYC|float32|d64": {"device": ..., "dtype": ..., "head_dim": 64, "min_seq_len": 4792,
                                     "crossover": {...}}
      },
      "models": {                       # per-site calibrations, one per (model fingerprint, dtype, length bucket)
        "9c1e...|float32|8192": {
          "fingerprint": "9c1e...", "config_hash": "51d0...", "num_sites": 18, "model_type": "gemma3_text",
          "dtype": "float32", "bucket": 8192,
          "sites": {"5": {"exact": "over budget: ..."},           # calibrated exact
                    "11": {"params": {...every HyperConfig field}},
                    "0": {"exact": "masked (sliding window): never lowered"}},
          "modules": {"0": "layers.0.self_attn", "5": "layers.5.self_attn", "11": "layers.11.self_attn"},
          "calibrated": {...}           # how: budget, slices, verified perplexities, times, device, versions
        }
      }
    }

``params`` hold only `HyperConfig` fields with values it accepts. ``modules`` gives, for every site, the path from
the calibrated model's body of the module whose forward made the attention call (as `nn.Module.named_modules`
names it): the backend applies a site's calibration only to a compiled site it can place there.

Buckets are powers of two: a length falls in the bucket of the nearest power of two (in log scale). Devices are
named ``cpu:<model name from /proc/cpuinfo>`` or ``cuda:<torch.cuda.get_device_name()>:sm<major><minor>``.

``models`` is additive: a file without it is a valid version-1 cache, and a reader that predates it ignores it.
"""

from __future__ import annotations

import functools
import math
import platform

import torch

from hyper_backend.config import FIELDS, HyperConfig

from .files import shown
from .fingerprint import config_hash, fingerprint

SCHEMA = "hyper_backend.tune"
VERSION = 1
SECTIONS = ("entries", "defaults", "models")


# ----------------------------------------------------------------------------------------------------------
# keys
# ----------------------------------------------------------------------------------------------------------


@functools.cache
def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (else what `platform` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@functools.cache
def _device_name(kind: str, index: int | None) -> str:
    if kind == "cuda":
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda:{torch.cuda.get_device_name(index)}:sm{major}{minor}"
    if kind == "cpu":
        return f"cpu:{cpu_model()}"
    return kind


def device_key(device) -> str:
    """``cpu:<model>`` or ``cuda:<name>:sm<cc>`` for a `torch.device` (or anything it accepts)."""
    device = torch.device(device)
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    return _device_name(device.type, index)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def bucket(seq_len: int) -> int:
    """The power of two nearest to ``seq_len`` in log scale (ties go up)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    return 1 << int(math.floor(math.log2(seq_len) + 0.5))


def group_key(device: str, dtype: str, head_dim: int) -> str:
    return f"{device}|{dtype}|d{head_dim}"


def entry_key(device: str, dtype: str, head_dim: int, causal: bool, bucket_: int) -> str:
    return f"{group_key(device, dtype, head_dim)}|{'causal' if causal else 'full'}|{bucket_}"


def model_key(fingerprint_: str, dtype: str, bucket_: int) -> str:
    return f"{fingerprint_}|{dtype}|{bucket_}"


def length_text(n: int) -> str:
    """``8192`` -> ``8k``, ``131072`` -> ``128k``, ``1000`` -> ``1000``."""
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


# ----------------------------------------------------------------------------------------------------------
# the file as a whole
# ----------------------------------------------------------------------------------------------------------


def classify(data) -> tuple[str, str]:
    """(``"current"`` | ``"ours"`` | ``"foreign"``, why). ``"ours"``: our schema, unusable by this version."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        return "foreign", "holds JSON that is not a hyper_backend tuning cache"
    version = data.get("version")
    if version != VERSION or isinstance(version, bool):
        return "ours", f"schema version {shown(repr(version), 40)}, this hyper_backend reads version {VERSION}"
    if not all(isinstance(data.get(section, {}), dict) for section in SECTIONS):
        return "ours", "malformed (entries/defaults/models are not objects)"
    return "current", ""


def version_suffix(data) -> str:
    """Where a file of our schema that this version cannot use is set aside: ``.v<N>``, else ``.bad``."""
    version = data.get("version")
    ok = isinstance(version, int) and not isinstance(version, bool) and 0 <= version < 10**9
    return f".v{version}" if ok and version != VERSION else ".bad"


# ----------------------------------------------------------------------------------------------------------
# records: every field a lookup needs, with its type and range (ValueError with a one-line reason otherwise)
# ----------------------------------------------------------------------------------------------------------


def _int_field(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {shown(repr(value), 60)}")
    return value


def _str_field(name: str, value) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {shown(repr(value), 60)}")
    return value


def valid_params(params) -> dict:
    """Only `HyperConfig` fields, with values it accepts. Raises ValueError otherwise."""
    if not isinstance(params, dict):
        raise ValueError("params is not an object")
    unknown = set(params) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown fields {shown(sorted(map(str, unknown)), 120)}")
    try:
        HyperConfig(**params)  # range checks
    except (TypeError, ValueError) as e:
        raise ValueError(shown(e, 160)) from None
    return dict(params)


def entry_fields(e) -> tuple[tuple[str, str, int, bool], int, dict]:
    """((device, dtype, head_dim, causal), bucket, params) of an ``entries`` value."""
    if not isinstance(e, dict):
        raise ValueError("not an object")
    try:
        group = (
            _str_field("device", e["device"]),
            _str_field("dtype", e["dtype"]),
            _int_field("head_dim", e["head_dim"], 1, 2**31 - 1),
            e["causal"],
        )
        if not isinstance(group[3], bool):
            raise ValueError(f"causal must be true or false, got {shown(repr(group[3]), 60)}")
        b = _int_field("bucket", e["bucket"], 1, 2**62)
        params = valid_params(e["params"])
    except KeyError as missing:
        raise ValueError(f"no field {shown(missing, 60)}") from None
    if not isinstance(e.get("tuned", {}), dict):
        raise ValueError("tuned is not an object")
    return group, b, params


def default_fields(e) -> tuple[tuple[str, str, int], dict]:
    """((device, dtype, head_dim), params) of a ``defaults`` value."""
    if not isinstance(e, dict):
        raise ValueError("not an object")
    try:
        group = (
            _str_field("device", e["device"]),
            _str_field("dtype", e["dtype"]),
            _int_field("head_dim", e["head_dim"], 1, 2**31 - 1),
        )
        params = valid_params({"min_seq_len": e["min_seq_len"]})
    except KeyError as missing:
        raise ValueError(f"no field {shown(missing, 60)}") from None
    if not isinstance(e.get("crossover", {}), dict):
        raise ValueError("crossover is not an object")
    return group, params


def model_fields(m) -> None:
    """ValueError unless ``m`` is a usable ``models`` value."""
    if not isinstance(m, dict):
        raise ValueError("not an object")
    try:
        for name in ("fingerprint", "config_hash", "dtype"):
            _str_field(name, m[name])
        n = _int_field("num_sites", m["num_sites"], 1, 2**31 - 1)
        _int_field("bucket", m["bucket"], 1, 2**62)
        sites = m["sites"]
    except KeyError as missing:
        raise ValueError(f"no field {shown(missing, 60)}") from None
    if m["fingerprint"] != fingerprint(m["config_hash"], n):
        raise ValueError("fingerprint does not match config_hash and num_sites")
    if not isinstance(sites, dict):
        raise ValueError("sites is not an object")
    for key, site in sites.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < n):
            raise ValueError(f"site {shown(repr(key), 40)} is not an index below num_sites={n}")
        if not isinstance(site, dict) or ("params" in site) == ("exact" in site):
            raise ValueError(f"site {key} must hold exactly one of params, exact")
        if "params" in site:
            valid_params(site["params"])
        else:
            _str_field(f"site {key} exact", site["exact"])
    modules = m.get("modules")
    if not isinstance(modules, dict) or set(modules) != set(sites):
        raise ValueError("modules must give every site's module path (an older calibration has none: recalibrate)")
    bad = next((k for k, v in modules.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise ValueError(f"the module path of site {shown(repr(bad), 40)} is not a string")
    if not isinstance(m.get("calibrated", {}), dict):
        raise ValueError("calibrated is not an object")


FIELD_CHECKS = {"entries": entry_fields, "defaults": default_fields, "models": model_fields}


# ----------------------------------------------------------------------------------------------------------
# constructors (validated)
# ----------------------------------------------------------------------------------------------------------


def make_entry(
    *, device: str, dtype: str, head_dim: int, causal: bool, seq_len: int, params: dict, tuned: dict
) -> dict:
    """An ``entries`` value. ``params`` holds `HyperConfig` fields; ``tuned`` is free-form JSON."""
    return {
        "device": device,
        "dtype": dtype,
        "head_dim": int(head_dim),
        "causal": bool(causal),
        "bucket": bucket(seq_len),
        "params": valid_params(params),
        "tuned": tuned,
    }


def make_default(*, device: str, dtype: str, head_dim: int, min_seq_len: int, crossover: dict) -> dict:
    """A ``defaults`` value: the device's predicted crossover as its ``min_seq_len``."""
    valid_params({"min_seq_len": int(min_seq_len)})
    return {
        "device": device,
        "dtype": dtype,
        "head_dim": int(head_dim),
        "min_seq_len": int(min_seq_len),
        "crossover": crossover,
    }


def make_model(
    *,
    config,
    num_sites: int,
    dtype: str,
    seq_len: int,
    sites: dict[int, dict],
    modules: dict[int, str],
    model_type: str = "",
    calibrated: dict | None = None,
) -> dict:
    """A ``models`` value. ``sites``: site index -> ``{"params": {...}}`` (HyperAttention with these
    `HyperConfig` fields) or ``{"exact": "why"}``, plus any free-form fields (error, times); ``modules``: site
    index -> the path of its module from the model's body. Raises
    `hyper_backend.autotune.fingerprint.UnstableConfig` for a config with no stable hash."""
    h = config_hash(config)
    m = {
        "fingerprint": fingerprint(h, num_sites),
        "config_hash": h,
        "num_sites": int(num_sites),
        "model_type": str(model_type),
        "dtype": dtype,
        "bucket": bucket(seq_len),
        "seq_len": int(seq_len),
        "sites": {str(i): dict(v) for i, v in sorted(sites.items())},
        "modules": {str(i): str(path) for i, path in sorted(modules.items())},
        "calibrated": dict(calibrated or {}),
    }
    model_fields(m)
    return m
