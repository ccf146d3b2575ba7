"""Fused RL kernels for PairGRPO: import one function into any RL loop.

    from pairuni_kernels import group_advantages, pair_weights, clipped_policy_loss

CUDA tensors run Triton kernels, CPU tensors the pure-torch reference
(`pairuni_kernels.reference`, the spec); `PAIRUNI_BACKEND=reference|triton` forces one.
"""

from .advantages import group_advantages, pair_weights
from .policy_loss import clipped_policy_loss
from .reference import PolicyLossOutput

__all__ = ["PolicyLossOutput", "clipped_policy_loss", "group_advantages", "pair_weights"]
__version__ = "0.1.0"
