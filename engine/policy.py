"""The policy seen one task at a time: what the loss, the reference log-probs and the probe score.

    view = task_view(model, "generation", batch.gen, rows)
    logp = linear_logprobs(view.hidden.flatten(0, 1), view.weight, view.targets.flatten(), bias=view.bias,
                           temperature=view.temperature)

A PairGRPO step trains two tasks through one language model. They differ only in which
rollout they read and in five facts, gathered here once:

| task          | hidden states (teacher-forced)        | head                       | targets        | mask          |
|---------------|---------------------------------------|----------------------------|----------------|---------------|
| understanding | final states before each answer token | lm_head (weight, no bias)  | response_ids   | response_mask |
| generation    | gelu(proj_out(h)) before each image token | vision_head (weight, bias) | image_tokens | all ones      |

and the scoring temperature: the rollout's sampling temperature, or 1 for greedy rollouts.
With `image_logprob="cfg"` the generation hidden states are the CFG mix `h_u + s (h_c - h_u)`;
the image head's last layer is affine, so its output on the mix is exactly the guided logits.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import torch

from pairuni_kernels.reference import cfg_mix

from . import model as janus
from .config import Config, ImageLogprob, require

TASKS = ("understanding", "generation")
#: How an image token's policy log-prob is scored: the conditional branch (T2I-R1 / PairUni) or the
#: CFG-guided distribution the token was drawn from.
IMAGE_LOGPROBS = typing.get_args(ImageLogprob)


def check_config(cfg: Config, world: int | None) -> None:
    """Scoring the guided distribution (`rollout.image_logprob=cfg`) needs untruncated sampling."""
    r = cfg.rollout
    if r.image_logprob == "cfg":
        require(r.image_top_k == 0 and r.image_top_p == 1.0, "rollout.image_logprob",
                "cond when top-k/top-p is on (the trainer scores the untruncated guided distribution)", r.image_logprob)


def scoring_temperature(sampling_temperature: float) -> float:
    """Temperature the policy's log-probs are scored at: greedy rollouts (0) are scored at 1."""
    return sampling_temperature if sampling_temperature > 0 else 1.0


@dataclass
class TaskView:
    """One task's policy on some rollout rows, ready for `fused_linear_policy_loss` / `linear_logprobs`.

    hidden: [b, T, H] inputs of the head's last linear layer; weight [V, H], bias [V] or None (with a LoRA
        adapter on the head, H counts its r extra features: `engine.lora.linear_operands`);
    targets: [b, T] long; mask: [b, T] bool; temperature: the scoring temperature.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets: torch.Tensor
    mask: torch.Tensor
    temperature: float


def task_mask(task: str, rollout) -> torch.Tensor:
    """[B, T] bool: the tokens of `rollout` that the task's loss counts (every image token; answer
    tokens up to and including EOS)."""
    if task == "understanding":
        return rollout.response_mask
    if task == "generation":
        return torch.ones_like(rollout.image_tokens, dtype=torch.bool)
    raise ValueError(f"task: expected one of {TASKS}, got {task!r}")


def task_view(model, task: str, rollout, rows=slice(None)) -> TaskView:
    """Teacher-forced view of `model` for `task` on `rollout[rows]` (differentiable when grad is on)."""
    mask = task_mask(task, rollout)[rows]
    temperature = scoring_temperature(rollout.temperature)
    if task == "understanding":
        hidden, weight, bias = janus.text_head_operands(model, understanding_hidden(model, rollout, rows))
        return TaskView(hidden, weight, bias, rollout.response_ids[rows], mask, temperature)
    hidden, weight, bias = janus.image_head_operands(model, generation_head_input(model, rollout, rows))
    return TaskView(hidden, weight, bias, rollout.image_tokens[rows], mask, temperature)


# ----------------------------------------------------------------------------- teacher forcing
def understanding_hidden(model, ro, rows=slice(None)) -> torch.Tensor:
    """Teacher-forced [b, T, H] hidden states that predict `ro.response_ids[rows]` (an UnderstandingRollout)."""
    p_ids, p_mask = ro.prompt_ids[rows], ro.prompt_mask[rows]
    resp = ro.response_ids[rows]
    pv = ro.pixel_values[rows] if ro.pixel_values is not None else None
    lp, t = p_ids.shape[1], resp.shape[1]
    embeds = torch.cat([janus.text_embeddings(model, p_ids, pv), model.get_input_embeddings()(resp[:, :-1])], 1)
    mask = torch.cat([p_mask, p_mask.new_ones(p_mask.shape[0], t - 1)], 1)
    h = janus.policy_hidden(model, embeds, mask, janus.positions_from_mask(mask))
    return h[:, lp - 1: lp - 1 + t]


def generation_head_input(model, ro, rows=slice(None)) -> torch.Tensor:
    """Teacher-forced [b, K, P] inputs of the image head's last linear layer for `ro.image_tokens[rows]`
    (a GenerationRollout); the CFG mix when `ro.image_logprob == "cfg"`."""
    tok = ro.image_tokens[rows]
    k = tok.shape[1]
    img = janus.image_token_embeddings(model, tok[:, :-1])

    def branch(p_ids):
        lp = p_ids.shape[1]
        p_mask = ro.prompt_mask[rows]
        embeds = torch.cat([model.get_input_embeddings()(p_ids), img], 1)
        mask = torch.cat([p_mask, p_mask.new_ones(p_mask.shape[0], k - 1)], 1)
        h = janus.policy_hidden(model, embeds, mask, janus.positions_from_mask(mask))
        return janus.image_head_input(model, h[:, lp - 1: lp - 1 + k])

    hc = branch(ro.prompt_ids[rows])
    if ro.image_logprob == "cond":
        return hc
    hu = branch(ro.uncond_ids[rows])
    return cfg_mix(hc, hu, ro.cfg_scale)
