"""A `hypothesis` fuzz of the lowering: random attention modules through ``backend="hyper"``.

Each example builds a module of one or two attention sites, each drawn from:

- the spelling: ``F.scaled_dot_product_attention``, or hand-written ``softmax(q kᵀ) v`` with ``@``,
  ``torch.matmul``, ``Tensor.matmul``, ``torch.einsum`` (``bhqd``, heads third ``bqhd``, or ``...`` with the key
  operand first; the site's drawn width picks it) or 3-D ``torch.bmm``; softmax as ``torch.softmax``,
  ``F.softmax``, ``Tensor.softmax`` or an fp32 upcast cast back;
- the scale: multiplied into the scores, dividing them, multiplied into q first, none, or SDPA's ``scale=``;
- the mask: none; causal (``is_causal``, or built in the graph by ``tril``, ``triu(full(-inf))``,
  ``masked_fill(triu(ones))``, ``arange`` comparisons); a bool key-padding input (alone or AND-ed with a causal
  mask); an arbitrary float additive input; a band or a sliding window built in the graph; masks computed from
  q and k (general, and key-padding shaped); and the forms of issue 18's audit: an HF-style float 0/1 mask cast
  to bool (alone or AND-ed with a causal mask); bands whose width is computed from the length, an int argument
  (``if w > 0``) or another tensor's size; a band compared with a float literal, or through floor division; a
  band kept in a plain attribute or in a registered buffer, changed between calls; a finite fill (-1e4) with and
  without a scale after it; with n_q != n_k, a band aligned bottom-right and a causal mask aligned top-left,
  filled with ``finfo.min`` (more queries than keys leaves rows without a key);
- GQA (``enable_gqa=True``, HF's ``repeat_kv`` expand/reshape, ``repeat_interleave``); dropout (none, p=0,
  p>0) in train and eval mode; cross-attention (n_q != n_k);

and for the whole module: fp32 or bf16, odd lengths and head dims 8/40/80, a ``torch._dynamo.graph_break()``
before, between or after the sites, static or dynamic shapes, gradients or inference, K/V or V alone of batch 1
against a query batch of 2, a second call with the widths, the attribute and the buffer changed, and the inner
backend (``aot_eager`` mostly: fast; ``inductor`` for some, which is where hand-written attention is rewritten).

The approximation is made exact (``block_size`` beyond every length, ``min_seq_len=1``: the op runs and one
block holds every key), so for every example:

1. the compiled output and the gradients of q, k, v equal eager's: the error against the same module run in
   float64 is at most a few times eager's own error at that precision;
2. every site the backend lowered is one it may lower: an arbitrary float mask, a mask computed from q and k,
   or dropout in training are never lowered; a band or a sliding window only ever goes to the exact
   ``hyper::window_attention`` (decision ``window``); every site it kept exact has a reason in
   ``hyper_backend.explain``'s report; and the sites the README documents as lowered are lowered;
3. the training compile agrees with `explain` (same number of lowered and windowed sites) and the op ran once
   per lowered site (and its backward once per lowered site when there are gradients), the window op once per
   windowed site;
4. with a second call, its output and gradients equal eager's too (a recompile, or a changed buffer's exact
   fallback, must serve it).

50 derandomized examples run in CI (and a few per new family); ``-m slow`` runs 1000 more with longer
sequences. With ``HYPER_FUZZ_COUNTS=path`` every example checked appends its families to ``path`` (one JSON list
per line; ``python tests/test_fuzz_lowering.py path`` counts them).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context, event

import hyper_backend
from hyper_backend.kernels import op as hyper_op

pytestmark = pytest.mark.usefixtures("lsh_detector")  # written for the LSH estimator: conftest.py

# block_size >= n: HyperAttention is exact attention, so compiled must equal eager
EXACT = {"block_size": 1 << 20, "min_seq_len": 1, "tune_cache": ""}

HANDWRITTEN = ("at", "matmul", "method", "einsum", "bmm")
SOFTMAXES = ("torch", "F", "method", "fp32")
CAUSAL_BUILT = ("causal_tril", "causal_triu_add", "causal_masked_fill", "causal_arange")
AUDIT_MASKS = (  # issue 18's forms
    "float_bool_pad",
    "float_bool_pad_causal",
    "computed_width",
    "arg_width",
    "table_width",
    "float_literal",
    "floordiv",
    "attr_mask",
    "buffer_mask",
    "finite_fill",
    "finite_fill_scaled",
)
SELF_MASKS = ("none",) + CAUSAL_BUILT + ("padding", "padding_causal", "float_add", "band", "window", "data", "data_pad")
SELF_MASKS += AUDIT_MASKS
CROSS_MASKS = ("none", "padding", "float_add", "data", "data_pad")  # masks that make sense with n_q != n_k
CROSS_MASKS += ("float_bool_pad", "band_br", "causal_tl")
# the op cannot compute these: lowering (or windowing) is a bug
NEVER_LOWERED = ("float_add", "data", "float_literal", "floordiv", "attr_mask", "finite_fill_scaled")
# bands: served exactly by hyper::window_attention, never approximated
BANDED = ("band", "window", "computed_width", "arg_width", "table_width", "buffer_mask", "band_br", "causal_tl")
KEY_PADDING = ("padding", "padding_causal", "data_pad", "float_bool_pad", "float_bool_pad_causal")
ANY_FORM = ("sdpa",) * len(HANDWRITTEN) + HANDWRITTEN  # half SDPA, half hand-written


@dataclass(frozen=True)
class Att:
    """One attention site."""

    form: str  # "sdpa" or one of HANDWRITTEN
    scale: str  # sdpa: "default" / "kwarg" / "pre_q"; hand-written: "mul" / "div" / "pre_q" / "none"
    scale_value: float | None  # None: 1/sqrt(d)
    mask: str  # "causal_flag" (sdpa only) or one of SELF_MASKS / CROSS_MASKS
    gqa: str  # "none", "enable_gqa" (sdpa only), "repeat_kv", "repeat_interleave"
    softmax: str  # hand-written only
    dropout: float | None  # None: no dropout at all
    width: int  # band / window width


@dataclass(frozen=True)
class Case:
    atts: tuple[Att, ...]
    brk: str | None  # None, "before", "between", "after"
    training: bool
    grad: bool
    dtype: str  # "float32" / "bfloat16"
    B: int
    Hq: int
    Hkv: int
    nq: int
    nk: int
    d: int
    dynamic: bool | None
    inner: str
    seed: int
    bcast: str | None = None  # "kv" / "v": those of batch 1 against a query batch B = 2
    second: bool = False  # a second call, with the widths, the attribute mask and the buffer changed

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)


# ----------------------------------------------------------------------------------------------------------
# the module
# ----------------------------------------------------------------------------------------------------------


def _causal_keep(n, device):
    i = torch.arange(n, device=device)
    return i[None, :] <= i[:, None]


def _data_keep(q, k):
    """A mask computed from q and k (not causal, not key padding); the first key stays visible."""
    nk = k.shape[-2]
    keep = (q[..., :1] @ k[:, :1, :, :1].transpose(-1, -2)) > 0  # [B, Hq, nq, nk]
    return keep | (torch.arange(nk, device=q.device) == 0)


def _data_pad_keep(k):
    """A key-padding-shaped ``[B, 1, 1, nk]`` mask computed from k; the first key stays visible."""
    nk = k.shape[-2]
    return ((k[:, :1, :, 0] > -0.5) | (torch.arange(nk, device=k.device) == 0))[:, :, None, :]


def _band_keep(n, width, device, window):
    i = torch.arange(n, device=device)
    if window:  # causal sliding window of `width` keys ending at the query
        return (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - width)
    return (i[None, :] - i[:, None]).abs() <= width


def _window_keep(nq, nk, width, device):
    """A causal sliding window of ``width`` keys, aligned top-left (as a model builds it for n_q = n_k)."""
    i, j = torch.arange(nq, device=device), torch.arange(nk, device=device)
    return (j[None, :] <= i[:, None]) & (j[None, :] > i[:, None] - width)


def _audit_keep(att: Att, q, k, ex):
    """The keep mask of an issue-18 form (True = attend); ``ex``: the call's extras (`Extras`)."""
    nq, nk, dev, m = q.shape[-2], k.shape[-2], q.device, att.mask
    i, j = torch.arange(nq, device=dev), torch.arange(nk, device=dev)
    if m in ("float_bool_pad", "float_bool_pad_causal"):  # HF-style float mask, 1 = attend
        keep = ex.am[:, None, None, :].bool() if att.width % 2 else ex.am[:, None, None, :].to(torch.bool)
        return keep & _causal_keep(nq, dev) if m == "float_bool_pad_causal" else keep
    if m == "computed_width":  # a width from the length: a band only for one static length
        return _window_keep(nq, nk, nq // 4 + 1, dev)
    if m == "arg_width":
        keep = _causal_keep(nq, dev)
        if ex.w > 0:
            keep = keep & (j[None, :] > i[:, None] - ex.w)
        return keep
    if m == "table_width":
        return _window_keep(nq, nk, ex.table.shape[0], dev)
    if m == "float_literal":
        return (j[None, :] - i[:, None]).abs() <= float(att.width)
    if m == "floordiv":
        return ((j[None, :] - i[:, None]).abs() // 2) <= att.width
    if m == "attr_mask":
        return ex.attr
    if m == "buffer_mask":
        return ex.buf[:nq, :nk]
    if m == "band_br":  # a window aligned bottom-right (the window op's alignment), any n_q, n_k
        d = j[None, :] - i[:, None] - (nk - nq)
        return (d >= 1 - att.width) & (d <= 0)
    if m == "causal_tl":  # causal aligned top-left: with n_q > n_k a band, with n_q < n_k it hides the diagonal
        return j[None, :] <= i[:, None]
    return _causal_keep(nq, dev)  # finite_fill, finite_fill_scaled


@dataclass
class Extras:
    """What a site's mask may read besides q, k, v: the float 0/1 mask ``am``, the int width ``w``, the width
    ``table`` (its length), and the site's attribute mask and buffer."""

    am: torch.Tensor | None = None
    w: int = 0
    table: torch.Tensor | None = None
    attr: torch.Tensor | None = None
    buf: torch.Tensor | None = None


def _repeat(x, groups, how):
    if groups == 1:
        return x
    B, H, N, D = x.shape
    if how == "repeat_kv":  # HF's repeat_kv
        return x[:, :, None, :, :].expand(B, H, groups, N, D).reshape(B, H * groups, N, D)
    return x.repeat_interleave(groups, dim=1)


def _sdpa(att: Att, q, k, v, pad, bias, training, ex):
    kw = {}
    if att.scale == "kwarg":
        kw["scale"] = att.scale_value
    elif att.scale == "pre_q":
        q = q * (att.scale_value if att.scale_value is not None else q.shape[-1] ** -0.5)
        kw["scale"] = 1.0
    if att.dropout is not None:
        kw["dropout_p"] = att.dropout if training else 0.0
    groups = q.shape[1] // k.shape[1]
    mask_k = k
    if att.gqa == "enable_gqa":
        kw["enable_gqa"] = True
    else:
        k, v = _repeat(k, groups, att.gqa), _repeat(v, groups, att.gqa)
    n, dev = q.shape[-2], q.device
    m = att.mask
    if m == "causal_flag":
        kw["is_causal"] = True
    elif m == "causal_tril":
        kw["attn_mask"] = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
    elif m == "causal_triu_add":
        kw["attn_mask"] = torch.triu(torch.full((n, n), float("-inf"), dtype=q.dtype, device=dev), diagonal=1)
    elif m == "causal_masked_fill":
        kw["attn_mask"] = ~torch.ones(n, n, device=dev).triu(1).bool()
    elif m == "causal_arange":
        kw["attn_mask"] = _causal_keep(n, dev)
    elif m == "padding":
        kw["attn_mask"] = pad[:, None, None, :]
    elif m == "padding_causal":
        kw["attn_mask"] = _causal_keep(n, dev)[None, None] & pad[:, None, None, :]
    elif m == "float_add":
        kw["attn_mask"] = bias
    elif m in ("band", "window"):
        kw["attn_mask"] = _band_keep(n, att.width, dev, m == "window")
    elif m == "data":
        kw["attn_mask"] = _data_keep(q, mask_k)
    elif m == "data_pad":
        kw["attn_mask"] = _data_pad_keep(mask_k)
    elif m in ("band_br", "causal_tl"):  # finfo.min: eager gives a row without a key the mean of v
        keep = _audit_keep(att, q, mask_k, ex)
        kw["attn_mask"] = torch.zeros(keep.shape, dtype=q.dtype, device=dev).masked_fill(
            ~keep, torch.finfo(q.dtype).min
        )
    elif m in ("finite_fill", "finite_fill_scaled"):
        fill = torch.zeros(n, n, dtype=q.dtype, device=dev).masked_fill(~_causal_keep(n, dev), -1e4)
        kw["attn_mask"] = fill / 1e4 if m == "finite_fill_scaled" else fill
    elif m in AUDIT_MASKS:
        kw["attn_mask"] = _audit_keep(att, q, mask_k, ex)
    return F.scaled_dot_product_attention(q, k, v, **kw)


def _scores(att: Att, q, k):
    """q @ kᵀ in the site's spelling (3-D for bmm)."""
    if att.form == "at":
        return q @ k.transpose(-2, -1)
    if att.form == "matmul":
        return torch.matmul(q, k.transpose(2, 3))
    if att.form == "method":
        return q.matmul(k.transpose(-1, -2))
    if att.form == "einsum":  # the spelling, picked by the width (drawn for every site, read by band masks)
        if att.width % 3 == 1:  # heads third: [B, N, H, D] operands
            return torch.einsum("bqhd,bkhd->bhqk", q.transpose(1, 2), k.transpose(1, 2))
        if att.width % 3 == 2:  # ellipsis, key operand first
            return torch.einsum("...kd,...qd->...qk", k, q)
        return torch.einsum("bhqd,bhkd->bhqk", q, k)
    B, H, nq, d = q.shape
    return torch.bmm(q.reshape(B * H, nq, d), k.reshape(B * H, k.shape[2], d).transpose(1, 2))


def _pv(att: Att, p, v):
    if att.form == "at":
        return p @ v
    if att.form == "matmul":
        return torch.matmul(p, v)
    if att.form == "method":
        return p.matmul(v)
    if att.form == "einsum":
        if att.width % 3 == 1:
            return torch.einsum("bhqk,bkhd->bqhd", p, v.transpose(1, 2)).transpose(1, 2)
        if att.width % 3 == 2:
            return torch.einsum("...kd,...qk->...qd", v, p)
        return torch.einsum("bhqk,bhkd->bhqd", p, v)
    B, H, nk, d = v.shape
    return torch.bmm(p, v.reshape(B * H, nk, d)).view(B, H, -1, d)


def _handwritten(att: Att, q, k, v, pad, bias, training, ex):
    groups = q.shape[1] // k.shape[1]
    mask_k = k
    k, v = _repeat(k, groups, att.gqa), _repeat(v, groups, att.gqa)
    d = q.shape[-1]
    c = att.scale_value
    if att.scale == "pre_q":
        q = q * (c if c is not None else d**-0.5)
    s = _scores(att, q, k)
    if att.scale == "mul":
        s = s * (c if c is not None else d**-0.5)
    elif att.scale == "div":
        s = s / (1.0 / c if c is not None else math.sqrt(d))
    B, H, nq, _ = q.shape
    nk = k.shape[2]
    dev, m = q.device, att.mask
    four_d = m in (
        "padding",
        "padding_causal",
        "float_add",
        "data",
        "data_pad",
        "float_bool_pad",
        "float_bool_pad_causal",
    )
    if att.form == "bmm" and four_d:
        s = s.view(B, H, nq, nk)
    if m == "causal_tril":
        s = s.masked_fill(~torch.ones(nq, nk, dtype=torch.bool, device=dev).tril(), float("-inf"))
    elif m == "causal_triu_add":
        s = s + torch.triu(torch.full((nq, nk), float("-inf"), dtype=s.dtype, device=dev), diagonal=1)
    elif m == "causal_masked_fill":
        s = s.masked_fill(torch.ones(nq, nk, device=dev).triu(1).bool(), float("-inf"))
    elif m == "causal_arange":
        s = torch.where(_causal_keep(nq, dev), s, torch.finfo(s.dtype).min)
    elif m == "padding":
        s = s.masked_fill(~pad[:, None, None, :], float("-inf"))
    elif m == "padding_causal":
        s = s.masked_fill(~(_causal_keep(nq, dev)[None, None] & pad[:, None, None, :]), float("-inf"))
    elif m == "float_add":
        s = s + bias
    elif m in ("band", "window"):
        s = s.masked_fill(~_band_keep(nq, att.width, dev, m == "window"), float("-inf"))
    elif m == "data":
        s = s.masked_fill(~_data_keep(q, mask_k), float("-inf"))
    elif m == "data_pad":
        s = s.masked_fill(~_data_pad_keep(mask_k), float("-inf"))
    elif m in ("band_br", "causal_tl"):
        s = torch.where(_audit_keep(att, q, mask_k, ex), s, torch.finfo(s.dtype).min)
    elif m == "finite_fill":
        s = s.masked_fill(~_causal_keep(nq, dev), -1e4)
    elif m == "finite_fill_scaled":  # the scale turns the fill into -1: a bias, not a mask
        s = s.masked_fill(~_causal_keep(nq, dev), -1e4) / 1e4
    elif m in AUDIT_MASKS:
        s = s.masked_fill(~_audit_keep(att, q, mask_k, ex), float("-inf"))
    if att.form == "bmm" and four_d:
        s = s.view(B * H, nq, nk)
    if att.softmax == "torch":
        p = torch.softmax(s, dim=-1)
    elif att.softmax == "F":
        p = F.softmax(s, dim=-1)
    elif att.softmax == "method":
        p = s.softmax(-1)
    else:  # HF's upcast: float32 (float64 for the float64 truth run), then back
        up = torch.float64 if s.dtype == torch.float64 else torch.float32
        p = F.softmax(s, dim=-1, dtype=up).to(q.dtype)
    if att.dropout is not None:
        p = F.dropout(p, att.dropout, training=training)
    return _pv(att, p, v)


class Fuzzed(torch.nn.Module):
    """The sites of ``case``. A ``buffer_mask`` site keeps its band in the registered buffer ``band<i>``, an
    ``attr_mask`` site reads the plain attribute ``mask<i>`` (set before each call by `set_masks`)."""

    def __init__(self, case: Case):
        super().__init__()
        self.atts, self.brk = case.atts, case.brk
        n = max(case.nq, case.nk)
        for i, att in enumerate(case.atts):
            if att.mask == "buffer_mask":
                self.register_buffer(f"band{i}", _window_keep(n, n, att.width, None), persistent=False)

    def set_masks(self, case: Case, step: int) -> None:
        """The attribute masks and buffers of call ``step`` (0, 1): the second call widens every band by 3 (the
        buffer in place)."""
        n = max(case.nq, case.nk)
        for i, att in enumerate(self.atts):
            if att.mask == "attr_mask":
                setattr(self, f"mask{i}", _window_keep(case.nq, case.nk, att.width + 3 * step, None))
            if att.mask == "buffer_mask":
                getattr(self, f"band{i}").copy_(_window_keep(n, n, att.width + 3 * step, None))

    def site(self, i, q, k, v, pad, bias, am, w, table):
        att = self.atts[i]
        ex = Extras(am, w, table, getattr(self, f"mask{i}", None), getattr(self, f"band{i}", None))
        return (_sdpa if att.form == "sdpa" else _handwritten)(att, q, k, v, pad, bias, self.training, ex)

    def forward(self, q, k, v, pad, bias, am, w, table):
        # straight-line code: a graph break inside a loop would make Dynamo run the rest of the frame eagerly
        if self.brk == "before":
            q = q * 1.0
            torch._dynamo.graph_break()
        out = self.site(0, q, k, v, pad, bias, am, w, table)
        if len(self.atts) == 2:
            if self.brk == "between":
                torch._dynamo.graph_break()
            out = self.site(1, 0.5 * q + out, k, v, pad, bias, am, w, table)
        if self.brk == "after":
            torch._dynamo.graph_break()
            out = out * 2.0
        return out


# ----------------------------------------------------------------------------------------------------------
# the strategies
# ----------------------------------------------------------------------------------------------------------


@st.composite
def attentions(draw, cross: bool, gqa: bool, forms):
    form = draw(st.sampled_from(forms))
    return draw(attention_of(form, cross, gqa))


@st.composite
def attention_of(draw, form: str, cross: bool, gqa: bool, masks=None):
    if form == "sdpa":
        scale = draw(st.sampled_from(("default", "kwarg", "pre_q")))
        masks = masks or ("causal_flag",) + (CROSS_MASKS if cross else SELF_MASKS)
        gqas = ("enable_gqa", "repeat_kv", "repeat_interleave") if gqa else ("none",)
    else:
        scale = draw(st.sampled_from(("mul", "div", "pre_q", "none")))
        masks = masks or (CROSS_MASKS if cross else SELF_MASKS)
        gqas = ("repeat_kv", "repeat_interleave") if gqa else ("none",)
    return Att(
        form=form,
        scale=scale,
        scale_value=None if scale in ("default", "none") else draw(st.sampled_from((None, 0.05, 0.3, 1.5))),
        mask=draw(st.sampled_from(masks)),
        gqa=draw(st.sampled_from(gqas)),
        softmax=draw(st.sampled_from(SOFTMAXES)) if form != "sdpa" else "",
        dropout=draw(st.sampled_from((None, 0.0, 0.1, 0.5))),
        width=draw(st.integers(1, 8)),
    )


@st.composite
def cases(draw, max_n: int, inner=st.just("aot_eager"), dynamic=st.just(None), forms=ANY_FORM, masks=None, bcast=None):
    """Strategies for the inner backend and ``dynamic`` are parameters: inductor and dynamic shapes cost seconds
    per compile on CPU (aot_eager with static shapes: well under one), so CI draws them in tests of their own
    with few examples instead of leaving their share to hypothesis (whose derandomized examples come in clumps).
    ``masks``: draw the masks from these only; ``bcast``: a strategy for the batch broadcast (B = 2) (a test per
    family)."""
    nq = draw(st.integers(17, max_n))
    cross = draw(st.integers(0, 4)) == 0
    if masks is not None:  # cross-attention if, and only if, the family has cross masks (both: drawn)
        cross = draw(st.sampled_from([c for c in (False, True) if set(masks) & set(CROSS_MASKS if c else SELF_MASKS)]))
    nk = nq
    if cross:
        nk = draw(st.integers(17, max_n))
        nk = nk + 1 if nk == nq else nk
    B = 2 if bcast is not None else draw(st.integers(1, 2))
    bcast = draw(st.sampled_from((None,) * 6 + ("kv", "v")) if bcast is None else bcast) if B == 2 else None
    Hkv = draw(st.integers(1, 2))
    groups = draw(st.sampled_from((1, 1, 2)))
    sites = draw(st.integers(1, 2))
    site_forms = tuple(f for f in forms if not (bcast and f == "bmm")) or ("sdpa",)  # bmm does not broadcast
    allowed = None if masks is None else tuple(m for m in masks if m in (CROSS_MASKS if cross else SELF_MASKS))
    atts = tuple(
        draw(attention_of(draw(st.sampled_from(site_forms)), cross, groups > 1, allowed)) for _ in range(sites)
    )
    brks = (None, None, "before", "after") + (("between",) if sites == 2 else ())
    return Case(
        atts=atts,
        brk=draw(st.sampled_from(brks)),
        training=draw(st.booleans()),
        grad=draw(st.sampled_from((True, True, False))),
        dtype=draw(st.sampled_from(("float32", "bfloat16"))),
        B=B,
        Hq=Hkv * groups,
        Hkv=Hkv,
        nq=nq,
        nk=nk,
        d=draw(st.sampled_from((8, 40, 80))),
        dynamic=draw(dynamic),
        inner=draw(inner),
        seed=draw(st.integers(0, 2**16)),
        bcast=bcast,
        second=draw(st.booleans()),
    )


# ----------------------------------------------------------------------------------------------------------
# what the backend may, must and must not do with a site
# ----------------------------------------------------------------------------------------------------------


def may_lower(att: Att, case: Case) -> bool:
    """The op can compute the site exactly (up to the approximation): no dropout in training, one batch size, and a
    mask that is none, causal, key padding (any values) or causal AND key padding."""
    if (case.training and att.dropout) or case.bcast:
        return False
    return att.mask not in NEVER_LOWERED + BANDED


def may_window(att: Att, case: Case) -> bool:
    """The window op computes the site exactly: a band or sliding window built in the graph (or kept in a
    registered buffer) that leaves every query a key, no dropout in training, one batch size."""
    if att.mask not in BANDED or (case.training and att.dropout) or case.bcast:
        return False
    if att.mask == "band_br":  # right side 0: every row keeps a key iff n_q <= n_k
        return case.nq <= case.nk
    if att.mask == "causal_tl":  # a band only with more queries than keys (then every row keeps key 0)
        return case.nq > case.nk
    return True


def documented_lowered(att: Att, case: Case) -> bool:
    """The README's "Lowered" list: these sites must be lowered."""
    if not may_lower(att, case):
        return False
    if att.form == "sdpa":
        return not (att.mask == "causal_flag" and case.nq != case.nk)
    if att.form == "einsum":  # canonicalised into SDPA on the Dynamo graph: any inner backend, key padding too
        return True
    if case.inner != "inductor":
        return False  # the inductor pass only
    return att.mask not in KEY_PADDING  # padding in hand-written stays exact


# ----------------------------------------------------------------------------------------------------------
# the check
# ----------------------------------------------------------------------------------------------------------


def _inputs(case: Case):
    """``(q, k, v, pad, bias, am, w, table)`` and the output weights of the gradient check."""
    g = torch.Generator().manual_seed(case.seed)
    dt = case.torch_dtype
    kv_batch = 1 if case.bcast == "kv" else case.B
    q = torch.randn(case.B, case.Hq, case.nq, case.d, generator=g).to(dt)
    k = torch.randn(kv_batch, case.Hkv, case.nk, case.d, generator=g).to(dt)
    v = torch.randn(1 if case.bcast else case.B, case.Hkv, case.nk, case.d, generator=g).to(dt)
    pad = torch.rand(case.B, case.nk, generator=g) < 0.7
    pad[:, 0] = True  # every row keeps a key: causal row 0 sees key 0
    am = pad.float() if any(a.mask.startswith("float_bool_pad") for a in case.atts) else None
    bias = None
    if any(a.mask == "float_add" for a in case.atts):
        bias = (2 * torch.randn(case.B, 1, case.nq, case.nk, generator=g)).to(dt)
    if not any(a.mask in ("padding", "padding_causal") for a in case.atts):
        pad = None
    width = case.atts[0].width
    w = torch.randn(case.B, case.Hq, case.nq, case.d, generator=g, dtype=torch.float64)
    return (q, k, v, pad, bias, am, width, torch.zeros(width)), w


def _second(inputs):
    """The second call's inputs: the width argument and the width table grow by 3."""
    *head, width, table = inputs
    return (*head, width + 3, torch.zeros(table.shape[0] + 3))


def _run(fn, inputs, w, grad, dtype, seed):
    """``fn``'s output and the gradients of q, k, v of ``sum(out * w)``, with float inputs cast to ``dtype`` (the
    float 0/1 mask ``am`` too: its cast to bool does not care)."""
    q, k, v, *rest = (
        x.detach().to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() else x for x in inputs
    )
    torch.manual_seed(seed)  # dropout draws the same mask in every run
    if not grad:
        with torch.no_grad():
            return fn(q, k, v, *rest), ()
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, *rest)
    (out.double() * w).sum().backward()
    return out.detach(), (q.grad, k.grad, v.grad)


def _max_err(x, truth):
    return (x.double() - truth).abs().max().item()


def _assert_like_eager(name, compiled, eager, truth, dtype):
    floor = (1e-6 if dtype == torch.float32 else 1e-3) * (1.0 + truth.abs().max().item())
    err, base = _max_err(compiled, truth), _max_err(eager, truth)
    assert err <= 4 * base + floor, f"{name}: compiled error {err:.3g} > 4 x eager's {base:.3g} + {floor:.2g}"


def families(case: Case) -> list[str]:
    """The issue-18 families an example belongs to (``other``: none of them)."""
    masks = {a.mask for a in case.atts}
    out = [
        name
        for name, kinds in (
            ("float mask cast to bool", ("float_bool_pad", "float_bool_pad_causal")),
            ("symbolic or computed width", ("computed_width", "arg_width", "table_width")),
            ("float literal", ("float_literal",)),
            ("floor division", ("floordiv",)),
            ("mask attribute or buffer changed between calls", ("attr_mask", "buffer_mask") if case.second else ()),
            ("finite fill, with or without a scale after it", ("finite_fill", "finite_fill_scaled")),
            ("n_q > n_k band", ("band_br", "causal_tl") if case.nq > case.nk else ()),
        )
        if masks & set(kinds)
    ]
    if case.bcast:
        out.append("batch broadcast")
    return out or ["other"]


def _like_eager(model, compiled_fn, inputs, w, case: Case) -> None:
    """1. compiled == eager, outputs and gradients."""
    dt = case.torch_dtype
    truth, truth_grads = _run(model, inputs, w, case.grad, torch.float64, case.seed)
    eager, eager_grads = _run(model, inputs, w, case.grad, dt, case.seed)
    out, grads = _run(compiled_fn, inputs, w, case.grad, dt, case.seed)
    assert out.shape == eager.shape and out.dtype == eager.dtype
    _assert_like_eager("out", out, eager, truth, dt)
    for name, g, e, t in zip(("dq", "dk", "dv"), grads, eager_grads, truth_grads):
        assert g is not None and g.shape == e.shape
        _assert_like_eager(name, g, e, t, dt)


def check_case(case: Case):
    """Run one example and check 1-4 of the module docstring."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = Fuzzed(case).train(case.training)
    inputs, w = _inputs(case)
    dt = case.torch_dtype
    options = {**EXACT, "inner_backend": case.inner}
    model.set_masks(case, 0)

    with (
        torch._inductor.config.patch(fx_graph_cache=False, fallback_random=True),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        before = hyper_op.path_counts(window=True)
        compiled_fn = torch.compile(model, backend="hyper", options=options, dynamic=case.dynamic)
        _like_eager(model, compiled_fn, inputs, w, case)
        calls = {key: hyper_op.path_counts(window=True)[key] - before[key] for key in before}
        counters = dict(torch._dynamo.utils.counters["hyper_backend"])
        if case.second:  # 4. the same compiled function, the widths and the masks changed
            model.set_masks(case, 1)
            _like_eager(model, compiled_fn, _second(inputs), w, case)
            model.set_masks(case, 0)
        torch._dynamo.reset()
        report = hyper_backend.explain(
            model,
            *(x.to(dt) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() else x for x in inputs),
            options=options,
            dynamic=case.dynamic,
        )
    if os.environ.get("HYPER_FUZZ_COUNTS"):
        with open(os.environ["HYPER_FUZZ_COUNTS"], "a", encoding="utf-8") as f:
            f.write(json.dumps(families(case)) + "\n")

    # 2. lowered only where allowed; a reason for every site kept exact; the documented forms lowered
    assert len(report.sites) == len(case.atts), [(s.kind, s.decision, s.reason) for s in report.sites]
    note = event if currently_in_test_context() else (lambda _: None)  # statistics (--hypothesis-show-statistics)
    note(f"inner backend {case.inner}, dynamic={case.dynamic}")
    for family in families(case):
        note(f"family: {family}")
    for att, site in zip(case.atts, report.sites):
        note(f"{'sdpa' if att.form == 'sdpa' else 'hand-written'} site {site.decision}")
        what = f"site {site.index} ({site.kind}): {site.decision} ({site.reason!r}) for {att}"
        assert site.decision in ("hyper", "exact", "window"), what
        if site.decision == "hyper":
            assert may_lower(att, case), "lowered a site the op cannot compute: " + what
        elif site.decision == "window":
            assert may_window(att, case) and site.kind == "window", "windowed a site that is not a band: " + what
        else:
            assert site.reason.strip(), "kept exact without a reason: " + what
            assert not documented_lowered(att, case), "a documented form was not lowered: " + what

    # 3. the training compile made the same decisions, and the op ran once per lowered site
    lowered = sum(s.decision == "hyper" for s in report.sites)
    windowed = sum(s.decision == "window" for s in report.sites)
    assert counters.get("sites", 0) == len(case.atts)
    assert counters.get("rewritten", 0) == lowered and counters.get("window", 0) == windowed, counters
    assert calls["hyper"] + calls["exact"] == lowered
    assert calls["backward"] == (lowered if case.grad else 0)
    assert calls["window"] == windowed


# ----------------------------------------------------------------------------------------------------------
# the tests
# ----------------------------------------------------------------------------------------------------------

HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


@pytest.fixture(autouse=True)
def _quiet_and_fresh():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch._dynamo.reset()


def fuzz(max_examples):
    return settings(
        max_examples=max_examples, deadline=None, derandomize=True, database=None, suppress_health_check=HEALTH
    )


def _att(form, mask, scale="default", gqa="none", softmax="", dropout=None, scale_value=None, width=4):
    return Att(
        form=form,
        scale=scale,
        scale_value=scale_value,
        mask=mask,
        gqa=gqa,
        softmax=softmax,
        dropout=dropout,
        width=width,
    )


def _case(
    atts,
    inner="aot_eager",
    dynamic=None,
    brk=None,
    training=False,
    grad=True,
    dtype="float32",
    B=2,
    Hq=4,
    Hkv=2,
    nq=33,
    nk=33,
    d=40,
    seed=1,
):
    return Case(
        atts=tuple(atts),
        brk=brk,
        training=training,
        grad=grad,
        dtype=dtype,
        B=B,
        Hq=Hq,
        Hkv=Hkv,
        nq=nq,
        nk=nk,
        d=d,
        dynamic=dynamic,
        inner=inner,
        seed=seed,
    )


@fuzz(50)
@given(case=cases(max_n=72))
@example(
    case=_case(
        [
            _att("sdpa", "padding_causal", "kwarg", "enable_gqa", scale_value=0.3, dropout=0.1),
            _att("sdpa", "causal_flag", "pre_q", "repeat_kv", dropout=0.0),
        ],
        brk="between",
        training=True,
        dtype="bfloat16",
        nq=41,
        nk=41,
    )
)
@example(case=_case([_att("sdpa", "data_pad", gqa="repeat_interleave", dropout=0.5)], nq=37, nk=53))
def test_fuzz_lowering(case):
    """CI: aot_eager, static shapes (SDPA sites are lowered; hand-written ones must stay exact with a reason)."""
    check_case(case)


@fuzz(4)
@given(case=cases(max_n=48, inner=st.just("inductor"), forms=HANDWRITTEN))
@example(
    case=_case(
        [
            _att("at", "causal_masked_fill", "mul", "repeat_kv", "fp32", dropout=0.1),
            _att("matmul", "padding", "div", "repeat_interleave", "F"),
        ],
        inner="inductor",
        brk="between",
        dtype="bfloat16",
        nq=37,
        nk=37,
        d=8,
    )
)
def test_fuzz_lowering_inductor(case):
    """CI: a few hand-written modules through inductor, where the pattern pass rewrites them."""
    check_case(case)


@fuzz(4)
@given(case=cases(max_n=48, dynamic=st.just(True)))
def test_fuzz_lowering_dynamic(case):
    """CI: a few with ``dynamic=True`` (symbolic lengths: the mask proofs and the n_q == n_k proofs)."""
    check_case(case)


AUDIT_FAMILIES = {  # issue 18's forms, a few examples each in CI
    "float mask cast to bool": ("float_bool_pad", "float_bool_pad_causal"),
    "symbolic or computed width": ("computed_width", "arg_width", "table_width"),
    "float literal, floor division": ("float_literal", "floordiv"),
    "attribute or buffer mask": ("attr_mask", "buffer_mask"),
    "finite fill": ("finite_fill", "finite_fill_scaled"),
    "band with n_q != n_k": ("band_br", "causal_tl"),
}


@pytest.mark.parametrize("family", list(AUDIT_FAMILIES) + ["batch broadcast"])
def test_fuzz_lowering_audit_forms(family):
    """CI: each family of the audit's forms, through aot_eager and inductor, static and dynamic shapes."""
    strategy = cases(
        max_n=64,
        inner=st.sampled_from(("aot_eager", "aot_eager", "inductor")),
        dynamic=st.sampled_from((None, True)),
        masks=AUDIT_FAMILIES.get(family),
        bcast=st.sampled_from(("kv", "v")) if family == "batch broadcast" else None,
    )

    @fuzz(3)
    @given(case=strategy)
    def run(case):
        check_case(case)

    run()


@pytest.mark.slow
@fuzz(1000)
@given(
    case=cases(
        max_n=256,
        inner=st.sampled_from(("aot_eager",) * 4 + ("inductor",)),
        dynamic=st.sampled_from((None,) * 3 + (True,)),
    )
)
def test_fuzz_lowering_slow(case):
    check_case(case)


# ----------------------------------------------------------------------------------------------------------
# bugs the fuzzer found (regression tests)
# ----------------------------------------------------------------------------------------------------------

BF16_TRAINING = Case(
    atts=(
        Att(form="at", scale="mul", scale_value=None, mask="none", gqa="none", softmax="torch", dropout=None, width=1),
    ),
    brk=None,
    training=True,
    grad=True,
    dtype="bfloat16",
    B=1,
    Hq=2,
    Hkv=2,
    nq=33,
    nk=33,
    d=8,
    dynamic=None,
    inner="inductor",
    seed=0,
)


def test_bf16_softmax_in_training_is_lowered():
    check_case(BF16_TRAINING)


class _BreakThenCausal(torch.nn.Module):
    def __init__(self, built_mask: bool = False):
        super().__init__()
        self.built_mask = built_mask

    def forward(self, q, k, v):
        q = q * 1.0
        torch._dynamo.graph_break()
        if self.built_mask:  # a causal mask built from the lengths: q's and k's have distinct symbols here
            i, j = torch.arange(q.shape[-2]), torch.arange(k.shape[-2])
            return F.scaled_dot_product_attention(q, k, v, attn_mask=j[None, :] <= i[:, None])
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("built_mask", [False, True], ids=["is_causal", "built-mask"])
def test_causal_sdpa_after_graph_break_with_dynamic_shapes(built_mask):
    compiled = torch.compile(
        _BreakThenCausal(built_mask),
        backend="hyper",
        options={
            "min_seq_len": 32,
            "block_size": 16,
            "sample_size": 16,
            "tune_cache": "",
            "inner_backend": "aot_eager",
        },
    )
    approximated = []
    with torch.no_grad():
        for n in (64, 96):  # the second length recompiles with dynamic shapes
            before = hyper_op.path_counts()["hyper"]
            compiled(*(torch.randn(1, 2, n, 16) for _ in range(3)))
            approximated.append(hyper_op.path_counts()["hyper"] - before)
    assert approximated == [1, 1], f"op calls that approximated, per length: {approximated}"
    # the equality is a guard: unequal lengths recompile and keep SDPA's top-left causal, exactly
    q, k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 72, 16), torch.randn(1, 2, 72, 16)
    before = hyper_op.path_counts()["hyper"]
    with torch.no_grad():
        out = compiled(q, k, v)
    assert hyper_op.path_counts()["hyper"] == before
    torch.testing.assert_close(out, _BreakThenCausal(built_mask)(q, k, v))


if __name__ == "__main__":  # count the families of a run made with HYPER_FUZZ_COUNTS=path
    with open(sys.argv[1], encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    counts = Counter(name for row in rows for name in row)
    print(f"{len(rows)} examples")
    for name, n in counts.most_common():
        print(f"{n:6d}  {name}")
