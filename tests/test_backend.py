"""``backend="hyper"``: registration, options, ``HYPER_*`` environment variables (in process and across
processes sharing inductor's caches), site numbering across graph breaks, dynamic shapes, and `explain`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import zoo

import hyper_backend
from hyper_backend.backend import hyper_backend as backend_fn
from hyper_backend.config import EnvError, HyperConfig, LayerSelection, OpSettings
from hyper_backend.settings import resolve_settings, validate_options

pytestmark = pytest.mark.usefixtures("lsh_detector")  # written for the LSH estimator: conftest.py

OPTS = dict(min_seq_len=32, block_size=16, sample_size=16, tune_cache="")
EAGER = {**OPTS, "inner_backend": "eager"}
TESTS = os.path.dirname(os.path.abspath(__file__))
ENV_VARS = (
    "HYPER_ATTENTION",
    "HYPER_MIN_SEQ_LEN",
    "HYPER_BLOCK_SIZE",
    "HYPER_SAMPLE_SIZE",
    "HYPER_LSH_PROJS",
    "HYPER_CAUSAL_DEPTH",
    "HYPER_SEED",
    "HYPER_LAYERS",
    "HYPER_TUNE_CACHE",
    "HYPER_INNER_BACKEND",
)


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield


class Layers(torch.nn.Module):
    """``depth`` SDPA layers (causal self-attention), optionally with a graph break after layer ``brk``."""

    def __init__(self, depth=4, brk=None, dim=32, heads=2):
        super().__init__()
        self.heads, self.brk = heads, brk
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(depth))

    def run(self, x, layers):
        B, N, C = x.shape
        for lin in layers:
            q, k, v = lin(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
            x = x + F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, N, C)
        return x

    def forward(self, x):
        if self.brk is None:
            return self.run(x, self.qkv)
        x = self.run(x, self.qkv[: self.brk + 1])
        torch._dynamo.graph_break()  # outside any loop, so Dynamo resumes in a second graph
        return self.run(x, self.qkv[self.brk + 1 :])


def _run(script: str, env: dict, timeout=300) -> dict:
    """Run ``script`` in a fresh interpreter; it prints one JSON line last."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HYPER_") or k == "HYPER_DETECTOR"}
    full_env.update(env)
    full_env["PYTHONPATH"] = TESTS + os.pathsep + full_env.get("PYTHONPATH", "")
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=full_env, capture_output=True, text=True, timeout=timeout
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------
# registration and options
# ----------------------------------------------------------------------------------------------------------


def test_entry_point_in_a_fresh_process():
    """``backend="hyper"`` resolves through the entry point without importing hyper_backend first."""
    out = _run(
        """
        import json, sys, torch
        import torch.nn.functional as F
        assert "hyper_backend" not in sys.modules
        f = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), backend="hyper",
                          options={"min_seq_len": 32, "block_size": 16, "sample_size": 16, "tune_cache": "",
                                   "inner_backend": "eager"})
        q = torch.randn(1, 2, 64, 16)
        f(q, q, q)
        from hyper_backend.kernels.op import path_counts
        print(json.dumps({"loaded": "hyper_backend" in sys.modules, **path_counts()}))
    """,
        {},
    )
    assert out == {"loaded": True, "hyper": 1, "exact": 0, "backward": 0}


@pytest.mark.parametrize(
    "options,needle",
    [
        ({"block_sise": 16}, "unknown option 'block_sise'"),
        ({"block_size": 0}, "options['block_size']"),
        ({"min_seq_len": "4k"}, "options['min_seq_len']"),
        ({"causal_depth": -1}, "options['causal_depth']"),
        ({"enabled": "yes"}, "options['enabled']"),
        ({"layers": "last"}, "options['layers']"),
        ({"inner_backend": "tvm"}, "options['inner_backend']"),
        ({"tune_cache": 3}, "options['tune_cache']"),
    ],
)
def test_bad_options_name_the_option(options, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        validate_options(options)


def test_bad_option_surfaces_through_compile():
    f = torch.compile(lambda x: x.softmax(-1) @ x, backend="hyper", options={"seed": -1})
    with pytest.raises(Exception, match=r"options\['seed'\]"):
        f(torch.randn(4, 4))


def test_precedence_options_over_env(monkeypatch):
    monkeypatch.delenv("HYPER_DETECTOR")  # this test sets the environment itself
    monkeypatch.setenv("HYPER_BLOCK_SIZE", "64")
    monkeypatch.setenv("HYPER_SEED", "7")
    monkeypatch.setenv("HYPER_CAUSAL_DEPTH", "none")
    monkeypatch.setenv("HYPER_TUNE_CACHE", "/tmp/tune-a.json")
    s = resolve_settings({"block_size": 16, "tune_cache": "/tmp/tune-b.json"})
    # explicit: options over HYPER_*; the other fields are left to the tuning cache, else the defaults
    assert dict(s.explicit) == {"block_size": 16, "causal_depth": None, "seed": 7}
    assert s.tune_cache == "/tmp/tune-b.json"
    assert resolve_settings().tune_cache == "/tmp/tune-a.json"
    monkeypatch.delenv("HYPER_TUNE_CACHE")
    assert resolve_settings().tune_cache.endswith(os.path.join("hyper_backend", "tune.json"))
    monkeypatch.setenv("HYPER_TUNE_CACHE", "")
    assert resolve_settings().tune_cache == "", "an empty HYPER_TUNE_CACHE disables tuned lookups"


def test_op_args_in_the_graph(monkeypatch):
    """The rewritten call carries the explicit settings; with no tuning cache the rest are the defaults."""
    monkeypatch.delenv("HYPER_DETECTOR")  # the defaults, as a new user gets them
    seen = []

    def spy(gm, example_inputs):
        compiled = backend_fn(
            gm, example_inputs, options={"min_seq_len": 48, "inner_backend": "eager", "tune_cache": ""}
        )
        seen.extend(n.args for n in gm.graph.nodes if n.target is torch.ops.hyper.attention.default)
        return compiled

    q = torch.randn(1, 2, 8, 16)
    torch.compile(lambda q: F.scaled_dot_product_attention(q, q, q), backend=spy)(q)
    assert len(seen) == 1 and len(seen[0]) == 7
    assert OpSettings.decode(seen[0][6]) == OpSettings.of(HyperConfig(min_seq_len=48))


@pytest.mark.parametrize(
    "var,value,accepted",
    [
        ("HYPER_ATTENTION", "maybe", "1/0"),
        ("HYPER_MIN_SEQ_LEN", "4k", "integer"),
        ("HYPER_BLOCK_SIZE", "0", "in [1, "),
        ("HYPER_SAMPLE_SIZE", "-2", "in [0, "),
        ("HYPER_LSH_PROJS", "99", "in [1, 30]"),
        ("HYPER_CAUSAL_DEPTH", "deep", "'none'"),
        ("HYPER_SEED", "x", "integer"),
        ("HYPER_LAYERS", "last", "first:K"),
        ("HYPER_INNER_BACKEND", "tvm", "inductor, aot_eager, eager"),
    ],
)
def test_bad_env_values(monkeypatch, var, value, accepted):
    monkeypatch.setenv(var, value)
    with pytest.raises(EnvError) as e:
        resolve_settings()
    assert var in str(e.value) and accepted in str(e.value)


def test_bad_env_surfaces_through_compile(monkeypatch):
    monkeypatch.setenv("HYPER_LAYERS", "every other")
    f = torch.compile(Layers(depth=1), backend="hyper")
    with pytest.raises(Exception, match="HYPER_LAYERS='every other'.*accepted forms"):
        f(torch.randn(1, 8, 32))


def test_env_read_at_compile_time(monkeypatch, call_delta):
    """A changed variable applies to the next compile; an already compiled function keeps its settings."""
    x = torch.randn(1, 80, 32)
    model = Layers(depth=1)
    monkeypatch.setenv("HYPER_MIN_SEQ_LEN", "1000000")
    monkeypatch.setenv("HYPER_INNER_BACKEND", "eager")
    monkeypatch.setenv("HYPER_TUNE_CACHE", "")
    monkeypatch.setenv("HYPER_BLOCK_SIZE", "16")
    f = torch.compile(model, backend="hyper")
    f(x)
    assert call_delta() == {"hyper": 0, "exact": 1, "backward": 0}
    monkeypatch.setenv("HYPER_MIN_SEQ_LEN", "32")
    f(x)  # Dynamo's compiled code is reused: no compile, settings unchanged
    assert call_delta() == {"hyper": 0, "exact": 2, "backward": 0}
    torch._dynamo.reset()
    torch.compile(model, backend="hyper")(x)
    assert call_delta() == {"hyper": 1, "exact": 2, "backward": 0}
    monkeypatch.setenv("HYPER_ATTENTION", "off")
    torch._dynamo.reset()
    torch.compile(model, backend="hyper")(x)
    assert call_delta() == {"hyper": 1, "exact": 2, "backward": 0}


_CACHE_SCRIPT = """
    import json, torch, zoo
    from hyper_backend.kernels.op import path_counts

    class Both(torch.nn.Module):  # a hand-written site (inductor pattern pass) and an SDPA site (Dynamo rewrite)
        def __init__(self):
            super().__init__()
            self.a = zoo.MatmulMulScale(dim=32, heads=2)
            self.b = zoo.MatmulMulScale(dim=32, heads=2)

        def forward(self, x):
            x = x + self.a(x)
            q, k, v = self.b.split(x)
            return x + self.b.merge(torch.nn.functional.scaled_dot_product_attention(q, k, v))

    torch.manual_seed(0)
    with torch.no_grad():
        torch.compile(Both().eval(), backend="hyper")(torch.randn(1, 64, 32))
    counters = torch._dynamo.utils.counters
    print(json.dumps({**path_counts(), "fx_hit": counters["inductor"]["fxgraph_cache_hit"],
                      "aot_hit": counters["aot_autograd"]["autograd_cache_hit"]}))
"""


def test_env_changes_never_served_stale_across_processes(tmp_path):
    """Three processes share inductor's FX-graph and AOTAutograd caches; each sees its own settings, and the
    third (same settings as the first) shows the caches are really in use."""
    base = {
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
        "HYPER_BLOCK_SIZE": "16",
        "HYPER_SAMPLE_SIZE": "16",
        "HYPER_TUNE_CACHE": "",
        "HYPER_MIN_SEQ_LEN": "32",
    }
    first = _run(_CACHE_SCRIPT, base)
    assert (first["hyper"], first["exact"]) == (2, 0)
    off = _run(_CACHE_SCRIPT, {**base, "HYPER_ATTENTION": "0"})
    assert (off["hyper"], off["exact"]) == (0, 0)
    again = _run(_CACHE_SCRIPT, base)
    assert (again["hyper"], again["exact"]) == (2, 0)
    assert again["fx_hit"] + again["aot_hit"] > 0, "the caches were not used at all: this test would prove nothing"


def test_changed_setting_not_served_from_inductor_cache(tmp_path, monkeypatch):
    """In one process, after ``torch._dynamo.reset()``, inductor's caches still hold the first graphs."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("HYPER_BLOCK_SIZE", "16")
    monkeypatch.setenv("HYPER_SAMPLE_SIZE", "16")
    monkeypatch.setenv("HYPER_TUNE_CACHE", "")
    torch.manual_seed(0)
    model = zoo.Stack(zoo.MatmulMulScale, depth=1, dim=32, heads=2).eval()
    x = torch.randn(1, 64, 32)
    with torch.no_grad():
        for msl, expect in (
            ("32", {"hyper": 1, "exact": 0}),
            ("128", {"hyper": 0, "exact": 1}),
            ("32", {"hyper": 1, "exact": 0}),
        ):
            monkeypatch.setenv("HYPER_MIN_SEQ_LEN", msl)
            torch._dynamo.reset()
            delta = _delta_from_now()
            torch.compile(model, backend="hyper")(x)
            assert {k: delta()[k] for k in expect} == expect, f"HYPER_MIN_SEQ_LEN={msl}"
    counters = torch._dynamo.utils.counters
    assert counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"] > 0


def _delta_from_now():
    from hyper_backend.kernels import op

    start = op.path_counts()
    return lambda: {key: op.path_counts()[key] - start[key] for key in start}


# ----------------------------------------------------------------------------------------------------------
# site numbering and layer selection
# ----------------------------------------------------------------------------------------------------------


def test_numbering_across_graph_breaks():
    report = hyper_backend.explain(Layers(depth=4, brk=1), torch.randn(1, 40, 32), options={**EAGER, "layers": "1,2"})
    assert [s.index for s in report.sites] == [0, 1, 2, 3]
    assert [s.graph for s in report.sites] == [0, 0, 1, 1]
    assert [s.decision for s in report.sites] == ["exact", "hyper", "hyper", "exact"]
    assert report.graphs == 2


def test_recompile_keeps_numbers(call_delta):
    f = torch.compile(Layers(depth=3), backend="hyper", dynamic=False, options={**EAGER, "layers": "last:1"})
    for n in (80, 96):  # static shapes: the second length recompiles the same graph
        f(torch.randn(1, n, 32))
    assert call_delta() == {"hyper": 2, "exact": 0, "backward": 0}
    assert torch._dynamo.utils.counters["hyper_backend"]["graphs"] == 2


def test_last_k_with_graph_breaks_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="hyper_backend"):
        hyper_backend.explain(Layers(depth=4, brk=1), torch.randn(1, 40, 32), options={**EAGER, "layers": "last:1"})
    assert any("graph breaks" in r.getMessage() for r in caplog.records)


def test_layer_selection_forms():
    assert [i for i in range(6) if LayerSelection.parse("first:2").contains(i, 6)] == [0, 1]
    assert [i for i in range(6) if LayerSelection.parse("last:2").contains(i, 6)] == [4, 5]
    assert [i for i in range(6) if LayerSelection.parse("0,2-3").contains(i, 6)] == [0, 2, 3]


# ----------------------------------------------------------------------------------------------------------
# dynamic shapes, explain, logging, counters
# ----------------------------------------------------------------------------------------------------------


def test_one_compile_serves_every_length(call_delta):
    """n = 256 .. 4096 with dynamic shapes: one graph, the length decision inside the op."""
    model, make, sites = zoo.hf_model("llama")
    f = torch.compile(
        model,
        backend="hyper",
        dynamic=True,
        fullgraph=True,
        options={**EAGER, "min_seq_len": 512, "block_size": 64, "sample_size": 64},
    )
    with torch.no_grad():
        for n in (256, 1024, 4096):
            f(**make(n, 1))
    assert torch._dynamo.utils.counters["hyper_backend"]["graphs"] == 1
    assert call_delta() == {"hyper": 2 * sites, "exact": sites, "backward": 0}  # 256 (and 1024, causal) exact


def test_explain_table_logging_counters(caplog):
    with caplog.at_level(logging.INFO, logger="hyper_backend"):
        report = hyper_backend.explain(Layers(depth=2), torch.randn(1, 40, 32), options=EAGER)
    text = str(report)
    assert "2/2 attention sites lowered" in text and "sdpa" in text
    assert [(s.kind, s.decision, s.reason) for s in report.sites] == [("sdpa", "hyper", "causal")] * 2
    assert report.sites[0].name.startswith("test_backend.py:")  # no submodule: the source line names it
    logged = [r.getMessage() for r in caplog.records if r.name == "hyper_backend"]
    assert any(m.startswith("site 0 [sdpa]") and m.endswith("hyper (causal)") for m in logged)
    counters = torch._dynamo.utils.counters["hyper_backend"]
    assert counters["rewritten"] == 2 and counters["rewritten:sdpa"] == 2 and counters["sites"] == 2
