"""verl drop-ins: `compute_grpo_outcome_advantage` and `compute_policy_loss` on pairuni kernels.

A verl user swaps one import and keeps every call site:

    # from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, compute_policy_loss
    from pairuni_kernels.integrations.verl import compute_grpo_outcome_advantage, compute_policy_loss

or registers the loss under a name of their own for verl's actor (`actor.policy_loss.loss_mode`):

    from verl.trainer.ppo.core_algos import register_policy_loss
    from pairuni_kernels.integrations.verl import compute_policy_loss_vanilla
    register_policy_loss("pairuni")(compute_policy_loss_vanilla)

Signatures, defaults, return values and loss aggregation follow verl 0.9.1 (the PyPI release,
`verl/trainer/ppo/core_algos.py`; its policy loss and GRPO advantage equal those at GitHub commit
b178a3cd, its `agg_loss` is newer: "token-sum" exists and "seq-mean-token-sum-norm" is
S / (rows * T), no longer S / T). verl itself is never imported here. The advantage runs
`group_advantages`, the loss `clipped_policy_loss` (Triton on CUDA, the reference on CPU); the few
metrics verl reports (`pg_clipfrac`, `ppo_kl`, `pg_clipfrac_lower`; our kernel's clip_fraction is
their sum, on the weighted advantages) come from one elementwise pass over [bs, T] under `no_grad`
(no autograd graph, nothing saved).

Known departures from verl, all in corner cases:
  * a fully masked batch gives loss 0 with zero gradient (verl divides 0 by 0 in "token-mean");
  * verl divides row sums by `count + 1e-8` in "seq-mean-token-mean" and its metrics by
    `mask.sum() + 1e-8`; we divide by the exact count (relative difference ~1e-8 / count);
  * verl computes in the input dtype; we compute in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..advantages import group_advantages
from ..policy_loss import clipped_policy_loss
from ..reference import LOG_RATIO_CLAMP

__all__ = [
    "compute_grpo_outcome_advantage", "compute_policy_loss", "compute_policy_loss_vanilla", "uids_to_group_ids",
]


def uids_to_group_ids(index: np.ndarray | Sequence[Any], device: torch.device | str | None = None) -> torch.Tensor:
    """Map verl's per-sample uid array (usually uuid strings, any hashable values) to int64 group ids.

    Ids are numbered in order of first appearance, so equal uids share an id wherever they sit.
    Returns a [bs] int64 tensor on `device`.
    """
    values = index.tolist() if isinstance(index, np.ndarray) else list(index)
    first_seen: dict[Any, int] = {}
    ids = [first_seen.setdefault(v, len(first_seen)) for v in values]
    return torch.tensor(ids, dtype=torch.int64, device=device)


def compute_grpo_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                   index: np.ndarray, epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True,
                                   config: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's GRPO outcome advantage, computed by `group_advantages`.

    Args:
        token_level_rewards: [bs, T] float; a response's score is the sum over T.
        response_mask: [bs, T] 0/1 (or bool); the advantage is broadcast over it.
        index: [bs] uids (np.ndarray of str in verl); equal uids form one group.
        epsilon: added to the group std.
        norm_adv_by_std_in_grpo: True: `(s - mean_g) / (std_g + epsilon)` (unbiased std, GRPO);
            False: `s - mean_g` (Dr.GRPO).
        config: accepted for signature compatibility and ignored, as in verl.
    Returns:
        (advantages, returns), both the same [bs, T] tensor `A[:, None] * response_mask`, in the
        dtype of `token_level_rewards`.

    A group with a single response gets verl's value, not `group_advantages`'s 0: verl uses mean 0
    and std 1 for such a group, so its advantage is `s / (1 + epsilon)` (or `s` unnormalised).
    """
    del config
    if token_level_rewards.dim() != 2:
        raise ValueError(f"token_level_rewards: expected [bs, T], got shape {tuple(token_level_rewards.shape)}")
    if response_mask.shape != token_level_rewards.shape:
        raise ValueError(
            f"response_mask: expected shape {tuple(token_level_rewards.shape)}, got {tuple(response_mask.shape)}"
        )
    if len(index) != token_level_rewards.shape[0]:
        raise ValueError(f"index: expected {token_level_rewards.shape[0]} uids, got {len(index)}")
    scores = token_level_rewards.sum(dim=-1)
    group_ids = uids_to_group_ids(index, device=scores.device)
    scale = "group" if norm_adv_by_std_in_grpo else "none"
    with torch.no_grad():
        adv = group_advantages(scores, group_ids, eps=float(epsilon), scale=scale)
        counts = torch.bincount(group_ids)[group_ids]
        singleton = scores.to(adv.dtype) / (1.0 + epsilon) if norm_adv_by_std_in_grpo else scores.to(adv.dtype)
        adv = torch.where(counts == 1, singleton, adv)
        advantages = adv.to(token_level_rewards.dtype).unsqueeze(-1) * response_mask
    return advantages, advantages


def _config_value(config: Any, name: str, default: Any) -> Any:
    """Read `name` from verl's ActorConfig (attributes), an OmegaConf DictConfig or a plain dict."""
    if config is None:
        return default
    if isinstance(config, Mapping):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    return default if value is None else value


def _verl_metrics(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, clip_ratio_c):
    """(pg_clipfrac, ppo_kl, pg_clipfrac_lower) as verl defines them, in one no-grad elementwise pass.

    With r = exp(clamp(logp - old, -20, 20)) and masked means over the response tokens:
    pg_clipfrac = share where the PPO-clipped branch is larger (A > 0 and r > 1 + eps_high, or A < 0
    and r < 1 - eps_low); ppo_kl = mean of `old - logp`; pg_clipfrac_lower = share where the dual
    clip is active: for A < 0 the clipped loss is -A * max(r, 1 - eps_low), which exceeds -A * c
    exactly when r > c (c > 1 > 1 - eps_low). The metrics use the unweighted advantages, as verl's do.
    """
    with torch.no_grad():
        valid = response_mask != 0
        dt = torch.promote_types(log_prob.dtype, torch.float32)
        zero = torch.zeros((), dtype=dt, device=log_prob.device)
        log_ratio = torch.where(valid, log_prob.to(dt) - old_log_prob.to(dt), zero)
        log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        ratio = torch.exp(log_ratio)
        adv = advantages.to(dt)
        adv = adv[:, None].expand_as(log_ratio) if adv.dim() == 1 else adv
        adv = torch.where(valid, adv, zero)
        count = valid.sum().clamp(min=1).to(dt)
        ppo_clipped = ((adv > 0) & (ratio > 1 + clip_high)) | ((adv < 0) & (ratio < 1 - clip_low))
        dual = (adv < 0) & (ratio > clip_ratio_c)
        pg_clipfrac = (ppo_clipped & valid).to(dt).sum() / count
        ppo_kl = -log_ratio.sum() / count
        pg_clipfrac_lower = (dual & valid).to(dt).sum() / count
    return pg_clipfrac, ppo_kl, pg_clipfrac_lower


def _policy_loss(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, clip_ratio_c,
                 loss_agg_mode, rollout_is_weights=None, global_batch_info=None):
    """The shared body of both verl entry points. Returns (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)."""
    if loss_agg_mode not in VERL_TO_PAIRUNI_AGG:
        raise ValueError(f"loss_agg_mode: expected one of {sorted(VERL_TO_PAIRUNI_AGG)}, got {loss_agg_mode!r}")
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c: expected a float > 1 (dual-clip PPO lower bound), got {clip_ratio_c!r}")
    if clip_low is None or clip_high is None:
        raise ValueError("cliprange: expected a float (or both cliprange_low and cliprange_high), got None")
    adv = advantages
    if rollout_is_weights is not None:
        # The clipped surrogate is positively homogeneous in A (scaling A by w >= 0 scales every branch,
        # the dual clip included, by w), so weighting the per-token loss equals weighting the advantage.
        if bool((rollout_is_weights < 0).any()):
            raise ValueError("rollout_is_weights: expected weights >= 0 (importance-sampling ratios)")
        adv = advantages * rollout_is_weights
    out = clipped_policy_loss(
        log_prob, old_log_prob, adv, response_mask, epsilon_low=float(clip_low), epsilon_high=float(clip_high),
        dual_clip_c=float(clip_ratio_c), loss_agg_mode=VERL_TO_PAIRUNI_AGG.get(loss_agg_mode, "token-mean"),
    )
    # The kernel's clip_fraction is pg_clipfrac + pg_clipfrac_lower (disjoint for A < 0: r < 1 - eps_low
    # vs r > c > 1), but on the weighted advantages; verl's metrics use the unweighted ones.
    pg_clipfrac, ppo_kl, pg_clipfrac_lower = _verl_metrics(old_log_prob, log_prob, advantages, response_mask,
                                                           float(clip_low), float(clip_high), clip_ratio_c)
    pg_loss = out.loss * _agg_rescale(response_mask, loss_agg_mode, global_batch_info or {})
    return pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


#: verl loss_agg_mode -> the pairuni mode its aggregate is rescaled from (see `_agg_rescale`).
VERL_TO_PAIRUNI_AGG = {
    "token-mean": "token-mean",
    "token-sum": "seq-mean-token-sum",
    "seq-mean-token-sum": "seq-mean-token-sum",
    "seq-mean-token-sum-norm": "seq-mean-token-sum",
    "seq-mean-token-mean": "seq-mean-token-mean",
}


def _agg_rescale(response_mask: torch.Tensor, loss_agg_mode: str, info: Mapping[str, Any]):
    """Factor turning our aggregate into verl 0.9's `agg_loss(..., **global_batch_info)`.

    With S the masked sum of per-token losses, R the sum of row means, n_tok the unmasked tokens,
    bs the rows and n_seq the non-empty rows, ours gives token-mean S / n_tok, seq-mean-token-sum
    S / bs, seq-mean-token-mean R / n_seq. verl gives
        token-mean               S / batch_num_tokens * dp          (batch_num_tokens defaults to n_tok)
        token-sum                S * dp
        seq-mean-token-sum       S / global_batch_size * dp         (global_batch_size defaults to n_seq)
        seq-mean-token-sum-norm  S / global_batch_size * dp / loss_scale_factor   (default T)
        seq-mean-token-mean      R / global_batch_size * dp
    and, like verl, a missing global count with dp_size > 1 is an error.
    """
    dp_size = info.get("dp_size") or 1
    valid = response_mask != 0
    rows = response_mask.shape[0]
    if loss_agg_mode == "token-mean":
        num_tokens = info.get("batch_num_tokens")
        if num_tokens is None:
            _require_single_rank(dp_size, "batch_num_tokens")
            return float(dp_size)
        return valid.sum().clamp(min=1) / num_tokens * dp_size
    if loss_agg_mode == "token-sum":
        return float(rows * dp_size)
    if loss_agg_mode not in VERL_TO_PAIRUNI_AGG:
        raise ValueError(f"loss_agg_mode: expected one of {sorted(VERL_TO_PAIRUNI_AGG)}, got {loss_agg_mode!r}")
    nonempty = valid.any(dim=-1).sum()
    batch_size = info.get("global_batch_size")
    if batch_size is None:
        _require_single_rank(dp_size, "global_batch_size")
        batch_size = nonempty.clamp(min=1)
    ours = nonempty.clamp(min=1) if loss_agg_mode == "seq-mean-token-mean" else rows
    factor = ours / batch_size * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        scale_factor = info.get("loss_scale_factor")
        factor = factor / (response_mask.shape[-1] if scale_factor is None else scale_factor)
    return factor


def _require_single_rank(dp_size, name: str) -> None:
    if dp_size > 1:
        raise ValueError(f"global_batch_info: {name} is required when dp_size > 1")


def compute_policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                        response_mask: torch.Tensor, cliprange: float | None = None,
                        cliprange_low: float | None = None, cliprange_high: float | None = None,
                        clip_ratio_c: float = 3.0, loss_agg_mode: str = "token-mean"):
    """verl's (functional) PPO clipped policy loss with dual clip, on `clipped_policy_loss`.

    Args:
        old_log_prob, log_prob: [bs, T] float; the loss is differentiable in `log_prob`.
        advantages: [bs, T] float (verl's token-level advantages; [bs] also accepted).
        response_mask: [bs, T] 0/1 or bool.
        cliprange: PPO epsilon; `cliprange_low` / `cliprange_high` default to it.
        clip_ratio_c: dual-clip bound c > 1: for A < 0 the per-token loss is at most `-A * c`.
        loss_agg_mode: "token-mean" | "token-sum" | "seq-mean-token-sum" | "seq-mean-token-mean" |
            "seq-mean-token-sum-norm", with verl's `agg_loss` semantics (empty rows do not count in
            the seq-mean modes; "seq-mean-token-sum-norm" divides by non-empty rows and by T).
    Returns:
        (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower), 0-d tensors, as verl returns them:
        pg_clipfrac = share of tokens where the PPO-clipped branch is active, ppo_kl = masked mean
        of `old - logp`,
        pg_clipfrac_lower = share of tokens where the dual clip is active (A < 0 and r > c).
    """
    clip_low = cliprange if cliprange_low is None else cliprange_low
    clip_high = cliprange if cliprange_high is None else cliprange_high
    return _policy_loss(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, clip_ratio_c,
                        loss_agg_mode)


def compute_policy_loss_vanilla(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config: Any = None,
                                rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """verl's registered "vanilla" policy loss (the one its actors call), on `clipped_policy_loss`.

    Reads `clip_ratio`, `clip_ratio_low`, `clip_ratio_high`, `clip_ratio_c` (default 3.0) and
    `global_batch_info` (dp_size, batch_num_tokens, global_batch_size, loss_scale_factor) from
    `config` (verl's ActorConfig, a DictConfig or a dict). `rollout_is_weights` ([bs, T], >= 0)
    multiply the per-token loss. Returns `(pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl",
    "actor/pg_clipfrac_lower"})` with Python floats in the dict, as verl does.
    """
    if config is None:
        raise ValueError("config: required (verl's ActorConfig or a mapping with clip_ratio, clip_ratio_c, ...)")
    clip_ratio = _config_value(config, "clip_ratio", None)
    clip_low = _config_value(config, "clip_ratio_low", clip_ratio)
    clip_high = _config_value(config, "clip_ratio_high", clip_ratio)
    clip_ratio_c = _config_value(config, "clip_ratio_c", 3.0)
    info = _config_value(config, "global_batch_info", {})
    pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower = _policy_loss(
        old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, clip_ratio_c, loss_agg_mode,
        rollout_is_weights=rollout_is_weights, global_batch_info=info,
    )
    metrics = {
        "actor/pg_clipfrac": pg_clipfrac.item(),
        "actor/ppo_kl": ppo_kl.item(),
        "actor/pg_clipfrac_lower": pg_clipfrac_lower.item(),
    }
    return pg_loss, metrics
