# verl's GRPO advantage and PPO policy loss with the same signatures, on pairuni kernels: swap the import.
import numpy as np
import torch

from pairuni_kernels.integrations.verl import (
    compute_grpo_outcome_advantage,
    compute_policy_loss,
)

bs, T = 8, 16
response_mask = torch.ones(bs, T)
token_level_rewards = torch.zeros(bs, T)
token_level_rewards[:, -1] = torch.rand(bs)  # outcome reward on the last token
index = np.array(["uid-a"] * 4 + ["uid-b"] * 4, dtype=object)  # verl's per-response prompt uid

advantages, returns = compute_grpo_outcome_advantage(token_level_rewards, response_mask, index)
old_log_prob = -torch.rand(bs, T)
log_prob = (old_log_prob + 0.1 * torch.randn(bs, T)).requires_grad_()
pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower = compute_policy_loss(
    old_log_prob, log_prob, advantages, response_mask, cliprange=0.2, clip_ratio_c=3.0,
    loss_agg_mode="seq-mean-token-mean")
pg_loss.backward()
print("pg_loss", pg_loss.item(), "pg_clipfrac", pg_clipfrac.item(), "ppo_kl", ppo_kl.item())

# Inside verl's actor, register the drop-in and select it with actor.policy_loss.loss_mode=pairuni:
#   from verl.trainer.ppo.core_algos import register_policy_loss
#   from pairuni_kernels.integrations.verl import compute_policy_loss_vanilla
#   register_policy_loss("pairuni")(compute_policy_loss_vanilla)
