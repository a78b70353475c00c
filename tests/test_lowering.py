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
        return m64(*(x.double() if x.is_floating_point() else x for x in inputs))


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


def test_a_window_wider_than_any_test_size_is_refused():
    """A width of 5000 cannot be exceeded at a test size (at most 4096 per side): never taken for causal."""
    node, n = _mask_node(lambda x: _arange_band(x, 4999, 0))
    verdict = masks.classify(node, "keep", n, n, {}, fill=float("-inf"))
    assert verdict.kind is None and "too large to verify" in verdict.reason


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
