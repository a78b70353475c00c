"""Attention sites in eager execution: record the real Q/K/V a model passes to attention, or route chosen
sites to HyperAttention without compiling.

A *site* is one call of ``torch.nn.functional.scaled_dot_product_attention`` during a forward, numbered from
0 in call order (for a decoder, site i is layer i's attention), as the backend numbers SDPA nodes for
``HYPER_LAYERS``. Both tools intercept those calls with a ``TorchFunctionMode``, so they see exactly what the
op sees (after rotary embeddings, before the softmax scale) and work for any model that calls SDPA (HF models
with ``attn_implementation="sdpa"``).

    with capture_attention("5,11,17") as records:     # record the listed sites
        model(input_ids)
    save_records(records, "qkv.pt")                   # a list of dicts, readable with weights_only=True

    with swap_attention("5,11", config=HyperConfig(block_size=128), module=model) as swapped:
        for ids in batches:                           # module=: numbering restarts at every model call
            model(ids)                                # sites 5 and 11 run hyper_attention
    swapped.sites                                     # [5, 11, 5, 11, ...]: the calls that were routed

The record format is the autotuner's ``--inputs`` format (``hyper_backend.autotune.inputs``): ``q [B, Hq, N, D]``,
``k, v [B, Hkv, N, D]``, plus ``"causal"``, ``"scale"``, ``"layer"`` (the site index), ``"name"``, ``"masked"``
(an explicit mask was passed: the sliding-window layers of Gemma, for instance) and ``"enable_gqa"``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from hyper_backend.attention import hyper_attention
from hyper_backend.config import HyperConfig, LayerSelection

Selection = str | LayerSelection | list | tuple | set | frozenset
_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_ARG_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


@dataclass
class SiteCall:
    """One SDPA call, its arguments named as in ``F.scaled_dot_product_attention``."""

    index: int
    query: torch.Tensor  # [B, Hq, Nq, D]
    key: torch.Tensor  # [B, Hkv, Nk, D]
    value: torch.Tensor  # [B, Hkv, Nk, Dv]
    attn_mask: torch.Tensor | None = None
    dropout_p: float = 0.0
    is_causal: bool = False
    scale: float | None = None
    enable_gqa: bool = False

    def sdpa_kwargs(self) -> dict:
        return dict(
            attn_mask=self.attn_mask,
            dropout_p=self.dropout_p,
            is_causal=self.is_causal,
            scale=self.scale,
            enable_gqa=self.enable_gqa,
        )


class AttentionSites(TorchFunctionMode):
    """Numbers the SDPA calls made while active and hands each to ``handler(call) -> Tensor | None``.

    A returned tensor replaces the call's output; ``None`` runs SDPA as written. ``count`` is the number of
    calls seen; `restart` sets it back to 0 (call it between forwards so indices mean sites, not calls).
    """

    def __init__(self, handler: Callable[[SiteCall], torch.Tensor | None]):
        super().__init__()
        self.handler = handler
        self.count = 0

    def restart(self) -> None:
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _SDPA:
            return func(*args, **kwargs)
        named = dict(zip(_ARG_NAMES, args))
        named.update(kwargs)
        call = SiteCall(index=self.count, **named)
        self.count += 1
        out = self.handler(call)
        return func(*args, **kwargs) if out is None else out


@contextlib.contextmanager
def _numbered(mode: AttentionSites, module: torch.nn.Module | None):
    """Activate ``mode``; with ``module``, restart its numbering at each call of the module."""
    hook = None if module is None else module.register_forward_pre_hook(lambda *args: mode.restart())
    try:
        with mode:
            yield mode
    finally:
        if hook is not None:
            hook.remove()


def _selection(sites: Selection) -> LayerSelection:
    return LayerSelection.parse(sites)


def _chosen(selection: LayerSelection, index: int, total: int | None) -> bool:
    if selection.kind == "last" and total is None:
        raise ValueError("sites 'last:K' need total= (the number of attention sites per forward)")
    return selection.contains(index, total)


def count_sites(forward: Callable[[], object]) -> int:
    """Number of SDPA calls ``forward()`` makes (run it on a short input: every call is executed)."""
    mode = AttentionSites(lambda call: None)
    with torch.no_grad(), mode:
        forward()
    return mode.count


def resolved_scale(call: SiteCall) -> float:
    return float(call.scale) if call.scale is not None else 1.0 / math.sqrt(call.query.shape[-1])


def site_record(call: SiteCall, dtype: torch.dtype | None = None, max_len: int | None = None) -> dict:
    """The autotuner-format dict for one call: detached contiguous CPU copies of q, k, v and metadata."""

    def keep(x):
        x = x.detach()
        if max_len is not None:
            x = x[:, :, :max_len]
        return x.to(device="cpu", dtype=dtype or x.dtype).contiguous().clone()

    return {
        "q": keep(call.query),
        "k": keep(call.key),
        "v": keep(call.value),
        "causal": bool(call.is_causal),
        "scale": resolved_scale(call),
        "layer": call.index,
        "name": f"site {call.index}",
        "masked": call.attn_mask is not None,
        "enable_gqa": bool(call.enable_gqa),
    }


@contextlib.contextmanager
def capture_attention(
    sites: Selection = "all",
    *,
    total: int | None = None,
    dtype: torch.dtype | None = None,
    max_len: int | None = None,
    module: torch.nn.Module | None = None,
):
    """Record Q/K/V of the chosen sites. Yields the list that fills with one dict per recorded call.

    Args:
        sites: which sites (``LayerSelection`` forms: ``"all"``, ``"5,11,17"``, ``"first:2"``, ...).
        total: sites per forward, needed by ``"last:K"`` (see `count_sites`).
        dtype: cast the copies (e.g. ``torch.float16`` to halve the file); default keeps the model's dtype.
        max_len: keep only the first ``max_len`` positions (a causal prefix is itself a causal problem).

        module: sites count from 0 again at every call of this module (the model, or the part you call);
            without it they count on through the block, so wrap one forward per block.
    """
    selection = _selection(sites)
    records: list[dict] = []

    def handler(call: SiteCall):
        if _chosen(selection, call.index, total):
            records.append(site_record(call, dtype, max_len))
        return None

    with _numbered(AttentionSites(handler), module):
        yield records


def save_records(records: list[dict], path: str) -> None:
    """``torch.save`` the records; ``torch.load(path, weights_only=True)`` reads them back."""
    torch.save(list(records), path)


@dataclass
class Swapped:
    """What `swap_attention` did: the site index of every call it routed to `hyper_attention`."""

    sites: list[int] = field(default_factory=list)
    mode: AttentionSites | None = None


@contextlib.contextmanager
def swap_attention(
    sites: Selection,
    *,
    config: HyperConfig | None = None,
    total: int | None = None,
    module: torch.nn.Module | None = None,
    attention: Callable = hyper_attention,
):
    """Route the chosen SDPA sites to `hyper_attention` (eager; no compilation).

    The same calls a ``torch.compile(..., backend="hyper")`` rewrite would reach, with the same arguments:
    `hyper_attention` itself stays exact where the approximation cannot serve the call (an explicit mask,
    dropout, a length below ``min_seq_len``); ``hyper_backend.kernels.op.path_counts()`` tells which ran.
    ``total`` and ``module`` as in `capture_attention`. ``attention``: a variant to try instead, with SDPA's
    signature plus the keyword ``config``.
    """
    selection = _selection(sites)
    swapped = Swapped()

    def handler(call: SiteCall):
        if not _chosen(selection, call.index, total):
            return None
        swapped.sites.append(call.index)
        return attention(call.query, call.key, call.value, config=config, **call.sdpa_kwargs())

    swapped.mode = AttentionSites(handler)
    with _numbered(swapped.mode, module):
        yield swapped
