"""`pairuni eval --model RUN|CHECKPOINT|DIR --pairs FILE [--out DIR]`: how well a policy understands and draws.

    report = evaluate(model, prompts, pairs, cfg, images=image_cache(root, prompts), seed=0, samples=4)
    print(report.table()); report.save(out_dir, "eval"); report.metrics("eval/")

- Understanding: the policy's greedy answer to each pair's understanding question (`answer_questions`),
  scored by the accuracy reward (the option letter for multiple choice): `understanding_accuracy`.
- Generation: `samples` images per generation prompt, sampled as the rollouts sample them (`rollout.*`:
  CFG scale, temperature, top-k / top-p), scored by `reward.generation`: `generation_reward`. For toy-world
  prompts (attributes colour, shape and count) also the GenEval idea, read off the decoded pixels by
  `toyworld.describe_image`: `attribute_color` / `_shape` / `_count` (share of images with it right),
  `attribute_score` (their mean) and `attribute_all` (share with all three right).
- Every number overall and per `tag` of the halves (understanding tags for understanding, generation tags
  for generation), a table, a JSON file with every answer and image score, and a PNG grid of the first
  `GRID_PROMPTS` prompts' images with the prompt under each row and each image's reward under it.

Deterministic given the seed: image rows draw from `rollout_seeds(seed, 0, "evaluation", n)` (a stream no
training step uses), answers are greedy, and the global RNGs are restored afterwards, so evaluating
during training (`train.eval_every`) leaves the training run exactly as it was. Rows go through the model
in chunks of `batch_rows` (default: rollout.max_batch, else a training step's P * G), prompts whole.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .cli import user_error

log = logging.getLogger("pairuni.evaluate")

#: Prompts shown in the image grid (the first ones of the file).
GRID_PROMPTS = 16
#: Attributes the toy-world score checks, as `toyworld.describe_image` names them.
ATTRIBUTES = ("color", "shape", "count")
OVERALL = "overall"
UNTAGGED = "(untagged)"
#: The pairs data.eval_fraction held out, written into run_dir/eval/ at the start of training.
HELDOUT_FILE = "heldout_pairs.jsonl"


def write_pairs_elsewhere(pairs: list, root: str | Path, path: str | Path) -> None:
    """Write `pairs` (images relative to `root`) as a PairUG file at `path` with absolute image paths, so
    `pairuni eval --pairs path` finds the images wherever the file (a run folder set aside) moves."""
    import dataclasses

    from .data.io import resolve_image_path, write_pairs

    def absolute(sample):
        return dataclasses.replace(sample, image_path=str(resolve_image_path(sample.image_path, root).resolve()))

    write_pairs(path, [dataclasses.replace(p, understand=absolute(p.understand), generate=absolute(p.generate))
                       for p in pairs])


# ----------------------------------------------------------------------------- toy-world attribute score
def attribute_checks(image, attributes: dict) -> dict[str, bool] | None:
    """{"color", "shape", "count": read off `image` right?} for a prompt's toy-world `attributes`, or None when
    they lack one of ATTRIBUTES. image: [3, S, S] float in [0, 1] (or what `toyworld.describe_image` takes)."""
    from .data import toyworld

    if not all(attributes.get(a) is not None for a in ATTRIBUTES):
        return None
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    seen = toyworld.describe_image(image)
    return {a: seen[a] == attributes[a] for a in ATTRIBUTES}


def attribute_score(checks: dict[str, bool]) -> float:
    """Share of ATTRIBUTES right (1 for a correct image, 2/3 with a wrong colour)."""
    return sum(checks[a] for a in ATTRIBUTES) / len(ATTRIBUTES)


# ----------------------------------------------------------------------------- the report
def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class EvalReport:
    """Results of one evaluation.

    questions: one dict per understanding question (id, tag, answer, predicted text, correct 0/1).
    prompts:   one dict per generation prompt (id, tag, prompt, rewards [samples], attribute checks or None).
    settings:  model, seed, samples, rewards, ...; grid: the image grid (PIL image) or None.
    """

    questions: list[dict]
    prompts: list[dict]
    settings: dict
    grid: object = None
    summary: dict = field(init=False)

    def __post_init__(self):
        self.summary = self._summarise()

    def _summarise(self) -> dict[str, dict]:
        """{OVERALL | tag: numbers}; a tag's understanding numbers cover the questions with that tag, its
        generation numbers the prompts with that tag."""
        groups: dict[str, dict[str, list]] = defaultdict(lambda: {"questions": [], "prompts": []})
        for q in self.questions:
            for name in (OVERALL, q["tag"] or UNTAGGED):
                groups[name]["questions"].append(q)
        for p in self.prompts:
            for name in (OVERALL, p["tag"] or UNTAGGED):
                groups[name]["prompts"].append(p)
        out = {}
        for name in [OVERALL, *sorted(k for k in groups if k != OVERALL)]:
            qs, ps = groups[name]["questions"], groups[name]["prompts"]
            rewards = [r for p in ps for r in p["rewards"]]
            checks = [c for p in ps for c in (p["attributes"] or [])]
            row = {"questions": len(qs), "understanding_accuracy": _mean([q["correct"] for q in qs]),
                   "prompts": len(ps), "images": len(rewards), "generation_reward": _mean(rewards)}
            if checks:
                for a in ATTRIBUTES:
                    row[f"attribute_{a}"] = _mean([float(c[a]) for c in checks])
                row["attribute_score"] = _mean([attribute_score(c) for c in checks])
                row["attribute_all"] = _mean([float(all(c.values())) for c in checks])
            out[name] = row
        return out

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """Flat numbers for metrics.jsonl / TensorBoard: `{prefix}{key}` overall, `{prefix}tag/{tag}/{key}` per tag."""
        flat = {}
        for name, row in self.summary.items():
            head = prefix if name == OVERALL else f"{prefix}tag/{name}/"
            flat.update({f"{head}{k}": float(v) for k, v in row.items() if v is not None})
        return flat

    def to_json(self) -> dict:
        return {"summary": self.summary, "settings": self.settings, "questions": self.questions,
                "prompts": self.prompts}

    def show(self, out: str | Path | None = None) -> None:
        """Print the table; with `out`, save eval.json and eval.png there and say so (`pairuni eval`)."""
        print(self.table())
        if out is not None:
            paths = self.save(out)
            print("wrote " + " and ".join(str(p) for p in paths.values()))

    def table(self) -> str:
        """One line per tag (overall first): counts, accuracy, generation reward, toy attribute score."""
        cols = [("questions", "questions", "d"), ("understanding_accuracy", "accuracy", ".3f"),
                ("prompts", "prompts", "d"), ("images", "images", "d"),
                ("generation_reward", f"{self.settings.get('generation_reward', 'generation')} reward", ".3f"),
                ("attribute_score", "attributes", ".3f"), ("attribute_all", "all right", ".3f")]
        width = max(len(n) for n in self.summary) + 2
        lines = ["tag".ljust(width) + "".join(f"{h:>{max(len(h), 9) + 2}}" for _, h, _ in cols)]
        for name, row in self.summary.items():
            cells = []
            for key, head, fmt in cols:
                v = row.get(key)
                cells.append(f"{'-' if v is None else format(v, fmt):>{max(len(head), 9) + 2}}")
            lines.append(name.ljust(width) + "".join(cells))
        return "\n".join(lines)

    def save(self, folder: str | Path, name: str = "eval") -> dict[str, Path]:
        """`folder/name.json` and, with a grid, `folder/name.png`, each written atomically."""
        from .files import atomic_writer, write_json

        folder = Path(folder)
        paths = {"json": folder / f"{name}.json"}
        write_json(paths["json"], self.to_json())
        if self.grid is not None:
            paths["png"] = folder / f"{name}.png"
            with atomic_writer(paths["png"], "wb") as fh:
                self.grid.save(fh, format="PNG")
        return paths


# ----------------------------------------------------------------------------- the image grid
def image_grid(images: torch.Tensor, captions: list[str], labels: list[list[str]], *, tile: int | None = None):
    """A PIL image: row p holds images[p] ([P, G, 3, S, S] float in [0, 1]) side by side, `labels[p][g]` under
    each image and `captions[p]` (wrapped) under the row."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    n_rows, n_cols, _, size, _ = images.shape
    tile = tile or min(max(size, 128), 256)  # tiny 32 px images blown up, 384 px ones shrunk
    font = ImageFont.load_default()
    pad, line = 6, 13
    chars = max(12, (n_cols * (tile + pad)) // 7)
    wrapped = [textwrap.wrap(c, chars)[:3] or [""] for c in captions]
    heights = [tile + line + len(w) * line + 2 * pad for w in wrapped]
    canvas = Image.new("RGB", (n_cols * (tile + pad) + pad, sum(heights) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = pad
    for p in range(n_rows):
        for g in range(n_cols):
            pixels = (images[p, g].float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
            im = Image.fromarray(np.ascontiguousarray(pixels))
            resample = Image.NEAREST if tile >= size else Image.BICUBIC
            x = pad + g * (tile + pad)
            canvas.paste(im.resize((tile, tile), resample), (x, y))
            draw.text((x, y + tile + 1), labels[p][g], fill=(60, 60, 60), font=font)
        for k, text in enumerate(wrapped[p]):
            draw.text((pad, y + tile + line + k * line), text, fill=(0, 0, 0), font=font)
        y += heights[p]
    return canvas


# ----------------------------------------------------------------------------- evaluation
def default_batch_rows(rollout, pairs_per_step: int) -> int:
    """Rows per forward: rollout.max_batch, else the P * G rows a training step's rollout holds."""
    return rollout.max_batch or pairs_per_step * rollout.group_size


@torch.no_grad()
def evaluate(model, prompts, pairs: list, cfg, *, images, seed: int = 0, samples: int = 4,
             batch_rows: int | None = None, generation_reward=None, progress: bool = True,
             grid: bool = True, settings: dict | None = None) -> EvalReport:
    """Evaluate the policy (`model`, `prompts`) on `pairs` (see the module docstring).

    cfg: `engine.config.Config` (rollout.* sampling, reward.generation, rollout.max_new_tokens for answers).
    images: `ImageCache` of the pairs' understanding images. generation_reward: a built reward (the
    trainer's), else one is built from cfg.reward. settings: extra entries for the report (the model's name).
    """
    from . import rewards
    from .build import build_rewards
    from .rollout import answer_questions, generation_rollouts, rollout_seeds, row_chunks

    if samples < 1:
        raise ValueError(f"samples: expected an integer >= 1, got {samples}")
    device = next(model.parameters()).device
    batch_rows = batch_rows or default_batch_rows(cfg.rollout, cfg.data.pairs_per_step)
    if generation_reward is None:
        generation_reward = build_rewards(cfg, model, prompts, device)["generation"]
    accuracy = rewards.build_reward("accuracy")
    und = [p.understand for p in pairs]
    gen = [p.generate for p in pairs]
    und_chunks = row_chunks(len(und), batch_rows)
    gen_chunks = row_chunks(len(gen), max(1, batch_rows // samples))
    seeds = rollout_seeds(seed, 0, "evaluation", len(gen) * samples)
    was_training = model.training
    model.eval()
    questions, prompt_rows, grid_images = [], [], []
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), \
                tqdm(total=len(und_chunks) + len(gen_chunks), desc="eval", unit="batch", disable=not progress,
                     leave=False) as bar:
            for c in und_chunks:
                batch = und[c]
                texts = answer_questions(model, prompts, torch.stack([images(s) for s in batch]),
                                         [s.question for s in batch], max_new_tokens=cfg.rollout.max_new_tokens)
                correct = accuracy(rewards.RewardInput(samples=batch, texts=texts)).tolist()
                questions += [{"id": s.source_id, "tag": s.tag, "answer": s.answer, "predicted": t, "correct": r}
                              for s, t, r in zip(batch, texts, correct)]
                bar.update(1)
            for c in gen_chunks:
                batch = gen[c]
                rows = [s for s in batch for _ in range(samples)]
                ro = generation_rollouts(model, prompts, [s.prompt for s in rows],
                                         seeds[c.start * samples: c.stop * samples], cfg.rollout, device=device, decode=True)
                scores = generation_reward(rewards.RewardInput(samples=rows, images=ro.images)).tolist()
                pixels = ro.images.float().cpu().view(len(batch), samples, *ro.images.shape[1:])
                for i, s in enumerate(batch):
                    checks = [attribute_checks(im, s.meta.get("attributes") or {}) for im in pixels[i]]
                    prompt_rows.append({"id": s.source_id, "tag": s.tag, "prompt": s.prompt,
                                        "rewards": scores[i * samples:(i + 1) * samples],
                                        "attributes": None if checks[0] is None else checks})
                    if grid and len(grid_images) < GRID_PROMPTS:
                        grid_images.append(pixels[i])
                bar.update(1)
    finally:
        model.train(was_training)
    name = cfg.reward.generation
    info = {"seed": seed, "samples": samples, "batch_rows": batch_rows, "generation_reward": name,
            "understanding": "greedy answer, accuracy", "cfg_scale": cfg.rollout.cfg_scale,
            "image_temperature": cfg.rollout.image_temperature, "max_new_tokens": cfg.rollout.max_new_tokens,
            **(settings or {})}
    return finish_report(questions, prompt_rows, info, grid_images, name, samples)


def finish_report(questions: list, prompt_rows: list, info: dict, grid_images: list, reward_name: str,
                  samples: int) -> EvalReport:
    """The EvalReport of an evaluation's rows, with the image grid of the first prompts' images (`grid_images`:
    [3, S, S] tensors, `samples` per prompt), each labelled with its `reward_name` reward and attribute checks.
    Both model families' evaluations end here."""
    picture = None
    if grid_images:
        shown = prompt_rows[:len(grid_images)]
        labels = [[_label(reward_name, r, a) for r, a in zip(p["rewards"], p["attributes"] or [None] * samples)]
                  for p in shown]
        picture = image_grid(torch.stack(grid_images), [p["prompt"] for p in shown], labels)
    return EvalReport(questions, prompt_rows, info, picture)


def _label(reward_name: str, reward: float, checks: dict | None) -> str:
    """Under an image: its reward, and the toy attributes it got right (C colour, S shape, N count; '-' wrong)."""
    text = f"{reward_name} {reward:.2f}" if math.isfinite(reward) else f"{reward_name} nan"
    if checks is not None:
        text += " " + "".join(mark if checks[a] else "-" for a, mark in zip(ATTRIBUTES, "CSN"))
    return text


# ----------------------------------------------------------------------------- CLI
def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a policy: understanding accuracy, generation reward, per tag, image grid",
        description="Evaluate a run (its newest verified checkpoint), a checkpoint or a model folder on PairUG "
                    "pairs: greedy understanding accuracy (the option letter) and the generation reward of "
                    "--samples images per prompt, overall and per tag, plus for toy-world pairs the share of "
                    "images whose colour, shape and count read off the pixels are right. Sampling and rewards "
                    "follow the evaluated run's config (rollout.*, reward.*), then --config and overrides.",
    )
    p.add_argument("--model", required=True, metavar="RUN_DIR|CHECKPOINT|DIR",
                   help="a run folder (its newest verified checkpoint), a checkpoint folder, or a model folder "
                        "(Janus-Pro or one `pairuni export` wrote, a LoRA run's --adapter-only folder included)")
    p.add_argument("--pairs", required=True, help="PairUG JSONL file to evaluate on (images relative to its folder)")
    p.add_argument("--out", default=None, help="folder for eval.json and eval.png (image grid)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled images (default 0); same seed, same numbers")
    p.add_argument("--samples", type=int, default=4, help="images generated per prompt (default 4)")
    p.add_argument("--batch", type=int, default=0,
                   help="rows per forward (default: rollout.max_batch, else pairs_per_step * group_size)")
    p.add_argument("--max-pairs", type=int, default=None, help="evaluate only the first N pairs of the file")
    p.add_argument("--dtype", default=None, help="weights dtype (default: the run's model.dtype)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--config", default=None, help="YAML file whose rollout.* / reward.* settings apply")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config override, e.g. reward.generation=clip")
    p.set_defaults(func=run)


#: Sections of an evaluated run's config that `pairuni eval` takes over (how it samples and scores).
EVAL_SECTIONS = ("rollout", "reward")


def eval_config(saved: dict | None, path: str | None = None, overrides=(), *, pairs_path: str | None,
                device: str = "auto", max_pairs: int | None = None, out: str | None = None):
    """The config `pairuni eval` runs with: the evaluated run's rollout and reward settings (`saved`: that run's
    config as a dict, when known; keys this engine does not know are ignored), then the YAML file and the
    `key=value` overrides, then the evaluation's own pairs file and device. Checked as a run is (the model
    comes from --model, not model.path); raises ConfigError."""
    from .checks import check
    from .config import Config, apply, field_types, layered, require

    cfg = Config()
    for section in EVAL_SECTIONS:
        known = field_types(type(getattr(cfg, section)))
        values = {k: v for k, v in ((saved or {}).get(section) or {}).items() if k in known}
        apply(getattr(cfg, section), values, f"{section}.")
    cfg = layered(cfg, path, overrides)
    require(pairs_path is None or os.path.isfile(pairs_path), "--pairs", "an existing JSONL file", pairs_path)
    d, t = cfg.data, cfg.train
    d.pairs_path, d.max_pairs, d.pairs_per_step, d.eval_pairs_path, d.eval_fraction = pairs_path, max_pairs, 1, None, 0.0
    cfg.model.path = None
    t.device, t.resume, t.eval_every, t.run_dir = device, False, 0, out or "."
    check(cfg)
    return cfg


def run(args) -> int:
    from .family import family_of_source
    if family_of_source(args.model) == "dimoo":  # engine/dimoo/evaluate.py: same arguments and output
        from .dimoo.evaluate import run as run_dimoo
        return run_dimoo(args)
    from . import distributed
    from .build import image_cache
    from .config import ConfigError
    from .model import DTYPES
    from .policy_io import load_policy, resolve_source, saved_config
    from .preflight import PreflightError, check_run_dir
    from .run_start import data_splits

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.samples < 1 or args.batch < 0 or (args.max_pairs is not None and args.max_pairs < 1):
            raise ConfigError(f"--samples >= 1, --batch >= 0, --max-pairs >= 1 expected, got {args.samples}, "
                              f"{args.batch}, {args.max_pairs}")
        if args.out is not None:
            check_run_dir(args.out, key="--out")
        if args.dtype is not None and args.dtype not in DTYPES:
            raise ConfigError(f"--dtype: expected one of {tuple(DTYPES)}, got {args.dtype!r}")
        src = resolve_source(args.model)
        saved = saved_config(src)
        cfg = eval_config(saved, args.config, args.overrides, pairs_path=args.pairs, device=args.device,
                          max_pairs=args.max_pairs, out=args.out)
        splits = data_splits(cfg)  # read and checked before the model loads
        # chunked as the evaluated run's own evaluations were (its pairs_per_step)
        run_rows = default_batch_rows(cfg.rollout, ((saved or {}).get("data") or {}).get("pairs_per_step", 1))
        policy = load_policy(src, dtype=args.dtype, device=distributed.resolve_device(cfg.train.device))
        report = evaluate(policy.model, policy.prompts, splits.train, cfg, images=image_cache(splits.root, policy.prompts),
                          seed=args.seed, samples=args.samples, batch_rows=args.batch or run_rows,
                          progress=not args.no_progress,
                          settings={"model": str(src.path), "step": policy.step, "weights": policy.weights,
                                    "pairs": args.pairs})
    except (ConfigError, PreflightError, ValueError) as exc:
        return user_error("eval", args, exc)
    report.show(args.out)
    return 0


def main(argv=None) -> int:  # `python -m engine.evaluate`
    from .cli import run_command

    return run_command(register, "eval", argv)


if __name__ == "__main__":
    sys.exit(main())
