"""verl drop-ins: every policy loss and advantage estimator of verl 0.9.1, on pairuni kernels.

A verl user swaps one import and keeps every call site:

    # from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, compute_policy_loss_vanilla
    from pairuni_kernels.integrations.verl import compute_grpo_outcome_advantage, compute_policy_loss_vanilla

or puts all of them into verl's registries (`actor.policy_loss.loss_mode`, `algorithm.adv_estimator`):

    from pairuni_kernels.integrations.verl import register_all
    register_all()                    # verl's own names, replacing verl's functions
    register_all(prefix="pairuni_")   # or next to them: loss_mode=pairuni_gspo, adv_estimator=pairuni_rloo

`POLICY_LOSSES` / `ADVANTAGE_ESTIMATORS` map verl's names (its POLICY_LOSS_REGISTRY keys and
AdvantageEstimator values) to the drop-ins. Signatures, defaults, return values, metric dicts and loss
aggregation follow verl 0.9.1 (`verl/trainer/ppo/core_algos.py` of the PyPI release); verl itself is never
imported here. Policy losses run on `clipped_policy_loss(loss_type=...)` (`losses.py`), outcome estimators on
`group_advantages` (`advantages.py`); GAE, ReMax, optimal-token baselines and bypass mode's rollout
correction are plain-torch re-implementations (`advantages.py`, `rollout_correction.py`).

Known departures from verl, all in corner cases:
  * a fully masked batch gives loss 0 with zero gradient (verl divides 0 by 0 in "token-mean");
  * the per-token losses are computed in float32 (float64 for float64 inputs), verl in the input dtype, and
    row means divide by the exact token count (verl: count + 1e-8 in "seq-mean-token-mean" and GMPO);
  * the kernels clamp log-ratios to +-20 before `exp` in every mode (verl leaves clip_cov, kl_cov, geo_mean
    and GSPO's token part unclamped; GSPO clamps its sequence log-ratio at +10 instead): values differ only
    for |log pi - log pi_old| > 10, far outside any trust region;
  * grpo_vectorized: verl's float32 group statistics are computed in the rewards' dtype here;
  * opo: a group whose response lengths sum to 0 gets baseline 0 (verl divides 0 by 0);
  * bypass mode's IS batch normalisation uses the local batch (verl all-reduces when torch.distributed is up).
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

from ._common import VERL_TO_PAIRUNI_AGG, agg_rescale, masked_whiten, uids_to_group_ids
from .advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_gae_advantage_return,
    compute_gdpo_outcome_advantage,
    compute_gpg_outcome_advantage,
    compute_grpo_outcome_advantage,
    compute_grpo_passk_outcome_advantage,
    compute_grpo_vectorized_outcome_advantage,
    compute_multi_turn_optimal_token_baseline_advantage,
    compute_opo_outcome_advantage,
    compute_optimal_token_baseline_advantage,
    compute_reinforce_plus_plus_baseline_outcome_advantage,
    compute_reinforce_plus_plus_outcome_advantage,
    compute_remax_outcome_advantage,
    compute_rloo_outcome_advantage,
    compute_rloo_vectorized_outcome_advantage,
)
from .losses import (
    POLICY_LOSSES,
    compute_policy_loss,
    compute_policy_loss_bypass_mode,
    compute_policy_loss_cispo,
    compute_policy_loss_clip_cov,
    compute_policy_loss_dppo_kl,
    compute_policy_loss_dppo_tv,
    compute_policy_loss_dro,
    compute_policy_loss_geo_mean,
    compute_policy_loss_gpg,
    compute_policy_loss_gspo,
    compute_policy_loss_kl_cov,
    compute_policy_loss_sapo,
    compute_policy_loss_vanilla,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS", "POLICY_LOSSES", "VERL_TO_PAIRUNI_AGG", "agg_rescale", "compute_gae_advantage_return",
    "compute_gdpo_outcome_advantage", "compute_gpg_outcome_advantage", "compute_grpo_outcome_advantage",
    "compute_grpo_passk_outcome_advantage", "compute_grpo_vectorized_outcome_advantage",
    "compute_multi_turn_optimal_token_baseline_advantage", "compute_opo_outcome_advantage",
    "compute_optimal_token_baseline_advantage", "compute_policy_loss", "compute_policy_loss_bypass_mode",
    "compute_policy_loss_cispo", "compute_policy_loss_clip_cov", "compute_policy_loss_dppo_kl",
    "compute_policy_loss_dppo_tv", "compute_policy_loss_dro", "compute_policy_loss_geo_mean",
    "compute_policy_loss_gpg", "compute_policy_loss_gspo", "compute_policy_loss_kl_cov", "compute_policy_loss_sapo",
    "compute_policy_loss_vanilla", "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "compute_reinforce_plus_plus_outcome_advantage", "compute_remax_outcome_advantage",
    "compute_rloo_outcome_advantage", "compute_rloo_vectorized_outcome_advantage", "masked_whiten", "register_all",
    "uids_to_group_ids",
]

#: verl's registration style: `register(name)` returns a decorator that stores the function.
Register = Callable[[str], Callable[[Callable], Any]]


def _into(registry: MutableMapping[str, Callable]) -> Register:
    def register(name: str):
        def put(fn: Callable) -> Callable:
            registry[name] = fn
            return fn
        return put
    return register


def register_all(registry_fns: tuple[Register, Register] | None = None, *, prefix: str = "") -> dict[str, list[str]]:
    """Register every drop-in under `prefix + verl's name`.

    Args:
        registry_fns: (register_policy_loss, register_adv_est) in verl's style, `fn(name)(function)` (verl's own
            two work with a prefix; its `register_adv_est` refuses to replace an estimator of the same name).
            Default: write into verl's `core_algos.POLICY_LOSS_REGISTRY` and `ADV_ESTIMATOR_REGISTRY` (imports
            verl; replaces verl's entries of the same name).
        prefix: prepended to every name ("" = verl's names).
    Returns:
        {"policy_losses": [names], "advantage_estimators": [names]} as registered.

    verl's trainer calls GAE and GRPO through `core_algos.compute_gae_advantage_return` /
    `compute_grpo_outcome_advantage` directly, not through the registry; set those attributes to use ours there.
    """
    if registry_fns is None:
        try:
            from verl.trainer.ppo import core_algos
        except ImportError as err:
            raise ImportError(f"register_all: verl is not importable ({err}); pass registry_fns instead") from err
        registry_fns = (_into(core_algos.POLICY_LOSS_REGISTRY), _into(core_algos.ADV_ESTIMATOR_REGISTRY))
    register_loss, register_adv = registry_fns
    for name, fn in POLICY_LOSSES.items():
        register_loss(prefix + name)(fn)
    for name, fn in ADVANTAGE_ESTIMATORS.items():
        register_adv(prefix + name)(fn)
    return {"policy_losses": [prefix + n for n in POLICY_LOSSES],
            "advantage_estimators": [prefix + n for n in ADVANTAGE_ESTIMATORS]}
