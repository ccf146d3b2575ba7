"""TRL drop-in: `PairUniGRPOTrainer`, TRL's `GRPOTrainer` with pairuni's head and loss kernels.

    from pairuni_kernels.integrations.trl import PairUniGRPOTrainer   # instead of trl.GRPOTrainer
    trainer = PairUniGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)
    trainer.train()

Every `GRPOConfig` that `trl.GRPOTrainer` accepts is accepted. Everything TRL does (generation, rewards,
logging, accumulation, checkpoints, the adaptive-entropy controller and its saved state) stays TRL's; two
steps change:
  * advantages: `group_advantages(rewards, prompt groups, eps=1e-4, scale=args.scale_rewards)` for TRL's
    default multi_objective_aggregation="sum_then_normalize", `multi_reward_advantages(rewards [N, K],
    prompt groups, reward_weights, mode="normalize_then_sum", eps=1e-4)` for "normalize_then_sum"; optionally
    multiplied by a per-prompt weight column (`weight_column=`, e.g. PairGRPO's `pair_weights`), instead of
    TRL's own normalisation (same numbers without weights; unscorable completions, NaN rewards, as in TRL);
  * loss: the backbone's hidden states of the completion positions go to `linear_logprobs` (chunked, never
    the [B, T, V] logits, with differentiable entropies) and then to `clipped_policy_loss` (`trl_policy_loss`
    below), with TRL's loss type mapped to ours. By the pairuni contract this is `fused_linear_policy_loss`;
    we call its two halves because TRL's default on-policy step uses `old_logp = logp.detach()` (unknown
    before the head runs) and because TRL's masks and metrics need the token log-probs and entropies.

The head runs inside the model's forward (a flag added to `model.forward`, as TRL does for its own fused
head), so DDP / FSDP see every parameter used in forward.

TRL loss types (TRL 1.16) and their pairuni counterparts. S = masked sum of the per-token losses of the
micro-batch of B completions, k = gradient-accumulation steps (1 in eval), D = the loss tokens of the
generation batch per process and accumulation step (TRL's rescaled `num_items_in_batch`):

    TRL      TRL's loss                pairuni loss_type  loss_agg_mode         TRL = ours x
    grpo     mean of B row means / k   ppo                seq-mean-token-mean   (non-empty rows / B) / k
    sapo     mean of B row means / k   sapo               seq-mean-token-mean   (non-empty rows / B) / k
    bnpo     S / tokens / k            ppo                token-mean            1 / k
    dr_grpo  S / (B L) / k             ppo                seq-mean-token-sum    1 / (L k), L = max_completion_length
    luspo    S / B / k                 ppo                seq-mean-token-sum    1 / k
    dapo     S / D                     ppo                seq-mean-token-sum    B / D
    cispo    S / D                     cispo              seq-mean-token-sum    B / D
    vespo    S / D                     vespo (or gpg)     seq-mean-token-sum    B / D

  * cispo: TRL's cap is `epsilon_high` itself, -sg(min(r, epsilon_high)) A logp, which is our "cispo".
  * sapo / vespo: TRL's sapo_temperature_* / vespo_k_* / vespo_lambda_* are passed on. vespo's row weight w
    comes from the row's token log-ratios at either importance_sampling_level (TRL ignores the level there), so
    it runs at token level. When the batch holds vLLM's `importance_sampling_ratio` (TRL folds its log into w)
    or a vespo_k is negative, phi comes from TRL's `get_gamma_weights` and the loss is our "gpg" (-A logp) with
    advantage A * phi: the same formula.
  * delta (TRL's two-sided clip: the unclipped ratio capped at delta) is our dual clip with epsilon_high' =
    min(epsilon_high, delta - 1) and dual_clip_c = max(delta, 1 + epsilon_high); equal to TRL's for every
    delta >= 1 (dual_clip_c = delta when delta > 1 + epsilon_high).
  * epsilon > 1 is passed as 1 (ratios are positive, so a lower bound below 0 never acts).
  * use_bias_correction_kl with beta > 0: our kl_ratio_correction (the k3 KL times the ratio at the level).
    For vespo at sequence level that KL term comes from a second call, "ppo" with A = 0 at sequence level.
  * top_entropy_quantile, off_policy_mask_threshold and vLLM importance weights (not for vespo) multiply the
    advantage: every loss type here is positively homogeneous in A (A's sign picks sapo's temperature and
    vespo's k / lambda), so this equals TRL's weighting of the token loss.
  * entropy bonus (entropy_coef, use_adaptive_entropy): the head's per-token entropies go to the policy loss's
    entropy bonus (token-mean over mask x high-entropy mask) with the coefficient divided by the factor above,
    so the bonus is TRL's `coef * mean entropy / k` and its gradient flows through the head. TRL's adaptive
    controller (`entropy_coef`, `_last_world_entropy`, window statistics, the `entropy_ctrl_state.json` of a
    checkpoint) is updated exactly as TRL does at each optimizer step.
  * MoE load-balancing loss (router_aux_loss_coef, config.output_router_logits): computed from the backbone's
    router logits with transformers' `load_balancing_loss_func`, as TRL's fused head does, and added as
    `router_aux_loss_coef * aux / k`.
  * logit scaling (config logit_scale / output_multiplier / lm_head_multiplier / logits_scaling, read as TRL
    reads them): folded into the head's temperature, logits * s / T = logits / (T / s).

Fallback: the loss is TRL's own `_compute_loss` (one warning at construction says why; advantages stay
ours) for models with `final_logit_softcapping` (the head computes plain linear logits), a logit scale <= 0,
an MoE config without `num_experts` / `num_experts_per_tok`, and for delta < 1 (or delta = 1 with
epsilon_high = 0), epsilon or epsilon_high < 0, beta < 0, sapo temperatures <= 0, which the kernels do not
take. The head runs in the lm_head weight's dtype with autocast off (TRL runs it under autocast). Token
log-ratios are clamped to +-20 before `exp` (TRL clamps only vespo's). Multimodal inputs are passed through
to the backbone but are untested here.
"""

from __future__ import annotations

import functools
import warnings

import torch

try:
    import trl
    from accelerate.utils import gather_object, is_peft_model
    from trl import GRPOTrainer
    from trl.trainer.utils import maybe_gather_lm_head_ctx, nanmax, nanmin
except ImportError as exc:  # pragma: no cover - exercised only without TRL
    raise ImportError("pairuni_kernels.integrations.trl needs TRL: pip install trl (tested with trl 1.16)") from exc
from packaging.version import Version

from ..advantages import group_advantages, multi_reward_advantages
from ..linear_logprobs import linear_logprobs
from ..policy_loss import clipped_policy_loss

__all__ = ["LOSS_TYPE_TO_AGG_MODE", "TRL_LOSS_TYPES", "PairUniGRPOTrainer", "trl_group_advantages",
           "trl_multi_reward_advantages", "trl_policy_loss"]

#: TRL loss_type -> (pairuni loss_type, loss_agg_mode); the aggregate is then rescaled to TRL's (module doc).
TRL_LOSS_TYPES = {
    "grpo": ("ppo", "seq-mean-token-mean"),
    "bnpo": ("ppo", "token-mean"),
    "dr_grpo": ("ppo", "seq-mean-token-sum"),
    "dapo": ("ppo", "seq-mean-token-sum"),
    "luspo": ("ppo", "seq-mean-token-sum"),
    "cispo": ("cispo", "seq-mean-token-sum"),
    "sapo": ("sapo", "seq-mean-token-mean"),
    "vespo": ("vespo", "seq-mean-token-sum"),
}
#: TRL loss_type -> the pairuni loss_agg_mode its aggregation is computed from.
LOSS_TYPE_TO_AGG_MODE = {name: agg for name, (_, agg) in TRL_LOSS_TYPES.items()}
#: TRL loss types whose loss is divided by the accumulation steps (the others divide by D, which includes them).
_PER_ACCUMULATION = ("grpo", "sapo", "bnpo", "dr_grpo", "luspo")
#: TRL loss types that log the PPO clip metrics.
_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
#: The release this adapter's overrides were written against and tested with. It overrides private GRPOTrainer
#: methods (_compute_loss, _calculate_rewards, _generate_and_score_completions), which TRL may change.
TESTED_TRL = (1, 16)
if Version(trl.__version__).release[:2] != TESTED_TRL:
    warnings.warn(f"pairuni_kernels.integrations.trl was tested with trl 1.16.x, found {trl.__version__}; "
                  "compare a step against trl.GRPOTrainer before relying on it", stacklevel=2)
#: TRL divides by std + 1e-4 (GRPOTrainer._generate_and_score_completions).
TRL_ADVANTAGE_EPS = 1e-4
#: Keyword arguments of TRL's loss inputs that the backbone takes as they are (one chunk = the whole micro-batch).
_BACKBONE_KWARGS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids")
_HEAD_FLAG = "pairuni_head_fn"


def trl_group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str | bool = "group", *,
                         weights: torch.Tensor | None = None, eps: float = TRL_ADVANTAGE_EPS) -> torch.Tensor:
    """TRL's GRPO advantages on `group_advantages`: consecutive blocks of `num_generations` form a group.

    Args:
        rewards: [N] float, N a multiple of num_generations; NaN marks an unscorable completion
            (every reward function returned None): it is left out of its group's statistics and gets 0.
        scale_rewards: "group" / True, "batch", "none" / False (TRL's options).
        weights: [N] float or None, multiplies the advantages (PairGRPO pair weights).
    Returns:
        [N] float32 advantages `(r - mean_g) / (std + eps) * w`.
    """
    scale = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards: expected 'group', 'batch', 'none', True or False, got {scale_rewards!r}")
    n = rewards.numel()
    if n % num_generations:
        raise ValueError(f"rewards: expected a multiple of num_generations={num_generations} values, got {n}")
    unscorable = torch.isnan(rewards)
    group_ids = torch.arange(n, device=rewards.device) // num_generations
    # An unscorable completion becomes a group of its own (advantage 0, no effect on its group's mean and std).
    group_ids = torch.where(unscorable, n + torch.arange(n, device=rewards.device), group_ids)
    clean = torch.nan_to_num(rewards, nan=0.0)
    if scale == "batch" and bool(unscorable.any()):
        # TRL's batch std ignores NaN rewards: compute it on the scorable ones, scale the centred values here.
        centred = group_advantages(clean, group_ids, eps=eps, scale="none")
        std = clean[~unscorable].std() if int((~unscorable).sum()) > 1 else clean.new_zeros(())
        adv = centred / (std + eps)
        return adv * weights if weights is not None else adv
    return group_advantages(clean, group_ids, weights=weights, eps=eps, scale=scale)


def trl_multi_reward_advantages(rewards: torch.Tensor, num_generations: int, reward_weights: torch.Tensor, *,
                                weights: torch.Tensor | None = None, eps: float = TRL_ADVANTAGE_EPS) -> torch.Tensor:
    """TRL's multi_objective_aggregation="normalize_then_sum" on `multi_reward_advantages`: each reward normalised
    in its group of `num_generations` consecutive rows, the weighted sum normalised over the batch.

    Args:
        rewards: [N, K] float, N a multiple of num_generations; NaN = not scored by that function (TRL's
            nan-reductions: out of the statistics, 0 in the sum; a row scored by none gets 0).
        reward_weights: [K] float. weights: [N] float or None, multiplies the result (PairGRPO).
    Returns:
        [N] float32 advantages.
    """
    n = rewards.shape[0]
    if n % num_generations:
        raise ValueError(f"rewards: expected a multiple of num_generations={num_generations} rows, got {n}")
    group_ids = torch.arange(n, device=rewards.device) // num_generations
    return multi_reward_advantages(rewards, group_ids, reward_weights.to(rewards), mode="normalize_then_sum",
                                   eps=eps, weights=weights)


def trl_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                    scale: torch.Tensor | float, token_weight: torch.Tensor | None = None,
                    ref_logp: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
                    entropy_mask: torch.Tensor | None = None, entropy_coef: float = 0.0,
                    sequence_kl: bool = False, **loss_kwargs) -> torch.Tensor:
    """TRL's loss of one micro-batch: `scale * clipped_policy_loss(...).loss` (the trainer's loss function).

    Args:
        logp, old_logp: [B, T] float (logp differentiable); advantages: [B] or [B, T] float; mask: [B, T].
        scale: [] tensor or float, our aggregate -> TRL's loss (module doc table).
        token_weight: [B, T] or [B, 1] float >= 0 or None, multiplies the advantage (TRL's loss multipliers).
        ref_logp: [B, T] float or None. entropy: [B, T] float (differentiable) or None; entropy_mask: [B, T]
            or None; entropy_coef: the bonus coefficient of our aggregate (TRL's coef / k / scale).
        sequence_kl: the loss type has no sequence level (vespo / gpg): run it at token level without the KL and
            add the ratio-corrected KL at sequence level from "ppo" with A = 0 (the KL term alone).
        loss_kwargs: `clipped_policy_loss` knobs (loss_type, loss_agg_mode, epsilons, beta, ...).
    Returns:
        [] float loss, differentiable in logp (and entropy).
    """
    adv = advantages
    if token_weight is not None:
        adv = (adv.unsqueeze(-1) if adv.dim() == 1 else adv) * token_weight.to(adv.dtype).expand(mask.shape)
    if sequence_kl:
        kl_kwargs = {**loss_kwargs, "loss_type": "ppo", "importance_sampling_level": "sequence"}
        kl = clipped_policy_loss(logp, old_logp, torch.zeros_like(mask, dtype=adv.dtype), mask, ref_logp=ref_logp,
                                 **kl_kwargs).loss
        loss_kwargs = {**loss_kwargs, "beta": 0.0, "kl_ratio_correction": False, "importance_sampling_level": "token"}
    out = clipped_policy_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, entropy=entropy,
                              entropy_mask=entropy_mask, entropy_coef=entropy_coef, **loss_kwargs)
    loss = out.loss + kl if sequence_kl else out.loss
    return loss * scale


def _logit_transform(config) -> tuple[float | None, float]:
    """(final_logit_softcapping or None, logit multiplier) of a causal-LM config, read as TRL's fused head reads
    them: logit_scale, else output_multiplier, else lm_head_multiplier, else logits_scaling (a divisor, except
    HyperCLOVA X's multiplier)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(text_config, name, None)
        if value is not None:
            return softcap, float(value)
    scaling = getattr(text_config, "logits_scaling", None)
    if scaling is None:
        return softcap, 1.0
    return softcap, float(scaling) if getattr(text_config, "model_type", None) == "hyperclovax" else 1.0 / scaling


def _add_head_flag(model: torch.nn.Module) -> None:
    """Let `model(..., pairuni_head_fn=f)` return `f(backbone_outputs, model.get_output_embeddings())`.

    The backbone (`model.base_model`) runs without the LM head; `f` applies the head to
    `backbone_outputs.last_hidden_state`. Without the flag the forward is the previous one, so generation and
    TRL's own fused head are untouched.
    """
    if getattr(model, "_pairuni_head_flag", False):
        return
    previous_forward = model.forward

    @functools.wraps(previous_forward)
    def forward(*args, **kwargs):
        head_fn = kwargs.pop(_HEAD_FLAG, None)
        if head_fn is None:
            return previous_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        return head_fn(model.base_model(*args, **kwargs), model.get_output_embeddings())

    model.forward = forward
    model._pairuni_head_flag = True


def _per_row(advantages: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1] (TRL's base advantages); [B, T] (subclasses') unchanged."""
    return advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    """FSDP2 shards parameters as DTensors; the head kernel needs the whole matrix."""
    return t.full_tensor() if t is not None and hasattr(t, "full_tensor") else t


class PairUniGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` whose advantages and policy loss run on pairuni kernels (see the module doc).

    Args (beyond GRPOTrainer's):
        weight_column: name of a dataset column holding one float per prompt that multiplies the
            advantages of its completions (PairGRPO: the pair weight); None for plain GRPO.
        compute_entropy: compute per-token entropies with the log-probs (TRL's `entropy` metric;
            forced on when `top_entropy_quantile < 1` or the entropy bonus is on). Costs a little per head chunk.
    """

    def __init__(self, *args, weight_column: str | None = None, compute_entropy: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_column = weight_column
        self.compute_entropy = compute_entropy or self.top_entropy_quantile < 1.0 or self._entropy_bonus_enabled
        self._pending_rewards: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._fallback_reason = self._configure_loss()
        if self._fallback_reason is not None:
            warnings.warn(f"PairUniGRPOTrainer: {self._fallback_reason}; the loss falls back to "
                          "trl.GRPOTrainer's own (advantages stay pairuni's)", stacklevel=2)
        _add_head_flag(self.model.get_base_model() if is_peft_model(self.model) else self.model)

    def _configure_loss(self) -> str | None:
        """Map TRL's loss settings to the kernels' (module doc); the reason for a fallback, or None."""
        args = self.args
        if self.loss_type not in TRL_LOSS_TYPES:  # TRL itself raises at the first loss
            raise ValueError(f"loss_type: expected one of {tuple(TRL_LOSS_TYPES)}, got {self.loss_type!r}")
        loss_type, self.loss_agg_mode = TRL_LOSS_TYPES[self.loss_type]
        softcap, logit_scale = _logit_transform(self.model.config)
        self.head_temperature = self.temperature / logit_scale if logit_scale > 0 else self.temperature
        epsilon_high, self.dual_clip_c = self.epsilon_high, None
        if args.delta is not None and loss_type == "ppo":
            epsilon_high = min(self.epsilon_high, args.delta - 1.0)
            self.dual_clip_c = max(args.delta, 1.0 + self.epsilon_high)
        # vespo's phi from TRL's get_gamma_weights (loss "gpg" with A * phi) where our vespo cannot take TRL's knobs
        self._vespo_by_phi = self.loss_type == "vespo" and min(args.vespo_k_pos, args.vespo_k_neg) < 0
        kl_correction = self.beta != 0.0 and args.use_bias_correction_kl
        self._sequence_kl = (self.loss_type == "vespo" and kl_correction
                             and self.importance_sampling_level == "sequence")
        self._loss_kwargs = dict(
            loss_type=loss_type, loss_agg_mode=self.loss_agg_mode, epsilon_low=min(self.epsilon_low, 1.0),
            epsilon_high=epsilon_high, dual_clip_c=self.dual_clip_c, beta=self.beta, kl_estimator="k3",
            kl_ratio_correction=kl_correction,
            importance_sampling_level="token" if self.loss_type == "vespo" else self.importance_sampling_level,
        )
        if loss_type == "sapo":
            self._loss_kwargs.update(sapo_temperature_pos=args.sapo_temperature_pos,
                                     sapo_temperature_neg=args.sapo_temperature_neg)
        if loss_type == "vespo":  # a lambda below 0 acts as TRL's (and our) floor 1e-4; a negative k takes phi's path
            self._loss_kwargs.update(
                vespo_k_pos=max(args.vespo_k_pos, 0.0), vespo_lambda_pos=max(args.vespo_lambda_pos, 0.0),
                vespo_k_neg=max(args.vespo_k_neg, 0.0), vespo_lambda_neg=max(args.vespo_lambda_neg, 0.0))
        self._moe_experts = None
        if self.aux_loss_enabled:
            text_config = self.model.config.get_text_config()
            experts = getattr(text_config, "num_experts", None), getattr(text_config, "num_experts_per_tok", None)
            self._moe_experts = experts if None not in experts else None
        if softcap is not None:
            return (f"model: config.final_logit_softcapping={softcap} (the pairuni head computes plain linear "
                    "logits / temperature)")
        if logit_scale <= 0:
            return f"model: a logit scale of {logit_scale} (the pairuni head folds a positive scale into the temperature)"
        if self.aux_loss_enabled and self._moe_experts is None:
            return "model: an MoE config without num_experts / num_experts_per_tok for the load-balancing loss"
        if min(self.epsilon_low, self.epsilon_high) < 0:
            return f"epsilon / epsilon_high: {self.epsilon_low} / {self.epsilon_high}, below 0"
        if self.dual_clip_c is not None and (epsilon_high < 0 or self.dual_clip_c <= 1.0):
            return f"delta: {args.delta} < 1 (or 1 with epsilon_high 0) has no dual-clip equivalent"
        if self.beta < 0:
            return f"beta: {self.beta} < 0"
        if loss_type == "sapo" and min(args.sapo_temperature_pos, args.sapo_temperature_neg) <= 0:
            return "sapo_temperature_pos / sapo_temperature_neg: <= 0"
        return None

    # ------------------------------------------------------------------ advantages
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        weights = None
        if self.weight_column is not None:
            if any(self.weight_column not in x for x in inputs):
                raise ValueError(f"weight_column: column {self.weight_column!r} missing from the dataset rows")
            local = [float(x[self.weight_column]) for x in inputs]
            weights = torch.tensor(gather_object(local), dtype=torch.float32, device=rewards_per_func.device)
        self._pending_rewards = (rewards_per_func, weights)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        rewards_per_func, weights = self._pending_rewards
        self._pending_rewards = None
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        reward_weights = self.reward_weights.to(rewards_per_func.device)
        if self.multi_objective_aggregation == "normalize_then_sum":
            advantages = trl_multi_reward_advantages(rewards_per_func, num_generations, reward_weights,
                                                     weights=weights)
        else:
            unscorable = torch.isnan(rewards_per_func).all(dim=1)
            rewards = (rewards_per_func * reward_weights).nansum(dim=1).masked_fill(unscorable, float("nan"))
            advantages = trl_group_advantages(rewards, num_generations, self.scale_rewards, weights=weights)
        n_local = output["advantages"].shape[0]
        start = self.accelerator.process_index * n_local
        output["advantages"] = advantages[start:start + n_local].to(output["advantages"].dtype)
        return output

    # ------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs):
        if self._fallback_reason is not None:
            return super()._compute_loss(model, inputs)
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        n_keep = completion_ids.size(1)
        valid = mask != 0
        with_entropy = self.compute_entropy
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        experts = self._moe_experts

        def head(backbone, lm_head: torch.nn.Module):
            hidden = backbone.last_hidden_state[:, :-1][:, -n_keep:]
            weight, bias = _full(lm_head.weight), _full(lm_head.bias)
            hidden = hidden.to(weight.device)  # a model split across devices can end on another one
            # DeepSpeed ZeRO-3 shards the head; TRL's helper gathers it (a null context otherwise)
            with maybe_gather_lm_head_ctx(weight, bias), torch.autocast(hidden.device.type, enabled=False):
                rows = hidden[valid].to(weight.dtype)
                out = linear_logprobs(rows, weight, completion_ids[valid], bias=bias,
                                      temperature=self.head_temperature, return_entropy=with_entropy)
            logp_rows, ent_rows = out if with_entropy else (out, None)
            # masked_scatter keeps the result attached to the graph even when no token is valid
            logp = logp_rows.new_zeros(valid.shape).masked_scatter(valid, logp_rows)
            entropy = None if ent_rows is None else ent_rows.new_zeros(valid.shape).masked_scatter(valid, ent_rows)
            aux = None
            if experts is not None:  # the MoE load-balancing loss of the model's own forward
                from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

                aux = load_balancing_loss_func(backbone.router_logits, experts[0], experts[1], attention_mask)
            return logp, entropy, aux

        model_inputs = {k: inputs[k] for k in _BACKBONE_KWARGS if inputs.get(k) is not None}
        if experts is not None:
            model_inputs["output_router_logits"] = True
        with self.accelerator.autocast():
            logp, entropies, aux_loss = model(input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
                                              attention_mask=attention_mask, **model_inputs, **{_HEAD_FLAG: head})

        advantages = inputs["advantages"]
        old_logp = inputs.get("old_per_token_logps")
        old_logp = logp.detach() if old_logp is None else old_logp
        high_entropy = None
        if self.top_entropy_quantile < 1.0:
            high_entropy = self.get_high_entropy_mask(entropies.detach(), mask, 1 - self.top_entropy_quantile)
        token_weight = self._token_weights(inputs, logp, old_logp, high_entropy, mask, advantages)
        loss_kwargs = self._loss_kwargs
        phi = None
        if self.loss_type == "vespo":
            phi = self.get_gamma_weights(
                _per_row(advantages), logp.detach() - old_logp, mask, inputs.get("importance_sampling_ratio"),
                k_pos=self.args.vespo_k_pos, lambda_pos=self.args.vespo_lambda_pos, k_neg=self.args.vespo_k_neg,
                lambda_neg=self.args.vespo_lambda_neg)
            if self._vespo_by_phi or inputs.get("importance_sampling_ratio") is not None:
                loss_kwargs = {**loss_kwargs, "loss_type": "gpg"}
                token_weight = phi if token_weight is None else token_weight * phi

        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        scale = self._trl_scale(inputs, mask, accumulation)
        bonus_coef, kernel_coef, effective = 0.0, 0.0, None
        if self._entropy_bonus_enabled:
            effective = mask if high_entropy is None else mask * high_entropy
            bonus_coef = self.entropy_coef
            if self.use_adaptive_entropy and not self._last_world_entropy <= self.args.entropy_target:
                bonus_coef = 0.0
            # TRL's bonus is coef * mean entropy / k on the final loss; ours is scaled with the policy aggregate
            scale_value = float(scale)
            kernel_coef = bonus_coef / accumulation / scale_value if scale_value != 0 else 0.0
        loss = trl_policy_loss(
            logp, old_logp, advantages, mask, scale=scale, token_weight=token_weight,
            ref_logp=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            entropy=entropies if self._entropy_bonus_enabled else None, entropy_mask=high_entropy,
            entropy_coef=kernel_coef, sequence_kl=self._sequence_kl, **loss_kwargs)

        if self._entropy_bonus_enabled:
            self._entropy_bonus_bookkeeping(loss, entropies, effective, bonus_coef, accumulation, mode)
        if aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._log_loss_metrics(logp, old_logp, entropies, inputs, mask, advantages, phi)
        return loss

    def _token_weights(self, inputs, logp, old_logp, high_entropy, mask, advantages) -> torch.Tensor | None:
        """Product of TRL's per-token loss multipliers (all >= 0), or None when there are none."""
        weight = None

        def times(w):
            nonlocal weight
            weight = w if weight is None else weight * w

        if self.off_policy_mask_threshold is not None:
            sampling = inputs.get("sampling_per_token_logps", old_logp)
            times(self.get_off_policy_mask(_per_row(advantages), logp, sampling, mask,
                                           self.off_policy_mask_threshold))
        if high_entropy is not None:
            times(high_entropy)
        if self.use_vllm and self.vllm_importance_sampling_correction and self.loss_type != "vespo":
            times(inputs["importance_sampling_ratio"])
        return None if weight is None else weight.to(logp.dtype).expand(mask.shape)

    def _trl_scale(self, inputs, mask, accumulation) -> torch.Tensor | float:
        """Factor from our aggregate to TRL's loss for this micro-batch (the module doc's table)."""
        rows = mask.shape[0]
        if self.loss_type in ("grpo", "sapo"):
            return (mask != 0).any(dim=-1).sum() / rows / accumulation
        if self.loss_type in ("bnpo", "luspo"):
            return 1.0 / accumulation
        if self.loss_type == "dr_grpo":
            return 1.0 / (self.max_completion_length * accumulation)
        # dapo / cispo / vespo: num_items_in_batch counts the loss tokens of the whole generation batch on all
        # processes
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if self.model.training:
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return rows / normalizer

    @torch.no_grad()
    def _entropy_bonus_bookkeeping(self, loss, entropies, effective, bonus_coef, accumulation, mode) -> None:
        """TRL's `policy_loss` / `entropy_coef` metrics and its adaptive entropy controller, updated as TRL does:
        the window's token-weighted entropy over all processes moves the coefficient by entropy_coef_delta at each
        optimizer step (up when at or below entropy_target, else down, within [entropy_coef_min, _max])."""
        args = self.args
        mean_entropy = (entropies * effective).sum() / effective.sum().clamp(min=1.0)
        policy_loss = loss.detach() + bonus_coef * mean_entropy / accumulation
        if self.loss_type in _PER_ACCUMULATION:
            policy_loss = policy_loss * accumulation  # TRL logs it before dividing by the accumulation steps
        self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
        if self.use_adaptive_entropy and mode == "train":
            stats = torch.stack([(entropies * effective).sum(), effective.sum().to(entropies.dtype)])
            window = self._entropy_window_stats
            self._entropy_window_stats = stats if window is None else window + stats
            if self.accelerator.sync_gradients:
                totals = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
                if world_entropy <= args.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

    @torch.no_grad()
    def _log_loss_metrics(self, logp, old_logp, entropies, inputs, mask, advantages, phi) -> None:
        """The metrics TRL's `_compute_loss` logs for each loss type, with TRL's names and reductions
        (token-weighted over the mask; at sequence level the ratios are one per row, averaged over rows)."""
        mode = "train" if self.model.training else "eval"
        m = mask.to(logp.dtype)
        log_ratio = logp - old_logp
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        ratio = torch.exp(log_ratio)
        adv = _per_row(advantages)
        metrics = self._metrics[mode]

        def global_mean(x):
            if x.shape[1] == 1:  # one value per row
                local = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device, dtype=x.dtype)])
            else:
                local = torch.stack([(x * m).sum(), m.sum()])
            totals = self.accelerator.reduce(local, reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def seq_mean(x):
            return x.squeeze(1) if x.shape[1] == 1 else (x * m).sum(-1) / m.sum(-1)

        if self.beta != 0.0:
            d = inputs["ref_per_token_logps"] - logp
            kl = torch.exp(d) - d - 1
            metrics["kl"].append(global_mean(kl * ratio if self.args.use_bias_correction_kl else kl))
        if entropies is not None:
            metrics["entropy"].append(global_mean(entropies))
        if self.loss_type in _CLIPPED:
            if self.args.delta is not None:  # TRL flags clipping on the ratio after its two-sided cap
                ratio = ratio.clamp(max=self.args.delta)
            low = ((ratio < 1 - self.epsilon_low) & (adv < 0)).to(m.dtype)
            high = ((ratio > 1 + self.epsilon_high) & (adv > 0)).to(m.dtype)
            metrics["clip_ratio/low_mean"].append(global_mean(low))
            metrics["clip_ratio/high_mean"].append(global_mean(high))
            metrics["clip_ratio/region_mean"].append(global_mean(torch.maximum(low, high)))
            metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(seq_mean(low))).item())
            metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(seq_mean(high))).item())
        elif self.loss_type == "cispo":
            metrics["cispo_clip_ratio"].append(global_mean(((ratio > self.epsilon_high) & (adv > 0)).to(m.dtype)))
        elif self.loss_type == "vespo":
            metrics["vespo/phi_seq_mean"].append(global_mean(phi.to(m.dtype)))
