"""Shared fixtures for the HyperAttention tests: inputs, an eager dense oracle at any precision, and counters.

Helpers are handed out as fixtures (``make_qkv``, ``dense_attention``, ``call_delta``) so test files need no
imports from this module.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile

import pytest
import torch

# Inductor's on-disk cache is shared by every process of a user (/tmp/torchinductor_<user>). A compile that is
# killed while it links leaves an empty .so there, and every later run that compiles the same kernel then fails
# with "file too short". The tests compile into a directory of their own (inherited by the processes they start),
# unless the caller names one with TORCHINDUCTOR_CACHE_DIR.
_OWN_CACHE = None if "TORCHINDUCTOR_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="hyper-tests-inductor-")
if _OWN_CACHE is not None:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _OWN_CACHE


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture
def lsh_detector(monkeypatch):
    """``HYPER_DETECTOR=lsh`` for the test (and the processes it starts).

    The backend, lowering, tuner and distributed tests check that sites reach the approximation at test sizes
    (n of 32 to 500) with small blocks. They were written for the LSH estimator, and they keep exercising it:
    the default ``"topk"`` detector is exact until a query block sees more than ``top_k`` (1024) keys, so at those
    sizes it would never approximate. The topk detector's own tests are tests/test_topk.py (the op, the reference,
    gradients, the backend)."""
    monkeypatch.setenv("HYPER_DETECTOR", "lsh")


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread.

    The tests make thousands of tiny kernel calls (gradcheck, 2000-seed statistics). On the shared 2-core
    machine, OpenMP's second thread turns a 0.1 ms op into tens of ms when the cores are busy; one thread
    keeps the runtime stable. Numerics do not depend on it (the CPU path is deterministic per row).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _make_qkv(
    B, Hq, Hkv, Nq, Nk, D, dtype=torch.float32, seed=0, *, Dv=None, transposed=False, requires_grad=False, scale=1.0
):
    """Gaussian ``q [B,Hq,Nq,D]``, ``k [B,Hkv,Nk,D]``, ``v [B,Hkv,Nk,Dv]``.

    ``transposed=True`` returns non-contiguous views of ``[B, N, H, D]`` storage (the HF layout).
    ``scale`` multiplies q and k (larger -> peakier softmax).
    """
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv

    def rand(b, h, n, d, s):
        if transposed:
            x = (torch.randn(b, n, h, d, generator=g, dtype=torch.float64) * s).to(dtype).transpose(1, 2)
        else:
            x = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) * s).to(dtype)
        return x.requires_grad_(requires_grad)

    return rand(B, Hq, Nq, D, scale), rand(B, Hkv, Nk, D, scale), rand(B, Hkv, Nk, Dv, 1.0)


@pytest.fixture
def make_qkv():
    return _make_qkv


def _padding_mask(B, Nk, seed=0, keep=0.7):
    """``[B, Nk]`` bool key-valid mask with about ``keep`` of the keys valid, including the first and last key
    of batch 0 masked (so that causal rows with no visible key and ragged tails are exercised)."""
    g = torch.Generator().manual_seed(seed + 12345)
    valid = torch.rand(B, Nk, generator=g) < keep
    valid[0, 0] = False
    valid[0, -1] = False
    valid[:, Nk // 2] = True
    return valid


@pytest.fixture
def padding_mask():
    return _padding_mask


def _dense_attention(q, k, v, logw, scale=None, dtype=torch.float64):
    """Plain eager ``softmax(q k^T * scale + logw) v`` computed entirely in ``dtype`` (GQA by repetition).

    Returns ``(out, lse)`` in ``dtype``; differentiable in q, k, v (cast, not detached). With
    ``dtype=float64`` this is the oracle; with the inputs' low precision it is "eager at that precision", whose
    error against the oracle sets the tolerance for the fast path.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[1] // k.shape[1]
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * scale + logw.to(dtype)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v, lse


@pytest.fixture
def dense_attention():
    return _dense_attention


@pytest.fixture
def call_delta():
    """``delta()`` returns how many times each path of ``torch.ops.hyper.attention`` ran since the fixture."""
    from hyper_backend.kernels import op

    start = op.path_counts()
    return lambda: {key: op.path_counts()[key] - start.get(key, 0) for key in start}
