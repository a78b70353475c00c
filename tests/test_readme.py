"""The documentation's code runs as pasted: every ```python block of README.md and of docs/*.md, each in a fresh
interpreter; and CI runs the linters, then exactly the README's test command.

Snippets that are not meant to run (shell sessions, output, fragments) are fenced ```bash or ```text."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = [README, *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(path: str, lang: str):
    """``(first line number, code)`` of every fenced block of ``lang`` in the file at ``path``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [(text.count("\n", 0, m.start()) + 1, m.group(2)) for m in _FENCE.finditer(text) if m.group(1) == lang]


PYTHON = [(os.path.relpath(path, ROOT), line, code) for path in DOCS for line, code in blocks(path, "python")]


def test_readme_has_python_blocks():
    assert len(blocks(README, "python")) >= 2


@pytest.mark.parametrize("doc, line, code", PYTHON, ids=[f"{doc}:{line}" for doc, line, _ in PYTHON])
def test_python_block_runs_as_pasted(doc, line, code, tmp_path):
    """A fresh process, no HYPER_* variables, an empty cache directory (so no tuned entry of this machine
    applies), run from an empty directory: what a new user gets pasting the block."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPER_")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    env.setdefault("OMP_NUM_THREADS", "1")
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, f"{doc} block at line {line} failed:\n{run.stderr[-4000:]}"


def test_ci_lints_then_runs_exactly_the_readme_test_command():
    commands = [code.strip() for _, code in blocks(README, "bash") if "pytest" in code]
    assert len(commands) == 1, commands
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[-1] == commands[0]
    before = " ".join(lines[:-1])
    assert "ruff check ." in before and "ruff format --check ." in before, lines
