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
      },
      "models": {                       # per-site calibrations, one per (model fingerprint, dtype, length bucket)
        "9c1e...|float32|8192": {
          "fingerprint": "9c1e...", "config_hash": "51d0...", "num_sites": 18, "model_type": "gemma3_text",
          "dtype": "float32", "bucket": 8192,
          "sites": {"5": {"exact": "fragile: ..."},           # calibrated exact
                    "11": {"params": {...every HyperConfig field}},
                    "0": {"exact": "masked (sliding window): never lowered"}},
          "calibrated": {...}           # how: budget, slices, verified perplexities, times, device, versions
        }
      }
    }

``models`` is optional and additive (written by ``python -m hyper_backend.autotune --model``, read by the
backend at compile time with ``layers="auto"``; `model_fingerprint` says what identifies a model): a file
without it is a valid version-1 cache, and a reader that predates it ignores it and keeps it when it writes,
so the section did not need a new schema version.

Buckets are powers of two: a length falls in the bucket of the nearest power of two (in log scale). A lookup
takes the entry of the nearest tuned bucket for the same device, dtype, head dim and causality; with none, the
device default ``min_seq_len`` if there is one. Devices are named ``cpu:<model name from /proc/cpuinfo>`` or
``cuda:<torch.cuda.get_device_name()>:sm<major><minor>``.

Reading never fails a call: a missing file means no tuning; anything else that is not a well-formed cache of
this version (not a regular file, not JSON, nested too deeply, numbers of more than 4300 digits, foreign JSON,
another schema version) is ignored with a `CacheWarning`, and so is each entry or default whose fields are
out of range (bucket < 1, params `HyperConfig` refuses, ...).

Writes (`record`) merge into the file under an exclusive ``fcntl.flock`` on ``<path>.lock`` and replace it
atomically (temporary file in the same directory, then ``os.replace``), so concurrent tuning runs never
corrupt it or lose each other's entries. A write only ever replaces a file that is ours:

- the path may be absent, an empty regular file, or a regular file holding a cache of our schema;
- anything else (a directory, a device node, a FIFO, a socket, a text file, JSON of another program, a file
  that cannot be read) is refused with `CachePathError` and left untouched; `check_writable` makes the same
  check, and probes the directory, so the tuner can refuse before it tunes;
- a file of our schema but another version (or malformed) is set aside next to it as ``<path>.v<N>`` (or
  ``<path>.bad``) under a name that does not exist yet (``<path>.v<N>.1``, ... if it does); nothing else is
  ever renamed or deleted;
- symlinks are followed: the target is updated and the link kept;
- a new file gets mode ``0o666 & ~umask``; an updated file keeps its mode (and, best effort, its owner).

This module imports neither the kernels nor the search code: the op imports it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import platform
import stat
import tempfile
import warnings
from collections.abc import Iterable

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


class CachePathError(OSError):
    """The cache path names something the tuner must not write; nothing was touched. ``str()`` is one line."""


MAX_BYTES = 64 << 20  # a larger file is not a tuning cache (an entry is well under a kilobyte)
MAX_INT_DIGITS = 4300  # longer integer literals are kept as strings (and so fail validation), never parsed


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


def _group(device: str, dtype: str, head_dim: int) -> str:
    return f"{device}|{dtype}|d{head_dim}"


def entry_key(device: str, dtype: str, head_dim: int, causal: bool, bucket_: int) -> str:
    return f"{_group(device, dtype, head_dim)}|{'causal' if causal else 'full'}|{bucket_}"


# ----------------------------------------------------------------------------------------------------------
# loading and classifying a file: shared by the op's reads and the tuner's writes
# ----------------------------------------------------------------------------------------------------------


def _shown(text: str, limit: int = 200) -> str:
    """``text`` on one line, at most ``limit`` characters (warnings and errors quote untrusted content)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shown_path(path: str) -> str:
    return path if path.isprintable() else repr(path)


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symlink"),
)


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


class _Unusable(Exception):
    """The file exists but is not something this module can read as JSON (the message says why)."""


def _parse_int(text: str):
    # Python refuses int() of more than 4300 digits (ValueError); keep such literals as strings instead, so one
    # hostile number costs one entry, not the file
    return text if len(text) > MAX_INT_DIGITS else int(text)


_EMPTY = object()


def _load(path: str):
    """The JSON content of the regular file at ``path`` (symlinks followed), or `_EMPTY` for an empty file.

    Raises FileNotFoundError when nothing is there, `_Unusable` for anything else that is not readable JSON.
    Only a regular file is ever opened (a FIFO would block, a device node may have side effects)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise _Unusable(f"cannot be inspected ({_shown(e)})") from None
    if not stat.S_ISREG(st.st_mode):
        raise _Unusable(f"is {_kind(st.st_mode)}, not a regular file")
    if st.st_size > MAX_BYTES:
        raise _Unusable(f"is {st.st_size} bytes, larger than a tuning cache can be ({MAX_BYTES})")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise _Unusable(f"cannot be read ({_shown(e)})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # replaced between stat and open
            raise _Unusable("is not a regular file")
        try:
            raw = f.read(MAX_BYTES + 1)
        except OSError as e:
            raise _Unusable(f"cannot be read ({_shown(e)})") from None
    if len(raw) > MAX_BYTES:
        raise _Unusable(f"is larger than a tuning cache can be ({MAX_BYTES} bytes)")
    if not raw:
        return _EMPTY
    try:
        return json.loads(raw.decode("utf-8"), parse_int=_parse_int)
    except RecursionError:
        raise _Unusable("is not JSON this module can read (nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise _Unusable(f"is not JSON ({_shown(e)})") from None


def _classify(data) -> tuple[str, str]:
    """(``"current"`` | ``"ours"`` | ``"foreign"``, why). ``"ours"``: our schema, unusable by this version."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        return "foreign", "holds JSON that is not a hyper_backend tuning cache"
    version = data.get("version")
    if version != VERSION or isinstance(version, bool):
        return "ours", f"schema version {_shown(repr(version), 40)}, this hyper_backend reads version {VERSION}"
    if not all(isinstance(data.get(section, {}), dict) for section in ("entries", "defaults", "models")):
        return "ours", "malformed (entries/defaults/models are not objects)"
    return "current", ""


# ----------------------------------------------------------------------------------------------------------
# validating entries: every field an entry or default must have, with the types and ranges a lookup needs
# ----------------------------------------------------------------------------------------------------------


def _int_field(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {_shown(repr(value), 60)}")
    return value


def _str_field(name: str, value) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {_shown(repr(value), 60)}")
    return value


def _valid_params(params) -> dict:
    """Only `HyperConfig` fields, with values it accepts. Raises ValueError otherwise."""
    if not isinstance(params, dict):
        raise ValueError("params is not an object")
    unknown = set(params) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown fields {_shown(sorted(map(str, unknown)), 120)}")
    try:
        HyperConfig(**params)  # range checks
    except (TypeError, ValueError) as e:
        raise ValueError(_shown(e, 160)) from None
    return dict(params)


def _entry_fields(e) -> tuple[tuple[str, str, int, bool], int, dict]:
    """((device, dtype, head_dim, causal), bucket, params) of an ``entries`` value; ValueError if unusable."""
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
            raise ValueError(f"causal must be true or false, got {_shown(repr(group[3]), 60)}")
        b = _int_field("bucket", e["bucket"], 1, 2**62)
        params = _valid_params(e["params"])
    except KeyError as missing:
        raise ValueError(f"no field {_shown(missing, 60)}") from None
    if not isinstance(e.get("tuned", {}), dict):
        raise ValueError("tuned is not an object")
    return group, b, params


def _default_fields(e) -> tuple[tuple[str, str, int], dict]:
    """((device, dtype, head_dim), params) of a ``defaults`` value; ValueError if unusable."""
    if not isinstance(e, dict):
        raise ValueError("not an object")
    try:
        group = (
            _str_field("device", e["device"]),
            _str_field("dtype", e["dtype"]),
            _int_field("head_dim", e["head_dim"], 1, 2**31 - 1),
        )
        params = _valid_params({"min_seq_len": e["min_seq_len"]})
    except KeyError as missing:
        raise ValueError(f"no field {_shown(missing, 60)}") from None
    if not isinstance(e.get("crossover", {}), dict):
        raise ValueError("crossover is not an object")
    return group, params


def _warn_ignored(path: str, what: str, problems: list[tuple[str, str]], stacklevel: int) -> None:
    """One warning for every ignored entry of a file (a hostile file may hold millions)."""
    if not problems:
        return
    shown = "; ".join(f"{_shown(repr(key), 60)} ({why})" for key, why in problems[:3])
    more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
    warnings.warn(
        f"tuning cache {_shown_path(path)}: {len(problems)} {what} ignored: {shown}{more}",
        CacheWarning,
        stacklevel=stacklevel,
    )


# ----------------------------------------------------------------------------------------------------------
# reading: parsed once per (path, inode, mtime, size), then dictionary lookups
# ----------------------------------------------------------------------------------------------------------


class _Index:
    """A parsed cache: entries grouped by (device, dtype, head_dim, causal), sorted by bucket."""

    def __init__(self, data: dict, path: str):
        self.groups: dict[tuple[str, str, int, bool], list[tuple[int, dict, dict]]] = {}
        self.defaults: dict[tuple[str, str, int], dict] = {}
        bad: list[tuple[str, str]] = []
        for key, e in data.get("entries", {}).items():
            try:
                group, b, params = _entry_fields(e)
            except ValueError as err:
                bad.append((key, str(err)))
                continue
            self.groups.setdefault(group, []).append((b, params, e))
        _warn_ignored(path, "entries", bad, stacklevel=5)
        for group in self.groups.values():
            group.sort(key=lambda item: item[0])
        bad = []
        for key, e in data.get("defaults", {}).items():
            try:
                group, params = _default_fields(e)
            except ValueError as err:
                bad.append((key, str(err)))
                continue
            self.defaults[group] = dict(e, params=params)
        _warn_ignored(path, "defaults", bad, stacklevel=5)
        self.models: dict[tuple[str, str], list[dict]] = {}  # (config_hash, dtype) -> model records
        bad = []
        for key, m in data.get("models", {}).items():
            try:
                _model_fields(m)
            except ValueError as err:
                bad.append((key, str(err)))
                continue
            self.models.setdefault((m["config_hash"], m["dtype"]), []).append(m)
        _warn_ignored(path, "models", bad, stacklevel=5)

    def find(self, device, dtype, head_dim, causal, seq_len) -> tuple[str, dict, dict] | None:
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


_parsed: dict[str, tuple[tuple, _Index | None]] = {}


def _index(path: str) -> _Index | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # absent, unreachable, or not a path at all (NUL byte)
        return None
    stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode)
    hit = _parsed.get(path)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    try:
        data = _read(path)
        index = _Index(data, path) if data is not None else None
    except Exception as e:  # noqa: BLE001 - a cache must never break a call; say what happened and go on
        warnings.warn(
            f"tuning cache {_shown_path(path)} ignored: {type(e).__name__}: {_shown(e)}", CacheWarning, stacklevel=3
        )
        index = None
    _parsed[path] = (stamp, index)
    return index


def _read(path: str, *, quiet: bool = False) -> dict | None:
    """The file's content if it is a cache of this version; None (with a warning unless ``quiet``) otherwise.
    A missing or empty file is None without a warning (nothing tuned yet)."""
    problem = None
    try:
        data = _load(path)
    except FileNotFoundError:
        return None
    except _Unusable as e:
        data, problem = None, str(e)
    if data is _EMPTY:
        return None
    if problem is None:
        kind, why = _classify(data)
        if kind != "current":
            problem = why
    if problem is not None:
        if not quiet:
            warnings.warn(f"tuning cache {_shown_path(path)} ignored: {problem}", CacheWarning, stacklevel=4)
        return None
    return data


def lookup_tuned(
    path: str, *, device: torch.device, dtype: torch.dtype, head_dim: int, causal: bool, seq_len: int
) -> dict | None:
    """Tuned parameters for a call, or None.

    Returns a dict with some of the `HyperConfig` field names (``block_size``, ``sample_size``,
    ``lsh_num_projs``, ``min_seq_len``, ``causal_depth`` (may be None), ``seed``, ...) from the entry of the
    nearest tuned length bucket for this device, dtype, head dim and causality, else ``{"min_seq_len": ...}``
    from the device default, else None (no file, no match, or an unusable file, which warns once per version
    of the file). Every value returned is one `HyperConfig` accepts; entries it refuses are ignored with a
    `CacheWarning`. The parsed file is kept per path and version, so a call costs one ``os.stat``.
    """
    index = _index(path)
    if index is None:
        return None
    hit = index.find(device_key(device), dtype_name(dtype), int(head_dim), bool(causal), int(seq_len))
    return None if hit is None else dict(hit[1])


def tuned_table(path: str, *, device: torch.device, dtype: torch.dtype, head_dim: int, causal: bool) -> tuple:
    """Every length's `lookup_tuned` answer at once: ``((start, params), ...)``, starts increasing from 0, where
    ``params`` serves lengths from its start to the next one (the nearest tuned bucket in log scale, a tie going
    to the larger bucket); ``((0, {"min_seq_len": ...}),)`` from the device default when nothing is tuned for
    this group; ``()`` when nothing applies. The backend resolves this at compile time into the op's settings
    (`hyper_backend.config.op_settings`), so the op never reads the file."""
    index = _index(path)
    if index is None:
        return ()
    group = (device_key(device), dtype_name(dtype), int(head_dim), bool(causal))
    entries = index.groups.get(group)
    if entries:
        rows = [(0, dict(entries[0][1]))]
        for (lo, _, _), (hi, params, _) in zip(entries, entries[1:]):
            rows.append((math.isqrt(lo * hi - 1) + 1, dict(params)))  # the least n with n**2 >= lo * hi
        return tuple(rows)
    default = index.defaults.get(group[:3])
    return () if default is None else ((0, dict(default["params"])),)


def tuned_head_dims(path: str, *, device: torch.device, dtype: torch.dtype, causal: bool) -> frozenset:
    """The head dims with an entry or a device default for this device, dtype and causality: a site whose head
    dim is symbolic (``dynamic=True``) depends on it only when this is not empty."""
    index = _index(path)
    if index is None:
        return frozenset()
    dev, dt = device_key(device), dtype_name(dtype)
    dims = {g[2] for g in index.groups if g[0] == dev and g[1] == dt and g[3] == bool(causal)}
    return frozenset(dims | {g[2] for g in index.defaults if g[0] == dev and g[1] == dt})


def digest(path: str) -> str:
    """A fingerprint of the cache's content ("" when there is no usable cache): part of the key of every compiled
    graph whose settings were resolved from it."""
    try:
        data = _read(path, quiet=True)
    except Exception:  # noqa: BLE001 - an unusable file is no cache
        return ""
    return "" if data is None else hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def describe_entry(
    path: str, *, device: torch.device, dtype: torch.dtype, head_dim: int, causal: bool, seq_len: int
) -> dict | None:
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
        if _number(how.get("time_s")) and _number(how.get("error")):
            extra = f"; tuned at n={_shown(how.get('seq_len'), 40)}: {how['time_s']:.3g} s, error {how['error']:.3g}"
        out["summary"] = (
            f"tuned entry {'causal' if causal else 'non-causal'} bucket {raw['bucket']} for "
            f"n={seq_len}: {shown}{extra} ({path})"
        )
    else:
        out["tuned"] = dict(raw.get("crossover", {}))
        out["summary"] = f"device default min_seq_len={params['min_seq_len']} for n={seq_len} ({path})"
    return out


# ----------------------------------------------------------------------------------------------------------
# writing: only a file that is ours; merge under a lock, replace atomically
# ----------------------------------------------------------------------------------------------------------


def _real(path: str) -> str:
    """The file a write to ``path`` updates: symlinks resolved, so the link is kept and its target updated."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise CachePathError(f"tuning cache path {path!r} is not a file path")
    return os.path.realpath(path)


def _refuse(path: str, why: str) -> CachePathError:
    return CachePathError(
        f"tuning cache {_shown_path(path)} {why}; refusing to write it (nothing was changed). "
        f"Move it away or choose another path (--cache or HYPER_TUNE_CACHE)"
    )


class _Target:
    """What is at the real cache path: ``kind`` is "absent", "empty", "current" (``data`` holds it) or "aside"
    (ours but unusable: ``suffix`` is where it goes); ``st`` is its stat (None when absent)."""

    def __init__(self, kind, data=None, suffix=None, st=None):
        self.kind, self.data, self.suffix, self.st = kind, data, suffix, st


def _inspect(path: str, real: str) -> _Target:
    """Classify the file at ``real`` for a write, or raise `CachePathError` if it is not ours."""
    try:
        data = _load(real)
    except FileNotFoundError:
        return _Target("absent")
    except _Unusable as e:
        raise _refuse(path, str(e)) from None
    st = os.stat(real)
    if data is _EMPTY:
        return _Target("empty", st=st)
    kind, why = _classify(data)
    if kind == "foreign":
        raise _refuse(path, why)
    if kind == "current":
        return _Target("current", data=data, st=st)
    version = data.get("version")
    ok = isinstance(version, int) and not isinstance(version, bool) and 0 <= version < 10**9
    return _Target("aside", suffix=f".v{version}" if ok and version != VERSION else ".bad", st=st)


@contextlib.contextmanager
def _locked(real: str, path: str | None = None):
    """An exclusive lock on ``<real>.lock``, which must be a regular file (created if missing)."""
    path = real if path is None else path
    directory = os.path.dirname(real)
    os.makedirs(directory, exist_ok=True)
    lock_path = real + ".lock"
    try:
        st = os.lstat(lock_path)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(path, f"has a lock path {_shown_path(lock_path)} that is {_kind(st.st_mode)}")
    except FileNotFoundError:
        pass
    flags = (
        os.O_RDWR
        | os.O_CREAT
        | getattr(os, "O_NOFOLLOW", 0)
        | getattr(os, "O_NONBLOCK", 0)
        | getattr(os, "O_CLOEXEC", 0)
    )
    fd = os.open(lock_path, flags, 0o666)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _refuse(path, f"has a lock path {_shown_path(lock_path)} that is not a regular file")
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read it the only portable way (and put it back at once)
    os.umask(mask)
    return mask


def check_writable(path: str) -> str:
    """Raise `CachePathError` (one line, naming the path and the reason) unless `record` may write ``path``:
    it must be absent, an empty regular file, or a cache of our schema, and its directory writable (created if
    missing, then probed with a temporary file). Returns the real path (symlinks resolved). Changes nothing
    else. The tuner calls this before it tunes."""
    real = _real(path)
    directory = os.path.dirname(real)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise CachePathError(
            f"tuning cache {_shown_path(path)}: cannot create its directory "
            f"{_shown_path(directory)} ({e.strerror or _shown(e)})"
        ) from None
    _inspect(path, real)  # first without the lock: a refused path gets no lock file next to it
    try:
        with _locked(real, path):
            _inspect(path, real)
            fd, probe = tempfile.mkstemp(prefix=".tune-probe-", suffix=".json", dir=directory)
            os.close(fd)
            os.unlink(probe)
    except CachePathError:
        raise
    except OSError as e:
        raise CachePathError(
            f"tuning cache {_shown_path(path)}: its directory {_shown_path(directory)} is not "
            f"writable ({e.strerror or _shown(e)})"
        ) from None
    return real


def _set_aside(path: str, real: str, suffix: str) -> str:
    """Keep a file of our schema that this version cannot use next to the cache, under a name that does not
    exist yet, before the write replaces it. Returns that name."""
    base = real + suffix
    for i in range(1000):
        candidate = base if i == 0 else f"{base}.{i}"
        try:
            os.link(real, candidate)  # fails if candidate exists: never overwrites; the write then replaces real
        except FileExistsError:
            continue
        except OSError:  # no hard links here: rename, after checking (we hold the lock)
            if os.path.lexists(candidate):
                continue
            os.rename(real, candidate)
        warnings.warn(
            f"tuning cache {_shown_path(path)}: a file of schema {SCHEMA} that this version cannot use "
            f"was kept as {_shown_path(candidate)}; starting a new cache",
            CacheWarning,
            stacklevel=4,
        )
        return candidate
    raise _refuse(path, f"cannot be set aside (every name {_shown_path(base)}[.N] is taken)")


def make_entry(
    *, device: str, dtype: str, head_dim: int, causal: bool, seq_len: int, params: dict, tuned: dict
) -> dict:
    """An ``entries`` value (validated). ``params`` holds `HyperConfig` fields; ``tuned`` is free-form JSON."""
    return {
        "device": device,
        "dtype": dtype,
        "head_dim": int(head_dim),
        "causal": bool(causal),
        "bucket": bucket(seq_len),
        "params": _valid_params(params),
        "tuned": tuned,
    }


def make_default(*, device: str, dtype: str, head_dim: int, min_seq_len: int, crossover: dict) -> dict:
    _valid_params({"min_seq_len": int(min_seq_len)})
    return {
        "device": device,
        "dtype": dtype,
        "head_dim": int(head_dim),
        "min_seq_len": int(min_seq_len),
        "crossover": crossover,
    }


def record(path: str, entries: Iterable[dict] = (), defaults: Iterable[dict] = (), models: Iterable[dict] = ()) -> None:
    """Merge ``entries`` (from `make_entry`), ``defaults`` (from `make_default`) and ``models`` (from
    `make_model`) into the cache at ``path``, replacing those with the same key. Atomic and serialized across
    processes.

    Raises `CachePathError` (and changes nothing) if ``path`` names something that is not ours; see the module
    docstring for the rules."""
    entries, defaults, models = list(entries), list(defaults), list(models)
    for m in models:
        _model_fields(m)
    real = _real(path)
    _inspect(path, real)  # first without the lock: a refused path gets no lock file next to it
    with _locked(real, path):
        target = _inspect(path, real)
        if target.kind == "aside":
            _set_aside(path, real, target.suffix)
        data = target.data if target.kind == "current" else {"schema": SCHEMA, "version": VERSION}
        data.setdefault("entries", {})
        data.setdefault("defaults", {})
        data.setdefault("models", {})
        _drop_invalid(path, data)
        for e in entries:
            data["entries"][entry_key(e["device"], e["dtype"], e["head_dim"], e["causal"], e["bucket"])] = e
        for e in defaults:
            data["defaults"][_group(e["device"], e["dtype"], e["head_dim"])] = e
        for m in models:
            data["models"][model_key(m["fingerprint"], m["dtype"], m["bucket"])] = m
        _write_atomic(real, data, like=target.st if target.kind in ("current", "empty") else None)


def _drop_invalid(path: str, data: dict) -> None:
    """Remove entries and defaults a lookup would ignore, so they do not warn forever."""
    for section, check in (("entries", _entry_fields), ("defaults", _default_fields), ("models", _model_fields)):
        kept, bad = {}, []
        for key, e in data[section].items():
            try:
                check(e)
                kept[key] = e
            except ValueError as err:
                bad.append((key, str(err)))
        if bad:
            shown = "; ".join(f"{_shown(repr(key), 60)} ({why})" for key, why in bad[:3])
            more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
            warnings.warn(
                f"tuning cache {_shown_path(path)}: dropping {len(bad)} {section}: {shown}{more}",
                CacheWarning,
                stacklevel=4,
            )
        data[section] = kept


def _write_atomic(path: str, data: dict, like: os.stat_result | None = None) -> None:
    """Replace the regular file ``path`` (already resolved) with ``data``. Mode: ``like``'s (the file being
    updated), else ``0o666 & ~umask`` as for any new file; ``like``'s owner too, where we may set it."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tune-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            if like is not None and hasattr(os, "fchown"):
                with contextlib.suppress(OSError):
                    os.fchown(f.fileno(), like.st_uid, like.st_gid)
            os.fchmod(f.fileno(), stat.S_IMODE(like.st_mode) if like is not None else 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------------------------------------
# per-model calibrations: the "models" section
# ----------------------------------------------------------------------------------------------------------

# config keys that do not change what the model computes per site: where the weights came from, the
# library version, the dtype (a key of its own), how attention is dispatched, output switches
_VOLATILE = {
    "_name_or_path",
    "name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "_commit_hash",
    "attn_implementation",
    "_attn_implementation",
    "_attn_implementation_internal",
    "_attn_implementation_autoset",
    "architectures",
    "use_cache",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    "torchscript",
    "use_return_dict",
    "_experts_implementation",
}


def _plain(value, depth: int = 0):
    """A JSON-able, order-independent form of a config value (nested configs and dicts included)."""
    if depth > 20:
        return repr(value)
    if hasattr(value, "to_dict") and callable(value.to_dict):
        value = value.to_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items() if str(k) not in _VOLATILE}
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def config_hash(config) -> str:
    """A hash of a model's configuration: an HF ``PretrainedConfig`` (``to_dict()``), a dict, or any object
    (its ``vars()``), without the keys in `_VOLATILE`. Weights and their path do not enter it."""
    body = _plain(config if hasattr(config, "to_dict") or isinstance(config, dict) else vars(config))
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def model_fingerprint(config, num_sites: int) -> str:
    """What identifies a model for ``layers="auto"``: `config_hash` of its configuration and its number of
    attention sites per forward. The calibration computes it from ``model.config`` and the SDPA calls of one
    forward; the backend, at compile time, from the ``config`` of the module being compiled and the sites it
    numbered (see ``hyper_backend.backend``)."""
    return hashlib.sha256(f"{config_hash(config)}|sites={int(num_sites)}".encode()).hexdigest()[:20]


def model_key(fingerprint: str, dtype: str, bucket_: int) -> str:
    return f"{fingerprint}|{dtype}|{bucket_}"


def make_model(
    *,
    config,
    num_sites: int,
    dtype: str,
    seq_len: int,
    sites: dict[int, dict],
    model_type: str = "",
    calibrated: dict | None = None,
) -> dict:
    """A ``models`` value (validated). ``sites``: site index -> ``{"params": {...}}`` (HyperAttention with these
    `HyperConfig` fields) or ``{"exact": "why"}``, plus any free-form fields (error, times)."""
    m = {
        "fingerprint": model_fingerprint(config, num_sites),
        "config_hash": config_hash(config),
        "num_sites": int(num_sites),
        "model_type": str(model_type),
        "dtype": dtype,
        "bucket": bucket(seq_len),
        "seq_len": int(seq_len),
        "sites": {str(i): dict(v) for i, v in sorted(sites.items())},
        "calibrated": dict(calibrated or {}),
    }
    _model_fields(m)
    return m


def _model_fields(m) -> None:
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
        raise ValueError(f"no field {_shown(missing, 60)}") from None
    if m["fingerprint"] != hashlib.sha256(f"{m['config_hash']}|sites={n}".encode()).hexdigest()[:20]:
        raise ValueError("fingerprint does not match config_hash and num_sites")
    if not isinstance(sites, dict):
        raise ValueError("sites is not an object")
    for key, site in sites.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < n):
            raise ValueError(f"site {_shown(repr(key), 40)} is not an index below num_sites={n}")
        if not isinstance(site, dict) or ("params" in site) == ("exact" in site):
            raise ValueError(f"site {key} must hold exactly one of params, exact")
        if "params" in site:
            _valid_params(site["params"])
        else:
            _str_field(f"site {key} exact", site["exact"])
    if not isinstance(m.get("calibrated", {}), dict):
        raise ValueError("calibrated is not an object")


def lookup_model(path: str, *, config, dtype: torch.dtype, seq_len: int, sites_seen: int) -> dict | None:
    """The calibration of this model for ``layers="auto"``, or None.

    Among the records of this `config_hash` and dtype, those with ``num_sites`` equal to ``sites_seen`` (the
    sites numbered so far: all of them when the model compiles to one graph), else the fewest above it (with
    graph breaks, later graphs add sites); of those, the nearest length bucket (in log scale; ties go to the
    larger). The returned record carries ``path``."""
    if not path:
        return None
    index = _index(path)
    if index is None:
        return None
    found = index.models.get((config_hash(config), dtype_name(dtype)), [])
    found = [m for m in found if m["num_sites"] >= sites_seen]
    if not found:
        return None
    target = math.log2(max(int(seq_len), 1))
    best = min(found, key=lambda m: (m["num_sites"], abs(math.log2(m["bucket"]) - target), -m["bucket"]))
    return dict(best, path=path)


def length_text(n: int) -> str:
    """``8192`` -> ``8k``, ``131072`` -> ``128k``, ``1000`` -> ``1000``."""
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)
