"""The oracle bench (bench/detectors.py) on random tensors at a tiny size: its metrics and oracles mean what they
say (exact attention scores error 0 and recall 1, an oracle keeping every key is exact, a key dropped from a row
moves that row's error and recall as computed by hand, the residual is unbiased), and the report is written."""

from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest
import torch

from hyper_backend import HyperConfig
from hyper_backend.kernels.reference import log_weights

_BENCH = os.path.join(os.path.dirname(__file__), "..", "bench", "detectors.py")
_spec = importlib.util.spec_from_file_location("bench_detectors", _BENCH)
detectors = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = detectors  # dataclasses look their module up
_spec.loader.exec_module(detectors)

N, D, SINKS, WINDOW, R0 = 96, 16, 4, 8, 40


def qkv(seed: int = 0, hq: int = 2, hkv: int = 1, n: int = N):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, n, D, generator=g)
    k = torch.randn(1, hkv, n, D, generator=g)
    v = torch.randn(1, hkv, n, D, generator=g)
    return q, k, v


def head(q, k, v, h=0, needle=None):
    s, p = detectors.exact_probs(q[0, h], k[0, 0], 0.3)
    return detectors.make_head(s, p, v[0, 0], R0, needle, SINKS, WINDOW), p


def test_exact_config_scores_zero_error_full_recall():
    q, k, v = qkv()
    exact = HyperConfig(min_seq_len=4 * N)  # below the threshold the op is exact
    logw = log_weights(q, k, None, True, exact)[0]
    for h in range(2):
        hd, _ = head(q, k, v, h)
        m = detectors.metrics(hd, logw[h])
        assert m["error"] < 1e-12
        assert m["recall"] == 1.0
        assert m["keys"] == pytest.approx((N + 1) / 2)  # causal: row i attends i + 1 keys


@pytest.mark.parametrize("shared", [1, 8])
def test_oracle_keeping_every_key_is_exact(shared):
    q, k, v = qkv(1)
    hd, p = head(q, k, v)
    logw = detectors.oracle_log_weights(p, N, 16, shared, torch.Generator().manual_seed(0), SINKS, WINDOW)
    assert torch.equal(torch.isfinite(logw), torch.ones(N, N, dtype=torch.bool).tril())
    assert (logw[torch.isfinite(logw)] == 0).all()
    m = detectors.metrics(hd, logw)
    assert m["error"] < 1e-12 and m["recall"] == 1.0


def test_dropped_key_moves_error_and_recall_as_by_hand():
    q, k, v = qkv(2)
    hd, p = head(q, k, v)
    logw = torch.zeros(N, N, dtype=torch.float64).masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), -math.inf)
    row = N - 1
    far = p[row].clone()
    far[:SINKS] = 0
    far[row - WINDOW + 1 :] = 0
    top = far.topk(detectors.TOP)
    drop = int(top.indices[0])
    logw[row, drop] = -math.inf
    m = detectors.metrics(hd, logw)
    pr = p[row].clone()
    pr[drop] = 0
    est = (pr / pr.sum()) @ v[0, 0].double()
    ref = p[row] @ v[0, 0].double()
    assert m["error"] == pytest.approx(float((est - ref).norm() / ref.norm()) / (N - R0), rel=1e-9)
    want_recall = 1 - float(top.values[0] / top.values.sum()) / (N - R0)
    assert m["recall"] == pytest.approx(want_recall, rel=1e-12)
    assert m["keys"] == pytest.approx((N + 1) / 2 - 1 / N)


def test_oracle_parts_are_disjoint_and_residual_unbiased():
    """Exact keys are the sinks, the window and the top-k; draws only on the rest, with mean weight 1 there."""
    q, k, v = qkv(3)
    _, p = head(q, k, v)
    top_k, m = 6, 8
    total = torch.zeros(N, N, dtype=torch.float64)
    trials = 400
    g = torch.Generator().manual_seed(0)
    for _ in range(trials):
        w = detectors.oracle_log_weights(p, top_k, m, 1, g, SINKS, WINDOW).exp()
        total += w
    rows = torch.arange(N)
    dom = detectors.outside(N, rows, SINKS, WINDOW)
    far = p.masked_fill(~dom, 0.0)
    keep = torch.zeros(N, N, dtype=torch.bool).scatter_(1, far.topk(top_k, -1).indices, True) & dom
    rest = dom & ~keep
    mean = total / trials
    exact = ~rest & torch.ones(N, N, dtype=torch.bool).tril()
    assert torch.equal(mean[exact], torch.ones_like(mean[exact]))
    assert (mean[~torch.ones(N, N, dtype=torch.bool).tril()] == 0).all()
    # each rest entry's mean weight is 1 in expectation; the sum over a row's rest equals its count exactly
    assert torch.allclose(mean.masked_fill(~rest, 0).sum(-1), rest.sum(-1).double())
    assert abs(float(mean[rest].mean()) - 1.0) < 0.05


def test_block_oracle_shares_one_selection():
    q, k, v = qkv(4)
    _, p = head(q, k, v)
    shared = 16
    w = detectors.oracle_log_weights(p, 5, 0, shared, None, SINKS, WINDOW)
    rows = torch.arange(N)
    chosen = (w == 0) & detectors.outside(N, rows, SINKS, WINDOW)
    for b in range(N // shared):
        block = chosen[b * shared : (b + 1) * shared]
        assert block.any(0).sum() <= 5  # one set of at most 5 keys for the whole block
    # with no residual, every key outside the exact set is dropped
    assert torch.equal(torch.isfinite(w), (w == 0))


def test_needle_share():
    q, k, v = qkv(5)
    span = (10, 14)
    hd, p = head(q, k, v, needle=((N - 2, N - 1), span))
    logw = torch.zeros(N, N, dtype=torch.float64).masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), -math.inf)
    logw[N - 1, 10:12] = -math.inf
    m = detectors.metrics(hd, logw)
    assert m["needle_mass"] == pytest.approx(float(p[N - 2 :, 10:14].sum()))
    assert m["needle_kept"] == pytest.approx(float(p[N - 2, 10:14].sum() + p[N - 1, 12:14].sum()))


@pytest.mark.parametrize("detector", ["lsh", "topk"])
def test_detector_cost(detector):
    """Below the threshold nothing is detected; above it LSH costs a few projections per query and key, and topk
    about one representative per score_group queries against the keys before each block (1 / score_group)."""
    assert detectors.detector_cost(HyperConfig(detector=detector, min_seq_len=4096), 1024, 4) == 0.0
    for group in (16, 64):
        config = HyperConfig(detector=detector, score_group=group, min_seq_len=4096)
        cost = detectors.detector_cost(config, 8192, 4)
        if detector == "lsh":
            assert 0 < cost < 0.01
        else:
            assert cost == pytest.approx(1 / group, rel=0.1)


def test_oracle_interpolation():
    pts = [(100.0, 0.1), (1000.0, 0.01)]
    assert detectors.oracle_at(pts, 50) == 0.1
    assert detectors.oracle_at(pts, 5000) == 0.01
    assert detectors.oracle_at(pts, math.sqrt(100 * 1000)) == pytest.approx(0.055)
