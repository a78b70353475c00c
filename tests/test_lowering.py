"""The lowering: hand-written attention (inductor pattern pass), SDPA calls (Dynamo level), mask proofs.

Every positive case asserts the rewrite counter and that the op's approximate path really runs at
n >= min_seq_len; every case compares the compiled model with eager exactly below min_seq_len (tolerance tied
to eager's own error against a float64 run). The cases that must stay exact assert that the op never runs and
the output matches eager.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import zoo
from torch.fx.experimental.proxy_tensor import make_fx

import hyper_backend
from hyper_backend.lowering import masks
from hyper_backend.lowering.patterns import Form

pytestmark = pytest.mark.usefixtures("lsh_detector")  # written for the LSH estimator: conftest.py

OPTS = dict(min_seq_len=32, block_size=16, sample_size=16, tune_cache="")
KINDS = {  # the kind each hand-written layer must be reported as
    zoo.MatmulMulScale: "softmax(q@kT*s)@v",
    zoo.MatmulDivScale: "softmax(q@kT/s)@v",
    zoo.ScaleQueryFirst: "softmax((q*s)@kT)@v",
    zoo.Baddbmm: "softmax(baddbmm(q, kT, alpha=s))@v",
    zoo.Fp32Softmax: "softmax(q@kT*s)@v (fp32 softmax)",
    zoo.AdditiveCausal: "softmax(q@kT/s + mask)@v",
    zoo.MaskedFillCausal: "softmax(masked_fill(q@kT*s, mask, fill))@v",
    zoo.BufferCausal: "softmax(where(mask, q@kT/s, fill))@v",
    zoo.DropoutAttention: "softmax(q@kT*s)@v",
}


@pytest.fixture(autouse=True)
def fresh():
    with zoo.fresh_compiles():
        yield


def assert_exact(out, eager, oracle, what=""):
    """``out`` is as close to the float64 oracle as eager at this precision is (4x eager's error, plus fp noise)."""
    err = (out.double() - oracle).abs().max().item()
    base = (eager.double() - oracle).abs().max().item()
    assert err <= 4 * base + 1e-6, f"{what}: compiled error {err:.3g} vs eager's {base:.3g}"


def oracle_of(model, *inputs):
    import copy

    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        return m64(*(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs))


# ----------------------------------------------------------------------------------------------------------
# hand-written attention, inference: one compile (dynamic shapes) serves the exact and the approximate lengths
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", list(zoo.HANDWRITTEN), ids=lambda c: c.__name__)
def test_handwritten_lowered(cls, call_delta):
    causal, dtype = zoo.HANDWRITTEN[cls]
    torch.manual_seed(0)
    model = zoo.Stack(cls).to(dtype).eval()
    compiled = torch.compile(model, backend="hyper", dynamic=True, options=OPTS)
    with torch.no_grad():
        for n in (24, 31):  # below min_seq_len: the op runs its exact path
            x = torch.randn(2, n, 64, dtype=dtype)
            assert_exact(compiled(x), model(x), oracle_of(model, x), f"{cls.__name__} n={n}")
        assert call_delta() == {"hyper": 0, "exact": 4, "backward": 0}
        x = torch.randn(2, 80, 64, dtype=dtype)
        out = compiled(x)
    assert call_delta()["hyper"] == 2, "the approximate path did not run at n >= min_seq_len"
    assert torch.isfinite(out).all()
    counters = torch._dynamo.utils.counters["hyper_backend"]
    assert counters["graphs"] == 1, "one compile must serve every length"
    assert counters["rewritten"] == 2 and counters[f"rewritten:{KINDS[cls]}"] == 2


@pytest.mark.parametrize(
    "cls", [zoo.MatmulDivScale, zoo.Fp32Softmax, zoo.MaskedFillCausal, zoo.Baddbmm], ids=lambda c: c.__name__
)
def test_handwritten_training_exact(cls, call_delta):
    """Training graphs are matched with joint forward+backward patterns; gradients equal eager's."""
    causal, dtype = zoo.HANDWRITTEN[cls]
    torch.manual_seed(0)
    model = zoo.Stack(cls).to(dtype).train()
    x = torch.randn(2, 24, 64, dtype=dtype, requires_grad=True)
    compiled = torch.compile(model, backend="hyper", options=OPTS)
    compiled(x).float().square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    model.zero_grad()
    x.grad = None
    model(x).float().square().mean().backward()
    eager = [p.grad for p in model.parameters()] + [x.grad]
    for g, e in zip(grads, eager):
        tol = 1e-5 if dtype == torch.float32 else 3e-2 * e.abs().max().item()
        assert (g.float() - e.float()).abs().max().item() <= tol
    assert call_delta() == {"hyper": 0, "exact": 2, "backward": 2}
    assert torch._dynamo.utils.counters["hyper_backend"]["rewritten"] == 2


def test_handwritten_training_approximate(call_delta):
    torch.manual_seed(0)
    model = zoo.Stack(zoo.AdditiveCausal).train()
    x = torch.randn(2, 80, 64, requires_grad=True)
    compiled = torch.compile(model, backend="hyper", options=OPTS)
    compiled(x).square().mean().backward()
    assert call_delta() == {"hyper": 2, "exact": 0, "backward": 2}
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_symbolic_head_dim_scale(call_delta):
    """``/ math.sqrt(q.size(-1))`` with a dynamic head dim: a size-dependent scale proven to be 1/sqrt(D)."""

    def attend(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)), dim=-1) @ v

    compiled = torch.compile(attend, backend="hyper", dynamic=True, options=OPTS)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, d in ((24, 16), (20, 8)):
            q, k, v = (torch.randn(2, 3, n, d, generator=g) for _ in range(3))
            oracle = attend(q.double(), k.double(), v.double())
            assert_exact(compiled(q, k, v), attend(q, k, v), oracle, f"d={d}")
    assert call_delta()["exact"] == 2
    assert torch._dynamo.utils.counters["hyper_backend"]["rewritten"] == 1


def test_dropout_in_training_stays_exact(call_delta):
    torch.manual_seed(0)
    model = zoo.Stack(zoo.DropoutAttention, p=0.5).train()
    x = torch.randn(2, 40, 64, requires_grad=True)
    report = hyper_backend.explain(model, x, options=OPTS)
    # explain runs without grad; the site is lowered in eval-like graphs only when dropout is inert
    assert all(s.decision == "exact" for s in report.sites)
    assert "dropout" in report.sites[0].reason


# ----------------------------------------------------------------------------------------------------------
# cases that must stay exact
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls,reason",
    [
        (zoo.ScoresReused, "used elsewhere"),
        (zoo.SoftmaxOverQueries, "not the key dim"),
    ],
    ids=lambda c: getattr(c, "__name__", ""),
)
def test_must_stay_exact(cls, reason, call_delta):
    torch.manual_seed(0)
    model = zoo.Stack(cls).eval()
    compiled = torch.compile(model, backend="hyper", dynamic=True, options=OPTS)
    with torch.no_grad():
        for n in (40, 80):  # 80 > the sliding window: a window mistaken for causal would show here
            x = torch.randn(2, n, 64)
            assert_exact(compiled(x), model(x), oracle_of(model, x), cls.__name__)
    assert call_delta() == {"hyper": 0, "exact": 0, "backward": 0}
    report = hyper_backend.explain(model, torch.randn(2, 40, 64), options=OPTS, dynamic=True)
    assert [s.decision for s in report.sites] == ["exact", "exact"]
    assert reason in report.sites[0].reason


def test_general_mask_input_stays_exact(call_delta):
    torch.manual_seed(0)
    model = zoo.Stack(zoo.GeneralMask).eval()
    x = torch.randn(2, 40, 64)
    mask = torch.triu(torch.full((40, 40), float("-inf")), 1)  # causal by value, but an input: never trusted
    compiled = torch.compile(model, backend="hyper", options=OPTS)
    with torch.no_grad():
        assert_exact(compiled(x, mask), model(x, mask), oracle_of(model, x, mask))
    assert call_delta()["hyper"] + call_delta()["exact"] == 0
    report = hyper_backend.explain(model, x, mask, options=OPTS)
    assert report.sites[0].reason == "mask depends on a tensor input"


def test_layers_selects_handwritten_sites(call_delta):
    model = zoo.Stack(zoo.MatmulMulScale, depth=3).eval()
    report = hyper_backend.explain(model, torch.randn(1, 40, 64), options={**OPTS, "layers": "0,2"})
    assert [s.decision for s in report.sites] == ["hyper", "exact", "hyper"]
    assert report.sites[1].reason == "not selected by layers"


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_handwritten_needs_inductor(inner):
    report = hyper_backend.explain(
        zoo.Stack(zoo.MatmulMulScale).eval(), torch.randn(1, 40, 64), options={**OPTS, "inner_backend": inner}
    )
    assert all(s.decision == "exact" and "inductor pass only" in s.reason for s in report.sites)


# ----------------------------------------------------------------------------------------------------------
# SDPA at the Dynamo level (eager inner backend: fast, and the op's eager autograd)
# ----------------------------------------------------------------------------------------------------------


class Sdpa(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.kw)


def _qkv(nq=40, nk=40, hq=4, hkv=4, d=16, dv=None, b=2):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(b, hq, nq, d, generator=g),
        torch.randn(b, hkv, nk, d, generator=g),
        torch.randn(b, hkv, nk, dv or d, generator=g),
    )


def _sdpa_report(module, *inputs):
    return hyper_backend.explain(module, *inputs, options={**OPTS, "inner_backend": "eager"})


@pytest.mark.parametrize("case", ["plain", "causal", "gqa", "scale", "cross", "dv", "padding", "padding+causal"])
def test_sdpa_lowered_and_exact(case, call_delta):
    kw, mask = {}, None
    q, k, v = _qkv()
    if case == "causal":
        kw = {"is_causal": True}
    elif case == "gqa":
        q, k, v = _qkv(hq=4, hkv=2)
        kw = {"enable_gqa": True, "is_causal": True}
    elif case == "scale":
        kw = {"scale": 0.3}
    elif case == "cross":
        q, k, v = _qkv(nq=24, nk=40)
    elif case == "dv":
        q, k, v = _qkv(dv=24)
    elif case.startswith("padding"):
        mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
        mask[1, ..., 30:] = False
        kw = {"is_causal": False}
    module = Sdpa(**kw)
    if case == "padding+causal":  # HF's causal & padding mask, built in the graph from the padding input

        class PadCausal(torch.nn.Module):
            def forward(self, q, k, v, pad):
                n = q.shape[-2]
                i = torch.arange(n)
                m = (i[None, :] <= i[:, None])[None, None] & pad[:, None, None, :]
                return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

        module, mask = PadCausal(), mask[:, 0, 0, :]
    inputs = (q, k, v) if mask is None else (q, k, v, mask)
    compiled = torch.compile(
        module, backend="hyper", fullgraph=True, options={**OPTS, "min_seq_len": 64, "inner_backend": "eager"}
    )
    with torch.no_grad():
        out = compiled(*inputs)
        eager = module(*inputs)
        oracle = module(*(t.double() if t.is_floating_point() else t for t in inputs))
    assert_exact(out, eager, oracle, case)
    assert call_delta() == {"hyper": 0, "exact": 1, "backward": 0}
    assert _sdpa_report(module, *inputs).sites[0].decision == "hyper"


@pytest.mark.parametrize(
    "case,reason",
    [
        ("dropout", "dropout_p=0.1"),
        ("general", "general attn_mask"),
        ("float", "float attn_mask"),
        ("causal_cross", "n_q != n_k"),
    ],
)
def test_sdpa_stays_exact(case, reason, call_delta):
    q, k, v = _qkv()
    args = (q, k, v)
    module = Sdpa()
    if case == "dropout":
        module = Sdpa(dropout_p=0.1)
    elif case == "general":
        args = (q, k, v, torch.rand(2, 4, 40, 40) > 0.3)
    elif case == "float":
        args = (q, k, v, torch.randn(2, 1, 40, 40))
    elif case == "causal_cross":
        args = _qkv(nq=24, nk=40)
        module = Sdpa(is_causal=True)
    report = _sdpa_report(module, *args)
    assert report.sites[0].decision == "exact" and reason in report.sites[0].reason
    assert call_delta()["hyper"] + call_delta()["exact"] == 0


def test_sdpa_approximate_and_backward(call_delta):
    q, k, v = (t.requires_grad_() for t in _qkv(nq=80, nk=80))
    compiled = torch.compile(Sdpa(is_causal=True), backend="hyper", options={**OPTS, "inner_backend": "aot_eager"})
    compiled(q, k, v).square().mean().backward()
    assert call_delta() == {"hyper": 1, "exact": 0, "backward": 1}
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# ----------------------------------------------------------------------------------------------------------
# mask proofs on small traced graphs
# ----------------------------------------------------------------------------------------------------------


def _mask_node(fn, n=12):
    gm = make_fx(fn, tracing_mode="symbolic")(torch.empty(n, 3))
    out = next(node for node in gm.graph.nodes if node.op == "output").args[0][0]
    rows = next(node for node in gm.graph.nodes if node.op == "placeholder")
    nsym = rows.meta["val"].shape[0]
    return out, nsym


@pytest.mark.parametrize(
    "fn,use,kind",
    [
        (lambda x: (torch.triu(torch.full((x.shape[0],) * 2, float("-inf")), 1),), "add", "causal"),
        (lambda x: (torch.ones(x.shape[0], x.shape[0]).tril().bool(),), "keep", "causal"),
        (lambda x: (torch.ones(x.shape[0], x.shape[0]).triu(1).bool(),), "drop", "causal"),
        (lambda x: (torch.zeros(1, 1, x.shape[0], x.shape[0]),), "add", "none"),
        (lambda x: (torch.triu(torch.full((x.shape[0],) * 2, float("-inf")), 0),), "add", None),  # hides the diagonal
        (lambda x: (torch.triu(torch.full((x.shape[0],) * 2, -1.0), 1),), "add", None),  # a bias, not a mask
        (lambda x: (torch.ones(x.shape[0], x.shape[0]).tril(-1).bool(),), "keep", None),
    ],
)
def test_mask_classify(fn, use, kind):
    node, n = _mask_node(fn)
    verdict = masks.classify(node, use, n, n, {}, fill=float("-inf"))
    assert verdict.kind == kind, verdict.reason


def _arange_band(x, lo, hi):
    i = torch.arange(x.shape[0])
    d = i[None, :] - i[:, None]
    return ((d >= -lo) & (d <= hi),)


_ALL = masks.UNBOUNDED


@pytest.mark.parametrize(
    "fn,use,window",
    [
        (
            lambda x: (
                torch.ones(x.shape[0], x.shape[0]).tril().bool() & ~torch.ones(x.shape[0], x.shape[0]).tril(-40).bool(),
            ),
            "keep",
            (39, 0),
        ),  # sliding window of 40
        (lambda x: _arange_band(x, 511, 0), "keep", (511, 0)),  # Gemma's 512: tested beyond the literal
        (lambda x: _arange_band(x, 7, 7), "keep", (7, 7)),  # symmetric band
        (lambda x: _arange_band(x, 0, 0), "keep", (0, 0)),  # the diagonal only
        (lambda x: _arange_band(x, 3, 100), "keep", (3, 100)),
        (lambda x: (~_arange_band(x, 5, 2)[0],), "drop", (5, 2)),
        (
            lambda x: (torch.zeros(x.shape[0], x.shape[0]).masked_fill(~_arange_band(x, 9, 0)[0], float("-inf")),),
            "add",
            (9, 0),
        ),
        (lambda x: (torch.ones(x.shape[0], x.shape[0]).triu(-6).bool(),), "keep", (6, _ALL)),  # anti-causal window
    ],
)
def test_banded_masks_are_proven_with_their_width(fn, use, window):
    node, n = _mask_node(fn)
    verdict = masks.classify(node, use, n, n, {}, fill=float("-inf"))
    assert (verdict.kind, verdict.window) == ("band", window), verdict.reason


def _band_but_one_row(x):
    keep = _arange_band(x, 4, 0)[0].clone()
    keep[x.shape[0] // 2, 0] = True  # one row also sees the first key
    return (keep,)


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: _arange_band(x, x.shape[0] // 3, 0),  # the width grows with the length
        _band_but_one_row,
        lambda x: _arange_band(x, -1, 3),  # the diagonal is masked
    ],
)
def test_near_bands_are_not_bands(fn):
    node, n = _mask_node(fn)
    verdict = masks.classify(node, "keep", n, n, {}, fill=float("-inf"))
    assert verdict.kind is None and verdict.reason, verdict


def test_a_window_wider_than_the_traced_length_is_proven_with_its_width():
    """A width of 5000 traced at n = 12: the proof is symbolic, so the window is read exactly (the sampling proof it
    replaced could not exceed 4096 per side and refused it); never taken for causal."""
    node, n = _mask_node(lambda x: _arange_band(x, 4999, 0))
    verdict = masks.classify(node, "keep", n, n, {}, fill=float("-inf"))
    assert (verdict.kind, verdict.window) == ("band", (4999, 0)), verdict


def test_band_verdicts_combine_as_their_masks_do():
    V = masks.Verdict
    assert (V("band", window=(9, 0)) & V("causal")).window == (9, 0)
    assert (V("band", window=(9, 4)) & V("causal")).window == (9, 0)
    assert (V("band", window=(9, 4)) & V("band", window=(3, 8))).window == (3, 4)
    assert (V("none") & V("causal")).kind == "causal"
    assert (V("band", window=(_ALL, 0)) & V("none")).kind == "causal"
    assert (V("none") & V(None, "why")).reason == "why"
    assert V("band", window=(511, 0)).describe() == "causal sliding window of 512 keys"


def test_mask_from_input_is_never_classified():
    gm = make_fx(lambda x, m: (m + 0,), tracing_mode="symbolic")(torch.empty(8, 3), torch.empty(8, 8))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    assert masks.classify(out, "add", 8, 8, {}).reason == "mask depends on a tensor input"


def test_form_names_are_distinct():
    forms = {
        Form(mm, sc, False, mk, (False,) * 3, False, False)
        for mm in ("4d", "3d")
        for sc in ("mul", "div", "q_mul", "none")
        for mk in ("none", "add", "keep", "drop")
    }
    assert len({f.name for f in forms}) == len(forms)


# ----------------------------------------------------------------------------------------------------------
# banded masks: exact hyper::window_attention, whatever `layers` says, never approximated
# ----------------------------------------------------------------------------------------------------------


def _window_delta():
    from hyper_backend.kernels import op

    start = op.path_counts(window=True)
    return lambda: {key: op.path_counts(window=True)[key] - start[key] for key in start}


class BandSdpa(torch.nn.Module):
    """SDPA with a band built in the graph from ``arange``s (HF's sliding-window masks are this), optionally AND-ed
    with a key-padding input."""

    def __init__(self, left, right, gqa=False):
        super().__init__()
        self.left, self.right, self.gqa = left, right, gqa

    def forward(self, q, k, v, pad=None):
        i = torch.arange(q.shape[-2], device=q.device)
        d = i[None, :] - i[:, None]
        keep = (d >= -self.left) & (d <= self.right)
        if pad is not None:
            keep = keep & pad[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=self.gqa)


@pytest.mark.parametrize(
    "left,right,gqa,padded,dynamic",
    [
        (15, 0, False, False, False),  # a causal sliding window of 16 keys
        (15, 0, True, True, True),
        (6, 6, False, True, False),  # a symmetric band
        (3, 40, True, False, True),
    ],
)
def test_banded_sdpa_runs_the_exact_window_op(left, right, gqa, padded, dynamic):
    torch.manual_seed(0)
    model = BandSdpa(left, right, gqa)
    delta = _window_delta()
    compiled = torch.compile(model, backend="hyper", dynamic=dynamic, options={**OPTS, "layers": "none"})
    for n in (100, 137):  # beyond the band, and past min_seq_len: a band is never approximated
        q = torch.randn(2, 4, n, 16, requires_grad=True)
        k, v = (torch.randn(2, 2 if gqa else 4, n, 16, requires_grad=True) for _ in range(2))
        pad = torch.ones(2, n, dtype=torch.bool)
        pad[1, n - 9 :] = False
        extra = (pad,) if padded else ()
        out, ref = compiled(q, k, v, *extra), model(q, k, v, *extra)
        oracle = model(q.double(), k.double(), v.double(), *extra)
        assert_exact(out, ref, oracle, f"n={n}")
        g = torch.autograd.grad(out.square().sum(), (q, k, v))
        gr = torch.autograd.grad(ref.square().sum(), (q, k, v))
        for a, b in zip(g, gr):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    calls = delta()
    assert calls["window"] == 2 and calls["window_backward"] == 2
    assert calls["hyper"] == calls["exact"] == 0
    report = hyper_backend.explain(model, q.detach(), k.detach(), v.detach(), *extra, options=OPTS, dynamic=dynamic)
    (site,) = report.sites
    assert (site.kind, site.decision) == ("window", "window")
    want = f"causal sliding window of {left + 1} keys" if right == 0 else f"{left} keys before and {right} after"
    assert want in site.reason and ("key padding" in site.reason) == padded


def test_handwritten_sliding_window_runs_the_exact_window_op():
    torch.manual_seed(0)
    model = zoo.Stack(zoo.SlidingWindow).eval()
    delta = _window_delta()
    compiled = torch.compile(model, backend="hyper", dynamic=True, options=OPTS)
    with torch.no_grad():
        for n in (40, 80):  # 80 > the window of 48: a window mistaken for causal would show here
            x = torch.randn(2, n, 64)
            assert_exact(compiled(x), model(x), oracle_of(model, x), f"n={n}")
    assert delta()["window"] == 4 and delta()["hyper"] + delta()["exact"] == 0
    report = hyper_backend.explain(model, torch.randn(2, 40, 64), options=OPTS, dynamic=True)
    assert [(s.kind, s.decision) for s in report.sites] == [("window", "window")] * 2
    assert "causal sliding window of 48 keys" in report.sites[0].reason


class WidthFromInput(torch.nn.Module):
    def forward(self, q, k, v, width):
        i = torch.arange(q.shape[-2])
        keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - width)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


class BandButOneRow(torch.nn.Module):
    def forward(self, q, k, v):
        i = torch.arange(q.shape[-2])
        keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 8)
        keep[q.shape[-2] - 1, 0] = True  # the last row also sees the first key
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


@pytest.mark.parametrize(
    "model,extra,reason",
    [
        (WidthFromInput(), (torch.tensor(8),), "general attn_mask"),  # input-dependent: never classified
        (BandButOneRow(), (), "changed in place"),
    ],
    ids=["width-from-data", "band-but-one-row"],
)
def test_near_bands_stay_exact(model, extra, reason):
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    delta = _window_delta()
    compiled = torch.compile(model, backend="hyper", options=OPTS)
    torch.testing.assert_close(compiled(q, k, v, *extra), model(q, k, v, *extra))
    assert all(v == 0 for v in delta().values())
    report = hyper_backend.explain(model, q, k, v, *extra, options=OPTS)
    assert report.sites[0].decision == "exact" and reason in report.sites[0].reason


# ----------------------------------------------------------------------------------------------------------
# never silently wrong: the failures a hostile audit found (issue 18, items 1-7), as a new user writes them.
# The approximation is made exact (one block holds every key), so compiled must equal eager.
# ----------------------------------------------------------------------------------------------------------

EXACT = dict(block_size=1 << 20, min_seq_len=1, tune_cache="")


def _compiled_equals_eager(model, calls, options=EXACT, dynamic=None, inner="aot_eager", what=""):
    """Compile ``model`` once and check every call in ``calls`` (a list of input tuples) against eager, within 4x
    eager's own error against float64 (plus 1e-6)."""
    compiled = torch.compile(model, backend="hyper", dynamic=dynamic, options={**options, "inner_backend": inner})
    for n, inputs in enumerate(calls):
        with torch.no_grad():
            out, eager = compiled(*inputs), model(*inputs)
        assert_exact(out, eager, oracle_of(model, *inputs), f"{what} call {n}")


def _report_site(model, *inputs, options=EXACT, inner="aot_eager", dynamic=None):
    (site,) = hyper_backend.explain(model, *inputs, options={**options, "inner_backend": inner}, dynamic=dynamic).sites
    return site


class FloatMaskAsBool(torch.nn.Module):
    """An HF-style float attention mask (1 = attend) turned into bool, alone or AND-ed with a causal mask."""

    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, q, k, v, am):
        m = am[:, None, None, :].bool() if self.how != "to" else am[:, None, None, :].to(torch.bool)
        if self.how == "and_causal":
            i = torch.arange(q.shape[-2])
            m = m & (i[None, :] <= i[:, None])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


@pytest.mark.parametrize("how", ["bool", "to", "and_causal"])
def test_float_mask_cast_to_bool_is_key_padding_not_additive(how):
    """Item 1: ``am.bool()`` was looked through, and the float term then read as additive: inverted padding."""
    q, k, v = _qkv(nq=48, nk=48)
    am = torch.ones(2, 48)
    am[0, 30:] = 0.0
    am[1, :5] = 0.0
    model = FloatMaskAsBool(how)
    _compiled_equals_eager(model, [(q, k, v, am)], options={"tune_cache": ""}, what=how)  # the default options
    site = _report_site(model, q, k, v, am)
    assert site.decision == "hyper" and "key padding" in site.reason, site


class IntWidth(torch.nn.Module):
    """A causal sliding window whose width is an int argument (``guarded``: used after ``if w > 0``)."""

    def __init__(self, guarded):
        super().__init__()
        self.guarded = guarded

    def forward(self, q, k, v, w):
        i = torch.arange(q.shape[-2])
        keep = i[None, :] <= i[:, None]
        if not self.guarded or w > 0:
            keep = keep & (i[None, :] > i[:, None] - w)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


@pytest.mark.parametrize("guarded", [True, False], ids=["after-if", "unguarded"])
def test_a_width_from_an_int_argument_is_not_proven_at_a_sample_value(guarded, caplog):
    """Item 2a: from the second width on, Dynamo makes the width symbolic; it was proven at the value 2 (or, with
    an unbounded range, the compile crashed). Each width is served exactly; the first compile (one static width)
    runs the window op, the recompile (a symbolic width, not a sequence length) stays exact and says why."""
    q, k, v = _qkv(nq=64, nk=64)
    with caplog.at_level("INFO", logger="hyper_backend"):
        _compiled_equals_eager(IntWidth(guarded), [(q, k, v, w) for w in (8, 16, 24, 40)], what=f"{guarded=}")
    decisions = [(r.hyper_site.decision, r.hyper_site.reason) for r in caplog.records if hasattr(r, "hyper_site")]
    assert decisions[0] == ("window", "causal sliding window of 8 keys (exact)"), decisions
    assert len(decisions) == 2 and decisions[1][0] == "exact" and "not a sequence length" in decisions[1][1], decisions


class TableWidth(torch.nn.Module):
    def forward(self, q, k, v, table):
        i = torch.arange(q.shape[-2])
        w = table.shape[0]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=(i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - w)
        )


def test_a_width_from_another_tensors_shape_is_not_a_band_under_dynamic_shapes():
    """Item 2b: ``w = table.shape[0]`` with ``dynamic=True`` is a symbol that is not a sequence length; the first
    call was already wrong."""
    q, k, v = _qkv(nq=64, nk=64)
    calls = [(q, k, v, torch.zeros(w)) for w in (12, 20)]
    _compiled_equals_eager(TableWidth(), calls, dynamic=True)
    site = _report_site(TableWidth(), *calls[0], dynamic=True)
    assert site.decision == "exact" and "not a sequence length" in site.reason, site
    static = _report_site(TableWidth(), *calls[0])  # static shapes: the width is a constant, a real band
    assert static.decision == "window" and "sliding window of 12 keys" in static.reason, static


class HiddenBand(torch.nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, q, k, v):
        i = torch.arange(q.shape[-2])
        d = (i[None, :] - i[:, None]).abs()
        keep = d <= 100.0 if self.how == "float_literal" else (d // 4) <= 25
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


@pytest.mark.parametrize("how,reason", [("float_literal", "float literal"), ("floor_division", "floor division")])
def test_bands_the_proof_cannot_see_are_not_taken_for_no_mask(how, reason):
    """Item 3: after calls at n = 32 and 48 the shapes go dynamic and the mask was proven "attends everywhere";
    at n = 512 both bands were ignored."""
    model = HiddenBand(how)
    _compiled_equals_eager(model, [_qkv(nq=n, nk=n, b=1, hq=2, hkv=2) for n in (32, 48, 512)], what=how)
    site = _report_site(model, *_qkv(nq=48, nk=48, b=1, hq=2, hkv=2), dynamic=True)
    assert site.decision == "exact" and reason in site.reason, site


class AttributeMask(torch.nn.Module):
    """The mask is stored on the module before each call (``model.mask = m``), a plain attribute."""

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


class BufferBand(torch.nn.Module):
    """A banded mask kept in a registered buffer and sliced to the length (GPT-2 keeps its causal mask so)."""

    def __init__(self, width=8, size=128):
        super().__init__()
        i = torch.arange(size)
        self.register_buffer("band", (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - width), persistent=False)

    def forward(self, q, k, v):
        n = q.shape[-2]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.band[:n, :n])


@pytest.mark.parametrize("kind", ["padding", "band"])
def test_a_mask_attribute_changed_between_calls_is_read_at_each_call(kind):
    """Item 4: any square non-grad tensor under ``self`` was a compile-time constant, so later masks were ignored.
    A plain attribute is data."""
    q, k, v = _qkv(nq=40, nk=40)
    model = AttributeMask()
    compiled = torch.compile(model, backend="hyper", options={**EXACT, "inner_backend": "aot_eager"})
    i = torch.arange(40)
    for step in range(3):
        if kind == "padding":  # the first call pads nothing (an all-True mask), the later ones pad the last keys
            m = torch.ones(40, 40, dtype=torch.bool)
            m[:, 40 - 9 * step :] = False
        else:
            m = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - (4 + 9 * step))
        model.mask = m
        with torch.no_grad():
            assert_exact(compiled(q, k, v), model(q, k, v), oracle_of(model, q, k, v), f"{kind} step {step}")


@pytest.mark.parametrize("change", ["in_place", "reassigned"])
def test_a_mask_buffer_changed_after_compiling_never_reuses_the_stale_proof(change, caplog):
    """Item 4, buffers: a registered buffer is a compile-time constant, so it is re-checked at each call; once its
    values differ from the proven ones the graph runs exact (and says so once)."""
    q, k, v = _qkv(nq=40, nk=40)
    model = BufferBand()
    compiled = torch.compile(model, backend="hyper", options={**EXACT, "inner_backend": "aot_eager"})
    delta = _window_delta()
    with torch.no_grad():
        assert_exact(compiled(q, k, v), model(q, k, v), oracle_of(model, q, k, v), "before")
        assert delta()["window"] == 1
        wider = BufferBand(width=20).band
        if change == "in_place":
            model.band.copy_(wider)
        else:
            model.band = wider.clone()
        with caplog.at_level("WARNING", logger="hyper_backend"):
            assert_exact(compiled(q, k, v), model(q, k, v), oracle_of(model, q, k, v), "after")
            compiled(q, k, v)
        assert delta()["window"] == 1, "the window op ran on a stale proof"
        assert sum("mask buffer changed" in r.message for r in caplog.records) == 1
        model.band = BufferBand().band  # the proven values again: the lowered graph serves them
        assert_exact(compiled(q, k, v), model(q, k, v), oracle_of(model, q, k, v), "restored")
        assert delta()["window"] == 2


class EinsumFiniteFill(torch.nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, q, k, v):
        n = q.shape[-2]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        s = torch.einsum("bhid,bhjd->bhij", q, k)
        if self.how == "masked_fill":
            s = s.masked_fill(~causal, -1e4) / 1e4
        else:
            s = torch.where(causal, s, -1e4) / 1e4
        return torch.einsum("bhij,bhjd->bhid", s.softmax(-1), v)


@pytest.mark.parametrize("how", ["masked_fill", "where"])
def test_einsum_finite_fill_then_a_scale_is_not_a_hard_mask(how):
    """Item 5: the scale turns the fill -1e4 into -1, a bias: it was rewritten to a hard bool mask."""
    q, k, v = (t * 30 for t in _qkv(nq=40, nk=40))
    model = EinsumFiniteFill(how)
    _compiled_equals_eager(model, [(q, k, v)], what=how)
    site = _report_site(model, q, k, v)
    assert site.decision == "exact" and "not -inf-like" in site.reason, site


class BandFewKeys(torch.nn.Module):
    """A band aligned bottom-right (as the window op aligns it) with more queries than keys, filled with
    ``finfo.min`` in a float mask: the first queries see no key, and eager gives them the mean of v."""

    def forward(self, q, k, v):
        nq, nk = q.shape[-2], k.shape[-2]
        d = torch.arange(nk)[None, :] - torch.arange(nq)[:, None] - (nk - nq)
        keep = (d >= -3) & (d <= 0)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=torch.zeros(nq, nk, dtype=q.dtype).masked_fill(~keep, torch.finfo(q.dtype).min)
        )


def test_a_band_with_more_queries_than_keys_does_not_reach_the_window_op():
    """Item 6: rows with no allowed key got 0 from the window op."""
    q, k, v = _qkv(nq=40, nk=24)
    delta = _window_delta()
    _compiled_equals_eager(BandFewKeys(), [(q, k, v)])
    assert delta()["window"] == 0
    site = _report_site(BandFewKeys(), q, k, v)
    assert site.decision == "exact" and "n_q may exceed n_k" in site.reason, site
    q, k, v = _qkv(nq=24, nk=40)  # every query keeps a key: the exact window op
    _compiled_equals_eager(BandFewKeys(), [(q, k, v)])
    assert delta()["window"] == 1


class Handwritten(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v


@pytest.mark.parametrize("form", ["sdpa", "handwritten"])
@pytest.mark.parametrize("broadcast", ["kv", "q", "v"])
def test_a_batch_broadcast_stays_exact_and_compiles(form, broadcast, call_delta):
    """Item 7: K/V, Q or V of batch 1 against batch 2 failed the compile ("batch sizes differ")."""
    q, k, v = _qkv(nq=40, nk=40, b=2)
    if broadcast == "kv":
        k, v = k[:1], v[:1]
    elif broadcast == "q":
        q = q[:1]
    else:
        v = v[:1]
    model = Sdpa() if form == "sdpa" else Handwritten()
    inner = "aot_eager" if form == "sdpa" else "inductor"
    _compiled_equals_eager(model, [(q, k, v)], inner=inner)
    assert call_delta()["hyper"] + call_delta()["exact"] == 0
    site = _report_site(model, q, k, v, inner=inner)
    assert site.decision == "exact" and "batch" in site.reason, site


def test_window_attention_with_a_huge_side_is_unbounded():
    """Minor: ``window_attention(q, k, v, (2**64, 0))`` raised "Expected a value of type 'int' ... found type
    'int'"; a side past every key reaches every key, as the docstring says."""
    q, k, v = _qkv(nq=24, nk=24)
    out = hyper_backend.window_attention(q, k, v, (2**64, 0))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    with pytest.raises(ValueError, match="left and right"):
        hyper_backend.window_attention(q, k, v, (-1, 0))


# ----------------------------------------------------------------------------------------------------------
# site sessions: numbering per torch.compile call
# ----------------------------------------------------------------------------------------------------------


class _TwoSites(torch.nn.Module):
    def forward(self, q):
        q = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        torch._dynamo.graph_break()
        return F.scaled_dot_product_attention(q, q, q, is_causal=True)


class _TwoOtherSites(_TwoSites):
    def forward(self, q):  # another code object: Dynamo compiles it afresh
        q = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        torch._dynamo.graph_break()
        return F.scaled_dot_product_attention(q, q, q, is_causal=True)


def test_sites_numbered_per_torch_compile_call(call_delta):
    """Each torch.compile call numbers its sites from 0, across its graph breaks; a second call in the same process
    (no ``torch._dynamo.reset()``) numbered its sites 2, 3 (the session was looked up by a walk of the stack frames
    for the torch.compile wrapper, which is unhashable, so every call shared the process's session), and
    ``layers="1"`` selected nothing."""
    options = {**OPTS, "inner_backend": "aot_eager", "layers": "1", "min_seq_len": 1}
    q = torch.randn(1, 2, 40, 16)
    for model in (_TwoSites(), _TwoOtherSites()):
        before = call_delta()
        torch.compile(model, backend="hyper", options=options)(q)
        after = call_delta()
        assert after["hyper"] - before["hyper"] == 1, model  # site 1 only, the graph after the break
    assert torch._dynamo.utils.counters["hyper_backend"]["rewritten"] == 2


def test_a_canonicalised_site_proves_its_mask_once(monkeypatch):
    """An einsum site's mask is proven when it is canonicalised into SDPA and when the SDPA node is planned: one
    `masks.Prover` per graph, so the second is its memo (the proof ran twice)."""
    proofs = []
    prove = masks.Prover._prove
    monkeypatch.setattr(masks.Prover, "_prove", lambda self, *a: proofs.append(a[0]) or prove(self, *a))

    class EinsumCausal(torch.nn.Module):
        def forward(self, q, k, v):
            n = q.shape[-2]
            s = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
            s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf"))
            return torch.einsum("bhij,bhjd->bhid", s.softmax(-1), v)

    report = hyper_backend.explain(EinsumCausal(), *_qkv(), options={**OPTS, "inner_backend": "aot_eager"})
    assert [s.decision for s in report.sites] == ["hyper"], report
    assert len(proofs) == 1, proofs


def test_a_finite_fill_in_bfloat16_is_a_mask(call_delta):
    """``zeros(n, n).masked_fill(~causal, -1e4)`` in bf16 holds -9984 (bf16 cannot store -1e4): it excludes its keys
    as well as -1e4 does, and is lowered as causal (the fuzzer found it kept exact)."""
    q, k, v = (x.to(torch.bfloat16) for x in _qkv())
    n = q.shape[-2]

    class FiniteFill(torch.nn.Module):
        def forward(self, q, k, v):
            causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            bias = torch.zeros(n, n, dtype=q.dtype, device=q.device).masked_fill(~causal, -1e4)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    site = hyper_backend.explain(FiniteFill(), q, k, v, options={**OPTS, "inner_backend": "aot_eager"}).sites[0]
    assert (site.decision, site.reason) == ("hyper", "causal"), site


class _PackedSequenceCheck(torch.nn.Module):
    """HF's causal mask with its packed-sequence check (``find_packed_sequence_indices``: the cumsum of where the
    position ids do not step by 1, compared between query and key) and its vmap-style gathers ``m[b, i]``."""

    def __init__(self, restart=None):
        super().__init__()
        self.restart = restart

    def forward(self, q):
        n = q.shape[-2]
        pos = torch.arange(n, device=q.device)[None]
        if self.restart is not None:  # two packed sequences: positions restart at 0
            pos = torch.where(pos < self.restart, pos, pos - self.restart)
        packed = (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)
        b = torch.arange(1, device=q.device)[:, None, None, None]
        i = torch.arange(n, device=q.device)[None, None, :, None]
        j = torch.arange(n, device=q.device)[None, None, None, :]
        mask = (j <= i) & (packed[b, i] == packed[b, j])
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)


@pytest.mark.parametrize("dynamic", [False, True])
def test_hf_packed_sequence_check_is_proven_causal(dynamic):
    """Gemma-3's body called with ``use_cache=False`` builds this mask; ``diff``, ``cumsum`` and tensor indexing were
    outside the mask language, so every site of the model stayed exact. Two packed sequences are not causal."""
    q = torch.randn(1, 2, 40, 16)
    options = {**OPTS, "inner_backend": "aot_eager"}
    site = hyper_backend.explain(_PackedSequenceCheck(), q, options=options, dynamic=dynamic).sites[0]
    assert (site.decision, site.reason) == ("hyper", "causal"), site
    torch._dynamo.reset()
    site = hyper_backend.explain(_PackedSequenceCheck(restart=16), q, options=options, dynamic=dynamic).sites[0]
    assert site.decision == "exact" and site.reason, site
    compiled = torch.compile(_PackedSequenceCheck(), backend="hyper", options=options, dynamic=dynamic)
    torch.testing.assert_close(compiled(q), _PackedSequenceCheck()(q))
