"""The PairGRPO step and loop (PAIRUNI.md "PairGRPO", DESIGN.md "One PairGRPO step").

    trainer = PairGRPOTrainer.from_config(cfg)   # validates data before the model loads
    summary = trainer.train()

One step, for P pairs and group size G:
  1. understanding rollouts: P questions x G answers; generation rollouts: P prompts x G images
  2. rewards; `group_advantages` per (task, pair) group, times `pair_weights` (1 aligned, sqrt(s) retrieved)
  3. mu inner epochs, each one optimizer step: micro-batches of one task, teacher-forced forward,
     `fused_linear_policy_loss` on the text head (answers) or the image head (image tokens),
     scaled so that the accumulated gradient is that of
     `understanding_weight * loss_text + generation_weight * loss_image` on the full batch;
     gradient clipping; AdamW8bit.
Departures from the paper: none in the objective. Image tokens are drawn from the CFG-guided
distribution but, by default, scored under the conditional branch (as T2I-R1 / PairUni do), so
the ratio is that of the conditional policy (`rollout.image_logprob=cfg` scores the guided one).
Micro-batch scaling follows the loss aggregation mode, so results do not depend on
`micro_batch_size`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pairuni_kernels import group_advantages, pair_weights
from pairuni_kernels.policy_loss import loss_denominator

from . import distributed as D
from . import model as M
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import Config, ConfigError
from .data import default_pairs_path
from .rewards import RewardInput, build_reward
from .rollout import (
    generation_head_input,
    rollout_generation,
    rollout_seeds,
    rollout_understanding,
    understanding_hidden,
)

log = logging.getLogger("pairuni.trainer")


def _fused_loss():
    from pairuni_kernels import fused_linear_policy_loss

    return fused_linear_policy_loss


def _linear_logprobs():
    from pairuni_kernels import linear_logprobs

    return linear_logprobs


# ----------------------------------------------------------------------------- data
def load_pairs(cfg: Config):
    """Read and check the pairs (and that every image file exists) before any model loads.

    Raises ConfigError naming the file and line of the first problem.
    """
    from engine.data import read_pairs, resolve_image_path

    try:
        path = cfg.data.pairs_path or str(default_pairs_path())
        pairs = read_pairs(path)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"data.pairs_path: {exc}") from None
    if cfg.data.max_pairs is not None:
        pairs = pairs[: cfg.data.max_pairs]
    if not pairs:
        raise ConfigError(f"data.pairs_path: {path} holds no pairs")
    root = cfg.data.image_root or Path(path).resolve().parent  # PairUG: paths relative to the file
    for i, p in enumerate(pairs):
        where = f"{path}: pair #{i + 1}"
        if not p.understand.has_qa:
            raise ConfigError(f"{where}: understand_ann needs a question and an answer")
        if not p.generate.has_caption:
            raise ConfigError(f"{where}: generate_ann needs a prompt (caption)")
        if cfg.reward.generation == "pair_qa" and not p.generate.has_qa:
            raise ConfigError(f"{where}: reward.generation=pair_qa needs generate_ann question and answer")
        if cfg.reward.generation == "toyworld":
            attrs = p.generate.meta.get("attributes") or {}
            if not (attrs.get("color") and attrs.get("shape")):
                raise ConfigError(f"{where}: reward.generation=toyworld needs generate_ann.attributes with "
                                  "color and shape (toy-world data); use clip/hpsv2/pair_qa for other data")
        img = resolve_image_path(p.understand.image_path, root)
        if not img.is_file():
            raise ConfigError(f"{where}: understand_ann.image_path {str(img)!r} does not exist")
    if len(pairs) < cfg.data.pairs_per_step:
        raise ConfigError(f"data.pairs_per_step: {cfg.data.pairs_per_step} > the {len(pairs)} pairs in {path}")
    return pairs, Path(root)


class PairSampler:
    """Pairs in a seeded order reshuffled each epoch; the cursor is part of every checkpoint."""

    def __init__(self, n: int, per_step: int, seed: int, shuffle: bool):
        self.n, self.per_step, self.seed, self.shuffle = n, per_step, seed, shuffle
        self.epoch, self.cursor = 0, 0

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 7_919 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.per_step:
            order = self._order()
            take = order[self.cursor: self.cursor + self.per_step - len(out)]
            out += take
            self.cursor += len(take)
            if self.cursor >= self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


# ----------------------------------------------------------------------------- logging
class MetricsLog:
    """metrics.jsonl + TensorBoard scalars + a reward-curve PNG, all in the run directory.

    enabled=False (ranks other than 0) keeps the rows in memory and writes nothing.
    """

    def __init__(self, run_dir: Path, start_step: int, *, enabled: bool = True):
        self.run_dir, self.enabled = run_dir, enabled
        self.path = run_dir / "metrics.jsonl"
        self.rows: list[dict] = []
        self.tb = None
        if not enabled:
            return
        kept = []
        if self.path.exists():  # a resumed run rewrites history after its checkpoint
            kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start_step]
        self.path.write_text("".join(ln + "\n" for ln in kept))
        self.rows = [json.loads(ln) for ln in kept]
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)
        except ImportError:
            log.warning("tensorboard is not installed; TensorBoard logs are skipped")

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k.replace(".", "/"), v, row["step"])

    def plot(self) -> Path | None:
        if not self.enabled:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        steps = [r["step"] for r in self.rows]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, label in (("reward.understanding", "understanding"), ("reward.generation", "generation")):
            ax.plot(steps, [r[key] for r in self.rows], marker=".", label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("mean reward")
        ax.set_title("PairGRPO rewards")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out = self.run_dir / "reward_curve.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------- optimizer
def build_optimizer(params, cfg: Config, device: torch.device):
    o = cfg.optim
    if o.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if device.type == "cuda" else bnb.optim.AdamW8bit
    return cls(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


def _chunk_weight(mode: str, chunk_mask: torch.Tensor, full_mask: torch.Tensor,
                  full_den: torch.Tensor | None = None) -> torch.Tensor:
    """Factor (0-d float32 tensor, no host sync) that turns a micro-batch's aggregated loss into its
    share of the full batch's loss.

    full_den: the full batch's `loss_denominator` when it is not `full_mask`'s own (data-parallel
    ranks pass the all-reduced global one).
    """
    if full_den is None:
        full_den = loss_denominator(full_mask, mode)
    return loss_denominator(chunk_mask, mode).clamp(min=1) / full_den.clamp(min=1)


def _cat_rollouts(parts: list):
    """Concatenate rollouts of consecutive row chunks (same padded prompt width) along rows."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for f in dataclasses.fields(parts[0]):
        vals = [getattr(p, f.name) for p in parts]
        if isinstance(vals[0], torch.Tensor):
            if vals[0].dim() >= 2:  # answers of chunks that stopped early: right-pad (masked) to one width
                width = max(v.shape[1] for v in vals)
                vals = [torch.nn.functional.pad(v, (0, 0) * (v.dim() - 2) + (0, width - v.shape[1])) for v in vals]
            out[f.name] = torch.cat(vals)
        elif isinstance(vals[0], list):
            out[f.name] = [x for v in vals for x in v]
        else:
            out[f.name] = vals[0]
    return type(parts[0])(**out)


# ----------------------------------------------------------------------------- trainer
@dataclass
class StepBatch:
    pairs: list
    und: object
    gen: object
    adv_und: torch.Tensor
    adv_gen: torch.Tensor
    rewards_und: torch.Tensor
    rewards_gen: torch.Tensor


class PairGRPOTrainer:
    def __init__(self, cfg: Config, model, prompts, pairs, data_root: Path, *, tokenizer_json: str | None = None):
        self.cfg, self.model, self.prompts, self.pairs, self.data_root = cfg, model, prompts, pairs, data_root
        self.tokenizer_json = tokenizer_json
        self.device = next(model.parameters()).device
        self.run_dir = Path(cfg.train.run_dir)
        self.sampler = PairSampler(len(pairs), cfg.data.pairs_per_step, cfg.train.seed, cfg.data.shuffle)
        self.dist = D.current()  # None in a single process
        D.local_pairs(cfg.data.pairs_per_step, self.dist)  # raises unless every rank gets whole pairs
        counts = M.set_trainable(model, cfg.model.train_modules)
        log.info("trainable parameters: %s", counts)
        if cfg.model.gradient_checkpointing:
            M.enable_gradient_checkpointing(model)
        self.ref_model = None
        if cfg.algo.beta > 0:  # a frozen copy of the initial policy; never built when beta == 0
            import copy

            self.ref_model = copy.deepcopy(model).requires_grad_(False).eval()
        self.fsdp = None  # the FSDP2 root under torchrun; parameters below are then DTensor shards
        if self.dist is not None:
            if cfg.optim.optimizer == "adamw8bit":
                raise ConfigError("optim.optimizer: adamw8bit (bitsandbytes) cannot step FSDP2's DTensor "
                                  "parameters; use optim.optimizer=adamw under torchrun (its fp32 state is "
                                  "sharded over the ranks)")
            dc = cfg.distributed
            self.fsdp = D.shard_model(model, self.dist, param_dtype=dc.param_dtype, reduce_dtype=dc.reduce_dtype,
                                      reshard_after_forward=dc.reshard_after_forward)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = None  # fp32 copies the optimizer steps (optim.master_weights with bf16/fp16 weights)
        if cfg.optim.master_weights and any(p.dtype != torch.float32 for p in self.params):
            if self.fsdp is not None:
                raise ConfigError("optim.master_weights: under torchrun use model.dtype=float32 with "
                                  "distributed.param_dtype=bfloat16 (the fp32 shards are the master weights)")
            self.master = [torch.nn.Parameter(p.detach().float().clone()) for p in self.params]
        self.optimizer = build_optimizer(self.master or self.params, cfg, self.device)
        self.reward_und = build_reward(cfg.reward.understanding, cfg.reward, device=self.device)
        self.reward_gen = build_reward(cfg.reward.generation, cfg.reward, device=self.device,
                                       answer_fn=self._answer_about_images)
        self.step = 0
        self._image_cache: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: Config) -> PairGRPOTrainer:
        """Pairs are read and checked first; the model loads only when they are fine."""
        from .text import JanusPrompts, ToyPrompts, ToyTokenizer

        pairs, root = load_pairs(cfg)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        env = D.init_from_env(cfg.train.device)  # torchrun: process group + this rank's device
        device = env.device if env is not None else torch.device(
            "cuda" if cfg.train.device == "auto" and torch.cuda.is_available()
            else ("cpu" if cfg.train.device == "auto" else cfg.train.device))
        tokenizer_json = None
        if cfg.model.path is None:
            ckpt = latest_checkpoint(cfg.train.run_dir) if cfg.train.resume else None
            if ckpt is not None:
                tok = ToyTokenizer.from_json(json.loads((ckpt / "state.json").read_text())["tokenizer"])
            else:
                texts = [t for p in pairs for t in (p.understand.question, p.understand.answer, p.generate.prompt,
                                                     p.generate.question, p.generate.answer)]
                tok = ToyTokenizer.from_texts(texts)
            tokenizer_json = tok.to_json()
            palette = None
            if cfg.model.tiny_palette:
                from engine.data import toyworld as tw

                n_codes = M.tiny_janus_config(len(tok)).vq_config.num_embeddings
                palette = M.codebook_palette([tw.BACKGROUND, *tw.COLORS.values()], n_codes, seed=cfg.model.tiny_seed)
            model = M.tiny_janus(len(tok), seed=cfg.model.tiny_seed, palette=palette)
            log.info("model: tiny random Janus (vocab %d), attention sdpa", len(tok))
            model = model.to(device=device, dtype=M.DTYPES[cfg.model.dtype])
            vis = model.config.vision_config
            prompts = ToyPrompts(tok, image_size=vis.image_size, num_image_tokens=vis.num_image_tokens)
        else:
            model = M.load_janus(cfg.model.path, dtype=cfg.model.dtype, device=device,
                                 attn_implementation=cfg.model.attn_implementation)
            prompts = JanusPrompts(cfg.model.path)
            M.complete_generation_config(model, prompts.processor.tokenizer)
        return cls(cfg, model, prompts, pairs, root, tokenizer_json=tokenizer_json)

    # ------------------------------------------------------------------ helpers
    def _image(self, sample) -> torch.Tensor:
        from engine.data import resolve_image_path

        from .text import load_image

        key = sample.image_path
        if key not in self._image_cache:
            self._image_cache[key] = load_image(resolve_image_path(key, self.data_root), self.prompts.image_size)
        return self._image_cache[key]

    def _answer_about_images(self, images: torch.Tensor, questions: list[str]) -> list[str]:
        ids, mask, pv = self.prompts.understanding(questions, images.cpu())
        ro = rollout_understanding(
            self.model, ids.to(self.device), mask.to(self.device), pv.to(self.device, self.model.dtype),
            max_new_tokens=self.cfg.rollout.max_new_tokens, temperature=0.0,
            seeds=torch.zeros(len(questions), dtype=torch.long), decode_text=self.prompts.decode)
        return ro.texts

    def _group_ids(self, p: int) -> torch.Tensor:
        return torch.arange(p).repeat_interleave(self.cfg.rollout.group_size)

    # ------------------------------------------------------------------ rollouts + advantages
    def _call(self, fn, *args):
        """`fn(model, *args)`; under FSDP inside the root's forward (gathers root-owned parameters,
        reduce-scatters their gradients after backward)."""
        return self.fsdp(fn, *args) if self.fsdp is not None else fn(self.model, *args)

    @torch.no_grad()
    def make_batch(self, step: int, indices: list[int]) -> StepBatch:
        """Rollouts, rewards and advantages of the pairs `indices` (the global list: under torchrun
        this rank takes its share of whole pairs and the matching rows' seeds)."""
        with D.unsharded(self.fsdp):
            return self._make_batch(step, indices)

    def _make_batch(self, step: int, indices: list[int]) -> StepBatch:
        cfg, g = self.cfg, self.cfg.rollout.group_size
        share = D.local_pairs(len(indices), self.dist)
        first_row, n_global = share.start * g, len(indices) * g
        pairs = [self.pairs[i] for i in indices[share]]
        rows = [p for p in pairs for _ in range(g)]
        self.model.eval()
        dev, dt = self.device, self.model.dtype
        n = len(rows)
        chunks = [slice(i, min(i + (cfg.rollout.max_batch or n), n)) for i in range(0, n, cfg.rollout.max_batch or n)]
        und_samples = [p.understand for p in rows]
        ids, mask, pv = self.prompts.understanding([s.question for s in und_samples],
                                                   torch.stack([self._image(s) for s in und_samples]))
        seeds = rollout_seeds(cfg.train.seed, step, 0, n_global)[first_row: first_row + n]
        und = _cat_rollouts([rollout_understanding(
            self.model, ids[c].to(dev), mask[c].to(dev), pv[c].to(dev, dt), max_new_tokens=cfg.rollout.max_new_tokens,
            temperature=cfg.rollout.temperature, seeds=seeds[c], decode_text=self.prompts.decode) for c in chunks])
        gen_samples = [p.generate for p in rows]
        gids, gmask = self.prompts.generation([s.prompt for s in gen_samples])
        seeds = rollout_seeds(cfg.train.seed, step, 1, n_global)[first_row: first_row + n]
        gen = _cat_rollouts([rollout_generation(
            self.model, gids[c].to(dev), gmask[c].to(dev), cfg_scale=cfg.rollout.cfg_scale,
            temperature=cfg.rollout.image_temperature, top_k=cfg.rollout.image_top_k, top_p=cfg.rollout.image_top_p,
            seeds=seeds[c], image_logprob=cfg.rollout.image_logprob, decode=cfg.rollout.decode_images)
            for c in chunks])
        r_und = self.reward_und(RewardInput(samples=und_samples, texts=und.texts))
        r_gen = self.reward_gen(RewardInput(samples=gen_samples, images=gen.images))
        group_ids = self._group_ids(len(pairs))
        weights = None
        if cfg.algo.use_pair_weights:
            sim = torch.tensor([p.similarity for p in pairs], dtype=torch.float32)
            aligned = torch.tensor([p.aligned for p in pairs], dtype=torch.bool)
            weights = pair_weights(sim, aligned)[group_ids]
        eps = cfg.algo.advantage_eps
        adv_und = group_advantages(r_und, group_ids, weights=weights, eps=eps)
        adv_gen = group_advantages(r_gen, group_ids, weights=weights, eps=eps)
        return StepBatch(pairs, und, gen, adv_und, adv_gen, r_und, r_gen)

    # ------------------------------------------------------------------ losses
    def _task_loss(self, model, task: str, batch: StepBatch, rows: slice, ref_logp=None):
        """Aggregated policy loss of one micro-batch of one task (PolicyLossOutput)."""
        a = self.cfg.algo
        if task == "understanding":
            ro = batch.und
            hidden = understanding_hidden(model, ro, rows)
            weight, bias = M.text_head(model)
            targets, mask, adv = ro.response_ids[rows], ro.response_mask[rows], batch.adv_und[rows]
            temp = ro.temperature if ro.temperature > 0 else 1.0
        else:
            ro = batch.gen
            hidden = generation_head_input(model, ro, rows)
            weight, bias = M.image_head(model)
            targets, adv = ro.image_tokens[rows], batch.adv_gen[rows]
            mask = torch.ones_like(targets, dtype=torch.bool)
            temp = ro.temperature if ro.temperature > 0 else 1.0
        return _fused_loss()(
            hidden, weight, targets, ro.old_logp[rows].to(hidden.device), adv.to(hidden.device), mask,
            bias=bias, temperature=temp, ref_logp=ref_logp, epsilon_low=a.epsilon_low,
            epsilon_high=a.epsilon_high, beta=a.beta, kl_estimator=a.kl_estimator, loss_agg_mode=a.loss_agg_mode)

    @torch.no_grad()
    def _ref_logps(self, task: str, batch: StepBatch, rows: slice) -> torch.Tensor:
        ref = self.ref_model
        if task == "understanding":
            ro = batch.und
            hidden, (w, b), targets = understanding_hidden(ref, ro, rows), M.text_head(ref), ro.response_ids[rows]
        else:
            ro = batch.gen
            hidden, (w, b), targets = generation_head_input(ref, ro, rows), M.image_head(ref), ro.image_tokens[rows]
        temp = ro.temperature if ro.temperature > 0 else 1.0
        n, t, h = hidden.shape
        lp = _linear_logprobs()(hidden.reshape(n * t, h), w, targets.reshape(-1), bias=b, temperature=temp)
        return lp.view(n, t).float()

    def _plan(self, batch: StepBatch):
        a, mb = self.cfg.algo, self.cfg.optim.micro_batch_size
        n = batch.adv_und.shape[0]
        tasks = [(t, w) for t, w in (("understanding", a.understanding_weight), ("generation", a.generation_weight)) if w > 0]
        chunks = [slice(i, min(i + mb, n)) for i in range(0, n, mb)]
        return tasks, chunks

    def backward(self, batch: StepBatch, refs: dict | None = None) -> dict:
        """Accumulate the gradient of `sum_task weight_task * loss_task` over micro-batches.

        Returns {task: (loss, clip_fraction, ratio_mean, kl)} of the full batch. Under torchrun the
        batch is this rank's share, each loss is divided by the global denominator (all-reduced) and
        FSDP sums gradients over ranks, so gradient and metrics are those of the global batch.
        """
        a = self.cfg.algo
        tasks, chunks = self._plan(batch)
        refs = refs or {}
        full_masks = {"understanding": batch.und.response_mask,
                      "generation": torch.ones_like(batch.gen.image_tokens, dtype=torch.bool)}
        sums = {}
        for task, task_w in tasks:
            full_den = D.global_denominator(loss_denominator(full_masks[task], a.loss_agg_mode), a.loss_agg_mode,
                                            self.dist)
            # (loss, clip_fraction, ratio_mean, kl) summed on the device: one host read per task, not per chunk
            acc = torch.zeros(4, dtype=torch.float64, device=full_masks[task].device)
            for c in chunks:
                out = self._call(self._task_loss, task, batch, c, refs.get((task, c.start)))
                share = _chunk_weight(a.loss_agg_mode, full_masks[task][c], full_masks[task], full_den)
                (task_w * share * out.loss).backward()
                parts = torch.stack([out.loss, out.clip_fraction, out.ratio_mean, out.kl]).detach()
                acc += share.double() * parts.double()
            sums[task] = tuple(acc.tolist())
        if self.dist is not None:
            keys = list(sums)
            total = D.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64), self.dist)
            sums = {k: tuple(float(v) for v in total[i]) for i, k in enumerate(keys)}
        return sums

    def update(self, batch: StepBatch) -> dict:
        """mu optimizer steps on one rollout batch; returns metrics of the last inner epoch."""
        cfg, a = self.cfg, self.cfg.algo
        tasks, chunks = self._plan(batch)
        refs = {}
        if self.ref_model is not None:
            refs = {(t, c.start): self._ref_logps(t, batch, c) for t, _ in tasks for c in chunks}
        metrics: dict = {}
        self.model.train()
        for _ in range(a.mu):
            self.optimizer.zero_grad(set_to_none=True)
            sums = self.backward(batch, refs)
            if cfg.optim.max_grad_norm > 0:
                grad_norm = float(D.full_tensor(torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.max_grad_norm)))
            else:
                grad_norm = float(D.full_tensor(torch.nn.utils.get_total_norm(
                    [p.grad for p in self.params if p.grad is not None])))
            if self.master is None:
                self.optimizer.step()
            else:
                self._master_step()
            metrics = {"grad_norm": grad_norm}
            for task, (l, cf, rm, kl) in sums.items():
                metrics.update({f"loss.{task}": l, f"clip_fraction.{task}": cf, f"ratio_mean.{task}": rm,
                                f"kl.{task}": kl})
        self.model.eval()
        return metrics

    @torch.no_grad()
    def _master_step(self) -> None:
        """Optimizer step on the fp32 masters, one parameter at a time (optimizers skip parameters
        without a gradient), so only one fp32 gradient exists at once; then round into the model."""
        for p, m in zip(self.params, self.master):
            if p.grad is None:
                continue
            m.grad, p.grad = p.grad.float(), None
            self.optimizer.step()
            m.grad = None
            p.copy_(m)

    def master_state(self) -> dict[str, torch.Tensor] | None:
        """{parameter name: fp32 master} when master weights are on (saved with every checkpoint)."""
        if self.master is None:
            return None
        by_id = {id(p): m for p, m in zip(self.params, self.master)}
        return {n: by_id[id(p)] for n, p in self.model.named_parameters() if id(p) in by_id}

    # ------------------------------------------------------------------ loop
    def state_extra(self) -> dict:
        extra = {"data": self.sampler.state_dict(), "config": self.cfg.to_dict()}
        if self.tokenizer_json is not None:
            extra["tokenizer"] = self.tokenizer_json
        return extra

    def save(self) -> Path:
        if self.fsdp is not None:  # sharded: every rank writes its shards (collective)
            return D.save_sharded(self.run_dir, self.step, self.fsdp, self.optimizer, self.state_extra())
        return save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.state_extra(),
                               master=self.master_state())

    def maybe_resume(self) -> bool:
        ckpt = latest_checkpoint(self.run_dir) if self.cfg.train.resume else None
        if ckpt is None:
            return False
        if self.fsdp is not None:
            state = D.load_sharded(ckpt, self.fsdp, self.optimizer)
        elif D.is_sharded_checkpoint(ckpt):
            raise ConfigError(f"train.resume: {ckpt} was written by a torchrun (FSDP) run; resume it with "
                              "torchrun, any number of processes (--nproc_per_node 1 included)")
        else:
            state = load_checkpoint(ckpt, self.model, self.optimizer, master=self.master_state())
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["data"])
        log.info("resumed from %s (step %d)", ckpt, self.step)
        return True

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        step = self.step + 1
        batch = self.make_batch(step, self.sampler.next())
        t1 = time.perf_counter()
        metrics = self.update(batch)
        self.step = step
        r_und, r_gen = (float(D.all_reduce_sum(r.mean(), self.dist)) / (self.dist.world_size if self.dist else 1)
                        for r in (batch.rewards_und, batch.rewards_gen))  # equal shares: mean of means
        row = {"step": step, "reward.understanding": r_und, "reward.generation": r_gen, **metrics,
               "time.rollout_s": t1 - t0, "time.update_s": time.perf_counter() - t1}
        if self.device.type == "cuda":
            row["mem.peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        return row

    def train(self, steps: int | None = None) -> dict:
        """Run until `cfg.train.steps` (or `steps` more); returns a summary dict."""
        from tqdm.auto import tqdm

        main = D.is_main()
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1))
        resumed_from = self.step if self.maybe_resume() else None
        end = self.cfg.train.steps if steps is None else self.step + steps
        logger = MetricsLog(self.run_dir, self.step, enabled=main)
        t0 = time.perf_counter()
        bar = tqdm(total=end, initial=self.step, desc="PairGRPO", disable=not (self.cfg.train.progress and main),
                   leave=True)
        try:
            while self.step < end:
                row = self.train_step()
                logger.write(row)
                bar.update(1)
                bar.set_postfix(r_und=f"{row['reward.understanding']:.3f}", r_gen=f"{row['reward.generation']:.3f}")
                if self.cfg.train.save_every and self.step % self.cfg.train.save_every == 0:
                    self.save()
        finally:
            bar.close()
        ckpt = self.save()
        curve = logger.plot()
        logger.close()
        rows = logger.rows
        k = max(1, min(5, len(rows) // 3))
        first, last = rows[:k], rows[-k:]
        mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)
        return {
            "steps": self.step, "resumed_from": resumed_from, "wall_s": time.perf_counter() - t0,
            "reward.understanding.first": mean(first, "reward.understanding"),
            "reward.understanding.last": mean(last, "reward.understanding"),
            "reward.generation.first": mean(first, "reward.generation"),
            "reward.generation.last": mean(last, "reward.generation"),
            "run_dir": str(self.run_dir), "checkpoint": str(ckpt), "reward_curve": str(curve) if curve else None,
            "metrics": str(self.run_dir / "metrics.jsonl"), "tensorboard": str(self.run_dir / "tb"),
        }
