"""The DiMOO PairGRPO loop with verified checkpoints, exact resume and export to the Lumina-DiMOO layout.

    result = run(world, cfg, steps=40, out="runs/dimoo", pairs=pairs, save_every=10)   # trains, saves
    result = run(world, cfg, steps=80, out="runs/dimoo", pairs=pairs, resume=True)     # from the newest good one
    save_state(folder, model, optimizer, step, world, cfg)                              # one checkpoint
    state = load_state(folder, model, optimizer)                                        # verified, then loaded
    export(model, "exported/dimoo", source=base_folder)                                 # a Lumina-DiMOO folder

A checkpoint `out/checkpoints/step_NNNNNN/`:

    model/config.json, model/model.safetensors   `DimooModel.save_pretrained`: the released names, the model's dtype
    optimizer.safetensors                        every tensor of `optimizer.state_dict()` ("state/<pid>/<key>")
    optimizer.json                               the rest of it (param_groups, non-tensor state)
    toy_tokenizer.json                           `ToyTokenizer.to_json()`: text ids stay the same on resume
    state.json                                   step, seed, DimooGRPOConfig, run settings, model dtype/codebook
    metrics.jsonl                                the metrics rows of steps 1..step (strict JSON, `engine.metrics`)
    manifest.json                                bytes + sha256 of every other file; written last (the commit mark)

Writing (`save_state`): the folder is filled beside its final name (`files.staged_folder`: a hidden `.step_*`
stage), every file is fsynced, the manifest is written last (`files.write_json`: temp, fsync, rename), and the
stage is renamed into place (`files.swap_in`), then the parent directory is fsynced. A process killed at any point
leaves either no `step_N` or a complete one; a half-written stage is hidden and never read (the next `run` holding
the folder's lock removes it). Reading (`load_state` / `verify_state`): every file the manifest names must exist
with its size and sha256 (one-line `CheckpointError` naming the first that does not), and no file may be missing
from the manifest's list.

Exact resume: every random draw of a step is a pure function of (seed, step) -- the rollout seeds
(`engine.rollout.rollout_seeds`; the samplers draw counter-based Philox noise from them, no global RNG), the
reveal order (from the same seeds) and the step's pairs (`step_pairs`: a per-epoch shuffle seeded by
`engine.seeds.data_order(seed, epoch)`) -- and the update draws nothing (no dropout). So the state of a run is
the weights, the optimizer state and the step; no RNG state is saved (tests/engine/dimoo/test_run.py scrambles
the global RNGs before resuming and still gets the uninterrupted run bit for bit).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..checkpoint_store import CheckpointError, kill_point
from ..files import atomic_writer, fsync_dir, sha256_file, staged_folder, write_json
from ..lock import RunLock
from ..metrics import read_row, strict_row
from ..seeds import data_order
from ..text import ToyTokenizer
from .model import DTYPES, DimooModel
from .pairgrpo import DimooGRPOConfig, train_step

log = logging.getLogger("pairuni.dimoo.run")

FORMAT = 1
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
STATE = "state.json"
MODEL_DIR = "model"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
TOKENIZER = "toy_tokenizer.json"
METRICS = "metrics.jsonl"
CHECKPOINT_MARKER = ".pairuni-dimoo-checkpoint"
EXPORT_MARKER = ".pairuni-export"
#: Files carried from an export's source folder (the tokenizer's and the VQ decoder's), when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
VQ_DIR = "vqvae"
#: Run settings that fix the trajectory: a resume with another value is refused.
RUN_KEYS = ("seed", "lr", "pairs_per_step", "model_seed", "num_pairs")
_STEP_NAME = re.compile(r"^step_(\d{6,})$")


def step_name(step: int) -> str:
    return f"step_{step:06d}"


# ----------------------------------------------------------------------------- optimizer state <-> files
def _encode(value):
    """JSON-safe copy of a non-tensor optimizer value (tuples kept as {"__tuple__": [...]})."""
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"optimizer: cannot save a {type(value).__name__} in its state")


def _decode(value):
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v) for v in value["__tuple__"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() -> (tensors {"state/<pid>/<key>": tensor}, JSON-safe rest). Tensor values of a
    parameter's state must be at its top level (as torch's optimizers keep them)."""
    tensors, plain = {}, {"param_groups": _encode(state["param_groups"]), "state": {}}
    for pid, entry in state["state"].items():
        rest = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{pid}/{key}"] = value.detach().contiguous().cpu().clone()
            else:
                rest[str(key)] = _encode(value)
        plain["state"][str(pid)] = rest
    return tensors, plain


def join_optimizer_state(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    """The inverse of `split_optimizer_state`: a dict for `optimizer.load_state_dict`."""
    state = {int(pid): _decode(rest) for pid, rest in plain["state"].items()}
    for key, value in tensors.items():
        _, pid, name = key.split("/", 2)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": _decode(plain["param_groups"])}


# ----------------------------------------------------------------------------- manifest
def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _content(folder: Path) -> list[Path]:
    """Every file under `folder` but the manifest, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, step: int) -> None:
    """bytes + sha256 of every file of `folder` (each fsynced first), written last, atomically."""
    files = {}
    for p in _content(folder):
        _fsync(p)
        files[p.relative_to(folder).as_posix()] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    for d in sorted({p.parent for p in _content(folder)}, reverse=True):
        fsync_dir(d)
    write_json(folder / MANIFEST, {"format": FORMAT, "step": step, "files": files})
    fsync_dir(folder)


def verify_state(folder: str | os.PathLike) -> dict:
    """Check `folder` against its manifest; returns the manifest. Raises CheckpointError (one line) naming the
    first file that is missing, truncated, changed or not in the manifest."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder}: no such folder")
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"checkpoint {folder}: no {MANIFEST} (the save did not finish)")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError(f"unknown format {manifest.get('format')!r}")
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path}: unreadable manifest ({err})") from None
    for name, want in files.items():
        p = folder / name
        if not p.is_file():
            raise CheckpointError(f"checkpoint file {p}: missing")
        size = p.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"checkpoint file {p}: {size} bytes, the manifest says {want['bytes']} "
                                  "(truncated or replaced)")
        got = sha256_file(p)
        if got != want["sha256"]:
            raise CheckpointError(f"checkpoint file {p}: sha256 {got[:16]}... != {want['sha256'][:16]}... in the "
                                  "manifest (the file is damaged)")
    extra = [p.relative_to(folder).as_posix() for p in _content(folder)
             if p.relative_to(folder).as_posix() not in files]
    if extra:
        raise CheckpointError(f"checkpoint file {folder / extra[0]}: not in the manifest (added after the save)")
    return manifest


# ----------------------------------------------------------------------------- save / load
def _require_finite(model) -> None:
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise ValueError(f"model: {name} holds NaN/inf; not saved (the previous checkpoint stays)")


def save_state(folder: str | os.PathLike, model: DimooModel, optimizer: torch.optim.Optimizer, step: int, world,
               cfg: DimooGRPOConfig, *, seed: int = 0, run: dict | None = None,
               metrics: list[dict] | None = None) -> Path:
    """Write one verified checkpoint of the DiMOO PairGRPO loop at `folder` (module docstring for its files).

    folder: the checkpoint's final path (`run` uses out/checkpoints/step_NNNNNN); an existing one is replaced
    only once the new one is complete, and only if a save wrote it. step: optimizer steps taken (>= 0);
    seed: the rollout seed; run: JSON-safe settings (`RUN_KEYS`); metrics: the rows of steps 1..step.
    Returns the folder. Test hooks (engine.checkpoint_store.kill_point): "save:files_written" after every file
    but the manifest, "save:sealed" after the manifest, before the rename."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected an int >= 0, got {step!r}")
    if not isinstance(cfg, DimooGRPOConfig):
        raise ValueError(f"cfg: expected a DimooGRPOConfig, got {type(cfg).__name__}")
    _require_finite(model)
    from safetensors.torch import save_file

    folder = Path(folder)
    dtype = next(model.parameters()).dtype
    state = {"format": FORMAT, "step": step, "seed": seed, "cfg": asdict(cfg), "run": dict(run or {}),
             "model": {"dtype": next(k for k, v in DTYPES.items() if v == dtype),
                       "codebook_size": model.config.codebook_size}}
    with staged_folder(folder, overwrite=True, marker=CHECKPOINT_MARKER) as stage:
        model.save_pretrained(stage / MODEL_DIR)
        tensors, plain = split_optimizer_state(optimizer.state_dict())
        save_file(tensors, stage / OPTIMIZER_TENSORS, metadata={"format": "pt"})
        write_json(stage / OPTIMIZER_JSON, plain)
        with atomic_writer(stage / TOKENIZER) as fh:
            fh.write(world.tokenizer.to_json() + "\n")
        with atomic_writer(stage / METRICS) as fh:
            for row in metrics or []:
                fh.write(json.dumps(strict_row(row), allow_nan=False) + "\n")
        write_json(stage / STATE, state)
        kill_point("save:files_written")
        write_manifest(stage, step)
        kill_point("save:sealed")
    fsync_dir(folder.parent)
    return folder


@dataclass
class LoadedState:
    """What `load_state` read. model: the given one (weights loaded) or one built from the checkpoint;
    tokenizer: the run's toy tokenizer (build the world with it: `ToyDimooWorld.build(pairs, root, tokenizer=)`)."""

    model: DimooModel
    step: int
    seed: int
    cfg: DimooGRPOConfig
    tokenizer: ToyTokenizer
    run: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)


def load_state(folder: str | os.PathLike, model: DimooModel | None = None,
               optimizer: torch.optim.Optimizer | None = None) -> LoadedState:
    """Verify `folder` (`verify_state`: a changed or truncated file is refused naming it), then load it.

    model: weights copied in exactly (names, shapes and dtype must match; one-line ValueError otherwise);
    None builds the model from the checkpoint's model/ folder in its saved dtype. optimizer: built on `model`'s
    parameters; its state (and param_groups) replaced by the saved ones."""
    from safetensors.torch import load_file

    folder = Path(folder)
    verify_state(folder)
    state = json.loads((folder / STATE).read_text())
    if state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint file {folder / STATE}: unknown format {state.get('format')!r}")
    if optimizer is not None and model is None:
        raise ValueError("optimizer: needs the model it was built on (pass model too)")
    mdir = folder / MODEL_DIR
    if model is None:
        model = DimooModel.from_pretrained(mdir, dtype=state["model"]["dtype"],
                                           codebook_size=state["model"]["codebook_size"], attn_backend="sdpa")
    else:
        _load_weights(model, mdir, state["model"]["codebook_size"])
    if optimizer is not None:
        plain = json.loads((folder / OPTIMIZER_JSON).read_text())
        tensors = load_file(str(folder / OPTIMIZER_TENSORS))
        optimizer.load_state_dict(join_optimizer_state(tensors, plain))
    text = (folder / METRICS).read_text()
    metrics = [read_row(line) for line in text.splitlines() if line.strip()]
    return LoadedState(model, int(state["step"]), int(state["seed"]), DimooGRPOConfig(**state["cfg"]),
                       ToyTokenizer.from_json((folder / TOKENIZER).read_text()), state.get("run", {}), metrics)


def _load_weights(model: DimooModel, mdir: Path, codebook_size: int) -> None:
    """Copy the weights of the DiMOO folder `mdir` into `model` tensor by tensor (one tensor in memory at a time):
    config, names, shapes and dtypes must match (one-line ValueError naming the first that does not)."""
    from safetensors import safe_open

    from .model import DimooConfig, weight_files

    cfg = DimooConfig.from_json_dict(json.loads((mdir / "config.json").read_text()), codebook_size=codebook_size)
    if cfg != model.config:
        raise ValueError(f"model: its config differs from the checkpoint's ({mdir / 'config.json'})")
    mine, seen = model.state_dict(), set()
    with torch.no_grad():
        for f in weight_files(mdir):
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for name in st.keys():
                    t = st.get_tensor(name)
                    if name not in mine or mine[name].shape != t.shape or mine[name].dtype != t.dtype:
                        have = "absent" if name not in mine else f"{mine[name].dtype} {tuple(mine[name].shape)}"
                        raise ValueError(f"model: {f}: {name} is {t.dtype} {tuple(t.shape)}, the model's is {have}")
                    mine[name].copy_(t)
                    seen.add(name)
    missing = sorted(set(mine) - seen)
    if missing:
        raise ValueError(f"model: {mdir} lacks {missing[:4]} ({len(missing)})")


def checkpoint_folders(out: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every `step_NNNNNN` folder of out/checkpoints, oldest first (hidden stages excluded)."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_NAME.match(p.name))]
    return sorted(found)


def latest_verified(out: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """(the newest checkpoint of `out` that verifies or None, one line per newer one skipped and why)."""
    skipped = []
    for _, path in reversed(checkpoint_folders(out)):
        try:
            verify_state(path)
            return path, skipped
        except CheckpointError as err:
            skipped.append(str(err))
    return None, skipped


def remove_dead_stages(out: str | os.PathLike) -> list[Path]:
    """Remove the hidden stages (`.step_*`) of out/checkpoints; call only while holding the run folder's lock
    (then no live process is saving there). A copy swapped aside (`.step_N.old-PID`) whose step_N is missing is
    moved back instead."""
    root = Path(out) / CHECKPOINTS
    gone = []
    if root.is_dir():
        for p in root.iterdir():
            if not p.name.startswith(".step_"):
                continue
            aside = re.match(r"^\.(step_\d+)\.old-\d+$", p.name)
            if aside and not (root / aside.group(1)).exists():
                os.replace(p, root / aside.group(1))  # killed between swap_in's two renames: the only copy
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            gone.append(p)
    return gone


# ----------------------------------------------------------------------------- the loop
def step_pairs(pairs: list, seed: int, step: int, per_step: int) -> list:
    """The `per_step` pairs of `step` (>= 1): positions (step-1)*per_step .. step*per_step-1 of the endless
    sequence of epochs, epoch e a permutation of `pairs` seeded by `engine.seeds.data_order(seed, e)`.
    A pure function of (seed, step): no data cursor to save."""
    n = len(pairs)
    if n == 0 or per_step < 1:
        raise ValueError(f"pairs, pairs_per_step: expected >= 1 each, got {n}, {per_step}")
    out, orders = [], {}
    for k in range((step - 1) * per_step, step * per_step):
        epoch, i = divmod(k, n)
        if epoch not in orders:
            orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(data_order(seed, epoch)))
        out.append(pairs[int(orders[epoch][i])])
    return out


@dataclass
class RunResult:
    """model, optimizer after the last step; rows: the metrics of steps 1..steps; resumed_from: the checkpoint
    the run continued from (None: fresh); skipped: checkpoints passed over on resume, one line each."""

    model: DimooModel
    optimizer: torch.optim.Optimizer
    rows: list[dict]
    resumed_from: Path | None = None
    skipped: list[str] = field(default_factory=list)


def _write_metrics(out: Path, rows: list[dict]) -> None:
    with atomic_writer(out / METRICS) as fh:
        for row in rows:
            fh.write(json.dumps(strict_row(row), allow_nan=False) + "\n")


def run(world, cfg: DimooGRPOConfig, steps: int, out: str | os.PathLike, *, pairs: list, resume: bool = False,
        save_every: int = 1, seed: int = 0, lr: float = 1e-2, pairs_per_step: int = 4, model_seed: int = 0,
        model: DimooModel | None = None) -> RunResult:
    """Train `steps` PairGRPO steps (`pairgrpo.train_step`, AdamW(lr, weight_decay=0)) on `step_pairs`, saving
    a checkpoint every `save_every` steps and at the last one (0: only the last), and out/metrics.jsonl after
    every step. The run folder is locked (`engine.lock.RunLock`) for the run's life.

    resume=False: `out` must hold no checkpoint (one-line ValueError). resume=True: continue from the newest
    verified checkpoint (newer damaged or unfinished ones are skipped with a warning naming them; none at all:
    start fresh); its cfg, seed, lr, pairs_per_step, model_seed, number of pairs and toy tokenizer must equal
    these (one line listing what changed). model: the start model (default `world.tiny_model(model_seed)`)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: expected an int >= 0, got {steps!r}")
    if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 0:
        raise ValueError(f"save_every: expected an int >= 0, got {save_every!r}")
    out = Path(out)
    settings = {"seed": seed, "lr": lr, "pairs_per_step": pairs_per_step, "model_seed": model_seed,
                "num_pairs": len(pairs)}
    with RunLock.acquire(out):
        remove_dead_stages(out)
        model = model if model is not None else world.tiny_model(seed=model_seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        start, rows, found, skipped = 0, [], None, []
        if resume:
            found, skipped = latest_verified(out)
            for line in skipped:
                log.warning("resume: skipped %s", line)
            if found is not None:
                st = load_state(found, model, optimizer)
                changed = [k for k in RUN_KEYS if st.run.get(k) != settings[k]]
                changed += [f"cfg.{f.name}" for f in fields(cfg) if getattr(st.cfg, f.name) != getattr(cfg, f.name)]
                if st.tokenizer.vocab != world.tokenizer.vocab:
                    changed.append("tokenizer")
                if changed:
                    raise ValueError(f"resume: {found} was written with other settings: {changed} changed")
                start, rows = st.step, st.metrics
                log.info("resume: from %s (step %d)", found, start)
        elif checkpoint_folders(out):
            raise ValueError(f"out: {out} already holds checkpoints (pass resume=True, or another folder)")
        for step in range(start + 1, steps + 1):
            rows.append(train_step(model, optimizer, world, step_pairs(pairs, seed, step, pairs_per_step), cfg,
                                   seed=seed, step=step))
            _write_metrics(out, rows)
            if step == steps or (save_every and step % save_every == 0):
                save_state(out / CHECKPOINTS / step_name(step), model, optimizer, step, world, cfg, seed=seed,
                           run=settings, metrics=rows)
        if start >= steps:
            _write_metrics(out, rows)
    return RunResult(model, optimizer, rows, found, skipped)


# ----------------------------------------------------------------------------- export
def export(model: DimooModel, out: str | os.PathLike, *, source: str | os.PathLike | None = None, vq=None,
           dtype: str | None = None, shards: int = 1, overwrite: bool = False) -> Path:
    """Write `model` as a Lumina-DiMOO folder: config.json + safetensors under the released names
    (`DimooModel.save_pretrained`, `shards` files), the tokenizer files (`TOKENIZER_FILES`) and vqvae/ of
    `source` when given, else vqvae/ from `vq` (a diffusers VQModel, e.g. the toy world's) when given.

    dtype: cast the weights (default: the model's own, so `DimooModel.from_pretrained(out, dtype=that)` gives
    the same tensors bit for bit). The folder is filled beside `out` and renamed into place
    (`files.staged_folder`, marker `.pairuni-export`): `out` is never half-written; an existing `out` is
    refused unless `overwrite` and an earlier export wrote it. A model whose codebook is not 8192 codes needs
    a vqvae/ (source or vq) so that `from_pretrained` reads its codebook size: ValueError otherwise.
    Test hook: kill_point("export:files_written") before the rename."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    src = None if source is None else Path(source)
    if src is not None and not src.is_dir():
        raise ValueError(f"source: {src} is not a folder")
    has_vq = (src is not None and (src / VQ_DIR / "config.json").is_file()) or vq is not None
    if model.config.codebook_size != 8192 and not has_vq:
        raise ValueError(f"vq: a model with a {model.config.codebook_size}-code codebook needs vqvae/ (pass source "
                         "or vq) so that from_pretrained reads its codebook size")
    out = Path(out)
    with staged_folder(out, overwrite=overwrite, marker=EXPORT_MARKER) as stage:
        if dtype is not None and DTYPES[dtype] != next(model.parameters()).dtype:
            original = {k: v.detach().clone() for k, v in model.state_dict().items()}
            try:
                model.to(DTYPES[dtype]).save_pretrained(stage, shards=shards)
            finally:
                model.to(next(iter(original.values())).dtype).load_state_dict(original)
        else:
            model.save_pretrained(stage, shards=shards)
        if src is not None:
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, stage / name)
            if (src / VQ_DIR).is_dir():
                shutil.copytree(src / VQ_DIR, stage / VQ_DIR)
        if vq is not None and not (stage / VQ_DIR).exists():
            vq.save_pretrained(stage / VQ_DIR)
        for p in _content(stage):
            _fsync(p)
        kill_point("export:files_written")
    fsync_dir(out.parent)
    return out
