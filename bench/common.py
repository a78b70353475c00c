"""Shared benchmark plumbing: device/version stamp, interleaved timing, peak-RSS sampling, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable

import torch


def device_stamp() -> dict:
    """The machine and versions, written into every result file."""
    from hyper_backend.autotune.schema import cpu_model

    stamp = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        import triton

        stamp["triton"] = triton.__version__
    except ImportError:
        stamp["triton"] = None
    import hyper_backend

    stamp["hyper_backend"] = hyper_backend.__version__
    return stamp


def summary(times: list) -> dict:
    """Median with spread (min, max, and the interquartile range when there are enough samples)."""
    times = sorted(times)
    out = {"median": statistics.median(times), "min": times[0], "max": times[-1], "n": len(times)}
    if len(times) >= 4:
        q = statistics.quantiles(times, n=4)
        out["iqr"] = q[2] - q[0]
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory above the starting level while the block runs (sampled every millisecond).

    Large tensors are mmapped and returned to the OS when freed, so the starting level is a fair baseline.
    """

    def __enter__(self):
        self.base = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        self.extra = self.peak - self.base


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleave(candidates: dict, repeats: int, budget_s: dict | None = None) -> dict:
    """Time each candidate ``repeats`` times, alternating between them so both see the same machine load.

    ``budget_s[name]``: stop repeating that candidate once its total time passes the budget (slow baselines
    at large n run once or twice). Every candidate runs at least once, after one untimed warm-up for those
    whose first timed run was quick.
    """
    budget_s = budget_s or {}
    times = {name: [] for name in candidates}
    for name, fn in candidates.items():  # warm-up, skipped for anything slow
        t = timed(fn)
        if t > 2.0:
            times[name].append(t)
    for _ in range(repeats):
        for name, fn in candidates.items():
            if len(times[name]) >= repeats:
                continue
            if times[name] and sum(times[name]) > budget_s.get(name, float("inf")):
                continue
            times[name].append(timed(fn))
    return {name: summary(ts) for name, ts in times.items()}


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


_TEXT_FIELDS = ("residual", "detector")  # HyperConfig fields given as strings; the rest are ints (or None)


def parse_value(name: str, text: str):
    """One ``HyperConfig`` field from text: residual and detector as given, ``none``/``auto`` as None, else int."""
    if name in _TEXT_FIELDS:
        return text
    return None if text.lower() in ("none", "auto") else int(text)


def parse_config(base, text: str):
    """``"sink_keys=4,local_window=128"`` applied to ``base`` (a `HyperConfig`)."""
    fields = {}
    for part in filter(None, text.replace(" ", "").split(",")):
        name, _, value = part.partition("=")
        fields[name] = parse_value(name, value)
    return base.replace(**fields)
