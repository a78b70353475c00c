"""The plan: inverse-Gray bucket ranks, sortLSH locality, residual samples, block shapes, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from hyper_backend.kernels.draws import block_shape, inverse_gray, lsh_projections, lsh_rank, make_draws
from hyper_backend.kernels.plan import causal_depth_for

pytestmark = pytest.mark.usefixtures("one_thread")


def gray(b: torch.Tensor) -> torch.Tensor:
    return b ^ (b >> 1)


def popcount(x: torch.Tensor) -> torch.Tensor:
    count = torch.zeros_like(x)
    while bool((x > 0).any()):
        count += x & 1
        x = x >> 1
    return count


# ----------------------------------------------------------------------------------------------------------
# inverse Gray code
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 7, 10, 16])
def test_inverse_gray_inverts_the_gray_code(bits):
    b = torch.arange(2**bits, dtype=torch.int64)
    assert torch.equal(inverse_gray(gray(b), bits), b)
    assert torch.equal(gray(inverse_gray(b, bits)), b)  # a bijection on [0, 2**bits)


def test_inverse_gray_on_wide_codes():
    g = torch.Generator().manual_seed(0)
    b = torch.randint(0, 2**30, (1000,), generator=g)
    assert torch.equal(inverse_gray(gray(b), 30), b)


@pytest.mark.parametrize("bits", [2, 3, 7, 10])
def test_adjacent_ranks_differ_in_exactly_one_bit(bits):
    codes = torch.arange(2**bits, dtype=torch.int64)  # every sign pattern
    by_rank = codes[torch.argsort(inverse_gray(codes, bits))]
    assert torch.equal(inverse_gray(by_rank, bits), codes)  # rank r holds the pattern gray(r)
    assert torch.all(popcount(by_rank[1:] ^ by_rank[:-1]) == 1)


@pytest.mark.parametrize("bits", [3, 7])  # (for 2 bits the Gray code is its own inverse)
def test_ordering_by_the_plain_gray_code_would_fail_the_one_bit_property(bits):
    # The defect of the authors' code: it ranks patterns by gray(code). Check that our test can tell.
    codes = torch.arange(2**bits, dtype=torch.int64)
    by_wrong_rank = codes[torch.argsort(gray(codes))]
    assert not torch.all(popcount(by_wrong_rank[1:] ^ by_wrong_rank[:-1]) == 1)


def test_inverse_gray_does_not_modify_its_input():
    code = torch.tensor([5, 6, 7])
    inverse_gray(code, 3)
    assert code.tolist() == [5, 6, 7]


# ----------------------------------------------------------------------------------------------------------
# LSH ranks and sorting
# ----------------------------------------------------------------------------------------------------------


def test_lsh_rank_is_the_inverse_gray_of_the_sign_pattern():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 50, 16, generator=g)
    proj = lsh_projections(16, 5, seed=7, device="cpu")
    rank = lsh_rank(x, proj)
    bits = (x @ proj) > 0
    code = sum(bits[..., i].long() << i for i in range(5))
    assert rank.shape == (2, 3, 50) and rank.dtype == torch.int64
    assert torch.equal(rank, inverse_gray(code, 5))
    assert int(rank.min()) >= 0 and int(rank.max()) < 2**5


def test_lsh_rank_is_angular():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 32, generator=g)
    proj = lsh_projections(32, 7, seed=0, device="cpu")
    assert torch.equal(lsh_rank(x, proj), lsh_rank(x * 3.5, proj))
    assert torch.equal(lsh_rank(x, proj), lsh_rank(x.double(), proj))


def test_projections_are_seeded():
    a = lsh_projections(40, 7, seed=3, device="cpu")
    assert a.shape == (40, 7)
    assert torch.equal(a, lsh_projections(40, 7, seed=3, device="cpu"))
    assert not torch.equal(a, lsh_projections(40, 7, seed=4, device="cpu"))


def _near_pairs(n, d, noise, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g)
    near = (base + noise * base.norm(dim=-1, keepdim=True) / math.sqrt(d) * torch.randn(n, d, generator=g)) * 2.0
    return base, near


def test_near_parallel_vectors_share_buckets():
    base, near = _near_pairs(2000, 64, noise=0.02, seed=3)
    proj = lsh_projections(64, 7, seed=0, device="cpu")
    same = (lsh_rank(base, proj) == lsh_rank(near, proj)).float().mean().item()
    shuffled = (lsh_rank(base, proj) == lsh_rank(near.roll(1, 0), proj)).float().mean().item()
    # per hyperplane a pair at angle t splits with probability t/pi (t ~ 0.02 rad): ~95% stay together
    assert same > 0.9
    assert shuffled < 0.1  # unrelated vectors rarely share one of 128 buckets


def test_sorting_puts_near_parallel_keys_in_the_same_or_neighbouring_blocks():
    # 64 clusters of 8 near-parallel keys (about 0.03 rad apart); after sortLSH most clusters share a bucket,
    # so they sit in one block or straddle one block boundary.
    g = torch.Generator().manual_seed(4)
    centers = torch.randn(64, 32, generator=g)
    keys = (centers[:, None, :] + 0.03 * torch.randn(64, 8, 32, generator=g)).reshape(1, 1, 512, 32)
    plan = make_draws(keys, keys, None, block_size=32, sample_size=0, num_projs=7, seed=0)
    pos = torch.empty(512, dtype=torch.long)
    pos[plan.k_perm[0, 0]] = torch.arange(512)
    cluster_blocks = (pos // plan.k_block).view(64, 8)
    spread = cluster_blocks.max(1).values - cluster_blocks.min(1).values
    assert (spread <= 1).float().mean() > 0.75
    # a random order of the same points would scatter almost every cluster over several blocks
    rand_pos = torch.randperm(512, generator=g).view(64, 8) // plan.k_block
    assert ((rand_pos.max(1).values - rand_pos.min(1).values) <= 1).float().mean() < 0.05


def test_permutations_sort_by_rank_and_are_permutations():
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 4, 100, 16, generator=g), torch.randn(2, 2, 90, 16, generator=g)
    plan = make_draws(q, k, None, block_size=16, sample_size=8, num_projs=6, seed=9)
    proj = lsh_projections(16, 6, seed=9, device="cpu")
    for perm, x in ((plan.q_perm, q), (plan.k_perm, k)):
        assert torch.equal(perm.sort(-1).values, torch.arange(x.shape[2]).expand(perm.shape))
        ranks = torch.gather(lsh_rank(x, proj), 2, perm)
        assert torch.all(ranks[..., 1:] >= ranks[..., :-1])


# ----------------------------------------------------------------------------------------------------------
# samples
# ----------------------------------------------------------------------------------------------------------


def test_samples_never_include_masked_keys():
    g = torch.Generator().manual_seed(6)
    B, Hkv, N = 3, 2, 200
    q, k = torch.randn(B, 2 * Hkv, N, 16, generator=g), torch.randn(B, Hkv, N, 16, generator=g)
    valid = torch.rand(B, N, generator=g) < 0.3
    valid[2] = False
    valid[2, 17] = True  # a single valid key: every sample must be it
    seen = torch.zeros(B, N, dtype=torch.bool)
    for seed in range(50):
        plan = make_draws(q, k, valid, block_size=16, sample_size=32, num_projs=7, seed=seed)
        s = plan.samples
        assert s.shape == (B, Hkv, 32)
        assert torch.all(torch.gather(valid[:, None, :].expand(B, Hkv, N), 2, s))
        seen.scatter_(1, s.reshape(B, -1), True)
        assert torch.all(plan.samples[2] == 17)
    assert torch.equal(seen[:2], valid[:2])  # and every valid key does get drawn


def test_masked_keys_sort_last():
    g = torch.Generator().manual_seed(7)
    k = torch.randn(2, 2, 100, 16, generator=g)
    valid = torch.rand(2, 100, generator=g) < 0.6
    plan = make_draws(k, k, valid, block_size=16, sample_size=8, num_projs=7, seed=0)
    for b in range(2):
        nv = int(valid[b].sum())
        for h in range(2):
            assert torch.all(valid[b, plan.k_perm[b, h, :nv]])
            assert not torch.any(valid[b, plan.k_perm[b, h, nv:]])


def test_sample_blocks_and_log_weight():
    g = torch.Generator().manual_seed(8)
    q, k = torch.randn(2, 2, 257, 8, generator=g), torch.randn(2, 1, 300, 8, generator=g)
    valid = torch.ones(2, 300, dtype=torch.bool)
    valid[1, 250:] = False
    plan = make_draws(q, k, valid, block_size=16, sample_size=20, num_projs=5, seed=1)
    pos = torch.empty_like(plan.k_perm)
    pos.scatter_(-1, plan.k_perm, torch.arange(300).expand_as(plan.k_perm))
    assert torch.equal(plan.sample_block, torch.gather(pos, 2, plan.samples) // plan.k_block)
    assert torch.allclose(plan.log_weight, torch.log(torch.tensor([300 / 20, 250 / 20])))


def test_samples_are_uniform_over_valid_keys():
    g = torch.Generator().manual_seed(9)
    k = torch.randn(1, 1, 64, 8, generator=g)
    valid = torch.zeros(1, 64, dtype=torch.bool)
    valid[0, ::2] = True  # 32 valid keys
    counts = torch.zeros(64)
    draws = 0
    for seed in range(100):
        plan = make_draws(k, k, valid, block_size=8, sample_size=64, num_projs=4, seed=seed)
        counts += torch.bincount(plan.samples.reshape(-1), minlength=64).float()
        draws += plan.samples.numel()
    expected = draws / 32
    chi2 = (((counts[::2] - expected) ** 2) / expected).sum().item()
    assert counts[1::2].sum() == 0
    assert chi2 < 70  # 31 degrees of freedom: P(chi2 > 70) < 1e-4


def test_no_samples_with_one_block_or_zero_sample_size():
    k = torch.randn(1, 1, 40, 8)
    assert make_draws(k, k, None, block_size=64, sample_size=16, num_projs=3, seed=0).samples is None
    plan = make_draws(k, k, None, block_size=8, sample_size=0, num_projs=3, seed=0)
    assert plan.samples is None and plan.sample_block is None and plan.num_blocks == 5


# ----------------------------------------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------------------------------------


def _plan_tensors(plan):
    return [plan.q_perm, plan.k_perm, plan.samples, plan.sample_block, plan.log_weight]


def test_plan_is_a_deterministic_function_of_inputs_and_seed():
    g = torch.Generator().manual_seed(10)
    q, k = torch.randn(2, 4, 120, 16, generator=g), torch.randn(2, 2, 130, 16, generator=g)
    valid = torch.rand(2, 130, generator=g) < 0.8
    a = make_draws(q, k, valid, 16, 16, 7, seed=3)
    b = make_draws(q.clone(), k.clone(), valid.clone(), 16, 16, 7, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(_plan_tensors(a), _plan_tensors(b)))
    c = make_draws(q, k, valid, 16, 16, 7, seed=4)
    assert not torch.equal(a.q_perm, c.q_perm) and not torch.equal(a.samples, c.samples)
    d = make_draws(q, k, valid, 16, 16, 7, seed=3, stream=1)
    assert not torch.equal(a.samples, d.samples)


def test_plan_does_not_touch_the_global_rng():
    k = torch.randn(1, 1, 100, 8)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    make_draws(k, k, None, 16, 16, 7, seed=1)
    assert torch.equal(torch.rand(3), expected)


# ----------------------------------------------------------------------------------------------------------
# block shapes and causal depth
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nq, nk, bs",
    [
        (63, 63, 16),
        (257, 257, 16),
        (1000, 257, 16),
        (257, 1000, 64),
        (4097, 4097, 256),
        (10, 10, 16),
        (16, 16, 16),
        (17, 5, 16),
        (1000, 40, 16),
        (256000, 4097, 256),
        (4097, 256000, 256),
    ],
)
def test_block_shape_covers_both_sequences(nq, nk, bs):
    nb, qb, kb = block_shape(nq, nk, bs)
    assert nb == max(1, math.ceil(min(nq, nk) / bs))  # the shorter side sets the block count
    assert nb * qb >= nq and nb * kb >= nk
    assert (nb - 1) * kb < nk  # no key block is left empty
    if nq <= nk:
        assert (nb - 1) * qb < nq and qb == (bs if nb > 1 else nq)
    else:
        assert kb <= bs and qb == math.ceil(nq / nb)


@pytest.mark.parametrize(
    "n, msl, depth, expected",
    [
        (4096, 4096, None, 0),
        (4097, 4096, None, 1),
        (8192, 4096, None, 1),
        (8193, 4096, None, 2),
        (131072, 4096, None, 5),
        (1000, 32, None, 5),
        (1000, 32, 2, 2),
        (7, 1, None, 2),
        (5, 1, 10, 2),
        (1, 1, None, 0),
    ],
)
def test_causal_depth(n, msl, depth, expected):
    got = causal_depth_for(n, msl, depth)
    assert got == expected
    assert 2**got <= n
