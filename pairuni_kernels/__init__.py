"""Fused RL kernels for PairGRPO: import one function into any RL loop.

    from pairuni_kernels import group_advantages, pair_weights, clipped_policy_loss

CUDA tensors run Triton kernels, CPU tensors the pure-torch reference
(`pairuni_kernels.reference`, the spec); `PAIRUNI_BACKEND=reference|triton` forces one.
"""

from .advantages import group_advantages, multi_reward_advantages, pair_weights, token_returns_advantages
from .fused_linear_loss import fused_linear_policy_loss
from .linear_logprobs import linear_logprobs
from .policy_loss import clipped_policy_loss
from .reference import LOSS_TYPES, PolicyLossOutput, cov_token_selection
from .sampling import cfg_sample

__all__ = [
    "LOSS_TYPES", "PolicyLossOutput", "cfg_sample", "clipped_policy_loss", "cov_token_selection",
    "fused_linear_policy_loss", "group_advantages", "linear_logprobs", "multi_reward_advantages", "pair_weights",
    "token_returns_advantages",
]
__version__ = "0.1.0"
