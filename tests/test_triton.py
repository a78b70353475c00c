"""The Triton path under ``TRITON_INTERPRET=1`` against the reference, for the same permutations and samples.

Truth is `reference.hyper_attention_reference` (float64 inside) on float32 copies of the inputs: the plan only
sees ``q.float()``, so it draws the same permutations and samples as the Triton path on bf16 inputs. The
tolerance of each comparison is tied to eager torch's own error at that precision: the same dense formula
(softmax of s + log W, with the reference's log-weights) evaluated in the input dtype.

Where to run. Triton picks the interpreter when it is imported and when kernels are decorated, and a process
that imported triton without it cannot run interpreted kernels (triton.language's own jitted helpers are then
compiled-mode functions). In a full suite something else may import triton first, so every check here runs in
one spawned worker process that starts with ``TRITON_INTERPRET=1``; the test process never imports the
Triton module. The ``_run_*`` functions are what the worker executes.
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib
import importlib.util
import json
import math
import multiprocessing
import os

import pytest
import torch

from hyper_backend import HyperConfig
from hyper_backend.config import OpSettings
from hyper_backend.kernels.reference import hyper_attention_reference, log_weights

# find_spec, not importorskip: the test process must not import triton (see above)
if importlib.util.find_spec("triton") is None:
    pytest.skip(
        "triton is not installed: pip install -e '.[triton]' to run the Triton interpreter tests",
        allow_module_level=True,
    )


def _spawn_pool(interpret: str):
    """A one-process pool whose process starts with ``TRITON_INTERPRET=interpret``."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = interpret
    try:
        pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        interpreting = pool.submit(_interpreting).result()
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    assert interpreting == (interpret == "1")
    return pool


@pytest.fixture(scope="module")
def worker():
    """Runs the Triton path under the interpreter."""
    pool = _spawn_pool("1")
    yield pool
    pool.shutdown()


def _triton():
    from hyper_backend.kernels import triton_attention

    return triton_attention


def _interpreting() -> bool:
    return _triton()._INTERPRET


def _inputs(B, Hq, Hkv, Nq, Nk, D, dtype, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
    do = torch.randn(B, Hq, Nq, D, generator=g).to(dtype)
    key_valid = None
    if masked:
        key_valid = torch.rand(B, Nk, generator=g) > 0.25
        key_valid[:, 0] = True  # every row sees a key (rows without any are tested on their own)
    return q, k, v, do, key_valid


def _truth(q, k, v, do, key_valid, causal, p):
    """Reference out, lse, dq, dk, dv (float64 arithmetic on float32 copies)."""
    leaves = [x.float().requires_grad_() for x in (q, k, v)]
    out, lse = hyper_attention_reference(*leaves, key_valid, causal, None, p)
    out.backward(do.float())
    return (out.detach(), lse) + tuple(x.grad for x in leaves)


def _eager(q, k, v, do, key_valid, causal, p):
    """The same attention written densely in torch at the inputs' precision: eager's own error."""
    with torch.no_grad():
        logw = log_weights(q.float(), k.float(), key_valid, causal, p)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    qq, kk, vv = leaves
    group = q.shape[1] // k.shape[1]
    kk, vv = kk.repeat_interleave(group, 1), vv.repeat_interleave(group, 1)
    scores = (qq @ kk.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + logw.to(q.dtype)
    lse = torch.logsumexp(scores, -1)
    out = torch.exp(scores - lse[..., None]).nan_to_num(0.0) @ vv
    out.backward(do)
    return (out.detach(), lse.detach()) + tuple(x.grad for x in leaves)


def _err(a, b):
    a, b = a.double(), b.double()
    same_inf = torch.isinf(a) & (a == b)
    return torch.where(same_inf, torch.zeros_like(a), a - b).abs().max().item()


def _check(q, k, v, do, key_valid, causal, p):
    ta = _triton()
    out, lse = ta.attention_forward(q, k, v, key_valid, causal, None, p)
    dq, dk, dv = ta.attention_backward(do, q, k, v, out, lse, key_valid, causal, None, p)
    assert out.dtype == q.dtype and dq.dtype == q.dtype and dk.dtype == k.dtype and dv.dtype == v.dtype
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    truth = _truth(q, k, v, do, key_valid, causal, p)
    eager = _eager(q, k, v, do, key_valid, causal, p)
    eps = torch.finfo(q.dtype).eps
    for name, f, t, e in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), truth, eager):
        assert f.shape == t.shape, name
        assert torch.equal(torch.isneginf(f), torch.isneginf(t)), f"{name}: rows without keys differ"
        err_fast, err_eager = _err(f, t), _err(e, t)
        bound = 2.0 * err_eager + 4 * eps * max(1.0, t[torch.isfinite(t)].abs().max().item())
        assert err_fast <= bound, f"{name}: |triton - ref| = {err_fast:.3g} > {bound:.3g} (eager {err_eager:.3g})"


# name -> (B, Hq, Hkv, Nq, Nk, D, causal, dtype, masked, HyperConfig(block_size, sample_size, lsh_num_projs,
# min_seq_len, causal_depth, seed)). Small blocks so that every case approximates; together they cover
# n in {63, 200, 513}, d in {40, 64}, causal and not, GQA, key masks, n_q != n_k, fp32 and bf16.
CASES = {
    "noncausal-gqa-masked-n200-d40": (
        2,
        4,
        2,
        200,
        200,
        40,
        False,
        torch.float32,
        True,
        HyperConfig.published(64, 40, 4, 64, None, 0),
    ),
    "exact-nq!=nk-n63-d64": (
        1,
        2,
        1,
        63,
        90,
        64,
        False,
        torch.float32,
        False,
        HyperConfig.published(64, 32, 4, 64, None, 0),
    ),
    "causal-n513-d64-multitile": (
        1,
        2,
        1,
        513,
        513,
        64,
        True,
        torch.float32,
        False,
        HyperConfig.published(128, 96, 5, 128, None, 1),
    ),
    "causal-prefix-masked-gqa-n200": (
        1,
        4,
        2,
        150,
        200,
        40,
        True,
        torch.float32,
        True,
        HyperConfig.published(32, 24, 4, 32, 2, 2),
    ),
    "noncausal-bf16-n513-d40-gqa": (
        1,
        2,
        1,
        513,
        513,
        40,
        False,
        torch.bfloat16,
        False,
        HyperConfig.published(64, 64, 5, 64, None, 3),
    ),
    "causal-bf16-n200-d64-masked": (
        1,
        2,
        2,
        200,
        200,
        64,
        True,
        torch.bfloat16,
        True,
        HyperConfig.published(32, 32, 4, 32, None, 4),
    ),
    "causal-fp64-n63-d40-gqa": (
        1,
        2,
        1,
        63,
        63,
        40,
        True,
        torch.float64,
        False,
        HyperConfig.published(16, 8, 3, 16, None, 5),
    ),
}


def _sweep():
    """The larger sweep: every n, d, causal, GQA, dtype combination."""
    out = {}
    for n in (63, 200, 513):
        for d in (40, 64):
            for causal in (False, True):
                for hq, hkv in ((2, 2), (4, 1)):
                    for dtype in (torch.float32, torch.bfloat16, torch.float16):
                        name = f"n{n}-d{d}-{'causal' if causal else 'full'}-h{hq}/{hkv}-{str(dtype)[6:]}"
                        out[name] = (
                            1,
                            hq,
                            hkv,
                            n,
                            n + (0 if causal else 7),
                            d,
                            causal,
                            dtype,
                            n != 200,
                            HyperConfig.published(48, 40, 5, 48, None, n + d),
                        )
    return out


SWEEP = _sweep()

# The estimator with exact parts (sink_keys, local_window, the stratified residual), same layout. Together: sinks
# (with and without key padding), the causal window across leaves and quadrants, the strip of a KV prefix
# (n_q < n_k), the centred band of non-causal self-attention (odd and even w, w >= n), cross-attention (no
# window), GQA, ragged n in {63, 200, 513}, d in {40, 64}, fp32, bf16 and fp64.
_X = functools.partial(HyperConfig, detector="lsh")  # the LSH estimator's exact parts
EXACT_PARTS = {
    "sinks-stratified-noncausal-gqa-masked-n200-d40": (
        1,
        4,
        2,
        200,
        200,
        40,
        False,
        torch.float32,
        True,
        _X(64, 40, 4, 64, None, 10, sink_keys=4, residual="stratified"),
    ),
    "window-even-sinks-noncausal-masked-n63-d64": (
        1,
        2,
        1,
        63,
        63,
        64,
        False,
        torch.float32,
        True,
        _X(16, 12, 3, 16, None, 11, sink_keys=2, local_window=10),
    ),
    "window-covers-all-noncausal-n63-d40": (
        1,
        2,
        2,
        63,
        63,
        40,
        False,
        torch.float32,
        False,
        _X(16, 12, 3, 16, None, 12, local_window=126),
    ),
    "window-cross-attention-nq!=nk-masked-d40": (
        1,
        2,
        1,
        100,
        130,
        40,
        False,
        torch.float32,
        True,
        _X(32, 16, 4, 32, None, 13, sink_keys=2, local_window=9),
    ),
    "window-sinks-causal-gqa-n513-d64": (
        1,
        2,
        1,
        513,
        513,
        64,
        True,
        torch.float32,
        False,
        _X(96, 64, 5, 256, None, 14, sink_keys=4, local_window=33),
    ),
    "window-stratified-causal-prefix-gqa-masked-n200": (
        1,
        4,
        2,
        150,
        200,
        40,
        True,
        torch.float32,
        True,
        _X(32, 24, 4, 32, 2, 15, sink_keys=3, local_window=20, residual="stratified"),
    ),
    "window-sinks-stratified-noncausal-bf16-n200-d64": (
        1,
        2,
        1,
        200,
        200,
        64,
        False,
        torch.bfloat16,
        False,
        _X(32, 32, 4, 32, None, 16, sink_keys=1, local_window=15, residual="stratified"),
    ),
    "window-sinks-stratified-causal-fp64-n63-masked": (
        1,
        2,
        1,
        63,
        63,
        40,
        True,
        torch.float64,
        True,
        _X(16, 8, 3, 16, None, 17, sink_keys=2, local_window=5, residual="stratified"),
    ),
}


def _sweep_exact_parts():
    """The larger sweep of the exact parts: every n, d, layout (non-causal self, causal, causal with a prefix)
    and dtype, with sinks, a window and both residuals."""
    out = {}
    for n in (63, 200, 513):
        for d in (40, 64):
            for layout in ("full", "causal", "prefix"):
                for dtype in (torch.float32, torch.bfloat16):
                    residual = "stratified" if (n + d) % 2 else "uniform"
                    name = f"n{n}-d{d}-{layout}-{str(dtype)[6:]}-{residual}"
                    nq = n - n // 4 if layout == "prefix" else n
                    out[name] = (
                        1,
                        4,
                        2,
                        nq,
                        n,
                        d,
                        layout != "full",
                        dtype,
                        n != 200,
                        HyperConfig.published(
                            48, 40, 5, 48, None, n + d, sink_keys=1 + n % 4, local_window=8 + n % 9, residual=residual
                        ),
                    )
    return out


SWEEP_EXACT_PARTS = _sweep_exact_parts()


def _run_case(table, name):
    B, Hq, Hkv, Nq, Nk, D, causal, dtype, masked, p = table[name]
    q, k, v, do, key_valid = _inputs(B, Hq, Hkv, Nq, Nk, D, dtype, masked)
    _check(q, k, v, do, key_valid, causal, p)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(worker, name):
    worker.submit(_run_case, CASES, name).result()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SWEEP))
def test_matches_reference_sweep(worker, name):
    worker.submit(_run_case, SWEEP, name).result()


@pytest.mark.parametrize("name", list(EXACT_PARTS))
def test_exact_parts_match_reference(worker, name):
    worker.submit(_run_case, EXACT_PARTS, name).result()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SWEEP_EXACT_PARTS))
def test_exact_parts_match_reference_sweep(worker, name):
    worker.submit(_run_case, SWEEP_EXACT_PARTS, name).result()


def _run_rows_without_keys(p=HyperConfig.published(32, 16, 4, 32, None, 0)):
    """A batch whose keys are all masked: out 0, lse -inf, zero gradients; the other batch unaffected."""
    for causal in (False, True):  # causal with n_q < n_k: the masks of the tail are strided slices
        q, k, v, do, key_valid = _inputs(2, 2, 1, 80 if causal else 100, 100, 40, torch.float32, True)
        key_valid[1] = False
        ta = _triton()
        out, lse = ta.attention_forward(q, k, v, key_valid, causal, None, p)
        grads = ta.attention_backward(do, q, k, v, out, lse, key_valid, causal, None, p)
        assert torch.isneginf(lse[1]).all() and (out[1] == 0).all()
        assert all(torch.isfinite(g).all() and (g[1] == 0).all() for g in grads)
        live = _truth(q[:1], k[:1], v[:1], do[:1], key_valid[:1], causal, p)
        for f, t in zip((out, lse) + grads, live):
            assert _err(f[:1], t) < 1e-4


def test_rows_without_keys(worker):
    worker.submit(_run_rows_without_keys).result()


def test_rows_without_keys_exact_parts(worker):
    """The same with sinks (none in the masked batch), a window and stratified draws (all of weight 0 there)."""
    p = HyperConfig.published(32, 16, 4, 32, None, 0, sink_keys=2, local_window=6, residual="stratified")
    worker.submit(_run_rows_without_keys, p).result()


def _run_dispatch(p=HyperConfig.published(64, 32, 4, 64, None, 0)):
    """torch.ops.hyper.attention with kernels="triton" in its settings runs the Triton path, forward and backward."""
    from hyper_backend.kernels import op

    q, k, v, do, key_valid = _inputs(1, 4, 2, 200, 200, 40, torch.float32, True, seed=7)
    results = {}
    for choice in ("triton", "cpu"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        before = op.path_counts()
        out, lse = torch.ops.hyper.attention(*leaves, key_valid, False, None, OpSettings.of(p, kernels=choice).encode())
        out.backward(do)
        assert op.path_counts()["hyper"] == before["hyper"] + 1
        assert op.path_counts()["backward"] == before["backward"] + 1
        results[choice] = (out.detach(), lse) + tuple(x.grad for x in leaves)
    for f, c in zip(results["triton"], results["cpu"]):
        assert _err(f, c) < 2e-5


def test_dispatch_through_op(worker):
    worker.submit(_run_dispatch).result()


def test_dispatch_through_op_exact_parts(worker):
    """The op's Triton path serves sinks, the window and the stratified residual (as the CPU path does)."""
    p = HyperConfig.published(64, 32, 4, 64, None, 0, sink_keys=2, local_window=16, residual="stratified")
    worker.submit(_run_dispatch, p).result()


def _fake_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, return_attn_probs=False):
    """flash-attn 2's documented convention: [B, N, H, D] in, (out [B, N, H, D], lse [B, H, N], S) out."""
    assert dropout_p == 0.0 and causal and return_attn_probs
    qt, kt, vt = (x.transpose(1, 2).float() for x in (q, k, v))
    kt = kt.repeat_interleave(qt.shape[1] // kt.shape[1], 1)
    vt = vt.repeat_interleave(qt.shape[1] // vt.shape[1], 1)
    n = qt.shape[2]
    s = (qt @ kt.transpose(-1, -2)) * softmax_scale
    s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.softmax(s, -1) @ vt
    return out.transpose(1, 2).to(q.dtype), lse, None


def _run_flash_leaves():
    """The flash-attn leaf path (no GPU here: a stand-in with flash_attn_func's convention) matches ours."""
    ta = _triton()
    p = HyperConfig.published(32, 16, 4, 32, None, 0)
    q, k, v, _, _ = _inputs(2, 2, 1, 90, 90, 40, torch.bfloat16, False)  # 4 padded leaves of 23 rows
    ours = ta.attention_forward(q, k, v, None, True, None, p)
    saved = ta._flash_attn_func, ta._flash_leaves_ok
    ta._flash_attn_func, ta._flash_leaves_ok = _fake_flash_attn_func, lambda q, key_valid: True
    try:
        theirs = ta.attention_forward(q, k, v, None, True, None, p)
    finally:
        ta._flash_attn_func, ta._flash_leaves_ok = saved
    assert _err(ours[1], theirs[1]) < 1e-4
    assert _err(ours[0], theirs[0]) < 2e-2  # bf16 outputs, one rounding apart


def test_flash_attn_leaves(worker):
    worker.submit(_run_flash_leaves).result()


def _run_launch_config():
    """Autotune keys are length buckets; pruning keeps tiles within the block, the operand width's list and the
    target's shared memory; every tile is a power of two of at least 16 (the dot's K and the aranges)."""
    from hyper_backend.kernels import triton_configs as tc
    from hyper_backend.kernels import triton_topk as tt

    ta = _triton()
    assert tc.bucket(4097) == tc.bucket(8000) == 8192 and tc.bucket(10**6) == tc.bucket(10**7)
    kernels = (ta._hyper_fwd_kernel, ta._hyper_bwd_dq_kernel, ta._hyper_bwd_dkdv_kernel, ta._hyper_bwd_sample_kernel)
    for kernel in kernels + (tt._fwd, tt._bwd):
        assert not {"SQ", "SK", "BQ", "BK", "M", "NQ_T", "NK_T", "NQ", "NK", "QB", "E", "T"} & set(kernel.keys)
        for c in kernel.configs:
            for tile in (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]):
                assert tile >= 16 and tile & (tile - 1) == 0, c
    half, single = torch.empty(1, dtype=torch.float16), torch.empty(1, dtype=torch.float32)
    # what a launch passes the pruning: its lengths as buckets (the lengths themselves are in GEOM)
    lengths = lambda BLOCK_D, Q, **n: dict(BLOCK_D=BLOCK_D, Q=Q, **{f"{k}_BUCKET": tc.bucket(v) for k, v in n.items()})  # noqa: E731
    prune = ta._hyper_fwd_kernel.early_config_prune
    configs = ta._hyper_fwd_kernel.configs
    for arch in (80, 90):
        small = prune.for_target(configs, lengths(BQ=40, BK=50, M=0, BLOCK_D=64, Q=half), arch)
        assert small and all(c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] <= 64 for c in small)
        assert len(small) < len(tc.CONFIGS["fwd"][(2, 64)])
        full = prune.for_target(configs, lengths(BQ=256, BK=256, M=400, BLOCK_D=128, Q=half), arch)
        assert set(map(str, full)) == set(map(str, tc.CONFIGS["fwd"][(2, 128)]))
        fp32 = prune.for_target(configs, lengths(BQ=256, BK=256, M=400, BLOCK_D=128, Q=single), arch)
        assert fp32 and all(c in tc.CONFIGS["fwd"][(8, 128)] for c in fp32)
    # a smaller shared memory (a consumer GPU) drops the large tiles first
    d64 = lengths(BQ=256, BK=256, M=400, BLOCK_D=64, Q=half)
    big = max(tc.shared_bytes("query", c, 64, 2) for c in tc.CONFIGS["fwd"][(2, 64)])
    tight = prune.for_target(configs, d64, tc.Target(86, big - 1))
    assert tight and all(tc.shared_bytes("query", c, 64, 2) < big for c in tight)
    # the topk kernels: a list of their own on sm_90, tiles within the query block
    for kernel, name in ((tt._fwd, "topk_fwd"), (tt._bwd, "topk_bwd")):
        for arch in (80, 90):
            block = lengths(QB=64, E=1296, T=191, BLOCK_D=128, Q=half)
            kept = kernel.early_config_prune.for_target(kernel.configs, block, arch)
            assert set(map(str, kept)) == set(map(str, tc.config_list(name, 2, 128, arch)))
            small = kernel.early_config_prune.for_target(kernel.configs, dict(block, QB_BUCKET=tc.bucket(16)), arch)
            assert small and all(c.kwargs["BLOCK_M"] == 16 for c in small)


def test_launch_config(worker):
    worker.submit(_run_launch_config).result()


def _run_geometry():
    """A launch's lengths reach the kernels as one 64-byte line of int32 in `LENGTHS` order, zero-padded; a
    length that int32 cannot hold is refused, naming the lengths."""
    from hyper_backend.kernels import triton_configs as tc
    from hyper_backend.kernels import triton_kernels as tk
    from hyper_backend.kernels import triton_topk as tt

    for names in (tk.LENGTHS, tt.LENGTHS):
        g = tc.geometry(names, torch.device("cpu"), **{n: i + 1 for i, n in enumerate(names)})
        assert g.dtype == torch.int32 and g.numel() * 4 == 64 == tk.GEOM_SIZE * 4
        assert g.tolist() == list(range(1, len(names) + 1)) + [0] * (tk.GEOM_SIZE - len(names))
    with pytest.raises(ValueError, match="int32"):
        tc.geometry(tk.LENGTHS, torch.device("cpu"), **dict.fromkeys(tk.LENGTHS, 2**31))


def test_geometry(worker):
    worker.submit(_run_geometry).result()


def test_masked_loads_have_other():
    """Every masked ``tl.load`` of the kernels names its ``other``: on hardware a masked lane reads nothing, so a
    value the kernel later uses must come from ``other``, never from memory the interpreter happened to read."""
    import ast

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    loads = [
        node
        for name in ("triton_kernels.py", "triton_topk.py")
        for node in ast.walk(ast.parse(open(os.path.join(root, name)).read()))
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "tl.load"
    ]
    assert loads
    for node in loads:
        names = {kw.arg for kw in node.keywords}
        assert "mask" not in names or "other" in names, ast.unparse(node)


# ----------------------------------------------------------------------------------------------------------
# the "topk" detector (`triton_topk`): its kernels against its torch path (`topk.attend`, `topk.attend_backward`)
# for one selection. Truth is that torch path on float64 copies of the inputs; eager's error is the dense formula
# (`topk.dense_log_weights`) in the inputs' dtype, and the bound is tied to it as above.
# ----------------------------------------------------------------------------------------------------------

_TOPK = functools.partial(HyperConfig, min_seq_len=16, top_k=8, query_block=16, score_group=4, sample_size=6)

# name -> (B, Hq, Hkv, Nq, Nk, D, causal, dtype, masked, config). Blocks of 16 rows: n = 45, 63, 70, 200 pad
# block 0 (lead rows); a window of 80 or 100 gives whole tiles of 64 keys (the interpreter's tile) in the tiles
# and in the last block; together GQA, key masks, n_q != n_k, d = 40 and 80, fp64, fp32, fp16 and bf16.
TOPK_CASES = {
    "causal-gqa-lead-fp64": (1, 4, 2, 70, 70, 40, True, torch.float64, False, _TOPK(sink_keys=2, local_window=6)),
    "causal-prefix-masked-fp64": (2, 2, 1, 50, 77, 40, True, torch.float64, True, _TOPK(sink_keys=2, local_window=6)),
    "causal-whole-tiles-masked-fp32": (1, 2, 1, 200, 230, 40, True, torch.float32, True, _TOPK(local_window=80)),
    "window-whole-tiles-masked-d80-fp32": (
        1,
        2,
        2,
        200,
        200,
        80,
        False,
        torch.float32,
        True,
        _TOPK(sink_keys=1, local_window=100),
    ),
    "no-window-nq!=nk-fp64": (1, 2, 1, 45, 60, 40, False, torch.float64, False, _TOPK(sink_keys=2)),
    "causal-masked-fp16": (1, 2, 1, 70, 70, 40, True, torch.float16, True, _TOPK(sink_keys=2, local_window=6)),
    "window-gqa-bf16": (1, 4, 2, 63, 63, 64, False, torch.bfloat16, False, _TOPK(sink_keys=2, local_window=9)),
}


def _topk_sweep():
    """The larger sweep: n, d, layout (causal, causal with a KV prefix, non-causal with and without a window),
    GQA and dtype."""
    out = {}
    for n in (63, 200):
        for d in (40, 64, 128):
            for layout in ("causal", "prefix", "window", "full"):
                for dtype in (torch.float32, torch.float16, torch.bfloat16):
                    name = f"n{n}-d{d}-{layout}-{str(dtype)[6:]}"
                    nq = n - n // 4 if layout == "prefix" else n
                    window = None if layout == "full" else (70 if n == 200 else 12)  # the call must approximate
                    cfg = _TOPK(sink_keys=1 + n % 3, local_window=window, seed=n + d)
                    out[name] = (1, 4, 2, nq, n, d, layout in ("causal", "prefix"), dtype, n != 200, cfg)
    return out


TOPK_SWEEP = _topk_sweep()


def _topk_call(q, k, v, key_valid, causal, cfg):
    """The call's part, its selection (`topk.select`, on float copies so every dtype selects alike) and scale."""
    from hyper_backend.kernels import op, topk
    from hyper_backend.kernels.plan import plan_call

    n_q, n_k = q.shape[2], k.shape[2]
    plan = plan_call(n_q, n_k, causal, op.fit(cfg, n_q, n_k))
    assert plan.parts[0].kind == "topk", plan.describe()
    return topk._inputs(plan, q.float(), k.float(), v.float(), key_valid, None)


def _topk_eager(q, k, v, do, key_valid, sel, part, scale):
    """The topk estimate written densely in the inputs' dtype (its log-weights, then softmax): eager's error."""
    from hyper_backend.kernels import topk

    n_q, n_k = q.shape[2], k.shape[2]
    logw = topk.dense_log_weights(sel, part, n_q, n_k, key_valid, q.device).log().to(q.dtype)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    qq, kk, vv = leaves
    group = q.shape[1] // k.shape[1]
    kk, vv = kk.repeat_interleave(group, 1), vv.repeat_interleave(group, 1)
    scores = (qq @ kk.transpose(-1, -2)) * scale + logw
    lse = torch.logsumexp(scores, -1)
    out = torch.exp(scores - lse[..., None]).nan_to_num(0.0) @ vv
    out.backward(do)
    return (out.detach(), lse.detach()) + tuple(x.grad for x in leaves)


def _check_topk(q, k, v, do, key_valid, causal, cfg):
    from hyper_backend.kernels import topk, triton_topk

    part, sel, scale = _topk_call(q, k, v, key_valid, causal, cfg)
    out, lse = triton_topk.attend(q, k, v, key_valid, sel, part, scale)
    grads = triton_topk.attend_backward(q, k, v, key_valid, sel, part, scale, do, out, lse)
    assert out.dtype == q.dtype and all(g.dtype == q.dtype for g in grads)
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    q64, k64, v64, do64 = (x.double() for x in (q, k, v, do))
    truth = topk.attend(q64, k64, v64, key_valid, sel, part, scale)
    truth += topk.attend_backward(q64, k64, v64, key_valid, sel, part, scale, do64, truth[0])
    eager = _topk_eager(q, k, v, do, key_valid, sel, part, scale)
    eps = torch.finfo(q.dtype).eps
    for name, f, t, e in zip(("out", "lse", "dq", "dk", "dv"), (out, lse) + grads, truth, eager):
        assert f.shape == t.shape, name
        assert torch.equal(torch.isneginf(f), torch.isneginf(t)), f"{name}: rows without keys differ"
        err_fast, err_eager = _err(f, t), _err(e, t)
        bound = 2.0 * err_eager + 4 * eps * max(1.0, t[torch.isfinite(t)].abs().max().item())
        assert err_fast <= bound, f"{name}: |triton - torch| = {err_fast:.3g} > {bound:.3g} (eager {err_eager:.3g})"


def _run_topk_case(table, name):
    B, Hq, Hkv, Nq, Nk, D, causal, dtype, masked, cfg = table[name]
    q, k, v, do, key_valid = _inputs(B, Hq, Hkv, Nq, Nk, D, dtype, masked)
    _check_topk(q, k, v, do, key_valid, causal, cfg)


@pytest.mark.parametrize("name", list(TOPK_CASES))
def test_topk_matches_torch(worker, name):
    worker.submit(_run_topk_case, TOPK_CASES, name).result()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TOPK_SWEEP))
def test_topk_matches_torch_sweep(worker, name):
    worker.submit(_run_topk_case, TOPK_SWEEP, name).result()


def _run_topk_rows_without_keys():
    """A batch whose keys are all masked: out 0 and lse -inf as the torch path gives, zero gradients."""
    from hyper_backend.kernels import topk, triton_topk

    for causal in (False, True):
        q, k, v, do, key_valid = _inputs(2, 2, 1, 50, 70, 40, torch.float32, True)
        key_valid[1] = False
        part, sel, scale = _topk_call(q, k, v, key_valid, causal, _TOPK(sink_keys=2, local_window=6))
        out, lse = triton_topk.attend(q, k, v, key_valid, sel, part, scale)
        grads = triton_topk.attend_backward(q, k, v, key_valid, sel, part, scale, do, out, lse)
        ref_out, ref_lse = topk.attend(q, k, v, key_valid, sel, part, scale)
        assert torch.isneginf(ref_lse[1]).all() and torch.isneginf(lse[1]).all() and (out[1] == 0).all()
        assert all(torch.isfinite(g).all() and (g[1] == 0).all() for g in grads)
        assert _err(out, ref_out) < 1e-5 and _err(lse, ref_lse) < 1e-5


def test_topk_rows_without_keys(worker):
    worker.submit(_run_topk_rows_without_keys).result()


def _run_topk_dispatch():
    """`hyper_backend.hyper_attention` with ``HYPER_KERNELS=triton`` runs the topk kernels, forward and backward,
    and agrees with ``HYPER_KERNELS=cpu`` (the torch path)."""
    from hyper_backend import hyper_attention
    from hyper_backend.kernels import triton_topk

    calls = []
    saved = triton_topk.attend, triton_topk.attend_backward

    def counted(fn):
        return lambda *args: calls.append(fn.__name__) or fn(*args)

    q, k, v, do, key_valid = _inputs(1, 4, 2, 75, 90, 40, torch.float32, True, seed=7)
    cfg = _TOPK(sink_keys=2, local_window=6)
    results = {}
    triton_topk.attend, triton_topk.attend_backward = counted(saved[0]), counted(saved[1])
    before = os.environ.get("HYPER_KERNELS")
    try:
        for choice in ("triton", "cpu"):
            os.environ["HYPER_KERNELS"] = choice
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            mask = key_valid[:, None, None, :]
            out = hyper_attention(*leaves, mask, is_causal=True, enable_gqa=True, config=cfg)
            out.backward(do)
            results[choice] = (out.detach(),) + tuple(x.grad for x in leaves)
    finally:
        os.environ.pop("HYPER_KERNELS")
        if before is not None:
            os.environ["HYPER_KERNELS"] = before
        triton_topk.attend, triton_topk.attend_backward = saved
    assert calls == ["attend", "attend_backward"]
    for f, c in zip(results["triton"], results["cpu"]):
        assert _err(f, c) < 2e-5


def test_topk_dispatch_through_hyper_attention(worker):
    worker.submit(_run_topk_dispatch).result()


# ----------------------------------------------------------------------------------------------------------
# compiling for real GPUs: no GPU here, but Triton ships ptxas, so the kernels can be built to cubins for
# sm_80 / sm_90 ahead of time (bench/triton_resources.py). Its recorder runs the public API on CPU tensors and
# intercepts every launch, so the builds have the signature, constexprs, 16-byte alignment hints and options of a
# real launch, for every config the launchers' pruning keeps on that GPU. What the interpreter cannot check:
# compile errors, register spills, and shared memory beyond the per-block limit (or beyond the pruning's model).
# ----------------------------------------------------------------------------------------------------------


def _resources():
    """bench/triton_resources.py, importable by name (its build workers are spawned processes that unpickle its
    functions; they inherit sys.path)."""
    import sys

    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module("triton_resources")


@pytest.fixture(scope="module")
def compiler():
    """Builds kernels for GPUs (a process without the interpreter)."""
    pool = _spawn_pool("0")
    yield pool
    pool.shutdown()


def _run_gpu_builds(cache: str, archs, dims, dtypes, quick: bool):
    """The sweep in the worker; None when this Triton has no ptxas. Results as dicts, failures first."""
    from dataclasses import asdict

    tr = _resources()
    if not tr.ptxas_available():
        return None
    cases = tr.all_scenarios(dims, dtypes, quick)
    results = tr.sweep(cases, archs, jobs=2, cache=cache, pick=tr.quick_pick if quick else None)
    return [dict(asdict(r), ok=r.ok) for r in results]


def _check_gpu_builds(built):
    if built is None:
        pytest.skip("this Triton ships no ptxas: cannot build cubins without a GPU toolchain")
    kernels = {"hyper_fwd", "hyper_bwd_dq", "hyper_bwd_dkdv", "hyper_bwd_sample", "topk_fwd", "topk_bwd"}
    assert {r["kernel"] for r in built} == kernels
    bad = [
        (r["kernel"], r["arch"], r["flags"], r["error"][:300], r["registers"], r["spill_bytes"], r["shared"])
        for r in built
        if not r["ok"]
    ]
    assert not bad, (
        f"{len(bad)} of {len(built)} builds fail (error, spills, or shared memory over the limit or model):\n"
        + "\n".join(map(str, bad[:20]))
    )


CI_BUILDS = ((90, "float16"), (80, "float32"))  # (arch, dtype) pairs of the CI subset


def test_kernels_build_for_gpu(compiler, tmp_path):
    """CI: every kernel and flag combination of the CI scenarios at its largest kept tile, d = 128, fp16 on sm_90
    and fp32 on sm_80 (the topk kernels: causal with a key mask, and non-causal without). Both dtypes on both
    architectures, and every kept tile, are the slow sweep's."""
    builds = [compiler.submit(_run_gpu_builds, str(tmp_path), (a,), (128,), (t,), True) for a, t in CI_BUILDS]
    built = [b.result() for b in builds]
    _check_gpu_builds(None if None in built else [r for rs in built for r in rs])


@pytest.mark.slow
def test_kernels_build_for_gpu_sweep(compiler, tmp_path):
    """Every variant: each kernel, flag combination and kept config, d = 64 and 128, fp16, bf16, fp32 and fp64."""
    dtypes = ("float16", "bfloat16", "float32", "float64")
    _check_gpu_builds(compiler.submit(_run_gpu_builds, str(tmp_path), (80, 90), (64, 128), dtypes, False).result())


def test_gpu_bench_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: bench/gpu.py would run the benchmark")
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "gpu.py")
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main([]) == 0
    assert "no CUDA device: GPU benchmark not run" in capsys.readouterr().out


def test_roofline_prices_the_call_plan():
    """bench/roofline.py prices the causal plan `plan_call` makes (leaves of min_seq_len, one hyper part per level)
    from the committed sweep's sm_90 builds."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("bench_roofline", os.path.join(root, "bench", "roofline.py"))
    roofline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(roofline)
    from hyper_backend.kernels.plan import plan_call

    sched = roofline._Schedule.of(plan_call(131072, 131072, True, roofline.LSH))
    assert sched.leaf == 4096 and [c for c, _ in sched.levels] == [1, 2, 4, 8, 16] and sched.strip == 127
    assert all(c * 2 * s == 131072 for c, s in sched.levels)
    path = os.path.join(root, "bench", "results", "triton_resources.json")
    if not os.path.exists(path):
        pytest.skip("bench/results/triton_resources.json is absent: run bench/triton_resources.py to price builds")
    with open(path) as f:
        builds = json.load(f)["builds"]
    text = roofline.report(builds)
    assert "FlashAttention-2 exact causal" in text and "x** faster" in text
