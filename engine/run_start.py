"""Where a run starts and what it trains on, settled before any model loads.

    point = start_point(cfg)       # the checkpoint train.resume continues from, or step 0 in a clean run_dir
    splits = data_splits(cfg)      # the training pairs and the held-out pairs, each checked for both rewards

Unlike checking a config (`engine.checks`), this reads run folders and pairs files and may clear dead
saves' temp folders (`checkpoint.find_resume_point`), so only the commands that start a run call it.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint, distributed, rewards
from .checkpoint_store import CheckpointError
from .config import Config, ConfigError, require
from .data import default_pairs_path
from .data.sampler import read_training_pairs
from .preflight import history_of
from .seeds import eval_split

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
    trajectory-defining config), else step 0 in a run_dir that holds nothing the user did not give up
    (`train.on_existing`). Call it before the model loads."""
    point = checkpoint.ResumePoint(None)
    if cfg.train.resume:
        try:
            point = checkpoint.find_resume_point(cfg.train.run_dir)
        except CheckpointError as exc:
            raise ConfigError(f"train.resume: {exc}") from None
    if point.path is None:
        _check_fresh_start(cfg)
    else:
        _check_resumable(cfg, point.path)
    return point


def _check_fresh_start(cfg: Config) -> None:
    history = history_of(cfg.train.run_dir)
    if history and cfg.train.on_existing == "refuse":
        raise ConfigError(
            f"train.run_dir: {cfg.train.run_dir} holds an earlier run ({', '.join(history)})"
            f"{' but no checkpoint to resume' if cfg.train.resume else '; continue it with train.resume=true'}; "
            "start afresh with train.on_existing=set_aside (moves it to previous-<time>/) or =overwrite")


def _check_resumable(cfg: Config, latest: Path) -> None:
    """The checkpoint a resumed run starts from is of the right kind (sharded or not) and was written with
    the same trajectory-defining config."""
    sharded = checkpoint.is_sharded(latest)
    torchrun = distributed.torchrun_world_size() is not None
    require(not sharded or torchrun, "train.resume", f"a torchrun launch to resume {latest} (written by a torchrun "
            "run; any number of processes works, --nproc_per_node 1 included)", cfg.train.resume)
    require(sharded or not torchrun, "train.resume", f"a single process to resume {latest} (a single-process "
            "checkpoint)", cfg.train.resume)
    try:
        saved = checkpoint.read_state(latest).get("config", {})
    except (OSError, ValueError) as exc:
        raise ConfigError(f"train.resume: {latest}/state.json cannot be read ({exc})") from None
    changes = trajectory_changes(saved, cfg.to_dict())
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


def trajectory_changes(saved: dict, current: dict) -> list[str]:
    """`key: saved -> current` for every key outside RESUME_MAY_CHANGE whose value differs. A key the saved
    config lacks (written before the key existed) counts as its default, which is what that run did."""
    old, new = {**_flatten(Config().to_dict()), **_flatten(saved)}, _flatten(current)
    missing = object()
    return [f"{key}: {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}"
            for key in sorted(old.keys() | new.keys())
            if key not in RESUME_MAY_CHANGE and old.get(key, missing) != new.get(key, missing)]


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


def _read_checked(cfg: Config, path: str, key: str, max_pairs: int | None):
    names = [cfg.reward.understanding, cfg.reward.generation]
    checks = [lambda pair, name=name: rewards.check_sample(name, _half(pair, rewards.reward_needs(name).task))
              for name in names]
    try:
        return read_training_pairs(path, max_pairs=max_pairs, image_root=cfg.data.image_root, checks=checks)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{key}: {exc}") from None


def data_splits(cfg: Config) -> DataSplits:
    """The training and held-out pairs of `cfg.data`, each pair checked for what the rollouts and both
    rewards read. Reads only the pairs files and checks image files exist: call it before any model loads.

    data.eval_fraction holds out max(1, round(n * fraction)) of the n pairs, drawn by train.seed; the
    training pairs keep their file order."""
    d = cfg.data
    path = d.pairs_path or str(default_pairs_path())
    pairs, root = _read_checked(cfg, path, "data.pairs_path", d.max_pairs)
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
        held, eval_root = _read_checked(cfg, d.eval_pairs_path, "data.eval_pairs_path", None)
    what = f"the {len(pairs)} training pairs in {path}" if held and d.eval_fraction > 0 else f"the {len(pairs)} pairs in {path}"
    require(len(pairs) >= d.pairs_per_step, "data.pairs_per_step", f"at most {what}", d.pairs_per_step)
    return DataSplits(pairs, root, held, eval_root)


def validated_pairs(cfg: Config):
    """(training pairs, image root) of `cfg.data` (see `data_splits`)."""
    splits = data_splits(cfg)
    return splits.train, splits.root
