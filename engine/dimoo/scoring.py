"""Scoring what DiMOO's samplers drew: each revealed token's log-probability at its recorded state, with the
sampler's own guidance, temperature and vocabulary slice (../shared/DIMOO.md section 3.7), differentiable.

    sc = score_rollout(model_logits_fn(model, ids.image_slice), ro, score_groups=4)
    out = pairuni_kernels.clipped_policy_loss(sc.logp, ro.old_logp, advantages, sc.mask)      # [B, P] tokens

    hi = head_inputs(model_hidden_fn(model), ro, score_groups=4)                              # fused linear head
    out = pairuni_kernels.fused_linear_policy_loss(hi.hidden, model.head_weight(ids.image_slice), hi.targets,
                                                   ro.old_logp, advantages, hi.mask, temperature=hi.temperature)

For sample b and position p revealed at step t (`ro.step_map`), the term is
    log softmax(cfg_mix(c, u, g) / T)[token - vocab_offset],   c, u = the logits at p of state s and its
    unconditional row, g = ro.guidance_scale, T = ro.scoring_temperature,
the distribution the sampler drew the token from when s is the state at step t.

Groups: the steps that revealed tokens are split into at most `score_groups` runs of consecutive steps
(`score_plan`: as even as possible, the larger runs first); each run costs one forward per sample (two model calls
with CFG: conditional and unconditional rows), and ALL its tokens are scored at the state of the run's FIRST step
(its tokens are still masked there). With one step per run (score_groups >= steps that revealed tokens) every
token is scored at its true state: EXACT. With fewer groups, a token revealed at a later step of its run is scored
at an earlier state (fewer tokens revealed than the sampler saw): an APPROXIMATION (dLLM-RL's TraceRL shrink > 1,
DIMOO.md 3.7); `ScoredRollout.exact` says which.

What the product of the terms is (the exactness argument, tested in tests/engine/dimoo/test_exact_mode.py):
- `random` order: the positions revealed at each step come from the sample's seed alone, and every value is drawn
  once, at its reveal step, from softmax(cfg_mix(c, u, g) / T) with noise keyed by (sample, position, step). So
  P_theta(trajectory) = P(order) * prod_t prod_{p in R_t} p_theta(x_p | s_t), P(order) does not depend on theta,
  and with exact scoring pi_theta / pi_old of a trajectory is exactly exp(sum(logp - old_logp)).
- `confidence` order: which positions are revealed depends on the drawn values and the model (top confidence);
  P(x_R, R | s) sums over the discarded draws at the other masked positions and is not tractable. The scored
  product omits the position choice: it is p_theta(x_R | s, R chosen) as if R had been fixed in advance, an
  approximation of the trajectory ratio (as TraceRL's, DIMOO.md 3.7).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pairuni_kernels.reference import cfg_mix, compute_dtype

from .sampler import DiffusionRollout, LogitsFn

HiddenFn = Callable[[torch.Tensor], torch.Tensor]


def score_plan(ro: DiffusionRollout, score_groups: int | None = None) -> list[list[int]]:
    """The steps that revealed tokens, in at most `score_groups` runs of consecutive ones (None: one per step);
    run i is scored at the state of its first step."""
    steps = [t for t, k in enumerate(ro.schedule) if k > 0]
    if score_groups is None:
        score_groups = len(steps)
    if isinstance(score_groups, bool) or not isinstance(score_groups, int) or score_groups < 1:
        raise ValueError(f"score_groups: expected an int >= 1, got {score_groups!r}")
    groups = min(score_groups, len(steps))
    base, extra = divmod(len(steps), groups)
    runs, i = [], 0
    for g in range(groups):
        size = base + (g < extra)
        runs.append(steps[i: i + size])
        i += size
    return runs


@dataclass
class ScoredRollout:
    """Token log-probs of a DiffusionRollout, aligned with `ro.positions`.

    logp:         [B, P] float (fp32; fp64 for fp64 logits), differentiable: position p's token at its group's state.
    mask:         [B, P] bool, the tokens scored (every revealed position).
    reveal_masks: [B, steps, P] bool, position p revealed at step t (ro.reveal_masks()).
    group_masks:  [B, G, P] bool, position p scored by group g.
    exact:        every token scored at its own reveal step's state.
    """

    logp: torch.Tensor
    mask: torch.Tensor
    reveal_masks: torch.Tensor
    group_masks: torch.Tensor
    exact: bool
    temperature: float


def _group_rows(ro: DiffusionRollout, run: list[int]):
    """(state step, b_idx [R], p_idx [R], group mask [B, P]) of a run of steps."""
    member = torch.zeros_like(ro.step_map, dtype=torch.bool)
    for t in run:
        member |= ro.step_map == t
    b_idx, p_idx = member.nonzero(as_tuple=True)
    return run[0], b_idx, p_idx, member


def _branches(fn, ro: DiffusionRollout, step: int, b_idx, p_idx, what: str):
    """(cond [R, X], uncond [R, X] or None) of `fn` at the state of `step`, rows (b_idx, positions[p_idx])."""
    if isinstance(fn, (tuple, list)):
        if len(fn) != 2:
            raise ValueError(f"{what}: expected a callable or a (cond_fn, uncond_fn) pair")
        cond_fn, uncond_fn = fn
    else:
        cond_fn = uncond_fn = fn

    def run(f, rows, cols):
        out = f(rows)
        if not isinstance(out, torch.Tensor) or out.dim() != 3 or tuple(out.shape[:2]) != tuple(rows.shape) \
                or not out.is_floating_point():
            raise ValueError(f"{what}: expected float [{rows.shape[0]}, {rows.shape[1]}, X], got "
                             f"{getattr(out, 'dtype', type(out))} {tuple(getattr(out, 'shape', ()))}")
        return out[b_idx, cols[p_idx]]

    cond = run(cond_fn, ro.state(step), ro.positions)
    if ro.uncond_start is None:
        return cond, None
    return cond, run(uncond_fn, ro.uncond_state(step), ro.uncond_columns)


def score_rollout(logits_fn: LogitsFn | Sequence[LogitsFn], ro: DiffusionRollout, *,
                  score_groups: int | None = None) -> ScoredRollout:
    """Differentiable token log-probs of `ro` (see the module docstring); `logits_fn` as the sampler's: ids
    [B, L] -> [B, L, V] logits of the same vocabulary slice. At most `score_groups` guided forwards."""
    runs = score_plan(ro, score_groups)
    targets = ro.targets()
    b, p = ro.step_map.shape
    logp, groups = None, []
    temperature = ro.scoring_temperature
    for run in runs:
        step, b_idx, p_idx, member = _group_rows(ro, run)
        groups.append(member)
        cond, uncond = _branches(logits_fn, ro, step, b_idx, p_idx, "logits_fn")
        if cond.shape[1] != ro.vocab_size:
            raise ValueError(f"logits_fn: expected V={ro.vocab_size} (the sampler's slice), got {cond.shape[1]}")
        dt = compute_dtype(cond.dtype)
        guided = cond.to(dt) if uncond is None else cfg_mix(cond.to(dt), uncond.to(dt), ro.guidance_scale)
        lp = torch.log_softmax(guided / temperature, dim=-1).gather(1, targets[b_idx, p_idx][:, None])[:, 0]
        if logp is None:
            logp = torch.zeros(b, p, dtype=dt, device=lp.device)
        logp = logp.index_put((b_idx, p_idx), lp.to(dt))
    return ScoredRollout(logp, ro.step_map >= 0, ro.reveal_masks(), torch.stack(groups, 1),
                         exact=all(len(r) == 1 for r in runs), temperature=temperature)


@dataclass
class HeadInputs:
    """Inputs of the fused linear policy loss for a DiffusionRollout.

    hidden:  [B, P, H] guided hidden states cfg_mix(h_c, h_u, g) at each position's group state (differentiable);
             hidden @ W[slice].T are the guided logits, the head being linear without bias.
    targets: [B, P] long, columns of the vocabulary slice; mask: [B, P] bool; temperature: the scoring temperature.
    """

    hidden: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    temperature: float
    exact: bool


def head_inputs(hidden_fn: HiddenFn | Sequence[HiddenFn], ro: DiffusionRollout, *,
                score_groups: int | None = None) -> HeadInputs:
    """The hidden-state path of `score_rollout`: hidden_fn(ids [B, L]) -> [B, L, H] final hidden states (after the
    last norm). `linear_logprobs(hi.hidden.flatten(0, 1), W, hi.targets.flatten(), temperature=hi.temperature)`
    equals `score_rollout(...).logp` up to rounding, W = the head's rows of the sampler's slice."""
    runs = score_plan(ro, score_groups)
    b, p = ro.step_map.shape
    hidden = None
    for run in runs:
        step, b_idx, p_idx, _ = _group_rows(ro, run)
        hc, hu = _branches(hidden_fn, ro, step, b_idx, p_idx, "hidden_fn")
        h = hc if hu is None else cfg_mix(hc, hu, ro.guidance_scale)
        if hidden is None:
            hidden = h.new_zeros(b, p, h.shape[1])
        hidden = hidden.index_put((b_idx, p_idx), h)
    return HeadInputs(hidden, ro.targets(), ro.step_map >= 0, ro.scoring_temperature,
                      exact=all(len(r) == 1 for r in runs))


def model_hidden_fn(model) -> HiddenFn:
    """A `hidden_fn` of a DimooModel: ids [B, L] -> [B, L, H] hidden states after ln_f."""
    return lambda ids: model(ids, return_logits=False, return_hidden=True).hidden


def trajectory_logprob(scored: ScoredRollout) -> torch.Tensor:
    """[B] sum of the scored token log-probs: with `random` order and exact scoring, log P_theta(trajectory)
    minus the theta-free log P(order)."""
    return torch.where(scored.mask, scored.logp, torch.zeros_like(scored.logp)).sum(1)


def log_order_probability(ro: DiffusionRollout) -> float:
    """log P(reveal sets) of the `random` order: the order is a uniform permutation (63-bit keys; ties at
    2^-63 ignored), so the sequence of reveal sets has probability prod_t k_t! / P! (schedule k_t)."""
    if ro.order != "random":
        raise ValueError(f"ro: the reveal-set probability is theta-free only for the random order, got {ro.order!r}")
    if ro.block_length is None:
        return sum(math.lgamma(k + 1) for k in ro.schedule) - math.lgamma(len(ro.positions) + 1)
    blocks = len(ro.positions) // ro.block_length
    return sum(math.lgamma(k + 1) for k in ro.schedule) - blocks * math.lgamma(ro.block_length + 1)
