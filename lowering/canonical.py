"""Canonicalisation: attention written in other ways, rewritten on the Dynamo graph into one SDPA node.

Runs on the Dynamo graph after the sites are found and numbered, before `hyper_backend.lowering.sdpa` lowers
SDPA calls, so every later step (mask proofs, GQA, scale, the report) is shared. The families, one module each:
`einsum` (two einsums around a softmax), `mha` (``F.multi_head_attention_forward``,
``torch._native_multi_head_attention``) and `encoder_layer` (``torch._transformer_encoder_layer_fwd``).

A site is rewritten only if the new SDPA node is lowered (`sdpa.plan_sdpa` accepts it and ``layers`` selects
it). Otherwise the graph keeps its own computation and the site its reason. A canonicalised site carries
``kind="sdpa"`` while `sdpa.rewrite_sdpa` handles it, and ``family`` (the kind `explain` shows) from then on
(`sites.record`). The graph's `masks.Prover` is shared with `sdpa.rewrite_sdpa`, so the new node's mask is
proven once.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from . import einsum
from .builder import Builder, Unsupported
from .encoder_layer import encoder_layer_sdpa
from .masks import Prover
from .mha import mha_sdpa, native_sdpa
from .sdpa import plan_sdpa
from .sites import Policy, Site


def family_of(site: Site, node: fx.Node) -> str:
    if site.kind in ("mha", "encoder_layer"):
        return site.kind
    if site.kind == "attention" and einsum.is_einsum_site(node):
        return "einsum"
    return ""


def _rewrite(graph: fx.Graph, family: str, node: fx.Node) -> tuple[Builder, fx.Node, fx.Node, list[fx.Node]]:
    """``(builder, sdpa node, output node, replaced nodes)``: the output replaces the first replaced node (and,
    for MHA, the getitem nodes after it); raises `Unsupported` (or anything an analysis cannot finish)."""
    if family == "einsum":
        b = Builder(graph, einsum.anchor(node), node)
        return b, *_or_discard(b, lambda: einsum.einsum_sdpa(b, node))
    b = Builder(graph, node, node)
    if family == "encoder_layer":
        sdpa, out, _ = _or_discard(b, lambda: encoder_layer_sdpa(b, node))
        return b, sdpa, out, [node]
    build = native_sdpa if node.target is torch._native_multi_head_attention else mha_sdpa
    sdpa, out, _ = _or_discard(b, lambda: build(b, node))
    return b, sdpa, out, [*node.users, node]  # the getitem [0] nodes, then the call


def _or_discard(b: Builder, build):
    try:
        return build()
    except Exception:
        b.discard()
        raise


def canonicalize(gm: fx.GraphModule, sites: dict[str, Site], prover: Prover, policy: Policy) -> int:
    """Rewrite the einsum / MHA / encoder-layer sites of ``gm`` into SDPA nodes where those are lowered.

    ``sites``: the graph's sites by node name (updated: a rewritten site is keyed by its SDPA node, a site kept
    exact here is removed, so no later pass revisits it). Returns the number of rewritten sites.
    """
    graph = gm.graph
    done = 0
    for node in list(graph.nodes):
        site = sites.get(node.name)
        family = family_of(site, node) if site is not None else ""
        if not family:
            continue
        site.family, site.kind = family, "sdpa"
        try:
            b, sdpa, out, replaced = _rewrite(graph, family, node)
        except Exception as e:  # not a form we express (or an analysis we cannot finish): the site stays exact
            del sites[node.name]
            site.decide(
                "exact", str(e) if isinstance(e, Unsupported) else f"could not canonicalise ({type(e).__name__}: {e})"
            )
            continue
        plan = plan_sdpa(sdpa, prover)
        reason = policy.layers_reason(site, banded=plan.window is not None) or plan.reason
        if reason:
            b.discard()
            del sites[node.name]
            site.decide("exact", reason)
            continue
        replaced[0].replace_all_uses_with(out)
        if family != "einsum":
            for r in replaced[1:-1]:
                r.replace_all_uses_with(out)
        for r in replaced:
            if not r.users:
                graph.erase_node(r)
        del sites[node.name]
        sites[sdpa.name] = site
        site.node = sdpa.name
        done += 1
    if done:
        gm.recompile()
    return done
