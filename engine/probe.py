"""`pairuni probe-gradients`: how much do the understanding and generation losses pull the shared
weights the same way, for PairUG pairs and for the same samples randomly re-paired?

    pairuni probe-gradients --pairs pairs.jsonl --model /models/Janus-Pro-1B --num-batches 64 --out probe/
    pairuni probe-gradients --num-batches 16           # tiny random Janus on the bundled toy world, CPU

    result = probe_gradients(load_config(None, ["rollout.group_size=4"]), num_batches=8)
    print(result.format_table())

The PairUni paper reports (docs/PAIRUNI.md "Gradient alignment") a median cosine of 0.120
(PairUG pairs) against 0.059 (random pairs) between the understanding gradient and the generation
gradient. This module measures that quantity with the trainer's own rollouts, advantages and loss code:

What is measured, per batch of P pairs (P = `pairs_per_batch`, default 1: one pair per measurement):
- Rollouts and advantages: `PairGRPOTrainer.make_batch` (G answers and G images per pair, rewards,
  group-normalised advantages times the pair weights), at the current weights, beta forced to 0.
- Loss: the PairGRPO loss of one task (`PairGRPOTrainer.task_loss`, fused_linear_policy_loss,
  aggregated with `algo.loss_agg_mode` over the batch's micro-batches exactly as
  `PairGRPOTrainer.backward` weights them, `micro_batch_share`) at the FIRST inner step, where the policy is the rollout
  policy: ratio rho = 1 (up to the float difference between the rollout's incremental log-probs and
  the teacher-forced ones, recorded as `ratio_mean`; `clip_fraction` should be 0), so for token-mean
      grad L_task = -(1 / #tokens) * sum_i A_i * sum_t mask_it * grad log pi(y_it)
  for the default `algo.loss_type=ppo` (other loss types are probed with their own gradient: the probe calls
  `task_loss`, so it follows the configured loss).
  Task weights (`algo.*_weight`) are left out: a positive scale does not change a cosine.
- Weights: the SHARED ones, i.e. the language model's decoder layers (`language_model.layers.*`,
  reported one by one as `layers.i`) and its final norm (`norm`); "overall" is all of them as
  one vector. Left out: the token embeddings (each task reads different rows), the text head, the
  generation head and aligners, the vision encoder and VQ model (task-specific or frozen).
- Statistic: cos(g_und, g_gen) = <g_und, g_gen> / (|g_und| |g_gen|), sums in float64. A batch whose
  understanding or generation groups all have zero advantage (every rollout got the same reward)
  has a zero gradient and no cosine: it is counted as skipped, not as 0. (The untrained tiny model
  rarely answers a toy question right, so most of its understanding groups are all-zero.)
  The summary also compares the two conditions on the batches where both have a cosine ("matched").

Conditions (both over the same K * P pairs, drawn from the whole file with a seeded permutation;
`data.max_pairs` is ignored):
- paired: batch k holds pairs k*P .. k*P+P-1, each pair's understanding half with its own
  generation half.
- random: the same generation halves in the same slots, with the understanding halves moved by a
  seeded derangement over all K * P selected pairs (no understanding half keeps its partner). The
  re-paired slot keeps the generation half's kind and similarity, so pair weights are unchanged
  and only who meets whom differs. Rollout seeds depend on (seed, batch, slot), so the generation
  rollouts of a random batch are those of its paired batch, token for token; their gradient is
  reused when the image tokens are equal (and recomputed otherwise).

Memory: the model plus three float32 copies of the shared weights' gradient (generation,
understanding, autograd's output for the current micro-batch); four when a random batch's
generation gradient has to be recomputed.
Single process only (not under torchrun). The probe calls the trainer's public `make_batch`,
`micro_batches`, `task_loss` and `micro_batch_share` on its own pairs and seed, with no KL term (no
reference log-probs); it never changes the trainer, steps the optimizer or touches `.grad`.
Outputs: a table on stdout, and with `--out DIR`: `gradient_probe.json` (every number) and
`gradient_probe.png` (box plot of the overall cosines, per-layer medians).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .cli import user_error
from .config import Config, ConfigError, load_config
from .data import Pair
from .policy import TASKS
from .preflight import check_run_dir
from .trainer import PairGRPOTrainer

log = logging.getLogger("pairuni.probe")

CONDITIONS = ("paired", "random")
OVERALL = "overall"
JSON_NAME = "gradient_probe.json"
PNG_NAME = "gradient_probe.png"


# ----------------------------------------------------------------------------- weights and cosines
def shared_parameter_groups(model) -> dict[str, list[torch.nn.Parameter]]:
    """{"layers.0": [...], ..., "layers.{L-1}": [...], "norm": [...]}: the language model's decoder
    layers and final norm, the weights both tasks run through. Raises ValueError when one is frozen."""
    lm = model.model.language_model
    groups = {f"layers.{i}": list(layer.parameters()) for i, layer in enumerate(lm.layers)}
    groups["norm"] = list(lm.norm.parameters())
    frozen = [name for name, ps in groups.items() if not all(p.requires_grad for p in ps)]
    if frozen:
        raise ValueError(f"model.train_modules: the probe needs the language model trainable; frozen: {frozen}")
    return groups


def gradient_cosines(grads_a: list[torch.Tensor], grads_b: list[torch.Tensor],
                     group_sizes: dict[str, int]) -> dict[str, float | None]:
    """Cosine of two gradients, per group and over all groups (key "overall").

    grads_a, grads_b: one tensor per parameter, in the order of the groups (group g owns the next
    `group_sizes[g]` tensors). A group where either gradient is zero gets None.
    """
    if len(grads_a) != len(grads_b) or len(grads_a) != sum(group_sizes.values()):
        raise ValueError(f"grads_a/grads_b: expected {sum(group_sizes.values())} tensors each, "
                         f"got {len(grads_a)} and {len(grads_b)}")
    dots = [(float(torch.dot(a.flatten().double(), b.flatten().double())),
             float(a.double().pow(2).sum()), float(b.double().pow(2).sum())) for a, b in zip(grads_a, grads_b)]
    out: dict[str, float | None] = {}
    start = 0
    for name, n in group_sizes.items():
        out[name] = _cosine(dots[start: start + n])
        start += n
    out[OVERALL] = _cosine(dots)
    return out


def _cosine(parts: list[tuple[float, float, float]]) -> float | None:
    dot, aa, bb = (sum(p[i] for p in parts) for i in range(3))
    if aa <= 0 or bb <= 0:
        return None
    return dot / math.sqrt(aa * bb)


def task_gradient(trainer, task: str, batch, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
    """Gradient of one task's PairGRPO loss on `batch` w.r.t. `params` (float32, one tensor each).

    The loss is `trainer.task_loss` per micro-batch, each weighted by `trainer.micro_batch_share` as
    `PairGRPOTrainer.backward` weights it, so the sum is the full-batch loss of `task`. Gradients
    go through `torch.autograd.grad`: `.grad` of the model is never touched.
    Returns (grads, {"loss", "ratio_mean", "clip_fraction"}) of the full batch.
    """
    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    grads = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    stats = {"loss": 0.0, "ratio_mean": 0.0, "clip_fraction": 0.0}
    trainer.model.train()  # as in `update`: gradient checkpointing only acts in train mode
    try:
        for c in trainer.micro_batches(batch):
            out = trainer.task_loss(task, batch, c)
            share = float(trainer.micro_batch_share(task, batch, c))
            for acc, g in zip(grads, torch.autograd.grad(share * out.loss, params, allow_unused=True)):
                if g is not None:
                    acc.add_(g.float())
            stats["loss"] += share * float(out.loss.detach())
            stats["ratio_mean"] += share * float(out.ratio_mean.detach())
            stats["clip_fraction"] += share * float(out.clip_fraction.detach())
    finally:
        trainer.model.eval()
    return grads, stats


# ----------------------------------------------------------------------------- pairs
def derangement(n: int, generator: torch.Generator) -> list[int]:
    """A uniformly random permutation of range(n) with no fixed point (rejection sampling, ~e tries)."""
    if n < 2:
        raise ValueError(f"n: a derangement needs at least 2 elements, got {n}")
    while True:
        perm = torch.randperm(n, generator=generator).tolist()
        if all(p != i for i, p in enumerate(perm)):
            return perm


def repair(pairs: list, perm: list[int]) -> list:
    """Slot i gets pairs[i]'s generation half (and its kind and similarity, hence its pair weight)
    with pairs[perm[i]]'s understanding half."""
    if sorted(perm) != list(range(len(pairs))):
        raise ValueError(f"perm: expected a permutation of range({len(pairs)})")
    return [Pair(kind=p.kind, similarity=p.similarity, understand=pairs[j].understand, generate=p.generate,
                 extra={"repaired_from": j})
            for p, j in zip(pairs, perm)]


def _sample_id(s) -> str:
    return s.source_id or s.image_path


# ----------------------------------------------------------------------------- result
@dataclass
class ProbeResult:
    """All measurements of one probe run.

    records: one dict per (condition, batch): cosines per group and overall (None = skipped),
             gradient norms, losses, ratio means and the sample ids of each slot.
    groups:  names of the shared weight groups, in model order.
    meta:    run settings (model, pairs file, K, P, G, seed, wall time).
    """

    records: list[dict]
    groups: list[str]
    meta: dict = field(default_factory=dict)

    def cosines(self, condition: str, group: str = OVERALL) -> list[float]:
        """The defined cosines of one condition and group, in batch order (skipped batches dropped)."""
        return [r["cosine"][group] for r in self.records
                if r["condition"] == condition and r["cosine"][group] is not None]

    @property
    def summary(self) -> dict:
        """{condition: {n, skipped, median, mean, q25, q75, iqr, layer_median: {group: median}},
        "matched": {n, median_paired, median_random, median_difference}}.

        "matched" keeps only the batches where both conditions have a cosine (skips differ between
        conditions because the understanding halves differ); median_difference is the median over
        those batches of cos_paired - cos_random.
        """
        out: dict = {}
        for cond in CONDITIONS:
            vals = self.cosines(cond)
            n_all = sum(r["condition"] == cond for r in self.records)
            row = {"n": len(vals), "skipped": n_all - len(vals), **_describe(vals)}
            row["layer_median"] = {g: _describe(self.cosines(cond, g))["median"] for g in self.groups}
            out[cond] = row
        by = {(r["condition"], r["batch"]): r["cosine"][OVERALL] for r in self.records}
        both = [(by["paired", b], by["random", b]) for (c, b) in by
                if c == "paired" and by["paired", b] is not None and by.get(("random", b)) is not None]
        out["matched"] = {"n": len(both), "median_paired": _describe([p for p, _ in both])["median"],
                          "median_random": _describe([r for _, r in both])["median"],
                          "median_difference": _describe([p - r for p, r in both])["median"]}
        return out

    def to_json(self) -> dict:
        return {"meta": self.meta, "groups": self.groups, "summary": self.summary, "records": self.records}

    def format_table(self) -> str:
        s = self.summary
        fmt = lambda v: "     -" if v is None else f"{v:+.3f}"  # noqa: E731
        lines = [
            f"gradient cosine, understanding loss vs generation loss, shared weights "
            f"({len(self.groups) - 1} decoder layers + final norm); "
            f"{self.meta.get('num_batches')} batches x {self.meta.get('pairs_per_batch')} pair(s), "
            f"G={self.meta.get('group_size')}",
            f"{'condition':<10} {'n':>4} {'skipped':>7} {'median':>7} {'mean':>7} {'q25':>7} {'q75':>7} {'IQR':>7}",
        ]
        for cond in CONDITIONS:
            r = s[cond]
            lines.append(f"{cond:<10} {r['n']:>4} {r['skipped']:>7} {fmt(r['median']):>7} {fmt(r['mean']):>7} "
                         f"{fmt(r['q25']):>7} {fmt(r['q75']):>7} {fmt(r['iqr']):>7}")
        m = s["matched"]
        lines.append(f"both defined in {m['n']} batches: median paired {fmt(m['median_paired'])}, "
                     f"random {fmt(m['median_random'])}; median of (paired - random) {fmt(m['median_difference'])}")
        lines.append(f"{'per-layer median':<18} {'paired':>7} {'random':>7}")
        for g in self.groups:
            lines.append(f"{g:<18} {fmt(s['paired']['layer_median'][g]):>7} {fmt(s['random']['layer_median'][g]):>7}")
        return "\n".join(lines)

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write gradient_probe.json and gradient_probe.png into `out_dir`; returns their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / JSON_NAME, "png": out / PNG_NAME}
        paths["json"].write_text(json.dumps(self.to_json(), indent=1))
        self.plot(paths["png"])
        return paths

    def plot(self, path: str | Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        s = self.summary
        fig, (ax_box, ax_layer) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [1, 2]})
        data = [self.cosines(c) for c in CONDITIONS]
        ax_box.boxplot([d if d else [float("nan")] for d in data], tick_labels=[f"{c}\n(n={len(d)})"
                       for c, d in zip(CONDITIONS, data)], showmeans=True)
        ax_box.axhline(0.0, color="grey", lw=0.8)
        ax_box.set_ylabel("cos(grad L_und, grad L_gen), shared weights")
        ax_box.set_title("overall")
        x = range(len(self.groups))
        for cond in CONDITIONS:
            meds = [s[cond]["layer_median"][g] for g in self.groups]
            ax_layer.plot(x, [float("nan") if m is None else m for m in meds], marker="o", label=cond)
        ax_layer.axhline(0.0, color="grey", lw=0.8)
        ax_layer.set_xticks(list(x), self.groups, rotation=90 if len(self.groups) > 8 else 0, fontsize=8)
        ax_layer.set_ylabel("median cosine")
        ax_layer.set_title("per layer")
        ax_layer.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _describe(vals: list[float]) -> dict:
    if not vals:
        return {"median": None, "mean": None, "q25": None, "q75": None, "iqr": None}
    t = torch.tensor(vals, dtype=torch.float64)
    q25, q75 = (float(torch.quantile(t, q)) for q in (0.25, 0.75))
    return {"median": statistics.median(vals), "mean": statistics.fmean(vals), "q25": q25, "q75": q75,
            "iqr": q75 - q25}


# ----------------------------------------------------------------------------- the probe
def probe_config(cfg: Config, *, pairs_per_batch: int, seed: int) -> Config:
    """The probe's copy of `cfg`: whole pairs file, beta 0 (no reference model), torch AdamW (never
    stepped), one seed for pair choice, re-pairing and rollouts; train.run_dir only read, never checked."""
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.data.max_pairs = None
    cfg.data.pairs_per_step = pairs_per_batch
    cfg.algo.beta = 0.0
    cfg.optim.optimizer = "adamw"
    cfg.train.seed = seed
    # the probe writes nothing into train.run_dir and never calls `train` (the only place an earlier run is
    # moved aside), so a run dir that holds a run (the usual case: probe what was trained) is no reason to refuse
    cfg.train.resume = False
    cfg.train.on_existing = "overwrite"
    return cfg


def probe_gradients(cfg: Config, *, num_batches: int = 16, pairs_per_batch: int = 1, seed: int = 0,
                    out_dir: str | Path | None = None, trainer=None) -> ProbeResult:
    """Measure cos(grad L_und, grad L_gen) on the shared weights for K paired and K re-paired batches.

    cfg: run configuration (model, pairs file, rollout and loss settings); see `probe_config` for what
         the probe overrides. trainer: an already built `PairGRPOTrainer` to reuse (left as it was: weights,
         `.grad`, pairs, config; its pairs are the pool), else one is built from `cfg`.
    Raises ValueError when the file holds fewer than K * P pairs, when K * P < 2, or when the language
    model is frozen (`model.train_modules`) or the run is distributed (the probe is single-process).
    """
    if num_batches < 1 or pairs_per_batch < 1:
        raise ValueError(f"num_batches, pairs_per_batch: expected integers >= 1, got {num_batches}, {pairs_per_batch}")
    t0 = time.perf_counter()
    cfg = probe_config(cfg, pairs_per_batch=pairs_per_batch, seed=seed)
    if trainer is None:
        trainer = PairGRPOTrainer.from_config(cfg)
    if trainer.dist is not None:
        raise ValueError("probe-gradients: runs in one process; under torchrun each rank would hold a shard "
                         "of the batch and of the weights (run it without torchrun)")
    pool = list(trainer.pairs)
    n_sel = num_batches * pairs_per_batch
    if n_sel < 2:
        raise ValueError("num_batches * pairs_per_batch: random re-pairing needs at least 2 pairs, got 1")
    if n_sel > len(pool):
        raise ValueError(f"num_batches * pairs_per_batch: {n_sel} > the {len(pool)} pairs in the file")
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(pool), generator=gen)[:n_sel].tolist()
    selected = [pool[i] for i in chosen]
    perm = derangement(n_sel, gen)
    groups = shared_parameter_groups(trainer.model)
    log.info("probe: %d batches x %d pairs (of %d), G=%d, %d shared weight groups", num_batches, pairs_per_batch,
             len(pool), cfg.rollout.group_size, len(groups))
    params = [p for ps in groups.values() for p in ps]
    sizes = {name: len(ps) for name, ps in groups.items()}
    records: list[dict] = []
    slot_pairs = selected + repair(selected, perm)  # slots 0..n-1 paired, n..2n-1 re-paired
    for k in tqdm(range(num_batches), desc="probe-gradients", disable=not cfg.train.progress):
        slots = list(range(k * pairs_per_batch, (k + 1) * pairs_per_batch))
        paired = trainer.make_batch(k + 1, [slot_pairs[i] for i in slots], seed=seed)
        g_gen, st_gen = task_gradient(trainer, "generation", paired, params)
        for cond, idx in (("paired", slots), ("random", [n_sel + i for i in slots])):
            batch = paired if cond == "paired" else trainer.make_batch(k + 1, [slot_pairs[i] for i in idx], seed=seed)
            reused = cond == "paired" or torch.equal(batch.gen.image_tokens, paired.gen.image_tokens)
            gg, sg = (g_gen, st_gen) if reused else task_gradient(trainer, "generation", batch, params)
            g_und, st_und = task_gradient(trainer, "understanding", batch, params)
            records.append({
                "condition": cond, "batch": k, "slots": idx,
                "understanding_ids": [_sample_id(p.understand) for p in batch.pairs],
                "generation_ids": [_sample_id(p.generate) for p in batch.pairs],
                "cosine": gradient_cosines(g_und, gg, sizes),
                "grad_norm": {"understanding": _norm(g_und), "generation": _norm(gg)},
                "loss": {"understanding": st_und["loss"], "generation": sg["loss"]},
                "ratio_mean": {"understanding": st_und["ratio_mean"], "generation": sg["ratio_mean"]},
                "clip_fraction": {"understanding": st_und["clip_fraction"], "generation": sg["clip_fraction"]},
                "reward_mean": {"understanding": float(batch.rewards_und.mean()),
                                "generation": float(batch.rewards_gen.mean())},
                "generation_gradient_reused": cond == "random" and reused,
            })
            del g_und, gg
        del g_gen
    meta = {"model": cfg.model.path or "tiny", "pairs": cfg.data.pairs_path or "bundled toy world",
            "num_batches": num_batches, "pairs_per_batch": pairs_per_batch, "group_size": cfg.rollout.group_size,
            "seed": seed, "loss_agg_mode": cfg.algo.loss_agg_mode, "use_pair_weights": cfg.algo.use_pair_weights,
            "selected_pairs": chosen, "derangement": perm, "wall_s": time.perf_counter() - t0}
    result = ProbeResult(records, list(groups), meta)
    if out_dir is not None:
        result.save(out_dir)
    return result


def _norm(grads: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


# ----------------------------------------------------------------------------- CLI
def register(subparsers) -> None:
    p = subparsers.add_parser(
        "probe-gradients", help="cosine between understanding and generation gradients, paired vs random pairs",
        description="For K batches of PairUG pairs and for the same samples randomly re-paired, the cosine "
                    "between the gradient of the understanding loss and that of the generation loss (PairGRPO "
                    "loss at ratio 1) over the language model's layers; prints a table, writes JSON + a box plot.",
    )
    p.add_argument("--pairs", default=None,
                   help="PairUG JSONL file (default: the config's, else the bundled toy world)")
    p.add_argument("--model", default=None,
                   help="local Hugging Face Janus-Pro directory, or 'tiny' (default: the config's; tiny random Janus)")
    p.add_argument("--config", default=None, help="YAML run config (rollout, reward and loss settings)")
    p.add_argument("--num-batches", type=int, default=16, help="K: batches per condition (default 16)")
    p.add_argument("--pairs-per-batch", type=int, default=1,
                   help="P: pairs per measured batch (default 1: one cosine per pair)")
    p.add_argument("--seed", type=int, default=0, help="seed of pair choice, re-pairing and rollouts")
    p.add_argument("--out", default=None, help=f"directory for {JSON_NAME} and {PNG_NAME}")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config override, e.g. rollout.group_size=4")
    p.set_defaults(func=run)


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    if args.pairs is not None:
        overrides.append(f"data.pairs_path={args.pairs}")
    if args.model is not None:
        overrides.append("model.path=null" if args.model == "tiny" else f"model.path={args.model}")
    try:
        if args.out is not None:  # found now, not after every batch has been computed
            check_run_dir(args.out, key="--out")
        cfg = load_config(args.config, overrides)
        result = probe_gradients(cfg, num_batches=args.num_batches, pairs_per_batch=args.pairs_per_batch,
                                 seed=args.seed, out_dir=args.out)
    except (ConfigError, ValueError) as exc:
        return user_error("probe-gradients", args, exc)
    print(result.format_table())
    if args.out is not None:
        print(f"wrote {Path(args.out) / JSON_NAME} and {Path(args.out) / PNG_NAME}")
    return 0


def main(argv=None) -> int:  # `python -m engine.probe`
    from .cli import run_command

    return run_command(register, "probe-gradients", argv)


if __name__ == "__main__":
    sys.exit(main())
