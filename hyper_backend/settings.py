"""The settings of one compile (or one eager call), resolved once: ``options`` > ``HYPER_*`` > tuned > defaults.

`resolve_settings` reads the options and the environment; `Settings.op_settings` turns them, for one attention
site (its device, dtype, head dim and causality), into the `OpSettings` the op receives: explicit fields over the
autotuner's table of length buckets over the defaults. Nothing here runs at the op's run time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from hyper_backend.config import (
    FIELDS,
    INNER_BACKENDS,
    KERNEL_CHOICES,
    RESIDUALS,
    HyperConfig,
    LayerSelection,
    OpSettings,
    default_tune_cache,
    op_settings,
    read_env,
)

OPTIONS = FIELDS + ("enabled", "layers", "inner_backend", "tune_cache", "kernels", "serial_bookkeeping")


@dataclass(frozen=True)
class Settings:
    """Everything that decides the rewrite of one graph, resolved at compile time."""

    enabled: bool = True
    explicit: tuple = ()  # ((field, value), ...) of HyperConfig fields set by options or env
    layers: LayerSelection = LayerSelection("all")
    inner_backend: str = "inductor"
    tune_cache: str = ""
    kernels: str = "auto"
    serial_bookkeeping: bool = True

    def op_settings(
        self,
        *,
        device: torch.device,
        dtype: torch.dtype,
        head_dim: int | torch.SymInt,
        causal: bool,
        explicit: Mapping | None = None,
    ) -> OpSettings:
        """The op's settings for a site on ``device`` with ``dtype`` and ``head_dim``: ``explicit`` (default: the
        options and ``HYPER_*`` fields) over the tuning cache's length buckets for that group over the defaults."""
        table = ()
        if self.tune_cache:
            from hyper_backend.autotune.store import tuned_head_dims, tuned_table

            if isinstance(head_dim, torch.SymInt):  # dynamic=True: guard on it only if some head dim is tuned
                tuned = tuned_head_dims(self.tune_cache, device=device, dtype=dtype, causal=causal)
                head_dim = int(head_dim) if tuned else head_dim.node.hint
            table = tuned_table(self.tune_cache, device=device, dtype=dtype, head_dim=head_dim, causal=causal)
        fields = dict(self.explicit) if explicit is None else explicit
        return op_settings(fields, table, kernels=self.kernels, serial_bookkeeping=self.serial_bookkeeping)

    def key(self) -> str:
        """Every setting that changes a rewrite, as text; with `tuning_digest`, what a cached graph must match."""
        return repr(
            (
                self.enabled,
                self.explicit,
                self.layers.key(),
                self.inner_backend,
                self.tune_cache,
                self.kernels,
                self.serial_bookkeeping,
            )
        )

    def tuning_digest(self) -> str:
        """A fingerprint of the tuning cache's content ("" without one)."""
        if not self.tune_cache:
            return ""
        from hyper_backend.autotune.store import digest

        return digest(self.tune_cache)


def validate_options(options: Mapping[str, Any] | None) -> dict:
    """Check ``options`` of ``torch.compile(..., backend="hyper")``; a ValueError names the bad option."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"backend='hyper' options must be a dict, got {type(options).__name__}")
    out = {}
    for name, value in options.items():
        if name not in OPTIONS:
            raise ValueError(f"unknown option {name!r} for backend='hyper'; accepted: {', '.join(OPTIONS)}")
        if name == "residual":  # which residuals a detector allows is checked on the merged settings
            if value is not None and value not in RESIDUALS:
                raise ValueError(f"options['residual'] must be one of {', '.join(RESIDUALS)} or None, got {value!r}")
        elif name in FIELDS:
            try:
                HyperConfig(**{name: value})
            except ValueError as e:
                raise ValueError(f"options[{name!r}]: {e}") from None
        elif name in ("enabled", "serial_bookkeeping"):
            if not isinstance(value, bool):
                raise ValueError(f"options[{name!r}] must be True or False, got {value!r}")
        elif name == "layers":
            try:
                value = LayerSelection.parse(value)
            except ValueError as e:
                raise ValueError(f"options['layers']={value!r}: {e}") from None
        elif name == "inner_backend":
            if value not in INNER_BACKENDS:
                raise ValueError(f"options['inner_backend']={value!r}: expected one of {', '.join(INNER_BACKENDS)}")
        elif name == "kernels":
            if value not in KERNEL_CHOICES:
                raise ValueError(f"options['kernels']={value!r}: expected one of {', '.join(KERNEL_CHOICES)}")
        elif name == "tune_cache":
            if not isinstance(value, str):
                raise ValueError(f"options['tune_cache'] must be a path string ('' disables tuning), got {value!r}")
        out[name] = value
    return out


def resolve_settings(options: Mapping[str, Any] | None = None) -> Settings:
    """``options`` > ``HYPER_*`` env (via `hyper_backend.config.read_env`) > defaults."""
    merged = {**read_env(), **validate_options(options)}
    explicit = {f: merged[f] for f in FIELDS if f in merged}
    try:
        HyperConfig(**explicit)
    except ValueError as e:
        raise ValueError(f"backend='hyper' settings (options over HYPER_* env): {e}") from None
    return Settings(
        enabled=merged.get("enabled", True),
        explicit=tuple((f, merged[f]) for f in FIELDS if f in merged),
        layers=merged.get("layers", LayerSelection("all")),
        inner_backend=merged.get("inner_backend", "inductor"),
        tune_cache=merged["tune_cache"] if "tune_cache" in merged else default_tune_cache(),
        kernels=merged.get("kernels", "auto"),
        serial_bookkeeping=merged.get("serial_bookkeeping", True),
    )
