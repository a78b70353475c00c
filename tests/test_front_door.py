"""What a new user meets first: an install without Triton, `python -m hyper_backend.check`, a one-line error for a
bad ``HYPER_*`` value, `explain` telling the op's run-time decision, and the demo's output through a pipe."""

from __future__ import annotations

import gc
import logging
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

import hyper_backend
from hyper_backend import check
from hyper_backend.config import EnvError

pytestmark = pytest.mark.usefixtures("lsh_detector")  # written for the LSH estimator: conftest.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No HYPER_* variables, and a default tuning cache that does not exist."""
    for var in [v for v in os.environ if v.startswith("HYPER_") and v != "HYPER_DETECTOR"]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return monkeypatch


# ----------------------------------------------------------------------------------------------------------
# a lean install: nothing on the CPU path imports triton
# ----------------------------------------------------------------------------------------------------------


def test_cpu_path_runs_without_triton(tmp_path):
    """With ``import triton`` made to fail, the package imports, and both the eager function and
    ``backend="hyper"`` approximate on CPU."""
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # any `import triton` now raises ImportError
        import torch
        import torch.nn.functional as F
        import hyper_backend
        from hyper_backend import HyperConfig, hyper_attention

        q, k, v = (torch.randn(1, 2, 512, 32, generator=torch.Generator().manual_seed(i)) for i in range(3))
        exact = F.scaled_dot_product_attention(q, k, v)
        config = HyperConfig(detector="lsh", block_size=64, sample_size=32, min_seq_len=128)
        eager = hyper_attention(q, k, v, config=config)
        assert eager.shape == exact.shape and not torch.allclose(eager, exact)  # approximated

        def f(q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

        compiled = torch.compile(f, backend="hyper", options={"block_size": 64, "sample_size": 32,
                                                              "min_seq_len": 128})(q, k, v)
        assert torch.allclose(compiled, eager, atol=1e-5)
        assert "hyper_backend.kernels.triton_attention" not in sys.modules
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPER_") or k == "HYPER_DETECTOR"}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-4000:]


def test_triton_is_not_a_dependency():
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        text = f.read()
    deps = re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M).group(1)
    assert "torch" in deps and "triton" not in deps
    assert re.search(r'^triton = \["triton"\]', text, re.M)
    assert re.search(r'^cuda = \[.*"triton".*\]', text, re.M)


# ----------------------------------------------------------------------------------------------------------
# python -m hyper_backend.check / hyper_backend.check_env()
# ----------------------------------------------------------------------------------------------------------


def test_check_prints_the_resolved_settings(clean_env, capsys):
    clean_env.setenv("HYPER_MIN_SEQ_LEN", "8192")
    clean_env.setenv("HYPER_LAYERS", "last:2")
    assert check.main([]) == 0
    out = capsys.readouterr().out
    for text in ("HYPER_MIN_SEQ_LEN", "8192", "last:2", "tuned, else 256", "HYPER_KERNELS", "auto"):
        assert text in out
    report = hyper_backend.check_env()
    assert report.resolved("HYPER_MIN_SEQ_LEN") == "8192"
    assert report.resolved("HYPER_BLOCK_SIZE") == "tuned, else 256"
    assert report.resolved("HYPER_ATTENTION") == "on"


@pytest.mark.parametrize(
    "var, raw, expected",
    [
        ("HYPER_MIN_SEQ_LEN", "8k", "HYPER_MIN_SEQ_LEN='8k': expected an integer"),
        ("HYPER_ATTENTION", "maybe", "HYPER_ATTENTION='maybe': expected one of 1/0, true/false, yes/no, on/off"),
        ("HYPER_KERNELS", "gpu", "HYPER_KERNELS='gpu': expected one of auto, cpu, triton"),
        ("HYPER_INNER_BACKEND", "cuda", "HYPER_INNER_BACKEND='cuda': expected one of"),
        ("HYPER_LAYERS", "last", "HYPER_LAYERS='last'"),
    ],
)
def test_check_rejects_a_bad_value_in_one_line(clean_env, capsys, var, raw, expected):
    clean_env.setenv(var, raw)
    assert check.main([]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hyper_backend.check: {expected}"), captured.err
    assert captured.out == ""
    with pytest.raises(EnvError, match=re.escape(expected)):
        hyper_backend.check_env()


def test_check_names_unknown_variables_with_a_suggestion(clean_env, capsys):
    clean_env.setenv("HYPER_MIN_SEQLEN", "8192")
    clean_env.setenv("HYPER_FROBNICATE", "1")
    clean_env.setenv("HYPER_SEED", "-1")
    assert check.main([]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3  # every problem, one line each
    assert any(
        "HYPER_MIN_SEQLEN is not a hyper_backend variable (did you mean HYPER_MIN_SEQ_LEN?)" in ln for ln in lines
    )
    assert any(ln.startswith("hyper_backend.check: HYPER_FROBNICATE is not") and "known: " in ln for ln in lines)
    assert any(ln.startswith("hyper_backend.check: HYPER_SEED='-1'") for ln in lines)


def test_check_runs_as_a_module(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPER_") or k == "HYPER_DETECTOR"}
    run = subprocess.run(
        [sys.executable, "-m", "hyper_backend.check", "--quiet"], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and run.stdout == "", run.stderr
    env["HYPER_BLOCK_SIZE"] = "0"
    run = subprocess.run(
        [sys.executable, "-m", "hyper_backend.check"], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 1 and run.stderr.startswith("hyper_backend.check: HYPER_BLOCK_SIZE='0':")
    assert "RuntimeWarning" not in run.stderr  # hyper_backend/__init__ does not import the module it runs


def test_known_variables_are_the_readme_table():
    """`check` knows every variable config reads; the README's table documents exactly those."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    table = readme[readme.index("## Settings") :]
    table = table[: table.index("\n\n", table.index("| variable"))]
    documented = set(re.findall(r"^\| `[a-z_]+` \| `(HYPER_[A-Z0-9_]+)`", table, re.M))
    assert documented == set(check.known_variables())


# ----------------------------------------------------------------------------------------------------------
# the backend's error for a bad HYPER_* value
# ----------------------------------------------------------------------------------------------------------


def test_backend_env_error_is_one_line_naming_the_variable(clean_env, caplog):
    clean_env.setenv("HYPER_SAMPLE_SIZE", "lots")

    def f(q):
        return F.scaled_dot_product_attention(q, q, q)

    torch._dynamo.reset()
    with caplog.at_level(logging.ERROR, logger="hyper_backend"), pytest.raises(Exception) as info:
        torch.compile(f, backend="hyper")(torch.randn(1, 1, 8, 4))
    torch._dynamo.reset()
    inner = getattr(info.value, "inner_exception", info.value)
    assert isinstance(inner, EnvError)
    message = str(inner)
    assert "\n" not in message and message.startswith("HYPER_SAMPLE_SIZE='lots': expected an integer")
    assert "python -m hyper_backend.check" in message
    assert inner.__cause__ is None and inner.__suppress_context__
    logged = [r.getMessage() for r in caplog.records if r.name == "hyper_backend" and r.levelno == logging.ERROR]
    assert logged == [f"hyper_backend: {message}"]


# ----------------------------------------------------------------------------------------------------------
# explain
# ----------------------------------------------------------------------------------------------------------


def test_report_str_leaves_no_file_open():
    from hyper_backend.lowering.sites import Site
    from hyper_backend.report import Report

    report = Report([Site(0, "attn", "sdpa", "hyper", "non-causal")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text = str(report)
        gc.collect()
    assert "1/1 attention sites lowered" in text
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_explain_shows_the_op_run_time_decision(clean_env, tmp_path):
    """A tuned device default ``min_seq_len`` of 7694: the site is lowered at both lengths, and explain says the
    op runs exact at n=6144 and approximates at 8192, with the threshold and where it came from."""
    from hyper_backend.autotune import schema, writer

    path = str(tmp_path / "tune.json")
    writer.record(
        path,
        defaults=[
            schema.make_default(
                device=schema.device_key(torch.device("cpu")),
                dtype="float32",
                head_dim=16,
                min_seq_len=7694,
                crossover={},
            )
        ],
    )

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    shown = {}
    for n in (6144, 8192):
        q = torch.randn(1, 1, n, 16)
        torch._dynamo.reset()
        report = hyper_backend.explain(f, q, q, q, options={"tune_cache": path, "inner_backend": "eager"})
        assert [s.decision for s in report.sites] == ["hyper"]
        shown[n] = (report.runtime[0], str(report))
    torch._dynamo.reset()
    at_6144, text_6144 = shown[6144]
    assert (at_6144.decision, at_6144.min_seq_len, at_6144.source) == ("exact", 7694, "tuned device default")
    assert "exact: n=6144 < min_seq_len 7694 (tuned device default)" in text_6144
    assert "0 approximate at run time" in text_6144
    at_8192, text_8192 = shown[8192]
    assert (at_8192.decision, at_8192.min_seq_len) == ("hyper", 7694)
    assert "hyper: n=8192 >= min_seq_len 7694" in text_8192


def test_explain_run_time_decision_explicit_and_causal(clean_env):
    """An explicit threshold is named as such; causal attention above it can still run exact when its
    largest quadrant is shorter than the threshold, and explain says so."""

    def f(q):
        return F.scaled_dot_product_attention(q, q, q, is_causal=True)

    q = torch.randn(1, 1, 600, 16)
    torch._dynamo.reset()
    report = hyper_backend.explain(f, q, options={"min_seq_len": 512, "inner_backend": "eager", "tune_cache": ""})
    torch._dynamo.reset()
    r = report.runtime[0]
    assert (r.decision, r.min_seq_len, r.source, r.causal) == ("exact", 512, "explicit", True)
    assert "exact: n=600 >= min_seq_len 512 (explicit), but the causal quadrants are shorter" in str(report)


# ----------------------------------------------------------------------------------------------------------
# the demo's numbers and its output through a pipe
# ----------------------------------------------------------------------------------------------------------


def test_demo_agreement_measures():
    from hyper_backend.demo import agreement

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 50, 8, generator=g)
    head = torch.randn(8, 11, generator=g)
    same = agreement(hidden, hidden, lambda h: h @ head)
    assert same == {"top1": 1.0, "hidden_rel_err": 0.0, "positions": 50}
    other = agreement(hidden + 0.5 * torch.randn(hidden.shape, generator=g), hidden, lambda h: h @ head)
    assert 0.0 < other["top1"] < 1.0 and 0.3 < other["hidden_rel_err"] < 0.7


def test_demo_prints_a_line_per_phase_through_a_pipe():
    import io

    from rich.console import Console

    from hyper_backend.demo import PhaseLines

    buf = io.StringIO()
    console = Console(file=buf, width=100)
    assert not console.is_terminal
    with PhaseLines(console) as progress:
        task = progress.add_task("backend='hyper': compiling", total=3)
        progress.update(task, advance=1)
        progress.update(task, advance=1, description="backend='hyper': running")
        progress.update(task, advance=1)
        progress.update(task, description="backend='hyper': done")
    lines = buf.getvalue().strip().splitlines()
    assert len(lines) == 3
    assert [ln.split("] ", 1)[1] for ln in lines] == [
        "backend='hyper': compiling",
        "backend='hyper': running",
        "backend='hyper': done",
    ]


def test_a_checkout_does_not_hide_the_kernels_distribution():
    """Run from the checkout's root, ``import kernels`` after ``import hyper_backend`` is Hugging Face's package
    (which transformers imports), not this project's ``kernels/`` sources (`hyper_backend._checkout`)."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the kernels distribution is not installed: nothing to hide")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import hyper_backend, kernels; print(kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert not os.path.abspath(out.stdout.strip()).startswith(os.path.join(root, "kernels"))
