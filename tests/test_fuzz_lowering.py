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
  q and k (general, and key-padding shaped);
- GQA (``enable_gqa=True``, HF's ``repeat_kv`` expand/reshape, ``repeat_interleave``); dropout (none, p=0,
  p>0) in train and eval mode; cross-attention (n_q != n_k);

and for the whole module: fp32 or bf16, odd lengths and head dims 8/40/80, a ``torch._dynamo.graph_break()``
before, between or after the sites, static or dynamic shapes, gradients or inference, and the inner backend
(``aot_eager`` mostly: fast; ``inductor`` for some, which is where hand-written attention is rewritten).

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
   windowed site.

50 derandomized examples run in CI; ``-m slow`` runs 500 more with longer sequences.
"""

from __future__ import annotations

import math
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
SELF_MASKS = ("none",) + CAUSAL_BUILT + ("padding", "padding_causal", "float_add", "band", "window", "data", "data_pad")
CROSS_MASKS = ("none", "padding", "float_add", "data", "data_pad")  # masks that make sense with n_q != n_k
NEVER_LOWERED = ("float_add", "data")  # the op cannot compute these: lowering is a bug
BANDED = ("band", "window")  # served exactly by hyper::window_attention, never approximated
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


def _repeat(x, groups, how):
    if groups == 1:
        return x
    B, H, N, D = x.shape
    if how == "repeat_kv":  # HF's repeat_kv
        return x[:, :, None, :, :].expand(B, H, groups, N, D).reshape(B, H * groups, N, D)
    return x.repeat_interleave(groups, dim=1)


def _sdpa(att: Att, q, k, v, pad, bias, training):
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


def _handwritten(att: Att, q, k, v, pad, bias, training):
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
    four_d = m in ("padding", "padding_causal", "float_add", "data", "data_pad")
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
    def __init__(self, case: Case):
        super().__init__()
        self.atts, self.brk = case.atts, case.brk

    def site(self, i, q, k, v, pad, bias):
        att = self.atts[i]
        return (_sdpa if att.form == "sdpa" else _handwritten)(att, q, k, v, pad, bias, self.training)

    def forward(self, q, k, v, pad, bias):
        # straight-line code: a graph break inside a loop would make Dynamo run the rest of the frame eagerly
        if self.brk == "before":
            q = q * 1.0
            torch._dynamo.graph_break()
        out = self.site(0, q, k, v, pad, bias)
        if len(self.atts) == 2:
            if self.brk == "between":
                torch._dynamo.graph_break()
            out = self.site(1, 0.5 * q + out, k, v, pad, bias)
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
    if form == "sdpa":
        scale = draw(st.sampled_from(("default", "kwarg", "pre_q")))
        masks = ("causal_flag",) + (CROSS_MASKS if cross else SELF_MASKS)
        gqas = ("enable_gqa", "repeat_kv", "repeat_interleave") if gqa else ("none",)
    else:
        scale = draw(st.sampled_from(("mul", "div", "pre_q", "none")))
        masks = CROSS_MASKS if cross else SELF_MASKS
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
def cases(draw, max_n: int, inner=st.just("aot_eager"), dynamic=st.just(None), forms=ANY_FORM):
    """Strategies for the inner backend and ``dynamic`` are parameters: inductor and dynamic shapes cost seconds
    per compile on CPU (aot_eager with static shapes: well under one), so CI draws them in tests of their own
    with few examples instead of leaving their share to hypothesis (whose derandomized examples come in clumps)."""
    nq = draw(st.integers(17, max_n))
    cross = draw(st.integers(0, 4)) == 0
    nk = nq
    if cross:
        nk = draw(st.integers(17, max_n))
        nk = nk + 1 if nk == nq else nk
    Hkv = draw(st.integers(1, 2))
    groups = draw(st.sampled_from((1, 1, 2)))
    sites = draw(st.integers(1, 2))
    atts = tuple(draw(attentions(cross, groups > 1, forms)) for _ in range(sites))
    brks = (None, None, "before", "after") + (("between",) if sites == 2 else ())
    return Case(
        atts=atts,
        brk=draw(st.sampled_from(brks)),
        training=draw(st.booleans()),
        grad=draw(st.sampled_from((True, True, False))),
        dtype=draw(st.sampled_from(("float32", "bfloat16"))),
        B=draw(st.integers(1, 2)),
        Hq=Hkv * groups,
        Hkv=Hkv,
        nq=nq,
        nk=nk,
        d=draw(st.sampled_from((8, 40, 80))),
        dynamic=draw(dynamic),
        inner=draw(inner),
        seed=draw(st.integers(0, 2**16)),
    )


# ----------------------------------------------------------------------------------------------------------
# what the backend may, must and must not do with a site
# ----------------------------------------------------------------------------------------------------------


def may_lower(att: Att, case: Case) -> bool:
    """The op can compute the site exactly (up to the approximation): no dropout in training, and a mask that is
    none, causal, key padding (any values) or causal AND key padding."""
    if case.training and att.dropout:
        return False
    return att.mask not in NEVER_LOWERED + BANDED


def may_window(att: Att, case: Case) -> bool:
    """The window op computes the site exactly: a band or sliding window built in the graph, no dropout in
    training."""
    return att.mask in BANDED and not (case.training and att.dropout)


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
    return att.mask not in ("padding", "padding_causal", "data_pad")  # padding in hand-written stays exact


# ----------------------------------------------------------------------------------------------------------
# the check
# ----------------------------------------------------------------------------------------------------------


def _inputs(case: Case):
    g = torch.Generator().manual_seed(case.seed)
    dt = case.torch_dtype
    q = torch.randn(case.B, case.Hq, case.nq, case.d, generator=g).to(dt)
    k = torch.randn(case.B, case.Hkv, case.nk, case.d, generator=g).to(dt)
    v = torch.randn(case.B, case.Hkv, case.nk, case.d, generator=g).to(dt)
    pad = torch.rand(case.B, case.nk, generator=g) < 0.7
    pad[:, 0] = True  # every row keeps a key: causal row 0 sees key 0
    bias = None
    if any(a.mask == "float_add" for a in case.atts):
        bias = (2 * torch.randn(case.B, 1, case.nq, case.nk, generator=g)).to(dt)
    if not any(a.mask in ("padding", "padding_causal") for a in case.atts):
        pad = None
    w = torch.randn(case.B, case.Hq, case.nq, case.d, generator=g, dtype=torch.float64)
    return (q, k, v, pad, bias), w


def _run(fn, inputs, w, grad, dtype, seed):
    """``fn``'s output and the gradients of q, k, v of ``sum(out * w)``, with inputs cast to ``dtype``."""
    q, k, v, pad, bias = (x if x is None or not x.is_floating_point() else x.detach().to(dtype) for x in inputs)
    torch.manual_seed(seed)  # dropout draws the same mask in every run
    if not grad:
        with torch.no_grad():
            return fn(q, k, v, pad, bias), ()
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, pad, bias)
    (out.double() * w).sum().backward()
    return out.detach(), (q.grad, k.grad, v.grad)


def _max_err(x, truth):
    return (x.double() - truth).abs().max().item()


def _assert_like_eager(name, compiled, eager, truth, dtype):
    floor = (1e-6 if dtype == torch.float32 else 1e-3) * (1.0 + truth.abs().max().item())
    err, base = _max_err(compiled, truth), _max_err(eager, truth)
    assert err <= 4 * base + floor, f"{name}: compiled error {err:.3g} > 4 x eager's {base:.3g} + {floor:.2g}"


def check_case(case: Case):
    """Run one example and check 1-3 of the module docstring."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = Fuzzed(case).train(case.training)
    inputs, w = _inputs(case)
    dt = case.torch_dtype
    options = {**EXACT, "inner_backend": case.inner}
    truth, truth_grads = _run(model, inputs, w, case.grad, torch.float64, case.seed)
    eager, eager_grads = _run(model, inputs, w, case.grad, dt, case.seed)

    with (
        torch._inductor.config.patch(fx_graph_cache=False, fallback_random=True),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        before = hyper_op.path_counts(window=True)
        compiled_fn = torch.compile(model, backend="hyper", options=options, dynamic=case.dynamic)
        out, grads = _run(compiled_fn, inputs, w, case.grad, dt, case.seed)
        calls = {key: hyper_op.path_counts(window=True)[key] - before[key] for key in before}
        counters = dict(torch._dynamo.utils.counters["hyper_backend"])
        torch._dynamo.reset()
        report = hyper_backend.explain(
            model,
            *(x if x is None or not x.is_floating_point() else x.to(dt) for x in inputs),
            options=options,
            dynamic=case.dynamic,
        )

    # 1. compiled == eager, outputs and gradients
    assert out.shape == eager.shape and out.dtype == eager.dtype
    _assert_like_eager("out", out, eager, truth, dt)
    for name, g, e, t in zip(("dq", "dk", "dv"), grads, eager_grads, truth_grads):
        assert g is not None and g.shape == e.shape
        _assert_like_eager(name, g, e, t, dt)

    # 2. lowered only where allowed; a reason for every site kept exact; the documented forms lowered
    assert len(report.sites) == len(case.atts), [(s.kind, s.decision, s.reason) for s in report.sites]
    note = event if currently_in_test_context() else (lambda _: None)  # statistics (--hypothesis-show-statistics)
    note(f"inner backend {case.inner}, dynamic={case.dynamic}")
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


@pytest.mark.slow
@fuzz(500)
@given(
    case=cases(
        max_n=300,
        inner=st.sampled_from(("aot_eager", "aot_eager", "inductor")),
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
