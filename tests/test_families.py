"""Attention families canonicalised into SDPA on the Dynamo graph (`hyper_backend.lowering.canonical`): einsum
attention, ``nn.MultiheadAttention`` (``F.multi_head_attention_forward``, ``torch._native_multi_head_attention``)
and the Transformer layers, including ``nn.TransformerEncoderLayer``'s eval-mode fast path
(``torch._transformer_encoder_layer_fwd``).

The approximation is made exact (``min_seq_len=1`` and blocks/samples beyond every length: the op runs and one
block holds every key), so compiled must equal eager in outputs and gradients; the counters and `explain` show
the rewrite. ``aot_eager`` is the inner backend (the rewrite is at the Dynamo level, so inductor adds only compile
time), except where the inductor pattern pass itself is under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import zoo

import hyper_backend

pytestmark = pytest.mark.usefixtures("lsh_detector")  # written for the LSH estimator: conftest.py

EXACT = dict(min_seq_len=1, block_size=1 << 20, sample_size=1 << 20, tune_cache="", inner_backend="aot_eager")
APPROX = dict(min_seq_len=32, block_size=16, sample_size=16, tune_cache="", inner_backend="aot_eager")


@pytest.fixture(autouse=True)
def fresh():
    with zoo.fresh_compiles():
        yield


def _close(got, want, what=""):
    err = (got.double() - want.double()).abs().max().item()
    tol = (1e-5 if want.dtype == torch.float32 else 2e-2) * (1.0 + want.abs().max().item())
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


def _counters():
    return dict(torch._dynamo.utils.counters["hyper_backend"])


def check(model, inputs, kind, train, lowered=1, options=EXACT, dynamic=None):
    """compiled == eager (outputs; gradients of the float inputs and parameters when ``train``); ``lowered`` sites
    of ``kind`` rewritten; returns `explain`'s report."""
    model.train(train)
    compiled = torch.compile(model, backend="hyper", options=options, dynamic=dynamic)

    def run(fn):
        xs = [
            x.detach().clone().requires_grad_(train) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
            for x in inputs
        ]
        if not train:
            with torch.no_grad():
                return fn(*xs), []
        out = fn(*xs)
        (out.double() * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape)).sum().backward()
        grads = [x.grad for x in xs if isinstance(x, torch.Tensor) and x.grad is not None]
        grads += [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad()
        return out.detach(), grads

    out, grads = run(compiled)
    counters = _counters()
    eager, eager_grads = run(model)
    _close(out, eager, "output")
    for g, e in zip(grads, eager_grads):
        _close(g, e, "gradient")
    assert counters.get(f"rewritten:{kind}", 0) == lowered, counters
    assert counters.get("rewritten", 0) == lowered, counters
    torch._dynamo.reset()
    return hyper_backend.explain(model, *inputs, options=options, dynamic=dynamic)


# ----------------------------------------------------------------------------------------------------------
# einsum
# ----------------------------------------------------------------------------------------------------------


def _causal_drop(n):
    return torch.ones(n, n, dtype=torch.bool).triu(1)


class Einsum(nn.Module):
    """q, k, v given as ``[B, H, N, D]``; ``case`` picks the spelling."""

    def __init__(self, case):
        super().__init__()
        self.case = case

    def forward(self, q, k, v, pad):
        c, d, n = self.case, q.shape[-1], q.shape[-2]
        if c == "bhid":
            p = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k) * d**-0.5, dim=-1)
            return torch.einsum("bhij,bhjd->bhid", p, v)
        if c == "heads_third":  # [B, N, H, D] operands, scores [B, H, Nq, Nk], divide
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
            return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v).transpose(1, 2)
        if c == "ellipsis_prescaled":
            s = torch.einsum("...id,...jd->...ij", q * d**-0.5, k)
            return torch.einsum("...ij,...jd->...id", F.softmax(s, dim=-1), v)
        if c == "3d_causal":  # one batch index: [B*H, N, D]
            B, H = q.shape[:2]
            q3, k3, v3 = (t.reshape(B * H, n, d) for t in (q, k, v))
            s = torch.einsum("bid,bjd->bij", q3, k3) * 0.3
            s = s.masked_fill(_causal_drop(n), float("-inf"))
            return torch.einsum("bij,bjd->bid", torch.softmax(s, -1), v3).view(B, H, n, d)
        if c == "swapped_additive":  # key operand first, an additive triu(-inf) mask, then the scale
            mask = torch.triu(torch.full((n, n), float("-inf")), diagonal=1)
            s = (torch.einsum("bhjd,bhid->bhij", k, q) + mask) * 0.25
            return torch.einsum("bhjd,bhij->bhid", v, torch.softmax(s, dim=3))
        if c == "output_layout":  # scores laid out [B, Nq, H, Nk], output [B, Nq, H, D]
            s = torch.einsum("bhid,bhjd->bihj", q, k) * 0.2
            p = s.softmax(dim=-1)
            return torch.einsum("bihj,bhjd->bihd", p, v).transpose(1, 2)
        if c == "number_first_scale":  # c * scores, then the mask added first: mask + scores
            s = 0.125 * torch.einsum("bhid,bhjd->bhij", q, k)
            s = torch.triu(torch.full((n, n), float("-inf")), diagonal=1) + s
            return torch.einsum("bhij,bhjd->bhid", s.softmax(-1), v)
        if c == "where_causal":
            keep = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
            s = torch.where(keep, torch.einsum("bhid,bhjd->bhij", q, k), torch.finfo(q.dtype).min)
            return torch.einsum("bhij,bhjd->bhid", s.softmax(-1), v)
        if c == "padding":
            s = torch.einsum("bhid,bhjd->bhij", q, k) * d**-0.5
            s = s.masked_fill(~pad[:, None, None, :], float("-inf"))
            return torch.einsum("bhij,bhjd->bhid", s.softmax(-1), v)
        if c == "fp32_softmax":  # HF-style upcast, inert dropout
            s = torch.einsum("bhid,bhjd->bhij", q, k) * d**-0.5
            s = s.masked_fill(_causal_drop(n), float("-inf"))
            p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
            return torch.einsum("bhij,bhjd->bhid", F.dropout(p, 0.0, training=self.training), v)
        if c == "upcast_first":  # s.float() then mask and scale in fp32, cast back
            s = torch.einsum("bhid,bhjd->bhij", q, k).float() * d**-0.5
            return torch.einsum("bhij,bhjd->bhid", torch.softmax(s, -1).to(v.dtype), v)
        # negatives
        if c == "softmax_over_queries":
            p = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k), dim=-2)
            return torch.einsum("bhij,bhjd->bhid", p, v)
        if c == "contract_queries":
            p = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k), dim=-1)
            return torch.einsum("bhij,bhid->bhjd", p, v)
        if c == "sum_over_head_dim_only_in_q":
            p = torch.softmax(torch.einsum("bhid,bhje->bhij", q, k), dim=-1)
            return torch.einsum("bhij,bhjd->bhid", p, v)
        if c == "scores_reused":
            s = torch.einsum("bhid,bhjd->bhij", q, k)
            return torch.einsum("bhij,bhjd->bhid", s.softmax(-1), v) + s.mean(-1, keepdim=True)
        if c == "float_mask_input":
            s = torch.einsum("bhid,bhjd->bhij", q, k) + pad
            return torch.einsum("bhij,bhjd->bhid", s.softmax(-1), v)
        raise KeyError(c)


def _qkv(dtype=torch.float32, n=24, b=2, h=3, d=16):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype) for _ in range(3))
    pad = torch.rand(b, n, generator=g) < 0.7
    pad[:, 0] = True
    return q, k, v, pad


EINSUM_CASES = {  # case -> (reason fragment shown by explain, dtype)
    "bhid": ("non-causal", torch.float32),
    "heads_third": ("non-causal", torch.float32),
    "ellipsis_prescaled": ("non-causal", torch.float32),
    "3d_causal": ("causal", torch.float32),
    "swapped_additive": ("causal", torch.float32),
    "output_layout": ("non-causal", torch.float32),
    "number_first_scale": ("causal", torch.float32),
    "where_causal": ("causal", torch.float32),
    "padding": ("key padding", torch.float32),
    "fp32_softmax": ("causal", torch.bfloat16),
    "upcast_first": ("non-causal", torch.bfloat16),
}


@pytest.mark.parametrize("case", list(EINSUM_CASES))
def test_einsum_lowered(case):
    what, dtype = EINSUM_CASES[case]
    report = check(Einsum(case), _qkv(dtype), "einsum", train=True)
    (site,) = report.sites
    assert (site.kind, site.decision) == ("einsum", "hyper") and what in site.reason, site


def test_einsum_symbolic_scale_and_lengths(call_delta):
    """``dynamic=True``: the scale ``d ** -0.5`` of a symbolic head dim and the causal mask of a symbolic length;
    one compile serves the exact and the approximate lengths."""
    model = Einsum("fp32_softmax").eval()
    compiled = torch.compile(model, backend="hyper", dynamic=True, options=APPROX)
    with torch.no_grad():
        for n in (24, 80):
            q, k, v, pad = _qkv(torch.float32, n=n)
            out = compiled(q, k, v, pad)
            if n < 32:
                _close(out, model(q, k, v, pad), f"n={n}")
    assert call_delta()["hyper"] == 1, "the approximate path did not run at n >= min_seq_len"
    counters = _counters()
    assert counters["graphs"] == 1 and counters["rewritten:einsum"] == 1


@pytest.mark.parametrize(
    "case,reason",
    [
        ("softmax_over_queries", "does not contract the probabilities' key index"),
        ("contract_queries", "does not contract the probabilities' key index"),
        ("sum_over_head_dim_only_in_q", "contracts 0 indices"),
        ("scores_reused", "used elsewhere"),
        ("float_mask_input", "unknown values"),
    ],
)
def test_einsum_stays_exact(case, reason, call_delta):
    model = Einsum(case)
    inputs = list(_qkv())
    if case == "float_mask_input":
        inputs[3] = torch.randn(2, 3, 24, 24)
    check(model, inputs, "einsum", train=True, lowered=0)
    assert call_delta() == {"hyper": 0, "exact": 0, "backward": 0}
    report = hyper_backend.explain(model, *inputs, options=EXACT)
    (site,) = report.sites
    assert (site.kind, site.decision) == ("einsum", "exact") and reason in site.reason, site.reason


def test_einsum_numbering_and_layers():
    """Einsum sites keep the numbers they had as hand-written sites; ``layers`` selects among them."""
    model = zoo.Stack(EinsumLayer, depth=3).eval()
    report = hyper_backend.explain(model, torch.randn(1, 40, 64), options={**EXACT, "layers": "0,2"})
    assert [(s.index, s.kind, s.decision) for s in report.sites] == [
        (0, "einsum", "hyper"),
        (1, "einsum", "exact"),
        (2, "einsum", "hyper"),
    ]
    assert report.sites[1].reason == "not selected by layers"


class EinsumLayer(zoo._Layer):
    def attend(self, q, k, v):
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) * self.head_dim**-0.5
        return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)


# ----------------------------------------------------------------------------------------------------------
# nn.MultiheadAttention
# ----------------------------------------------------------------------------------------------------------

B, L, E = 2, 12, 32


class Mha(nn.Module):
    """``nn.MultiheadAttention`` self-attention (or cross-attention on ``mem`` with kdim/vdim); masks built in
    forward (an input mask is never proven causal)."""

    def __init__(
        self, batch_first=True, kdim=None, attn="none", kpm="none", need_weights=False, use_weights=False, **kw
    ):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, 4, batch_first=batch_first, kdim=kdim, vdim=kdim, **kw)
        self.batch_first, self.attn, self.kpm = batch_first, attn, kpm
        self.need_weights, self.use_weights = need_weights, use_weights

    def forward(self, x, mem, pad):
        n = x.shape[1] if self.batch_first else x.shape[0]
        kw = {}
        if self.attn in ("square", "is_causal"):
            kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(n)
            kw["is_causal"] = self.attn == "is_causal"
        if self.kpm == "bool":
            kw["key_padding_mask"] = pad
        elif self.kpm == "float":  # a float key_padding_mask built from a bool one
            kw["key_padding_mask"] = torch.zeros(pad.shape).masked_fill(pad, float("-inf"))
        elif self.kpm == "float_input":  # values unknown at compile time
            kw["key_padding_mask"] = mem
        kv = x if self.mha.kdim == E or mem is None or self.kpm == "float_input" else mem
        out, weights = self.mha(x, kv, kv, need_weights=self.need_weights, **kw)
        return out + weights.sum() if self.use_weights else out


def _mha_inputs(batch_first=True, kdim=None):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, L, E, generator=g)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, 8:] = True  # True = padded (PyTorch's convention)
    mem = torch.randn(B, 10, kdim, generator=g) if kdim else None
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
        mem = mem.transpose(0, 1).contiguous() if kdim else None
    return x, mem, pad


MHA_CASES = {  # name -> (Mha kwargs, reason fragment)
    "plain": ({}, "non-causal"),
    "seq_first": ({"batch_first": False}, "non-causal"),
    "kpm_bool": ({"kpm": "bool"}, "key padding"),
    "kpm_float": ({"kpm": "float"}, "key padding"),
    "square_subsequent": ({"attn": "square"}, "causal"),
    "square_subsequent_kpm": ({"attn": "square", "kpm": "float"}, "causal, key padding"),
    "is_causal": ({"attn": "is_causal"}, "causal"),
    "is_causal_seq_first": ({"attn": "is_causal", "batch_first": False}, "causal"),
    "kdim_vdim": ({"kdim": 24}, "non-causal"),
    "no_bias": ({"bias": False, "kpm": "bool"}, "key padding"),
    "need_weights_unused": ({"need_weights": True, "attn": "square"}, "causal"),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval_no_grad"])
@pytest.mark.parametrize("case", list(MHA_CASES))
def test_mha_lowered(case, train):
    kw, what = MHA_CASES[case]
    model = Mha(**kw)
    x, mem, pad = _mha_inputs(kw.get("batch_first", True), kw.get("kdim"))
    report = check(model, (x, mem, pad), "mha", train=train)
    (site,) = report.sites
    assert (site.kind, site.decision) == ("mha", "hyper") and what in site.reason, site


def test_mha_approximates(call_delta):
    """At n >= min_seq_len the op's approximate path runs, forward and backward."""
    model = Mha(attn="is_causal").train()
    compiled = torch.compile(model, backend="hyper", options=APPROX)
    x = torch.randn(B, 96, E, requires_grad=True)
    compiled(x, None, None).square().mean().backward()
    assert call_delta() == {"hyper": 1, "exact": 0, "backward": 1}
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "case,reason",
    [
        ("need_weights", "attention weights are returned"),
        ("float_kpm_input", "unknown values"),
        ("add_bias_kv", "add_bias_kv"),
        ("add_zero_attn", "add_zero_attn"),
        ("dropout", "dropout_p=0.1"),
    ],
)
def test_mha_stays_exact(case, reason, call_delta):
    kw = {
        "need_weights": {"need_weights": True, "use_weights": True, "kpm": "bool"},
        "float_kpm_input": {"kpm": "float_input"},
        "add_bias_kv": {"add_bias_kv": True},
        "add_zero_attn": {"add_zero_attn": True},
        "dropout": {"dropout": 0.1},
    }[case]
    model = Mha(**kw)
    x, _, pad = _mha_inputs()
    mem = torch.randn(B, L) if case == "float_kpm_input" else None
    if case != "dropout":  # dropout: eager and compiled draw different masks
        check(model, (x, mem, pad), "mha", train=True, lowered=0)
    else:
        model.train()
        torch.compile(model, backend="hyper", options=EXACT)(x, mem, pad)
        assert _counters().get("rewritten", 0) == 0
    assert call_delta() == {"hyper": 0, "exact": 0, "backward": 0}
    model.train()
    report = hyper_backend.explain(model, x, mem, pad, options=EXACT)
    (site,) = report.sites
    assert (site.kind, site.decision) == ("mha", "exact") and reason in site.reason, site.reason


def test_mha_need_weights_not_lowered_by_the_pattern_pass(call_delta):
    """Through inductor, the decomposed need_weights path (bmm / softmax / bmm) is not matched either."""
    model = Mha(need_weights=True, use_weights=True).eval()
    x, _, pad = _mha_inputs()
    compiled = torch.compile(model, backend="hyper", options={**EXACT, "inner_backend": "inductor"})
    with torch.no_grad():
        _close(compiled(x, None, pad), model(x, None, pad))
    assert call_delta() == {"hyper": 0, "exact": 0, "backward": 0}
    assert _counters().get("rewritten", 0) == 0 and _counters()["exact"] == 1


def test_native_multi_head_attention_called_directly():
    class Native(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(E, 4, batch_first=True)

        def forward(self, x, mem, pad):
            m = self.mha
            return torch._native_multi_head_attention(
                x, x, x, E, 4, m.in_proj_weight, m.in_proj_bias, m.out_proj.weight, m.out_proj.bias, pad, False, True, 1
            )[0]

    x, _, pad = _mha_inputs()
    report = check(Native(), (x, None, pad), "mha", train=False)
    assert report.sites[0].decision == "hyper" and "key padding" in report.sites[0].reason


# ----------------------------------------------------------------------------------------------------------
# the Transformer layers
# ----------------------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    def __init__(self, masks=(), **kw):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(E, 4, 64, dropout=0.0, batch_first=True, **kw)
        self.masks = masks

    def forward(self, x, pad):
        kw = {}
        if "kpm" in self.masks:
            kw["src_key_padding_mask"] = pad
        if "float_kpm" in self.masks:  # the same type as the float causal mask (mixed types warn: a graph break)
            kw["src_key_padding_mask"] = torch.zeros(pad.shape).masked_fill(pad, float("-inf"))
        if "causal" in self.masks:
            kw["src_mask"] = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
            kw["is_causal"] = True
        return self.layer(x, **kw)


ENCODER_CASES = {
    "plain": ({}, "non-causal"),
    "kpm": ({"masks": ("kpm",)}, "key padding"),
    "float_kpm": ({"masks": ("float_kpm",)}, "key padding"),
    "causal": ({"masks": ("causal",)}, "causal"),
    "causal_float_kpm": ({"masks": ("causal", "float_kpm")}, "causal, key padding"),
    "norm_first_gelu": ({"masks": ("kpm",), "norm_first": True, "activation": "gelu"}, "key padding"),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval_no_grad"])
@pytest.mark.parametrize("case", list(ENCODER_CASES))
def test_encoder_layer_lowered(case, train):
    """Eval without grad: the fast path ``torch._transformer_encoder_layer_fwd`` (kind ``encoder_layer``),
    decomposed with its layer norms, residuals and feed-forward; train: ``F.multi_head_attention_forward``."""
    kw, what = ENCODER_CASES[case]
    x, _, pad = _mha_inputs()
    kind = "mha" if train else "encoder_layer"
    report = check(Encoder(**kw), (x, pad), kind, train=train)
    (site,) = report.sites
    assert (site.kind, site.decision) == (kind, "hyper") and what in site.reason, site


def test_encoder_fast_path_mask_convention():
    """The fast path converts a float mask to bool (nonzero = masked): a float key padding mask of -1 masks the
    key there (it is not added), and the decomposition does the same."""
    x, _, pad = _mha_inputs()

    class Minus1(Encoder):
        def forward(self, x, pad):
            return self.layer(x, src_key_padding_mask=-pad.float())

    model = Minus1()
    report = check(model, (x, pad), "encoder_layer", train=False)
    assert report.sites[0].decision == "hyper"
    with torch.no_grad():
        model.eval()
        fast = model(x, pad)
        model.train()
        additive = model(x, pad)
    assert (fast - additive).abs().max() > 1e-3, "the test does not tell the conventions apart"


class Decoder(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(E, 4, 64, dropout=0.0, batch_first=True, **kw)

    def forward(self, x, mem, pad):
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.layer(x, mem, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=pad)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval_no_grad"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_lowered(train, norm_first):
    """Self-attention (causal) and cross-attention (memory padding): two ``mha`` sites in both modes (the
    decoder layer has no fast path)."""
    g = torch.Generator().manual_seed(2)
    x, mem = torch.randn(B, L, E, generator=g), torch.randn(B, 16, E, generator=g)
    pad = torch.zeros(B, 16, dtype=torch.bool)
    pad[0, 11:] = True
    report = check(Decoder(norm_first=norm_first), (x, mem, pad), "mha", train=train, lowered=2)
    assert [(s.kind, s.decision, s.reason) for s in report.sites] == [
        ("mha", "hyper", "causal"),
        ("mha", "hyper", "non-causal, key padding"),
    ]


# ----------------------------------------------------------------------------------------------------------
# plan_sdpa: float masks that are sums (what nn.MultiheadAttention builds, written by hand)
# ----------------------------------------------------------------------------------------------------------


class FloatSum(nn.Module):
    def __init__(self, case):
        super().__init__()
        self.case = case

    def forward(self, q, k, v, pad):
        n = q.shape[-2]
        causal = torch.triu(torch.full((n, n), float("-inf")), 1)
        padding = torch.zeros(pad.shape).masked_fill(~pad, float("-inf"))[:, None, None, :]
        if self.case == "causal+padding":
            mask = causal + padding
        elif self.case == "padding+zeros+causal":  # several input-free addends: their AND
            mask = padding + torch.zeros(n, n) + causal
        elif self.case == "finfo_min_padding":
            mask = torch.zeros(pad.shape).masked_fill(~pad, torch.finfo(q.dtype).min)[:, None, None, :]
        elif self.case == "padding_not_from_bool":  # the same values, but not provably 0 / -inf
            mask = (pad.float() - 1.0)[:, None, None, :] * 1e9
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize(
    "case,what",
    [
        ("causal+padding", "causal, key padding"),
        ("padding+zeros+causal", "causal, key padding"),
        ("finfo_min_padding", "non-causal, key padding"),
        ("padding_not_from_bool", None),
    ],
)
def test_sdpa_float_mask_sums(case, what):
    report = check(FloatSum(case), _qkv(), "sdpa", train=True, lowered=0 if what is None else 1)
    (site,) = report.sites
    if what is None:
        assert site.decision == "exact" and "unknown values" in site.reason, site.reason
    else:
        assert (site.kind, site.decision, site.reason) == ("sdpa", "hyper", what)


@pytest.mark.parametrize("family", ["mha", "encoder_layer", "decoder"])
def test_dynamic_shapes_one_compile(family, call_delta):
    """``dynamic=True`` (every dim symbolic, the embedding dim too): one compile serves an exact and two
    approximate lengths, and the exact length equals eager."""
    model, kind, sites = {
        "mha": (Mha(attn="is_causal", kpm="none"), "mha", 1),
        "encoder_layer": (Encoder(masks=("causal", "float_kpm")), "encoder_layer", 1),
        "decoder": (Decoder(), "mha", 2),
    }[family]
    model.eval()
    g = torch.Generator().manual_seed(3)

    def inputs(n):
        x, mem, pad = torch.randn(B, n, E, generator=g), torch.randn(B, n + 3, E, generator=g), None
        if family == "encoder_layer":
            pad = torch.zeros(B, n, dtype=torch.bool)
            pad[1, n - 5 :] = True
            return x, pad
        if family == "decoder":
            pad = torch.zeros(B, n + 3, dtype=torch.bool)
            pad[0, -4:] = True
            return x, mem, pad
        return x, None, None

    compiled = torch.compile(model, backend="hyper", dynamic=True, options=APPROX)
    with torch.no_grad():
        for n in (24, 80, 100):
            xs = inputs(n)
            out = compiled(*xs)
            if n < 32:
                _close(out, model(*xs), f"n={n}")
    counters = _counters()
    assert counters["graphs"] == 1 and counters[f"rewritten:{kind}"] == sites, counters
    assert call_delta() == {"hyper": 2 * sites, "exact": sites, "backward": 0}
