"""The optimizer of the trainable weights, with optional fp32 master weights.

    optimizer = PolicyOptimizer(model, cfg.optim, device)
    optimizer.zero_grad(); loss.backward()
    grad_norm = optimizer.clip_grad_norm(cfg.optim.max_grad_norm)
    optimizer.step()

- `adamw8bit`: bitsandbytes' 8-bit AdamW (state ~2 bytes per parameter instead of 8), the
  setting that fits Janus-Pro-7B on one GPU; non-paged, so its state is ordinary device memory.
- `adamw`: torch's (two moments in the dtype of the tensors it steps: bf16 for bf16 weights, fp32 for
  masters, proxies and fp32 shards; the choice under torchrun, where FSDP2's DTensor parameters are
  sharded and bitsandbytes cannot step them).
- Master weights (`optim.master_weights` with bf16/fp16 weights): the optimizer steps fp32
  copies and rounds them into the model. With bf16 weights and lr 1e-6 most AdamW steps are
  below half a bf16 ulp and vanish; the fp32 copy keeps them (+4 bytes per trained parameter).
- Compensated updates (`optim.update`, bf16 weights, no masters): each parameter in turn is
  widened to a transient fp32 tensor, the optimizer steps that, and the result lands back in bf16:
  `kahan` keeps a bf16 compensation buffer `c` with the rounding error of the last update and
  steps `p + c` (together ~16 significant bits, +2 bytes per parameter); `stochastic_rounding`
  rounds the fp32 result up or down with probabilities that make the bf16 weight's expectation the
  fp32 one (no extra memory; a seeded generator whose state is checkpointed). Only one parameter's
  fp32 copy and gradient exist at a time (8 bytes per element of the largest parameter; stochastic
  rounding 6 more for its noise and result), as with master weights.
"""

from __future__ import annotations

import typing

import torch

from . import distributed, seeds
from .config import Config, Optimizer, Update, require

OPTIMIZERS = typing.get_args(Optimizer)
#: `optim.update`: how a step lands in the weights. round: the optimizer steps the weights (or the fp32
#: masters) directly; kahan / stochastic_rounding: compensated bf16 updates (see the module docstring).
UPDATES = typing.get_args(Update)


def check_config(cfg: Config, world: int | None) -> None:
    """A compensated update needs bf16 weights and no master weights (which already keep every step)."""
    o = cfg.optim
    if o.update != "round":
        require(cfg.model.dtype == "bfloat16", "optim.update", f"round unless model.dtype=bfloat16 (got {cfg.model.dtype})",
                o.update)
        require(not o.master_weights, "optim.update", "round with optim.master_weights=true (the masters already "
                "keep every step)", o.update)


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 `x` -> bf16, rounded up or down at random so that E[result] = x.

    The low 16 bits of the fp32 pattern (what bf16 drops) plus a uniform 16-bit integer carry into
    bit 16 with probability low / 2^16, i.e. the distance to the lower bf16 neighbour over the ulp;
    then truncation. Works on the sign-magnitude pattern, so negative values round symmetrically.
    """
    if x.dtype != torch.float32:
        raise ValueError(f"x: expected float32, got {x.dtype}")
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32)
    # in place on the noise buffer: one int32 temporary per element; -65536 == 0xFFFF0000
    return noise.add_(x.contiguous().view(torch.int32)).bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)


def optimizer_class(name: str, device_type: str):
    """The optimizer class of `optim.optimizer=name` for parameters on `device_type` ("cpu" | "cuda")."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.optimizer: expected one of {OPTIMIZERS}, got {name!r}")
    if name == "adamw":
        return torch.optim.AdamW
    import bitsandbytes as bnb

    # Non-paged on every device: paged state lives in CUDA managed memory, which
    # torch.cuda.max_memory_allocated does not count (the measured peak would understate the run) and
    # which can oversubscribe a GPU shared with other jobs.
    return bnb.optim.AdamW8bit


class PolicyOptimizer:
    """The trainable parameters of `model`, their optional fp32 masters, and the optimizer that steps them.

    params: the trainable parameters (DTensor shards under FSDP2), in model order.
    master: fp32 copies of `params` when master weights are on, else None.
    proxies: with a compensated update, one fp32 parameter per entry of `params` that the optimizer
        steps (its state is keyed by them); each holds an empty tensor except during its own step.
    compensation: bf16 Kahan buffers (`optim.update=kahan`), one per parameter, else None.
    generator: the stochastic-rounding generator (`optim.update=stochastic_rounding`), else None.
    inner:  the torch / bitsandbytes optimizer (stepping `master`, `proxies` or `params`).
    """

    def __init__(self, model, optim_cfg, device: torch.device, *, seed: int = 0):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.update = optim_cfg.update
        if self.update not in UPDATES:
            raise ValueError(f"optim.update: expected one of {UPDATES}, got {self.update!r}")
        self.master = self.proxies = self.compensation = self.generator = None
        if optim_cfg.master_weights and any(p.dtype != torch.float32 for p in self.params):
            self.master = [torch.nn.Parameter(p.detach().float().clone()) for p in self.params]
        if self.update != "round":
            wrong = sorted({str(p.dtype) for p in self.params if p.dtype != torch.bfloat16})
            if wrong or self.master is not None:
                raise ValueError(f"optim.update={self.update}: expected bfloat16 trainable weights without master "
                                 f"weights, got {wrong or 'master weights'}")
            self.proxies = [torch.nn.Parameter(p.new_empty(0, dtype=torch.float32)) for p in self.params]
            if self.update == "kahan":
                self.compensation = [torch.zeros_like(p) for p in self.params]
            else:
                self.generator = torch.Generator(device=device).manual_seed(seeds.rounding(seed))
        cls = optimizer_class(optim_cfg.optimizer, device.type)
        self.inner = cls(self.master or self.proxies or self.params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas),
                         weight_decay=optim_cfg.weight_decay)

    def zero_grad(self) -> None:
        self.inner.zero_grad(set_to_none=True)
        for p in self.params:  # with masters or proxies the inner optimizer does not own these
            p.grad = None

    def clip_grad_norm(self, max_norm: float) -> float:
        """Global gradient norm before clipping (clipped to `max_norm` when it is > 0). Collective under FSDP."""
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        return float(distributed.full_tensor(norm))

    def step(self) -> None:
        if self.master is not None:
            self._master_step()
        elif self.proxies is not None:
            self._compensated_step()
        else:
            self.inner.step()

    @torch.no_grad()
    def _master_step(self) -> None:
        """Step the fp32 masters one parameter at a time (optimizers skip parameters without a gradient),
        so only one fp32 gradient exists at once; then round each into the model."""
        for p, m in zip(self.params, self.master):
            if p.grad is None:
                continue
            m.grad, p.grad = p.grad.float(), None
            self.inner.step()
            m.grad = None
            p.copy_(m)

    @torch.no_grad()
    def _compensated_step(self) -> None:
        """Step each parameter through its fp32 proxy: w = p (+ c with Kahan), the optimizer steps w in
        place, then w lands in bf16 (round to nearest + new residual c, or stochastic rounding)."""
        for i, (p, proxy) in enumerate(zip(self.params, self.proxies)):
            if p.grad is None:
                continue
            w = p.float()
            if self.compensation is not None:
                w.add_(self.compensation[i])  # the weight fp32 masters would hold, to ~16 significant bits
            proxy.data = w
            proxy.grad, p.grad = p.grad.float(), None
            self.inner.step()
            proxy.grad = None
            if self.compensation is not None:
                p.copy_(w)
                self.compensation[i].copy_(w.sub_(p))
            else:
                p.copy_(stochastic_round_bf16(w, self.generator))
            proxy.data = w.new_empty(0)

    def update_state(self) -> dict[str, torch.Tensor]:
        """What a compensated update carries between steps (saved with every checkpoint): {"kahan/<name>":
        compensation buffer} or {"stochastic_rounding/generator": generator state}; {} otherwise."""
        if self.compensation is not None:
            by_id = {id(p): c for p, c in zip(self.params, self.compensation)}
            return {f"kahan/{n}": by_id[id(p)] for n, p in self.model.named_parameters() if id(p) in by_id}
        if self.generator is not None:
            return {"stochastic_rounding/generator": self.generator.get_state()}
        return {}

    @torch.no_grad()
    def load_update_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore `update_state()` from a checkpoint; raises ValueError when its keys differ."""
        mine = self.update_state()
        if set(tensors) != set(mine):
            raise ValueError(f"update state: expected {len(mine)} tensors for optim.update={self.update}, "
                             f"got {len(tensors)} (missing {sorted(set(mine) - set(tensors))[:2]})")
        if self.generator is not None:
            self.generator.set_state(tensors["stochastic_rounding/generator"])
            return
        for key, buffer in mine.items():
            buffer.copy_(tensors[key])

    def master_state(self) -> dict[str, torch.Tensor] | None:
        """{parameter name: fp32 master} when master weights are on (saved with every checkpoint)."""
        if self.master is None:
            return None
        by_id = {id(p): m for p, m in zip(self.params, self.master)}
        return {n: by_id[id(p)] for n, p in self.model.named_parameters() if id(p) in by_id}
