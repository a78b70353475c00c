"""The one progress protocol of the tuner and the calibration; `hyper_backend.autotune.display.RichProgress`
shows it with rich, and this no-op base is what a caller that wants no output passes (or nothing)."""

from __future__ import annotations


class Progress:
    """What a long run reports: ``phase`` (a new stage, logged as a line), ``steps`` (a counted stage: a bar of
    ``total``), ``advance`` (one step done) and ``note`` (a line about a finished item: a screened candidate, a
    race round). Every method does nothing here."""

    def phase(self, text: str) -> None: ...

    def steps(self, text: str, total: int) -> None: ...

    def advance(self) -> None: ...

    def note(self, text: str) -> None: ...


def duration(x: float) -> str:
    """``0.0123`` -> ``12.3 ms``, ``2.5`` -> ``2.50 s``; ``-`` for NaN or infinity."""
    if x != x or x == float("inf"):
        return "-"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"
