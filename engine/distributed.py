"""Multi-process training: `torchrun` launch, FSDP2 sharding, data-parallel pairs, sharded checkpoints.

    torchrun --nproc_per_node 8 -m engine.train_cli --config configs/janus_pro_7b_fsdp.yaml

`PairGRPOTrainer.from_config` calls `init_from_env()`; when `torchrun` set `WORLD_SIZE`, the
process group starts (nccl on CUDA, gloo on CPU) and the trainer shards its model with
`shard_model`. What each piece does:

- Sharding: `fully_shard` on every decoder layer of the language model, then on `FSDPRoot`, a
  wrapper whose forward runs `fn(model, *args)`. The engine never calls the Janus forward
  (it uses embeddings, the language model and the heads' weights directly), so every update
  micro-batch runs inside the root's forward: the root-owned parameters (embeddings, heads,
  aligners, the frozen vision encoder and VQ model) are gathered for it and their gradients
  reduce-scattered after backward. Mixed precision follows `distributed.param_dtype` /
  `distributed.reduce_dtype`; with fp32 weights and `param_dtype=bfloat16` the fp32 shards are
  the master weights and compute runs in bf16.
- Rollouts: `unsharded(root)` gathers every parameter once and keeps it gathered for the whole
  rollout, so the decode loops run no collective per token. Ranks may then stop their answer
  loops at different steps (each stops when its own rows are done) without deadlocking.
- Data: the sampler yields the same global list of P pairs on every rank; rank r keeps pairs
  `[r P/W, (r+1) P/W)` and the matching slice of the per-row rollout seeds, so each rank holds
  whole pairs (whole groups, hence exact group advantages) and its rollouts are exactly the rows
  a single process would sample for them.
- Loss: each task's loss is normalised by the GLOBAL denominator (`loss_denominator` of the full
  batch, all-reduced), so the summed gradient equals the single-process one. FSDP divides
  reduced gradients by the world size; `shard_model` sets that factor to 1 instead.
- Checkpoints: `save_sharded` / `load_sharded` use `torch.distributed.checkpoint` (each rank
  writes its shards; `set_state_dict` reshards on load), so a run resumes on any world size.
  Only trainable parameters are written (frozen ones come from the base model), plus state.json
  (step, data cursor, extras) from rank 0. Written to a temporary directory and renamed.
- Logging: only rank 0 writes metrics, TensorBoard, the reward curve and the progress bar.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("pairuni.distributed")

#: Marker file of a checkpoint written by `save_sharded` (torch.distributed.checkpoint metadata).
DCP_METADATA = ".metadata"


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: object  # DeviceMesh over all ranks (1-D)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_ENV: DistEnv | None = None


def current() -> DistEnv | None:
    """The DistEnv of this process, or None when it does not run under a process group."""
    return _ENV


def is_main() -> bool:
    return _ENV is None or _ENV.is_main


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env(device: str = "auto") -> DistEnv | None:
    """Start the process group from torchrun's RANK / WORLD_SIZE / LOCAL_RANK (None when absent).

    device: `train.device`; "auto" takes cuda:LOCAL_RANK when CUDA is available (nccl), else the
    CPU (gloo). MASTER_ADDR / MASTER_PORT come from the environment as torchrun sets them.
    """
    global _ENV
    if _ENV is not None:
        return _ENV
    if not launched_by_torchrun():
        return None
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    if use_cuda:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    mesh = init_device_mesh(dev.type, (world,))
    _ENV = DistEnv(rank, world, local, dev, mesh)
    if not _ENV.is_main:  # rank-0-only logging: other ranks report warnings and errors only
        logging.getLogger("pairuni").setLevel(logging.WARNING)
    log.info("distributed: %d ranks, backend %s, device %s", world, dist.get_backend(), dev)
    return _ENV


def shutdown() -> None:
    """Destroy the process group started by `init_from_env` (tests start several in one process)."""
    global _ENV
    if _ENV is not None and dist.is_initialized():
        dist.destroy_process_group()
    _ENV = None


# ----------------------------------------------------------------------------- data
def local_pairs(n_pairs: int, env: DistEnv | None) -> slice:
    """This rank's contiguous share of a global list of `n_pairs` pairs (every rank the same size)."""
    if env is None:
        return slice(0, n_pairs)
    if n_pairs % env.world_size:
        raise ValueError(f"data.pairs_per_step: expected a multiple of the {env.world_size} ranks "
                         f"(every rank holds whole pairs), got {n_pairs}")
    k = n_pairs // env.world_size
    return slice(env.rank * k, (env.rank + 1) * k)


def all_reduce_sum(x: torch.Tensor | float, env: DistEnv | None):
    """Sum over ranks (returns the same type it got; identity without a process group)."""
    if env is None:
        return x
    t = torch.as_tensor(x, dtype=torch.float64).detach().clone().reshape(-1)
    t = t.to(env.device) if env.device.type == "cuda" else t
    dist.all_reduce(t)
    t = t.cpu()
    return float(t) if not isinstance(x, torch.Tensor) else t.reshape(torch.as_tensor(x).shape)


def global_denominator(local_den: torch.Tensor, mode: str, env: DistEnv | None) -> torch.Tensor:
    """`loss_denominator` of the global batch from this rank's. Counts add up over ranks; in
    seq-mean-token-sum-norm every part divides by the constant T, so its denominator stays 1."""
    if env is None or mode == "seq-mean-token-sum-norm":
        return local_den
    return all_reduce_sum(local_den.double(), env).to(local_den.dtype)


# ----------------------------------------------------------------------------- FSDP2
class FSDPRoot(nn.Module):
    """Root of the FSDP2 tree. `root(fn, *args)` runs `fn(model, *args)` inside the root's forward,
    so root-owned parameters are gathered for it and their gradients reduce-scattered after backward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        from torch.utils._pytree import tree_map

        # FSDP hooks backward onto the output tensors; an in-place op on a view would drop the hook
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) and t._is_view() else t,
                        fn(self.model, *args, **kwargs))


def decoder_layers(model) -> list[nn.Module]:
    """The language model's decoder layers of a `JanusForConditionalGeneration`."""
    return list(model.model.language_model.layers)


def mixed_precision(param_dtype: str | None, reduce_dtype: str | None):
    """MixedPrecisionPolicy from dtype names (None: keep the parameters' dtype)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from .model import DTYPES

    return MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype] if param_dtype else None,
                                reduce_dtype=DTYPES[reduce_dtype] if reduce_dtype else None)


def shard_model(model: nn.Module, env: DistEnv, *, param_dtype: str | None = None,
                reduce_dtype: str | None = None, reshard_after_forward: bool = True) -> FSDPRoot:
    """`fully_shard` each decoder layer, then the root; returns the root (call it to run a loss).

    The model's parameters become DTensor shards in place (`model.parameters()` yields them; an
    optimizer built afterwards steps the shards). Gradients are summed over ranks, not averaged:
    the trainer already divides each loss by the global denominator.
    """
    from torch.distributed.fsdp import fully_shard

    mp = mixed_precision(param_dtype, reduce_dtype)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=env.mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    root = FSDPRoot(model)
    fully_shard(root, mesh=env.mesh, mp_policy=mp)
    for m in _fsdp_modules(root):  # sum, not average, gradients over ranks; plain SUM works on nccl and gloo
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
    # FSDP initialises its state on the first forward, which must go through the root; rollouts
    # gather layers directly (`unsharded`), so run an empty forward now and free what it gathered.
    with torch.no_grad():
        root(lambda m: None)
    root.reshard()
    return root


def _fsdp_modules(root: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in root.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def unsharded(root: nn.Module | None):
    """Keep every parameter gathered inside the block (rollouts): no collective runs per token.

    The gathers happen once, in the same order on every rank, on entry; on exit parameters are
    resharded and the layers reshard after forward again.
    """
    if root is None:
        yield
        return
    modules = _fsdp_modules(root)
    layers = [m for m in modules if m is not root]
    for m in modules:
        m.unshard()
    for m in layers:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in layers:
            m.set_reshard_after_forward(True, recurse=False)
        for m in modules:
            m.reshard()


def full_tensor(x) -> torch.Tensor:
    """A tensor that may be a DTensor (FSDP shards, a norm over them) as a plain full tensor (collective)."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


# ----------------------------------------------------------------------------- checkpoints
def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # strict=False: only trainable parameters are stored; frozen ones come from the base model
    return StateDictOptions(strict=False)


def _trainable_names(root: nn.Module, sd: dict) -> set[str]:
    # get_state_dict's keys are parameter names without wrapper prefixes (torch's checkpoint_wrapper adds one)
    names = {n.replace("_checkpoint_wrapped_module.", "") for n, p in root.named_parameters() if p.requires_grad}
    keep = {k for k in sd if k in names}
    if not keep:
        raise RuntimeError("save_sharded: no trainable parameter found in the model state dict")
    return keep


def save_sharded(run_dir: str | os.PathLike, step: int, root: nn.Module, optimizer, extra: dict, *,
                 keep: int = 2) -> Path:
    """Every rank writes its shards of the trainable parameters and optimizer state with DCP into
    `run_dir/checkpoints/step_N` (temporary directory, renamed by rank 0 after a barrier); rank 0
    writes state.json and the `latest` pointer. Collective: every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from .checkpoint import _fsync_dir, publish_checkpoint, rng_state

    env = current()
    root_dir = Path(run_dir) / "checkpoints"
    final = root_dir / f"step_{step:06d}"
    tmp = root_dir / f".tmp_step_{step:06d}"
    if is_main():
        root_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier(env)
    model_sd, optim_sd = get_state_dict(root, optimizer, options=_options())
    names = _trainable_names(root, model_sd)
    model_sd = {k: v for k, v in model_sd.items() if k in names}
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    _barrier(env)
    if is_main():
        rng_js, _ = rng_state()  # rollouts draw from explicit per-row seeds; the python/numpy RNGs are kept
        with open(tmp / "state.json", "w") as fh:
            json.dump({"step": step, "format": "dcp", "world_size": env.world_size if env else 1,
                       "rng": rng_js, **extra}, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        publish_checkpoint(tmp, final, root_dir, keep)
    _barrier(env)
    return final


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / DCP_METADATA).is_file()


def load_sharded(path: str | os.PathLike, root: nn.Module, optimizer) -> dict:
    """Load a `save_sharded` checkpoint written by any world size into this rank's shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise ValueError(f"checkpoint {path}: not a sharded (torch.distributed.checkpoint) checkpoint; "
                         "a single-process checkpoint (policy.safetensors) resumes in a single process")
    with open(path / "state.json") as fh:
        state = json.load(fh)
    model_sd, optim_sd = get_state_dict(root, optimizer, options=_options())
    model_sd = {k: v for k, v in model_sd.items() if k in _trainable_names(root, model_sd)}
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=str(path))
    set_state_dict(root, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"],
                   options=_options())
    return state


def _barrier(env: DistEnv | None) -> None:
    if env is not None:
        dist.barrier()


__all__ = ["DistEnv", "FSDPRoot", "all_reduce_sum", "current", "decoder_layers", "full_tensor", "global_denominator",
           "init_from_env", "is_main", "is_sharded_checkpoint", "launched_by_torchrun", "load_sharded",
           "local_pairs", "mixed_precision", "save_sharded", "shard_model", "shutdown", "unsharded"]
