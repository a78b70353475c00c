"""``torch.ops.hyper.attention`` and ``hyper_backend.hyper_attention``: exact limits, gradients, opcheck,
padding, fallbacks to exact attention, determinism and the public API's contract."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hyper_backend import HyperConfig, hyper_attention
from hyper_backend.config import MIN_SEQ_LEN, OpSettings

pytestmark = pytest.mark.usefixtures("one_thread")

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
SMALL = HyperConfig.published(block_size=16, sample_size=16, min_seq_len=32)
MID = HyperConfig.published(block_size=64, sample_size=64, min_seq_len=256)
MID128 = HyperConfig.published(block_size=64, sample_size=64, min_seq_len=128)
BIG = HyperConfig.published(block_size=256, sample_size=32, min_seq_len=256)
TINY = HyperConfig.published(block_size=4, sample_size=4, lsh_num_projs=3, min_seq_len=4)  # for gradcheck / opcheck


def op(q, k, v, key_valid=None, is_causal=False, config=SMALL, scale=None):
    """``torch.ops.hyper.attention`` with every parameter explicit."""
    return torch.ops.hyper.attention(q, k, v, key_valid, is_causal, scale, OpSettings.of(config).encode())


def exact(q, k, v, key_valid=None, is_causal=False, scale=None):
    """Exact attention by SDPA, with bottom-right causal alignment and a key-padding mask, in q's dtype."""
    Nq, Nk = q.shape[2], k.shape[2]
    mask = None
    if is_causal:
        mask = torch.ones(Nq, Nk, dtype=torch.bool).tril(Nk - Nq)
    if key_valid is not None:
        kv = key_valid[:, None, None, :]
        mask = kv if mask is None else mask & kv
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def ones_value_mask(B, N, seed):
    """A key-padding mask that keeps the first key, so every causal row sees at least one key."""
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(B, N, generator=g) < 0.6
    valid[:, 0] = True
    return valid


# ----------------------------------------------------------------------------------------------------------
# the public function, the op and the counters
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_shape", ["B11N", "111N", "N", "1N", "B11N-broadcast-B1"])
def test_public_function_runs_the_op_with_key_padding_masks(mask_shape, make_qkv, call_delta):
    B, N = 2, 300
    q, k, v = make_qkv(B, 4, 2, N, N, 40, F32)
    valid = ones_value_mask(B, N, 1)
    if mask_shape == "B11N":
        mask, key_valid = valid[:, None, None, :], valid
    elif mask_shape == "B11N-broadcast-B1":
        mask, key_valid = valid[:1, None, None, :], valid[:1].expand(B, N)
    else:
        row = valid[0]
        mask = {"111N": row[None, None, None, :], "N": row, "1N": row[None, :]}[mask_shape]
        key_valid = row.expand(B, N)
    out = hyper_attention(q, k, v, attn_mask=mask, enable_gqa=True, config=SMALL)
    ref, _ = op(q, k, v, key_valid)
    assert torch.equal(out, ref)
    assert call_delta() == {"hyper": 2, "exact": 0, "backward": 0}
    # and the key-padding mask is honoured: the exact limit is masked exact attention
    limit = hyper_attention(q, k, v, attn_mask=mask, enable_gqa=True, config=SMALL.replace(min_seq_len=N + 1))
    torch.testing.assert_close(limit, exact(q, k, v, key_valid), rtol=0, atol=1e-6)


def test_an_all_true_key_padding_mask_changes_nothing(make_qkv):
    q, k, v = make_qkv(1, 2, 2, 100, 300, 32, F32)
    ones = torch.ones(1, 1, 1, 300, dtype=torch.bool)
    for causal in (False, True):
        torch.testing.assert_close(
            hyper_attention(q, k, v, attn_mask=ones, is_causal=causal, config=SMALL),
            hyper_attention(q, k, v, is_causal=causal, config=SMALL),
        )


@pytest.mark.parametrize("nq, nk", [(300, 300), (200, 300)])
def test_op_takes_sliced_and_broadcast_key_padding_masks(nq, nk, make_qkv):
    # regression: the causal path once viewed the mask, which failed for a non-contiguous one
    q, k, v = make_qkv(2, 2, 1, nq, nk, 32, F64)
    row = ones_value_mask(1, nk + 5, 8)
    for key_valid in (row[:, 5:].expand(2, nk), ones_value_mask(2, nk + 5, 8)[:, 5:]):
        assert not key_valid.is_contiguous()
        for causal in (False, True):
            out, lse = op(q, k, v, key_valid, causal)
            ref_out, ref_lse = op(q, k, v, key_valid.contiguous(), causal)
            assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


def test_counters_follow_the_length_decision(make_qkv, call_delta):
    q, k, v = make_qkv(1, 2, 2, 300, 300, 40, F32)
    cfg = SMALL.replace(min_seq_len=300)
    op(q, k, v, config=cfg)  # n == min_seq_len: approximate
    op(q[:, :, :299], k[:, :, :299], v[:, :, :299], config=cfg)  # below: exact
    assert call_delta() == {"hyper": 1, "exact": 1, "backward": 0}


@pytest.mark.parametrize("causal", [False, True])
def test_non_contiguous_inputs_give_the_contiguous_result(causal, make_qkv):
    q, k, v = make_qkv(2, 4, 2, 257, 257, 64, F32, transposed=True)
    assert not q.is_contiguous()
    out, lse = op(q, k, v, None, causal)
    ref_out, ref_lse = op(q.contiguous(), k.contiguous(), v.contiguous(), None, causal)
    assert out.is_contiguous() and lse.is_contiguous()
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# limits where the approximation is exact
# ----------------------------------------------------------------------------------------------------------

LIMIT_CASES = [  # (B, Hq, Hkv, Nq, Nk, D, causal, padded)
    (2, 2, 2, 63, 63, 40, False, False),
    (1, 4, 2, 257, 257, 80, True, True),
    (2, 4, 1, 1000, 1000, 64, True, False),
    (1, 2, 2, 257, 1000, 128, False, True),
    (1, 2, 1, 1000, 300, 40, False, False),
    (2, 2, 1, 300, 1000, 64, True, True),  # causal bottom-right
]


@pytest.mark.parametrize("limit", ["block_size>=n", "min_seq_len>n"])
@pytest.mark.parametrize("case", LIMIT_CASES, ids=lambda c: f"n{c[3]}x{c[4]}-d{c[5]}-{'causal' if c[6] else 'full'}")
def test_limits_give_exact_attention(case, limit, make_qkv, call_delta):
    B, Hq, Hkv, Nq, Nk, D, causal, padded = case
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, F64, seed=D)
    key_valid = ones_value_mask(B, Nk, 2) if padded else None
    n = max(Nq, Nk)
    cfg = SMALL.replace(block_size=Nq) if limit == "block_size>=n" else SMALL.replace(min_seq_len=n + 1)
    out, lse = op(q, k, v, key_valid, causal, config=cfg)
    torch.testing.assert_close(out, exact(q, k, v, key_valid, causal), rtol=0, atol=1e-12)
    scores = (q @ k.repeat_interleave(Hq // Hkv, 1).transpose(-1, -2)) / math.sqrt(D)
    if causal:
        scores = scores.masked_fill(~torch.ones(Nq, Nk, dtype=torch.bool).tril(Nk - Nq), -math.inf)
    if padded:
        scores = scores.masked_fill(~key_valid[:, None, None, :], -math.inf)
    torch.testing.assert_close(lse, scores.logsumexp(-1), rtol=0, atol=1e-12)
    # with the small config as is, the same call is approximate: the limit is what made it exact
    approx, _ = op(q, k, v, key_valid, causal, config=SMALL)
    assert (approx - out).abs().max() > 0.01
    assert call_delta()["hyper"] == 1


@pytest.mark.parametrize("nq, nk", [(1000, 1000), (300, 1000)])
def test_causal_depth_zero_is_exact_causal_attention(nq, nk, make_qkv, call_delta):
    q, k, v = make_qkv(1, 4, 2, nq, nk, 40, F64)
    out, _ = op(q, k, v, None, True, config=SMALL.replace(causal_depth=0, min_seq_len=nq + 1))
    torch.testing.assert_close(out, exact(q, k, v, None, True), rtol=0, atol=1e-12)
    # depth 0 alone leaves the n_q < n_k prefix to non-causal HyperAttention
    out, _ = op(q, k, v, None, True, config=SMALL.replace(causal_depth=0))
    if nq == nk:
        torch.testing.assert_close(out, exact(q, k, v, None, True), rtol=0, atol=1e-12)
        assert call_delta()["hyper"] == 0
    else:
        assert (out - exact(q, k, v, None, True)).abs().max() > 0.01
        assert call_delta()["hyper"] == 1


@pytest.mark.parametrize("nq, nk", [(1, 1000), (31, 1000), (1000, 31)])
def test_fewer_than_min_seq_len_queries_or_keys_is_exact(nq, nk, make_qkv, call_delta):
    # decode (few queries, long KV cache; causal aligned bottom-right), or few keys
    q, k, v = make_qkv(2, 4, 2, nq, nk, 64, F64)
    valid = ones_value_mask(2, nk, 6)
    for causal in (False, True) if nq <= nk else (False,):
        out, _ = op(q, k, v, valid, causal)
        torch.testing.assert_close(out, exact(q, k, v, valid, causal), rtol=0, atol=1e-12)
    assert call_delta()["hyper"] == 0 and call_delta()["exact"] == (2 if nq <= nk else 1)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_limits_in_low_precision_are_as_accurate_as_sdpa(dtype, make_qkv):
    q, k, v = make_qkv(2, 4, 2, 257, 257, 64, dtype)
    for cfg in (SMALL.replace(block_size=257), SMALL.replace(min_seq_len=258)):
        for causal in (False, True):
            out = hyper_attention(q, k, v, is_causal=causal, enable_gqa=True, config=cfg)
            ref64 = exact(q.double(), k.double(), v.double(), None, causal)
            sdpa_err = (F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True) - ref64).abs()
            assert (out - ref64).abs().max() <= 2 * sdpa_err.max()


# ----------------------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------------------

GRADCHECK_CASES = [  # (B, Hq, Hkv, Nq, Nk, D, causal, padded)
    (1, 2, 2, 19, 19, 8, False, False),
    (1, 2, 2, 19, 19, 8, True, False),
    (1, 4, 2, 18, 18, 8, False, False),  # GQA
    (2, 2, 1, 19, 21, 8, False, True),  # key padding, n_q != n_k, ragged blocks
    (2, 2, 1, 13, 22, 8, True, True),  # causal bottom-right with key padding
    (1, 4, 2, 23, 23, 8, True, True),
]


def gradcheck_case(case, fast_mode, make_qkv, call_delta):
    B, Hq, Hkv, Nq, Nk, D, causal, padded = case
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, F64, seed=Nq, requires_grad=True)
    key_valid = ones_value_mask(B, Nk, 5) if padded else None

    def f(q, k, v):
        return op(q, k, v, key_valid, causal, config=TINY)[0]

    # the approximation is active at this size
    assert (f(q, k, v) - exact(q, k, v, key_valid, causal)).abs().max() > 0.01
    torch.manual_seed(0)  # fast mode draws its projections from the global generator
    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=fast_mode)
    delta = call_delta()
    assert delta["hyper"] > 0 and delta["exact"] == 0 and delta["backward"] > 0


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=str)
def test_gradcheck_fast_mode(case, make_qkv, call_delta):
    gradcheck_case(case, True, make_qkv, call_delta)


def test_gradcheck_full_jacobian(make_qkv, call_delta):
    gradcheck_case((1, 2, 1, 13, 15, 4, True, True), False, make_qkv, call_delta)


@pytest.mark.slow
@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=str)
def test_gradcheck_full_jacobian_slow(case, make_qkv, call_delta):
    gradcheck_case(case, False, make_qkv, call_delta)


def test_lse_carries_no_gradient(make_qkv):
    q, k, v = make_qkv(1, 2, 2, 63, 63, 16, F32, requires_grad=True)
    out, lse = op(q, k, v)
    assert out.requires_grad and not lse.requires_grad
    _, lse = hyper_attention(q, k, v, config=SMALL, return_lse=True)
    assert not lse.requires_grad


# ----------------------------------------------------------------------------------------------------------
# opcheck
# ----------------------------------------------------------------------------------------------------------

OPCHECK_CASES = [  # (dtype, transposed, causal, Hq, Hkv, Nq, Nk, padded)
    (F32, False, False, 4, 2, 40, 40, True),
    (F32, True, True, 4, 2, 40, 40, False),
    (F32, True, True, 2, 2, 24, 40, True),
    (BF16, False, True, 2, 2, 40, 40, True),
    (BF16, True, False, 4, 1, 40, 33, False),
]


@pytest.mark.parametrize(
    "case",
    OPCHECK_CASES,
    ids=lambda c: (
        f"{str(c[0])[6:]}-{'T' if c[1] else 'C'}-"
        f"{'causal' if c[2] else 'full'}-H{c[3]}/{c[4]}-n{c[5]}x{c[6]}{'-pad' if c[7] else ''}"
    ),
)
def test_opcheck(case, make_qkv, call_delta):
    dtype, transposed, causal, Hq, Hkv, Nq, Nk, padded = case
    q, k, v = make_qkv(2, Hq, Hkv, Nq, Nk, 16, dtype, transposed=transposed, requires_grad=True)
    assert q.is_contiguous() != transposed
    key_valid = ones_value_mask(2, Nk, 3) if padded else None
    cfg = HyperConfig.published(block_size=8, sample_size=8, min_seq_len=16)
    args = (q, k, v, key_valid, causal, None, OpSettings.of(cfg).encode())
    torch.library.opcheck(torch.ops.hyper.attention, args)
    assert call_delta()["hyper"] > 0 and call_delta()["backward"] > 0


def test_opcheck_backward_op(make_qkv):
    q, k, v = make_qkv(2, 4, 2, 40, 40, 16, F32, transposed=True)
    key_valid = ones_value_mask(2, 40, 4)
    cfg = HyperConfig.published(block_size=8, sample_size=8, min_seq_len=16)
    out, lse = op(q, k, v, key_valid, True, config=cfg)
    do = torch.randn_like(out)
    args = (do, [q, k, v, out, lse], key_valid, True, None, OpSettings.of(cfg).encode())
    torch.library.opcheck(torch.ops.hyper.attention_backward, args)


# ----------------------------------------------------------------------------------------------------------
# padding: v = 1 gives exactly 1, whatever the length
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True], ids=["nomask", "keypad"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "n, cfg",
    [(63, SMALL), (300, MID128), (1000, MID128), (4097, BIG)],
    ids=lambda x: str(x) if isinstance(x, int) else f"b{x.block_size}",
)
def test_value_ones_gives_ones(n, cfg, causal, padded, call_delta):
    B = 2
    g = torch.Generator().manual_seed(n)
    q, k = torch.randn(B, 2, n, 40, generator=g), torch.randn(B, 1, n, 40, generator=g)
    v = torch.ones(B, 1, n, 40)
    valid = None
    if padded:
        valid = ones_value_mask(B, n, n)
        v.transpose(1, 2)[~valid] = 0.0  # any leak of a masked key would pull the output below 1
    out, _ = op(q, k, v, valid, causal, config=cfg)
    assert call_delta()["hyper"] == 1
    torch.testing.assert_close(out, torch.ones_like(out), rtol=0, atol=16 * torch.finfo(F32).eps)


@pytest.mark.parametrize("dtype", [F64, BF16])
@pytest.mark.parametrize("nq, nk, causal", [(257, 1000, True), (1000, 257, False), (999, 1001, False)])
def test_value_ones_gives_ones_other_dtypes_and_ragged_lengths(dtype, nq, nk, causal, make_qkv):
    q, k, _ = make_qkv(1, 4, 2, nq, nk, 64, dtype, seed=nq)
    v = torch.ones(1, 2, nk, 64, dtype=dtype)
    valid = ones_value_mask(1, nk, 9)
    v.transpose(1, 2)[~valid] = 0.0
    out, _ = op(q, k, v, valid, causal, config=SMALL)
    atol = 0.0 if dtype == BF16 else 16 * torch.finfo(dtype).eps
    torch.testing.assert_close(out, torch.ones_like(out), rtol=0, atol=atol)


# ----------------------------------------------------------------------------------------------------------
# what must fall back to exact attention
# ----------------------------------------------------------------------------------------------------------


def _fallback_masks(B, H, Nq, Nk):
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(B, H, Nq, Nk, generator=g) < 0.8
    keep[..., 0] = True
    return {
        "float-B1NN": torch.randn(B, 1, Nq, Nk, generator=g),
        "float-keypad-shape": torch.zeros(B, 1, 1, Nk).masked_fill(~keep[:, :1, :1, :], -math.inf),
        "bool-NN": keep[0, 0],
        "bool-BHNN": keep,
        "bool-B1NN": keep[:, :1],
        "bool-BH1N": keep[:, :, :1],
    }


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", list(_fallback_masks(1, 1, 2, 2)))
def test_other_masks_give_exact_sdpa(name, causal, make_qkv, call_delta):
    B, H, N = 2, 2, 300
    q, k, v = make_qkv(B, H, H, N, N, 32, F32)
    mask = _fallback_masks(B, H, N, N)[name]
    out = hyper_attention(q, k, v, attn_mask=mask, is_causal=causal, config=SMALL)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert call_delta()["hyper"] == 0


def test_dropout_gives_exact_sdpa_with_dropout(make_qkv, call_delta):
    q, k, v = make_qkv(2, 4, 2, 300, 300, 32, F32)
    for causal in (False, True):
        torch.manual_seed(7)
        out = hyper_attention(q, k, v, dropout_p=0.3, is_causal=causal, enable_gqa=True, config=SMALL)
        torch.manual_seed(7)
        ref = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=causal, enable_gqa=True)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        assert not torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True))
    assert call_delta()["hyper"] == 0


def test_causal_with_more_queries_than_keys_is_exact_top_left(make_qkv, call_delta):
    q, k, v = make_qkv(1, 2, 2, 400, 300, 32, F32)
    out = hyper_attention(q, k, v, is_causal=True, config=SMALL)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert call_delta()["hyper"] == 0


def test_fallback_lse_is_the_lse_of_the_masked_scores(make_qkv):
    q, k, v = make_qkv(1, 2, 2, 300, 300, 32, F32)
    mask = _fallback_masks(1, 2, 300, 300)["bool-BHNN"]
    out, lse = hyper_attention(q, k, v, attn_mask=mask, config=SMALL, return_lse=True)
    s = (q.double() @ k.double().transpose(-1, -2) / math.sqrt(32)).masked_fill(~mask, -math.inf)
    assert lse.dtype == F32 and lse.shape == (1, 2, 300)
    torch.testing.assert_close(lse.double(), s.logsumexp(-1), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="dropout"):
        hyper_attention(q, k, v, dropout_p=0.1, config=SMALL, return_lse=True)


# ----------------------------------------------------------------------------------------------------------
# causality and masked keys: what must not influence the output
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nq, nk, cfg", [(1000, 1000, SMALL), (257, 1000, SMALL), (4097, 4097, BIG)], ids=["square", "bottom-right", "4097"]
)
def test_future_keys_do_not_change_past_rows(nq, nk, cfg, make_qkv):
    q, k, v = make_qkv(1, 4, 2, nq, nk, 40, F32)
    out, _ = op(q, k, v, None, True, config=cfg)
    t = nq // 3  # rows <= t see keys < t + 1 + (nk - nq)
    cut = t + 1 + nk - nq
    k2, v2 = k.clone(), v.clone()
    k2[:, :, cut:] = torch.randn_like(k2[:, :, cut:])
    v2[:, :, cut:] = torch.randn_like(v2[:, :, cut:])
    out2, _ = op(q, k2, v2, None, True, config=cfg)
    torch.testing.assert_close(out2[:, :, : t + 1], out[:, :, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(out2[:, :, t + 1 :], out[:, :, t + 1 :])


@pytest.mark.parametrize("causal", [False, True])
def test_masked_keys_do_not_change_the_output(causal, make_qkv):
    q, k, v = make_qkv(2, 4, 2, 1000, 1000, 40, F32)
    valid = ones_value_mask(2, 1000, 1)
    out, lse = op(q, k, v, valid, causal)
    k2, v2 = k.clone(), v.clone()
    k2.transpose(1, 2)[~valid] = 100.0  # huge scores, if a masked key were let in
    v2.transpose(1, 2)[~valid] = 1e4
    out2, lse2 = op(q, k2, v2, valid, causal)
    torch.testing.assert_close(out2, out, rtol=0, atol=1e-6)
    torch.testing.assert_close(lse2, lse, rtol=0, atol=1e-6)


def test_rows_without_any_key_give_zero(make_qkv):
    q, k, v = make_qkv(2, 2, 2, 300, 300, 32, F32)
    valid = torch.ones(2, 300, dtype=torch.bool)
    valid[1] = False  # batch 1 has no key at all
    valid[0, :3] = False  # causal rows 0..2 of batch 0 see no key
    for causal in (False, True):
        out, lse = op(q, k, v, valid, causal)
        assert torch.all(out[1] == 0) and torch.all(torch.isneginf(lse[1]))
        assert torch.isfinite(out).all()
        if causal:
            assert torch.all(out[0, :, :3] == 0) and torch.all(torch.isneginf(lse[0, :, :3]))
            assert torch.isfinite(lse[0, :, 3:]).all()


# ----------------------------------------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal, padded", [(False, False), (True, True)])
def test_same_seed_same_bits(causal, padded, make_qkv):
    q, k, v = make_qkv(2, 4, 2, 1000, 1000, 64, F32, requires_grad=True)
    valid = ones_value_mask(2, 1000, 0) if padded else None
    do = torch.randn(2, 4, 1000, 64)
    results = []
    for _ in range(2):
        qc, kc, vc = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
        out, lse = op(qc, kc, vc, valid, causal)
        out.backward(do)
        results.append((out.detach(), lse, qc.grad, kc.grad, vc.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    other, _ = op(q, k, v, valid, causal, config=SMALL.replace(seed=1))
    assert not torch.allclose(other, results[0][0])


def test_same_bits_on_any_thread_count(make_qkv):
    q, k, v = make_qkv(2, 4, 2, 1000, 1000, 64, F32)
    out1, lse1 = op(q, k, v, None, True)
    torch.set_num_threads(2)  # the one_thread fixture restores the count
    out2, lse2 = op(q, k, v, None, True)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)


# ----------------------------------------------------------------------------------------------------------
# public API contract
# ----------------------------------------------------------------------------------------------------------


def test_wrong_number_of_dims_raises():
    x4 = torch.randn(1, 2, 8, 16)
    for q, k, v in ((x4[0], x4, x4), (x4, x4[None], x4), (x4, x4, x4[0])):
        with pytest.raises(ValueError, match=r"\[B, H, N, D\]"):
            hyper_attention(q, k, v)


def test_gqa_needs_enable_gqa_and_a_multiple():
    q, kv = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="enable_gqa"):
        hyper_attention(q, kv, kv, config=SMALL)
    with pytest.raises(ValueError):
        hyper_attention(q, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16), enable_gqa=True, config=SMALL)
    out = hyper_attention(q, kv, kv, enable_gqa=True, config=SMALL)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True))


def test_op_rejects_bad_shapes():
    q = torch.randn(1, 4, 8, 16)
    with pytest.raises(ValueError, match="multiple"):
        op(q, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16))
    with pytest.raises(ValueError, match="n_q <= n_k"):
        op(q, q[:, :, :4], q[:, :, :4], None, True)


@pytest.mark.parametrize("dtype", [F32, BF16, F64])
def test_return_lse_shape_and_dtype(dtype, make_qkv):
    q, k, v = make_qkv(2, 4, 2, 300, 257, 40, dtype)
    out, lse = hyper_attention(q, k, v, enable_gqa=True, config=SMALL, return_lse=True)
    assert out.shape == (2, 4, 300, 40) and out.dtype == dtype
    assert lse.shape == (2, 4, 300)
    assert lse.dtype == (F64 if dtype == F64 else F32)
    assert torch.equal(out, hyper_attention(q, k, v, enable_gqa=True, config=SMALL))


def test_return_lse_dtype_does_not_depend_on_the_path(make_qkv):
    q, k, v = make_qkv(1, 2, 2, 50, 50, 16, F64)
    mask = torch.rand(50, 50) < 0.8
    _, lse_op = hyper_attention(q, k, v, config=SMALL, return_lse=True)
    _, lse_exact = hyper_attention(q, k, v, attn_mask=mask, config=SMALL, return_lse=True)
    assert lse_op.dtype == lse_exact.dtype


def test_every_query_with_valid_keys_attends_to_some_key(make_qkv):
    q, k, v = make_qkv(1, 1, 1, 1000, 257, 16, F32)
    out, lse = op(q, k, v, config=SMALL.replace(sample_size=0))
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("n, causal", [(300, False), (MIN_SEQ_LEN["topk"] + 1, False), (MIN_SEQ_LEN["topk"] + 1, True)])
def test_config_none_equals_the_default_config_without_a_tuning_entry(n, causal, make_qkv, monkeypatch, tmp_path):
    monkeypatch.setenv("HYPER_TUNE_CACHE", str(tmp_path / "no-such-cache.json"))
    q, k, v = make_qkv(1, 1, 1, n, n, 64, F32)  # one head: above topk's threshold a call is 65537 long
    implicit = hyper_attention(q, k, v, is_causal=causal)
    explicit = hyper_attention(q, k, v, is_causal=causal, config=HyperConfig())
    assert torch.equal(implicit, explicit)
    if n > HyperConfig().min_len and not causal:  # the defaults approximate here
        assert (explicit - F.scaled_dot_product_attention(q, k, v, is_causal=causal)).abs().max() > 0.01


def test_value_head_dim_may_differ_below_min_seq_len(make_qkv):
    q, k, v = make_qkv(1, 2, 2, 100, 100, 64, F32, Dv=32)
    for causal in (False, True):
        out = hyper_attention(q, k, v, is_causal=causal, config=SMALL.replace(min_seq_len=4096))
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal))


def test_value_head_dim_may_differ_with_the_approximation(make_qkv):
    from hyper_backend.kernels.reference import hyper_attention_reference

    q, k, v = make_qkv(1, 2, 2, 300, 300, 64, F64, Dv=32)
    q.requires_grad_(True)
    v.requires_grad_(True)
    out = hyper_attention(q, k, v, config=SMALL)
    out.sum().backward()  # the backward pads and slices the same way
    assert q.grad.shape == q.shape and v.grad.shape == v.shape

    q, k, v = make_qkv(1, 2, 2, 300, 300, 64, F64, Dv=32)
    for causal in (False, True):
        out = hyper_attention(q, k, v, is_causal=causal, config=SMALL)
        ref, _ = hyper_attention_reference(q, k, v, None, causal, config=SMALL)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------
# degenerate and inconsistent inputs: what SDPA returns or raises, never a crash or garbage
# ----------------------------------------------------------------------------------------------------------

DEGENERATE = [  # (q shape, k shape, Dv)
    ((1, 2, 0, 8), (1, 2, 5, 8), 8),  # no queries
    ((1, 2, 5, 8), (1, 2, 0, 8), 8),  # no keys: zeros
    ((1, 0, 5, 8), (1, 0, 5, 8), 8),  # no heads
    ((1, 2, 5, 0), (1, 2, 5, 0), 8),  # zero head dim: uniform attention
    ((0, 2, 5, 8), (0, 2, 5, 8), 8),  # empty batch
]


@pytest.mark.parametrize("shapes", DEGENERATE, ids=str)
@pytest.mark.parametrize("path", ["eager", "compiled"])
def test_empty_and_zero_sized_inputs_behave_as_sdpa(shapes, path):
    (qs, ks, dv) = shapes
    q, k = torch.randn(*qs, requires_grad=True), torch.randn(*ks, requires_grad=True)
    v = torch.randn(*ks[:3], dv, requires_grad=True)
    for causal in (False, True):
        if causal and q.shape[2] > k.shape[2]:
            continue
        if path == "eager":
            out = hyper_attention(q, k, v, is_causal=causal, config=SMALL)
        else:
            torch._dynamo.reset()
            fn = torch.compile(
                lambda q, k, v, causal=causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                backend="hyper",
                options={"min_seq_len": 1, "inner_backend": "aot_eager", "tune_cache": ""},
            )
            out = fn(q, k, v)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal and q.shape[2] == k.shape[2])
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        out.sum().backward()  # gradients exist and have the inputs' shapes
        assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
        q.grad = k.grad = v.grad = None
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (torch.randn(1, 4, 32, 16), torch.randn(1, 2, 32, 16), torch.randn(1, 1, 32, 16)), "heads"),
        (
            lambda: (torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16, device="meta"), torch.randn(1, 2, 32, 16)),
            "one device",
        ),
        (lambda: (torch.randn(2, 2, 32, 16), torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16)), "batch"),
        (lambda: (torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 16)), "head dim"),
        (lambda: (torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16), torch.randn(1, 2, 30, 16)), "length"),
        (lambda: (torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16).double(), torch.randn(1, 2, 32, 16)), "dtype"),
    ],
)
def test_inconsistent_inputs_raise_clear_errors(make, match):
    q, k, v = make()
    with pytest.raises(ValueError, match=match):
        hyper_attention(q, k, v, enable_gqa=True, config=SMALL)
    with pytest.raises(ValueError, match=match):
        torch.ops.hyper.attention(q, k, v, None, False, None, OpSettings.of(SMALL).encode())


@pytest.mark.parametrize("p", [-0.5, float("nan"), 1.5])
def test_dropout_outside_0_1_raises(p):
    q = torch.randn(1, 2, 64, 16)
    with pytest.raises(ValueError, match="dropout_p"):
        hyper_attention(q, q, q, dropout_p=p, config=SMALL)


def test_forward_mode_ad_raises_instead_of_a_zero_tangent():
    q = torch.randn(1, 1, 64, 8, dtype=F64)
    with pytest.raises(NotImplementedError, match="forward-mode"):
        torch.func.jvp(lambda x: hyper_attention(x, x, x, config=SMALL), (q,), (torch.ones_like(q),))
    from torch.autograd import forward_ad

    with forward_ad.dual_level(), pytest.raises(NotImplementedError, match="forward-mode"):
        hyper_attention(forward_ad.make_dual(q, torch.ones_like(q)), q, q, config=SMALL)


def test_oversized_settings_are_fitted_to_the_call():
    """A sample or block size far beyond the call (as a hostile tuning entry could hold) allocates O(n)."""
    from hyper_backend.kernels.op import fit

    p = fit(HyperConfig(block_size=2**31 - 1, sample_size=2**31 - 1, sink_keys=10**6, local_window=10**9), 64, 80)
    assert (p.block_size, p.sample_size, p.sink_keys, p.local_window) == (80, 80, 80, 160)
    q = torch.randn(1, 1, 64, 16)
    out = hyper_attention(q, q, q, config=HyperConfig(sample_size=2**31 - 1, min_seq_len=16, block_size=16))
    assert torch.isfinite(out).all()


def test_serial_bookkeeping_changes_no_bits_and_restores_the_thread_count(make_qkv, monkeypatch):
    """The CPU path's one-thread bookkeeping (HYPER_SERIAL_BOOKKEEPING) is a scheduling choice only."""
    q, k, v = make_qkv(1, 2, 1, 300, 300, 32, F32)
    cfg = SMALL.replace(sink_keys=2, local_window=16)
    before = torch.get_num_threads()
    outs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("HYPER_SERIAL_BOOKKEEPING", flag)
        outs.append(hyper_attention(q, k, v, is_causal=True, enable_gqa=True, config=cfg))
        assert torch.get_num_threads() == before
    assert torch.equal(outs[0], outs[1])
    monkeypatch.setenv("HYPER_SERIAL_BOOKKEEPING", "maybe")
    with pytest.raises(ValueError, match="HYPER_SERIAL_BOOKKEEPING"):
        hyper_attention(q, k, v, is_causal=True, enable_gqa=True, config=cfg)
    assert torch.get_num_threads() == before
