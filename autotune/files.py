"""The tuning cache's file layer: reading a path that may hold anything, and replacing a file safely.

Reading (`load`) opens only a regular file (a FIFO would block, a device node may never end or have side
effects), never reads more than `MAX_BYTES`, and parses JSON without the two ways untrusted JSON raises out of
``json``: nesting deep enough for a RecursionError, and integer literals longer than Python converts (they are
kept as strings, so one hostile number costs one entry, not the file). Anything else unusable raises `Unusable`
with a one-line reason.

Writing (`locked`, `write_atomic`, `keep_copy`) is the mechanics `hyper_backend.autotune.writer` builds on: an
exclusive ``flock`` on ``<path>.lock``, a temporary file in the same directory renamed over the target, and a
copy kept under a name that does not exist yet. This module knows nothing about the cache's schema.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Callable

try:
    import fcntl
except ImportError:  # not POSIX: writes stay atomic, but concurrent writers may drop each other's entries
    fcntl = None

MAX_BYTES = 64 << 20  # a larger file is not a tuning cache (an entry is well under a kilobyte)
MAX_INT_DIGITS = 4300  # longer integer literals are kept as strings (and so fail validation), never parsed
EMPTY = object()  # what `load` returns for an empty file


class Unusable(Exception):
    """The path exists but holds nothing this module can read as JSON; ``str()`` is one line saying why."""


def shown(text, limit: int = 200) -> str:
    """``text`` on one line, at most ``limit`` characters (messages quote untrusted content)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown_path(path: str) -> str:
    return path if isinstance(path, str) and path.isprintable() else repr(path)


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symlink"),
)


def kind(mode: int) -> str:
    """What a non-regular ``st_mode`` is, in words."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _parse_int(text: str):
    return text if len(text) > MAX_INT_DIGITS else int(text)


def load(path: str):
    """The JSON content of the regular file at ``path`` (symlinks followed), or `EMPTY` for an empty file.

    Raises FileNotFoundError when nothing is there, `Unusable` for anything else that is not readable JSON."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, TypeError) as e:  # ValueError: a NUL byte; TypeError: not a path at all
        raise Unusable(f"cannot be inspected ({shown(e)})") from None
    if not stat.S_ISREG(st.st_mode):
        raise Unusable(f"is {kind(st.st_mode)}, not a regular file")
    if st.st_size > MAX_BYTES:
        raise Unusable(f"is {st.st_size} bytes, larger than a tuning cache can be ({MAX_BYTES})")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise Unusable(f"cannot be read ({shown(e)})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # replaced between stat and open
            raise Unusable("is not a regular file")
        try:
            raw = f.read(MAX_BYTES + 1)
        except OSError as e:
            raise Unusable(f"cannot be read ({shown(e)})") from None
    if len(raw) > MAX_BYTES:
        raise Unusable(f"is larger than a tuning cache can be ({MAX_BYTES} bytes)")
    if not raw:
        return EMPTY
    try:
        return json.loads(raw.decode("utf-8"), parse_int=_parse_int)
    except RecursionError:
        raise Unusable("is not JSON this module can read (nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise Unusable(f"is not JSON ({shown(e)})") from None


# ----------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(real: str, refused: Callable[[str], Exception]):
    """An exclusive lock on ``<real>.lock``, which must be a regular file (created if missing, never followed);
    else ``refused(why)`` is raised."""
    os.makedirs(os.path.dirname(real), exist_ok=True)
    lock_path = real + ".lock"
    try:
        st = os.lstat(lock_path)
        if not stat.S_ISREG(st.st_mode):
            raise refused(f"has a lock path {shown_path(lock_path)} that is {kind(st.st_mode)}")
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
            raise refused(f"has a lock path {shown_path(lock_path)} that is not a regular file")
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def umask() -> int:
    """The process umask, read without changing it where ``/proc`` allows."""
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


def keep_copy(real: str, suffix: str) -> str | None:
    """Keep the file ``real`` as it is now under ``real + suffix`` (``.1``, ``.2``, ... appended if taken), before
    a write replaces it: a hard link when the file system has them (the file stays in place for the write),
    else a rename. Never overwrites anything. Returns the name, or None when every name up to ``.999`` is
    taken. Call it holding `locked`."""
    base = real + suffix
    for i in range(1000):
        candidate = base if i == 0 else f"{base}.{i}"
        try:
            os.link(real, candidate)  # fails if candidate exists
        except FileExistsError:
            continue
        except OSError:  # no hard links here: rename, after checking (we hold the lock)
            if os.path.lexists(candidate):
                continue
            os.rename(real, candidate)
        return candidate
    return None


def write_atomic(path: str, data: dict, like: os.stat_result | None = None) -> None:
    """Replace the regular file ``path`` (already resolved) with ``data`` as JSON. Mode: ``like``'s (the file
    being updated), else ``0o666 & ~umask`` as for any new file; ``like``'s owner too, where we may set it."""
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
            os.fchmod(f.fileno(), stat.S_IMODE(like.st_mode) if like is not None else 0o666 & ~umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
