"""``torch.compile(model, backend="hyper", options={...})``.

The entry point ``hyper_backend`` is a plain function registered under the ``torch_dynamo_backends``
entry-point group, so ``backend="hyper"`` works in a process that never imports this package.

Per compiled graph:

1. settings: ``options`` > ``HYPER_*`` environment variables (read now, at compile time) > the autotuner's
   entry for the actual length (looked up inside the op at run time, for fields left unset) > defaults;
2. the attention sites of the graph are found and numbered (see "Site numbering" below);
3. SDPA sites are lowered here, on the Dynamo graph (`hyper_backend.lowering.sdpa`);
4. the graph goes to the inner backend: inductor's ``compile_fx`` by default, with the pattern pass for
   hand-written attention installed as ``joint_custom_pre_pass`` (`hyper_backend.lowering.patterns`).
   ``inner_backend="aot_eager"`` or ``"eager"`` (for debugging) lower SDPA sites only: hand-written attention
   is matched on inductor's aten graph, so with those backends it stays exact.

Site numbering (``layers=`` / ``HYPER_LAYERS``): sites are numbered 0, 1, ... in the order the model runs
them. Inside one graph that is graph order. Across graph breaks, Dynamo compiles graphs in the order the model
first reaches them, and numbering continues from one graph to the next within one ``torch.compile`` call; a
recompiled graph (new shapes, failed guards) keeps the numbers it had. A graph shared by several modules (a
graph break inside a repeated block compiles the block once) gets one set of numbers for all of them.
``last:K`` needs the total count: it is exact when the model compiles to one graph; with graph breaks it is
resolved against the sites seen so far and a warning is logged (use explicit indices from `explain` then).

``layers="auto"`` (``HYPER_LAYERS=auto``): the per-site calibration written by ``python -m hyper_backend.autotune
--model PATH`` (`hyper_backend.autotune.calibrate`). The model is identified at compile time by
`hyper_backend.autotune.cache.model_fingerprint`: a hash of the ``config`` of the module being compiled (the
first ``nn.Module`` with a ``config`` among the compiled frame's locals: an HF model, its base model or one of
its layers all carry the model's config; see `compiled_config`) and the number of sites numbered so far, with
the dtype of the sites and the length bucket nearest to their key length. With graph breaks the site count is
checked against the sites seen so far (a calibration with at least that many is taken). A site with a tuned
config gets every field of it, except those set by options or ``HYPER_*``, which win field by field; a site
calibrated exact stays exact (its reason says why); without a calibration for the model (or a module without a
``config``) the backend warns once per model and process and swaps every site, as ``layers="all"``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from hyper_backend.auto_layers import auto_layers
from hyper_backend.lowering import sites as _sites
from hyper_backend.lowering.canonical import canonicalize
from hyper_backend.lowering.masks import Prover
from hyper_backend.lowering.sdpa import rewrite_sdpa
from hyper_backend.settings import Settings, resolve_settings

log = logging.getLogger("hyper_backend")

# ----------------------------------------------------------------------------------------------------------
# sessions: site numbering across the graphs of one torch.compile call
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Session:
    """The graphs compiled for one ``torch.compile`` call (or one `explain`), and their sites."""

    bases: dict[tuple, int] = field(default_factory=dict)  # graph position -> first site number
    order: dict[tuple, int] = field(default_factory=dict)  # graph position -> graph number (compile order)
    next_index: int = 0
    graphs: int = 0  # distinct graph positions
    sites: dict[int, _sites.Site] = field(default_factory=dict)  # by site number: the latest decision
    calls: dict[tuple, int] = field(default_factory=dict)  # (frame, compile, attempt) -> backend calls so far
    seen: set = field(default_factory=set)  # (frame, compile, nth graph) compiled
    configs: dict[int, str] = field(default_factory=dict)  # layers="auto": site -> its config and its source
    lock: threading.Lock = field(default_factory=threading.Lock)


_sessions: dict[int, tuple[weakref.ref, Session]] = {}  # id(torch.compile's wrapper) -> (the wrapper, its session)
_process_session = Session()


def _session_owner():
    """The ``torch._TorchCompileWrapper`` of the ``torch.compile`` call whose graph is being compiled (one per call),
    or None (the backend called outside a Dynamo compile, or by ``torch._dynamo.optimize``).

    Dynamo's translator of the frame being compiled (``InstructionTranslator.current_tx()``, thread-local) holds the
    backend its output graph calls (``output.compiler_fn``): Dynamo's debug wrappers around that wrapper, which
    ``torch._dynamo.eval_frame.innermost_backend`` unwraps (as Dynamo does itself). No interpreter frame is read.
    Both are internals of torch 2.13 (``tests/test_lowering.py::test_sites_numbered_per_torch_compile_call`` pins
    them): if they move, every graph shares the process's session, as with a backend called directly."""
    try:
        from torch._dynamo.eval_frame import innermost_backend
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        fn = innermost_backend(tx.output.compiler_fn)
    except (ImportError, AttributeError):  # not compiling (no translator on this thread), or torch moved them
        return None
    return fn if isinstance(fn, torch._TorchCompileWrapper) else None


def session_for(owner) -> Session:
    """``owner``'s session (by identity: the wrapper defines ``__eq__``, so it is unhashable), freed with it."""
    if owner is None:
        return _process_session
    entry = _sessions.get(id(owner))
    if entry is None or entry[0]() is not owner:
        key = id(owner)

        def forget(ref, key=key):
            if _sessions.get(key, (None,))[0] is ref:
                del _sessions[key]

        entry = (weakref.ref(owner, forget), Session())
        _sessions[key] = entry
    return entry[1]


def _graph_position(session: Session) -> tuple[tuple, bool]:
    """``(position, new)``: the graph's place in the model (stable across recompiles and restarted analyses)
    and whether this (frame, compile) graph was not compiled before."""
    ctx = torch._guards.CompileContext.try_get()
    cid = ctx.compile_id if ctx is not None else None
    if cid is None:
        return ("call", session.graphs), True
    attempt = (cid.frame_id, cid.frame_compile_id, getattr(ctx, "attempt", 0))
    nth = session.calls.get(attempt, 0)
    session.calls[attempt] = nth + 1
    key = (cid.frame_id, cid.frame_compile_id, nth)
    new = key not in session.seen
    session.seen.add(key)
    return (cid.frame_id, nth), new


def reset() -> None:
    """Forget site numbering (called by ``torch._dynamo.reset()``)."""
    global _process_session
    _sessions.clear()
    _process_session = Session()


# ----------------------------------------------------------------------------------------------------------
# compile-time constants: registered buffers that hold masks, and the guard on them
# ----------------------------------------------------------------------------------------------------------


def _source_name(node: fx.Node) -> str:
    arg = node.meta.get("grapharg")
    src = getattr(arg, "source", None)
    if src is None:
        return ""
    name = src.name
    return name() if callable(name) else str(name)


_BUFFER = re.compile(r"\._buffers\[[^\]]+\]$")


def find_constants(gm: fx.GraphModule, example_inputs: Sequence) -> dict[int, torch.Tensor]:
    """Placeholders that are registered buffers of a module (``register_buffer``: Dynamo reads them as
    ``...._buffers['name']``) shaped like a mask or a fill (at least 2-D, or one element): position -> value.

    Only these are compile-time constants: a mask proof may read them by value. A plain tensor attribute
    (``self.mask = m``), a parameter or a user input is data. Dynamo guards a buffer's shape and dtype only, so
    `guard_constants` re-checks the ones a proof read at every call."""
    out = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for pos, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(value, torch.Tensor) or value.requires_grad or not (value.dim() >= 2 or value.numel() == 1):
            continue
        if _BUFFER.search(_source_name(node)):
            out[pos] = value
    return out


def _digest(t: torch.Tensor) -> str:
    t = t.detach().to("cpu").contiguous()
    data = t.numpy().tobytes() if t.dtype == torch.bool else t.view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(repr((t.dtype, tuple(t.shape))).encode() + data).hexdigest()


def constants_key(constants: dict[int, torch.Tensor]) -> str:
    return hashlib.sha256(repr(sorted((pos, _digest(t)) for pos, t in constants.items())).encode()).hexdigest()


def exact_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """The Dynamo graph as it is now (before any lowering), to run eagerly if a guard fails."""
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, graph)


def guard_constants(compiled: Callable, exact: fx.GraphModule, used: Mapping[int, torch.Tensor]) -> Callable:
    """``compiled``, behind a check that the buffers its mask proofs read (``used``: position -> the tensor at
    compile time) are still those tensors with those values. A buffer replaced, or changed in place (its version
    counter moved), is compared by content; if it differs the call runs ``exact`` (the graph before lowering,
    eagerly) and a warning says so once. Changes made through ``.data`` or outside torch bump no version counter
    and are not seen: call ``torch._dynamo.reset()`` after those."""
    if not used:
        return compiled
    seen = {pos: (weakref.ref(t), t._version, _digest(t)) for pos, t in used.items()}
    warned = []

    def stale(args) -> bool:
        for pos, (ref, version, digest) in seen.items():
            t = args[pos]
            if ref() is t and t._version == version:
                continue
            if _digest(t) != digest:
                return True
            seen[pos] = (weakref.ref(t), t._version, digest)  # the same values again: proven as they are
        return False

    def run(*args):  # Dynamo calls the backend's function with the graph's inputs as positional arguments
        if not stale(args):
            return compiled(*args)
        if not warned:
            warned.append(True)
            log.warning(
                "hyper_backend: a mask buffer changed after compilation; this graph runs exact until it holds its "
                "compile-time values again (torch._dynamo.reset() recompiles on the new values)"
            )
        return exact(*args)

    return run


# ----------------------------------------------------------------------------------------------------------
# the backend
# ----------------------------------------------------------------------------------------------------------


def _inner_compile(gm, example_inputs, settings: Settings, patterns_pass, mode: str | None):
    if settings.inner_backend == "eager":
        return gm.forward
    if settings.inner_backend == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    patches = {}
    if mode is not None and mode != "default":
        patches.update(torch._inductor.list_mode_options(mode))
    if patterns_pass is not None:
        existing = inductor_config.joint_custom_pre_pass
        if existing is None:
            patches["joint_custom_pre_pass"] = patterns_pass
        else:
            extra = tuple(existing) if isinstance(existing, (list, tuple)) else (existing,)
            patches["joint_custom_pre_pass"] = (patterns_pass, *extra)
    return compile_fx(gm, example_inputs, config_patches=patches)


def _site_settings(settings: Settings, calibrated: Mapping[int, Mapping] | None = None) -> Callable:
    """``op_args(site, query, causal)``: the trailing arguments of a lowered site's ``hyper::attention`` call,
    its `OpSettings` as text, for the site's query (a fake tensor: device, dtype, head dim) and causality. A
    calibrated site (``layers="auto"``) takes its calibration's fields (with the explicit ones already over them:
    `auto_layers`)."""

    def op_args(site: _sites.Site, query: torch.Tensor, causal: bool) -> tuple:
        explicit = None if calibrated is None else calibrated[site.index]
        s = settings.op_settings(
            device=query.device, dtype=query.dtype, head_dim=query.shape[-1], causal=bool(causal), explicit=explicit
        )
        return (s.encode(),)

    return op_args


def compile_graph(
    gm: fx.GraphModule, example_inputs: Sequence, settings: Settings, session: Session, mode: str | None = None
) -> Callable:
    """Rewrite and compile one Dynamo graph (the body of `hyper_backend`)."""
    with session.lock:
        position, new = _graph_position(session)
        if new:
            _sites.count("graphs")
        graph_number = session.order.setdefault(position, len(session.order))
        session.graphs = len(session.order)
        base = session.bases.get(position, session.next_index)
        found = _sites.find_sites(gm, base, graph_number)
        session.bases[position] = base
        session.next_index = max(session.next_index, base + len(found))
        total = session.next_index
        multi_graph = len({b for b in session.bases.values()}) > 1
    if settings.layers.kind == "last" and multi_graph and found:
        log.warning(
            "layers=last:%d with graph breaks: counted from the %d sites seen so far, not the "
            "model's total; use explicit indices (see hyper_backend.explain)",
            settings.layers.count,
            total,
        )

    def selected(site: _sites.Site) -> bool:
        return settings.layers.contains(site.index, total)

    auto_notes, calibrated = {}, None
    if settings.layers.kind == "auto" and settings.enabled and found:
        selected, auto_notes, calibrated = auto_layers(gm, found, settings, session.configs, total)
    op_args = _site_settings(settings, calibrated)
    calibrated = calibrated or {}
    by_node = {s.node: s for s in found}
    policy = _sites.Policy(
        selected,
        op_args,
        (settings.kernels, settings.serial_bookkeeping),
        repr(
            (
                settings.key(),
                settings.tuning_digest(),
                sorted((i, sorted(p.items())) for i, p in (calibrated or {}).items()),
            )
        ),
    )
    patterns_pass, prover, exact = None, None, None
    constants = find_constants(gm, example_inputs) if settings.enabled and found else {}
    if not settings.enabled:
        for s in found:
            s.decide("exact", "disabled (enabled=False / HYPER_ATTENTION=0)")
    elif found:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        exact = exact_copy(gm) if constants else None
        prover = Prover({placeholders[p]: t for p, t in constants.items()})
        canonicalize(gm, by_node, prover, policy)  # einsum, MHA, Transformer layers: SDPA nodes
        handwritten = [s for s in found if s.kind != "sdpa"]  # before the rewrite: it renames band sites "window"
        rewrite_sdpa(gm, by_node, policy, prover)
        if handwritten and settings.inner_backend == "inductor":
            from hyper_backend.lowering.patterns import AttentionPass

            patterns_pass = AttentionPass(policy, by_node, constants, constants_key(constants))
        for s in handwritten:
            if settings.inner_backend != "inductor":
                s.decide(
                    "exact",
                    f"hand-written attention is rewritten by the inductor pass only "
                    f"(inner_backend={settings.inner_backend})",
                )
            elif not selected(s):
                s.decide("exact", "not selected by layers")
    compiled = _inner_compile(gm, example_inputs, settings, patterns_pass, mode)
    if exact is not None:
        used = {placeholders.index(n) for n in prover.used}
        if patterns_pass is not None:  # served from inductor's cache: the pass's proofs are unknown, guard them all
            used |= patterns_pass.used_constants if patterns_pass.ran else set(constants)
        compiled = guard_constants(compiled, exact, {p: constants[p] for p in used})
    if patterns_pass is not None and not patterns_pass.ran:
        for s in handwritten:
            s.decide("cached", "graph served from inductor's cache; hyper_backend.explain compiles afresh")
    for s in found:
        if s.index in auto_notes and s.decision == "exact" and s.reason == "not selected by layers":
            s.decide("exact", auto_notes[s.index])
        session.sites[s.index] = s
        _sites.record(s)
    return compiled


def hyper_backend(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable:
    """The ``torch.compile`` backend. ``options``: `HyperConfig` fields plus ``enabled``, ``layers``,
    ``inner_backend`` and ``tune_cache`` (``''`` disables tuned lookups); see the module docstring."""
    from hyper_backend.config import EnvError

    try:
        settings = resolve_settings(options)
    except EnvError as e:
        # torch wraps this in a long BackendCompilerFailed traceback: say it first, in one line, on stderr too
        message = f"{e} (read at compile time; `python -m hyper_backend.check` checks the environment)"
        log.error("hyper_backend: %s", message)
        raise EnvError(message) from None
    return compile_graph(gm, example_inputs, settings, session_for(_session_owner()), mode)


hyper_backend.reset = reset  # torch._dynamo.reset() calls the backend's reset()
