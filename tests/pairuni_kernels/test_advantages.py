"""group_advantages / pair_weights: the reference against hand-computed values, the Triton
kernels (interpreted on CPU) against the reference in float64, edge cases and bad inputs."""

import math

import pytest
import torch

from pairuni_kernels import group_advantages, pair_weights, reference
from pairuni_kernels.advantages import segment_groups


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


# ----------------------------------------------------------------------------- reference = formula
def test_reference_matches_hand_computation():
    r = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.5, 7.0], dtype=torch.float64)
    ids = torch.tensor([3, 3, 3, -1, -1, 9])
    adv = reference.group_advantages(r, ids)
    mean, std = 2 / 3, math.sqrt(((1 / 3) ** 2 * 2 + (2 / 3) ** 2) / 2)  # unbiased std of [1, 0, 1]
    expect = [(1 - mean) / (std + 1e-6), (0 - mean) / (std + 1e-6), (1 - mean) / (std + 1e-6), 0.0, 0.0, 0.0]
    torch.testing.assert_close(adv, torch.tensor(expect, dtype=torch.float64))
    torch.testing.assert_close(reference.group_advantages(r, ids, scale="none"),
                               torch.tensor([1 / 3, -2 / 3, 1 / 3, 0, 0, 0], dtype=torch.float64))
    batch = reference.group_advantages(r, ids, scale="batch")
    torch.testing.assert_close(batch, reference.group_advantages(r, ids, scale="none") / (r.std() + 1e-6))


def test_reference_pair_weights_formula():
    s = torch.tensor([0.36, 0.36, -0.2, 1.7, 0.81])
    aligned = torch.tensor([True, False, False, False, False])
    torch.testing.assert_close(reference.pair_weights(s, aligned), torch.tensor([1.0, 0.6, 0.0, 1.0, 0.9]))
    linear = reference.pair_weights(s, aligned, weighting="linear")
    torch.testing.assert_close(linear, torch.tensor([1.0, 0.36, 0.0, 1.0, 0.81]))


# ----------------------------------------------------------------------------- Triton vs reference
@pytest.mark.parametrize("n,n_groups", [(1, 1), (3, 2), (37, 5), (1029, 300), (4000, 3)])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_triton_matches_reference(triton_backend, gen, n, n_groups, scale, device):
    r = torch.randn(n, generator=gen) * 2 + 5  # offset: a one-pass variance would lose digits
    ids = torch.randint(-50, 50, (n_groups,), generator=gen)[torch.randint(0, n_groups, (n,), generator=gen)]
    w = torch.rand(n, generator=gen) + 0.1
    r, ids, w = r.to(device), ids.to(device), w.to(device)
    out = group_advantages(r, ids, weights=w, scale=scale)
    expect = reference.group_advantages(r.double(), ids, weights=w.double(), scale=scale)
    assert out.dtype == torch.float32
    assert _rel_err(out, expect) < 1e-5 or (expect.abs().max() == 0 and out.abs().max() == 0)


def test_triton_large_group_and_unsorted_ids(triton_backend, gen, device):
    # one group much longer than the kernel tile, many tiny ones, ids interleaved at random
    ids = torch.cat([torch.zeros(3000, dtype=torch.long), torch.arange(1, 501).repeat_interleave(4)])
    perm = torch.randperm(ids.numel(), generator=gen)
    ids = ids[perm]
    r = torch.rand(ids.numel(), generator=gen)
    r, ids = r.to(device), ids.to(device)
    out = group_advantages(r, ids)
    expect = reference.group_advantages(r.double(), ids)
    assert _rel_err(out, expect) < 1e-5
    # permuting the inputs permutes the outputs
    p2 = torch.randperm(ids.numel(), generator=gen).to(device)
    torch.testing.assert_close(group_advantages(r[p2], ids[p2]), out[p2], rtol=1e-5, atol=1e-5)  # fp32 sum order differs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision_rewards(triton_backend, gen, dtype, device):
    r = torch.rand(64, generator=gen).to(device=device, dtype=dtype)
    ids = torch.arange(64, device=device) // 8
    out = group_advantages(r, ids)
    expect = reference.group_advantages(r.double(), ids)  # same rounded inputs, float64 math
    assert _rel_err(out, expect) < 1e-5


@pytest.mark.parametrize("weighting", reference.PAIR_WEIGHTINGS)
def test_triton_pair_weights(triton_backend, gen, device, weighting):
    s = (torch.rand(1000, generator=gen) * 1.6 - 0.3).to(device)
    aligned = (torch.rand(1000, generator=gen) > 0.5).to(device)
    torch.testing.assert_close(pair_weights(s, aligned, weighting=weighting),
                               reference.pair_weights(s.double(), aligned, weighting).float())


def test_segment_groups_bounds(gen):
    ids = torch.tensor([5, 2, 5, 9, 2, 2])
    perm, seg_start = segment_groups(ids)
    assert seg_start.tolist() == [0, 3, 5, 6, 6, 6, 6]
    assert ids[perm].tolist() == [2, 2, 2, 5, 5, 9]


# ----------------------------------------------------------------------------- edges and bad inputs
@pytest.mark.parametrize("backend", ["reference_backend", "triton_backend"])
def test_group_of_one_is_zero(request, backend, device):
    request.getfixturevalue(backend)
    out = group_advantages(torch.tensor([3.0, 1.0, 2.0], device=device), torch.tensor([0, 1, 1], device=device))
    assert out[0].item() == 0.0 and out[1].item() < 0 < out[2].item()


@pytest.mark.parametrize("backend", ["reference_backend", "triton_backend"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_reward_names_group(request, backend, bad, device):
    request.getfixturevalue(backend)
    r = torch.tensor([0.0, 1.0, bad, 0.5], device=device)
    with pytest.raises(ValueError, match="group 42"):
        group_advantages(r, torch.tensor([7, 7, 42, 42], device=device))


@pytest.mark.parametrize("kwargs,match", [
    (dict(rewards=torch.ones(3, 1), group_ids=torch.zeros(3, dtype=torch.long)), "rewards"),
    (dict(rewards=torch.ones(3), group_ids=torch.zeros(4, dtype=torch.long)), "group_ids"),
    (dict(rewards=torch.ones(3), group_ids=torch.zeros(3)), "group_ids"),
    (dict(rewards=torch.ones(3, dtype=torch.long), group_ids=torch.zeros(3, dtype=torch.long)), "rewards"),
    (dict(rewards=torch.ones(3), group_ids=torch.zeros(3, dtype=torch.long), weights=torch.ones(2)), "weights"),
    (dict(rewards=torch.ones(3), group_ids=torch.zeros(3, dtype=torch.long, device="meta")), "group_ids"),
    (dict(rewards=torch.ones(3), group_ids=torch.zeros(3, dtype=torch.long), scale="std"), "scale"),
    (dict(rewards=torch.ones(3), group_ids=torch.zeros(3, dtype=torch.long), eps=-1.0), "eps"),
])
def test_bad_advantage_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(**kwargs)


def test_bad_pair_weight_inputs():
    with pytest.raises(ValueError, match="aligned"):
        pair_weights(torch.rand(3), torch.ones(3))
    with pytest.raises(ValueError, match="aligned"):
        pair_weights(torch.rand(3), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="similarity"):
        pair_weights(torch.tensor([0.5, float("nan")]), torch.tensor([False, False]))
    with pytest.raises(ValueError, match="weighting"):
        pair_weights(torch.rand(3), torch.ones(3, dtype=torch.bool), weighting="cubic")
    # a NaN similarity is fine on an aligned pair (its similarity is not used)
    assert pair_weights(torch.tensor([float("nan")]), torch.tensor([True])).item() == 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_millions_of_rewards():
    n = 5_000_000
    r = torch.rand(n, device="cuda")
    ids = torch.randperm(n, device="cuda") // 8
    w = torch.rand(n, device="cuda")
    out = group_advantages(r, ids, weights=w)
    assert _rel_err(out, reference.group_advantages(r.double(), ids, weights=w.double())) < 1e-5


@pytest.mark.parametrize("backend", ["reference_backend", "triton_backend"])
def test_explicit_grpo_estimator_is_the_default(request, backend, gen, device):
    """estimator="grpo" (lengths given or not) is today's default path, bit for bit."""
    request.getfixturevalue(backend)
    r = (torch.randn(40, generator=gen) * 3 + 1).to(device)
    ids = torch.randint(0, 9, (40,), generator=gen).to(device)
    w = torch.rand(40, generator=gen).to(device)
    for scale in reference.ADVANTAGE_SCALES:
        default = group_advantages(r, ids, weights=w, scale=scale)
        assert torch.equal(group_advantages(r, ids, weights=w, scale=scale, estimator="grpo"), default)
        assert torch.equal(group_advantages(r, ids, weights=w, scale=scale, estimator="grpo",
                                            lengths=torch.ones(40, device=device)), default)
