"""The PairGRPO step and loop (docs/PAIRUNI.md "PairGRPO", docs/ARCHITECTURE.md "One PairGRPO step").

    trainer = PairGRPOTrainer.from_config(cfg)   # engine/build.py; validates data before the model loads
    summary = trainer.train()

One step, for P pairs and group size G (`train_step`, one commented block per phase):
  1. rollouts: P questions x G answers; P prompts x G images (engine/rollout.py)
  2. rewards of both tasks (engine/rewards.py)
  3. advantages: `group_advantages` per (task, pair) group (`algo.advantage_estimator`, engine/algo.py), times
     `pair_weights` (1 aligned, sqrt(s) retrieved)
  4. update: mu inner epochs, each one optimizer step: micro-batches of one task, teacher-forced
     forward (engine/policy.py), `fused_linear_policy_loss` on the task's head (`algo.loss_type` and its
     knobs; with the top-entropy mask or clip_cov / kl_cov, one no-grad head pass first: `algo.token_inputs`),
     scaled so that the accumulated gradient is that of `understanding_weight * loss_text + generation_weight *
     loss_image` on the full batch; gradient clipping; AdamW8bit (engine/optim.py)
  5. metrics (engine/metrics.py), 6. checkpoint (engine/checkpoint.py)
A signal (`StopRequest`, installed by `pairuni train`) abandons a single process's rollouts or lets an update or
save finish, then the loop stops with a verified checkpoint of the last finished step (`Preempted`).
Departures from the paper: none in the objective. Image tokens are drawn from the CFG-guided
distribution but, by default, scored under the conditional branch (as T2I-R1 / PairUni do), so
the ratio is that of the conditional policy (`rollout.image_logprob=cfg` scores the guided one).
Micro-batch scaling follows the loss aggregation mode, so results do not depend on
`micro_batch_size`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pairuni_kernels import fused_linear_policy_loss, linear_logprobs, pair_weights
from pairuni_kernels.policy_loss import loss_denominator, loss_share

from . import algo, distributed
from .build import Components, build_components
from .checkpoint_store import kill_point, step_name, verify
from .config import Config
from .files import write_json
from .lock import RunLock, held_here
from .metrics import MetricsLog, summarize
from .policy import TASKS, task_mask, task_view
from .preflight import history_of, set_aside
from .rewards import RewardInput
from .rollout import concat_rollouts, generation_rollouts, rollout_seeds, rollout_understanding, row_chunks

log = logging.getLogger("pairuni.trainer")


class NonFiniteError(RuntimeError):
    """`train.max_bad_steps` steps in a row had a non-finite loss or gradient norm; names the step."""


#: Exit code of a run stopped by each signal (128 + its number, as a shell reports a process it killed).
STOP_SIGNALS = {signal.SIGTERM: 143, signal.SIGINT: 130}


class Interrupted(BaseException):
    """Raised by the signal handler inside an interruptible section (nothing there needs finishing)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Preempted(Exception):
    """The run stopped on a signal after saving (or already having) a checkpoint of its last finished step.

    path: that verified checkpoint (None: nothing to save); step: its step; saved: written by this stop."""

    def __init__(self, signum: int, step: int, path: Path | None, saved: bool):
        self.signum, self.step, self.path, self.saved = signum, step, path, saved
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")

    @property
    def exit_code(self) -> int:
        return STOP_SIGNALS.get(self.signum, 128 + int(self.signum))


class StopRequest:
    """SIGTERM / SIGINT during a run (installed by `pairuni train`; a trainer used as a library has one that
    never fires). The first signal asks the run to stop: inside an `interruptible()` section (startup, a
    single process's rollouts: nothing there changes the model or a file) the section is abandoned at once
    (`Interrupted`); anywhere else (an update, metrics, a save) the work finishes and the loop stops at the
    next step boundary. A second signal exits at once (`os._exit`, like SIGKILL: the lock goes with the
    process, a half-written save's temp folder is removed at the next start, the previous checkpoint stays)."""

    def __init__(self):
        self.signum: int | None = None
        self._interruptible = 0
        self._previous: dict = {}

    def install(self) -> bool:
        """Handle SIGTERM and SIGINT in this process (main thread only; False elsewhere)."""
        try:
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals stay as they were
            return False
        return True

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        code = STOP_SIGNALS.get(signum, 128 + signum)
        name = signal.Signals(signum).name
        if self.signum is not None:
            os.write(2, f"pairuni train: second signal ({name}): exiting now without saving; the last published "
                        "checkpoint stays valid (resume with train.resume=true)\n".encode())
            os._exit(code)
        self.signum = signum
        log.warning("%s: stopping after the current step (a second signal exits at once)", name)
        if self._interruptible:
            raise Interrupted(signum)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @contextlib.contextmanager
    def interruptible(self):
        """A section that a signal abandons at once (raises `Interrupted`)."""
        if self.signum is not None:
            raise Interrupted(self.signum)
        self._interruptible += 1
        try:
            yield
        finally:
            self._interruptible -= 1


@dataclass
class StepBatch:
    """Rollouts, rewards and advantages of one step's pairs (this rank's share under torchrun).

    Row `p * G + g` of every field is rollout g of pair p; rewards and advantages are [P * G] float32.
    """

    pairs: list
    und: object
    gen: object
    adv_und: torch.Tensor
    adv_gen: torch.Tensor
    rewards_und: torch.Tensor
    rewards_gen: torch.Tensor

    def rollout(self, task: str):
        return self.und if task == "understanding" else self.gen

    def advantages(self, task: str) -> torch.Tensor:
        return self.adv_und if task == "understanding" else self.adv_gen


class PairGRPOTrainer:
    """PairGRPO on one process or under torchrun; `parts` come from `engine.build`."""

    def __init__(self, cfg: Config, parts: Components):
        self.cfg, self.parts = cfg, parts
        self.model, self.prompts, self.pairs, self.device = parts.model, parts.prompts, parts.pairs, parts.device
        self.sampler, self.optimizer, self.checkpoints = parts.sampler, parts.optimizer, parts.checkpoints
        self.dist, self.fsdp, self.ref_model = parts.dist, parts.fsdp, parts.ref_model
        self.run_dir = Path(cfg.train.run_dir)
        self.metrics_log: MetricsLog | None = None  # open while `train` runs
        self.step = 0
        self.bad_steps = 0  # steps in a row whose every update was skipped as non-finite
        self.inner_epoch = 0  # of the update running (seeds clip_cov's token choice)
        self._eval_images = None  # image cache of the held-out pairs, built at the first evaluation
        self.stop = StopRequest()  # `pairuni train` installs one with signal handlers
        self.activity = "starting"  # what the run is doing, for an OS error's message ("step 3", "saving step 4")
        self.saved: tuple[int, Path] | None = None  # (step, path) of the newest checkpoint this run wrote or resumed

    @classmethod
    def from_config(cls, cfg: Config) -> PairGRPOTrainer:
        """Pairs are read and checked first; the model loads only when they are fine."""
        return cls(cfg, build_components(cfg))

    # ------------------------------------------------------------------ the step
    def train_step(self) -> dict:
        """One PairGRPO step on the sampler's next pairs; returns its metrics row."""
        step = self.step + 1
        self.activity = f"step {step}"
        t0 = time.perf_counter()
        # 1-3. rollouts, rewards and advantages of this step's pairs. They change nothing but the data cursor, so
        # in a single process a signal abandons them (the cursor goes back); under torchrun the ranks finish the step
        cursor = self.sampler.state_dict()
        try:
            with self.stop.interruptible() if self.dist is None else contextlib.nullcontext():
                kill_point("step:rollout")
                batch = self.make_batch(step, self.sampler.next())
        except Interrupted:
            self.sampler.load_state_dict(cursor)
            raise
        t1 = time.perf_counter()
        # 4. update: mu optimizer steps on the batch
        kill_point("step:update")
        metrics = self.update(batch)
        self.step = step
        # 5. metrics: mean rewards over ranks (equal shares: the mean of the ranks' means)
        world = self.dist.world_size if self.dist else 1
        r_und, r_gen = (float(distributed.all_reduce_sum(r.mean(), self.dist)) / world
                        for r in (batch.rewards_und, batch.rewards_gen))
        row = {"step": step, "reward.understanding": r_und, "reward.generation": r_gen, **metrics,
               "time.rollout_s": t1 - t0, "time.update_s": time.perf_counter() - t1}
        if self.cfg.train.eval_every and step % self.cfg.train.eval_every == 0:
            t2 = time.perf_counter()
            row.update(self.evaluate(step))
            row["time.eval_s"] = time.perf_counter() - t2
        if self.device.type == "cuda":
            row["mem.peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.metrics_log is not None:
            self.metrics_log.write(row)
        self.bad_steps = self.bad_steps + 1 if metrics.get("skipped_updates") == self.cfg.algo.mu else 0
        if metrics.get("skipped_updates"):
            log.warning("step %d: %d of %d updates skipped (non-finite loss or gradient norm)", step,
                        metrics["skipped_updates"], self.cfg.algo.mu)
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            raise NonFiniteError(f"step {step}: the loss or gradient norm was not finite in {self.bad_steps} steps "
                                 f"in a row (train.max_bad_steps); lower optim.lr? The last checkpoint is intact")
        # 6. checkpoint (after the row is written: a resumed run keeps the rows up to its checkpoint)
        if self.cfg.train.save_every and step % self.cfg.train.save_every == 0:
            self.save()
        return row

    @torch.no_grad()
    def make_batch(self, step: int, pairs: list, *, seed: int | None = None) -> StepBatch:
        """Rollouts, rewards and advantages of `pairs` (the global list: under torchrun this rank takes
        its share of whole pairs and the matching rows' seeds). seed: of the rollouts (default train.seed)."""
        cfg, g = self.cfg, self.cfg.rollout.group_size
        seed = cfg.train.seed if seed is None else seed
        share = distributed.local_pairs(len(pairs), self.dist)
        mine = slice(share.start * g, share.stop * g)  # this rank's rows of the global batch
        n_global = len(pairs) * g
        pairs = pairs[share]
        with distributed.unsharded(self.fsdp):
            self.model.eval()
            # 1. rollouts: G answers per question, G images per prompt, row chunks of rollout.max_batch
            und_samples = [p.understand for p in pairs for _ in range(g)]
            gen_samples = [p.generate for p in pairs for _ in range(g)]
            und = self._understanding_rollouts(und_samples, rollout_seeds(seed, step, "understanding", n_global)[mine])
            gen = self._generation_rollouts(gen_samples, rollout_seeds(seed, step, "generation", n_global)[mine])
            # 2. rewards
            r_und = self.parts.rewards["understanding"](RewardInput(samples=und_samples, texts=und.texts))
            r_gen = self.parts.rewards["generation"](RewardInput(samples=gen_samples, images=gen.images))
        # 3. advantages: by algo.advantage_estimator within each (task, pair) group, times the pair weight
        group_ids = torch.arange(len(pairs)).repeat_interleave(g)
        weights = None
        if cfg.algo.use_pair_weights:
            sim = torch.tensor([p.similarity for p in pairs], dtype=torch.float32)
            aligned = torch.tensor([p.aligned for p in pairs], dtype=torch.bool)
            weights = pair_weights(sim, aligned, weighting=cfg.algo.pair_weighting)[group_ids]
        adv_und, adv_gen = (algo.advantages(cfg.algo, r, group_ids, weights=weights, mask=task_mask(task, ro))
                            for r, task, ro in ((r_und, "understanding", und), (r_gen, "generation", gen)))
        return StepBatch(pairs, und, gen, adv_und, adv_gen, r_und, r_gen)

    def _understanding_rollouts(self, samples: list, seeds: torch.Tensor):
        r, dev = self.cfg.rollout, self.device
        ids, mask, pv = self.prompts.understanding([s.question for s in samples],
                                                   torch.stack([self.parts.images(s) for s in samples]))
        return concat_rollouts([rollout_understanding(
            self.model, ids[c].to(dev), mask[c].to(dev), pv[c].to(dev, self.model.dtype),
            max_new_tokens=r.max_new_tokens, temperature=r.temperature, seeds=seeds[c], decode_text=self.prompts.decode,
            compile=r.compile)
            for c in row_chunks(len(samples), r.max_batch)])

    def _generation_rollouts(self, samples: list, seeds: torch.Tensor):
        return generation_rollouts(self.model, self.prompts, [s.prompt for s in samples], seeds, self.cfg.rollout,
                                   device=self.device)

    # ------------------------------------------------------------------ losses (public: the probe uses them)
    def tasks(self) -> list[tuple[str, float]]:
        """(task, loss weight) of the tasks that train (weight > 0), understanding first."""
        a = self.cfg.algo
        return [(t, w) for t, w in zip(TASKS, (a.understanding_weight, a.generation_weight)) if w > 0]

    def micro_batches(self, batch: StepBatch) -> list[slice]:
        """Row slices of `optim.micro_batch_size` rows covering the batch."""
        return row_chunks(batch.adv_und.shape[0], self.cfg.optim.micro_batch_size)

    def micro_batch_share(self, task: str, batch: StepBatch, rows: slice,
                          full_den: torch.Tensor | None = None) -> torch.Tensor:
        """The weight of micro-batch `rows`' aggregated loss in the full batch's loss of `task`: its
        `loss_share` (0-d float32 tensor, no host sync). full_den: the full batch's `loss_denominator` when
        it is not this batch's own (data-parallel ranks pass the all-reduced global one)."""
        full, mode = task_mask(task, batch.rollout(task)), self.cfg.algo.loss_agg_mode
        return loss_share(full[rows], mode, loss_denominator(full, mode) if full_den is None else full_den)

    def task_loss(self, task: str, batch: StepBatch, rows: slice, ref_logp: torch.Tensor | None = None):
        """PolicyLossOutput of `task` on micro-batch `rows` (KL term only with `ref_logp`). Under torchrun it
        runs inside the FSDP root's forward, so its backward reduce-scatters the gradients."""
        return self.fsdp(self._loss, task, batch, rows, ref_logp) if self.fsdp is not None else \
            self._loss(self.model, task, batch, rows, ref_logp)

    def _loss(self, model, task: str, batch: StepBatch, rows: slice, ref_logp):
        a, ro = self.cfg.algo, batch.rollout(task)
        v = task_view(model, task, ro, rows)
        old_logp = ro.old_logp[rows].to(v.hidden.device)
        generator = None
        if a.loss_type == "clip_cov":  # its random token choice: a pure function of the run's seed and place
            generator = torch.Generator().manual_seed(algo.selection_seed(
                self.cfg.train.seed, self.step + 1, task, rows.start or 0, self.inner_epoch, self.dist))
        extra = algo.token_inputs(a, v, old_logp, batch.advantages(task)[rows].to(v.hidden.device), generator)
        out = fused_linear_policy_loss(
            v.hidden, v.weight, v.targets, old_logp, extra.advantages, v.mask, bias=v.bias, temperature=v.temperature,
            ref_logp=ref_logp, epsilon_low=a.epsilon_low, epsilon_high=a.epsilon_high,
            beta=a.beta if ref_logp is not None else 0.0, kl_estimator=a.kl_estimator, loss_agg_mode=a.loss_agg_mode,
            **algo.loss_kwargs(a), **extra.kwargs)
        # the entropy metric: the fused head's with the bonus on, else that of the top-entropy pass
        return out if extra.entropy is None or a.entropy_coef != 0 else out._replace(entropy=extra.entropy)

    @torch.no_grad()
    def reference_logprobs(self, task: str, batch: StepBatch, rows: slice) -> torch.Tensor:
        """[b, T] float32 log-probs of the frozen reference model (algo.beta > 0) on micro-batch `rows`."""
        v = task_view(self.ref_model, task, batch.rollout(task), rows)
        n, t, h = v.hidden.shape
        lp = linear_logprobs(v.hidden.reshape(n * t, h), v.weight, v.targets.reshape(-1), bias=v.bias,
                             temperature=v.temperature)
        return lp.view(n, t).float()

    def backward(self, batch: StepBatch, refs: dict | None = None) -> dict:
        """Accumulate the gradient of `sum_task weight_task * loss_task` over micro-batches.

        Returns {task: (loss, clip_fraction, ratio_mean, kl[, entropy])} of the full batch (entropy when
        `algo.computes_entropy`). Under torchrun the batch is this rank's share, each loss is divided by the
        global denominator (all-reduced) and FSDP sums gradients over ranks, so gradient and metrics are those
        of the global batch.
        """
        mode, refs = self.cfg.algo.loss_agg_mode, refs or {}
        entropy = algo.computes_entropy(self.cfg.algo)
        sums = {}
        for task, task_w in self.tasks():
            full = task_mask(task, batch.rollout(task))
            full_den = distributed.global_denominator(loss_denominator(full, mode), mode, self.dist)
            # (loss, clip_fraction, ratio_mean, kl[, entropy]) summed on the device: one host read per task
            acc = torch.zeros(5 if entropy else 4, dtype=torch.float64, device=full.device)
            for c in self.micro_batches(batch):
                out = self.task_loss(task, batch, c, refs.get((task, c.start)))
                share = self.micro_batch_share(task, batch, c, full_den)
                (task_w * share * out.loss).backward()
                stats = [out.loss, out.clip_fraction, out.ratio_mean, out.kl] + ([out.entropy] if entropy else [])
                acc += share.double() * torch.stack(stats).detach().double()
            sums[task] = tuple(acc.tolist())
        if self.dist is not None:
            keys = list(sums)
            total = distributed.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64), self.dist)
            sums = {k: tuple(float(v) for v in total[i]) for i, k in enumerate(keys)}
        return sums

    def update(self, batch: StepBatch) -> dict:
        """mu optimizer steps on one rollout batch; returns metrics of the last inner epoch."""
        refs = {}
        if self.ref_model is not None:
            refs = {(t, c.start): self.reference_logprobs(t, batch, c)
                    for t, _ in self.tasks() for c in self.micro_batches(batch)}
        metrics: dict = {}
        skipped = 0
        self.model.train()
        for epoch in range(self.cfg.algo.mu):
            self.inner_epoch = epoch
            self.optimizer.zero_grad()
            sums = self.backward(batch, refs)
            metrics = {"grad_norm": self.optimizer.clip_grad_norm(self.cfg.optim.max_grad_norm)}
            for task, (loss, clip_fraction, ratio_mean, kl, *entropy) in sums.items():
                metrics.update({f"loss.{task}": loss, f"clip_fraction.{task}": clip_fraction,
                                f"ratio_mean.{task}": ratio_mean, f"kl.{task}": kl})
                metrics.update({f"entropy.{task}": e for e in entropy})  # only when computed
            # a NaN/inf loss or gradient would poison every weight it touches: skip this update
            if all(math.isfinite(v) for k, v in metrics.items() if k.startswith(("loss.", "grad_norm"))):
                self.optimizer.step()
            else:
                self.optimizer.zero_grad()
                skipped += 1
        self.model.eval()
        if skipped:
            metrics["skipped_updates"] = skipped
        return metrics

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, step: int) -> dict:
        """Evaluate the policy on the held-out pairs (engine/evaluate.py) with seeds of its own, so training
        continues exactly as without it; rank 0 writes run_dir/eval/step_N.json and .png (the image grid, also
        to TensorBoard). Every rank evaluates every pair (collective under torchrun). Returns the eval/* numbers."""
        from .build import image_cache
        from .evaluate import evaluate

        if self._eval_images is None:
            self._eval_images = image_cache(self.parts.eval_root, self.prompts)
        main = distributed.is_main()
        with distributed.unsharded(self.fsdp):
            report = evaluate(self.model, self.prompts, self.parts.eval_pairs, self.cfg, images=self._eval_images,
                              seed=self.cfg.train.seed, samples=self.cfg.train.eval_samples,
                              generation_reward=self.parts.rewards["generation"],
                              progress=self.cfg.train.progress and main, settings={"step": step})
        if main:
            report.save(self.run_dir / "eval", step_name(step))
            if self.metrics_log is not None and report.grid is not None:
                self.metrics_log.image("eval/images", report.grid, step)
        return report.metrics("eval/")

    # ------------------------------------------------------------------ checkpoints and the loop
    def state_extra(self) -> dict:
        from .run_start import data_fingerprint

        # the pairs files' paths and content hashes, as `run_start.start_point` hashed them when the run started:
        # a resume refuses changed data and accepts the same file by any path
        extra = {"data": self.sampler.state_dict(), "config": self.cfg.to_dict(), "bad_steps": self.bad_steps,
                 "data_fingerprint": data_fingerprint(self.cfg)}
        if self.parts.tokenizer_json is not None:
            extra["tokenizer"] = self.parts.tokenizer_json
        return extra

    def save(self) -> Path:
        """Checkpoint the current step (collective under torchrun)."""
        self.activity = f"saving step {self.step}"
        path = self.checkpoints.save(self.step, self.state_extra())
        self.saved = (self.step, path)
        return path

    def kept(self) -> str:
        """What a failed run leaves to resume from, for its error line."""
        if self.saved is None:
            return "no checkpoint of this run yet"
        return f"the checkpoint of step {self.saved[0]} ({self.saved[1]}) is kept; resume with train.resume=true"

    def _agreed_stop(self) -> bool:
        """A stop was asked for (on any rank: under torchrun every rank answers the same, a collective)."""
        if self.dist is None:
            return self.stop.requested
        return float(distributed.all_reduce_sum(float(self.stop.requested), self.dist)) > 0

    def _stop_with_checkpoint(self) -> Preempted:
        """Save (unless saved already) and verify the checkpoint of the last finished step; the `Preempted` to raise."""
        signum = self.stop.signum or signal.SIGTERM
        if self.saved is not None and self.saved[0] == self.step:
            return Preempted(signum, self.step, self.saved[1], saved=False)
        if self.step == 0 and self.dist is not None:  # nothing trained; the sharded optimizer has no state yet
            return Preempted(signum, 0, None, saved=False)
        path = self.save()
        if distributed.is_main():
            verify(path)
        return Preempted(signum, self.step, path, saved=True)

    def maybe_resume(self) -> bool:
        """Load the checkpoint `run_start.start_point` chose before the model loaded (none: False)."""
        point = self.parts.resume
        if point is None or point.path is None:
            return False
        self.activity = f"loading {point.path}"
        state = self.checkpoints.load(point.path)
        self.saved = (int(state["step"]), point.path)
        self.checkpoints.resumed_from(point)
        self.step = int(state["step"])
        self.bad_steps = int(state.get("bad_steps", 0))
        self.sampler.load_state_dict(state["data"])
        log.info("resumed from %s (step %d)", point.path, self.step)
        return True

    def train(self, steps: int | None = None) -> dict:
        """Run until `cfg.train.steps` (or `steps` more); returns a summary dict."""
        main = distributed.is_main()
        # `pairuni train` holds the run folder's lock already; a library caller takes it here (rank 0)
        lock = RunLock.acquire(self.run_dir) if main and not held_here(self.run_dir) else None
        try:
            return self._train(steps, main)
        finally:
            if lock is not None:
                lock.release()

    def _train(self, steps: int | None, main: bool) -> dict:
        resumed_from = self.step if self.maybe_resume() else None
        earlier = None  # an earlier run's files, moved aside (train.on_existing) before anything is written
        self.activity = "preparing the run folder"
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.checkpoints.store.remove_dead_temps()
            if resumed_from is None and history_of(self.run_dir):
                # overwrite: kept as "overwritten-*" until a step of the new run has succeeded
                earlier = set_aside(self.run_dir, "overwritten" if self.cfg.train.on_existing == "overwrite" else "previous")
                log.warning("train.on_existing=%s: the earlier run in %s moved to %s", self.cfg.train.on_existing,
                            self.run_dir, earlier)
            write_json(self.run_dir / "config.json", self.cfg.to_dict())
            if self.cfg.data.eval_fraction > 0:  # the held-out pairs, for `pairuni eval --pairs` later
                from .evaluate import HELDOUT_FILE, write_pairs_elsewhere

                write_pairs_elsewhere(self.parts.eval_pairs, self.parts.eval_root, self.run_dir / "eval" / HELDOUT_FILE)
        end = self.cfg.train.steps if steps is None else self.step + steps
        self.metrics_log = metrics_log = MetricsLog(self.run_dir, self.step, enabled=main)
        t0 = time.perf_counter()
        bar = tqdm(total=end, initial=self.step, desc="PairGRPO", disable=not (self.cfg.train.progress and main),
                   leave=True)
        stopped = False
        try:
            while self.step < end:
                if self._agreed_stop():  # a signal during the previous step, its save or the start
                    stopped = True
                    break
                try:
                    row = self.train_step()
                except Interrupted:  # rollouts abandoned: the model and cursor are those of the last step
                    stopped = True
                    break
                if earlier is not None and self.cfg.train.on_existing == "overwrite":
                    for old in self.run_dir.glob("overwritten-*"):  # those of crashed attempts too
                        shutil.rmtree(old, ignore_errors=True)
                    earlier = None
                bar.update(1)
                bar.set_postfix(r_und=f"{row['reward.understanding']:.3f}", r_gen=f"{row['reward.generation']:.3f}")
        finally:
            bar.close()
            self.metrics_log = None
        if stopped:
            stop = self._stop_with_checkpoint()
            metrics_log.close()
            raise stop
        ckpt = self.save()
        curve = metrics_log.plot()
        metrics_log.close()
        return {
            "steps": self.step, "resumed_from": resumed_from, "wall_s": time.perf_counter() - t0, **summarize(metrics_log.rows),
            "run_dir": str(self.run_dir), "checkpoint": str(ckpt), "reward_curve": str(curve) if curve else None,
            "metrics": str(self.run_dir / "metrics.jsonl"), "tensorboard": str(self.run_dir / "tb"),
        }
