"""`pairuni eval` for model.family=dimoo: a DiMOO run, checkpoint or model folder on PairUG pairs.

    report = evaluate(model, world, pairs, cfg, seed=0, samples=4)     # cfg: DimooGRPOConfig (the samplers')
    print(report.table()); report.save(out_dir, "eval")                 # engine.evaluate.EvalReport

`engine.evaluate.run` hands a `--model` whose `engine.family.family_of_source` is "dimoo" to `run` here, with the
same arguments and the same output (the table, eval.json, eval.png). What differs from the Janus report:

- Understanding: ONE answer per question drawn with the rollout's answer sampler (`pairgrpo.rollout_understanding`:
  the block sampler at rollout.temperature, text_steps, text_block_length, reveal_order; rollout.max_new_tokens
  answer tokens), not a greedy one: the DiMOO answer sampler is what the run trained, and RL runs sample
  (temperature > 0). Scored by the world's `understanding_rewards` (the option letter).
- Generation: `samples` images per prompt in one `pairgrpo.rollout_generation` call (rollout.image_steps,
  image_temperature, CFG w = rollout.cfg_scale - 1), decoded by the world's VQ and scored by its
  `generation_rewards` (the toy world's pixel reward, or the folder world's). Toy-world prompts also get the
  Janus report's attribute checks (`engine.evaluate.attribute_checks`, colour / shape / count read off the pixels).
- Seeds: the evaluation stream of `engine.seeds` (`rollout_seeds(seed, k, "evaluation", n)`), which no training
  step draws from (training draws the "understanding" / "generation" streams at steps >= 1; a stream seed is
  `(seed * 1_000_003 + step) * 17 + stream`, so streams never meet). Sub-stream k = 0 gives the images (row
  p * samples + j is image j of pair p: the same seeds as the Janus report's images), k = 1 the answers (row p:
  pair p's answer). The samplers draw counter-based noise from these seeds only (no global RNG), and the global
  RNGs are restored afterwards anyway: the same seed gives the same numbers, and a pair's numbers do not depend
  on the other pairs or on --max-pairs.
- Sampling settings: the evaluated run's config (state.json "config", the engine config of `pairuni train`; a
  checkpoint written without one: its `DimooGRPOConfig` read back as rollout.* keys), then --config and the
  overrides; only rollout.* and reward.* are taken, mapped to the step's knobs by `trainer.step_config`. A model
  folder starts from the engine defaults.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch

from ..evaluate import GRID_PROMPTS, EvalReport, attribute_checks, finish_report
from ..rollout import rollout_seeds
from .pairgrpo import DimooGRPOConfig, rollout_generation, rollout_understanding

log = logging.getLogger("pairuni.dimoo.evaluate")

#: The `engine.seeds` stream every evaluation draw comes from, and its sub-streams (rollout_seeds' `step`).
EVAL_STREAM = "evaluation"
IMAGE_SUBSTREAM = 0
ANSWER_SUBSTREAM = 1
#: Config sections `pairuni eval` takes from the evaluated run, --config and the overrides.
EVAL_SECTIONS = ("rollout", "reward")


def eval_seeds(seed: int, n_pairs: int, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(answers [n_pairs], images [n_pairs * samples]) int64 seeds of an evaluation (module docstring)."""
    return (rollout_seeds(seed, ANSWER_SUBSTREAM, EVAL_STREAM, n_pairs),
            rollout_seeds(seed, IMAGE_SUBSTREAM, EVAL_STREAM, n_pairs * samples))


class _OnDevice:
    """`world` with its prompt rows on `device` (the model's); everything else is the world's own."""

    def __init__(self, world, device: torch.device):
        self._world, self._device = world, device

    def __getattr__(self, name):
        return getattr(self._world, name)

    def understanding_rows(self, question, image):
        return tuple(t.to(self._device) for t in self._world.understanding_rows(question, image))

    def generation_rows(self, caption):
        return tuple(None if t is None else t.to(self._device) for t in self._world.generation_rows(caption))


def _vq_device(world) -> torch.device:
    params = getattr(getattr(world, "vq", None), "parameters", None)
    first = next(params(), None) if params is not None else None
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def evaluate(model, world, pairs: list, cfg: DimooGRPOConfig, *, seed: int = 0, samples: int = 4,
             progress: bool = False, settings: dict | None = None, grid: bool = True,
             generation_reward=None) -> EvalReport:
    """Evaluate the DiMOO `model` on `pairs` in `world` (a ToyDimooWorld or DimooFolderWorld; module docstring).

    cfg: the samplers' knobs (group_size unused: one answer per question, `samples` images per prompt).
    Returns an `engine.evaluate.EvalReport`: questions (id, tag, answer, predicted, correct), prompts (id, tag,
    prompt, rewards [samples], attributes or None), settings, the image grid of the first GRID_PROMPTS prompts
    (grid=False: none). generation_reward: a callable over `engine.rewards.RewardInput` -> [B] (a registry
    reward, `pairuni eval`'s reward.generation); None: the world's own `generation_rewards`."""
    from tqdm.auto import tqdm

    from ..rewards import RewardInput

    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples: expected an integer >= 1, got {samples!r}")
    if not isinstance(cfg, DimooGRPOConfig):
        raise ValueError(f"cfg: expected a DimooGRPOConfig, got {type(cfg).__name__}")
    device = next(model.parameters()).device
    on_device = _OnDevice(world, device)
    answer_seeds, image_seeds = eval_seeds(seed, len(pairs), samples)
    vq_device = _vq_device(world)
    was_training = model.training
    model.eval()
    questions, prompt_rows, grid_images = [], [], []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                tqdm(total=2 * len(pairs), desc="eval", unit="prompt", disable=not progress, leave=False) as bar:
            for i, pair in enumerate(pairs):
                s = pair.understand
                ro = rollout_understanding(model, on_device, s, answer_seeds[i:i + 1], cfg)
                text = world.decode_text(ro.targets()[0].cpu())
                correct = float(world.understanding_rewards([s], [text])[0])
                questions.append({"id": s.source_id, "tag": s.tag, "answer": s.answer, "predicted": text,
                                  "correct": correct})
                bar.update(1)
            for i, pair in enumerate(pairs):
                s = pair.generate
                ro = rollout_generation(model, on_device, s, image_seeds[i * samples:(i + 1) * samples], cfg)
                codes = ro.targets().view(-1, world.grid, world.grid).to(vq_device)
                images = world.decode_images(codes)
                scores = (world.generation_rewards([s] * samples, images) if generation_reward is None else
                          torch.as_tensor(generation_reward(RewardInput(samples=[s] * samples, images=images)),
                                          dtype=torch.float32)).tolist()
                pixels = images.float().cpu()
                checks = [attribute_checks(im, s.meta.get("attributes") or {}) for im in pixels]
                prompt_rows.append({"id": s.source_id, "tag": s.tag, "prompt": s.prompt, "rewards": scores,
                                    "attributes": None if checks[0] is None else checks})
                if grid and len(grid_images) < GRID_PROMPTS:
                    grid_images.append(pixels)
                bar.update(1)
    finally:
        model.train(was_training)
    name = (settings or {}).get("generation_reward", "generation")
    info = {"seed": seed, "samples": samples, "family": "dimoo", "generation_reward": name,
            "understanding": "one sampled answer (the rollout's block sampler), accuracy",
            "seed_streams": f"answers rollout_seeds(seed, {ANSWER_SUBSTREAM}, {EVAL_STREAM!r}, pairs), images "
                            f"rollout_seeds(seed, {IMAGE_SUBSTREAM}, {EVAL_STREAM!r}, pairs * samples)",
            "cfg_scale": cfg.cfg_scale + 1.0, "dimoo_cfg_w": cfg.cfg_scale, "image_temperature": cfg.image_temperature,
            "temperature": cfg.text_temperature, "max_new_tokens": getattr(world, "gen_length", None),
            "image_steps": cfg.image_steps, "text_steps": cfg.text_steps, "text_block_length": cfg.block_length,
            "reveal_order": cfg.order, **(settings or {})}
    return finish_report(questions, prompt_rows, info, grid_images, name, samples)


# ----------------------------------------------------------------------------- what --model names
@dataclasses.dataclass
class Source:
    """What `--model` names, read before any weights load (`describe_source`). kind: "checkpoint" (a run folder's
    newest verified one, or a checkpoint folder) or "folder" (a Lumina-DiMOO model folder); path: the checkpoint
    or model folder; step: the checkpoint's; saved: the run's engine config as a dict (None: none stored); grpo:
    the checkpoint's DimooGRPOConfig (None for a model folder); tokenizer: the run's ToyTokenizer (None: a real
    DiMOO tokenizer, from `base`); base: the Lumina-DiMOO folder whose tokenizer and VQ the world reads (None for
    a toy run); codebook_size: of the checkpoint's model (None for a model folder)."""

    kind: str
    path: Path
    step: int | None = None
    saved: dict | None = None
    grpo: DimooGRPOConfig | None = None
    tokenizer: object = None
    base: Path | None = None
    codebook_size: int | None = None


def checkpoint_of(path: str | os.PathLike) -> Path | None:
    """The checkpoint `path` names: itself (a checkpoint folder, state.json), a run folder's newest verified
    one (`CheckpointStore.resume_candidate`; what it passed over is logged), or None (not a run or checkpoint).
    A run folder without a usable checkpoint: CheckpointError / ValueError naming it."""
    from ..checkpoint_store import CheckpointStore

    p = Path(path)
    if (p / "state.json").is_file():
        return p
    if not (p / "checkpoints").is_dir():
        return None
    point = CheckpointStore(p).resume_candidate()
    for line in point.skipped:
        log.warning("eval: skipped %s", line)
    if point.path is None:
        raise ValueError(f"--model: the run folder {p} holds no checkpoint")
    return point.path


def describe_source(path: str | os.PathLike) -> Source:
    """What `--model` (a run folder, a DiMOO checkpoint folder or a Lumina-DiMOO model folder) is, from its
    state.json / config.json only (the weights load in `load_model`, which verifies a checkpoint first). One-line
    errors naming the path or file."""
    from ..text import ToyTokenizer
    from .run import TOKENIZER, read_state

    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"--model: expected a run folder, a checkpoint folder or a model folder, got {str(p)!r}")
    ck = checkpoint_of(p)
    if ck is None:
        if not (p / "config.json").is_file():
            raise ValueError(f"--model: {p} is neither a run folder, a checkpoint folder nor a model folder "
                             "(no checkpoints/, state.json or config.json)")
        if (p / TOKENIZER).is_file():  # `pairuni export` of a tiny toy-world run: its toy ids and painter VQ
            vq_config = json.loads((p / "vqvae" / "config.json").read_text())
            return Source("folder", p, tokenizer=ToyTokenizer.from_json((p / TOKENIZER).read_text()),
                          codebook_size=int(vq_config["num_vq_embeddings"]))
        return Source("folder", p, base=p)
    state = read_state(ck)
    saved = state.get("config") or (state.get("run") or {}).get("config")
    saved = saved if isinstance(saved, dict) else None
    tok_file = ck / TOKENIZER
    tokenizer = ToyTokenizer.from_json(tok_file.read_text()) if tok_file.is_file() else None
    base = None
    if tokenizer is None:
        base = ((saved or {}).get("model") or {}).get("path")
        if not base:
            raise ValueError(f"--model: {ck} has no toy tokenizer and its state.json no config model.path (the "
                             "Lumina-DiMOO folder whose tokenizer and VQ the run used)")
        base = Path(base)
    return Source("checkpoint", ck, int(state["step"]), saved, DimooGRPOConfig.from_dict(state["cfg"]), tokenizer,
                  base, int(state["model"]["codebook_size"]))


def load_model(src: Source, dtype: str | None = None):
    """The DimooModel of `src` in `dtype` (default: the checkpoint's; bfloat16, as released, for a model folder):
    a checkpoint through `run.load_state` (every file verified first: a damaged one is refused by name)."""
    from .model import DTYPES, DimooModel
    from .run import load_state

    if src.kind == "folder":
        return DimooModel.from_pretrained(src.path, dtype=dtype or "bfloat16")
    if src.saved is not None:  # a `pairuni train` run: rebuilt as it trained (LoRA adapters included), then loaded
        from .commands import load_run

        loaded = load_run(src.path, dtype=dtype)
        if int(loaded.state["step"]) != src.step:
            raise ValueError(f"--model: {src.path} changed while it was read (step {src.step}, then "
                             f"{loaded.state['step']})")
        return loaded.model
    st = load_state(src.path)
    if st.step != src.step:
        raise ValueError(f"--model: {src.path} changed while it was read (step {src.step}, then {st.step})")
    return st.model if dtype is None else st.model.to(DTYPES[dtype])


# ----------------------------------------------------------------------------- config
def _rollout_of(grpo: DimooGRPOConfig, gen_length: int) -> dict:
    """The rollout.* keys a `DimooGRPOConfig` was made from (`trainer.step_config`'s inverse)."""
    return {"group_size": grpo.group_size, "temperature": grpo.text_temperature, "max_new_tokens": gen_length,
            "cfg_scale": grpo.cfg_scale + 1.0, "image_temperature": grpo.image_temperature,
            "image_steps": grpo.image_steps, "text_steps": grpo.text_steps, "text_block_length": grpo.block_length,
            "reveal_order": grpo.order, "score_groups": grpo.score_groups or 0}


def eval_config(src: Source, path: str | None = None, overrides=()):
    """The engine Config of a DiMOO evaluation: the run's rollout.* / reward.* (`src.saved`, keys this engine
    does not know ignored; else the checkpoint's DimooGRPOConfig as rollout keys with the toy world's answer
    length; else the defaults), then the YAML file and the overrides (their other sections are parsed and
    type-checked, then ignored), checked as a DiMOO run's (`check_values`, `family.check_config`, the reward
    rules). ConfigError."""
    from .. import rewards as reward_rules
    from ..config import Config, apply, check_values, field_types, layered
    from ..family import check_config
    from .toyworld import ToyDimooWorld

    cfg = Config()
    if src.saved is not None:
        for section in EVAL_SECTIONS:
            known = field_types(type(getattr(cfg, section)))
            values = {k: v for k, v in (src.saved.get(section) or {}).items() if k in known}
            apply(getattr(cfg, section), values, f"{section}.")
    elif src.grpo is not None:
        toy_length = next(f.default for f in dataclasses.fields(ToyDimooWorld) if f.name == "gen_length")
        gen_length = toy_length if src.tokenizer is not None else cfg.rollout.max_new_tokens
        apply(cfg.rollout, _rollout_of(src.grpo, gen_length), "rollout.")
    cfg = layered(cfg, path, overrides)
    out = Config()
    out.model.family = "dimoo"
    out.rollout, out.reward = cfg.rollout, cfg.reward
    out.algo = (src.grpo or DimooGRPOConfig()).algo  # not used by an evaluation; a DiMOO-runnable one for the checks
    check_values(out)
    check_config(out, None)
    reward_rules.check_config(out, None)
    reward_rules.check_environment(out)  # a reward's model path exists, its package imports
    return out


def build_world(src: Source, cfg, pairs: list, data_root):
    """The world of the evaluated model: the toy world on the run's own tokenizer, or the folder world of
    `src.base` (its tokenizer and VQ), at rollout.image_resolution (0: the family default) and answer length
    rollout.max_new_tokens."""
    from .trainer import FOLDER_RESOLUTION, TINY_RESOLUTION

    r = cfg.rollout
    if src.tokenizer is not None:
        from .toyworld import ToyDimooWorld

        return ToyDimooWorld.build(pairs, data_root, tokenizer=src.tokenizer, codebook_size=src.codebook_size,
                                   grid=(r.image_resolution or TINY_RESOLUTION) // 16, gen_length=r.max_new_tokens)
    from .folder_world import DimooFolderWorld

    return DimooFolderWorld.build(src.base, pairs, data_root, resolution=r.image_resolution or FOLDER_RESOLUTION,
                                  gen_length=r.max_new_tokens)


def generation_reward(cfg, device: torch.device):
    """The registry reward `cfg.reward.generation` (engine/rewards.py), built as the Janus report builds it; a
    reward that asks the policy (pair_qa) is refused in one line (the DiMOO answer sampler is not wired to it)."""
    from .. import rewards
    from ..config import ConfigError

    name = cfg.reward.generation
    if rewards.reward_needs(name).policy:
        raise ConfigError(f"reward.generation: expected a reward that does not ask the policy with a DiMOO model, "
                          f"got {name!r}")
    return rewards.build_reward(name, cfg.reward, device=device)


# ----------------------------------------------------------------------------- CLI
def run(args) -> int:
    """`pairuni eval --model DIMOO_RUN|CHECKPOINT|FOLDER ...` (engine/evaluate.py `register` for the arguments):
    prints the table, writes eval.json / eval.png under --out; exit 2 with one line on a user error."""
    from .. import distributed
    from ..checkpoint_store import CheckpointError
    from ..cli import user_error
    from ..config import ConfigError, require
    from ..data.io import data_root_of, read_pairs
    from ..preflight import PreflightError, check_run_dir
    from .model import DTYPES
    from .trainer import step_config

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.samples < 1 or (args.max_pairs is not None and args.max_pairs < 1):
            raise ConfigError(f"--samples >= 1, --max-pairs >= 1 expected, got {args.samples}, {args.max_pairs}")
        require(not args.batch, "--batch", "0 with a DiMOO model (a prompt's rows are one sampler call)", args.batch)
        if args.dtype is not None and args.dtype not in DTYPES:
            raise ConfigError(f"--dtype: expected one of {tuple(DTYPES)}, got {args.dtype!r}")
        if args.out is not None:
            check_run_dir(args.out, key="--out")
        require(os.path.isfile(args.pairs), "--pairs", "an existing JSONL file", args.pairs)
        pairs = read_pairs(args.pairs)[:args.max_pairs]
        require(len(pairs) > 0, "--pairs", "a file with at least one pair", args.pairs)
        src = describe_source(args.model)  # settings, rewards and the world checked before the weights load
        cfg = eval_config(src, args.config, args.overrides)
        device = distributed.resolve_device(args.device)
        reward = generation_reward(cfg, device)
        world = build_world(src, cfg, pairs, data_root_of(args.pairs))
        model = load_model(src, args.dtype).to(device)
        report = evaluate(model, world, pairs, step_config(cfg), seed=args.seed, samples=args.samples,
                          progress=not args.no_progress, generation_reward=reward,
                          settings={"model": str(src.path), "step": src.step, "weights": src.kind,
                                    "pairs": args.pairs, "generation_reward": cfg.reward.generation})
    except (ConfigError, PreflightError, CheckpointError, ValueError, OSError) as exc:
        return user_error("eval", args, exc)
    report.show(args.out)
    return 0


__all__ = ["EVAL_STREAM", "Source", "build_world", "checkpoint_of", "eval_config", "eval_seeds", "evaluate",
           "describe_source", "generation_reward", "load_model", "run"]
