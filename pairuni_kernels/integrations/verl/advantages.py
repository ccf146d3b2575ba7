"""verl 0.9.1's advantage estimators (`core_algos.compute_*_advantage*`, ADV_ESTIMATOR_REGISTRY) on pairuni ops.

Each function has verl's signature and returns verl's `(advantages, returns)`, both [bs, T] in the dtype of
`token_level_rewards`. The outcome estimators run on `group_advantages` (`estimator=` grpo / rloo / opo /
grpo_passk / reinforce_plus_plus_baseline), gdpo on `multi_reward_advantages(mode="gdpo")` and REINFORCE++ on
`token_returns_advantages` (Triton on CUDA, the reference on CPU); verl's per-estimator rules for a group of one
response are restored on top where the kernels differ (grpo: s / (1 + eps); rloo: s; rloo_vectorized: 0).
GAE, ReMax and the two optimal-token-baseline estimators have no kernel: they are re-implemented here in
plain torch (vectorised over groups where verl loops), as documented at each function.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ... import advantages as _adv
from ._common import config_value, masked_whiten, uids_to_group_ids


def _check(token_level_rewards, response_mask, index=None):
    if token_level_rewards.dim() != 2:
        raise ValueError(f"token_level_rewards: expected [bs, T], got shape {tuple(token_level_rewards.shape)}")
    if response_mask.shape != token_level_rewards.shape:
        raise ValueError(
            f"response_mask: expected shape {tuple(token_level_rewards.shape)}, got {tuple(response_mask.shape)}")
    if index is not None and len(index) != token_level_rewards.shape[0]:
        raise ValueError(f"index: expected {token_level_rewards.shape[0]} uids, got {len(index)}")


def _outcome(token_level_rewards, response_mask, index):
    """(scores [bs], group ids [bs], group size of each sample [bs])."""
    _check(token_level_rewards, response_mask, index)
    scores = token_level_rewards.sum(dim=-1)
    group_ids = uids_to_group_ids(index, device=scores.device)
    return scores, group_ids, torch.bincount(group_ids)[group_ids]


def _broadcast(adv: torch.Tensor, token_level_rewards, response_mask) -> tuple[torch.Tensor, torch.Tensor]:
    out = adv.to(token_level_rewards.dtype).unsqueeze(-1) * response_mask
    return out, out


# ----------------------------------------------------------------------------- GRPO family
def compute_grpo_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                   index: np.ndarray, epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True,
                                   config: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """verl "grpo": `(s - mean_g) / (std_g + epsilon)` (unbiased std) or `s - mean_g` (Dr.GRPO), by
    `group_advantages`.

    Args:
        token_level_rewards: [bs, T] float; a response's score is the sum over T.
        response_mask: [bs, T] 0/1 (or bool); the advantage is broadcast over it.
        index: [bs] uids (np.ndarray of str in verl); equal uids form one group.
        epsilon: added to the group std.
        norm_adv_by_std_in_grpo: True: GRPO; False: Dr.GRPO.
        config: accepted for signature compatibility and ignored, as in verl.
    Returns:
        (advantages, returns), both the same [bs, T] tensor `A[:, None] * response_mask`.

    A group with a single response gets verl's value `s / (1 + epsilon)` (or `s` unnormalised).
    """
    del config
    scores, group_ids, counts = _outcome(token_level_rewards, response_mask, index)
    with torch.no_grad():
        adv = _adv.group_advantages(scores, group_ids, eps=float(epsilon),
                                    scale="group" if norm_adv_by_std_in_grpo else "none")
        single = scores.to(adv.dtype) / (1.0 + epsilon) if norm_adv_by_std_in_grpo else scores.to(adv.dtype)
        adv = torch.where(counts == 1, single, adv)
    return _broadcast(adv, token_level_rewards, response_mask)


def compute_grpo_vectorized_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                              norm_adv_by_std_in_grpo=True, config=None):
    """verl "grpo_vectorized": the same advantage as "grpo" (verl computes its group statistics in float32;
    we compute them in float32 or, for float64 rewards, float64)."""
    return compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=epsilon,
                                          norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo, config=config)


def compute_grpo_passk_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                         norm_adv_by_std_in_grpo=True, config=None, **kwargs):
    """verl "grpo_passk": only each group's best response gets `r_max - r_second` (divided by the group's
    std + epsilon when config.norm_adv_by_std_in_grpo, default True: verl reads the config, not the argument),
    `group_advantages(estimator="grpo_passk")`. config is required and every group needs >= 2 responses."""
    del norm_adv_by_std_in_grpo, kwargs
    if config is None:
        raise ValueError("config: required for grpo_passk (verl reads norm_adv_by_std_in_grpo from it)")
    norm = config_value(config, "norm_adv_by_std_in_grpo", True)
    scores, group_ids, counts = _outcome(token_level_rewards, response_mask, index)
    if bool((counts < 2).any()):
        raise ValueError(f"index: Pass@k needs at least 2 responses per group, uid {index[int(counts.argmin())]!r} "
                         "has 1")
    with torch.no_grad():
        adv = _adv.group_advantages(scores, group_ids, eps=float(epsilon), scale="group" if norm else "none",
                                    estimator="grpo_passk")
    return _broadcast(adv, token_level_rewards, response_mask)


def compute_rloo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6, config=None, **kwargs):
    """verl "rloo": `s - mean of the others in the group` (= n/(n-1) (s - mean_g)),
    `group_advantages(estimator="rloo")`; a lone response keeps its score, as in verl."""
    del epsilon, config, kwargs
    scores, group_ids, counts = _outcome(token_level_rewards, response_mask, index)
    with torch.no_grad():
        adv = _adv.group_advantages(scores, group_ids, scale="none", estimator="rloo")
        adv = torch.where(counts == 1, scores.to(adv.dtype), adv)
    return _broadcast(adv, token_level_rewards, response_mask)


def compute_rloo_vectorized_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6, config=None,
                                              **kwargs):
    """verl "rloo_vectorized": as "rloo", but a lone response gets 0 (verl multiplies by `count > 1` here)."""
    del epsilon, config, kwargs
    scores, group_ids, counts = _outcome(token_level_rewards, response_mask, index)
    with torch.no_grad():
        adv = _adv.group_advantages(scores, group_ids, scale="none", estimator="rloo")
        adv = torch.where(counts == 1, torch.zeros_like(adv), adv)
    return _broadcast(adv, token_level_rewards, response_mask)


def compute_opo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6, config=None, **kwargs):
    """verl "opo": `s - sum_g(len * s) / sum_g(len)` with len = response_mask row sums,
    `group_advantages(estimator="opo", lengths=...)`; a lone response keeps its score."""
    del epsilon, config, kwargs
    scores, group_ids, counts = _outcome(token_level_rewards, response_mask, index)
    with torch.no_grad():
        lengths = response_mask.sum(dim=-1).to(scores.dtype)
        adv = _adv.group_advantages(scores, group_ids, scale="none", estimator="opo", lengths=lengths)
        adv = torch.where(counts == 1, scores.to(adv.dtype), adv)
    return _broadcast(adv, token_level_rewards, response_mask)


def compute_gpg_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6, f_norm=1.0, alpha=1.0,
                                  config=None, **kwargs):
    """verl "gpg": `alpha * (s - mean_g) / f_norm` with alpha = bs / max(#nonzero scores, 1) (verl recomputes
    alpha; the argument is ignored), `group_advantages(scale="none")`; a lone response keeps alpha * s / f_norm."""
    del epsilon, alpha, config, kwargs
    scores, group_ids, counts = _outcome(token_level_rewards, response_mask, index)
    with torch.no_grad():
        alpha_ = scores.shape[0] / torch.count_nonzero(scores).clamp(min=1)
        centred = _adv.group_advantages(scores, group_ids, scale="none")
        centred = torch.where(counts == 1, scores.to(centred.dtype), centred)
        adv = alpha_ * centred / f_norm
    return _broadcast(adv, token_level_rewards, response_mask)


def compute_reinforce_plus_plus_baseline_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                                           config=None, **kwargs):
    """verl "reinforce_plus_plus_baseline": `s - mean_g` (a lone response keeps s) on every response token,
    whitened over all response tokens of the batch (verl's masked_whiten) and masked:
    `group_advantages(estimator="reinforce_plus_plus_baseline", lengths=response lengths)`."""
    del epsilon, config, kwargs
    scores, group_ids, _ = _outcome(token_level_rewards, response_mask, index)
    with torch.no_grad():
        adv = _adv.group_advantages(scores, group_ids, estimator="reinforce_plus_plus_baseline",
                                    lengths=response_mask.sum(dim=-1).to(scores.dtype))
    return _broadcast(adv, token_level_rewards, response_mask)


def compute_gdpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                   norm_adv_by_std_in_grpo=True, config=None, non_tensor_batch=None, batch=None,
                                   **kwargs):
    """verl "gdpo": each reward component GRPO-normalised within its group, summed with
    config.gdpo_reward_weights (default 1 each), then whitened over the response tokens and masked.

    With config, non_tensor_batch and batch given, the components are `non_tensor_batch[key]` ([bs] each) for
    key in config.gdpo_reward_keys (required then); otherwise the single component is token_level_rewards'
    row sum, as in verl. Computed by `multi_reward_advantages(mode="gdpo")` ([bs, K] components, verl's lone-
    response rule, whitening weighted by the response lengths).
    """
    del kwargs
    _check(token_level_rewards, response_mask, index)
    components = None
    weights = None
    if config is not None and non_tensor_batch is not None and batch is not None:
        keys = config_value(config, "gdpo_reward_keys", None)
        if not keys:
            raise ValueError("config.gdpo_reward_keys: GDPO needs the reward component keys (e.g. ['format', 'acc'])")
        missing = [k for k in keys if k not in non_tensor_batch]
        if missing:
            raise ValueError(f"non_tensor_batch: GDPO reward key {missing[0]!r} not found, "
                             f"have {list(non_tensor_batch)}")
        components = [torch.tensor(np.asarray(non_tensor_batch[k], dtype=np.float32),
                                   device=token_level_rewards.device)[:, None] for k in keys]  # verl: float32
        gdpo_weights = config_value(config, "gdpo_reward_weights", None)
        weights = list(gdpo_weights) if gdpo_weights is not None else None
    if components is None:
        components = [token_level_rewards.sum(dim=-1, keepdim=True)]
    if weights is None:
        weights = [1.0] * len(components)
    if len(weights) != len(components):
        raise ValueError(f"config.gdpo_reward_weights: expected {len(components)} weights, got {len(weights)}")
    rewards = torch.cat(components, dim=-1)
    group_ids = uids_to_group_ids(index, device=rewards.device)
    with torch.no_grad():
        adv = _adv.multi_reward_advantages(rewards, group_ids, [float(w) for w in weights], mode="gdpo",
                                           eps=float(epsilon), scale="group" if norm_adv_by_std_in_grpo else "none",
                                           lengths=response_mask.sum(dim=-1).to(rewards.dtype))
    out = adv.to(rewards.dtype).unsqueeze(-1) * response_mask
    return out, out


# ----------------------------------------------------------------------------- token-level estimators
def compute_reinforce_plus_plus_outcome_advantage(token_level_rewards, response_mask, config=None, **kwargs):
    """verl "reinforce_plus_plus": discounted returns `G_t = r_t + gamma G_next` over the response tokens (a masked
    observation token passes G_next through and gets 0) with gamma = config.gamma (config required), whitened over
    the response tokens and masked: `token_returns_advantages(..., return_returns=True)` -> (advantages, returns)."""
    del kwargs
    if config is None:
        raise ValueError("config: required for reinforce_plus_plus (verl reads gamma from it)")
    _check(token_level_rewards, response_mask)
    gamma = config_value(config, "gamma", None)
    if gamma is None:
        raise ValueError("config.gamma: required for reinforce_plus_plus")
    with torch.no_grad():
        adv, returns = _adv.token_returns_advantages(token_level_rewards, response_mask, gamma=float(gamma),
                                                     return_returns=True)
        adv = adv.to(token_level_rewards.dtype) * response_mask
    return adv, returns.to(token_level_rewards.dtype)


def compute_gae_advantage_return(token_level_rewards: torch.Tensor, values: torch.Tensor,
                                 response_mask: torch.Tensor, gamma, lam) -> tuple[torch.Tensor, torch.Tensor]:
    """verl "gae", plain torch: `delta_t = r_t + gamma V_next - V_t`, `A_t = delta_t + gamma lam A_next`,
    masked tokens passing V_next and A_next through unchanged; returns = A + V; advantages whitened over the
    response tokens (`masked_whiten`; masked entries are shifted too, not zeroed, as in verl). [bs, T] each."""
    _check(token_level_rewards, response_mask)
    if values.shape != token_level_rewards.shape:
        raise ValueError(f"values: expected shape {tuple(token_level_rewards.shape)}, got {tuple(values.shape)}")
    with torch.no_grad():
        adv = torch.zeros_like(token_level_rewards)
        next_value = torch.zeros_like(values[:, 0])
        next_adv = torch.zeros_like(values[:, 0])
        for t in range(token_level_rewards.shape[1] - 1, -1, -1):
            m = response_mask[:, t]
            step = token_level_rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * next_adv
            next_value = values[:, t] * m + (1 - m) * next_value
            next_adv = step * m + (1 - m) * next_adv
            adv[:, t] = next_adv
        returns = adv + values
        adv = masked_whiten(adv, response_mask)
    return adv, returns


def compute_remax_outcome_advantage(token_level_rewards, reward_baselines, response_mask, config=None, **kwargs):
    """verl "remax", plain torch: returns = reverse cumulative sum of the masked rewards,
    advantages = returns - reward_baselines ([bs], the greedy response's reward) on the response tokens."""
    del config, kwargs
    _check(token_level_rewards, response_mask)
    if reward_baselines.shape != token_level_rewards.shape[:1]:
        raise ValueError(f"reward_baselines: expected shape ({token_level_rewards.shape[0]},), "
                         f"got {tuple(reward_baselines.shape)}")
    with torch.no_grad():
        returns = (token_level_rewards * response_mask).flip(-1).cumsum(-1).flip(-1)
        adv = returns - reward_baselines.unsqueeze(-1) * response_mask
    return adv, returns


def _otb_baseline(returns, weights, group_ids, counts, lengths, epsilon, handle_zero_tail):
    """Per-position optimal baseline `sum_g(G W) / (sum_g(W) + eps)` for groups of >= 2 (0 for a lone one);
    with handle_zero_tail, a group's unique longest row gets 0 from the second-longest length on.
    returns, weights: [bs, L] (already masked); group_ids, counts, lengths: [bs]."""
    n_groups = int(group_ids.max()) + 1
    num = returns.new_zeros((n_groups, returns.shape[1])).index_add_(0, group_ids, returns * weights)
    den = returns.new_zeros((n_groups, returns.shape[1])).index_add_(0, group_ids, weights)
    baseline = (num / (den + epsilon))[group_ids].to(returns.dtype)
    baseline = torch.where((counts > 1)[:, None], baseline, torch.zeros_like(baseline))
    if handle_zero_tail:
        longest = torch.full((n_groups,), -1, dtype=lengths.dtype, device=lengths.device)
        longest = longest.scatter_reduce(0, group_ids, lengths, reduce="amax")
        at_max = lengths == longest[group_ids]
        n_at_max = torch.zeros_like(longest).index_add_(0, group_ids, at_max.to(lengths.dtype))
        others = torch.where(at_max, torch.full_like(lengths, -1), lengths)
        second = torch.full_like(longest, -1).scatter_reduce(0, group_ids, others, reduce="amax")
        tail_row = at_max & (n_at_max[group_ids] == 1) & (counts > 1)
        pos = torch.arange(returns.shape[1], device=returns.device)
        tail = tail_row[:, None] & (pos[None, :] >= second[group_ids][:, None])
        baseline = torch.where(tail, torch.zeros_like(baseline), baseline)
    return baseline


def _otb_inputs(token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared, rollout_is_weights):
    _check(token_level_rewards, response_mask, index)
    for name, x in (("old_log_probs", old_log_probs), ("sum_pi_squared", sum_pi_squared)):
        if x.shape != token_level_rewards.shape:
            raise ValueError(f"{name}: expected shape {tuple(token_level_rewards.shape)}, got {tuple(x.shape)}")
    returns = (token_level_rewards * response_mask).flip(-1).cumsum(-1).flip(-1)
    w = 1 - 2 * torch.exp(old_log_probs) + sum_pi_squared
    if rollout_is_weights is not None:
        w = w * rollout_is_weights**2
    return returns, (w * response_mask).cumsum(-1)


def compute_optimal_token_baseline_advantage(token_level_rewards, response_mask, index, old_log_probs,
                                             sum_pi_squared, rollout_is_weights=None, handle_zero_tail=True,
                                             epsilon=1e-8, **kwargs):
    """verl "optimal_token_baseline", plain torch (vectorised over groups): G_t = reward-to-go,
    W_t = cumsum of `(1 - 2 pi_t + sum pi^2) * rho_t^2 * mask`, baseline B_t = sum_g(G_t W_t m_t) /
    (sum_g(W_t m_t) + epsilon) per group and position (none for a lone response), A = (G - B) * mask.
    Returns (advantages, G). All tensors [bs, T]; index [bs]."""
    del kwargs
    with torch.no_grad():
        returns, w_cum = _otb_inputs(token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared,
                                     rollout_is_weights)
        group_ids = uids_to_group_ids(index, device=returns.device)
        counts = torch.bincount(group_ids)[group_ids]
        lengths = response_mask.sum(-1).to(torch.int64)
        baseline = _otb_baseline(returns * response_mask, w_cum * response_mask, group_ids, counts, lengths,
                                 epsilon, handle_zero_tail)
        adv = (returns - baseline) * response_mask
    return adv, returns


def compute_multi_turn_optimal_token_baseline_advantage(token_level_rewards, response_mask, index, old_log_probs,
                                                        sum_pi_squared, rollout_is_weights=None,
                                                        handle_zero_tail=True, epsilon=1e-8, **kwargs):
    """verl "tir_optimal_token_baseline", plain torch: as "optimal_token_baseline", but positions are counted
    in response tokens (each row's masked tokens packed to the front, so interleaved tool outputs do not
    shift the alignment) and empty rows are left out of their group. Returns (advantages, G), [bs, T]."""
    del kwargs
    with torch.no_grad():
        returns, w_cum = _otb_inputs(token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared,
                                     rollout_is_weights)
        valid = response_mask.bool()
        lengths = valid.sum(-1)
        width = int(lengths.max()) if lengths.numel() else 0
        slot = (valid.cumsum(-1) - 1).clamp(min=0)  # packed position of each response token
        rows = torch.arange(returns.shape[0], device=returns.device)[:, None].expand_as(slot)
        packed_w = w_cum.new_zeros((returns.shape[0], width))
        packed_g = returns.new_zeros((returns.shape[0], width))
        packed_w[rows[valid], slot[valid]] = w_cum[valid]
        packed_g[rows[valid], slot[valid]] = returns[valid]
        group_ids = uids_to_group_ids(index, device=returns.device)
        nonempty = lengths > 0
        counts = torch.zeros_like(group_ids).index_add_(0, group_ids, nonempty.to(group_ids.dtype))[group_ids]
        baseline = (_otb_baseline(packed_g, packed_w, group_ids, counts, lengths, epsilon, handle_zero_tail)
                    if width else packed_g)
        adv = torch.zeros_like(returns)
        adv[valid] = returns[valid] - baseline[rows[valid], slot[valid]]
        adv = adv * response_mask
    return adv, returns


#: verl's adv_estimator names (AdvantageEstimator values, 0.9.1) -> the drop-ins.
ADVANTAGE_ESTIMATORS = {
    "gae": compute_gae_advantage_return,
    "grpo": compute_grpo_outcome_advantage,
    "grpo_vectorized": compute_grpo_vectorized_outcome_advantage,
    "gdpo": compute_gdpo_outcome_advantage,
    "grpo_passk": compute_grpo_passk_outcome_advantage,
    "reinforce_plus_plus_baseline": compute_reinforce_plus_plus_baseline_outcome_advantage,
    "rloo": compute_rloo_outcome_advantage,
    "opo": compute_opo_outcome_advantage,
    "reinforce_plus_plus": compute_reinforce_plus_plus_outcome_advantage,
    "remax": compute_remax_outcome_advantage,
    "gpg": compute_gpg_outcome_advantage,
    "rloo_vectorized": compute_rloo_vectorized_outcome_advantage,
    "optimal_token_baseline": compute_optimal_token_baseline_advantage,
    "tir_optimal_token_baseline": compute_multi_turn_optimal_token_baseline_advantage,
}
