"""The tuning cache as the backend reads it: parsed once per file version, then dictionary lookups.

Readers: `hyper_backend.settings` (`tuned_table`, `tuned_head_dims`, `digest`: the op's settings, resolved at
compile time), `hyper_backend.report` (`describe_entry`), `hyper_backend.auto_layers` (`lookup_model`) and
`hyper_backend.check` (`status`). The schema is in `hyper_backend.autotune.schema`; writing is
`hyper_backend.autotune.writer`.

Reading never fails a compile or a call: a missing or empty file means nothing is tuned; a path that is not a
well-formed cache of this version (not a regular file, over 64 MiB, not JSON, nested too deeply, JSON of
another program, another schema version) is ignored with one `CacheWarning` per version of the file, and so is
each entry whose fields are out of range (a bucket below 1, a number of more than 4300 digits, params
`HyperConfig` refuses, a calibration without site module paths, ...), with one warning per file version for
all of them. A lookup takes the entry of the nearest tuned length bucket (in log scale, a tie going to the
larger bucket) for the same device, dtype, head dim and causality; with none, the device default
``min_seq_len`` if there is one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings

import torch

from . import files, schema
from .fingerprint import config_hash

_Problems = list[tuple[str, str, str]]  # (section, key, why)


class CacheWarning(UserWarning):
    """The tuning cache, or some of its entries, could not be used (ignored, never fatal)."""


class Index:
    """A parsed cache: entries grouped by (device, dtype, head_dim, causal), sorted by bucket; device defaults;
    model calibrations by (config_hash, dtype). ``problems``: the records it ignored, with why."""

    def __init__(self, data: dict):
        self.groups: dict[tuple[str, str, int, bool], list[tuple[int, dict, dict]]] = {}
        self.defaults: dict[tuple[str, str, int], dict] = {}
        self.models: dict[tuple[str, str], list[dict]] = {}
        self.problems: _Problems = []
        for section, check in schema.FIELD_CHECKS.items():
            for key, value in data.get(section, {}).items():
                try:
                    fields = check(value)
                except ValueError as err:
                    self.problems.append((section, key, str(err)))
                    continue
                if section == "entries":
                    group, b, params = fields
                    self.groups.setdefault(group, []).append((b, params, value))
                elif section == "defaults":
                    group, params = fields
                    self.defaults[group] = dict(value, params=params)
                else:
                    self.models.setdefault((value["config_hash"], value["dtype"]), []).append(value)
        for entries in self.groups.values():
            entries.sort(key=lambda item: item[0])

    def find(self, device, dtype, head_dim, causal, seq_len) -> tuple[str, dict, dict] | None:
        """(``"entry"`` | ``"device default"``, params, the raw record) for one call, or None."""
        entries = self.groups.get((device, dtype, head_dim, causal))
        if entries:
            target = math.log2(max(seq_len, 1))
            _, params, e = min(entries, key=lambda item: (abs(math.log2(item[0]) - target), -item[0]))
            return "entry", params, e
        default = self.defaults.get((device, dtype, head_dim))
        if default is not None:
            return "device default", default["params"], default
        return None


def problems_list(problems: _Problems, limit: int = 3) -> str:
    """``entries 'key' (why); ...`` for at most ``limit`` of them, on one line."""
    shown = "; ".join(f"{section} {files.shown(repr(key), 60)} ({why})" for section, key, why in problems[:limit])
    return shown + (f"; and {len(problems) - limit} more" if len(problems) > limit else "")


def problems_text(problems: _Problems, limit: int = 3) -> str:
    """``N ignored: entries 'key' (why); ...``, on one line."""
    return f"{len(problems)} ignored: {problems_list(problems, limit)}"


def read(path: str) -> tuple[dict | None, str]:
    """``(data, "")`` for a cache of this version, ``(None, "")`` for a missing or empty file (nothing tuned
    yet), ``(None, why)`` for anything else at ``path`` (one line). Never raises, never blocks."""
    try:
        data = files.load(path)
    except FileNotFoundError:
        return None, ""
    except files.Unusable as e:
        return None, str(e)
    if data is files.EMPTY:
        return None, ""
    kind, why = schema.classify(data)
    return (data, "") if kind == "current" else (None, why)


_parsed: dict[str, tuple[tuple, Index | None]] = {}  # path -> (file stamp, index): the parse of each version


def _index(path: str) -> Index | None:
    """The parsed cache at ``path`` (None: nothing usable), parsed once per (inode, mtime, size, mode); warns
    once per version of the file about what it ignores."""
    try:
        st = os.stat(path)
    except (OSError, ValueError, TypeError):  # absent, unreachable, or not a path at all (NUL byte)
        return None
    stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode)
    hit = _parsed.get(path)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    data, why = read(path)
    try:
        index = Index(data) if data is not None else None
    except Exception as e:  # noqa: BLE001 - a cache must never break a compile or a call: say so and go on
        index, why = None, f"{type(e).__name__}: {files.shown(e)}"
    where = files.shown_path(path)
    if why:
        warnings.warn(f"tuning cache {where} ignored: {why}", CacheWarning, stacklevel=3)
    elif index is not None and index.problems:
        warnings.warn(f"tuning cache {where}: {problems_text(index.problems)}", CacheWarning, stacklevel=3)
    _parsed[path] = (stamp, index)
    return index


# ----------------------------------------------------------------------------------------------------------
# lookups
# ----------------------------------------------------------------------------------------------------------


def lookup_tuned(
    path: str, *, device: torch.device, dtype: torch.dtype, head_dim: int, causal: bool, seq_len: int
) -> dict | None:
    """Tuned `HyperConfig` fields for one call (a tuned entry's ``params``, or ``{"min_seq_len": ...}`` from the
    device default), or None. Every value returned is one `HyperConfig` accepts."""
    index = _index(path)
    if index is None:
        return None
    hit = index.find(schema.device_key(device), schema.dtype_name(dtype), int(head_dim), bool(causal), int(seq_len))
    return None if hit is None else dict(hit[1])


def tuned_table(path: str, *, device: torch.device, dtype: torch.dtype, head_dim: int, causal: bool) -> tuple:
    """Every length's `lookup_tuned` answer at once: ``((start, params), ...)``, starts increasing from 0, where
    ``params`` serves lengths from its start to the next one; ``((0, {"min_seq_len": ...}),)`` from the device
    default when nothing is tuned for this group; ``()`` when nothing applies. The backend resolves this at
    compile time into the op's settings (`hyper_backend.config.op_settings`), so the op never reads the file."""
    index = _index(path)
    if index is None:
        return ()
    group = (schema.device_key(device), schema.dtype_name(dtype), int(head_dim), bool(causal))
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
    dev, dt = schema.device_key(device), schema.dtype_name(dtype)
    dims = {g[2] for g in index.groups if g[0] == dev and g[1] == dt and g[3] == bool(causal)}
    return frozenset(dims | {g[2] for g in index.defaults if g[0] == dev and g[1] == dt})


def digest(path: str) -> str:
    """A fingerprint of the cache's content ("" when there is no usable cache): part of the key of every compiled
    graph whose settings were resolved from it."""
    data, _ = read(path)
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
    dev, dt = schema.device_key(device), schema.dtype_name(dtype)
    hit = index.find(dev, dt, int(head_dim), bool(causal), int(seq_len))
    if hit is None:
        return None
    source, params, raw = hit
    out = {"path": path, "source": source, "key": schema.group_key(dev, dt, int(head_dim)), "params": dict(params)}
    if source == "entry":
        out["bucket"] = raw["bucket"]
        out["tuned"] = dict(raw.get("tuned", {}))
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
        how = out["tuned"]
        extra = ""
        if _number(how.get("time_s")) and _number(how.get("error")):
            extra = (
                f"; tuned at n={files.shown(how.get('seq_len'), 40)}: {how['time_s']:.3g} s, error {how['error']:.3g}"
            )
        out["summary"] = (
            f"tuned entry {'causal' if causal else 'non-causal'} bucket {raw['bucket']} for "
            f"n={seq_len}: {shown}{extra} ({path})"
        )
    else:
        out["tuned"] = dict(raw.get("crossover", {}))
        out["summary"] = f"device default min_seq_len={params['min_seq_len']} for n={seq_len} ({path})"
    return out


def lookup_model(path: str, *, config, dtype: torch.dtype, seq_len: int, sites_seen: int) -> dict | None:
    """The calibration of the model with this ``config`` for ``layers="auto"``, or None.

    Among the records of its `config_hash` and dtype, those with ``num_sites`` equal to ``sites_seen`` (the
    sites numbered so far: all of them when the model compiles to one graph), else the fewest above it (with
    graph breaks, later graphs add sites); of those, the nearest length bucket (in log scale; ties go to the
    larger). Which compiled site a recorded site applies to is `hyper_backend.auto_layers`'s business (by
    module path, not by number). The returned record carries ``path``. Raises
    `hyper_backend.autotune.fingerprint.UnstableConfig` for a config with no stable hash."""
    if not path:
        return None
    index = _index(path)
    if index is None:
        return None
    found = [
        m for m in index.models.get((config_hash(config), schema.dtype_name(dtype)), ()) if m["num_sites"] >= sites_seen
    ]
    if not found:
        return None
    target = math.log2(max(int(seq_len), 1))
    best = min(found, key=lambda m: (m["num_sites"], abs(math.log2(m["bucket"]) - target), -m["bucket"]))
    return dict(best, path=path)


def status(path: str) -> str:
    """One line on the cache at ``path`` for `hyper_backend.check`: what it holds and what is ignored, why a
    file is ignored as a whole, or that there is none. Reads as `read` does (never blocks, never raises)."""
    if not path:
        return "disabled: defaults only"
    data, why = read(path)
    if why:
        return f"ignored: {why} (the backend uses the defaults)"
    if data is None:
        return "no tuning yet (python -m hyper_backend.autotune writes it)"
    try:
        index = Index(data)
    except Exception as e:  # noqa: BLE001 - as `_index`: reported, never raised
        return f"ignored: {type(e).__name__}: {files.shown(e)} (the backend uses the defaults)"
    held = (
        f"{sum(map(len, index.groups.values()))} tuned entries, {len(index.defaults)} device defaults, "
        f"{sum(map(len, index.models.values()))} model calibrations"
    )
    return held + (f"; {problems_text(index.problems, limit=1)}" if index.problems else "")
