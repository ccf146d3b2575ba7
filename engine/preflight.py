"""Checks that run before any model loads, so a mistake costs seconds, not a model load.

Each check raises `PreflightError` (a ValueError) with one line that names the config key or
path at fault; `pairuni train` prints that line and exits non-zero.

- `check_run_dir`:   the run directory is (or can become) a writable folder; nothing is created.
- `check_device`:    `train.device` names a device this machine has.
- `check_model_dir`: a local model folder has a parseable config.json and safetensors weights.
- `history_of` / `set_aside`: what an earlier run left in a run directory, and moving it aside
  (a reused run directory is never truncated without the user asking).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

_CUDA_DEVICE = re.compile(r"^cuda(?::(\d+))?$")
# What a run leaves in its folder; anything of these present means "this folder holds a run".
HISTORY_FILES = ("metrics.jsonl", "config.json", "checkpoints", "tb", "reward_curve.png", "eval")


class PreflightError(ValueError):
    """A problem found before the model loads; the message is one line naming its key or path."""


def check_run_dir(run_dir: str | os.PathLike, key: str = "train.run_dir") -> None:
    """`run_dir` is a writable folder, or can be created (its nearest existing parent is writable)."""
    path = Path(run_dir).absolute()
    if path.exists() and not path.is_dir():
        raise PreflightError(f"{key}: {run_dir} exists and is not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise PreflightError(f"{key}: {run_dir} cannot be created: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise PreflightError(f"{key}: {run_dir} {what}")


def check_device(device: str, key: str = "train.device") -> None:
    """`auto`, `cpu`, or `cuda[:N]` naming a GPU that exists."""
    if device in ("auto", "cpu"):
        return
    match = _CUDA_DEVICE.match(device)
    if match is None:
        raise PreflightError(f"{key}: expected auto | cpu | cuda | cuda:N, got {device!r}")
    import torch

    if not torch.cuda.is_available():
        raise PreflightError(f"{key}: {device!r} asked for, but this machine has no usable CUDA GPU "
                             f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise PreflightError(f"{key}: {device!r} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")


def check_model_dir(path: str | os.PathLike, key: str = "model.path") -> None:
    """A Hugging Face model folder: config.json that parses, and safetensors weights."""
    folder = Path(path)
    if not folder.is_dir():
        raise PreflightError(f"{key}: {folder} is not a folder (models load from a local folder)")
    config = folder / "config.json"
    if not config.is_file():
        raise PreflightError(f"{key}: {folder} has no config.json")
    try:
        parsed = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise PreflightError(f"{key}: {config} is not valid JSON ({err})") from None
    if not isinstance(parsed, dict):
        raise PreflightError(f"{key}: {config} is not a JSON object")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError) as err:
            raise PreflightError(f"{key}: {index} is not a safetensors index ({err})") from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise PreflightError(f"{key}: {folder} lacks weight shard(s) {missing[:3]} named in {index.name}")
    elif not any(folder.glob("*.safetensors")):
        raise PreflightError(f"{key}: {folder} has no *.safetensors weights")


def history_of(run_dir: str | os.PathLike) -> list[str]:
    """What an earlier run left in `run_dir`, one short phrase per item (empty: nothing)."""
    folder = Path(run_dir)
    found = []
    for name in HISTORY_FILES:
        path = folder / name
        if path.is_file() and path.stat().st_size > 0:
            found.append(name)
        elif path.is_dir() and any(path.iterdir()):
            found.append(f"{name}/")
    return found


def set_aside(run_dir: str | os.PathLike, prefix: str = "previous") -> Path:
    """Move an earlier run's files into `run_dir/<prefix>-<timestamp>/`; returns that folder."""
    folder = Path(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, suffix = folder / f"{prefix}-{stamp}", 0
    while aside.exists():
        suffix += 1
        aside = folder / f"{prefix}-{stamp}-{suffix}"
    aside.mkdir()
    for name in HISTORY_FILES:
        if (folder / name).exists():
            os.rename(folder / name, aside / name)
    return aside


def require_importable(key: str, name: str, module: str, install: str) -> None:
    """Import `module` now: any failure (missing, or a broken install that raises something other than
    ImportError) becomes one line naming the key that needs it, before a model loads."""
    import importlib

    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any import failure is reported the same way
        first = (str(exc).splitlines() or [""])[0]
        raise PreflightError(f"{key}={name} needs the `{module}` package ({type(exc).__name__}: {first}); "
                             f"install it with: {install}") from None
