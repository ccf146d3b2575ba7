"""Atomic checkpoints and exact resume, single-process and sharded (torchrun + FSDP2).

    checkpoints = Checkpointer(run_dir, model, optimizer, fsdp_root)   # fsdp_root None: one process
    path = checkpoints.save(step, extra)        # collective under torchrun
    state = checkpoints.load(path)              # state.json's content

A checkpoint is a directory `run_dir/checkpoints/step_000123/`. A single process writes

    policy.safetensors     the trainable parameters (frozen ones come from the base model)
    optimizer.safetensors  every tensor of the optimizer state (8-bit states, quantisation maps, ...)
    master.safetensors     fp32 master weights, when the run keeps them (optim.master_weights)
    update.safetensors     a compensated update's state (optim.update: Kahan buffers or the rounding RNG)
    state.json             step, the optimizer's non-tensor state, RNG states, data cursor, extras

a torchrun run writes `torch.distributed.checkpoint` (DCP) files instead of the safetensors
(every rank its shards of the trainable parameters and optimizer state; `.metadata` marks the
format; `set_state_dict` reshards on load, so a run resumes on any world size) and a state.json
with `"format": "dcp"`. Where the folders live, how they are sealed (a CRC-32 manifest written
last), published, verified, chosen on resume and pruned is `engine/checkpoint_store.py`'s job;
this module decides what goes in them. No tensor that is NaN or infinite is ever written.
Resuming restores parameters, optimizer state, RNG states and the data cursor, so a run
interrupted at step k and resumed computes exactly what the uninterrupted run would.
"""

from __future__ import annotations

import errno
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import distributed
from .checkpoint_store import CheckpointError, CheckpointStore, ResumePoint, step_name
from .files import fsync_dir

STATE = "state.json"
#: Marker file of a sharded checkpoint (torch.distributed.checkpoint metadata).
DCP_METADATA = ".metadata"
_SEEN: dict[int, set] = {}  # storages already written, per tensors dict being filled


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (tied parameters appear once)."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _flatten(prefix: str, entry: dict, tensors: dict, plain: dict) -> None:
    """Tensors (at any depth, e.g. bitsandbytes' nested quant state) -> `tensors[prefix/key/...]`.

    safetensors refuses aliased tensors (bitsandbytes shares one quantisation map between
    parameters), so a tensor whose storage was already taken is copied.
    """
    seen = _SEEN.setdefault(id(tensors), set())
    for key, value in entry.items():
        if isinstance(value, torch.Tensor):
            t = value.detach().contiguous().cpu()
            if t.untyped_storage().data_ptr() in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            tensors[f"{prefix}/{key}"] = t
        elif isinstance(value, dict):
            sub: dict = {}
            _flatten(f"{prefix}/{key}", value, tensors, sub)
            plain[key] = {"__nested__": sub}
        else:
            plain[key] = value


def _encode(value):
    """JSON-safe copy of a non-tensor optimizer value; tuples (AdamW's betas) kept as {"__tuple__": [...]}."""
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


def split_optimizer_state(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() -> (tensors {"state/<pid>/<key>[/<sub>...]": tensor} at any depth, the JSON-safe
    rest); both model families' checkpoints store an optimizer this way. `join_optimizer_state` inverts it."""
    tensors: dict[str, torch.Tensor] = {}
    plain = {"param_groups": _encode(opt_state["param_groups"]), "state": {}}
    _SEEN[id(tensors)] = set()
    try:
        for pid, entry in opt_state["state"].items():
            plain["state"][str(pid)] = {}
            _flatten(f"state/{pid}", entry, tensors, plain["state"][str(pid)])
            plain["state"][str(pid)] = _encode(plain["state"][str(pid)])
    finally:
        del _SEEN[id(tensors)]
    return tensors, plain


def _unflatten(plain: dict) -> dict:
    return {k: _unflatten(v["__nested__"]) if isinstance(v, dict) and "__nested__" in v else v
            for k, v in plain.items()}


def join_optimizer_state(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    """The inverse of `split_optimizer_state`: a dict for `optimizer.load_state_dict`."""
    state: dict = {int(pid): _unflatten(_decode(entry)) for pid, entry in plain["state"].items()}
    for key, value in tensors.items():
        parts = key.split("/")
        node = state.setdefault(int(parts[1]), {})
        for part in parts[2:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return {"state": state, "param_groups": _decode(plain["param_groups"])}


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON part, tensor part) of every RNG the loop may touch."""
    py = random.getstate()
    npy = np.random.get_state()
    js = {"python": [py[0], list(py[1]), py[2]],
          "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])]}
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda{i}"] = s
    return js, tensors


def set_rng_state(js: dict, tensors: dict[str, torch.Tensor]) -> None:
    py = js["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = js["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["rng.torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda"))]
        if states:
            torch.cuda.set_rng_state_all(states)


def _write_checkpoint(run_dir: str | os.PathLike, step: int, write_files, state: dict, *, keep: int,
                      env: distributed.DistEnv | None = None, store: CheckpointStore | None = None) -> Path:
    """The one writer of a checkpoint's content: `write_files(tmp)` fills the store's temporary folder
    (on every rank of `env`), rank 0 adds state.json and publishes it as `step_N`. Returns its path."""
    main = env is None or env.is_main
    store = store or CheckpointStore(run_dir)
    tmp = store.begin(step) if main else None
    if env is not None:  # every rank writes its shards into rank 0's folder
        tmp = distributed.broadcast_object(tmp, env)
    try:
        write_files(tmp)
        distributed.barrier(env)
        if main:
            with open(tmp / STATE, "w") as fh:
                json.dump({"step": step, **state}, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            fsync_dir(tmp)
    except BaseException:
        if main:
            store.abort(tmp)
        raise
    try:
        final = store.publish(tmp, step, keep) if main else None
    except BaseException:
        store.abort(tmp)  # gone already once it moved in; the previous checkpoint is untouched either way
        raise
    distributed.barrier(env)
    return final if main else store.root / step_name(step)


def write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' `save_file`, whose errors (a `SafetensorError` wrapping ENOSPC, EROFS, EACCES, ...) name no
    file: re-raised as an OSError naming `path` (errno kept where the message gives one)."""
    from safetensors import SafetensorError

    try:
        save_file(tensors, str(path))
    except SafetensorError as err:
        code = next((c for c in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EIO)
                     if f"code: {c}," in str(err)), errno.EIO)
        raise OSError(code, f"{os.strerror(code)} ({err})", str(path)) from err


def require_finite(tensors: dict[str, torch.Tensor], what: str, step: int) -> None:
    """Raise CheckpointError naming the first floating tensor of `tensors` holding NaN or inf."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"refusing to save step {step}: {what} {name!r} holds NaN or inf "
                                  "(the previous checkpoint is kept)")


def save_checkpoint(run_dir: str | os.PathLike, step: int, model, optimizer, extra: dict, *, keep: int = 2,
                    master: dict[str, torch.Tensor] | None = None, update: dict[str, torch.Tensor] | None = None,
                    store: CheckpointStore | None = None) -> Path:
    """Write single-process checkpoint `step` atomically; keep the newest `keep` checkpoints. Returns its path.

    master: {parameter name: fp32 master weight} to store beside the model's (lower-precision) weights.
    update: `PolicyOptimizer.update_state()` (written to update.safetensors when not empty).
    """
    opt_tensors, opt_plain = split_optimizer_state(optimizer.state_dict())
    rng_js, rng_tensors = rng_state()
    params = trainable_state(model)
    masters = {n: t.detach().contiguous().cpu() for n, t in master.items()} if master is not None else None
    require_finite(params, "parameter", step)
    require_finite(masters or {}, "master weight", step)
    updates = {n: t.detach().contiguous().cpu() for n, t in (update or {}).items()}
    require_finite(updates, "update state", step)
    require_finite(opt_tensors, "optimizer state", step)

    def write(tmp: Path) -> None:
        write_tensors(params, tmp / "policy.safetensors")
        if masters is not None:
            write_tensors(masters, tmp / "master.safetensors")
        if updates:
            write_tensors(updates, tmp / "update.safetensors")
        write_tensors({**opt_tensors, **rng_tensors}, tmp / "optimizer.safetensors")

    return _write_checkpoint(run_dir, step, write, {"optimizer": opt_plain, "rng": rng_js, **extra}, keep=keep,
                             store=store)


def find_resume_point(run_dir: str | os.PathLike, *, deep: bool = True) -> ResumePoint:
    """The checkpoint a resumed run starts from (see `CheckpointStore.resume_candidate`).

    Dead saves' temp folders are cleared first (by the main process only: ranks of one job must not
    race over them). deep=False checks manifests and file sizes but not the checksums (cheap).
    """
    store = CheckpointStore(run_dir)
    if os.environ.get("RANK", "0") == "0":
        store.remove_dead_temps()
    return store.resume_candidate(deep=deep)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest verified checkpoint of `run_dir`, or None when it has none."""
    try:
        return find_resume_point(run_dir).path
    except CheckpointError:
        return None


def read_state(path: str | os.PathLike) -> dict:
    """state.json of checkpoint `path`: step, data cursor, config, tokenizer and the other extras."""
    with open(Path(path) / STATE) as fh:
        return json.load(fh)


def is_sharded(path: str | os.PathLike) -> bool:
    """True for a checkpoint written by a torchrun run (DCP shards), False for a single-process one."""
    return (Path(path) / DCP_METADATA).is_file()


def load_checkpoint(path: str | os.PathLike, model, optimizer, *, master: dict[str, torch.Tensor] | None = None,
                    load_update=None) -> dict:
    """Restore parameters, optimizer and RNG states from `path`; returns state.json's content.

    master: the run's fp32 master weights by name, filled from master.safetensors (or, for a checkpoint
    written without them, from the stored weights).
    load_update: called with update.safetensors' tensors ({} when the checkpoint has none), e.g.
    `PolicyOptimizer.load_update_state`.
    """
    path = Path(path)
    state = read_state(path)
    params = load_file(str(path / "policy.safetensors"))
    named = dict(model.named_parameters())
    missing = [n for n, p in named.items() if p.requires_grad and n not in params]
    unknown = [n for n in params if n not in named]
    if missing or unknown:
        raise ValueError(f"checkpoint {path}: parameters do not match the model "
                         f"(missing {missing[:3]}, unknown {unknown[:3]}); was it written with other train_modules?")
    masters = params
    if master is not None and (path / "master.safetensors").is_file():
        masters = load_file(str(path / "master.safetensors"))
    with torch.no_grad():
        for n, t in params.items():
            named[n].copy_(t)
            if master is not None:
                master[n].copy_(masters[n])
    tensors = load_file(str(path / "optimizer.safetensors"))
    opt_tensors = {k: v for k, v in tensors.items() if k.startswith("state/")}
    optimizer.load_state_dict(join_optimizer_state(opt_tensors, state["optimizer"]))
    set_rng_state(state["rng"], {k: v for k, v in tensors.items() if k.startswith("rng.")})
    if load_update is not None:
        update_file = path / "update.safetensors"
        load_update(load_file(str(update_file)) if update_file.is_file() else {})
    return state


# ----------------------------------------------------------------------------- sharded (torchrun + FSDP2)
def _dcp_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # strict=False: only trainable parameters are stored; frozen ones come from the base model
    return StateDictOptions(strict=False)


def _trainable_model_state(root, optimizer) -> tuple[dict, dict]:
    """(trainable parameters, optimizer state) of the FSDP2 `root` as DCP state dicts of this rank's shards."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(root, optimizer, options=_dcp_options())
    # get_state_dict's keys are parameter names without wrapper prefixes (torch's checkpoint_wrapper adds one)
    names = {n.replace("_checkpoint_wrapped_module.", "") for n, p in root.named_parameters() if p.requires_grad}
    model_sd = {k: v for k, v in model_sd.items() if k in names}
    if not model_sd:
        raise RuntimeError("save_sharded: no trainable parameter found in the model state dict")
    return model_sd, optim_sd


def save_sharded(run_dir: str | os.PathLike, step: int, root, optimizer, extra: dict, *, keep: int = 2,
                 store: CheckpointStore | None = None) -> Path:
    """Every rank writes its shards of the trainable parameters and optimizer state with DCP; rank 0
    writes state.json and publishes. Collective: every rank must call it."""
    import torch.distributed.checkpoint as dcp

    env = distributed.current()
    rng_js, _ = rng_state()  # rollouts draw from explicit per-row seeds; the python/numpy RNGs are kept

    def write(tmp: Path) -> None:
        model_sd, optim_sd = _trainable_model_state(root, optimizer)
        local = {k: v.to_local() if hasattr(v, "to_local") else v for k, v in model_sd.items()}
        require_finite({k: v for k, v in local.items() if isinstance(v, torch.Tensor)}, "parameter shard", step)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))

    state = {"format": "dcp", "world_size": env.world_size if env else 1, "rng": rng_js, **extra}
    return _write_checkpoint(run_dir, step, write, state, keep=keep, env=env, store=store)


def load_sharded(path: str | os.PathLike, root, optimizer) -> dict:
    """Load a `save_sharded` checkpoint written by any world size into this rank's shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    if not is_sharded(path):
        raise ValueError(f"checkpoint {path}: not a sharded (torch.distributed.checkpoint) checkpoint; "
                         "a single-process checkpoint (policy.safetensors) resumes in a single process")
    state = read_state(path)
    model_sd, optim_sd = _trainable_model_state(root, optimizer)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=str(path))
    set_state_dict(root, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"],
                   options=_dcp_options())
    return state


# ----------------------------------------------------------------------------- the trainer's handle
class Checkpointer:
    """Save and load the checkpoints of one run, single-process or sharded, behind one interface.

    optimizer: an `engine.optim.PolicyOptimizer` (its fp32 masters are saved when it keeps them).
    fsdp_root: the FSDP2 root under torchrun (checkpoints are then DCP shards), else None.
    """

    def __init__(self, run_dir: str | os.PathLike, model, optimizer, fsdp_root=None, *, keep: int = 2):
        self.run_dir, self.model, self.optimizer, self.fsdp_root, self.keep = Path(run_dir), model, optimizer, fsdp_root, keep
        self.store = CheckpointStore(run_dir)

    def resumed_from(self, point: ResumePoint) -> None:
        """Note where the run resumed: after a fall-back nothing is pruned (the skipped folders are evidence)."""
        if point.fell_back:
            self.store.prune_enabled = False

    def save(self, step: int, extra: dict) -> Path:
        if self.fsdp_root is not None:
            return save_sharded(self.run_dir, step, self.fsdp_root, self.optimizer.inner, extra, keep=self.keep,
                                store=self.store)
        return save_checkpoint(self.run_dir, step, self.model, self.optimizer.inner, extra, keep=self.keep,
                               master=self.optimizer.master_state(), update=self.optimizer.update_state(),
                               store=self.store)

    def load(self, path: str | os.PathLike) -> dict:
        try:
            if self.fsdp_root is not None:
                return load_sharded(path, self.fsdp_root, self.optimizer.inner)
            return load_checkpoint(path, self.model, self.optimizer.inner, master=self.optimizer.master_state(),
                                   load_update=self.optimizer.load_update_state)
        except CheckpointError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as err:  # a verified file that still does not load
            raise CheckpointError(f"checkpoint {path}: cannot be loaded ({type(err).__name__}: {err})") from err
