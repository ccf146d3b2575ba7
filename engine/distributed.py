"""Multi-process training: `torchrun` launch, FSDP2 sharding, data-parallel pairs, collectives.

    torchrun --nproc_per_node 8 -m engine.train_cli --config configs/janus_pro_7b_fsdp.yaml

`engine.build.build_components` calls `init_from_env()`; when `torchrun` set `WORLD_SIZE`, the
process group starts (nccl on CUDA, gloo on CPU) and construction shards the model with
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
- Checkpoints: sharded (DCP) checkpoints are engine/checkpoint.py's, as single-process ones are.
- Logging: only rank 0 writes metrics, TensorBoard, the reward curve and the progress bar.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .config import Config, require
from .model import DTYPES

log = logging.getLogger("pairuni.distributed")


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


def torchrun_world_size() -> int | None:
    """The number of processes torchrun started (1 included), or None outside torchrun."""
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else None


def check_config(cfg: Config, world: int | None) -> None:
    """What a torchrun (FSDP2) launch of `world` processes cannot do (None: a single process, nothing to
    check); checked before the process group starts."""
    if world is None:
        return
    require(cfg.optim.optimizer != "adamw8bit", "optim.optimizer",
            "adamw under torchrun (bitsandbytes cannot step FSDP2's DTensor parameters; adamw's state is "
            "sharded over the ranks)", cfg.optim.optimizer)
    require(not cfg.optim.master_weights or cfg.model.dtype == "float32", "optim.master_weights",
            "false under torchrun with bf16/fp16 weights (use model.dtype=float32 with distributed.param_dtype=bfloat16: "
            "the fp32 shards are the master weights)", cfg.optim.master_weights)
    require(cfg.optim.update == "round", "optim.update", "round under torchrun (use model.dtype=float32 with "
            "distributed.param_dtype=bfloat16: the fp32 shards are the master weights)", cfg.optim.update)
    require(cfg.data.pairs_per_step % world == 0, "data.pairs_per_step",
            f"a multiple of the {world} ranks (every rank holds whole pairs)", cfg.data.pairs_per_step)


def resolve_device(spec: str, local_rank: int | None = None) -> torch.device:
    """The device of `train.device` ("auto" | "cpu" | "cuda" | "cuda:N").

    "auto" is CUDA when available, else the CPU. Under torchrun (`local_rank` given) a CUDA run uses
    cuda:LOCAL_RANK, one device per process.
    """
    use_cuda = torch.cuda.is_available() and (spec == "auto" or spec.startswith("cuda"))
    if local_rank is not None:
        return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if spec == "auto":
        return torch.device("cuda" if use_cuda else "cpu")
    return torch.device(spec)


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
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    mesh = init_device_mesh(dev.type, (world,))
    _ENV = DistEnv(rank, world, local, dev, mesh)
    if not _ENV.is_main:  # rank-0-only logging: other ranks report warnings and errors only
        logging.getLogger("pairuni").setLevel(logging.WARNING)
    log.info("distributed: %d ranks, backend %s, device %s", world, dist.get_backend(), dev)
    return _ENV


def shutdown(wait_for_peers: bool = False) -> None:
    """Destroy the process group started by `init_from_env` (tests start several in one process).

    wait_for_peers: first wait until every rank has got here (a barrier), so that no rank tears its gloo
    connections down while another still works after the last collective (rank 0 writing its files):
    that race aborted a peer at exit ("terminate called without an active exception"). Only on a
    successful exit: after an error a peer may never arrive. A barrier that fails is only logged."""
    global _ENV
    if _ENV is not None and dist.is_initialized():
        if wait_for_peers:
            try:
                dist.barrier()
            except (RuntimeError, dist.DistError) as err:  # a peer that already left
                log.warning("shutdown: ranks did not all reach the end together (%s)", err)
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


def broadcast_object(obj, env: DistEnv | None):
    """Rank 0's `obj` (any picklable value) on every rank; `obj` itself in a single process."""
    if env is None:
        return obj
    box = [obj if env.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: DistEnv | None) -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if env is not None:
        dist.barrier()


__all__ = ["DistEnv", "FSDPRoot", "all_reduce_sum", "barrier", "broadcast_object", "current", "decoder_layers", "full_tensor",
           "global_denominator", "init_from_env", "is_main", "launched_by_torchrun", "local_pairs", "mixed_precision",
           "resolve_device", "shard_model", "shutdown", "torchrun_world_size", "unsharded"]
