"""``python -m hyper_backend.check``: validate the ``HYPER_*`` environment and print the settings a compile uses.

A deployment can run it before it serves traffic: it exits 0 and prints the resolved settings table, or exits 1
with one line per problem, each naming the variable, its value and the accepted forms. An unknown ``HYPER_*``
name (a typo such as ``HYPER_MIN_SEQLEN``, which the backend would silently ignore) is a problem too, reported
with the closest known name.

`check_env` is the same check as a function: it returns the resolved settings, or raises `EnvError`.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import sys
from dataclasses import dataclass, field

from hyper_backend import config
from hyper_backend.config import EnvError

_NAME = re.compile(r"""["'](HYPER_[A-Z0-9_]+)["']""")


def known_variables() -> tuple[str, ...]:
    """Every ``HYPER_*`` variable hyper_backend reads.

    `hyper_backend.config` is the one module that reads them, so its source names them all: this list cannot
    fall behind when a variable is added there.
    """
    names = set(config.ENV_FIELDS) | set(_NAME.findall(inspect.getsource(config)))
    return tuple(sorted(names))


@dataclass
class EnvReport:
    """The outcome of `check_env`: ``rows`` are ``(variable, value set or None, resolved, note)``."""

    rows: list[tuple[str, str | None, str, str]] = field(default_factory=list)

    def resolved(self, var: str) -> str:
        return next(r[2] for r in self.rows if r[0] == var)

    def table(self):
        from rich.table import Table

        t = Table(title="hyper_backend settings (options={...} in torch.compile override these)")
        for col, style in (("variable", "cyan"), ("set to", ""), ("resolved", "bold"), ("", "dim")):
            t.add_column(col, style=style or None, overflow="fold")
        for var, raw, resolved, note in self.rows:
            t.add_row(var, "[dim]unset[/dim]" if raw is None else repr(raw), resolved, note)
        t.caption = "tuned: resolved at compile time from the tuning cache's length buckets (the op reads no file)"
        return t

    def __rich__(self):
        return self.table()


def _problems(env) -> list[str]:
    """One line per bad or unknown ``HYPER_*`` variable in ``env``."""
    known = known_variables()
    out = []
    for var in sorted(v for v in env if v.startswith("HYPER_")):
        if var not in known:
            # compare what follows the common prefix, which would make every name look alike
            close = difflib.get_close_matches(var[6:], [k[6:] for k in known], n=1, cutoff=0.6)
            hint = f"did you mean HYPER_{close[0]}?" if close else f"known: {', '.join(known)}"
            out.append(f"{var} is not a hyper_backend variable ({hint}); it is ignored")
            continue
        try:  # each variable on its own, so that every bad one is reported
            config.read_env({var: env[var]})
        except EnvError as e:
            out.append(str(e))
    return out


def _cache_status(path: str) -> str:
    """One line on the tuning cache, read as the backend reads it (`hyper_backend.autotune.store.status`: no
    FIFO blocks it, no device or huge file is read without limit, no JSON raises)."""
    from hyper_backend.autotune.store import status

    return status(path)


def check_env() -> EnvReport:
    """Validate every ``HYPER_*`` variable of this process and resolve the settings a compile would use.

    Returns an `EnvReport` (print it, or its ``table()``, with rich). Raises `EnvError` whose message is one
    line naming each bad or unknown variable, its value and the accepted forms.
    """
    env = dict(os.environ)
    problems = _problems(env)
    if problems:
        raise EnvError("; ".join(problems))
    from hyper_backend.settings import resolve_settings

    settings = resolve_settings(None)  # exactly what the backend resolves at compile time
    explicit = dict(settings.explicit)
    by_field = {f: v for v, f in config.ENV_FIELDS.items()}
    known = known_variables()
    rows = []

    def row(var, resolved, note=""):
        rows.append((var, env.get(var), resolved, note))

    row("HYPER_ATTENTION", "on" if settings.enabled else "off: nothing is lowered")
    for name in config.FIELDS:
        var = by_field.get(name) or f"HYPER_{name.upper()}"
        if var not in known:
            continue
        default = getattr(config.HyperConfig(), name)
        if name in explicit:
            row(var, repr(explicit[name]), "explicit: beats the tuning cache")
        else:
            row(var, f"tuned, else {default!r}")
    row("HYPER_LAYERS", settings.layers.key())
    row("HYPER_INNER_BACKEND", settings.inner_backend)
    row("HYPER_TUNE_CACHE", settings.tune_cache or "''", _cache_status(settings.tune_cache))
    row("HYPER_KERNELS", settings.kernels, "read at compile time (at call time by hyper_attention)")
    row("HYPER_SERIAL_BOOKKEEPING", "on" if settings.serial_bookkeeping else "off", "read at compile time")
    for var in known:  # a variable config reads that the rows above do not describe yet
        if var not in {r[0] for r in rows}:
            row(var, "default" if var not in env else repr(env[var]), "see the README's table")
    return EnvReport(rows)


def main(argv=None) -> int:
    import argparse

    from rich.console import Console

    parser = argparse.ArgumentParser(prog="python -m hyper_backend.check", description=__doc__.split("\n")[0])
    parser.add_argument("--quiet", action="store_true", help="print nothing when the environment is valid")
    args = parser.parse_args(argv)
    try:
        report = check_env()
    except EnvError as e:
        for line in _problems(dict(os.environ)) or [str(e)]:
            print(f"hyper_backend.check: {line}", file=sys.stderr)
        return 1
    if not args.quiet:
        Console().print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
