"""The DiMOO PairGRPO loop with verified checkpoints, exact resume and export to the Lumina-DiMOO layout.

    result = run(world, cfg, steps=40, out="runs/dimoo", pairs=pairs, save_every=10)   # trains, saves
    result = run(world, cfg, steps=80, out="runs/dimoo", pairs=pairs, resume=True)     # from the newest good one
    save_state(run_dir, model, optimizer, step, world, cfg)                             # one checkpoint
    state = load_state(folder, model, optimizer)                                        # verified, then loaded
    export(model, "exported/dimoo", source=base_folder)                                 # a Lumina-DiMOO folder

Checkpoints live in the engine's one checkpoint store (`engine.checkpoint_store.CheckpointStore(run_dir)`, the
same as the Janus family's): `run_dir/checkpoints/step_NNNNNN/`, a `latest` pointer naming the newest, and
`.tmp_step_NNNNNN.HOST.PID/` folders of saves in progress (or of dead ones). One checkpoint holds:

    model/config.json, model/model.safetensors   `DimooModel.save_pretrained`: the released names, the model's dtype
    adapters.safetensors                         instead of model/ for a LoRA run: the adapters only (`ADAPTERS`)
    optimizer.safetensors                        every tensor of `optimizer.state_dict()` ("state/<pid>/<key>")
    optimizer.json                               the rest of it (param_groups, non-tensor state)
    toy_tokenizer.json                           `ToyTokenizer.to_json()`, only for a toy world: text ids stay the
                                                 same on resume (a world on a real Lumina-DiMOO folder has none)
    state.json                                   "family": "dimoo", step, seed, `cfg.to_dict()`, run settings,
                                                 model dtype/codebook
    metrics.jsonl                                the metrics rows of steps 1..step (strict JSON, `engine.metrics`)
    manifest.json                                bytes + CRC-32 of every other file; written last by the store

Writing (`save_state`): the files go into the store's temp folder (`begin`), each is fsynced, then `publish`
writes the manifest last (the commit mark), swaps the folder in as `step_NNNNNN`, points `latest` at it and
prunes to `keep`. A process killed at any point leaves the previous checkpoint in charge: an unsealed or
unpublished temp folder is never read, and the next `run` holding the folder's lock removes it
(`remove_dead_temps`). Reading (`load_state`): `checkpoint_store.verify` first (every file the manifest names
must exist with its size and CRC-32; one-line `CheckpointError` naming the first that does not), then a
state.json without "family": "dimoo" (a Janus checkpoint, engine/checkpoint.py) is refused. Resume takes
`resume_candidate()`: the checkpoint `latest` names, or the newest verified one when that is damaged (what it
skipped is logged and returned; after such a fall-back nothing is pruned).

Exact resume: every random draw of a step is a pure function of (seed, step) -- the rollout seeds
(`engine.rollout.rollout_seeds`; the samplers draw counter-based Philox noise from them, no global RNG), the
reveal order (from the same seeds) and the step's pairs (`step_pairs`: a per-epoch shuffle seeded by
`engine.seeds.data_order(seed, epoch)`) -- and the update draws nothing (no dropout). So the state of a run is
the weights, the optimizer state and the step; no RNG state is saved (tests/engine/dimoo/test_run.py scrambles
the global RNGs before resuming and still gets the uninterrupted run bit for bit).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import join_optimizer_state, split_optimizer_state
from ..checkpoint_store import CheckpointError, CheckpointStore, kill_point, verify
from ..files import atomic_writer, fsync_dir, staged_folder, write_json
from ..lock import RunLock
from ..metrics import read_row, strict_row
from ..seeds import data_order
from ..text import ToyTokenizer
from .model import DTYPES, DimooModel
from .pairgrpo import DimooGRPOConfig, train_step

log = logging.getLogger("pairuni.dimoo.run")

FORMAT = 1
FAMILY = "dimoo"
STATE = "state.json"
MODEL_DIR = "model"
#: A LoRA run's checkpoint holds its adapters only (`lora.adapter_state`); the frozen base is rebuilt from the
#: run's config (the tiny model's seed or model.path), as Janus-Pro's LoRA checkpoints are.
ADAPTERS = "adapters.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
TOKENIZER = "toy_tokenizer.json"
METRICS = "metrics.jsonl"
EXPORT_MARKER = ".pairuni-export"
#: Files carried from an export's source folder (the tokenizer's and the VQ decoder's), when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
VQ_DIR = "vqvae"
#: Run settings that fix the trajectory: a resume with another value is refused.
RUN_KEYS = ("seed", "lr", "pairs_per_step", "model_seed", "num_pairs")


# ----------------------------------------------------------------------------- optimizer state <-> files
# ----------------------------------------------------------------------------- save / load
def _fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then every directory (deepest first): the store seals only what is on
    disk."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for p in files:
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
    for d in sorted({p.parent for p in files} | {folder}, key=lambda d: len(d.parts), reverse=True):
        fsync_dir(d)


def _require_finite(model) -> None:
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise ValueError(f"model: {name} holds NaN/inf; not saved (the previous checkpoint stays)")


def _write_rows(path: Path, rows: list[dict]) -> None:
    with atomic_writer(path) as fh:
        for row in rows:
            fh.write(json.dumps(strict_row(row), allow_nan=False) + "\n")


def save_state(run_dir: str | os.PathLike, model: DimooModel, optimizer: torch.optim.Optimizer, step: int, world,
               cfg: DimooGRPOConfig, *, seed: int = 0, run: dict | None = None, metrics: list[dict] | None = None,
               keep: int = 0, extra: dict | None = None) -> Path:
    """Write one checkpoint of the DiMOO PairGRPO loop into the checkpoint store of `run_dir` and publish it as
    run_dir/checkpoints/step_NNNNNN (module docstring for its files); returns that folder.

    step: optimizer steps taken (>= 0); seed: the rollout seed; run: JSON-safe settings (`RUN_KEYS`); metrics:
    the rows of steps 1..step; keep: checkpoints kept after publishing (<= 0: all); extra: JSON-safe top-level
    keys of state.json besides this module's (`pairuni train` adds the run's engine "config" and its
    "data_fingerprint", which `engine.run_start.start_point` checks on resume). toy_tokenizer.json is written
    only when `world.tokenizer` is an `engine.text.ToyTokenizer`. A model holding NaN/inf is refused before
    anything is written; on any error the temp folder is removed and the previous checkpoint stays. Kill points
    (PAIRUNI_KILL_AT): the store's "save:files_written", "save:sealed", "save:swapped", "save:published"."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected an int >= 0, got {step!r}")
    if not isinstance(cfg, DimooGRPOConfig):
        raise ValueError(f"cfg: expected a DimooGRPOConfig, got {type(cfg).__name__}")
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise ValueError(f"keep: expected an int, got {keep!r}")
    _require_finite(model)
    from safetensors.torch import save_file

    from .lora import has_adapters

    dtype = next(model.parameters()).dtype
    weights = "adapters" if has_adapters(model) else "full"
    clash = sorted(set(extra or {}) & {"format", "family", "step", "seed", "cfg", "run", "model"})
    if clash:
        raise ValueError(f"extra: {clash} are this module's own state.json keys")
    state = {**(extra or {}), "format": FORMAT, "family": FAMILY, "step": step, "seed": seed, "cfg": cfg.to_dict(),
             "run": dict(run or {}), "model": {"weights": weights, "dtype": next(k for k, v in DTYPES.items() if v == dtype),
                                               "codebook_size": model.config.codebook_size}}
    tokenizer = _toy_tokenizer(world)
    store = CheckpointStore(run_dir)
    tmp = store.begin(step)
    try:
        if weights == "adapters":
            from .lora import adapter_state

            save_file({k: v.detach().contiguous().cpu() for k, v in adapter_state(model).items()}, tmp / ADAPTERS,
                      metadata={"format": "pt"})
        else:
            model.save_pretrained(tmp / MODEL_DIR)
        tensors, plain = split_optimizer_state(optimizer.state_dict())
        save_file(tensors, tmp / OPTIMIZER_TENSORS, metadata={"format": "pt"})
        write_json(tmp / OPTIMIZER_JSON, plain)
        if tokenizer is not None:
            with atomic_writer(tmp / TOKENIZER) as fh:
                fh.write(tokenizer.to_json() + "\n")
        _write_rows(tmp / METRICS, metrics or [])
        write_json(tmp / STATE, state)
        _fsync_tree(tmp)
        return store.publish(tmp, step, keep)
    except BaseException:
        store.abort(tmp)  # once published the temp folder is gone: the abort is a no-op then
        raise


@dataclass
class LoadedState:
    """What `load_state` read. model: the given one (weights loaded) or one built from the checkpoint;
    tokenizer: the run's toy tokenizer (build the world with it: `ToyDimooWorld.build(pairs, root, tokenizer=)`),
    None when the checkpoint has none (a world on a real Lumina-DiMOO folder)."""

    model: DimooModel
    step: int
    seed: int
    cfg: DimooGRPOConfig
    tokenizer: ToyTokenizer | None
    run: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)


def read_state(folder: str | os.PathLike) -> dict:
    """state.json of the DiMOO checkpoint `folder` (not verified: `load_state` verifies first). One-line
    CheckpointError naming state.json when it is unreadable, of another family or of an unknown format."""
    path = Path(folder) / STATE
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict):
            raise ValueError(f"expected an object, got {type(state).__name__}")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint file {path}: unreadable ({type(err).__name__}: {err})") from None
    if state.get("family") != FAMILY:
        raise CheckpointError(f"checkpoint file {path}: family {state.get('family')!r}, expected {FAMILY!r} "
                              "(not a DiMOO checkpoint: a Janus one is loaded by engine/checkpoint.py)")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint file {path}: unknown format {state.get('format')!r}")
    return state


def load_state(folder: str | os.PathLike, model: DimooModel | None = None,
               optimizer: torch.optim.Optimizer | None = None) -> LoadedState:
    """Verify `folder` (`checkpoint_store.verify`: a missing, truncated or changed file is refused naming it),
    check its state.json (`read_state`: "family": "dimoo"), then load it.

    model: weights copied in exactly (names, shapes and dtype must match; one-line ValueError otherwise);
    None builds the model from the checkpoint's model/ folder in its saved dtype. A LoRA checkpoint
    (adapters.safetensors, "weights": "adapters") needs `model`: its base with adapters applied. optimizer: built on `model`'s
    parameters; its state (and param_groups) replaced by the saved ones."""
    from safetensors.torch import load_file

    folder = Path(folder)
    verify(folder)
    state = read_state(folder)
    if optimizer is not None and model is None:
        raise ValueError("optimizer: needs the model it was built on (pass model too)")
    mdir = folder / MODEL_DIR
    if state["model"].get("weights", "full") == "adapters":
        from .lora import has_adapters, load_adapter_state

        if model is None or not has_adapters(model):
            raise ValueError(f"model: {folder} holds LoRA adapters only; pass the run's base model with its adapters "
                             "(engine.dimoo.commands.load_run rebuilds it from the run's config)")
        load_adapter_state(model, load_file(str(folder / ADAPTERS)))
    elif model is None:
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
    tok = folder / TOKENIZER
    tokenizer = ToyTokenizer.from_json(tok.read_text()) if tok.is_file() else None
    return LoadedState(model, int(state["step"]), int(state["seed"]), DimooGRPOConfig.from_dict(state["cfg"]),
                       tokenizer, state.get("run", {}), metrics)


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
    """model, optimizer after the last step; rows: the metrics of steps 1..(last step taken); resumed_from: the
    checkpoint the run continued from (None: fresh); skipped: checkpoints passed over on resume, one line each;
    stopped: `should_stop` ended the run before `steps`; checkpoint: the newest checkpoint written or resumed
    (None: none)."""

    model: DimooModel
    optimizer: torch.optim.Optimizer
    rows: list[dict]
    resumed_from: Path | None = None
    skipped: list[str] = field(default_factory=list)
    stopped: bool = False
    checkpoint: Path | None = None


def _plain(value):
    """`value` as JSON reads it back (tuples become lists): what a saved config is compared as."""
    return json.loads(json.dumps(value))


def _changed(saved, given, prefix: str) -> list[str]:
    """Dotted keys whose values differ between two JSON-like dicts (nested dicts compared key by key)."""
    if isinstance(saved, dict) and isinstance(given, dict):
        keys = list(given) + [k for k in saved if k not in given]
        return [c for k in keys for c in _changed(saved.get(k), given.get(k), f"{prefix}.{k}")]
    return [] if saved == given else [prefix]


def _toy_tokenizer(world) -> ToyTokenizer | None:
    tokenizer = getattr(world, "tokenizer", None)
    return tokenizer if isinstance(tokenizer, ToyTokenizer) else None


def run(world, cfg: DimooGRPOConfig, steps: int, out: str | os.PathLike, *, pairs: list, resume: bool = False,
        save_every: int = 1, seed: int = 0, lr: float = 1e-2, pairs_per_step: int = 4, model_seed: int = 0,
        model: DimooModel | None = None, keep: int = 0,
        optimizer_factory: Callable[[list], torch.optim.Optimizer] | None = None,
        on_step: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
        lock: bool = True, extra: dict | None = None, rollout_guard=None,
        abandon: tuple[type[BaseException], ...] = (), evaluate: Callable[[int], dict] | None = None,
        ref_model: DimooModel | None = None) -> RunResult:
    """Train `steps` PairGRPO steps (`pairgrpo.train_step`) on `step_pairs`, saving a checkpoint (`save_state`,
    keeping the newest `keep`; <= 0: all) every `save_every` steps and at the last one (0: only the last), and
    out/metrics.jsonl after every step. The run folder is locked (`engine.lock.RunLock`) for the run's life
    (lock=False: the caller holds it already), and dead temp folders of its checkpoint store are removed first.

    resume=False: `out` must hold no checkpoint (one-line ValueError). resume=True: continue from the store's
    `resume_candidate()` (the `latest` one, or the newest verified one when it is damaged: what was skipped is
    logged, returned, and nothing is pruned by this run; none at all: start fresh; checkpoints of which none
    verifies: CheckpointError); its cfg, seed, lr, pairs_per_step, model_seed, number of pairs and toy tokenizer
    must equal these (one line listing what changed). model: the start model (default
    `world.tiny_model(model_seed)`). optimizer_factory: callable(list of the model's parameters) -> optimizer
    (default AdamW(lr, weight_decay=0)). on_step: called with each step's metrics row once out/metrics.jsonl
    holds it. should_stop: checked after each step but the last; when it returns True the step is saved (unless
    it just was) and the run returns with `stopped=True`. extra: state.json keys of every checkpoint (`save_state`).
    rollout_guard: a context-manager factory each step's rollouts run inside (`pairgrpo.train_step`); an exception
    of `abandon` raised there (`pairuni train`: a signal, `trainer.Interrupted`) abandons the step, whose rollouts
    changed nothing, saves the last finished step unless it is saved, and returns with `stopped=True`.
    evaluate: called with each finished step; what it returns joins that step's metrics row (`pairuni train`'s
    held-out evaluation, `train.eval_every`; it must not change the training: its own seeds, no update).
    ref_model: the frozen reference model of the KL term (algo.beta > 0; the run's start model)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: expected an int >= 0, got {steps!r}")
    if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 0:
        raise ValueError(f"save_every: expected an int >= 0, got {save_every!r}")
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise ValueError(f"keep: expected an int, got {keep!r}")
    out = Path(out)
    settings = {"seed": seed, "lr": lr, "pairs_per_step": pairs_per_step, "model_seed": model_seed,
                "num_pairs": len(pairs)}
    with RunLock.acquire(out) if lock else contextlib.nullcontext():
        store = CheckpointStore(out)
        store.remove_dead_temps()
        model = model if model is not None else world.tiny_model(seed=model_seed)
        params = list(model.parameters())
        optimizer = (optimizer_factory(params) if optimizer_factory is not None
                     else torch.optim.AdamW(params, lr=lr, weight_decay=0.0))
        start, rows, found, skipped = 0, [], None, []
        if resume:
            point = store.resume_candidate()
            found, skipped = point.path, point.skipped
            for line in skipped:
                log.warning("resume: skipped %s", line)
            if point.fell_back:
                keep = 0  # the skipped folders are evidence: this run prunes nothing (CheckpointStore.prune)
            if found is not None:
                st = load_state(found, model, optimizer)
                changed = [k for k in RUN_KEYS if st.run.get(k) != settings[k]]
                changed += _changed(_plain(st.cfg.to_dict()), _plain(cfg.to_dict()), "cfg")
                mine = _toy_tokenizer(world)
                if (st.tokenizer is None) != (mine is None) or (mine is not None and st.tokenizer.vocab != mine.vocab):
                    changed.append("tokenizer")
                if changed:
                    raise ValueError(f"resume: {found} was written with other settings: {changed} changed")
                start, rows = st.step, st.metrics
                log.info("resume: from %s (step %d)", found, start)
        elif store.step_folders():
            raise ValueError(f"out: {out} already holds checkpoints (pass resume=True, or another folder)")
        checkpoint, stopped = found, False

        def save(step: int) -> Path:
            return save_state(out, model, optimizer, step, world, cfg, seed=seed, run=settings, metrics=rows,
                              keep=keep, extra=extra)

        saved_step = start if found is not None else None
        for step in range(start + 1, steps + 1):
            try:
                row = train_step(model, optimizer, world, step_pairs(pairs, seed, step, pairs_per_step), cfg,
                                 seed=seed, step=step, rollout_guard=rollout_guard, ref_model=ref_model)
            except abandon:  # the rollouts of `step` were abandoned: the model is that of step - 1
                if saved_step != step - 1:
                    checkpoint, saved_step = save(step - 1), step - 1
                stopped = True
                log.info("stopped during step %d of %d (checkpoint %s)", step, steps, checkpoint)
                break
            if evaluate is not None:
                row.update(evaluate(step))
            rows.append(row)
            _write_rows(out / METRICS, rows)
            if on_step is not None:
                on_step(row)
            if step == steps or bool(save_every and step % save_every == 0):
                checkpoint, saved_step = save(step), step
            if step < steps and should_stop is not None and should_stop():
                if saved_step != step:
                    checkpoint, saved_step = save(step), step
                stopped = True
                log.info("stopped after step %d of %d (checkpoint %s)", step, steps, checkpoint)
                break
        if start >= steps:
            _write_rows(out / METRICS, rows)
    return RunResult(model, optimizer, rows, found, skipped, stopped, checkpoint)


# ----------------------------------------------------------------------------- export
def export(model: DimooModel, out: str | os.PathLike, *, source: str | os.PathLike | None = None, vq=None,
           dtype: str | None = None, shards: int = 1, overwrite: bool = False,
           extra_files: dict[str, Path] | None = None) -> Path:
    """Write `model` as a Lumina-DiMOO folder: config.json + safetensors under the released names
    (`DimooModel.save_pretrained`, `shards` files), the tokenizer files (`TOKENIZER_FILES`) and vqvae/ of
    `source` when given, else vqvae/ from `vq` (a diffusers VQModel, e.g. the toy world's) when given.

    dtype: cast the weights (default: the model's own, so `DimooModel.from_pretrained(out, dtype=that)` gives
    the same tensors bit for bit). The folder is filled beside `out` and renamed into place
    (`files.staged_folder`, marker `.pairuni-export`): `out` is never half-written; an existing `out` is
    refused unless `overwrite` and an earlier export wrote it. A model whose codebook is not 8192 codes needs
    a vqvae/ (source or vq) so that `from_pretrained` reads its codebook size: ValueError otherwise.
    extra_files: {name: file} copied into the folder too. Test hook: kill_point("export:files_written") before
    the rename."""
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
        for name, path in (extra_files or {}).items():  # e.g. a tiny run's toy_tokenizer.json
            shutil.copy2(path, stage / name)
        _fsync_tree(stage)
        kill_point("export:files_written")
    fsync_dir(out.parent)
    return out
