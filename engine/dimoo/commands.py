"""What `pairuni export` (and `pairuni eval`) do with a DiMOO run: find its checkpoint, rebuild the model as the
run trained it, write it back as a Lumina-DiMOO folder.

    path = resolve_checkpoint("runs/dimoo")                 # a run folder -> its newest verified checkpoint
    loaded = load_run(path)                                 # LoadedRun(model, world, cfg, state)
    export_run("runs/dimoo", "exported/dimoo", dtype="bfloat16")

The run's engine config is in every checkpoint's state.json ("config", written by engine/dimoo/trainer.py), so a
checkpoint alone says how to rebuild its model: the tiny toy-world DiMOO (its toy tokenizer from the checkpoint)
or the Lumina-DiMOO folder of model.path, LoRA adapters included (`trainer.build_model_and_world`); then the
checkpoint's weights are copied in (`run.load_state`, verified first). A LoRA run is exported merged
(`lora.merged_model`: W + s B A per adapted layer), so the folder is a plain Lumina-DiMOO checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..checkpoint_store import CheckpointError, CheckpointStore, verify
from ..config import Config, ConfigError, apply, field_types


@dataclasses.dataclass
class LoadedRun:
    """A DiMOO checkpoint rebuilt: model (weights loaded, eval mode), world, the run's engine config, state.json."""

    model: object
    world: object
    cfg: Config
    state: dict
    path: Path


def resolve_checkpoint(source: str | Path) -> Path:
    """A run folder -> its newest verified checkpoint (`CheckpointStore.resume_candidate`); a checkpoint folder
    -> itself, verified. One-line CheckpointError naming what is wrong."""
    src = Path(source)
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such folder")
    if (src / "state.json").is_file():
        verify(src)
        return src
    point = CheckpointStore(src).resume_candidate()
    if point.path is None:
        raise CheckpointError(f"{src}: no checkpoint in {src / 'checkpoints'}")
    return point.path


def run_config(state: dict, where: Path) -> Config:
    """The engine Config a DiMOO checkpoint was trained with (its state.json "config"; keys this engine does
    not know are refused in one line)."""
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint file {where / 'state.json'}: no run config (written by a DiMOO run from "
                              "Python, not `pairuni train`?)")
    cfg = Config()
    try:
        apply(cfg, {k: v for k, v in saved.items() if k in field_types(Config)})
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint file {where / 'state.json'}: {exc}") from None
    return cfg


def load_run(source: str | Path, *, dtype: str | None = None, device: str = "cpu") -> LoadedRun:
    """The model of a DiMOO run or checkpoint as it trained (module docstring), in `dtype` (default the run's
    model.dtype), on `device`."""
    from . import run as dimoo_run
    from .trainer import build_model_and_world

    path = resolve_checkpoint(source)
    state = dimoo_run.read_state(path)
    cfg = run_config(state, path)
    if dtype is not None:
        cfg.model.dtype = dtype
    tokenizer = None
    if (path / dimoo_run.TOKENIZER).is_file():
        from ..text import ToyTokenizer

        tokenizer = ToyTokenizer.from_json((path / dimoo_run.TOKENIZER).read_text())
    model, world = build_model_and_world(cfg, [], None, tokenizer=tokenizer, device=device)
    if dtype is not None and dtype != state["model"]["dtype"]:  # load in the saved dtype, then cast
        from ..model import DTYPES

        model.to(DTYPES[state["model"]["dtype"]])
        dimoo_run.load_state(path, model)
        model.to(DTYPES[dtype])
    else:
        dimoo_run.load_state(path, model)
    model.to(device).eval()
    return LoadedRun(model, world, cfg, state, path)


def export_run(source: str | Path, out: str | Path, *, dtype: str = "bfloat16", overwrite: bool = False) -> Path:
    """Write the model of a DiMOO run or checkpoint as a Lumina-DiMOO folder (`run.export`): the released names
    in `dtype`, the tokenizer files and vqvae/ of the run's model.path, or for the tiny toy-world model its painter
    VQ and toy tokenizer (toy_tokenizer.json). A LoRA run is merged first."""
    from . import run as dimoo_run
    from .lora import has_adapters, merged_model

    loaded = load_run(source)
    model = merged_model(loaded.model) if has_adapters(loaded.model) else loaded.model
    base = loaded.cfg.model.path
    vq = None if base is not None else loaded.world.vq
    toy = loaded.path / dimoo_run.TOKENIZER
    extra = {dimoo_run.TOKENIZER: toy} if base is None and toy.is_file() else None  # the tiny model's toy ids
    return dimoo_run.export(model, out, source=base, vq=vq, dtype=dtype, overwrite=overwrite, extra_files=extra)


__all__ = ["LoadedRun", "export_run", "load_run", "resolve_checkpoint", "run_config"]
