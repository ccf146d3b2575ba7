"""Does pairing help? PairUni's data and pair-weighting ablations, reproduced on the toy world.

    python studies/toyworld/ablation_toyworld.py --jobs 2        # the study: 7 variants x 5 seeds, 2 runs at a time
    python studies/toyworld/ablation_toyworld.py --transfer purple --jobs 2   # the transfer test (see `recoloured`)
    python studies/toyworld/ablation_toyworld.py --quick         # 2 variants, 1 seed, a few steps (run by make test)

The paper (docs/PAIRUNI.md "Data ablation", "Gradient analysis") trains Janus-Pro-1B on
understanding-only, generation-only, an unpaired mix, random pairs and PairUG, and weights
retrieved pairs by nothing / s / sqrt(s). Here the same variants train the tiny Janus (its VQ
decoder paints each image token as a block of a toy-world colour) on a fresh toy world, for the
same steps, with the same seeds and the same held-out evaluation set:

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

The testbed (the first version, RL from the random tiny Janus on multiple-choice questions, could
not separate anything: every policy collapsed to the most common answer letter):
- one toy world, split into disjoint held-out (n_eval), warm-start (n_pretrain) and training
  (n_train) pairs;
- a warm start per seed (`toyworld_warmstart.warm_start`): supervised steps on the warm-start
  pairs, both tasks, so the policy starts part-competent as PairUni's Janus-Pro does; every RL
  run of that seed starts from the exported folder (`model.path`);
- open questions (`open_question`: answered by the attribute word, no option letter to guess);
  `--multiple-choice` restores the letters, `--warm-steps 0` the random start.

Reported per variant (mean and spread over seeds): understanding accuracy (greedy answer) and the
generation reward and attribute score (read off the decoded pixels), on the training pairs
("seen") and the held-out pairs; the change from the seed's starting model, and the difference
from PairUni's arm of the same seed; and the gradient-cosine probe (`engine.probe.probe_gradients`:
cos(grad L_und, grad L_gen), built pairs vs randomly re-paired) on the starting model and on each
trained one. Results: JSON, markdown tables and a plot under --out (default results/ beside this script).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = HERE / "results"
for _path in (str(ROOT), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from engine.build import toy_tokenizer_texts  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.data.io import read_pairs, write_pairs  # noqa: E402
from engine.data.schema import Pair  # noqa: E402
from engine.data.toyworld import COLORS, POSITIONS, Scene, generate_toy_world, scene_similarity  # noqa: E402
from engine.files import atomic_writer, write_json  # noqa: E402
from engine.model import TINY_SPECIAL  # noqa: E402
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
PAIRUNI = "built, sqrt s"  # the paper's method, which the other arms are compared with seed by seed


@dataclass
class StudySettings:
    """Sizes of the study; `quick()` is the smoke-test version run by make test."""

    n_train: int = 256
    n_eval: int = 128
    n_pretrain: int = 512  # pairs of the warm start (disjoint from the training and held-out pairs)
    warm_steps: int = 1000  # supervised steps of the warm start (0: RL from the random tiny model)
    warm_lr: float = 1e-3
    steps: int = 200
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    probe_batches: int = 16
    eval_samples: int = 2  # images drawn per held-out prompt
    world_seed: int = 1234
    transfer: str | None = None  # a toy-world colour kept out of every understanding half (the transfer test)
    open_questions: bool = True  # False: the toy world's multiple-choice questions instead of `open_question`s
    variants: tuple[str, ...] = tuple(v.name for v in VARIANTS)
    run_overrides: dict = field(default_factory=lambda: {
        "data.pairs_per_step": 4, "rollout.group_size": 8, "rollout.max_new_tokens": 4, "optim.micro_batch_size": 16,
        "optim.optimizer": "adamw", "optim.lr": 1e-4,
    })

    @classmethod
    def quick(cls) -> StudySettings:
        return cls(n_train=8, n_eval=6, n_pretrain=64, warm_steps=3, steps=2, seeds=(0,), probe_batches=2, eval_samples=1,
                   variants=QUICK_VARIANTS,
                   run_overrides={"data.pairs_per_step": 2, "rollout.group_size": 4, "rollout.max_new_tokens": 3,
                                  "optim.micro_batch_size": 8, "optim.optimizer": "adamw", "optim.lr": 1e-4})


# ----------------------------------------------------------------------------- data
def scene_of(sample) -> Scene:
    """The toy-world scene a sample was rendered from (its `attributes`)."""
    a = sample.meta["attributes"]
    return Scene(a["color"], a["shape"], tuple(POSITIONS.index(p) for p in a["positions"]))


def open_question(sample):
    """The sample's question without its options, answered by the attribute word itself ("red", "circle",
    "3", "top left"): no option letter to guess, so a policy scores only by reading the image (or by the
    prior of one answer, which `answer_prior` measures)."""
    a, qtype = sample.meta["attributes"], sample.tag.split("/")[-1]
    truth = {"color": a["color"], "shape": a["shape"], "count": str(a["count"]),
             "position": a["positions"][0]}[qtype]
    return dataclasses.replace(sample, question=sample.question.split("\n")[0], answer=truth)


def with_open_questions(pairs: list[Pair]) -> list[Pair]:
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


def involves(sample, colour: str) -> bool:
    """Does `sample` show or name `colour` (its image's colour, or the word in its question or answer)?"""
    words = set(f"{sample.question} {sample.answer}".lower().replace("?", " ").split())
    return sample.meta["attributes"]["color"] == colour or colour in words


def colour_question(sample):
    """`sample` asked the open colour question about its own image ("What color is the circle in the image?")."""
    from engine.data.toyworld import question_for

    stem = question_for(scene_of(sample), "color", np.random.default_rng(0))[0].split("\n")[0]
    return dataclasses.replace(sample, question=stem, answer=sample.meta["attributes"]["color"], tag="toy/color")


def recoloured(pair: Pair, colour: str, world: Path, index: int, open_questions: bool) -> Pair:
    """`pair` with an understanding half that neither shows nor names `colour`: when it does, the same scene
    in another colour (rendered into `world`/images/t_<index>.png, a new question of the same kind), paired as
    a retrieved pair with the real scene similarity; the generation half is kept as it is."""
    from engine.data.toyworld import DEFAULT_IMAGE_SIZE, caption_for, question_for, render

    u = pair.understand
    if not involves(u, colour):
        return pair
    old = scene_of(u)
    others = [c for c in COLORS if c != colour]
    scene = Scene(others[index % len(others)], old.shape, old.cells)
    rng = np.random.default_rng(index)
    name = f"images/t_{index:05d}.png"
    with atomic_writer(world / name, "wb", encoding=None) as fh:
        render(scene, DEFAULT_IMAGE_SIZE, rng).save(fh, format="PNG")
    for _ in range(100):  # multiple-choice questions may offer the colour as a distractor: draw again
        question, answer = question_for(scene, u.tag.split("/")[-1], rng)
        if colour not in question.lower():
            break
    new = dataclasses.replace(u, image_path=name, prompt=caption_for(scene), question=question, answer=answer,
                              source_id=f"{u.source_id}-recoloured", meta={**u.meta, "attributes": scene.attributes()})
    if open_questions:
        new = open_question(new)
    return Pair("retrieved", scene_similarity(scene_of(pair.generate), scene), understand=new, generate=pair.generate)


def transfer_sets(pairs: list[Pair], held: list[Pair], colour: str) -> dict[str, list[Pair]]:
    """The transfer test's questions: "concept": the colour question about every understanding image of
    `colour` in the world (none of them is trained on); "control": the colour question about the held-out
    understanding images of the other colours."""
    concept = [dataclasses.replace(p, understand=colour_question(p.understand)) for p in pairs
               if p.understand.meta["attributes"]["color"] == colour]
    control = [dataclasses.replace(p, understand=colour_question(p.understand)) for p in held
               if p.understand.meta["attributes"]["color"] != colour]
    return {"concept": concept, "control": control}


def build_world(work: Path, s: StudySettings) -> dict[str, Path]:
    """A fresh toy world of n_eval + n_pretrain + n_train pairs, split by a seeded permutation into the
    held-out, warm-start and training pairs (disjoint pairs of one distribution).

    Returns the pairs files: built (training), eval (held out), pretrain (warm start) and repaired_<seed>
    per seed. Raises ValueError when the warm-start pairs lack a word of the others (the warm-started
    model's tokenizer is built from them)."""
    from engine.text import ToyTokenizer

    world = work / "world"
    n_pre = s.n_pretrain if s.warm_steps > 0 else 0
    generate_toy_world(s.n_train + s.n_eval + n_pre, world, seed=s.world_seed, overwrite=True, progress=False)
    pairs = read_pairs(world / "pairs.jsonl")
    if s.open_questions:
        pairs = with_open_questions(pairs)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(s.world_seed)).tolist()
    held, pre, train = (sorted(order[: s.n_eval]), sorted(order[s.n_eval: s.n_eval + n_pre]),
                        sorted(order[s.n_eval + n_pre:]))
    files = {"built": world / "train_built.jsonl", "eval": world / "eval.jsonl"}
    # the transfer test: the colour appears in generation halves only, in warm start and RL alike (an
    # understanding half that shows or names it is recoloured; its original image becomes a concept question)
    if s.transfer is not None:
        if s.transfer not in COLORS:
            raise ValueError(f"transfer: expected a toy-world colour {tuple(COLORS)}, got {s.transfer!r}")
        for name, items in transfer_sets(pairs, [pairs[i] for i in held], s.transfer).items():
            files[f"transfer_{name}"] = world / f"transfer_{name}.jsonl"
            write_pairs(files[f"transfer_{name}"], items)
        pairs = [recoloured(p, s.transfer, world, i, s.open_questions) for i, p in enumerate(pairs)]
    train = [pairs[i] for i in train]
    write_pairs(files["built"], train)
    write_pairs(files["eval"], [pairs[i] for i in held])
    if n_pre:
        files["pretrain"] = world / "pretrain.jsonl"
        write_pairs(files["pretrain"], [pairs[i] for i in pre])
        vocab = ToyTokenizer.from_texts(toy_tokenizer_texts([pairs[i] for i in pre]))
        unknown = [t for t in toy_tokenizer_texts(pairs) if TINY_SPECIAL.unk in vocab.encode(t)]
        if unknown:
            raise ValueError(f"n_pretrain={s.n_pretrain}: the warm-start pairs lack a word of {unknown[0]!r} "
                             "(training or held-out pairs); raise n_pretrain")
    for seed in s.seeds:
        files[f"repaired_{seed}"] = world / f"train_repaired_{seed}.jsonl"
        write_pairs(files[f"repaired_{seed}"], repaired(train, seed))
    return files


def warm_models(files: dict[str, Path], s: StudySettings, work: Path, jobs: int = 1) -> dict[int, dict]:
    """{seed: warm-start result (its "path" is the model folder every RL run of that seed starts from)};
    empty when s.warm_steps is 0 (RL from the random tiny model of each seed)."""
    from toyworld_warmstart import warm_start

    if s.warm_steps <= 0:
        return {}
    done = parallel_map(warm_start, [((files["pretrain"], work / "warm" / f"seed_{seed}"),
                                      {"seed": seed, "steps": s.warm_steps, "lr": s.warm_lr}) for seed in s.seeds], jobs)
    return dict(zip(s.seeds, done))


def control_starts(files: dict[str, Path], s: StudySettings, work: Path, jobs: int = 1) -> list[dict]:
    """The transfer test's control: per seed, the warm start again with the transfer colour left out of the
    generation loss (a model that never drew it), and its transfer scores."""
    from toyworld_warmstart import warm_start

    done = parallel_map(warm_start, [((files["pretrain"], work / "warm_control" / f"seed_{seed}"),
                                      {"seed": seed, "steps": s.warm_steps, "lr": s.warm_lr,
                                       "skip_generation_colour": s.transfer}) for seed in s.seeds], jobs)
    calls = [(({**files, f"warm_{seed}": Path(w["path"])}, seed, s, work), {}) for seed, w in zip(s.seeds, done)]
    return parallel_map(control_scores, calls, jobs)


def control_scores(files, seed: int, s: StudySettings, work: Path) -> dict:
    trainer = PairGRPOTrainer.from_config(run_config(files, VARIANTS[-1], seed, s, work / "runs" / f"control_{seed}"))
    return {"seed": seed, "transfer_start": transfer_scores(trainer, files, s.transfer)}


def _worker_init() -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)


def _call(fn, args, kwargs):
    return fn(*args, **kwargs)


def parallel_map(fn, calls: list[tuple[tuple, dict]], jobs: int) -> list:
    """[fn(*args, **kwargs) for args, kwargs in calls], in order, each call on one torch thread: in this
    process when jobs <= 1, else in `jobs` spawned processes. One thread always, because CPU reductions
    on 1 and 2 threads round differently and a run's sampled tokens follow: --jobs changes how long the
    study takes, never its numbers. (Measured, 2 seeds of one arm: 206 s with --jobs 1, 116 s with --jobs 2,
    the same table; with --jobs 1 on 2 threads it took 146 s and its numbers differed.)"""
    if jobs <= 1 or len(calls) <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return [fn(*a, **k) for a, k in calls]
        finally:
            torch.set_num_threads(threads)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(jobs, len(calls)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init) as pool:
        return list(pool.map(_call, [fn] * len(calls), [a for a, _ in calls], [k for _, k in calls]))


# ----------------------------------------------------------------------------- one run
def run_config(files: dict[str, Path], variant: Variant, seed: int, s: StudySettings, run_dir: Path):
    pairs = files["built"] if variant.pairs == "built" else files[f"repaired_{seed}"]
    overrides = {"data.pairs_path": str(pairs), "data.max_pairs": "null", "train.steps": s.steps,
                 "train.seed": seed, "model.tiny_seed": seed, "train.run_dir": str(run_dir),
                 "train.progress": "false", "train.on_existing": "overwrite", **s.run_overrides, **variant.overrides}
    if f"warm_{seed}" in files:  # the seed's warm-started model folder (its tokenizer, the pretrained parts)
        overrides["model.path"] = str(files[f"warm_{seed}"])
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
    if s.transfer is not None:
        out["transfer_end"] = transfer_scores(trainer, files, s.transfer)
    out["wall_s"] = time.perf_counter() - t0
    log.info("%s seed %d (%.0f s): %s", variant.name, seed, out["wall_s"], out["end"])
    return out


@torch.no_grad()
def transfer_scores(trainer, files: dict[str, Path], colour: str) -> dict:
    """The transfer test on the trainer's policy: greedy accuracy of the colour question on images of `colour`
    (never in understanding data) and on the control images; and the lift, mean log p(colour word | an image of
    it) - mean log p(colour word | a control image), teacher-forced (> 0: the policy's text head ties the word to
    the pixels, even where greedy answers never say it)."""
    from toyworld_warmstart import truth_understanding

    from engine.policy import task_view
    from engine.rewards import answer_accuracy
    from engine.rollout import answer_questions
    from pairuni_kernels import linear_logprobs

    out = {}
    logp = {}
    for name in ("concept", "control"):
        samples = [p.understand for p in read_pairs(files[f"transfer_{name}"])]
        images = torch.stack([trainer.parts.images(x) for x in samples])
        texts = answer_questions(trainer.model, trainer.prompts, images, [x.question for x in samples],
                                 max_new_tokens=trainer.cfg.rollout.max_new_tokens)
        out[f"{name}_accuracy"] = statistics.fmean(answer_accuracy(t, x.answer) for t, x in zip(texts, samples))
        asked = [dataclasses.replace(x, answer=colour) for x in samples]
        view = task_view(trainer.model, "understanding", truth_understanding(trainer.prompts, asked, images))
        first = linear_logprobs(view.hidden[:, 0], view.weight, view.targets[:, 0], bias=view.bias)
        logp[name] = float(first.mean())
    out["lift"] = logp["concept"] - logp["control"]
    out["logp_concept"] = logp["concept"]
    return out


def initial(files, seed: int, s: StudySettings, work: Path, built, eval_pairs) -> dict:
    """The untrained model of this seed (the same for every variant): evaluation and probe."""
    trainer = PairGRPOTrainer.from_config(run_config(files, VARIANTS[-1], seed, s, work / "runs" / f"initial_{seed}"))
    return {"seed": seed, "start": evaluate_policy(trainer, eval_pairs, seed, s.eval_samples),
            "start_seen": evaluate_policy(trainer, built, seed, s.eval_samples),
            "probe_start": probe(trainer, built, s, seed),
            **({"transfer_start": transfer_scores(trainer, files, s.transfer)} if s.transfer is not None else {})}


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


START = "(start)"


def _minus(a, b):
    return None if a is None or b is None else a - b


def aggregate(runs: list[dict], starts: list[dict]) -> dict:
    """{variant: {metric: {mean, std, n}}} over seeds; START holds the models the runs start from.

    "delta/<where>/<metric>": the run's end minus its own seed's start, so that the spread of the seeds'
    starting models (each seed has its own warm start) does not hide a change every seed shares."""
    start_of = {x["seed"]: x for x in starts}

    def row(items: list[dict], probe_key: str) -> dict:
        out = {f"{where}/{metric}": _stats([x[where][metric] for x in items]) for _, where, metric in COLUMNS}
        out.update({f"probe/{k}": _stats([x[probe_key][k] for x in items]) for _, k in PROBE_COLUMNS})
        out.update({f"delta/{where}/{metric}": _stats([x["delta"][where][metric] for x in items])
                    for _, where, metric in COLUMNS})
        return out

    def view(end_seen, end, probe_, seed):
        s0 = start_of[seed]
        return {"seen": end_seen, "held_out": end, "probe": probe_,
                "delta": {"seen": {k: _minus(v, s0["start_seen"][k]) for k, v in end_seen.items()},
                          "held_out": {k: _minus(v, s0["start"][k]) for k, v in end.items()}}}

    table = {START: row([view(x["start_seen"], x["start"], x["probe_start"], x["seed"]) for x in starts], "probe")}
    for name in dict.fromkeys(r["variant"] for r in runs):
        table[name] = row([view(r["end_seen"], r["end"], r["probe_end"], r["seed"])
                           for r in runs if r["variant"] == name], "probe")
    # each variant minus PairUni's arm of the same seed (same warm start, same rollout seeds)
    ref = {r["seed"]: r for r in runs if r["variant"] == PAIRUNI}
    for name in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == name and r["seed"] in ref]
        for _, where, metric in COLUMNS:
            key = "end_seen" if where == "seen" else "end"
            diffs = [_minus(r[key][metric], ref[r["seed"]][key][metric]) for r in mine]
            st = _stats(diffs)
            st["lower_in"] = sum(d is not None and d < 0 for d in diffs)  # seeds where PairUni's arm scored higher
            table[name][f"vs_pairuni/{where}/{metric}"] = st
    return table


def _fmt(st: dict, digits: int = 3) -> str:
    if st["mean"] is None:
        return "n/a"
    return f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f}"


def warm_line(meta: dict) -> str:
    w = meta.get("warm_start") or {}
    if not w.get("steps"):
        return "none: the random tiny Janus"
    n_pre = meta.get("transfer_counts", {}).get("pretrain", {}).get("pairs", w["n_pretrain"])
    return f"{w['steps']} supervised steps at lr {w['lr']:g} on {n_pre} other pairs of the same world"


def markdown(table: dict, meta: dict) -> str:
    titles = [c[0] for c in COLUMNS] + [c[0] for c in PROBE_COLUMNS]
    lines = [
        "# Does pairing help? Toy-world ablation",
        "",
        f"Command: `{meta['command']}` ({meta['wall_min']:.1f} min on {meta['machine']}).",
        f"{meta.get('transfer_counts', {}).get('built', {}).get('pairs', meta['n_train'])} training pairs "
        f"(\"seen\": evaluated on their own halves), {meta.get('n_eval_pairs', meta['n_eval'])} held-out pairs, "
        f"{meta['steps']} PairGRPO steps, seeds {list(meta['seeds'])}; mean ± standard deviation over seeds. "
        f"Questions: {'open (the answer is the attribute word)' if meta['open_questions'] else 'multiple choice'}. "
        f"Every run of a seed starts from that seed's warm start ({warm_line(meta)}); the first row is that model. "
        f"Answer-prior baseline (most common training answer per question kind, image ignored): "
        f"{meta['answer_prior_accuracy']['seen']:.3f} seen, {meta['answer_prior_accuracy']['held_out']:.3f} held out. "
        f"Gradient cosines: median over {meta['probe_batches']} single-pair batches (`engine.probe`).",
        "",
        "| variant | " + " | ".join(titles) + " |",
        "|---" * (len(titles) + 1) + "|",
    ]
    for name, row in table.items():
        cells = [_fmt(row[f"{where}/{metric}"]) for _, where, metric in COLUMNS]
        cells += [_fmt(row[f"probe/{k}"], 4) for _, k in PROBE_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Change from the seed's start (end minus the same seed's starting model; mean ± standard deviation "
              "over seeds):", "", "| variant | " + " | ".join(c[0] for c in COLUMNS) + " |",
              "|---" * (len(COLUMNS) + 1) + "|"]
    for name, row in table.items():
        if name != START:
            lines.append(f"| {name} | " + " | ".join(_fmt(row[f"delta/{where}/{metric}"], 3)
                                                       for _, where, metric in COLUMNS) + " |")
    others = [n for n, row in table.items() if n not in (START, PAIRUNI) and f"vs_pairuni/seen/{COLUMNS[0][2]}" in row]
    if others:
        lines += ["", f"Each variant minus \"{PAIRUNI}\" of the same seed (mean ± standard deviation over seeds; in brackets, "
                  f"the seeds where \"{PAIRUNI}\" scored higher):", "",
                  "| variant | " + " | ".join(c[0] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
        for name in others:
            cells = []
            for _, where, metric in COLUMNS:
                st = table[name][f"vs_pairuni/{where}/{metric}"]
                cells.append(f"{_fmt(st)} ({st['lower_in']}/{st['n']})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


TRANSFER_COLUMNS = (("colour accuracy, concept images", "concept_accuracy"),
                    ("colour accuracy, control images", "control_accuracy"),
                    ("log p(concept word): concept - control images", "lift"))
TRANSFER_VARIANTS = ("understanding-only", "unpaired mix", "built, sqrt s")


CONTROL = "(start, control: never drew the colour)"


def transfer_table(runs: list[dict], starts: list[dict], control: list[dict] = ()) -> dict:
    """{variant: {key: {mean, std, n}}} of the transfer scores; START: the starting models; CONTROL: the
    control warm starts (`control_starts`), when run."""
    table = {START: {k: _stats([x["transfer_start"][k] for x in starts]) for _, k in TRANSFER_COLUMNS}}
    if control:
        table[CONTROL] = {k: _stats([x["transfer_start"][k] for x in control]) for _, k in TRANSFER_COLUMNS}
        ref = {x["seed"]: x["transfer_start"]["lift"] for x in starts}
        diffs = [ref[x["seed"]] - x["transfer_start"]["lift"] for x in control if x["seed"] in ref]
        table[START]["lift_minus_control"] = {**_stats(diffs), "higher_in": sum(d > 0 for d in diffs)}
    for name in dict.fromkeys(r["variant"] for r in runs):
        table[name] = {k: _stats([r["transfer_end"][k] for r in runs if r["variant"] == name]) for _, k in TRANSFER_COLUMNS}
    return table


def transfer_counts(files: dict[str, Path], colour: str) -> dict:
    """How many pairs the transfer split kept, and how many of their generation halves show `colour`."""
    out = {}
    for key in ("built", "pretrain"):
        if key in files:
            pairs = read_pairs(files[key])
            out[key] = {"pairs": len(pairs),
                        "generation_halves": sum(p.generate.meta["attributes"]["color"] == colour for p in pairs)}
    return out


def transfer_markdown(table: dict, meta: dict) -> str:
    colour, counts = meta["transfer"], meta["transfer_counts"]
    warm = counts.get("pretrain")
    warm_text = f"{warm['generation_halves']} of the {warm['pairs']} warm-start pairs' and " if warm else ""
    lines = [f"# Transfer test: \"{colour}\" only in generation data", "",
             f"Command: `{meta['command']}` ({meta['wall_min']:.1f} min on {meta['machine']}).",
             f"No understanding half of the warm-start or training pairs shows or names {colour}; generation halves "
             f"do ({warm_text}{counts['built']['generation_halves']} of the {counts['built']['pairs']} training pairs' "
             f"generation prompts are {colour}). Concept questions: the open colour question about each of the world's "
             f"{meta['transfer_sizes']['concept']} understanding images of {colour}; control: the same question "
             f"about {meta['transfer_sizes']['control']} held-out images of the other colours. Seeds "
             f"{list(meta['seeds'])}, {meta['steps']} PairGRPO steps after the warm start ({warm_line(meta)}); "
             "mean ± standard deviation over seeds.", "",
             "| model | " + " | ".join(c[0] for c in TRANSFER_COLUMNS) + " |", "|---" * (len(TRANSFER_COLUMNS) + 1) + "|"]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(row[k]) for _, k in TRANSFER_COLUMNS) + " |")
    gap = table[START].get("lift_minus_control")
    if gap is not None:
        lines += ["", f"The control warm start of each seed left {colour} out of the generation loss (same pairs, same "
                  f"batches, the word still in the tokenizer). Lift of the warm start minus the control's, same seed: "
                  f"{_fmt(gap)} (higher in {gap['higher_in']} of {gap['n']} seeds)."]
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    panels = (("delta/seen/understanding_accuracy", "understanding accuracy, seen: change"),
              ("delta/held_out/understanding_accuracy", "understanding accuracy, held out: change"),
              ("delta/held_out/generation_reward", "generation reward, held out: change"),
              ("probe/difference", "grad cosine: built - random pairs"))
    fig, axes = plt.subplots(1, len(panels), figsize=(19, 4), sharey=True)
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
    with atomic_writer(path, "wb", encoding=None) as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def run_study(s: StudySettings, work: Path, out: Path | None, command: str, jobs: int = 1) -> dict:
    t0 = time.perf_counter()
    files = build_world(work, s)
    built, eval_pairs = read_pairs(files["built"]), read_pairs(files["eval"])
    priors = {"seen": answer_prior(built, built), "held_out": answer_prior(built, eval_pairs)}
    warm = warm_models(files, s, work, jobs)
    files.update({f"warm_{seed}": Path(w["path"]) for seed, w in warm.items()})
    starts = parallel_map(initial, [((files, seed, s, work, built, eval_pairs), {}) for seed in s.seeds], jobs)
    variants = [v for v in VARIANTS if v.name in s.variants]
    runs = parallel_map(run_one, [((files, v, seed, s, work, built, eval_pairs), {}) for v in variants
                                  for seed in s.seeds], jobs)
    table = aggregate(runs, starts)
    control = control_starts(files, s, work, jobs) if s.transfer is not None and warm else []
    meta = {"command": command, "wall_min": (time.perf_counter() - t0) / 60, "n_train": s.n_train,
            "n_eval": s.n_eval, "steps": s.steps, "seeds": list(s.seeds), "probe_batches": s.probe_batches,
            "eval_samples": s.eval_samples, "world_seed": s.world_seed, "run_overrides": s.run_overrides,
            "machine": f"{platform.machine()}, {max(jobs, 1)} process{'es' if jobs > 1 else ''} x 1 thread",
            "torch": torch.__version__}
    meta["answer_prior_accuracy"] = priors
    meta["n_eval_pairs"] = len(eval_pairs)
    meta["open_questions"] = s.open_questions
    meta["warm_start"] = {"n_pretrain": s.n_pretrain, "steps": s.warm_steps, "lr": s.warm_lr,
                          "runs": {str(k): {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in warm.items()}}
    result = {"meta": meta, "table": table, "initial": starts, "runs": runs}
    if control:
        result["control"] = control
    name, text = "ablation_toyworld", markdown(table, meta)
    if s.transfer is not None:
        meta["transfer"] = s.transfer
        meta["transfer_sizes"] = {k: len(read_pairs(files[f"transfer_{k}"])) for k in ("concept", "control")}
        meta["transfer_counts"] = transfer_counts(files, s.transfer)
        result["transfer"] = transfer_table(runs, starts, result.get("control", []))
        name, text = "ablation_transfer", transfer_markdown(result["transfer"], meta) + "\n" + text
    result["markdown"] = text
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / f"{name}.json", result)
        with atomic_writer(out / f"{name}.md") as fh:
            fh.write(text)
        plot(table, out / f"{name}.png")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 variants, 1 seed, a few warm-start and RL steps: a smoke test")
    ap.add_argument("--steps", type=int, default=None, help="PairGRPO steps per run")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (0..N-1)")
    ap.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                    help=f"run only these variants (default: all): {', '.join(repr(v.name) for v in VARIANTS)}")
    ap.add_argument("--multiple-choice", action="store_true",
                    help="the toy world's multiple-choice questions (answered by a letter) instead of open questions "
                         "(the attribute word)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="extra config overrides of every run, e.g. model.train_modules=[...]")
    ap.add_argument("--transfer", default=None, metavar="COLOUR",
                    help="the transfer test: COLOUR (e.g. purple) in generation data only, measured in understanding; "
                         f"variants {', '.join(repr(v) for v in TRANSFER_VARIANTS)} unless --variants says otherwise")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own 1-thread process")
    ap.add_argument("--warm-steps", type=int, default=None,
                    help="supervised warm-start steps per seed (0: RL from the random tiny model, the first study)")
    ap.add_argument("--work", default="/tmp/pairuni_ablation", help="toy world and run directories")
    ap.add_argument("--out", default=None,
                    help="where ablation_toyworld.{json,md,png} go ('' for nowhere; default: results/ beside this "
                         "script, results/quick/ with --quick, so a smoke test never replaces the study's results)")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = str(RESULTS / "quick" if args.quick else RESULTS)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    s = StudySettings.quick() if args.quick else StudySettings()
    if args.steps is not None:
        s.steps = args.steps
    if args.seeds is not None:
        s.seeds = tuple(range(args.seeds))
    if args.multiple_choice:
        s.open_questions = False
    if args.warm_steps is not None:
        s.warm_steps = args.warm_steps
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set: expected KEY=VALUE, got {item!r}")
        s.run_overrides = {**s.run_overrides, key: value}
    if args.transfer is not None:
        s.transfer = args.transfer
        s.variants = TRANSFER_VARIANTS if not args.quick else s.variants
    if args.variants is not None:
        unknown = [v for v in args.variants if v not in {x.name for x in VARIANTS}]
        if unknown:
            ap.error(f"--variants: unknown {unknown}")
        s.variants = tuple(args.variants)
    for flag, value, least in (("--steps", s.steps, 1), ("--seeds", len(s.seeds), 1), ("--jobs", args.jobs, 1),
                               ("--warm-steps", s.warm_steps, 0)):
        if value < least:
            ap.error(f"{flag}: expected an integer >= {least}, got {value}")
    if s.transfer is not None and s.transfer not in COLORS:
        ap.error(f"--transfer: expected a toy-world colour {tuple(COLORS)}, got {s.transfer!r}")
    command = "python studies/toyworld/ablation_toyworld.py " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        load_config(None, [f"{k}={v}" for k, v in s.run_overrides.items()])  # a bad --set: now, not in a worker
        result = run_study(s, Path(args.work), Path(args.out) if args.out else None, command.strip(), jobs=args.jobs)
    except ValueError as exc:  # ConfigError, a warm-start world that lacks a word, ...
        print(f"ablation_toyworld: {exc}", file=sys.stderr)
        return 2
    print(result["markdown"])
    print(json.dumps({"wall_min": round(result["meta"]["wall_min"], 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
