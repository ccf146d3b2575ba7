"""Where a run starts and what it trains on, settled before any model loads.

    point = start_point(cfg)       # the checkpoint train.resume continues from, or step 0 in a clean run_dir
    splits = data_splits(cfg)      # the training pairs and the held-out pairs, each checked for both rewards

Unlike checking a config (`engine.checks`), this reads run folders and pairs files and may clear dead
saves' temp folders (`checkpoint.find_resume_point`), so only the commands that start a run call it.
"""

from __future__ import annotations

import logging
import typing
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint, distributed, rewards
from .checkpoint_store import CheckpointError
from .config import Config, ConfigError, require
from .data import default_pairs_path
from .data.sampler import read_training_pairs
from .files import sha256_file
from .preflight import history_of
from .seeds import eval_split

log = logging.getLogger("pairuni.run_start")

# Keys a resumed run may change: none of them alters what a step computes (or which steps run,
# beyond how many). Every other key is part of the trajectory that "exact resume" promises.
RESUME_MAY_CHANGE = frozenset({"train.steps", "train.save_every", "train.progress", "train.resume", "train.run_dir",
                               "train.on_existing", "train.max_bad_steps", "train.eval_every", "train.eval_samples",
                               "data.eval_pairs_path"})


def check_config(cfg: Config, world: int | None) -> None:
    """One held-out split at most, and `train.eval_every` only with one."""
    d, t = cfg.data, cfg.train
    require(d.eval_pairs_path is None or d.eval_fraction == 0, "data.eval_fraction",
            "0 when data.eval_pairs_path is set (one held-out split)", d.eval_fraction)
    require(t.eval_every == 0 or d.eval_pairs_path is not None or d.eval_fraction > 0, "train.eval_every",
            "0 without held-out pairs (set data.eval_pairs_path or data.eval_fraction)", t.eval_every)


def start_point(cfg: Config) -> checkpoint.ResumePoint:
    """Where a training run starts: the newest fully verified checkpoint when `train.resume` finds one
    (`.skipped` lists what it passed over; it must be of this launch's kind and written with the same
    trajectory-defining config and pairs file content, `data_fingerprint`), else step 0 in a run_dir that
    holds nothing the user did not give up (`train.on_existing`). Hashes the pairs files (once per run: the
    checkpoints' fingerprint reuses it). Call it before the model loads."""
    fingerprint = data_fingerprint(cfg, rehash=True)
    point = checkpoint.ResumePoint(None)
    if cfg.train.resume:
        try:
            point = checkpoint.find_resume_point(cfg.train.run_dir)
        except CheckpointError as exc:
            raise ConfigError(f"train.resume: {exc}") from None
    if point.path is None:
        _check_fresh_start(cfg)
    else:
        _check_resumable(cfg, point.path, fingerprint)
    return point


_HASHED: dict[str, str] = {}  # resolved pairs file -> sha256 of its content when this process's run started
_WARNED_UNPRINTED: set[str] = set()  # checkpoints without a fingerprint already warned about


def data_fingerprint(cfg: Config, *, rehash: bool = False) -> dict[str, dict[str, str]]:
    """`{key: {"path": the file resolved (absolute, symlinks followed), "sha256": its content's}}` of the pairs
    files `cfg.data` names (data.pairs_path, the bundled pairs when null; data.eval_pairs_path when set): what
    every checkpoint stores, so a resume can tell the same data by any path from changed data. Each file is
    hashed (streamed) when `rehash` (`start_point`, once per run) or when this process has not hashed it yet."""
    d = cfg.data
    out = {}
    for key, path in (("data.pairs_path", d.pairs_path or str(default_pairs_path())),
                      ("data.eval_pairs_path", d.eval_pairs_path)):
        if path is None:
            continue
        real = str(Path(path).resolve())
        if rehash or real not in _HASHED:
            try:
                _HASHED[real] = sha256_file(real)
            except OSError as exc:
                raise ConfigError(f"{key}: {path} cannot be read ({exc.strerror or exc})") from None
        out[key] = {"path": real, "sha256": _HASHED[real]}
    return out


def _check_fresh_start(cfg: Config) -> None:
    history = history_of(cfg.train.run_dir)
    if history and cfg.train.on_existing == "refuse":
        raise ConfigError(
            f"train.run_dir: {cfg.train.run_dir} holds an earlier run ({', '.join(history)})"
            f"{' but no checkpoint to resume' if cfg.train.resume else '; continue it with train.resume=true'}; "
            "start afresh with train.on_existing=set_aside (moves it to previous-<time>/) or =overwrite")


def _check_resumable(cfg: Config, latest: Path, fingerprint: dict) -> None:
    """The checkpoint a resumed run starts from is of the right kind (sharded or not) and was written with
    the same trajectory-defining config and the same training pairs (`fingerprint`, `data_fingerprint`'s:
    the content counts, not how the path is spelled; a checkpoint without one, written before fingerprints,
    is trusted with a warning)."""
    sharded = checkpoint.is_sharded(latest)
    torchrun = distributed.torchrun_world_size() is not None
    require(not sharded or torchrun, "train.resume", f"a torchrun launch to resume {latest} (written by a torchrun "
            "run; any number of processes works, --nproc_per_node 1 included)", cfg.train.resume)
    require(sharded or not torchrun, "train.resume", f"a single process to resume {latest} (a single-process "
            "checkpoint)", cfg.train.resume)
    try:
        state = checkpoint.read_state(latest)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"train.resume: {latest}/state.json cannot be read ({exc})") from None
    saved, saved_print = state.get("config", {}), (state.get("data_fingerprint") or {}).get("data.pairs_path")
    now = fingerprint["data.pairs_path"]
    if saved_print is not None and saved_print.get("sha256") != now["sha256"]:
        raise ConfigError(f"train.resume: data.pairs_path: {now['path']} is not the pairs file {latest} was trained "
                          f"on (its content changed since, or another file: sha256 {now['sha256'][:12]}..., was "
                          f"{str(saved_print.get('sha256'))[:12]}...; start a new run_dir to train on it)")
    if saved_print is None and str(latest) not in _WARNED_UNPRINTED:
        _WARNED_UNPRINTED.add(str(latest))
        log.warning("train.resume: %s predates data fingerprints: the content of %s is not checked", latest, now["path"])
    changes = trajectory_changes(saved, cfg.to_dict())
    if saved_print is not None:  # the same content by another path is the same data
        changes = [c for c in changes if not c.startswith("data.pairs_path:")]
    if changes:
        raise ConfigError(f"train.resume: {latest} was written with another config, and these keys change what "
                          f"the run computes: {'; '.join(changes)} (start a new run_dir to change them)")


def _flatten(tree: dict, prefix: str = "") -> dict[str, typing.Any]:
    flat: dict[str, typing.Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _same_pairs_file(a, b) -> bool:
    """Two data.pairs_path values name one file: spelled alike, or alike once resolved (null: the bundled
    pairs); whether its content is the same is the fingerprint's to say (`_check_resumable`)."""
    if a == b:
        return True
    if not all(v is None or isinstance(v, str) for v in (a, b)):
        return False
    return Path(a or default_pairs_path()).resolve() == Path(b or default_pairs_path()).resolve()


def trajectory_changes(saved: dict, current: dict) -> list[str]:
    """`key: saved -> current` for every key outside RESUME_MAY_CHANGE whose value differs. A key the saved
    config lacks (written before the key existed) counts as its default, which is what that run did.
    data.pairs_path differs only when it names another file (relative vs absolute or a symlink is the same)."""
    old, new = {**_flatten(Config().to_dict()), **_flatten(saved)}, _flatten(current)
    missing = object()
    return [f"{key}: {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}"
            for key in sorted(old.keys() | new.keys())
            if key not in RESUME_MAY_CHANGE and old.get(key, missing) != new.get(key, missing)
            and not (key == "data.pairs_path" and _same_pairs_file(old.get(key), new.get(key)))]


@dataclass
class DataSplits:
    """The pairs of a run: `train` (image root `root`) and the held-out `eval` pairs (image root `eval_root`;
    empty without data.eval_pairs_path / data.eval_fraction)."""

    train: list
    root: Path
    eval: list
    eval_root: Path


def _half(pair, task: str):
    return pair.understand if task == "understanding" else pair.generate


@dataclass(frozen=True)
class PositionBudget:
    """How many positions a pair's sequences need, against the model's `positions` (text_config.
    max_position_embeddings): understanding = <bos> + image tokens + question + the longer of the
    reference answer and rollout.max_new_tokens; generation = <bos> + prompt + <boi> + image tokens.
    `count(text)` counts a text's tokens, as `how` says; chat-template tokens are not counted, so a pair
    is refused only when it cannot fit."""

    positions: int
    image_tokens: int
    answer_tokens: int
    count: typing.Callable[[str], int]
    how: str

    def problem(self, pair) -> str | None:
        u, g = pair.understand, pair.generate
        question, answer = self.count(u.question), max(self.count(u.answer), self.answer_tokens)
        need = 1 + self.image_tokens + question + answer
        if need > self.positions:
            return (f"understand_ann: question ({question} tokens) + image ({self.image_tokens}) + answer ({answer}) "
                    f"need {need} positions, more than the model's {self.positions} ({self.how})")
        prompt = self.count(g.prompt)
        need = 2 + prompt + self.image_tokens
        if need > self.positions:
            return (f"generate_ann: prompt ({prompt} tokens) + image ({self.image_tokens}) need {need} positions, "
                    f"more than the model's {self.positions} ({self.how})")
        return None


def position_budget(cfg: Config) -> PositionBudget | None:
    """The positions of `cfg.model`, read without loading it: the tiny model's from `model.tiny_janus_config`
    (its word tokenizer counted exactly: one token per word or punctuation mark); a model folder's from its
    config.json (`text_config.max_position_embeddings`, `vision_config.num_image_tokens`, 576 when absent),
    counted with its toy tokenizer (an exported tiny model), else its `tokenizer.json` (exact), else one
    token per whitespace-separated word (a lower bound). None when model.path is not a model folder (a run,
    a checkpoint or an adapter) or its config.json names no positions."""
    import json

    from . import model as janus
    from .text import ToyTokenizer

    answer_tokens = cfg.rollout.max_new_tokens
    toy_count = ToyTokenizer([]).encode
    if cfg.model.path is None:
        config = janus.tiny_janus_config()
        return PositionBudget(config.text_config.max_position_embeddings, config.vision_config.num_image_tokens,
                              answer_tokens, lambda text: len(toy_count(text)), "tiny model, words counted exactly")
    folder = Path(cfg.model.path)
    try:
        config = json.loads((folder / "config.json").read_text())
        positions = int(config["text_config"]["max_position_embeddings"])
        image_tokens = int((config.get("vision_config") or {}).get("num_image_tokens", 576))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    from .policy_io import TOY_TOKENIZER_FILE

    if (folder / TOY_TOKENIZER_FILE).is_file():
        count, how = (lambda text: len(toy_count(text))), "its toy tokenizer, counted exactly"
    elif (folder / "tokenizer.json").is_file():
        try:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception:  # an unreadable tokenizer: the model load names it; count the lower bound here
            tokenizer = None
        if tokenizer is not None:
            count = lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)  # noqa: E731
            how = "counted with its tokenizer.json"
        else:
            count, how = (lambda text: len(text.split())), "at least one token per word"
    else:
        count, how = (lambda text: len(text.split())), "at least one token per word"
    return PositionBudget(positions, image_tokens, answer_tokens, count, how)


def _read_checked(cfg: Config, path: str, key: str, max_pairs: int | None, budget: PositionBudget | None = None):
    names = [cfg.reward.understanding, cfg.reward.generation]
    checks = [lambda pair, name=name: rewards.check_sample(name, _half(pair, rewards.reward_needs(name).task))
              for name in names]
    if budget is not None:
        checks.append(budget.problem)
    try:
        return read_training_pairs(path, max_pairs=max_pairs, image_root=cfg.data.image_root, checks=checks)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{key}: {exc}") from None


def data_splits(cfg: Config) -> DataSplits:
    """The training and held-out pairs of `cfg.data`, each pair checked for what the rollouts and both
    rewards read and against the model's positions (`position_budget`). Reads only the pairs files, the
    model folder's config.json and tokenizer, and decodes the images: call it before any model loads.

    data.eval_fraction holds out max(1, round(n * fraction)) of the n pairs, drawn by train.seed; the
    training pairs keep their file order."""
    d = cfg.data
    path = d.pairs_path or str(default_pairs_path())
    budget = position_budget(cfg)  # prompts and answers longer than the model's positions are refused here
    pairs, root = _read_checked(cfg, path, "data.pairs_path", d.max_pairs, budget)
    held, eval_root = [], root
    if d.eval_fraction > 0:
        import torch

        n_eval = max(1, round(len(pairs) * d.eval_fraction))
        require(n_eval < len(pairs), "data.eval_fraction", f"a fraction that leaves training pairs of the {len(pairs)}",
                d.eval_fraction)
        g = torch.Generator().manual_seed(eval_split(cfg.train.seed))
        out = set(torch.randperm(len(pairs), generator=g)[:n_eval].tolist())
        held = [p for i, p in enumerate(pairs) if i in out]
        pairs = [p for i, p in enumerate(pairs) if i not in out]
    elif d.eval_pairs_path is not None:
        held, eval_root = _read_checked(cfg, d.eval_pairs_path, "data.eval_pairs_path", None, budget)
    what = f"the {len(pairs)} training pairs in {path}" if held and d.eval_fraction > 0 else f"the {len(pairs)} pairs in {path}"
    require(len(pairs) >= d.pairs_per_step, "data.pairs_per_step", f"at most {what}", d.pairs_per_step)
    return DataSplits(pairs, root, held, eval_root)


def validated_pairs(cfg: Config):
    """(training pairs, image root) of `cfg.data` (see `data_splits`)."""
    splits = data_splits(cfg)
    return splits.train, splits.root
