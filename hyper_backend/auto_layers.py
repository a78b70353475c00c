"""``layers="auto"``: the per-site calibration of the model being compiled, read from the tuning cache.

The calibration (``python -m hyper_backend.autotune --model PATH``, `hyper_backend.autotune.calibrate`) writes,
per site, a config or "exact"; at compile time the backend identifies the model (`compiled_config`), finds its
record (`hyper_backend.autotune.cache.lookup_model`) and applies it (`auto_layers`).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from hyper_backend.lowering import sites as _sites
from hyper_backend.settings import Settings

_auto_warned: set = set()


class AutoLayersWarning(UserWarning):
    """``layers="auto"`` found no calibration for the model being compiled (it then swaps every site)."""


def compiled_config():
    """The ``config`` of the module being compiled: the first ``nn.Module`` with a ``config`` attribute among
    the compiled frame's locals (``self``, or ``args[0]`` when a decorator wraps ``forward``; HF models and
    their submodules carry the model's config), or None."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:  # noqa: BLE001 - not inside Dynamo (a direct compile_graph call)
        return None
    if tx is None:
        return None
    values = list(tx.f_locals.values())
    for v in list(values):
        if isinstance(v, (tuple, list)):
            values.extend(v[:4])
        elif isinstance(v, dict):
            values.extend(list(v.values())[:8])
    for v in values:
        if isinstance(v, torch.nn.Module) and getattr(v, "config", None) is not None:
            return v.config
    return None


def _site_shape(gm: fx.GraphModule, site: _sites.Site):
    """(dtype, key length) of a site from the node's fake value, without a guard (a symbolic length: its hint)."""
    from hyper_backend.lowering.masks import meta_val

    node = next((n for n in gm.graph.nodes if n.name == site.node), None)
    if node is None:
        return None, None
    if site.kind == "sdpa" and len(node.args) >= 2:
        q, k = meta_val(node.args[0]), meta_val(node.args[1])
        dtype, n = (getattr(q, "dtype", None), k.shape[-2] if isinstance(k, torch.Tensor) else None)
    else:
        v = meta_val(node)
        dtype, n = (v.dtype, v.shape[-1]) if isinstance(v, torch.Tensor) else (None, None)
    if isinstance(n, torch.SymInt):
        n = n.node.hint
    return dtype, (int(n) if n is not None else None)


def auto_layers(gm: fx.GraphModule, found: list[_sites.Site], settings: Settings, configs: dict, total: int):
    """``(selected, notes, calibrated)`` for ``layers="auto"``: a site with a calibrated config gets it (explicit
    options / ``HYPER_*`` fields still win, field by field), a site calibrated exact stays exact (``notes``
    holds why), and without a calibration for this model every site is selected at the settings' own config
    (as ``layers="all"``), with one warning per model and process.

    The model is identified by `hyper_backend.autotune.cache.model_fingerprint`: the ``config`` of the module
    being compiled (`compiled_config`) and ``total``, the sites numbered so far in this ``torch.compile``
    call; the length bucket is the nearest to the longest key length among this graph's sites."""
    from hyper_backend.autotune import cache as _cache
    from hyper_backend.config import HyperConfig

    config = compiled_config()
    shapes = [_site_shape(gm, s) for s in found]
    dtype = next((d for d, _ in shapes if d is not None), None)
    lengths = [n for _, n in shapes if n is not None]
    entry = None
    if config is not None and dtype is not None and lengths and settings.tune_cache:
        entry = _cache.lookup_model(
            settings.tune_cache, config=config, dtype=dtype, seq_len=max(lengths), sites_seen=total
        )
    if entry is None:
        why = (
            "the compiled module has no `config` (see hyper_backend.backend.compiled_config)"
            if config is None
            else "tuning disabled (tune_cache='')"
            if not settings.tune_cache
            else f"no calibration for this model ({total} sites, {dtype}) in {settings.tune_cache}"
        )
        key = (why, _cache.config_hash(config) if config is not None else None)
        if key not in _auto_warned:
            _auto_warned.add(key)
            import warnings

            warnings.warn(
                f"layers='auto': {why}; swapping every site as layers='all' (calibrate with "
                f"`python -m hyper_backend.autotune --model PATH --text FILE --seq N`)",
                AutoLayersWarning,
                stacklevel=2,
            )
        for s in found:
            configs[s.index] = "auto: no calibration for this model, as layers=all"
        return (lambda site: True), {}, None
    at = f"auto: tuned for this model at {_cache.length_text(entry['bucket'])}"
    explicit = dict(settings.explicit)
    args, notes = {}, {}
    for s in found:
        tuned = entry["sites"].get(str(s.index))
        if tuned is None:
            notes[s.index] = f"{at}, but the calibration has no entry for site {s.index}: kept exact"
        elif "exact" in tuned:
            notes[s.index] = f"{at}: exact ({tuned['exact']})"
        else:
            params = {**tuned["params"], **explicit}
            args[s.index] = params
            over = f" (explicit: {', '.join(sorted(explicit))})" if explicit else ""
            configs[s.index] = f"{at}: {HyperConfig(**params).label()}{over}"
        if s.index in notes:
            configs[s.index] = notes[s.index]
    return (lambda site: site.index in args), notes, args
