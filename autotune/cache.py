"""The autotuner's cache: a versioned JSON file of tuned parameters, read by the op on every call.

Schema (``"schema": "hyper_backend.tune"``, ``"version": 1``)::

    {
      "schema": "hyper_backend.tune",
      "version": 1,
      "entries": {                      # one per (device, dtype, head_dim, causal, length bucket)
        "cpu:AMD EPYC|float32|d64|causal|131072": {
          "device": "cpu:AMD EPYC", "dtype": "float32", "head_dim": 64, "causal": true, "bucket": 131072,
          "params": {"block_size": 256, "sample_size": 512, "lsh_num_projs": 7, "min_seq_len": 2048,
                     "causal_depth": null, "seed": 0},
          "tuned": {...}                # how it was chosen: length, times, errors, budget, inputs, versions
        }
      },
      "defaults": {                     # one per (device, dtype, head_dim): the predicted crossover
        "cpu:AMD EPYC|float32|d64": {"device": ..., "dtype": ..., "head_dim": 64, "min_seq_len": 4792,
                                     "crossover": {...}}
      }
    }

Buckets are powers of two: a length falls in the bucket of the nearest power of two (in log scale). A lookup
takes the entry of the nearest tuned bucket for the same device, dtype, head dim and causality; with none, the
device default ``min_seq_len`` if there is one. Devices are named ``cpu:<model name from /proc/cpuinfo>`` or
``cuda:<torch.cuda.get_device_name()>:sm<major><minor>``.

Writes (`record`) merge into the file under an exclusive ``fcntl.flock`` on ``<path>.lock`` and replace it
atomically (temporary file in the same directory, then ``os.replace``), so concurrent tuning runs never
corrupt it or lose each other's entries. A malformed or foreign-version file is ignored with a warning when
read, and set aside (``<path>.bad`` / ``<path>.v<N>``) before the first write replaces it.

This module imports neither the kernels nor the search code: the op imports it.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import tempfile
import warnings
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from hyper_backend.config import FIELDS, HyperConfig

SCHEMA = "hyper_backend.tune"
VERSION = 1

try:
    import fcntl
except ImportError:  # not POSIX: writes stay atomic, but concurrent writers may drop each other's entries
    fcntl = None


class CacheWarning(UserWarning):
    """The tuning cache could not be used (it is then ignored, never fatal)."""


# ----------------------------------------------------------------------------------------------------------
# keys
# ----------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
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


@functools.lru_cache(maxsize=None)
def _device_name(kind: str, index: Optional[int]) -> str:
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


def _group(device: str, dtype: str, head_dim: int) -> str:
    return f"{device}|{dtype}|d{head_dim}"


def entry_key(device: str, dtype: str, head_dim: int, causal: bool, bucket_: int) -> str:
    return f"{_group(device, dtype, head_dim)}|{'causal' if causal else 'full'}|{bucket_}"


# ----------------------------------------------------------------------------------------------------------
# reading: parsed once per (path, mtime, size), then dictionary lookups
# ----------------------------------------------------------------------------------------------------------

class _Index:
    """A parsed cache: entries grouped by (device, dtype, head_dim, causal), sorted by bucket."""

    def __init__(self, data: dict, path: str):
        self.groups: Dict[Tuple[str, str, int, bool], List[Tuple[int, dict, dict]]] = {}
        self.defaults: Dict[Tuple[str, str, int], dict] = {}
        for key, e in data.get("entries", {}).items():
            try:
                params = _valid_params(e["params"])
                group = (str(e["device"]), str(e["dtype"]), int(e["head_dim"]), bool(e["causal"]))
                self.groups.setdefault(group, []).append((int(e["bucket"]), params, e))
            except (KeyError, TypeError, ValueError) as err:
                warnings.warn(f"tuning cache {path}: entry {key!r} ignored ({err})", CacheWarning, stacklevel=4)
        for group in self.groups.values():
            group.sort(key=lambda item: item[0])
        for key, e in data.get("defaults", {}).items():
            try:
                params = _valid_params({"min_seq_len": e["min_seq_len"]})
                self.defaults[(str(e["device"]), str(e["dtype"]), int(e["head_dim"]))] = dict(e, params=params)
            except (KeyError, TypeError, ValueError) as err:
                warnings.warn(f"tuning cache {path}: default {key!r} ignored ({err})", CacheWarning, stacklevel=4)

    def find(self, device, dtype, head_dim, causal, seq_len) -> Optional[Tuple[str, dict, dict]]:
        entries = self.groups.get((device, dtype, head_dim, causal))
        if entries:
            target = math.log2(max(seq_len, 1))
            # nearest bucket in log scale; on a tie the larger bucket (it was tuned nearer the long end)
            b, params, e = min(entries, key=lambda item: (abs(math.log2(item[0]) - target), -item[0]))
            return "entry", params, e
        default = self.defaults.get((device, dtype, head_dim))
        if default is not None:
            return "device default", default["params"], default
        return None


def _valid_params(params) -> dict:
    """Only `HyperConfig` fields, with values it accepts. Raises ValueError otherwise."""
    if not isinstance(params, dict):
        raise ValueError("params is not an object")
    unknown = set(params) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    HyperConfig(**params)  # range checks
    return dict(params)


_parsed: Dict[str, Tuple[Tuple[int, int], Optional[_Index]]] = {}


def _index(path: str) -> Optional[_Index]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _parsed.get(path)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    data = _read(path)
    index = _Index(data, path) if data is not None else None
    _parsed[path] = (stamp, index)
    return index


def _read(path: str, *, quiet: bool = False) -> Optional[dict]:
    """The file's content if it is a cache of this version; None (with a warning) otherwise."""
    problem = None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        data, problem = None, f"unreadable ({e})"
    if problem is None:
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            problem = "not a hyper_backend tuning cache"
        elif data.get("version") != VERSION:
            problem = f"schema version {data.get('version')!r}, this hyper_backend reads version {VERSION}"
        elif not isinstance(data.get("entries", {}), dict) or not isinstance(data.get("defaults", {}), dict):
            problem = "malformed (entries/defaults are not objects)"
    if problem is not None:
        if not quiet:
            warnings.warn(f"tuning cache {path} ignored: {problem}", CacheWarning, stacklevel=4)
        return None
    return data


def lookup_tuned(path: str, *, device: torch.device, dtype: torch.dtype, head_dim: int, causal: bool,
                 seq_len: int) -> Optional[dict]:
    """Tuned parameters for a call, or None.

    Returns a dict with some of the `HyperConfig` field names (``block_size``, ``sample_size``,
    ``lsh_num_projs``, ``min_seq_len``, ``causal_depth`` (may be None), ``seed``) from the entry of the
    nearest tuned length bucket for this device, dtype, head dim and causality, else ``{"min_seq_len": ...}``
    from the device default, else None (no file, no match, or an unusable file, which warns once per version
    of the file). The parsed file is kept per path and modification time, so a call costs one ``os.stat``.
    """
    index = _index(path)
    if index is None:
        return None
    hit = index.find(device_key(device), dtype_name(dtype), int(head_dim), bool(causal), int(seq_len))
    return None if hit is None else dict(hit[1])


def describe_entry(path: str, *, device: torch.device, dtype: torch.dtype, head_dim: int, causal: bool,
                   seq_len: int) -> Optional[dict]:
    """What `lookup_tuned` would apply, with its provenance, for `hyper_backend.explain`.

    Returns None when nothing applies, else a dict: ``path``, ``source`` (``"entry"`` or ``"device default"``),
    ``key`` (the group), ``bucket`` (the tuned bucket, for an entry), ``params`` (as `lookup_tuned`),
    ``tuned`` (how the entry was measured: length, times, errors, budget, inputs) and ``summary`` (one line).
    """
    index = _index(path)
    if index is None:
        return None
    dev, dt = device_key(device), dtype_name(dtype)
    hit = index.find(dev, dt, int(head_dim), bool(causal), int(seq_len))
    if hit is None:
        return None
    source, params, raw = hit
    out = {"path": path, "source": source, "key": _group(dev, dt, int(head_dim)), "params": dict(params)}
    if source == "entry":
        out["bucket"] = raw["bucket"]
        out["tuned"] = dict(raw.get("tuned", {}))
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
        how = out["tuned"]
        extra = ""
        if "time_s" in how and "error" in how:
            extra = f"; tuned at n={how.get('seq_len')}: {how['time_s']:.3g} s, error {how['error']:.3g}"
        out["summary"] = (f"tuned entry {'causal' if causal else 'non-causal'} bucket {raw['bucket']} for "
                          f"n={seq_len}: {shown}{extra} ({path})")
    else:
        out["tuned"] = dict(raw.get("crossover", {}))
        out["summary"] = f"device default min_seq_len={params['min_seq_len']} for n={seq_len} ({path})"
    return out


# ----------------------------------------------------------------------------------------------------------
# writing: merge under a lock, replace atomically
# ----------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _locked(path: str):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path + ".lock", "a+") as lock:
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _set_aside(path: str) -> None:
    """Keep an unusable file next to the cache before replacing it (``.bad``, or ``.v<N>`` for another
    version of the schema, which a newer hyper_backend may still want)."""
    suffix = ".bad"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict) and data.get("schema") == SCHEMA and data.get("version") != VERSION:
            suffix = f".v{data.get('version')}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    os.replace(path, path + suffix)
    warnings.warn(f"tuning cache {path}: unusable file moved to {path + suffix}; starting a new cache",
                  CacheWarning, stacklevel=4)


def make_entry(*, device: str, dtype: str, head_dim: int, causal: bool, seq_len: int, params: dict,
               tuned: dict) -> dict:
    """An ``entries`` value (validated). ``params`` holds `HyperConfig` fields; ``tuned`` is free-form JSON."""
    return {"device": device, "dtype": dtype, "head_dim": int(head_dim), "causal": bool(causal),
            "bucket": bucket(seq_len), "params": _valid_params(params), "tuned": tuned}


def make_default(*, device: str, dtype: str, head_dim: int, min_seq_len: int, crossover: dict) -> dict:
    _valid_params({"min_seq_len": int(min_seq_len)})
    return {"device": device, "dtype": dtype, "head_dim": int(head_dim), "min_seq_len": int(min_seq_len),
            "crossover": crossover}


def record(path: str, entries: Iterable[dict] = (), defaults: Iterable[dict] = ()) -> None:
    """Merge ``entries`` (from `make_entry`) and ``defaults`` (from `make_default`) into the cache at ``path``,
    replacing those with the same key. Atomic and serialized across processes."""
    entries, defaults = list(entries), list(defaults)
    with _locked(path):
        data = _read(path, quiet=True) if os.path.exists(path) else None
        if data is None and os.path.exists(path):
            _set_aside(path)
        if data is None:
            data = {"schema": SCHEMA, "version": VERSION, "entries": {}, "defaults": {}}
        _drop_invalid(path, data)
        for e in entries:
            data["entries"][entry_key(e["device"], e["dtype"], e["head_dim"], e["causal"], e["bucket"])] = e
        for e in defaults:
            data["defaults"][_group(e["device"], e["dtype"], e["head_dim"])] = e
        _write_atomic(path, data)


def _drop_invalid(path: str, data: dict) -> None:
    """Remove entries and defaults a lookup would ignore, so they do not warn forever."""
    for section, check in (("entries", lambda e: _valid_params(e["params"]) and e["bucket"] > 0),
                           ("defaults", lambda e: _valid_params({"min_seq_len": e["min_seq_len"]}))):
        kept = {}
        for key, e in data.setdefault(section, {}).items():
            try:
                check(e)
                kept[key] = e
            except (KeyError, TypeError, ValueError) as err:
                warnings.warn(f"tuning cache {path}: dropping {section[:-1]} {key!r} ({err})", CacheWarning,
                              stacklevel=4)
        data[section] = kept


def _write_atomic(path: str, data: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tune-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
