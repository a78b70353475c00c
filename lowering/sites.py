"""Attention sites: finding them in a Dynamo graph, numbering them, naming them, recording decisions.

A *site* is one attention computation in the model: an ``F.scaled_dot_product_attention`` call (kind
``sdpa``), a hand-written ``softmax`` whose input comes from a matmul and whose output feeds a matmul
(``attention``), an ``F.multi_head_attention_forward`` / ``torch._native_multi_head_attention`` call (``mha``:
``nn.MultiheadAttention`` and the Transformer layers), or ``torch._transformer_encoder_layer_fwd``
(``encoder_layer``: ``nn.TransformerEncoderLayer``'s eval-mode fast path). Sites are found
in the Dynamo graph (before AOTAutograd) so SDPA and hand-written sites share one numbering, in graph order,
which is the order the model executes them. How numbers continue across graph breaks is decided by the
backend (`hyper_backend.backend`): each graph gets a base offset.

Every decision is logged under the ``hyper_backend`` logger and counted in
``torch._dynamo.utils.counters["hyper_backend"]``:

- ``"graphs"``: graphs compiled by the backend;
- ``"sites"``: attention sites seen;
- ``"rewritten"``: sites lowered to ``torch.ops.hyper.attention``; also ``"rewritten:<kind>"`` per kind
  (``einsum``, ``mha`` and ``encoder_layer`` for the families `hyper_backend.lowering.canonical` rewrites into
  SDPA);
- ``"window"``: sites whose mask is a band, served exactly by ``torch.ops.hyper.window_attention``;
- ``"exact"``: sites left exact;
- ``"cached"``: hand-written sites of a graph served from inductor's FX-graph cache (the pass did not run, so
  its decisions are unknown to this process; `hyper_backend.explain` always compiles afresh);
- ``"shielded"``: softmaxes over a non-key dim kept away from inductor's own attention patterns (see
  `hyper_backend.lowering.patterns._shield`).
"""

from __future__ import annotations

import logging
import operator
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

log = logging.getLogger("hyper_backend")

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)
MHA_TARGETS = (F.multi_head_attention_forward, torch._native_multi_head_attention)
ENCODER_LAYER_TARGETS = (torch._transformer_encoder_layer_fwd,)
_SOFTMAX_FUNCS = (torch.softmax, F.softmax)
_MATMUL_FUNCS = (operator.matmul, torch.matmul, torch.bmm, torch.baddbmm, torch.einsum)
_MATMUL_METHODS = ("matmul", "bmm", "baddbmm", "__matmul__")
# ops that may sit between the score matmul and the softmax, or between the softmax and the value matmul
_PASS_FUNCS = (
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    torch.add,
    torch.mul,
    torch.div,
    torch.where,
    torch.masked_fill,
    F.dropout,
    torch.dropout,
    torch.clamp,
)
_PASS_METHODS = (
    "add",
    "mul",
    "div",
    "masked_fill",
    "masked_fill_",
    "float",
    "half",
    "bfloat16",
    "to",
    "type",
    "type_as",
    "clamp",
    "contiguous",
    "__add__",
    "__mul__",
    "__truediv__",
    "view",
    "reshape",
)
_MAX_HOPS = 8


@dataclass
class Site:
    """One attention site and what the backend did with it.

    ``index`` is the site number used by ``layers=`` / ``HYPER_LAYERS``; ``graph`` the compiled graph it is in
    (in compile order); ``node`` the Dynamo graph node (for mapping aten-level matches back).
    """

    index: int
    name: str
    kind: str
    decision: str = "exact"  # "hyper" | "window" | "exact" | "cached"
    reason: str = ""
    graph: int = 0
    node: str = ""
    family: str = ""  # set by `canonical`: the kind reported once the SDPA lowering has decided (see `record`)

    def decide(self, decision: str, reason: str, kind: str | None = None) -> None:
        self.decision, self.reason = decision, reason
        if kind is not None:
            self.kind = kind


@dataclass(frozen=True)
class Policy:
    """What the backend decided for the sites of one graph, handed to the lowering passes.

    ``selected(site)``: whether ``layers`` lets the site approximate (a banded mask runs the exact window op
    whatever it says). ``hyper_args(site, query, causal)``: the trailing arguments of the site's
    ``hyper::attention`` call (its settings, for its query's fake value and causality). ``window_args``: the
    trailing arguments of every ``hyper::window_attention`` call (kernel choice, bookkeeping threads). ``key``:
    text of everything the two depend on (the settings, the tuning cache's content, per-site calibrated configs),
    for the inductor pass's cache key."""

    selected: Callable[[Site], bool]
    hyper_args: Callable[[Site, torch.Tensor, bool], tuple]
    window_args: tuple = ()
    key: str = ""

    def layers_reason(self, site: Site, banded: bool) -> str:
        """Why ``layers`` keeps ``site`` exact, or ''. The one rule for every lowering pass: a banded mask runs the
        exact ``hyper::window_attention`` (no approximation) whatever ``layers`` says."""
        return "" if banded or self.selected(site) else "not selected by layers"


# ----------------------------------------------------------------------------------------------------------
# names: module path and source line, from node meta
# ----------------------------------------------------------------------------------------------------------

_SUBSCRIPT = re.compile(r"\[(?:'([^']*)'|(\d+))\]")
_FILE_LINE = re.compile(r'File "([^"]+)", line (\d+)')


def module_path(node: fx.Node) -> str:
    """``L['self'].model.layers[0].self_attn`` -> ``model.layers.0.self_attn`` (innermost module of the node)."""
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = _SUBSCRIPT.sub(lambda m: "." + (m.group(1) or m.group(2)), str(path))
    path = re.sub(r"^L\.self\.?|^L\['self'\]\.?", "", path)
    path = path.replace("._modules.", ".").lstrip(".")
    return path


def source_line(node: fx.Node) -> str:
    """``file.py:123`` of the innermost frame in the node's ``stack_trace``, or ''."""
    trace = node.meta.get("stack_trace") or ""
    found = _FILE_LINE.findall(trace)
    if not found:
        return ""
    path, line = found[-1]
    return f"{os.path.basename(path)}:{line}"


def site_name(node: fx.Node) -> str:
    mod, src = module_path(node), source_line(node)
    if mod and src:
        return f"{mod} ({src})"
    return mod or src or node.name


# ----------------------------------------------------------------------------------------------------------
# discovery in the Dynamo graph
# ----------------------------------------------------------------------------------------------------------


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def is_softmax(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _SOFTMAX_FUNCS) or (
        node.op == "call_method" and node.target == "softmax"
    )


def _is_matmul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MATMUL_FUNCS) or (
        node.op == "call_method" and node.target in _MATMUL_METHODS
    )


def _is_pass(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _PASS_FUNCS) or (
        node.op == "call_method" and node.target in _PASS_METHODS
    )


def _reaches_matmul(node: fx.Node, upstream: bool, hops: int = _MAX_HOPS) -> bool:
    """A matmul within ``hops`` steps of ``node`` (inputs if ``upstream``, else users), through pass-through ops."""
    step = (lambda n: n.all_input_nodes) if upstream else (lambda n: list(n.users))
    frontier = step(node)
    for _ in range(hops):
        if any(_is_matmul(n) for n in frontier):
            return True
        frontier = [m for n in frontier if _is_pass(n) for m in step(n)]
    return False


def is_handwritten_candidate(node: fx.Node) -> bool:
    """A softmax between two matmuls (through casts, scales, masks and dropout): hand-written attention."""
    return is_softmax(node) and _reaches_matmul(node, upstream=True) and _reaches_matmul(node, upstream=False)


def find_sites(gm: fx.GraphModule, base: int, graph_number: int) -> list[Site]:
    """Sites of a Dynamo graph in execution order, numbered from ``base``."""
    sites = []
    for node in gm.graph.nodes:
        if is_sdpa(node):
            kind = "sdpa"
        elif node.op == "call_function" and node.target in MHA_TARGETS:
            kind = "mha"
        elif node.op == "call_function" and node.target in ENCODER_LAYER_TARGETS:
            kind = "encoder_layer"
        elif is_handwritten_candidate(node):
            kind = "attention"
        else:
            continue
        sites.append(Site(index=base + len(sites), name=site_name(node), kind=kind, graph=graph_number, node=node.name))
    return sites


# ----------------------------------------------------------------------------------------------------------
# logging and counters
# ----------------------------------------------------------------------------------------------------------


def count(key: str, n: int = 1) -> None:
    torch._dynamo.utils.counters["hyper_backend"][key] += n


def record(site: Site) -> None:
    """Log a final decision and bump the counters. The log record carries the `Site` as ``hyper_site``.

    A site canonicalised into SDPA is handled as kind ``sdpa`` until here; it is reported as its family."""
    if site.family and site.kind == "sdpa":
        site.kind = site.family
    count("sites")
    if site.decision == "hyper":
        count("rewritten")
        count(f"rewritten:{site.kind}")
    else:
        count(site.decision)
    log.info(
        "site %d [%s] %s: %s%s",
        site.index,
        site.kind,
        site.name,
        site.decision,
        f" ({site.reason})" if site.reason else "",
        extra={"hyper_site": site},
    )
