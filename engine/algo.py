"""The PairGRPO objective: the `algo.` section of the config (`AlgoConfig`), its checks, and what the trainer
hands the kernels for it.

    kw = loss_kwargs(cfg.algo)        # the loss-type knobs that differ from the kernels' defaults
    adv = advantages(cfg.algo, rewards, group_ids, weights=w, mask=mask)   # [N] ([N, T]: reinforce_plus_plus)
    extra = token_inputs(cfg.algo, view, old_logp, adv, generator=g)       # top-entropy mask, cov selection

Names are TRL 1.16's `GRPOConfig` / verl 0.9.1's where they agree (docs/TRAINING.md "Loss types and knobs").
With every default the trainer calls the kernels exactly as before these knobs existed (`loss_kwargs` is empty,
`advantages` is `group_advantages(rewards, group_ids, weights=w, eps=eps)`), so the golden run does not move.
engine/config.py imports `AlgoConfig` from here, so this module imports no engine module at its top.

Two knobs need each token's current log-prob or entropy before the loss (`token_inputs`): the top-entropy mask
(`top_entropy_quantile`) and the covariance selection of clip_cov / kl_cov. They come from one extra no-grad pass
of the task's head over the micro-batch's hidden states, which the loss computes anyway: one more head matmul,
no second transformer forward and no [N*T, V] logits. The rollouts cannot give them: their old log-probs are
recorded by the sampler, which computes no entropy, and after the first inner epoch (algo.mu > 1) the policy is
no longer the rollout's. As in TRL (`get_high_entropy_mask`, per micro-batch, gathered over processes), the
quantile is taken over the loss tokens of one micro-batch of one process, so with top_entropy_quantile < 1 the
result depends on optim.micro_batch_size and on the process count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from pairuni_kernels import group_advantages, linear_logprobs, token_returns_advantages
from pairuni_kernels import reference as spec
from pairuni_kernels.reference import (
    ADVANTAGE_ESTIMATORS,
    ADVANTAGE_SCALES,
    IMPORTANCE_SAMPLING_LEVELS,
    KL_ESTIMATORS,
    LENGTH_ESTIMATORS,
    LOSS_AGG_MODES,
    LOSS_TYPE_DEFAULTS,
    LOSS_TYPES,
    PAIR_WEIGHTINGS,
)

if TYPE_CHECKING:
    from .config import Config

KlEstimator = Literal[KL_ESTIMATORS]
LossAggMode = Literal[LOSS_AGG_MODES]
PairWeighting = Literal[PAIR_WEIGHTINGS]
LossType = Literal[LOSS_TYPES]
ImportanceSamplingLevel = Literal[IMPORTANCE_SAMPLING_LEVELS]
AdvantageEstimator = Literal[ADVANTAGE_ESTIMATORS]
ScaleRewards = Literal[ADVANTAGE_SCALES]

#: Loss types whose per-token term is A times something that does not depend on A, so that zeroing A outside
#: the top-entropy tokens is TRL's `per_token_loss * entropy_mask` (clip_cov / kl_cov: with `selected` cut to
#: the kept tokens). geo_mean averages A over the row and dro has a term without A: no such mask.
TOP_ENTROPY_LOSS_TYPES = tuple(t for t in LOSS_TYPES if t not in ("geo_mean", "dro"))
#: Estimators that scale by a std (algo.scale_rewards, algo.advantage_eps); the others ignore both.
SCALED_ESTIMATORS = ("grpo", "grpo_passk")
#: Estimators whose statistics span the whole batch: under torchrun each process would see only its share.
BATCH_ESTIMATORS = ("reinforce_plus_plus_baseline", "reinforce_plus_plus")
#: Knobs read by some loss types only (or estimators / the entropy bonus): a non-default value elsewhere is refused.
KNOB_USERS = {
    **dict.fromkeys(("sapo_temperature_pos", "sapo_temperature_neg"), ("sapo",)),
    **dict.fromkeys(("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"), ("vespo",)),
    **dict.fromkeys(("clip_ratio_c_tis", "divergence_low", "divergence_high"), ("dppo_tv", "dppo_kl")),
    "dro_beta": ("dro",), "dual_clip_c": ("ppo", "clip_cov"),
    **dict.fromkeys(("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub"), ("clip_cov",)),
    **dict.fromkeys(("kl_cov_ratio", "kl_cov_coef"), ("kl_cov",)),
}


@dataclass
class AlgoConfig:
    epsilon_low: float = 0.2
    """PPO clip: ratio >= 1 - epsilon_low."""
    epsilon_high: float = 0.2
    """PPO clip: ratio <= 1 + epsilon_high (loss_type cispo: the cap of the ratio, TRL's epsilon_high, e.g. 5)."""
    beta: float = 0.0
    """KL coefficient; > 0 loads a frozen reference model (PairUni: 0)."""
    kl_estimator: KlEstimator = "k3"
    """k1 | k2 | k3."""
    loss_agg_mode: LossAggMode = "token-mean"
    """token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm."""
    mu: int = 2
    """Inner epochs: optimizer steps on each rollout batch (1 is on-policy GRPO)."""
    use_pair_weights: bool = True
    """Multiply both halves' advantages by w_p (1 aligned, sqrt(s) retrieved); False: plain GRPO."""
    pair_weighting: PairWeighting = "sqrt"
    """w_p of a retrieved pair when use_pair_weights: sqrt (PairUni: sqrt(s)) | linear (s), the paper's
    weighting ablation. Aligned pairs always weigh 1."""
    advantage_eps: float = 1e-6
    """Added to the group std before dividing."""
    understanding_weight: float = 1.0
    """Weight of the understanding loss in the summed loss."""
    generation_weight: float = 1.0
    """Weight of the generation loss in the summed loss."""
    loss_type: LossType = "ppo"
    """Policy loss (pairuni_kernels.reference.clipped_policy_loss): ppo (clipped surrogate: TRL grpo/bnpo/dr_grpo/
    dapo/luspo, verl vanilla) | cispo (TRL) | cispo_clip (verl cispo) | sapo | vespo | gpg | geo_mean | clip_cov |
    kl_cov | dppo_tv | dppo_kl | dro."""
    importance_sampling_level: ImportanceSamplingLevel = "token"
    """token | sequence (GSPO: the row's mean log-ratio) | sequence_token (verl gspo: that value, each token's
    gradient); sequence levels for ppo, cispo, cispo_clip, sapo only."""
    dual_clip_c: float | None = None
    """Dual-clip PPO (> 1): for A < 0 a token's loss is at most -A c (verl clip_ratio_c); null: off."""
    kl_ratio_correction: bool = False
    """TRL use_bias_correction_kl: the KL term of each token times its importance ratio (needs beta > 0)."""
    entropy_coef: float = 0.0
    """Entropy bonus: loss - entropy_coef * mean entropy (computed by the fused head, with its gradient)."""
    entropy_agg_mode: LossAggMode = "token-mean"
    """How the entropy bonus is aggregated: token-mean (TRL) or one of loss_agg_mode's modes (verl)."""
    top_entropy_quantile: float = 1.0
    """TRL's rho in [0, 1]: only the highest-entropy share rho of a micro-batch's loss tokens train (1: all)."""
    sapo_temperature_pos: float = 1.0
    """sapo: temperature of tokens with A > 0."""
    sapo_temperature_neg: float = 1.05
    """sapo: temperature of tokens with A <= 0."""
    vespo_k_pos: float = 2.0
    """vespo: k of the gamma weight for A >= 0."""
    vespo_lambda_pos: float = 3.0
    """vespo: lambda of the gamma weight for A >= 0."""
    vespo_k_neg: float = 3.0
    """vespo: k of the gamma weight for A < 0."""
    vespo_lambda_neg: float = 2.0
    """vespo: lambda of the gamma weight for A < 0."""
    clip_ratio_c_tis: float = 20.0
    """dppo_tv / dppo_kl: the truncation of the importance ratio (verl clip_ratio_c there)."""
    divergence_low: float | None = None
    """dppo_tv / dppo_kl: divergence bound for A < 0 (null: epsilon_low, as verl's clip_ratio_low)."""
    divergence_high: float | None = None
    """dppo_tv / dppo_kl: divergence bound for A > 0 (null: epsilon_high)."""
    dro_beta: float | None = None
    """dro: weight of the quadratic log-ratio penalty (> 0; required by dro)."""
    clip_cov_ratio: float = 0.0002
    """clip_cov: share of the loss tokens (chosen at random among lb < cov < ub) whose loss is dropped."""
    clip_cov_lb: float = 1.0
    """clip_cov: lower bound of the covariance of the candidates."""
    clip_cov_ub: float = 5.0
    """clip_cov: upper bound of the covariance of the candidates."""
    kl_cov_ratio: float = 0.0002
    """kl_cov: share of the loss tokens (largest covariance) that get the |log ratio| penalty."""
    kl_cov_coef: float = 1.0
    """kl_cov: weight of that penalty (verl ppo_kl_coef)."""
    advantage_estimator: AdvantageEstimator = "grpo"
    """grpo | rloo | opo (length-weighted baseline) | grpo_passk | reinforce_plus_plus_baseline |
    reinforce_plus_plus (token returns of the outcome reward, whitened over the batch; see gamma)."""
    scale_rewards: ScaleRewards = "group"
    """Divide centred rewards by the group's std (group), the batch's (batch) or not at all (none: Dr.GRPO)."""
    gamma: float = 1.0
    """reinforce_plus_plus: discount of the returns over an answer's / image's tokens."""


# ----------------------------------------------------------------------------- checks
def check_config(cfg: Config, world: int | None) -> None:
    """Ranges of the `algo.` keys, the rules between them, and the kernels' own rules run on a few random
    numbers, so that every refusal is one ConfigError line naming a key before anything loads."""
    from .config import require

    a = cfg.algo
    require(0 <= a.epsilon_low <= 1, "algo.epsilon_low", "a number in [0, 1]", a.epsilon_low)
    require(a.epsilon_high >= 0, "algo.epsilon_high", "a number >= 0", a.epsilon_high)
    require(a.beta >= 0, "algo.beta", "a number >= 0", a.beta)
    require(a.mu >= 1, "algo.mu", "an integer >= 1", a.mu)
    require(a.advantage_eps >= 0, "algo.advantage_eps", "a number >= 0", a.advantage_eps)
    require(a.understanding_weight >= 0 and a.generation_weight >= 0 and a.understanding_weight + a.generation_weight > 0,
            "algo.understanding_weight/generation_weight", "weights >= 0, not both 0",
            (a.understanding_weight, a.generation_weight))
    require(0 <= a.top_entropy_quantile <= 1, "algo.top_entropy_quantile", "a number in [0, 1] (1: every token "
            "trains)", a.top_entropy_quantile)
    require(0 < a.gamma <= 1, "algo.gamma", "a number in (0, 1]", a.gamma)
    for key in ("clip_cov_ratio", "kl_cov_ratio"):
        require(0 < getattr(a, key) <= 1, f"algo.{key}", "a share in (0, 1]", getattr(a, key))
    require(a.clip_cov_lb < a.clip_cov_ub, "algo.clip_cov_lb", f"< algo.clip_cov_ub ({a.clip_cov_ub})", a.clip_cov_lb)
    defaults = AlgoConfig()
    for key, users in KNOB_USERS.items():
        value = getattr(a, key)
        require(value == getattr(defaults, key) or a.loss_type in users, f"algo.{key}",
                f"its default {getattr(defaults, key)!r}: only loss_type {' / '.join(users)} reads it "
                f"(algo.loss_type is {a.loss_type})", value)
    require(not a.kl_ratio_correction or a.beta > 0, "algo.kl_ratio_correction", "false while algo.beta is 0 "
            "(there is no KL term to correct)", a.kl_ratio_correction)
    require(a.entropy_agg_mode == "token-mean" or a.entropy_coef != 0, "algo.entropy_agg_mode",
            "token-mean while algo.entropy_coef is 0 (there is no entropy bonus to aggregate)", a.entropy_agg_mode)
    require(a.top_entropy_quantile == 1 or a.loss_type in TOP_ENTROPY_LOSS_TYPES, "algo.top_entropy_quantile",
            f"1 with loss_type {a.loss_type} (its token loss is not A times a factor, so it has no top-entropy "
            f"mask)", a.top_entropy_quantile)
    require(a.loss_type != "cispo" or a.epsilon_high >= 1, "algo.epsilon_high", "a number >= 1 with loss_type "
            "cispo (TRL: the cap of the importance ratio, 5 recommended; cispo_clip is verl's clipped form)",
            a.epsilon_high)
    require(a.gamma == 1 or a.advantage_estimator == "reinforce_plus_plus", "algo.gamma",
            f"1 with advantage_estimator {a.advantage_estimator} (only reinforce_plus_plus discounts)", a.gamma)
    if a.advantage_estimator not in SCALED_ESTIMATORS:
        for key in ("scale_rewards", "advantage_eps"):
            require(getattr(a, key) == getattr(defaults, key), f"algo.{key}", f"its default "
                    f"{getattr(defaults, key)!r} with advantage_estimator {a.advantage_estimator} (it scales by no "
                    f"std; {' / '.join(SCALED_ESTIMATORS)} do)", getattr(a, key))
    if world is not None and world > 1:
        for key, value, batch_wide in (("scale_rewards", a.scale_rewards, a.scale_rewards == "batch"),
                                       ("advantage_estimator", a.advantage_estimator,
                                        a.advantage_estimator in BATCH_ESTIMATORS)):
            require(not batch_wide, f"algo.{key}", f"no batch-wide statistics under torchrun ({world} processes "
                    "would each normalise over their own share of the batch)", value)
    _kernels_accept(a)


#: The config key of each kernel argument whose name differs from it.
_KERNEL_NAMES = {"scale": "scale_rewards", "estimator": "advantage_estimator", "eps": "advantage_eps",
                 "lengths": "advantage_estimator", "selected": "loss_type", "entropy": "entropy_coef",
                 "entropy_mask": "top_entropy_quantile", "ref_logp": "beta"}


def _kernels_accept(a: AlgoConfig) -> None:
    """Run the float64 spec once on random [2, 3] inputs with `a`'s knobs; its ValueError ("arg: ...") becomes
    a ConfigError naming the key (`algo.arg: ...`)."""
    from .config import ConfigError

    g = torch.Generator().manual_seed(0)
    n, t = 2, 3
    logp = -torch.rand(n, t, generator=g, dtype=torch.float64) - 0.1
    old = -torch.rand(n, t, generator=g, dtype=torch.float64) - 0.1
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = torch.ones(n, t, dtype=torch.bool)
    kw = loss_kwargs(a)
    try:
        rewards = torch.randn(4, generator=g, dtype=torch.float64)
        if a.advantage_estimator == "reinforce_plus_plus":
            spec.token_returns_advantages(rewards[:, None].expand(4, 2), torch.ones(4, 2), gamma=a.gamma)
        else:
            spec.group_advantages(rewards, torch.tensor([0, 0, 1, 1]), **advantage_kwargs(a, torch.tensor([3, 1, 2, 3])))
        if a.loss_type in spec.COV_SELECTION_MODES:
            kw["selected"] = cov_selection(a, logp, old, adv, mask, g)
        if a.entropy_coef != 0:
            kw["entropy"] = torch.rand(n, t, generator=g, dtype=torch.float64)
        spec.clipped_policy_loss(logp, old, adv, mask, ref_logp=old - 0.05 if a.beta > 0 else None,
                                 epsilon_low=a.epsilon_low, epsilon_high=a.epsilon_high, beta=a.beta,
                                 kl_estimator=a.kl_estimator, loss_agg_mode=a.loss_agg_mode, **kw)
    except ValueError as exc:
        name, _, rest = str(exc).partition(": ")
        key = _KERNEL_NAMES.get(name, name)
        raise ConfigError(f"algo.{key}: {rest}" if hasattr(a, key) else f"algo.loss_type: {exc}") from None


# ----------------------------------------------------------------------------- what the kernels get
def loss_kwargs(a: AlgoConfig) -> dict:
    """The loss knobs of `a` that differ from the kernels' defaults (none with a default config), for
    `fused_linear_policy_loss` / `clipped_policy_loss` besides epsilon_*, beta, kl_estimator, loss_agg_mode."""
    knobs = {"dual_clip_c": (a.dual_clip_c, None), "importance_sampling_level": (a.importance_sampling_level, "token")}
    knobs.update({k: (getattr(a, k), d) for k, d in LOSS_TYPE_DEFAULTS.items() if hasattr(a, k)})
    return {k: v for k, (v, default) in knobs.items() if v != default}


def computes_entropy(a: AlgoConfig) -> bool:
    """Whether a step computes each token's entropy (the entropy bonus or the top-entropy mask): then, and
    only then, metrics.jsonl has `entropy.<task>`."""
    return a.entropy_coef != 0 or a.top_entropy_quantile < 1


def advantage_kwargs(a: AlgoConfig, lengths: torch.Tensor) -> dict:
    """`group_advantages`' keyword arguments for `a` besides weights; lengths [N] token counts, passed only to
    the estimators that read them. Defaults are left out (the call is the one from before these knobs)."""
    kw = {"eps": a.advantage_eps}
    if a.scale_rewards != "group":
        kw["scale"] = a.scale_rewards
    if a.advantage_estimator != "grpo":
        kw["estimator"] = a.advantage_estimator
    if a.advantage_estimator in LENGTH_ESTIMATORS:
        kw["lengths"] = lengths
    return kw


def advantages(a: AlgoConfig, rewards: torch.Tensor, group_ids: torch.Tensor, *, weights: torch.Tensor | None,
               mask: torch.Tensor) -> torch.Tensor:
    """Advantages of one task's rollouts by `a.advantage_estimator`, times `weights` (the pair weights).

    rewards [N] float32, group_ids [N] long, weights [N] or None, mask [N, T] bool (the task's loss tokens).
    Returns [N] on rewards' device; reinforce_plus_plus: [N, T], the discounted return of the outcome reward
    (placed on each row's last token) whitened over the batch's tokens (`token_returns_advantages`)."""
    mask = mask.to(rewards.device)
    if a.advantage_estimator != "reinforce_plus_plus":
        return group_advantages(rewards, group_ids, weights=weights, **advantage_kwargs(a, mask.sum(-1)))
    last = mask & (mask.long().cumsum(-1) == mask.sum(-1, keepdim=True))  # each row's last loss token
    token_rewards = torch.where(last, rewards[:, None], torch.zeros((), dtype=rewards.dtype))
    return token_returns_advantages(token_rewards, mask, a.gamma, weights=weights)


def cov_selection(a: AlgoConfig, logp, old_logp, adv, mask, generator: torch.Generator | None) -> torch.Tensor:
    """[N, T] bool: the clip_cov / kl_cov tokens (`reference.cov_token_selection` with `a`'s knobs)."""
    clip = a.loss_type == "clip_cov"
    return spec.cov_token_selection(logp, old_logp, adv, mask, mode=a.loss_type,
                                    ratio=a.clip_cov_ratio if clip else a.kl_cov_ratio, lb=a.clip_cov_lb,
                                    ub=a.clip_cov_ub, epsilon_low=a.epsilon_low, epsilon_high=a.epsilon_high,
                                    generator=generator)


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """[N, T] bool: the loss tokens whose entropy is at least the (1 - quantile) quantile of the entropies of
    all loss tokens (torch.quantile, linear interpolation), as TRL's `get_high_entropy_mask` (one process).
    entropy [N, T] float, mask [N, T] bool. quantile 0 keeps the highest-entropy token(s) only."""
    valid = mask != 0
    values = entropy[valid].float()
    if values.numel() == 0:
        return torch.zeros_like(valid)
    threshold = torch.quantile(values, 1.0 - quantile)
    return (entropy >= threshold) & valid


@dataclass
class TokenInputs:
    """What `token_inputs` adds to one micro-batch's loss call.

    advantages: [b] or [b, T], zero outside the top-entropy tokens; kwargs: `selected` / `entropy_mask` for
    the loss; entropy: [] mean entropy over the mask (the metric), when this pass computed it, else None."""

    advantages: torch.Tensor
    kwargs: dict
    entropy: torch.Tensor | None


def token_inputs(a: AlgoConfig, view, old_logp: torch.Tensor, adv: torch.Tensor,
                 generator: torch.Generator | None = None) -> TokenInputs:
    """The top-entropy mask and the clip_cov / kl_cov selection of one micro-batch, from one no-grad pass of
    the head (`linear_logprobs`, chunked) over `view`'s loss tokens (a `policy.TaskView`: hidden [b, T, H]).
    old_logp [b, T]; adv [b] or [b, T] on the view's device. With neither knob on, nothing runs."""
    top = a.top_entropy_quantile < 1
    cov = a.loss_type in spec.COV_SELECTION_MODES
    if not (top or cov):
        return TokenInputs(adv, {}, None)
    with torch.no_grad():
        n, t, h = view.hidden.shape
        valid = view.mask.reshape(n * t) != 0
        lp, ent = linear_logprobs(view.hidden.detach().reshape(n * t, h)[valid], view.weight.detach(),
                                  view.targets.reshape(n * t)[valid],
                                  bias=None if view.bias is None else view.bias.detach(),
                                  temperature=view.temperature, return_entropy=True)
        logp = lp.new_zeros(n * t).masked_scatter(valid, lp).view(n, t)
        entropy = ent.new_zeros(n * t).masked_scatter(valid, ent).view(n, t)
        mask = valid.view(n, t)
        kwargs, keep = {}, None
        if top:
            keep = high_entropy_mask(entropy, mask, a.top_entropy_quantile)
            if a.entropy_coef != 0:  # TRL: the bonus acts on the tokens the policy loss trains
                kwargs["entropy_mask"] = keep
        if cov:
            selected = cov_selection(a, logp, old_logp, adv, mask, generator)
            kwargs["selected"] = selected if keep is None else selected & keep
        if keep is not None:
            adv = (adv[:, None] if adv.dim() == 1 else adv) * keep.to(adv.dtype)
        mean_entropy = (entropy * mask).sum() / mask.sum().clamp(min=1) if top else None
    return TokenInputs(adv, kwargs, mean_entropy)


def selection_seed(seed: int, step: int, task: str, row: int, epoch: int, dist=None) -> int:
    """Seed of clip_cov's random token choice (`engine.seeds.token_selection`) on this process (`dist`:
    engine.distributed.DistEnv or None)."""
    from .seeds import token_selection

    return token_selection(seed, step, task, row, epoch, 0 if dist is None else dist.rank)
