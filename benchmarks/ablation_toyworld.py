"""Does pairing help? PairUni's data and pair-weighting ablations, reproduced on the toy world.

    python benchmarks/ablation_toyworld.py                 # the study: 7 variants x 3 seeds
    python benchmarks/ablation_toyworld.py --quick         # 2 variants, 1 seed, a few steps (run by make test)

The paper (docs/PAIRUNI.md "Data ablation", "Gradient analysis") trains Janus-Pro-1B on
understanding-only, generation-only, an unpaired mix, random pairs and PairUG, and weights
retrieved pairs by nothing / s / sqrt(s). Here the same variants train the tiny random Janus
(its VQ decoder paints each image token as a block of a toy-world colour) on a fresh toy world,
for the same steps, with the same seeds and the same held-out evaluation set:

| variant             | pairs                                                     | loss / weights                  |
|---------------------|-----------------------------------------------------------|---------------------------------|
| understanding-only  | built (aligned + retrieved)                               | generation loss weight 0        |
| generation-only     | built                                                     | understanding loss weight 0     |
| unpaired mix        | each generation half moved to another pair (derangement)  | no pair weights                 |
| random pairs        | the same re-pairing, kept as retrieved pairs              | sqrt(s) of the halves' real s   |
| built, no weight    | built                                                     | w_p = 1                         |
| built, linear s     | built                                                     | w_p = s (aligned: 1)            |
| built, sqrt s       | built (PairUni)                                           | w_p = sqrt(s) (aligned: 1)      |

"unpaired mix" and "random pairs" see the same samples in the same batches; they differ only in
whether the re-paired halves are weighted by their (mostly low) similarity. Both tasks' rollouts
run in every variant, so every variant draws the same random numbers; a task with loss weight 0
does not train. The similarity of a re-paired pair is the toy world's known scene similarity.

Reported per variant (mean and spread over seeds): understanding accuracy (greedy answer = the
option letter) and the generation attribute score (colour and shape read off the decoded pixels)
on the held-out pairs, before and after training; and the gradient-cosine probe
(`engine.probe.probe_gradients`: cos(grad L_und, grad L_gen), built pairs vs randomly re-paired)
on the initial model and on each trained one. Results: JSON, a markdown table and a plot under
--out (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.config import load_config  # noqa: E402
from engine.data.io import read_pairs, write_json, write_pairs  # noqa: E402
from engine.data.schema import Pair  # noqa: E402
from engine.data.toyworld import POSITIONS, Scene, generate_toy_world, scene_similarity  # noqa: E402
from engine.probe import derangement, probe_gradients  # noqa: E402
from engine.trainer import PairGRPOTrainer  # noqa: E402

log = logging.getLogger("pairuni.ablation")


@dataclass(frozen=True)
class Variant:
    """One arm of the study: which pairs file it trains on and the config overrides it sets."""

    name: str
    pairs: str  # "built" | "repaired"
    overrides: dict = field(default_factory=dict)


VARIANTS: tuple[Variant, ...] = (
    Variant("understanding-only", "built", {"algo.generation_weight": 0.0}),
    Variant("generation-only", "built", {"algo.understanding_weight": 0.0}),
    Variant("unpaired mix", "repaired", {"algo.use_pair_weights": False}),
    Variant("random pairs", "repaired", {"algo.pair_weighting": "sqrt"}),
    Variant("built, no weight", "built", {"algo.use_pair_weights": False}),
    Variant("built, linear s", "built", {"algo.pair_weighting": "linear"}),
    Variant("built, sqrt s", "built", {"algo.pair_weighting": "sqrt"}),
)
QUICK_VARIANTS = ("random pairs", "built, sqrt s")


@dataclass
class StudySettings:
    """Sizes of the study; `quick()` is the smoke-test version run by make test."""

    n_train: int = 16
    n_eval: int = 48
    steps: int = 150
    seeds: tuple[int, ...] = (0, 1, 2)
    probe_batches: int = 12
    eval_samples: int = 2  # images drawn per held-out prompt
    world_seed: int = 1234
    open_questions: bool = False  # True: `open_question`s instead of the toy world's multiple-choice questions
    variants: tuple[str, ...] = tuple(v.name for v in VARIANTS)
    run_overrides: dict = field(default_factory=lambda: {
        "data.pairs_per_step": 4, "rollout.group_size": 8, "rollout.max_new_tokens": 4, "optim.micro_batch_size": 16,
    })

    @classmethod
    def quick(cls) -> StudySettings:
        return cls(n_train=8, n_eval=6, steps=2, seeds=(0,), probe_batches=2, eval_samples=1, variants=QUICK_VARIANTS,
                   run_overrides={"data.pairs_per_step": 2, "rollout.group_size": 4, "rollout.max_new_tokens": 3,
                                  "optim.micro_batch_size": 8})


# ----------------------------------------------------------------------------- data
def scene_of(sample) -> Scene:
    """The toy-world scene a sample was rendered from (its `attributes`)."""
    a = sample.meta["attributes"]
    return Scene(a["color"], a["shape"], tuple(POSITIONS.index(p) for p in a["positions"]))


def open_question(sample):
    """The sample's question without its options, answered by the attribute word itself ("red", "circle",
    "3", "top left"): no option letter to guess, so a policy scores only by reading the image (or by the
    prior of one answer, which `answer_prior` measures)."""
    import dataclasses

    a, qtype = sample.meta["attributes"], sample.tag.split("/")[-1]
    truth = {"color": a["color"], "shape": a["shape"], "count": str(a["count"]),
             "position": a["positions"][0]}[qtype]
    return dataclasses.replace(sample, question=sample.question.split("\n")[0], answer=truth)


def with_open_questions(pairs: list[Pair]) -> list[Pair]:
    import dataclasses

    return [dataclasses.replace(p, understand=open_question(p.understand)) for p in pairs]


def answer_prior(train: list[Pair], test: list[Pair]) -> float:
    """Accuracy on `test` of the best answer-prior policy: for each question's first word pair ("What color",
    "How many", ...) the training set's most common answer, image ignored."""
    from collections import Counter

    def kind(p):
        return " ".join(p.understand.question.split()[:2])

    common = {}
    for k in {kind(p) for p in train}:
        common[k] = Counter(p.understand.answer for p in train if kind(p) == k).most_common(1)[0][0]
    return sum(common.get(kind(p)) == p.understand.answer for p in test) / len(test)


def repaired(pairs: list[Pair], seed: int) -> list[Pair]:
    """Each pair's generation half moved to another pair (a seeded derangement): retrieved pairs whose
    similarity is the halves' known scene similarity."""
    perm = derangement(len(pairs), torch.Generator().manual_seed(seed))
    out = []
    for p, j in zip(pairs, perm):
        gen = pairs[j].generate
        out.append(Pair("retrieved", scene_similarity(scene_of(gen), scene_of(p.understand)),
                        understand=p.understand, generate=gen))
    return out


def build_world(work: Path, s: StudySettings) -> dict[str, Path]:
    """A fresh toy world of n_train + n_eval pairs; the held-out pairs are a seeded subset.

    Returns the pairs files: built (training), eval (held out) and repaired_<seed> per seed."""
    world = work / "world"
    generate_toy_world(s.n_train + s.n_eval, world, seed=s.world_seed, overwrite=True, progress=False)
    pairs = read_pairs(world / "pairs.jsonl")
    if s.open_questions:
        pairs = with_open_questions(pairs)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(s.world_seed)).tolist()
    held = set(order[: s.n_eval])
    files = {"built": world / "train_built.jsonl", "eval": world / "eval.jsonl"}
    train = [p for i, p in enumerate(pairs) if i not in held]
    write_pairs(files["built"], train)
    write_pairs(files["eval"], [p for i, p in enumerate(pairs) if i in held])
    for seed in s.seeds:
        files[f"repaired_{seed}"] = world / f"train_repaired_{seed}.jsonl"
        write_pairs(files[f"repaired_{seed}"], repaired(train, seed))
    return files


# ----------------------------------------------------------------------------- one run
def run_config(files: dict[str, Path], variant: Variant, seed: int, s: StudySettings, run_dir: Path):
    pairs = files["built"] if variant.pairs == "built" else files[f"repaired_{seed}"]
    overrides = {"data.pairs_path": str(pairs), "data.max_pairs": "null", "train.steps": s.steps,
                 "train.seed": seed, "model.tiny_seed": seed, "train.run_dir": str(run_dir),
                 "train.progress": "false", "train.on_existing": "overwrite", **s.run_overrides, **variant.overrides}
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def evaluate_policy(trainer, eval_pairs: list[Pair], seed: int, samples: int) -> dict:
    """Held-out understanding accuracy and generation attribute score of the trainer's policy
    (`engine.evaluate.evaluate`: greedy answers; `samples` images per prompt drawn as rollouts draw them)."""
    from engine.evaluate import OVERALL, evaluate

    report = evaluate(trainer.model, trainer.prompts, eval_pairs, trainer.cfg, images=trainer.parts.images, seed=seed,
                      samples=samples, generation_reward=trainer.parts.rewards["generation"], progress=False, grid=False)
    row = report.summary[OVERALL]
    keys = ("understanding_accuracy", "generation_reward", "attribute_score", "attribute_color", "attribute_shape",
            "attribute_count", "attribute_all")
    return {k: row.get(k) for k in keys}


def probe(trainer, built: list[Pair], s: StudySettings, seed: int) -> dict:
    """Median gradient cosine, built pairs vs randomly re-paired, on the trainer's current weights."""
    pairs = trainer.pairs
    trainer.pairs = built
    try:
        result = probe_gradients(trainer.cfg, num_batches=s.probe_batches, pairs_per_batch=1, seed=seed, trainer=trainer)
    finally:
        trainer.pairs = pairs
    summary = result.summary
    return {"paired": summary["paired"]["median"], "random": summary["random"]["median"],
            "difference": summary["matched"]["median_difference"]}


def run_one(files, variant: Variant, seed: int, s: StudySettings, work: Path, built, eval_pairs) -> dict:
    t0 = time.perf_counter()
    cfg = run_config(files, variant, seed, s, work / "runs" / f"{variant.name.replace(' ', '_').replace(',', '')}_{seed}")
    trainer = PairGRPOTrainer.from_config(cfg)
    out = {"variant": variant.name, "seed": seed}
    trainer.train()
    out["end"] = evaluate_policy(trainer, eval_pairs, seed, s.eval_samples)
    out["end_seen"] = evaluate_policy(trainer, built, seed, s.eval_samples)
    out["probe_end"] = probe(trainer, built, s, seed)
    out["wall_s"] = time.perf_counter() - t0
    return out


def initial(files, seed: int, s: StudySettings, work: Path, built, eval_pairs) -> dict:
    """The untrained model of this seed (the same for every variant): evaluation and probe."""
    trainer = PairGRPOTrainer.from_config(run_config(files, VARIANTS[-1], seed, s, work / "runs" / f"initial_{seed}"))
    return {"seed": seed, "start": evaluate_policy(trainer, eval_pairs, seed, s.eval_samples),
            "start_seen": evaluate_policy(trainer, built, seed, s.eval_samples),
            "probe_start": probe(trainer, built, s, seed)}


# ----------------------------------------------------------------------------- report
def _stats(vals: list[float]) -> dict:
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


#: (column title, result key, metric) of the report, in table order.
COLUMNS = (
    ("understanding accuracy, seen", "seen", "understanding_accuracy"),
    ("understanding accuracy, held out", "held_out", "understanding_accuracy"),
    ("generation reward, seen", "seen", "generation_reward"),
    ("generation reward, held out", "held_out", "generation_reward"),
    ("attribute score, held out", "held_out", "attribute_score"),
)
PROBE_COLUMNS = (("grad cosine, built pairs", "paired"), ("grad cosine, random pairs", "random"),
                 ("median paired - random", "difference"))


def aggregate(runs: list[dict], starts: list[dict]) -> dict:
    """{variant: {metric: {mean, std, n}}} over seeds; "(untrained)" holds the initial models."""
    def row(items: list[dict], probe_key: str) -> dict:
        out = {f"{where}/{metric}": _stats([x[where][metric] for x in items]) for _, where, metric in COLUMNS}
        out.update({f"probe/{k}": _stats([x[probe_key][k] for x in items]) for _, k in PROBE_COLUMNS})
        return out

    table = {"(untrained)": row([{"seen": x["start_seen"], "held_out": x["start"], "probe": x["probe_start"]}
                                 for x in starts], "probe")}
    for name in dict.fromkeys(r["variant"] for r in runs):
        table[name] = row([{"seen": r["end_seen"], "held_out": r["end"], "probe": r["probe_end"]}
                           for r in runs if r["variant"] == name], "probe")
    return table


def _fmt(st: dict, digits: int = 3) -> str:
    if st["mean"] is None:
        return "n/a"
    return f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f}"


def markdown(table: dict, meta: dict) -> str:
    titles = [c[0] for c in COLUMNS] + [c[0] for c in PROBE_COLUMNS]
    lines = [
        "# Does pairing help? Toy-world ablation",
        "",
        f"Command: `{meta['command']}` ({meta['wall_min']:.1f} min on {meta['machine']}).",
        f"{meta['n_train']} training pairs (\"seen\": evaluated on their own halves), {meta['n_eval']} held-out pairs, "
        f"{meta['steps']} PairGRPO steps, seeds {list(meta['seeds'])}; mean ± standard deviation over seeds. "
        f"Gradient cosines: median over {meta['probe_batches']} single-pair batches (`engine.probe`), "
        "on the untrained model (first row) and on each trained one.",
        "",
        "| variant | " + " | ".join(titles) + " |",
        "|---" * (len(titles) + 1) + "|",
    ]
    for name, row in table.items():
        cells = [_fmt(row[f"{where}/{metric}"]) for _, where, metric in COLUMNS]
        cells += [_fmt(row[f"probe/{k}"], 4) for _, k in PROBE_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    panels = (("seen/understanding_accuracy", "understanding accuracy (seen)"),
              ("seen/generation_reward", "generation reward (seen)"),
              ("probe/difference", "grad cosine: built - random pairs"))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4), sharey=True)
    for ax, (key, title) in zip(axes, panels):
        means = [table[n][key]["mean"] for n in names]
        stds = [table[n][key]["std"] or 0.0 for n in names]
        shown = [i for i, m in enumerate(means) if m is not None]
        ax.barh(shown, [means[i] for i in shown], xerr=[stds[i] for i in shown], color="#4a7fb5", capsize=3)
        for i in set(range(len(names))) - set(shown):  # undefined (e.g. every probe batch skipped): said, not drawn as 0
            ax.text(0, i, " n/a", va="center", color="#888888")
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


# ----------------------------------------------------------------------------- main
def run_study(s: StudySettings, work: Path, out: Path | None, command: str) -> dict:
    t0 = time.perf_counter()
    files = build_world(work, s)
    built, eval_pairs = read_pairs(files["built"]), read_pairs(files["eval"])
    priors = {"seen": answer_prior(built, built), "held_out": answer_prior(built, eval_pairs)}
    starts = [initial(files, seed, s, work, built, eval_pairs) for seed in s.seeds]
    runs = []
    variants = [v for v in VARIANTS if v.name in s.variants]
    for v in variants:
        for seed in s.seeds:
            runs.append(run_one(files, v, seed, s, work, built, eval_pairs))
            log.info("%s seed %d: %s", v.name, seed, runs[-1]["end"])
    table = aggregate(runs, starts)
    meta = {"command": command, "wall_min": (time.perf_counter() - t0) / 60, "n_train": s.n_train,
            "n_eval": s.n_eval, "steps": s.steps, "seeds": list(s.seeds), "probe_batches": s.probe_batches,
            "eval_samples": s.eval_samples, "world_seed": s.world_seed, "run_overrides": s.run_overrides,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__}
    meta["answer_prior_accuracy"] = priors
    meta["open_questions"] = s.open_questions
    result = {"meta": meta, "table": table, "initial": starts, "runs": runs}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "ablation_toyworld.json", result)
        tmp = out / "ablation_toyworld.md.tmp"
        tmp.write_text(markdown(table, meta))
        tmp.replace(out / "ablation_toyworld.md")
        plot(table, out / "ablation_toyworld.png")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 variants, 1 seed, 2 steps: a smoke test")
    ap.add_argument("--steps", type=int, default=None, help="PairGRPO steps per run")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (0..N-1)")
    ap.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                    help=f"run only these variants (default: all): {', '.join(repr(v.name) for v in VARIANTS)}")
    ap.add_argument("--open-questions", action="store_true",
                    help="ask each understanding question without its options, answered by the attribute word "
                         "(default: the toy world's multiple-choice questions)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="extra config overrides of every run, e.g. model.train_modules=[...]")
    ap.add_argument("--work", default="/tmp/pairuni_ablation", help="toy world and run directories")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                    help="where ablation_toyworld.{json,md,png} go ('' for nowhere)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    s = StudySettings.quick() if args.quick else StudySettings()
    if args.steps is not None:
        s.steps = args.steps
    if args.seeds is not None:
        s.seeds = tuple(range(args.seeds))
    if args.open_questions:
        s.open_questions = True
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set: expected KEY=VALUE, got {item!r}")
        s.run_overrides = {**s.run_overrides, key: value}
    if args.variants is not None:
        unknown = [v for v in args.variants if v not in {x.name for x in VARIANTS}]
        if unknown:
            ap.error(f"--variants: unknown {unknown}")
        s.variants = tuple(args.variants)
    command = "python benchmarks/ablation_toyworld.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = run_study(s, Path(args.work), Path(args.out) if args.out else None, command.strip())
    print(markdown(result["table"], result["meta"]))
    print(json.dumps({"wall_min": round(result["meta"]["wall_min"], 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
