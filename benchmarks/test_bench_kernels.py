"""pytest-benchmark suite: `pytest benchmarks --benchmark-only` (GPU numbers need a CUDA device)."""

import pytest
import torch

from pairuni_kernels import clipped_policy_loss, group_advantages, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = {"reference": reference.clipped_policy_loss}
if DEVICE == "cuda":
    IMPLS["fused"] = clipped_policy_loss


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", [(64, 576), (512, 4096)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_policy_loss_fwd_bwd(benchmark, impl, shape):
    n, t = shape
    lp = (-torch.rand(n, t, device=DEVICE)).requires_grad_()
    old = lp.detach() + 0.1 * torch.randn(n, t, device=DEVICE)
    adv, mask = torch.randn(n, device=DEVICE), torch.rand(n, t, device=DEVICE) > 0.1

    def step():
        lp.grad = None
        IMPLS[impl](lp, old, adv, mask).loss.backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark(step)


@pytest.mark.parametrize("n", [4096, 1 << 20])
def test_group_advantages(benchmark, n):
    rewards = torch.rand(n, device=DEVICE)
    ids = torch.randperm(n, device=DEVICE) // 8
    fn = group_advantages if DEVICE == "cuda" else reference.group_advantages
    benchmark(lambda: fn(rewards, ids))
