"""``layers="auto"``: the per-site calibration of the model being compiled, read from the tuning cache.

The calibration (``python -m hyper_backend.autotune --model PATH``, `hyper_backend.autotune.calibrate`) writes,
per site, a config or "exact", with the path of the module that made the attention call. At compile time the
backend identifies the model by the ``config`` of the module being compiled (`compiled_config`), finds its
record (`hyper_backend.autotune.store.lookup_model`) and applies it to the sites it can place (`place`).

**Placing a site.** Each site of the graph carries the path of its module from the module Dynamo is compiling
(the node's ``nn_module_stack``, e.g. ``model.layers.5.self_attn`` from an ``...ForCausalLM``). A recorded site
whose path (from the calibrated body, e.g. ``layers.5.self_attn``) ends that path is the same site. A graph
compiled on a submodule (``torch.compile(model.layers[5])``, a per-layer compile loop, a graph resumed after a
graph break inside a layer) has shorter paths (``self_attn``), and Dynamo reuses such a graph for every copy of
the submodule, so it may run for any recorded site whose path ends with its own: it gets their setting only if
they all share it, and stays exact otherwise. A site without a module path (an attention call in the compiled
frame's own code) may be any recorded site. Site numbers are not used: they restart in every
``torch.compile`` call and are shared by a reused graph.
"""

from __future__ import annotations

import re
import warnings

import torch
import torch.fx as fx

from hyper_backend.lowering import sites as _sites
from hyper_backend.settings import Settings

_auto_warned: set = set()  # (why, config hash): each warning once per process


class AutoLayersWarning(UserWarning):
    """``layers="auto"`` could not apply a calibration (no record for the model, an unplaceable graph)."""


# ----------------------------------------------------------------------------------------------------------
# the module being compiled, and each site's module path
# ----------------------------------------------------------------------------------------------------------

_ROOT = re.compile(r"^L\[[^\]]*\](?:\[[^\]]*\])*")
_PART = re.compile(r"\._modules\[['\"]([^'\"]*)['\"]\]|\[['\"]([^'\"]*)['\"]\]|\[(\d+)\]|\.(\w+)")


def _frame_locals() -> dict | None:
    """The locals of the frame Dynamo is compiling: the one internal call of ``layers="auto"``, kept here.

    Why no sounder route (checked on torch 2.13): a backend is given the graph and its example inputs. The module
    objects are not among them (with ``inline_inbuilt_nn_modules``, the default, parameters are lifted to
    placeholders whose sources lead to the parameters, not to their modules); ``gm.meta`` holds only
    ``dynamo_flat_name_to_original_fqn``, the compile id and the backend id; ``TracingContext.module_context``
    registers no modules; a node's ``nn_module_stack`` names each module by its source (``L['self'].layers[1]``)
    and type, but holds no object. The source names are rooted at the compiled frame's locals, and
    ``InstructionTranslator.current_tx()`` is only ever the root translator of that frame (an inlined call's
    translator never sets it), so its ``f_locals`` are the real objects the sources name: the values Dynamo's own
    ``OutputGraph.resolve_source_value`` reads. If torch moves this, the result is None: ``layers="auto"`` warns
    once and swaps every site (as ``layers="all"``), and the calibration tests fail."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:  # noqa: BLE001 - not inside Dynamo (a direct compile_graph call), or torch moved it
        return None
    return getattr(tx, "f_locals", None) if tx is not None else None


def _accessors(text: str) -> list[str | int]:
    """``['args'][0].model.layers[1]`` -> ``["args", 0, "model", "layers", 1]`` (names and indices only)."""
    out, pos = [], 0
    for m in _PART.finditer(text):
        if m.start() != pos:
            return []
        pos = m.end()
        name = next(g for g in m.groups() if g is not None)
        out.append(int(name) if m.group(3) is not None else name)
    return out if pos == len(text) else []


def _site_module(gm: fx.GraphModule, site: _sites.Site) -> tuple[str, str] | None:
    """``(root source, path)`` of the innermost module around the site's node (``("L['self']",
    "layers.1.self_attn")``), or None when the node has no module stack."""
    node = next((n for n in gm.graph.nodes if n.name == site.node), None)
    stack = node.meta.get("nn_module_stack") if node is not None else None
    if not stack:
        return None
    where = list(stack.values())[-1][0]
    root = _ROOT.match(where)
    if root is None:
        return None
    parts = _accessors(where[root.end() :])
    return root.group(0), ".".join(str(p) for p in parts)


def _resolve(source: str, scope: dict):
    """The object a Dynamo local source (``L['args'][0]``) names in ``scope``, or None."""
    value, parts = scope, _accessors(source[1:])
    try:
        for p in parts:
            value = value[p]
    except (KeyError, IndexError, TypeError):
        return None
    return value if parts else None


def compiled_config(gm: fx.GraphModule, found: list[_sites.Site]):
    """The ``config`` of the model being compiled, or None: that of the module the sites' module paths start from
    (``self``, or ``args[0]`` when a decorator wraps ``forward``), else of the first module on a site's path that
    has one (an HF decoder layer has none, its attention module has the model's); with no module path, that of
    the compiled frame's ``self``."""
    scope = _frame_locals()
    if scope is None:
        return None
    for site in found:
        where = _site_module(gm, site)
        root = _resolve(where[0], scope) if where is not None else scope.get("self")
        if not isinstance(root, torch.nn.Module):
            continue
        path = where[1].split(".") if where is not None and where[1] else []
        for depth in range(len(path) + 1):
            try:
                module = root.get_submodule(".".join(path[:depth]))
            except AttributeError:
                break
            config = getattr(module, "config", None)
            if config is not None:
                return config
    return None


# ----------------------------------------------------------------------------------------------------------
# placing compiled sites on recorded ones
# ----------------------------------------------------------------------------------------------------------


def _spans(indices) -> str:
    """``[0, 1, 2, 4]`` -> ``0-2,4``."""
    from hyper_backend.config import LayerSelection

    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in LayerSelection("set", indices=indices).ranges)


def place(modules: dict, path: str | None) -> tuple[list[int], bool]:
    """``(indices, placed)``: the recorded sites (``modules``: ``{index: module path}``) a compiled site with
    module ``path`` may be, and whether it is certainly one of them (its path ends with theirs) rather than
    possibly any of them (a graph on a submodule, or no path: see the module docstring)."""
    paths = {int(i): q for i, q in modules.items()}
    if path:
        full = [i for i, q in paths.items() if path == q or path.endswith("." + q)]
        if full:
            return sorted(full), True
        return sorted(i for i, q in paths.items() if q.endswith("." + path)), False
    return sorted(paths), False


def _setting(site: dict) -> tuple:
    return ("exact",) if "exact" in site else ("params", tuple(sorted(site["params"].items())))


def auto_layers(gm: fx.GraphModule, found: list[_sites.Site], settings: Settings, configs: dict, total: int):
    """``(selected, notes, calibrated)`` for ``layers="auto"``: a site placed on recorded sites that share a config
    gets it (explicit options / ``HYPER_*`` fields still win, field by field); a site placed on sites calibrated
    exact, or on sites that disagree, stays exact (``notes`` holds why); without a calibration for this model
    every site is selected at the settings' own config (as ``layers="all"``). Each warning once per process.

    The model is identified by `hyper_backend.autotune.fingerprint.model_fingerprint`: the ``config`` of the
    module being compiled (`compiled_config`) and ``total``, the sites numbered so far in this ``torch.compile``
    call; the length bucket is the nearest to the longest key length among this graph's sites."""
    from hyper_backend.autotune import schema, store
    from hyper_backend.autotune.fingerprint import UnstableConfig, config_hash
    from hyper_backend.config import HyperConfig

    config = compiled_config(gm, found)
    shapes = [_site_shape(gm, s) for s in found]
    dtype = next((d for d, _ in shapes if d is not None), None)
    lengths = [n for _, n in shapes if n is not None]
    entry, why, key = None, None, None
    if config is None:
        why = "the compiled module has no `config` (see hyper_backend.auto_layers.compiled_config)"
    elif not settings.tune_cache:
        why = "tuning disabled (tune_cache='')"
    else:
        try:
            key = config_hash(config)
            if dtype is not None and lengths:
                entry = store.lookup_model(
                    settings.tune_cache, config=config, dtype=dtype, seq_len=max(lengths), sites_seen=total
                )
            why = f"no calibration for this model ({total} sites, {dtype}) in {settings.tune_cache}"
        except UnstableConfig as e:
            why = f"the compiled module's config cannot identify a model: {e}"
    if entry is None:
        _warn_once(
            why,
            key,
            "swapping every site as layers='all' (calibrate with `python -m hyper_backend.autotune --model PATH "
            "--text FILE --seq N`; see docs/autotune.md)",
        )
        for s in found:
            configs[s.index] = "auto: no calibration for this model, as layers=all"
        return (lambda site: True), {}, None

    at = f"auto: tuned for this model at {schema.length_text(entry['bucket'])}"
    explicit = dict(settings.explicit)
    recorded = entry["sites"]
    args, notes = {}, {}
    for s in found:
        where = _site_module(gm, s)
        indices, placed = place(entry["modules"], where[1] if where is not None else None)
        kinds = {_setting(recorded[str(i)]) for i in indices}
        site = recorded[str(indices[0])] if len(kinds) == 1 else None
        shared = (
            ""
            if placed and len(indices) == 1
            else f" (as recorded site {indices[0]})"
            if len(indices) == 1
            else f" (shared by recorded sites {_spans(indices)})"
        )
        if not indices:
            notes[s.index] = f"{at}, but no recorded site is at module {where[1]!r}: kept exact"
        elif site is None:
            notes[s.index] = (
                f"auto: recorded sites {_spans(indices)} share module {where[1]!r} and are calibrated differently: "
                f"kept exact"
                if placed
                else f"auto: this graph may run for recorded sites {_spans(indices)}, calibrated differently: kept "
                f"exact (a graph compiled on a submodule serves every copy of it)"
            )
            _warn_once(notes[s.index], key, "compile the whole model (or its base model) to apply the calibration")
        elif "exact" in site:
            notes[s.index] = f"{at}: exact ({site['exact']}){shared}"
        else:
            params = {**site["params"], **explicit}
            args[s.index] = params
            over = f" (explicit: {', '.join(sorted(explicit))})" if explicit else ""
            configs[s.index] = f"{at}: {HyperConfig(**params).label()}{over}{shared}"
        if s.index in notes:
            configs[s.index] = notes[s.index]
    return (lambda site: site.index in args), notes, args


def _warn_once(why: str, key, then: str) -> None:
    if (why, key) in _auto_warned:
        return
    _auto_warned.add((why, key))
    warnings.warn(f"layers='auto': {why}; {then}", AutoLayersWarning, stacklevel=3)


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
