"""PairGRPO on DiMOO: the Janus engine's step (engine/trainer.py) with DiMOO's rollouts and scoring.

    world = ToyDimooWorld.build(pairs, data_root); model = world.tiny_model(seed=0)
    cfg = DimooGRPOConfig(group_size=8)
    batch = make_batch(model, world, pairs, cfg, seed=0, step=1)      # rollouts, rewards, advantages (no grad)
    metrics = update(model, optimizer, world, batch, cfg)                # mu optimizer steps
    # or: metrics = train_step(model, optimizer, world, pairs, cfg, seed=0, step=1)

The same ops as the Janus engine, in the same order (engine/trainer.py `make_batch`, `backward`):
1. rollouts: per pair, G answers (`sampler.sample_text` over the toy text slice) and G images
   (`sampler.sample_image`, CFG with the `<uncondition>` row, over the codebook slice); the G rows of one prompt
   are one call, so they are batched without padding and each row is the same at batch 1 and G.
2. rewards: understanding = the toy world's answer check on the decoded answer; generation = its pixel reward
   on the painter VQ's image (engine/dimoo/toyworld.py).
3. advantages: `pairuni_kernels.group_advantages` per (task, pair) group of G rows, times
   `pair_weights(similarity, aligned)` (1 aligned, sqrt(s) retrieved) of the row's pair.
4. update, `mu` inner epochs, each one optimizer step: the loss is
       understanding_weight * L_und + generation_weight * L_gen,
       L_task = `fused_linear_policy_loss` over all of the task's rows and tokens of the batch,
   with the fused head = the model's output projection restricted to the task's slice (text ids [0, n) or the
   image codes) applied to the guided hidden states `cfg_mix(h_c, h_u, 1 + w)` at each token's scoring state
   (scoring.head_inputs; the head is linear, so these give exactly the sampler's guided logits), old log-probs
   = the sampler's (`DiffusionRollout.old_logp`), temperature = the sampler's.
   Gradient per score group: for each pair's rollout, the steps are split into at most `score_groups` runs
   (`scoring.score_plan`); each run is one forward (conditional + unconditional rows), its tokens' loss is
   backpropagated at once, scaled by `loss_share(run mask, mode, den_task)` (engine/trainer.py's micro-batch
   rule, here a run is the part), and its activations are freed before the next run's forward. So a step holds
   ONE run's forward at a time (<= score_groups), and the accumulated gradient equals that of the one-shot loss
   (tests/engine/dimoo/test_pairgrpo.py compares both, and both with a float64 re-computation).

Loss aggregation: parts are runs of tokens, not whole rows, which `loss_share` splits exactly for "token-mean",
"seq-mean-token-sum" and "seq-mean-token-sum-norm"; "seq-mean-token-mean" divides each row by its own count
and is refused (one-line ValueError), as is sequence-level importance sampling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field, fields

import torch

from pairuni_kernels import fused_linear_policy_loss, linear_logprobs, pair_weights
from pairuni_kernels.policy_loss import loss_denominator, loss_share
from pairuni_kernels.reference import COV_SELECTION_MODES, ROW_COUPLED_LOSS_TYPES, cfg_mix

from .. import algo as algo_ops
from ..algo import AlgoConfig
from ..rollout import rollout_seeds
from .sampler import REVEAL_ORDERS, DiffusionRollout, model_logits_fn, sample_image, sample_text
from .scoring import _branches, _group_rows, model_hidden_fn, score_plan

TASKS = ("understanding", "generation")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


#: What the DiMOO step refuses of `AlgoConfig`, and why (`unsupported`). A score run is a set of a rollout's
#: tokens, not whole rows, and the update has no reference-model pass.
ROW_LOSS_TYPES = ROW_COUPLED_LOSS_TYPES + COV_SELECTION_MODES


def unsupported(a: AlgoConfig) -> tuple[str, str] | None:
    """(key, why) of the first `algo.` setting the DiMOO step cannot run, or None. Whole-row operations (the
    sequence-level ratio, seq-mean-token-mean, the row-coupled loss types vespo / geo_mean), batch-wide token
    choices (clip_cov / kl_cov, the top-entropy mask) and reinforce++'s token returns (a reveal order is not a
    time order) need a row's or the batch's tokens in one place; DiMOO scores a row in `score_groups` runs."""
    if a.loss_agg_mode not in LOSS_AGG_MODES:
        return "loss_agg_mode", f"one of {' | '.join(LOSS_AGG_MODES)} (a score run is part of a row)"
    if a.importance_sampling_level != "token":
        return "importance_sampling_level", "token (a score run is part of a row)"
    if a.loss_type in ROW_LOSS_TYPES:
        return "loss_type", f"none of {' / '.join(ROW_LOSS_TYPES)} (they read a whole row or batch at once)"
    if a.top_entropy_quantile != 1:
        return "top_entropy_quantile", "1 (the top-entropy mask needs the batch's tokens at once)"
    if a.advantage_estimator == "reinforce_plus_plus":
        return "advantage_estimator", "an outcome estimator (reinforce++ discounts along a time order; a reveal " \
            "order is not one)"
    if a.entropy_coef != 0 and a.entropy_agg_mode != a.loss_agg_mode:
        return "entropy_agg_mode", f"algo.loss_agg_mode ({a.loss_agg_mode}): runs are weighted by the loss's mode"
    return None


def _dimoo_algo() -> AlgoConfig:
    return AlgoConfig(mu=1)


@dataclass(frozen=True)
class DimooGRPOConfig:
    """Knobs of the DiMOO PairGRPO step: the samplers' and the scoring's here, the objective's in `algo` (the
    engine's `AlgoConfig`, the `algo.` section of a run's config: loss type and knobs, clips, mu, pair weights,
    estimator, task weights), so every loss type the DiMOO step can run reaches it with the Janus engine's names.

    group_size: G rollouts per prompt; score_groups: forwards per rollout in the update (None: one per step,
    exact); image_steps / text_steps / block_length: the samplers'; cfg_scale: image CFG w (guided
    (1 + w) c - w u); image_temperature / text_temperature: sampling temperatures (> 0 for RL); order: reveal
    order ("random": exact ratio; "confidence": DiMOO's, approximate); max_grad_norm: clip (None: no clipping);
    algo: the objective (default AlgoConfig(mu=1)); settings `unsupported` names are refused."""

    group_size: int = 8
    score_groups: int | None = None
    image_steps: int = 4
    text_steps: int = 2
    block_length: int = 2
    cfg_scale: float = 1.0
    image_temperature: float = 1.0
    text_temperature: float = 1.0
    order: str = "random"
    max_grad_norm: float | None = 1.0
    algo: AlgoConfig = field(default_factory=_dimoo_algo)

    def __post_init__(self):
        for name in ("group_size", "image_steps", "text_steps", "block_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if self.score_groups is not None and (isinstance(self.score_groups, bool)
                                              or not isinstance(self.score_groups, int) or self.score_groups < 1):
            raise ValueError(f"score_groups: expected None or an int >= 1, got {self.score_groups!r}")
        if self.order not in REVEAL_ORDERS:
            raise ValueError(f"order: expected one of {REVEAL_ORDERS}, got {self.order!r}")
        for name in ("image_temperature", "text_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected > 0 (RL needs sampled, scored tokens), got {getattr(self, name)}")
        if not isinstance(self.algo, AlgoConfig):
            raise ValueError(f"algo: expected an engine.algo.AlgoConfig, got {type(self.algo).__name__}")
        a = self.algo
        if not (isinstance(a.mu, int) and a.mu >= 1):
            raise ValueError(f"algo.mu: expected an int >= 1, got {a.mu!r}")
        for name in ("understanding_weight", "generation_weight", "epsilon_low", "epsilon_high"):
            v = getattr(a, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"algo.{name}: expected a finite float >= 0, got {v!r}")
        bad = unsupported(a)
        if bad is not None:
            raise ValueError(f"algo.{bad[0]}: expected {bad[1]}, got {getattr(a, bad[0])!r}")

    def replace(self, **changes) -> DimooGRPOConfig:
        known = {f.name for f in fields(self)}
        bad = sorted(set(changes) - known)
        if bad:
            raise ValueError(f"changes: unknown keys {bad}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-safe {field: value}, `algo` as its own dict (what a checkpoint's state.json holds)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DimooGRPOConfig:
        """The inverse of `to_dict`; unknown keys refused in one line (ValueError)."""
        d = dict(d)
        algo = d.pop("algo", None)
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"cfg: unknown keys {bad}")
        if algo is not None:
            names = {f.name for f in fields(AlgoConfig)}
            if set(algo) - names:
                raise ValueError(f"cfg.algo: unknown keys {sorted(set(algo) - names)}")
            d["algo"] = AlgoConfig(**algo)
        return cls(**d)


@dataclass
class TaskBatch:
    """One task's rollouts of a step: P pairs x G rows.

    rollouts: P DiffusionRollouts, rollout p holds rows p*G .. p*G+G-1 (each [G, L_p], positions [T]).
    rewards, advantages: [P * G] float32, row p*G + g = rollout p's sample g.
    outputs: the decoded answers (understanding, list of P*G str) or images ([P*G, 3, S, S]).
    ref_logp: with algo.beta > 0, per rollout [G, T] float32 log-probs of its tokens under the reference model,
    each at its score run's state with the sampler's guidance and temperature (`reference_logprobs`), else None."""

    rollouts: list[DiffusionRollout]
    rewards: torch.Tensor
    advantages: torch.Tensor
    outputs: object
    ref_logp: list[torch.Tensor] | None = None


@dataclass
class DimooBatch:
    """Rollouts, rewards and advantages of one step's pairs, both tasks."""

    pairs: list
    und: TaskBatch
    gen: TaskBatch

    def task(self, name: str) -> TaskBatch:
        return self.und if name == "understanding" else self.gen


# ----------------------------------------------------------------------------- rollouts
def task_head(model, world, task: str) -> slice:
    """The vocabulary slice of `task`'s head: the toy text ids (understanding) or the image codes (generation)."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    return world.text_slice if task == "understanding" else model.ids.image_slice


@torch.no_grad()
def rollout_understanding(model, world, sample, seeds: torch.Tensor, cfg: DimooGRPOConfig) -> DiffusionRollout:
    """G = len(seeds) answers to `sample`'s question about its image: one `sample_text` call, rows [G, L]."""
    start, positions = world.understanding_rows(sample.question, world.load_image(sample))
    dev = next(model.parameters()).device  # the world builds rows on the CPU; the rollout runs where the model is
    return sample_text(model_logits_fn(model, world.text_slice), start.to(dev), positions.to(dev), seeds=seeds,
                       steps=cfg.text_steps, block_length=cfg.block_length, mask_id=model.ids.mask, vocab_offset=0,
                       temperature=cfg.text_temperature, order=cfg.order)


@torch.no_grad()
def rollout_generation(model, world, sample, seeds: torch.Tensor, cfg: DimooGRPOConfig) -> DiffusionRollout:
    """G = len(seeds) images of `sample`'s caption: one `sample_image` call (CFG rows alongside), rows [G, L]."""
    start, uncond, positions = world.generation_rows(sample.prompt)
    ids, dev = model.ids, next(model.parameters()).device
    return sample_image(model_logits_fn(model, ids.image_slice), start.to(dev), positions.to(dev), seeds=seeds,
                        steps=cfg.image_steps, mask_id=ids.mask, vocab_offset=ids.image_offset,
                        uncond_start=uncond.to(dev) if cfg.cfg_scale != 0 else None, cfg_scale=cfg.cfg_scale,
                        temperature=cfg.image_temperature, order=cfg.order)


def pair_advantages(rewards: torch.Tensor, pairs: list, cfg: DimooGRPOConfig,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """[P * G] rewards (row p*G + g) -> [P * G] float32 advantages: `engine.algo.advantages` (the estimator
    `cfg.algo.advantage_estimator`, as the Janus engine) per pair's G rows, times the pair's `pair_weights`
    (aligned 1, retrieved sqrt(similarity)) when cfg.algo.use_pair_weights. mask [P * G, T] bool: the rows'
    sampled tokens (read by the length-aware estimators; default: every row one token)."""
    g, a = cfg.group_size, cfg.algo
    if rewards.shape != (len(pairs) * g,):
        raise ValueError(f"rewards: expected shape [{len(pairs) * g}] (pairs x group_size), got {tuple(rewards.shape)}")
    group_ids = torch.arange(len(pairs)).repeat_interleave(g)
    weights = None
    if a.use_pair_weights:
        sim = torch.tensor([p.similarity for p in pairs], dtype=torch.float32)
        aligned = torch.tensor([p.aligned for p in pairs], dtype=torch.bool)
        weights = pair_weights(sim, aligned, weighting=a.pair_weighting)[group_ids]
    mask = torch.ones(len(rewards), 1, dtype=torch.bool) if mask is None else mask
    return algo_ops.advantages(a, rewards, group_ids, weights=weights, mask=mask)


@torch.no_grad()
def make_batch(model, world, pairs: list, cfg: DimooGRPOConfig, *, seed: int, step: int,
               ref_model=None) -> DimooBatch:
    """Rollouts (seeds: `engine.rollout.rollout_seeds(seed, step, task, P * G)`), rewards and advantages; with
    algo.beta > 0 also the frozen `ref_model`'s log-probs of every sampled token (`reference_logprobs`, once per
    step: the KL term of each of the mu inner epochs reads them)."""
    if cfg.algo.beta > 0 and ref_model is None:
        raise ValueError("ref_model: algo.beta > 0 needs the frozen reference model")
    g = cfg.group_size
    was_training = model.training
    model.eval()
    out = {}
    for task in TASKS:
        seeds = rollout_seeds(seed, step, task, len(pairs) * g)
        halves = [p.understand if task == "understanding" else p.generate for p in pairs]
        fn = rollout_understanding if task == "understanding" else rollout_generation
        ros = [fn(model, world, s, seeds[i * g:(i + 1) * g], cfg) for i, s in enumerate(halves)]
        samples = [s for s in halves for _ in range(g)]
        if task == "understanding":
            outputs = [world.decode_text(row) for ro in ros for row in ro.targets().cpu()]
            rewards = world.understanding_rewards(samples, outputs)
        else:
            codes = torch.cat([ro.targets().view(-1, world.grid, world.grid) for ro in ros]).cpu()  # the VQ's device
            outputs = world.decode_images(codes)
            rewards = world.generation_rewards(samples, outputs)
        mask = torch.cat([ro.step_map >= 0 for ro in ros])
        ref = [reference_logprobs(ref_model, world, task, ro, cfg) for ro in ros] if cfg.algo.beta > 0 else None
        out[task] = TaskBatch(ros, rewards, pair_advantages(rewards, pairs, cfg, mask), outputs, ref)
    model.train(was_training)
    return DimooBatch(pairs, out["understanding"], out["generation"])


@torch.no_grad()
def reference_logprobs(ref_model, world, task: str, ro: DiffusionRollout, cfg: DimooGRPOConfig) -> torch.Tensor:
    """[G, T] float32 (float64 for a float64 model): each sampled token's log-prob under `ref_model` at its score
    run's first state (the same runs as the update, `scoring.score_plan(ro, cfg.score_groups)`), guided and
    tempered as the sampler was, over the task's head slice; 0 at positions no step revealed. One guided forward
    per run, no graph."""
    was_training = ref_model.training
    ref_model.eval()
    try:
        targets = ro.targets()
        ref = None
        for run in score_plan(ro, cfg.score_groups):
            step, b_idx, p_idx, _ = _group_rows(ro, run)
            hc, hu = _branches(model_hidden_fn(ref_model), ro, step, b_idx, p_idx, "hidden_fn")
            h = hc if hu is None else cfg_mix(hc, hu, ro.guidance_scale)
            lp = linear_logprobs(h, ref_model.head_weight(task_head(ref_model, world, task)),
                                 targets[b_idx, p_idx].to(h.device), temperature=ro.scoring_temperature)
            if ref is None:  # float32 (float64 for a float64 model), as linear_logprobs gives
                ref = torch.zeros(ro.step_map.shape, dtype=lp.dtype, device=ro.step_map.device)
            ref[b_idx, p_idx] = lp.to(ref.device)
        return ref
    finally:
        ref_model.train(was_training)


# ----------------------------------------------------------------------------- the loss
def task_denominator(task: TaskBatch, cfg: DimooGRPOConfig) -> torch.Tensor:
    """0-d float32 `loss_denominator` of the task's full [P * G, T] token mask (every revealed token)."""
    return loss_denominator(torch.cat([ro.step_map >= 0 for ro in task.rollouts]), cfg.algo.loss_agg_mode)


def run_loss(model, world, task_name: str, ro: DiffusionRollout, advantages: torch.Tensor, run: list[int],
             cfg: DimooGRPOConfig, ref_logp: torch.Tensor | None = None):
    """(PolicyLossOutput of the tokens revealed in `run` (a list of steps, scored at the state of its first),
    its mask [G, T]). One guided forward; advantages: [G] of the rollout's rows; ref_logp: [G, T] the reference
    model's log-probs (`reference_logprobs`; with algo.beta > 0 the loss adds beta * KL)."""
    a = cfg.algo
    step, b_idx, p_idx, member = _group_rows(ro, run)
    hc, hu = _branches(model_hidden_fn(model), ro, step, b_idx, p_idx, "hidden_fn")
    h = hc if hu is None else cfg_mix(hc, hu, ro.guidance_scale)
    g, t = ro.step_map.shape
    hidden = h.new_zeros(g, t, h.shape[-1]).index_put((b_idx, p_idx), h)  # masked rows are never read
    out = fused_linear_policy_loss(hidden, model.head_weight(task_head(model, world, task_name)), ro.targets(),
                                   ro.old_logp.to(hidden.device), advantages.to(hidden.device), member,
                                   temperature=ro.scoring_temperature, epsilon_low=a.epsilon_low,
                                   epsilon_high=a.epsilon_high, loss_agg_mode=a.loss_agg_mode,
                                   **_kl_kwargs(a, ref_logp, hidden.device), **algo_ops.loss_kwargs(a))
    return out, member


def _kl_kwargs(a: AlgoConfig, ref_logp: torch.Tensor | None, device) -> dict:
    if a.beta == 0:
        return {}
    if ref_logp is None:
        raise ValueError("ref_logp: algo.beta > 0 needs the reference log-probs (make_batch(..., ref_model=))")
    return {"ref_logp": ref_logp.to(device), "beta": a.beta, "kl_estimator": a.kl_estimator}


def task_weights(cfg: DimooGRPOConfig) -> list[tuple[str, float]]:
    """(task, loss weight) of the tasks that train (weight > 0), understanding first (as the engine)."""
    return [(t, w) for t, w in zip(TASKS, (cfg.algo.understanding_weight, cfg.algo.generation_weight)) if w > 0]


def backward(model, world, batch: DimooBatch, cfg: DimooGRPOConfig, *, on_run=None) -> dict:
    """Accumulate the gradient of sum_task weight_task * L_task, one score run (forward + backward) at a time.

    Returns {task: (loss, clip_fraction, ratio_mean, kl)} of the full task batch (share-weighted sums of the runs').
    on_run: called after each run's backward (tests count live activations there)."""
    sums = {}
    for task, w in task_weights(cfg):
        tb = batch.task(task)
        den = task_denominator(tb, cfg)
        acc = torch.zeros(4, dtype=torch.float64)
        g = cfg.group_size
        for i, ro in enumerate(tb.rollouts):
            adv = tb.advantages[i * g:(i + 1) * g]
            ref = tb.ref_logp[i] if tb.ref_logp is not None else None
            for run in score_plan(ro, cfg.score_groups):
                out, member = run_loss(model, world, task, ro, adv, run, cfg, ref)
                share = loss_share(member, cfg.algo.loss_agg_mode, den.to(out.loss.dtype))  # fp64 model: fp64 share
                (w * share * out.loss).backward()
                acc += share.double().cpu() * torch.stack([out.loss, out.clip_fraction, out.ratio_mean, out.kl]) \
                    .detach().double().cpu()
                del out
                if on_run is not None:
                    on_run()
        sums[task] = tuple(acc.tolist())
    return sums


def one_shot_loss(model, world, batch: DimooBatch, cfg: DimooGRPOConfig) -> torch.Tensor:
    """The same objective as `backward` built as ONE differentiable scalar (every run's forward alive at once);
    for tests and small batches only."""
    total = 0.0
    for task, w in task_weights(cfg):
        tb = batch.task(task)
        den = task_denominator(tb, cfg)
        g = cfg.group_size
        for i, ro in enumerate(tb.rollouts):
            ref = tb.ref_logp[i] if tb.ref_logp is not None else None
            for run in score_plan(ro, cfg.score_groups):
                out, member = run_loss(model, world, task, ro, tb.advantages[i * g:(i + 1) * g], run, cfg, ref)
                total = total + w * loss_share(member, cfg.algo.loss_agg_mode, den.to(out.loss.dtype)) * out.loss
    return total


def update(model, optimizer, world, batch: DimooBatch, cfg: DimooGRPOConfig) -> dict:
    """mu optimizer steps on one batch (engine/trainer.py `update`); a non-finite loss or gradient norm skips
    that step. Returns the last inner epoch's metrics: loss.*, clip_fraction.*, ratio_mean.*, grad_norm."""
    metrics, skipped = {}, 0
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(cfg.algo.mu):
        optimizer.zero_grad()
        sums = backward(model, world, batch, cfg)
        if cfg.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        metrics = {"grad_norm": norm}
        for task, (loss, clip, ratio, kl) in sums.items():
            metrics.update({f"loss.{task}": loss, f"clip_fraction.{task}": clip, f"ratio_mean.{task}": ratio})
            if cfg.algo.beta > 0:
                metrics[f"kl.{task}"] = kl
        if all(math.isfinite(v) for k, v in metrics.items() if k.startswith(("loss.", "grad_norm"))):
            optimizer.step()
        else:
            optimizer.zero_grad()
            skipped += 1
    model.eval()
    if skipped:
        metrics["skipped_updates"] = skipped
    return metrics


def train_step(model, optimizer, world, pairs: list, cfg: DimooGRPOConfig, *, seed: int, step: int,
               rollout_guard=None, ref_model=None) -> dict:
    """One PairGRPO step on `pairs`: make_batch then update; returns the metrics row (rewards included).
    rollout_guard: a context-manager factory the rollouts run inside (`pairuni train`: a signal abandons them,
    `trainer.StopRequest.interruptible`); kill points "step:rollout" and "step:update" before each phase;
    ref_model: the frozen reference (algo.beta > 0)."""
    from ..checkpoint_store import kill_point

    with rollout_guard() if rollout_guard is not None else contextlib.nullcontext():
        kill_point("step:rollout")
        batch = make_batch(model, world, pairs, cfg, seed=seed, step=step, ref_model=ref_model)
    kill_point("step:update")
    row = {"step": step, "reward.understanding": float(batch.und.rewards.mean()),
           "reward.generation": float(batch.gen.rewards.mean())}
    row.update(update(model, optimizer, world, batch, cfg))
    return row
