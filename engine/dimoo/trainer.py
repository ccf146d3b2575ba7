"""`pairuni train` for model.family=dimoo: the engine's config, run folder, lock, resume rules, optimizer,
metrics and signals around the DiMOO PairGRPO loop (engine/dimoo/run.py `run`, engine/dimoo/pairgrpo.py).

    trainer = DimooTrainer.from_config(cfg)      # pairs read and checked, start point chosen, then the model
    summary = trainer.train()                     # the same summary dict as engine.trainer.PairGRPOTrainer's

What maps to what (engine/config.py keys -> the DiMOO step, `step_config`):
- rollout.group_size -> G; rollout.temperature -> the answer sampler's temperature; rollout.max_new_tokens -> the
  answer length; rollout.text_steps / text_block_length -> the block sampler's; rollout.image_steps, reveal_order,
  score_groups (0: one forward per step) -> the image sampler's and the scoring's; rollout.image_temperature.
- rollout.cfg_scale s means what it means for Janus-Pro: guided logits u + s (c - u). DiMOO writes them
  (1 + w) c - w u, so w = s - 1 (s = 5: DiMOO's default w = 4; s = 1: no guidance, no unconditional rows).
- algo.* -> the objective (every loss type and estimator the DiMOO step can run, `pairgrpo.unsupported`); with
  algo.beta > 0 a frozen copy of the start model is the KL's reference (its log-probs once per step);
  optim.* -> `engine.optim.PolicyOptimizer` (adamw8bit / adamw, master weights, Kahan, stochastic rounding),
  its whole state saved with each checkpoint (`SavedPolicyOptimizer`); optim.max_grad_norm (0: no clipping).
- model.path null -> the tiny DiMOO of the toy world (`ToyDimooWorld`: toy tokenizer, painter VQ, 64 px images
  unless rollout.image_resolution), seeded by model.tiny_seed; a Lumina-DiMOO folder -> `DimooModel.from_pretrained`
  in model.dtype and `DimooFolderWorld` (its tokenizer and VQ, 512 px unless rollout.image_resolution).
  model.lora.rank > 0 -> adapters (engine/dimoo/lora.py); model.gradient_checkpointing -> per block.
- train.* as for Janus-Pro: run_dir, steps, seed, save_every, resume (`engine.run_start.start_point`: the same
  trajectory and data-fingerprint checks, before the model loads), on_existing, max_bad_steps, progress,
  eval_every / eval_samples (the held-out pairs of data.eval_pairs_path or data.eval_fraction, `evaluate`).
Checkpoints go through the engine's one store (engine/checkpoint_store.py); state.json carries the engine config
and the data fingerprint as Janus-Pro's do, plus "family": "dimoo".

Signals, as the Janus loop: the first SIGTERM / SIGINT during a step's rollouts abandons them (they change nothing);
during its update or save the work finishes; then the run saves its last finished step (unless saved) and stops
(`trainer.Preempted`, exit 143 / 130, one line naming the checkpoint). A second signal exits at once.
"""

from __future__ import annotations

import logging
import shutil
import signal
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import Config
from ..files import write_json
from ..lock import RunLock, held_here
from ..metrics import plot_rewards, summarize
from ..optim import PolicyOptimizer
from ..preflight import history_of, set_aside
from .pairgrpo import DimooGRPOConfig

log = logging.getLogger("pairuni.dimoo.trainer")

#: Image side of the tiny toy-world DiMOO (a 4 x 4 code grid) and of a Lumina-DiMOO folder, in pixels.
TINY_RESOLUTION = 64
FOLDER_RESOLUTION = 512
_EXTRA_PID = -1  # optimizer-state entries below this id hold PolicyOptimizer's own tensors (masters, Kahan, SR)


def step_config(cfg: Config) -> DimooGRPOConfig:
    """The DiMOO step's knobs from a run's config (module docstring for the mapping)."""
    r = cfg.rollout
    return DimooGRPOConfig(
        group_size=r.group_size, score_groups=r.score_groups or None, image_steps=r.image_steps,
        text_steps=r.text_steps, block_length=r.text_block_length, cfg_scale=r.cfg_scale - 1.0,
        image_temperature=r.image_temperature, text_temperature=r.temperature, order=r.reveal_order,
        max_grad_norm=cfg.optim.max_grad_norm or None, algo=cfg.algo)


class SavedPolicyOptimizer(PolicyOptimizer):
    """`engine.optim.PolicyOptimizer` with `state_dict` / `load_state_dict`, so a DiMOO checkpoint
    (`run.save_state`) keeps all of it: the inner optimizer's state, and under entries with negative ids the
    fp32 masters ("master/<name>") and the compensated update's state (Kahan buffers, the stochastic-rounding
    generator). A resumed run then steps exactly as the uninterrupted one."""

    def _extras(self) -> dict[str, torch.Tensor]:
        out = dict(self.update_state())
        out.update({f"master/{n}": t for n, t in (self.master_state() or {}).items()})
        return out

    def state_dict(self) -> dict:
        inner = self.inner.state_dict()
        state = dict(inner["state"])
        for i, (name, t) in enumerate(sorted(self._extras().items())):
            state[_EXTRA_PID - i] = {"name": name, "value": t}
        return {"state": state, "param_groups": inner["param_groups"]}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        extras = {e["name"]: e["value"] for pid, e in sd["state"].items() if int(pid) <= _EXTRA_PID}
        inner = {int(pid): e for pid, e in sd["state"].items() if int(pid) > _EXTRA_PID}
        self.inner.load_state_dict({"state": inner, "param_groups": sd["param_groups"]})
        masters = {k[len("master/"):]: v for k, v in extras.items() if k.startswith("master/")}
        mine = self.master_state() or {}
        if set(masters) != set(mine):
            raise ValueError(f"optimizer: the checkpoint has {len(masters)} master weights, this run {len(mine)} "
                             "(optim.master_weights changed?)")
        for name, t in masters.items():
            mine[name].copy_(t)
        self.load_update_state({k: v for k, v in extras.items() if not k.startswith("master/")})


class DimooTrainer:
    """What `pairuni train` drives for model.family=dimoo: `from_config`, `train`, `stop`, `activity`, `kept`,
    `step` (as engine.trainer.PairGRPOTrainer)."""

    def __init__(self, cfg: Config, *, model, world, pairs: list, start, device: torch.device,
                 eval_pairs: list | None = None, eval_root: Path | None = None, ref_model=None):
        from ..trainer import StopRequest

        self.cfg, self.model, self.world, self.pairs, self.start = cfg, model, world, pairs, start
        self.eval_pairs, self.eval_root = eval_pairs or [], eval_root
        self.ref_model = ref_model
        self._tb = None
        self.device = device
        self.run_dir = Path(cfg.train.run_dir)
        self.step_cfg = step_config(cfg)
        self.stop = StopRequest()
        self.activity = "starting"
        self.step = 0
        self.saved: tuple[int, Path] | None = None
        self.bad_steps = 0

    @classmethod
    def from_config(cls, cfg: Config) -> DimooTrainer:
        """Pairs read and checked, the start point chosen (`run_start.start_point`: resume checks, a fresh start
        into a used folder refused), then the model and its world built."""
        from .. import distributed
        from ..build import set_threads
        from ..run_start import data_splits, start_point

        splits = data_splits(cfg)
        start = start_point(cfg)
        for skipped in start.skipped:
            log.warning("resume: skipped %s", skipped)
        device = distributed.resolve_device(cfg.train.device)
        model, world = build_model_and_world(cfg, splits.train, splits.root, device=device)
        model.to(device)
        ref_model = None
        if cfg.algo.beta > 0:  # the KL's reference: the start model (rebuilt before a resume loads its weights)
            import copy

            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        set_threads(cfg.train.num_threads, model)
        return cls(cfg, model=model, world=world, pairs=splits.train, start=start, device=device,
                   eval_pairs=splits.eval, eval_root=splits.eval_root, ref_model=ref_model)

    def kept(self) -> str:
        if self.saved is None:
            return "no checkpoint of this run yet"
        return f"the checkpoint of step {self.saved[0]} ({self.saved[1]}) is kept; resume with train.resume=true"

    def state_extra(self) -> dict:
        from ..run_start import data_fingerprint

        return {"config": self.cfg.to_dict(), "data_fingerprint": data_fingerprint(self.cfg)}

    def evaluate(self, step: int) -> dict:
        """`train.eval_every`: the held-out pairs through engine/dimoo/evaluate.py (seeds of its own: training is
        unchanged), run_dir/eval/step_N.json and .png (also to TensorBoard); returns the eval/* numbers."""
        t = self.cfg.train
        if not (t.eval_every and step % t.eval_every == 0 and self.eval_pairs):
            return {}
        import dataclasses

        from ..checkpoint_store import step_name
        from .evaluate import evaluate

        world = dataclasses.replace(self.world, data_root=self.eval_root)  # held-out images may live elsewhere
        was_training = self.model.training
        try:
            report = evaluate(self.model, world, self.eval_pairs, self.step_cfg, seed=t.seed, samples=t.eval_samples,
                              settings={"step": step, "generation_reward": self.cfg.reward.generation})
        finally:
            self.model.train(was_training)
        report.save(self.run_dir / "eval", step_name(step))
        if self._tb is not None and report.grid is not None:
            import numpy as np

            self._tb.add_image("eval/images", np.asarray(report.grid.convert("RGB")), step, dataformats="HWC")
        return report.metrics("eval/")

    def train(self) -> dict:
        """Run to `train.steps`; returns the summary dict of `pairuni train` (engine/train_cli.py)."""
        lock = RunLock.acquire(self.run_dir) if not held_here(self.run_dir) else None
        try:
            return self._train()
        finally:
            if lock is not None:
                lock.release()

    def _train(self) -> dict:
        from ..trainer import Interrupted, NonFiniteError, Preempted
        from . import run as dimoo_run

        cfg, t = self.cfg, self.cfg.train
        resuming = self.start.path is not None
        earlier = None
        self.activity = "preparing the run folder"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not resuming and history_of(self.run_dir):
            earlier = set_aside(self.run_dir, "overwritten" if t.on_existing == "overwrite" else "previous")
            log.warning("train.on_existing=%s: the earlier run in %s moved to %s", t.on_existing, self.run_dir,
                        earlier)
        write_json(self.run_dir / "config.json", cfg.to_dict())
        if cfg.data.eval_fraction > 0:  # the held-out pairs, for `pairuni eval --pairs` later
            from ..evaluate import HELDOUT_FILE, write_pairs_elsewhere

            write_pairs_elsewhere(self.eval_pairs, self.eval_root, self.run_dir / "eval" / HELDOUT_FILE)
        start_step = int(dimoo_run.read_state(self.start.path)["step"]) if resuming else 0
        tb = self._tb = _tensorboard(self.run_dir, start_step)
        bar = tqdm(total=t.steps, initial=start_step, desc="PairGRPO (DiMOO)", disable=not t.progress, leave=True)
        t0 = time.perf_counter()

        def on_step(row: dict) -> None:
            nonlocal earlier
            self.step = row["step"]
            self.activity = f"step {self.step + 1}"
            if tb is not None:
                for k, v in row.items():
                    if k != "step" and isinstance(v, (int, float)):
                        tb.add_scalar(k.replace(".", "/"), v, row["step"])
            if earlier is not None and t.on_existing == "overwrite":
                for old in self.run_dir.glob("overwritten-*"):
                    shutil.rmtree(old, ignore_errors=True)
                earlier = None
            self.bad_steps = self.bad_steps + 1 if row.get("skipped_updates") == cfg.algo.mu else 0
            if self.bad_steps >= t.max_bad_steps:
                raise NonFiniteError(f"step {self.step}: the loss or gradient norm was not finite in "
                                     f"{self.bad_steps} steps in a row (train.max_bad_steps); lower optim.lr? The "
                                     "last checkpoint is intact")
            bar.update(1)
            bar.set_postfix(r_und=f"{row['reward.understanding']:.3f}", r_gen=f"{row['reward.generation']:.3f}")

        def optimizer_factory(_params):
            return SavedPolicyOptimizer(self.model, cfg.optim, self.device, seed=t.seed)

        self.activity = f"step {start_step + 1}"
        try:
            result = dimoo_run.run(
                self.world, self.step_cfg, t.steps, self.run_dir, pairs=self.pairs, resume=resuming,
                save_every=t.save_every, seed=t.seed, lr=cfg.optim.lr, pairs_per_step=cfg.data.pairs_per_step,
                model_seed=cfg.model.tiny_seed, model=self.model, keep=2, optimizer_factory=optimizer_factory,
                on_step=on_step, should_stop=lambda: self.stop.requested, lock=False, extra=self.state_extra(),
                rollout_guard=self.stop.interruptible, abandon=(Interrupted,), evaluate=self.evaluate,
                ref_model=self.ref_model)
        finally:
            bar.close()
            if tb is not None:
                tb.close()
            self._tb = None
        self.step = int(dimoo_run.read_state(result.checkpoint)["step"]) if result.checkpoint else 0
        if result.checkpoint is not None:
            self.saved = (self.step, Path(result.checkpoint))
        if result.stopped:
            raise Preempted(self.stop.signum or signal.SIGTERM, self.step, self.saved and self.saved[1], saved=True)
        curve = plot_rewards(self.run_dir, result.rows)
        return {"steps": self.step, "resumed_from": start_step if resuming else None,
                "wall_s": time.perf_counter() - t0, **summarize(result.rows), "run_dir": str(self.run_dir),
                "checkpoint": str(result.checkpoint), "reward_curve": str(curve) if curve else None,
                "metrics": str(self.run_dir / dimoo_run.METRICS), "tensorboard": str(self.run_dir / "tb")}


def build_model_and_world(cfg: Config, pairs: list, data_root: Path | None, *, tokenizer=None,
                          device: torch.device | str = "cpu"):
    """(DimooModel, world) of a run: the tiny toy-world DiMOO (model.path null; its toy tokenizer built from
    `pairs` unless `tokenizer`, a resumed run's) or a Lumina-DiMOO folder (its rewards `reward.*` from the
    engine's registry), in model.dtype, with LoRA adapters (model.lora.rank > 0) and gradient checkpointing as
    configured."""
    from .. import rewards
    from ..model import DTYPES
    from .model import DimooModel

    m, r = cfg.model, cfg.rollout
    backend = {"auto": "auto", "sdpa": "sdpa", "flash_attention_2": "flash_varlen"}[m.attn_implementation]
    if m.path is None:
        from .toyworld import ToyDimooWorld

        side = r.image_resolution or TINY_RESOLUTION
        world = ToyDimooWorld.build(pairs, data_root, tokenizer=tokenizer, grid=side // 16, gen_length=r.max_new_tokens)
        model = world.tiny_model(seed=m.tiny_seed).to(DTYPES[m.dtype])
    else:
        from .folder_world import DimooFolderWorld

        world = DimooFolderWorld.build(
            m.path, pairs, data_root, resolution=r.image_resolution or FOLDER_RESOLUTION, gen_length=r.max_new_tokens,
            understanding_reward=rewards.build_reward(cfg.reward.understanding, cfg.reward, device=device),
            generation_reward=rewards.build_reward(cfg.reward.generation, cfg.reward, device=device))
        model = DimooModel.from_pretrained(m.path, dtype=m.dtype, attn_backend=backend)
    model.gradient_checkpointing = m.gradient_checkpointing
    if m.lora.rank > 0:
        from ..seeds import adapter_init
        from .lora import apply_lora

        with torch.random.fork_rng(devices=[]):  # the adapters' A from the run's seed, not the global RNG's state
            torch.manual_seed(adapter_init(cfg.train.seed))
            apply_lora(model, rank=m.lora.rank, alpha=m.lora.alpha, dropout=m.lora.dropout,
                       targets=tuple(m.lora.targets), quantize=m.lora.quantize)
    return model, world


def _tensorboard(run_dir: Path, start_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed; TensorBoard logs are skipped")
        return None
    return SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)


__all__ = ["DimooTrainer", "SavedPolicyOptimizer", "build_model_and_world", "step_config"]
