"""TRL drop-in: `PairUniGRPOTrainer`, TRL's `GRPOTrainer` with pairuni's head and loss kernels.

    from pairuni_kernels.integrations.trl import PairUniGRPOTrainer   # instead of trl.GRPOTrainer
    trainer = PairUniGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)
    trainer.train()

Everything TRL does (generation, rewards, logging, accumulation, checkpoints) stays TRL's; two
steps change:
  * advantages: `group_advantages(rewards, prompt groups, eps=1e-4, scale=args.scale_rewards)`,
    optionally multiplied by a per-prompt weight column (`weight_column=`, e.g. PairGRPO's
    `pair_weights`), instead of TRL's own normalisation (same numbers without weights);
  * loss: the backbone's hidden states of the completion positions go to `linear_logprobs`
    (chunked, never the [B, T, V] logits) and then to `clipped_policy_loss`, with TRL's loss type
    mapped to our aggregation. By the pairuni contract this is exactly `fused_linear_policy_loss`;
    we call its two halves because TRL's default on-policy step uses `old_logp = logp.detach()`
    (unknown before the head runs) and because TRL's per-token metrics (clip low/high, entropy,
    the entropy and off-policy masks) need the token log-probs and entropies.

The head runs inside the model's forward (a flag added to `model.forward`, as TRL does for its own
fused head), so DDP / FSDP see every parameter used in forward.

TRL loss types (TRL 1.16 definitions) and their pairuni counterparts, with S = masked sum of
per-token losses of the micro-batch of B completions:
    grpo     mean over the B rows of row mean   = seq-mean-token-mean x (non-empty rows / B)
    bnpo     S / local token count              = token-mean
    dr_grpo  S / (B * max_completion_length)    = seq-mean-token-sum / max_completion_length
    dapo     S / (tokens of the generation batch per process, per accumulation step)
                                                 = seq-mean-token-sum x B / that normaliser
grpo, bnpo and dr_grpo are further divided by the gradient-accumulation steps in training, as in
TRL. `delta` (two-sided clipping) is our `dual_clip_c` (identical when delta > 1 + epsilon_high,
which is required); entropy / off-policy masks and vLLM importance weights multiply the advantage
(the clipped surrogate is positively homogeneous in A, so this equals weighting the token loss).

Not supported (ValueError at construction): loss types cispo / sapo / luspo / vespo, the entropy
bonus (`entropy_coef`, `use_adaptive_entropy`), MoE router aux loss, `beta > 0` with
`use_bias_correction_kl=True` (set it False for the plain k3 KL), `multi_objective_aggregation=
"normalize_then_sum"`, models with logit soft-capping or logit scaling. The head runs in the
lm_head weight's dtype with autocast off (TRL runs it under autocast). Token log-ratios are
clamped to +-20 before `exp` (TRL does not clamp). Multimodal inputs are passed through to the
backbone but are untested here.
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

from ..advantages import group_advantages
from ..linear_logprobs import linear_logprobs
from ..policy_loss import clipped_policy_loss

__all__ = ["LOSS_TYPE_TO_AGG_MODE", "PairUniGRPOTrainer", "trl_group_advantages"]

#: TRL loss_type -> the pairuni loss_agg_mode its aggregation is computed from (then rescaled, see module doc).
LOSS_TYPE_TO_AGG_MODE = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum",
    "dapo": "seq-mean-token-sum",
}
#: The TRL release this adapter's overrides were written against and tested with. It overrides private
#: GRPOTrainer methods (_compute_loss, _calculate_rewards, _generate_and_score_completions), which TRL may change.
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


def _logit_transform_of(config) -> str | None:
    """Name of a logit soft-cap / scale attribute the fused head cannot reproduce, or None."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                 "logits_scaling"):
        if getattr(text_config, name, None) not in (None, 1, 1.0):
            return name
    return None


def _add_head_flag(model: torch.nn.Module) -> None:
    """Let `model(..., pairuni_head_fn=f)` return `f(hidden[:, :-1], model.get_output_embeddings())`.

    The backbone (`model.base_model`) runs without the LM head; `f` applies the head. Without the flag
    the forward is the previous one, so generation and TRL's own fused head are untouched.
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
        hidden = model.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        return head_fn(hidden, model.get_output_embeddings())

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
            forced on when `top_entropy_quantile < 1`). Costs a little per head chunk.
    """

    def __init__(self, *args, weight_column: str | None = None, compute_entropy: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_column = weight_column
        self.compute_entropy = compute_entropy or self.top_entropy_quantile < 1.0
        self._check_supported()
        self.loss_agg_mode = LOSS_TYPE_TO_AGG_MODE[self.loss_type]
        self.dual_clip_c = self.args.delta
        _add_head_flag(self.model.get_base_model() if is_peft_model(self.model) else self.model)
        self._pending_rewards: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _check_supported(self) -> None:
        args = self.args
        if self.loss_type not in LOSS_TYPE_TO_AGG_MODE:
            raise ValueError(f"loss_type: PairUniGRPOTrainer supports {sorted(LOSS_TYPE_TO_AGG_MODE)}, "
                             f"got {self.loss_type!r}; use trl.GRPOTrainer for it")
        if args.delta is not None and not args.delta > 1.0 + self.epsilon_high:
            raise ValueError(f"delta: expected > 1 + epsilon_high = {1.0 + self.epsilon_high} (it becomes the "
                             f"dual-clip bound), got {args.delta}")
        if self.beta != 0.0 and args.use_bias_correction_kl:
            raise ValueError("use_bias_correction_kl: not supported with beta > 0; set it to False (plain k3 KL)")
        if self._entropy_bonus_enabled:
            raise ValueError("entropy_coef / use_adaptive_entropy: the entropy bonus is not supported")
        if self.aux_loss_enabled:
            raise ValueError("router_aux_loss_coef: the MoE load-balancing loss is not supported; set it to 0")
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(f"multi_objective_aggregation: only 'sum_then_normalize' is supported, "
                             f"got {self.multi_objective_aggregation!r}")
        transform = _logit_transform_of(self.model.config)
        if transform is not None:
            raise ValueError(f"model: config.{transform} is set; the fused head computes plain "
                             f"logits / temperature, so use trl.GRPOTrainer for this model")

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
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        rewards = rewards.masked_fill(unscorable, float("nan"))
        advantages = trl_group_advantages(rewards, num_generations, self.scale_rewards, weights=weights)
        n_local = output["advantages"].shape[0]
        start = self.accelerator.process_index * n_local
        output["advantages"] = advantages[start:start + n_local].to(output["advantages"].dtype)
        return output

    # ------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        n_keep = completion_ids.size(1)
        valid = mask != 0
        with_entropy = self.compute_entropy

        def head(hidden: torch.Tensor, lm_head: torch.nn.Module):
            hidden = hidden[:, -n_keep:]
            weight, bias = _full(lm_head.weight), _full(lm_head.bias)
            # DeepSpeed ZeRO-3 shards the head; TRL's helper gathers it (a null context otherwise)
            with maybe_gather_lm_head_ctx(weight, bias), torch.autocast(hidden.device.type, enabled=False):
                rows = hidden[valid].to(weight.dtype)
                out = linear_logprobs(rows, weight, completion_ids[valid], bias=bias, temperature=self.temperature,
                                      return_entropy=with_entropy)
            logp_rows, ent_rows = out if with_entropy else (out, None)
            # masked_scatter keeps the result attached to the graph even when no token is valid
            logp = logp_rows.new_zeros(valid.shape).masked_scatter(valid, logp_rows)
            entropy = None if ent_rows is None else ent_rows.new_zeros(valid.shape).masked_scatter(valid, ent_rows)
            return logp, entropy

        model_inputs = {k: inputs[k] for k in _BACKBONE_KWARGS if inputs.get(k) is not None}
        with self.accelerator.autocast():
            logp, entropies = model(
                input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
                attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
                **model_inputs, **{_HEAD_FLAG: head},
            )

        advantages = inputs["advantages"]
        old_logp = inputs.get("old_per_token_logps")
        old_logp = logp.detach() if old_logp is None else old_logp
        token_weight = self._token_weights(inputs, logp, old_logp, entropies, mask, advantages)
        adv = advantages if token_weight is None else _per_row(advantages) * token_weight
        out = clipped_policy_loss(
            logp, old_logp, adv, mask, ref_logp=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, dual_clip_c=self.dual_clip_c,
            beta=self.beta, kl_estimator="k3", loss_agg_mode=self.loss_agg_mode,
            importance_sampling_level=self.importance_sampling_level,
        )
        loss = out.loss * self._trl_scale(inputs, mask)
        self._log_loss_metrics(logp, old_logp, entropies, inputs, mask, advantages)
        return loss

    def _token_weights(self, inputs, logp, old_logp, entropies, mask, advantages) -> torch.Tensor | None:
        """Product of TRL's per-token loss multipliers (all >= 0), or None when there are none."""
        weight = None

        def times(w):
            nonlocal weight
            weight = w if weight is None else weight * w

        if self.off_policy_mask_threshold is not None:
            sampling = inputs.get("sampling_per_token_logps", old_logp)
            times(self.get_off_policy_mask(_per_row(advantages), logp, sampling, mask,
                                           self.off_policy_mask_threshold))
        if self.top_entropy_quantile < 1.0:
            times(self.get_high_entropy_mask(entropies.detach(), mask, 1 - self.top_entropy_quantile))
        if self.use_vllm and self.vllm_importance_sampling_correction:
            times(inputs["importance_sampling_ratio"])
        return None if weight is None else weight.to(logp.dtype).expand(mask.shape)

    def _trl_scale(self, inputs, mask) -> torch.Tensor | float:
        """Factor from our aggregate to TRL's loss for this micro-batch (see the module doc)."""
        train = self.model.training
        accumulation = self.current_gradient_accumulation_steps if train else 1.0
        rows = mask.shape[0]
        if self.loss_type == "grpo":
            return (mask != 0).any(dim=-1).sum() / rows / accumulation
        if self.loss_type == "bnpo":
            return 1.0 / accumulation
        if self.loss_type == "dr_grpo":
            return 1.0 / (self.max_completion_length * accumulation)
        # dapo: num_items_in_batch counts the loss tokens of the whole generation batch on all processes
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if train:
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return rows / normalizer

    @torch.no_grad()
    def _log_loss_metrics(self, logp, old_logp, entropies, inputs, mask, advantages) -> None:
        """The metrics TRL's `_compute_loss` logs for the clipped loss types, with TRL's names and reductions
        (token-weighted over the mask; at sequence level the clip flags are one per row, averaged over rows)."""
        mode = "train" if self.model.training else "eval"
        m = mask.to(logp.dtype)
        log_ratio = logp - old_logp
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        ratio = torch.exp(log_ratio)
        adv = _per_row(advantages)

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
            self._metrics[mode]["kl"].append(global_mean(torch.exp(d) - d - 1))
        if entropies is not None:
            self._metrics[mode]["entropy"].append(global_mean(entropies))
        low = ((ratio < 1 - self.epsilon_low) & (adv < 0)).to(m.dtype)
        high = ((ratio > 1 + self.epsilon_high) & (adv > 0)).to(m.dtype)
        self._metrics[mode]["clip_ratio/low_mean"].append(global_mean(low))
        self._metrics[mode]["clip_ratio/high_mean"].append(global_mean(high))
        self._metrics[mode]["clip_ratio/region_mean"].append(global_mean(torch.maximum(low, high)))
        self._metrics[mode]["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(seq_mean(low))).item())
        self._metrics[mode]["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(seq_mean(high))).item())
