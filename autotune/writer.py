"""Writing the tuning cache: merge records into the file under a lock, replace it atomically, lose nothing.

`record` merges entries, defaults and model calibrations into the cache under an exclusive ``flock`` on
``<path>.lock`` and replaces the file atomically (a temporary file in the same directory, then ``os.replace``),
so concurrent tuning runs never corrupt it or lose each other's records. A write only ever replaces a file that
is ours:

- the path may be absent, an empty regular file, or a regular file holding a cache of our schema;
- anything else (a directory, a device node, a FIFO, a socket, a text file, JSON of another program, a file that
  cannot be read) is refused with `CachePathError` and left untouched; `check_writable` makes the same check,
  and probes the directory, so the tuner refuses before it tunes;
- a file of our schema but another version (or malformed) is set aside as ``<path>.v<N>`` (or ``<path>.bad``)
  and a new cache is started;
- a file of this version holding records this version rejects (say, an entry of a newer release with a params
  field this one does not know) is first copied to ``<path>.rejected``; the write then keeps the records it can
  use (so the rest stop warning at every read) and the copy keeps everything;
- a set-aside or copied file takes a name that does not exist yet (``<name>.1``, ``<name>.2``, ... when taken),
  so nothing is ever overwritten, and nothing else is ever renamed or deleted;
- symlinks are followed: the target is updated and the link kept;
- a new file gets mode ``0o666 & ~umask``; an updated file keeps its mode (and, best effort, its owner).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from . import files, schema
from .store import CacheWarning, problems_list


class CachePathError(OSError):
    """The cache path names something the tuner must not write; nothing was touched. ``str()`` is one line."""


def _real(path: str) -> str:
    """The file a write to ``path`` updates: symlinks resolved, so the link is kept and its target updated."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise CachePathError(f"tuning cache path {path!r} is not a file path")
    return os.path.realpath(path)


def _refuse(path: str, why: str) -> CachePathError:
    return CachePathError(
        f"tuning cache {files.shown_path(path)} {why}; refusing to write it (nothing was changed). "
        f"Move it away or choose another path (--cache or HYPER_TUNE_CACHE)"
    )


@dataclass
class _Target:
    """What is at the real cache path: ``kind`` is "absent", "empty", "current" (``data`` holds it) or "aside"
    (ours but unusable: ``suffix`` is where it goes); ``st`` is its stat (None when absent)."""

    kind: str
    data: dict | None = None
    suffix: str = ""
    st: os.stat_result | None = None


def _inspect(path: str, real: str) -> _Target:
    """Classify the file at ``real`` for a write, or raise `CachePathError` if it is not ours."""
    try:
        data = files.load(real)
    except FileNotFoundError:
        return _Target("absent")
    except files.Unusable as e:
        raise _refuse(path, str(e)) from None
    st = os.stat(real)
    if data is files.EMPTY:
        return _Target("empty", st=st)
    kind, why = schema.classify(data)
    if kind == "foreign":
        raise _refuse(path, why)
    if kind == "current":
        return _Target("current", data=data, st=st)
    return _Target("aside", suffix=schema.version_suffix(data), st=st)


def check_writable(path: str) -> str:
    """Raise `CachePathError` (one line, naming the path and the reason) unless `record` may write ``path``:
    absent, an empty regular file, or a cache of our schema, and its directory writable (created if missing,
    then probed with a temporary file). Returns the real path (symlinks resolved). Changes nothing else."""
    real = _real(path)
    directory = os.path.dirname(real)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise CachePathError(
            f"tuning cache {files.shown_path(path)}: cannot create its directory "
            f"{files.shown_path(directory)} ({e.strerror or files.shown(e)})"
        ) from None
    _inspect(path, real)  # first without the lock: a refused path gets no lock file next to it
    try:
        with files.locked(real, lambda why: _refuse(path, why)):
            _inspect(path, real)
            fd, probe = tempfile.mkstemp(prefix=".tune-probe-", suffix=".json", dir=directory)
            os.close(fd)
            os.unlink(probe)
    except CachePathError:
        raise
    except OSError as e:
        raise CachePathError(
            f"tuning cache {files.shown_path(path)}: its directory {files.shown_path(directory)} is not "
            f"writable ({e.strerror or files.shown(e)})"
        ) from None
    return real


def _keep(path: str, real: str, suffix: str, what: str) -> str:
    kept = files.keep_copy(real, suffix)
    if kept is None:
        raise _refuse(path, f"cannot be kept aside (every name {files.shown_path(real + suffix)}[.N] is taken)")
    warnings.warn(f"tuning cache {files.shown_path(path)}: {what} {files.shown_path(kept)}", CacheWarning, stacklevel=4)
    return kept


def _rejected(data: dict) -> list[tuple[str, str, str]]:
    """(section, key, why) of every record of ``data`` this version cannot use."""
    bad = []
    for section, check in schema.FIELD_CHECKS.items():
        for key, value in data[section].items():
            try:
                check(value)
            except ValueError as err:
                bad.append((section, key, str(err)))
    return bad


def record(path: str, entries: Iterable[dict] = (), defaults: Iterable[dict] = (), models: Iterable[dict] = ()) -> None:
    """Merge ``entries`` (`schema.make_entry`), ``defaults`` (`schema.make_default`) and ``models``
    (`schema.make_model`) into the cache at ``path``, replacing those with the same key. Atomic and serialized
    across processes. Raises `CachePathError` (and changes nothing) if ``path`` names something that is not
    ours; see the module docstring."""
    entries, defaults, models = list(entries), list(defaults), list(models)
    for section, records in (("entries", entries), ("defaults", defaults), ("models", models)):
        for r in records:  # never write what the next read would ignore (ValueError says why)
            schema.FIELD_CHECKS[section](r)
    real = _real(path)
    _inspect(path, real)  # first without the lock: a refused path gets no lock file next to it
    with files.locked(real, lambda why: _refuse(path, why)):
        target = _inspect(path, real)
        if target.kind == "aside":
            _keep(path, real, target.suffix, f"a file of schema {schema.SCHEMA} this version cannot use was kept as")
        data = target.data if target.kind == "current" else {"schema": schema.SCHEMA, "version": schema.VERSION}
        for section in schema.SECTIONS:
            data.setdefault(section, {})
        bad = _rejected(data)
        if bad:
            counts = {section: sum(b[0] == section for b in bad) for section in schema.SECTIONS}
            dropped = ", ".join(f"{n} {section}" for section, n in counts.items() if n)
            _keep(
                path,
                real,
                ".rejected",
                f"dropping {dropped} this version rejects ({problems_list(bad)}); the file as it was is kept as",
            )
            for section, key, _ in bad:
                del data[section][key]
        for e in entries:
            data["entries"][schema.entry_key(e["device"], e["dtype"], e["head_dim"], e["causal"], e["bucket"])] = e
        for e in defaults:
            data["defaults"][schema.group_key(e["device"], e["dtype"], e["head_dim"])] = e
        for m in models:
            data["models"][schema.model_key(m["fingerprint"], m["dtype"], m["bucket"])] = m
        files.write_atomic(real, data, like=target.st if target.kind in ("current", "empty") else None)
