"""Hand-written attention: torch's pattern matcher rewrites it to ``torch.ops.hyper.attention``.

Runs inside inductor as a ``joint_custom_pre_pass`` (`AttentionPass`), on the aten-level graph (inference or
joint forward+backward). For each softmax in the graph a short walk (`scan`) reads the *form* of the attention
around it as a `Form`: how the scores are scaled (``* s``, ``/ s``, scale on q first, none, a 0-d tensor scale,
``baddbmm``'s alpha), how a mask is applied (none, ``+ mask``, ``where(mask, scores, fill)``,
``masked_fill``/``where(mask, fill, scores)``), whether the matmuls are 4-D (``[B, H, N, D]``) or 3-D, which
operands the matmul decomposition copies (that changes the graph), and whether it runs in a half dtype (the
softmax then upcasts to fp32 and casts back). A pattern is traced for each form seen, once per process
(``gen_pattern``: ``fwd_only`` for inference graphs, ``joint_fwd_bwd`` for training graphs), from inputs with
the same layout and dtype, and the pattern matcher then finds and replaces the sites. The walk only decides
which patterns to trace; the match itself, with the real shapes, is the pattern matcher's.

Each form is registered as a replacement entry whose check (`AttentionPass._check`) decides the match and, when
it accepts, traces the replacement from that `Decision` (a value handed to the traced function, no state on the
side). A match is accepted only if: the site is selected (``layers``; a band runs the exact window op whatever
it says); q/k/v shapes fit the op (no broadcast over batch or heads); the mask, if any, is proven all-attend,
causal (bottom-right) or banded (`masks.Prover`) and leaves no query without a key; a tensor scale is a
compile-time constant (or ``1/sqrt(D)``); ``baddbmm``'s input is zeros. Otherwise the site keeps its exact
computation and the reason is recorded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.pattern_matcher import (
    Match,
    PatternMatcherPass,
    ReplacementPatternEntry,
    fwd_only,
    gen_pattern,
    joint_fwd_bwd,
    stable_topological_sort,
)
from torch.fx.experimental.symbolic_shapes import statically_known_true

from hyper_backend.kernels import op as _op  # noqa: F401  (registers torch.ops.hyper.attention)

from . import masks
from .graph import ancestors, concrete, evaluate, input_free, meta_val, real_mode, shape_env_of, size_hints, symbols_of
from .sites import Policy, Site, count

aten = torch.ops.aten
prims = torch.ops.prims
HALF = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------
# forms
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Form:
    """The shape of one hand-written attention, enough to trace a matching pattern."""

    matmul: str  # "4d" (matmul on [B, H, N, D]), "3d" (bmm), "baddbmm"
    scale: str  # "mul", "div", "q_mul", "none" (baddbmm: alpha)
    scale_tensor: bool  # the scale is a 0-d tensor rather than a number
    mask: str  # "none", "add", "keep" (where(m, s, fill)), "drop" (where(m, fill, s) / masked_fill)
    copies: tuple[bool, bool, bool]  # the 4-D matmul decomposition copies q / kᵀ / v
    half: bool  # fp16/bf16 inputs: softmax upcasts to fp32 and casts back
    joint: bool  # training graph
    # with ``half``: the model wrote a plain half softmax, which the joint graph's decomposition upcasts (its
    # forward is then the explicit upcast's, its backward is not, so training graphs need both patterns)
    implicit: bool = False

    @property
    def name(self) -> str:
        """The kind reported for a site, e.g. ``softmax(q@kT*s + mask)@v``."""
        mm = (lambda a: f"{a}@kT") if self.matmul == "4d" else (lambda a: f"bmm({a}, kT)")
        scores = {
            "mul": mm("q") + "*s",
            "div": mm("q") + "/s",
            "q_mul": mm("(q*s)" if self.matmul == "4d" else "q*s"),
            "none": mm("q"),
        }[self.scale]
        if self.matmul == "baddbmm":
            scores = "baddbmm(q, kT, alpha=s)"
        scores = {
            "none": scores,
            "add": f"{scores} + mask",
            "keep": f"where(mask, {scores}, fill)",
            "drop": f"masked_fill({scores}, mask, fill)",
        }[self.mask]
        return f"softmax({scores})@v" + (" (fp32 softmax)" if self.half and not self.implicit else "")

    @property
    def argnames(self) -> tuple[str, ...]:
        names = ["query", "key", "value"]
        if self.matmul == "baddbmm":
            names.append("bias")
        if self.mask != "none":
            names.append("mask")
        if self.mask in ("keep", "drop"):
            names.append("fill")
        if self.scale != "none" or self.matmul == "baddbmm":
            names.append("scale")
        return tuple(names)


def _body(form: Form, a: dict):
    """The attention as a model writes it (the search function)."""
    q, k, v, scale = a["query"], a["key"], a["value"], a.get("scale")
    if form.matmul == "baddbmm":
        s = torch.baddbmm(a["bias"], q, k.transpose(1, 2), beta=1.0, alpha=scale)
    else:
        if form.scale == "q_mul":
            q = q * scale
        s = torch.bmm(q, k.transpose(1, 2)) if form.matmul == "3d" else q @ k.transpose(-2, -1)
        if form.scale == "mul":
            s = s * scale
        elif form.scale == "div":
            s = s / scale
    if form.mask == "add":
        s = s + a["mask"]
    elif form.mask == "keep":
        s = torch.where(a["mask"], s, a["fill"])
    elif form.mask == "drop":
        s = torch.where(a["mask"], a["fill"], s)
    p = torch.softmax(s.float(), dim=-1).to(v.dtype) if form.half and not form.implicit else torch.softmax(s, dim=-1)
    return torch.bmm(p, v) if form.matmul != "4d" else p @ v


def _replacement(form: Form, decision: Decision, window_args: tuple, a: dict):
    """The same attention as one ``hyper::attention`` call (or the exact ``hyper::window_attention`` for a band),
    as ``decision`` says for this match."""
    q, k, v = a["query"], a["key"], a["value"]
    if decision.prescale == "mul":
        q = q * a["scale"]
    elif decision.prescale == "div":
        q = q / a["scale"]
    if form.matmul != "4d":  # [B*H, N, D]: one batch of B*H heads
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    if decision.window is not None:
        out = torch.ops.hyper.window_attention.default(q, k, v, None, *decision.window, decision.scale, *window_args)[0]
    else:
        out = torch.ops.hyper.attention.default(q, k, v, None, decision.causal, decision.scale, *decision.op_args)[0]
    return out.squeeze(0) if form.matmul != "4d" else out


def _with_signature(fn: Callable, argnames: tuple[str, ...]) -> Callable:
    """``fn(dict)`` as a function of exactly ``argnames``: register_replacement reads ``inspect.signature``."""

    def f(*args, **kwargs):
        bound = f.__signature__.bind(*args, **kwargs)
        return fn(dict(bound.arguments))

    f.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in argnames]
    )
    return f


def _example_inputs(form: Form) -> tuple[list, dict]:
    B, H, N, D = 2, 2, 8, 16
    dtype = torch.bfloat16 if form.half else torch.float32
    grad = form.joint

    def qkv(copy: bool):
        if form.matmul != "4d":
            t = torch.empty(B * H, N, D, dtype=dtype)
        elif copy:  # a head-transposed view: the matmul's reshape must copy it
            t = torch.empty(B, N, H, D, dtype=dtype).transpose(1, 2)
        else:
            t = torch.empty(B, H, N, D, dtype=dtype)
        return t.requires_grad_(grad)

    inputs = [qkv(form.copies[0]), qkv(form.copies[1]), qkv(form.copies[2])]
    if form.matmul == "baddbmm":
        inputs.append(torch.zeros(B * H, N, N, dtype=dtype))
    if form.mask == "add":
        inputs.append(
            torch.zeros(1, 1, N, N, dtype=dtype) if form.matmul == "4d" else torch.zeros(1, N, N, dtype=dtype)
        )
    elif form.mask in ("keep", "drop"):
        inputs.append(torch.ones(N, N, dtype=torch.bool))
        inputs.append(torch.tensor(-1e9, dtype=dtype))
    if form.scale_tensor:
        inputs.append(torch.tensor(0.25, dtype=dtype))
    workaround = {} if form.scale_tensor or "scale" not in form.argnames else {"scale": 0.25}
    return inputs, workaround


_traced: dict[Form, object] = {}  # form -> its search pattern: pure, traced once per process


def search_pattern(form: Form):
    """The pattern-matcher pattern of ``form``'s hand-written attention (traced once, then cached)."""
    if form not in _traced:
        inputs, workaround = _example_inputs(form)
        search = _with_signature(lambda a: _body(form, a), form.argnames)
        trace = joint_fwd_bwd if form.joint else fwd_only
        with torch.no_grad() if not form.joint else contextlib.nullcontext():
            # The generic pattern (integers ignored) is also the one matched with the real shapes: torch's own
            # re-trace with the real shapes fails under dynamic shapes with several size symbols. `_check`
            # verifies the integers that matter (transposed dims, reduction dims).
            _traced[form] = gen_pattern(search, inputs, trace, workaround)
    return _traced[form]


# ----------------------------------------------------------------------------------------------------------
# scan: softmax cores and the form around each
# ----------------------------------------------------------------------------------------------------------


def _is(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


@dataclass
class Core:
    """A decomposed softmax ``div(exp(x - amax(x)), sum(...))`` (or ``_softmax``)."""

    node: fx.Node  # amax or _softmax: carries the provenance to the Dynamo graph
    x: fx.Node  # softmax input
    out: fx.Node  # softmax output
    dim: int


def softmax_cores(graph: fx.Graph) -> list[Core]:
    cores = []
    for n in graph.nodes:
        if _is(n, aten._softmax.default):
            cores.append(Core(n, n.args[0], n, n.args[1]))
        elif _is(n, aten.amax.default):
            x, dims = n.args[0], n.args[1]
            sub = next((u for u in n.users if _is(u, aten.sub.Tensor) and u.args[0] is x), None)
            exp = next((u for u in sub.users if _is(u, aten.exp.default)), None) if sub else None
            div = next((u for u in exp.users if _is(u, aten.div.Tensor) and u.args[0] is exp), None) if exp else None
            if div is None or len(dims) != 1:
                continue
            cores.append(Core(n, x, div, dims[0]))
    return cores


def _unview(n):
    """``view(E)`` with ``E = [clone](expand(x))`` -> ``(x, copied)``, else ``(None, False)``."""
    if not _is(n, aten.view.default, aten._unsafe_view.default, aten.reshape.default):
        return None, False
    e = n.args[0]
    copied = _is(e, aten.clone.default)
    if copied:
        e = e.args[0]
    if not _is(e, aten.expand.default):
        return None, False
    return e.args[0], copied


def _scores_source(s) -> tuple[str, str, bool, fx.Node] | None:
    """``(matmul, scale, scale_tensor, matmul_node)`` if ``s`` is (scaled) q @ kᵀ, else None."""
    scale, tensor = "none", False
    if _is(s, aten.mul.Tensor, aten.div.Tensor):
        scale = "mul" if s.target == aten.mul.Tensor else "div"
        tensor = isinstance(meta_val(s.args[1]), torch.Tensor)
        s = s.args[0]
    if _is(s, aten.baddbmm.default):
        return ("baddbmm", "none", False, s) if scale == "none" else None
    if _is(s, aten.bmm.default):
        return "3d", scale, tensor, s
    if _is(s, aten.view.default, aten._unsafe_view.default) and _is(s.args[0], aten.bmm.default):
        bmm = s.args[0]
        q, _ = _unview(bmm.args[0])
        if scale == "none" and _is(q, aten.mul.Tensor):
            scale, tensor = "q_mul", isinstance(meta_val(q.args[1]), torch.Tensor)
        return "4d", scale, tensor, bmm
    return None


def form_of(core: Core, joint: bool):
    """The `Form` of the attention around ``core``, or a reason string why it is not attention we lower."""
    xv = meta_val(core.x)
    if not isinstance(xv, torch.Tensor):
        return "softmax input has no shape"
    if core.dim not in (-1, xv.dim() - 1):
        return f"softmax over dim {core.dim}, not the key dim"
    x, half = core.x, False
    if _is(x, prims.convert_element_type.default) and meta_val(x.args[0]).dtype in HALF:
        x, half = x.args[0], True
    mask = "none"
    if _is(x, aten.add.Tensor) and _scores_source(x.args[0]):
        mask, x = "add", x.args[0]
    elif _is(x, aten.where.self) and _scores_source(x.args[1]):
        mask, x = "keep", x.args[1]
    elif _is(x, aten.where.self) and _scores_source(x.args[2]):
        mask, x = "drop", x.args[2]
    src = _scores_source(x)
    if src is None:
        return "softmax input is not a recognised (masked, scaled) q @ kᵀ"
    matmul, scale, tensor, mm = src
    # downstream: [cast back] -> [expand -> view] -> bmm with v
    p = core.out
    if half:
        p = next((u for u in p.users if _is(u, prims.convert_element_type.default)), None)
        if p is None:
            return "fp32 softmax output is not cast back"
    if any(_is(u, aten.mul.Tensor) for u in p.users) and any(
        _is(u, aten.rand.default, aten.bernoulli.default) for u in core.out.graph.nodes
    ):
        return "dropout on the attention probabilities in training"
    if matmul == "4d":
        view = next((u for u in p.users if _is(u, aten.expand.default)), None)
        view = next((u for u in view.users if _is(u, aten.view.default)), None) if view else None
        pv = next((u for u in view.users if _is(u, aten.bmm.default) and u.args[0] is view), None) if view else None
    else:
        pv = next((u for u in p.users if _is(u, aten.bmm.default) and u.args[0] is p), None)
    if pv is None:
        return "softmax output does not feed a matmul with v"
    copies = (False, False, False)
    if matmul == "4d":
        _, cq = _unview(mm.args[0])
        _, ck = _unview(mm.args[1])
        _, cv = _unview(pv.args[1])
        copies = (cq, ck, cv)
    return Form(matmul, scale, tensor, mask, copies, half, joint)


# ----------------------------------------------------------------------------------------------------------
# the pass
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """What one accepted match becomes."""

    causal: bool
    scale: float | None
    prescale: str = ""  # "mul" / "div": a symbolic float scale folded into q (the op scale is then 1)
    window: tuple[int, int] | None = None  # a banded mask: exact ``hyper::window_attention`` (left, right)
    op_args: tuple = ()  # the trailing arguments of its hyper::attention call (`Policy.hyper_args`)


def _origin_names(node: fx.Node) -> list[str]:
    names, stack = [], list(node.meta.get("from_node") or [])
    while stack:
        src = stack.pop()
        names.append(src.name)
        stack.extend(getattr(src, "from_node", None) or [])
    return names


class AttentionPass(CustomGraphPass):
    """The inductor pass. One per compiled graph: it carries that graph's settings and site table.

    Args:
        policy: which sites may be lowered (``layers``) and the trailing arguments of their op calls (per site:
            ``layers="auto"`` gives each site its own config); its ``key`` goes into `uuid`.
        sites: the Dynamo graph's sites by node name.
        constants: Dynamo placeholder position -> compile-time constant tensor (causal buffers).
        constants_key: a fingerprint of those constants' values.
    """

    def __init__(
        self,
        policy: Policy,
        sites: dict[str, Site],
        constants: dict[int, torch.Tensor],
        constants_key: str,
    ):
        self.policy, self.sites = policy, sites
        self.constants, self.constants_key = constants, constants_key
        self.ran = False
        self.reasons: dict[str, str] = {}
        self._prover = masks.Prover({})
        self._positions: dict[fx.Node, int] = {}
        # this pass's own matchers: their entries' checks are bound to it
        self._matchers = {
            False: PatternMatcherPass(pass_name="hyper_attention"),
            True: PatternMatcherPass(pass_name="hyper_attention_joint"),
        }
        self._forms: set = set()

    def _register(self, form: Form) -> None:
        """Register ``form``'s pattern with a check that decides each match and traces its replacement."""
        if form in self._forms:
            return
        self._forms.add(form)

        def normalize_args(**kwargs) -> list:
            args = [kwargs.pop(name) for name in form.argnames]
            while f"tangents_{len(args) - len(form.argnames) + 1}" in kwargs:
                args.append(kwargs.pop(f"tangents_{len(args) - len(form.argnames) + 1}"))
            return args

        entry = ReplacementPatternEntry(
            pattern=search_pattern(form),
            extra_check=functools.partial(self._check, form),
            normalize_args=normalize_args,
            pattern_name=form.name,
        )
        entry.register([self._matchers[form.joint]])

    def _check(self, form: Form, match: Match) -> bool:
        """Decide ``match``; if it is accepted, trace its replacement from the decision (``match.replacement_graph``,
        which the entry then inserts), as `torch._inductor.pattern_matcher.register_replacement` does."""
        decision = _decision(self, form, match)
        if decision is None:
            return False
        values = [meta_val(match.kwargs[name]) for name in form.argnames]
        fake_mode = torch._dynamo.utils.detect_fake_mode(values)
        with fake_mode:  # fresh inputs with the match's shapes (q, k, v need grad in a training graph)
            args = [
                torch.empty_strided(
                    v.size(),
                    v.stride(),
                    dtype=v.dtype,
                    device=v.device,
                    requires_grad=form.joint and name in ("query", "key", "value"),
                )
                if isinstance(v, torch.Tensor)
                else v
                for name, v in zip(form.argnames, values)
            ]
            replace = _with_signature(
                functools.partial(_replacement, form, decision, self.policy.window_args), form.argnames
            )
            match.replacement_graph = (joint_fwd_bwd if form.joint else fwd_only)(replace, args)
        return True

    def uuid(self) -> str:
        here = os.path.dirname(os.path.abspath(__file__))
        names = ("patterns.py", "masks.py", "symbolic.py", "graph.py", "sites.py")
        files = tuple(os.path.join(here, f) for f in names)
        h = hashlib.sha256(get_hash_for_files(files))
        selection = sorted((name, s.index, self.policy.selected(s)) for name, s in self.sites.items())
        h.update(repr((self.policy.key, selection, self.constants_key)).encode())
        return h.hexdigest()

    # -- mapping -------------------------------------------------------------------------------------------
    def site_of(self, node: fx.Node) -> Site | None:
        for name in _origin_names(node):
            site = self.sites.get(name)
            if site is not None and site.kind != "sdpa":
                return site
        return None

    @property
    def used_constants(self) -> set[int]:
        """Positions of the constants a lowered site's mask proof read."""
        return {self._positions[n] for n in self._prover.used}

    def _map_constants(self, graph: fx.Graph) -> None:
        """The graph's mask proofs, with the Dynamo graph's constants (by position) on the aten placeholders."""
        aten_constants = {}
        inputs = [n for n in graph.nodes if n.op == "placeholder" and not n.name.startswith("tangents")]
        for pos, tensor in self.constants.items():
            if pos >= len(inputs):
                continue
            v = meta_val(inputs[pos])
            if (
                isinstance(v, torch.Tensor)
                and v.dtype == tensor.dtype
                and v.dim() == tensor.dim()
                and all(statically_known_true(a == b) for a, b in zip(v.shape, tensor.shape))
            ):
                aten_constants[inputs[pos]] = tensor
                self._positions[inputs[pos]] = pos
        self._prover = masks.Prover(aten_constants)

    def reject(self, site: Site | None, reason: str) -> None:
        if site is not None:
            self.reasons[site.node] = reason

    # -- run -----------------------------------------------------------------------------------------------
    def __call__(self, graph: fx.Graph) -> None:
        from torch._inductor.fx_passes.joint_graph import early_patterns
        from torch._inductor.fx_passes.post_grad import remove_noop_ops

        self.ran = True
        remove_noop_ops(graph)
        early_patterns.apply(graph)
        joint = any(n.op == "placeholder" and n.name.startswith("tangents") for n in graph.nodes)
        self._map_constants(graph)
        cores = softmax_cores(graph)
        forms = {}
        for core in cores:
            site = self.site_of(core.node)
            form = form_of(core, joint)
            if isinstance(form, str):
                self.reject(site, form)
                if form.startswith("softmax over dim"):
                    _shield(core)
            else:
                self._register(form)
                if form.half and form.joint:
                    self._register(dataclasses.replace(form, implicit=True))
                if site is not None:
                    forms[site.node] = form
        if not cores:
            return
        self._matchers[joint].apply(graph)
        stable_topological_sort(graph)  # joint replacements put backward ops where the forward was
        graph.eliminate_dead_code()
        for site in self.sites.values():
            if site.kind != "sdpa" and site.decision not in ("hyper", "window"):
                reason = self.reasons.get(site.node)
                if reason is None and site.node in forms:
                    reason = (
                        f"form {forms[site.node].name} found but its pattern did not match: scores or "
                        "probabilities are used elsewhere, or the layout is unusual"
                    )
                site.decide("exact", reason or "no attention pattern matched")


def _shield(core: Core) -> None:
    """Keep inductor's own attention patterns off a softmax over a non-key dim.

    torch 2.13's pre-traced ``fuse_attention`` patterns ignore the softmax dim, and rewrite
    ``softmax(q @ kᵀ * s, dim=-2) @ v`` into SDPA (wrong results). Writing the softmax's final division as a
    multiplication by the reciprocal changes the graph's shape (not its meaning) so they no longer match.
    """
    div = core.out
    if not _is(div, aten.div.Tensor):
        return
    graph = div.graph
    with graph.inserting_before(div):
        recip = graph.call_function(aten.reciprocal.default, (div.args[1],))
        recip.meta.update(div.args[1].meta)
        mul = graph.call_function(aten.mul.Tensor, (div.args[0], recip))
        mul.meta.update(div.meta)
    div.replace_all_uses_with(mul)
    graph.erase_node(div)
    count("shielded")


# ----------------------------------------------------------------------------------------------------------
# the check of one match
# ----------------------------------------------------------------------------------------------------------


def _scale_of(node: fx.Node, form: Form, head_dim, constants) -> tuple[bool, float | None, str]:
    """A 0-d tensor scale: ``(ok, op scale, reason)``; ``1/sqrt(D)`` in any spelling gives op scale None."""
    with real_mode():
        return _scale_value(node, form, head_dim, constants)


def _scale_value(node, form, head_dim, constants):
    if not input_free(node, constants):
        return False, None, "the scale depends on a tensor input"
    syms = symbols_of([meta_val(n) for n in ancestors(node, constants)] + [head_dim])
    env = shape_env_of([head_dim] + [meta_val(n) for n in ancestors(node, constants)])
    tests = (
        [{}] if not syms else [{s: (size_hints(env).get(s, 16) if t == 0 else t) for s in syms} for t in (0, 16, 64)]
    )
    values, defaults = [], []
    for subs in tests:
        try:
            t = evaluate(node, subs, constants)
        except Exception:
            return False, None, "the scale could not be evaluated"
        value = float(t) if form.scale in ("mul", "q_mul") else 1.0 / float(t)
        values.append(value)
        defaults.append(1.0 / math.sqrt(concrete(head_dim, subs)))
    if all(math.isclose(v, d, rel_tol=1e-6) for v, d in zip(values, defaults)) and syms:
        return True, None, ""
    if all(math.isclose(v, values[0], rel_tol=1e-12) for v in values):
        return True, values[0], ""
    return False, None, "the scale depends on sizes other than as 1/sqrt(head dim)"


def _runtime_scalar(node: fx.Node, constants) -> bool:
    v = meta_val(node)
    if isinstance(v, torch.SymFloat):
        return True
    return isinstance(v, torch.Tensor) and v.dim() == 0 and not input_free(node, constants)


def _integers_wrong(match: Match, key: fx.Node, rank: int) -> str:
    """The pattern ignores integer arguments; check those that change the meaning."""
    swap = list(range(rank - 2)) + [rank - 1, rank - 2]
    for n in match.nodes:
        if _is(n, aten.permute.default) and n.args[0] is key and [d % rank for d in n.args[1]] != swap:
            return "k is permuted, not transposed in its last two dims"
        if _is(n, aten.amax.default, aten.sum.dim_IntList):
            r = meta_val(n.args[0]).dim()
            if [d % r for d in n.args[1]] != [r - 1]:
                return f"a softmax reduction over dims {list(n.args[1])}, not the key dim"
    return ""


def _decision(ctx: AttentionPass, form: Form, match: Match) -> Decision | None:
    """The decision for ``match``, or None (the reason recorded on its site)."""
    try:
        return _decide(ctx, form, match)
    except Exception as e:  # an analysis we cannot finish leaves the site exact
        core = next((n for n in match.nodes if _is(n, aten.amax.default)), None)
        ctx.reject(
            ctx.site_of(core) if core is not None else None, f"could not analyse the match ({type(e).__name__}: {e})"
        )
        return None


def _decide(ctx: AttentionPass, form: Form, match: Match) -> Decision | None:
    core = next((n for n in match.nodes if _is(n, aten.amax.default, aten._softmax.default)), None)
    site = ctx.site_of(core) if core is not None else None
    if site is None:
        return ctx.reject(site, "site not found")
    kw = match.kwargs
    q, k, v = (meta_val(kw[n]) for n in ("query", "key", "value"))
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return ctx.reject(site, "q/k/v are not tensors")
    bad = _integers_wrong(match, kw["key"], q.dim())
    if bad:
        return ctx.reject(site, bad)
    if form.matmul == "4d" and not all(
        statically_known_true(a == b)
        for a, b in (
            (q.shape[0], k.shape[0]),
            (k.shape[0], v.shape[0]),
            (q.shape[1], k.shape[1]),
            (k.shape[1], v.shape[1]),
        )
    ):
        return ctx.reject(site, "q/k/v heads or batch broadcast")
    nq, nk = q.shape[-2], k.shape[-2]
    causal, window = False, None
    if form.mask != "none":
        verdict = ctx._prover.classify(kw["mask"], form.mask, nq, nk, fill=kw.get("fill"))
        if verdict.kind is None:
            return ctx.reject(site, verdict.reason)
        empty_rows = verdict.rows_reason(nq, nk)
        if empty_rows:
            return ctx.reject(site, empty_rows)
        causal = verdict.kind == "causal"
        window = verdict.window
    layers = ctx.policy.layers_reason(site, banded=window is not None)
    if layers:
        return ctx.reject(site, layers)
    if form.matmul == "baddbmm":
        bias = kw["bias"]
        if not (_is(bias, aten.full.default) and bias.args[1] == 0):
            return ctx.reject(site, "baddbmm input is not zeros")
    scale = kw.get("scale")
    prescale = ""
    if form.scale == "none" and form.matmul != "baddbmm":
        op_scale = 1.0
    elif isinstance(scale, fx.Node) and _runtime_scalar(scale, ctx._prover.constants):
        # a symbolic float or a 0-d tensor input (dynamic=True makes float attributes inputs): fold into q
        op_scale, prescale = 1.0, "div" if form.scale == "div" else "mul"
    elif isinstance(scale, fx.Node):
        ok, op_scale, reason = _scale_of(scale, form, q.shape[-1], ctx._prover.constants)
        if not ok:
            return ctx.reject(site, reason)
    else:
        op_scale = float(scale) if form.scale != "div" else 1.0 / float(scale)
    op_args = () if window is not None else ctx.policy.hyper_args(site, q, causal)
    if window is not None:
        site.decide("window", f"{masks.Verdict('band', window=window).describe()} (exact), {form.name}", kind="window")
    else:
        site.decide("hyper", "causal" if causal else "non-causal", kind=form.name)
    return Decision(causal, op_scale, prescale, window, op_args)
