"""The optimizer of the trainable weights, with optional fp32 master weights.

    optimizer = PolicyOptimizer(model, cfg.optim, device)
    optimizer.zero_grad(); loss.backward()
    grad_norm = optimizer.clip_grad_norm(cfg.optim.max_grad_norm)
    optimizer.step()

- `adamw8bit`: bitsandbytes' 8-bit AdamW (state ~2 bytes per parameter instead of 8), the
  setting that fits Janus-Pro-7B on one GPU; non-paged, so its state is ordinary device memory.
- `adamw`: torch's (fp32 state; the choice under torchrun, where FSDP2's DTensor parameters are
  sharded and bitsandbytes cannot step them).
- Master weights (`optim.master_weights` with bf16/fp16 weights): the optimizer steps fp32
  copies and rounds them into the model. With bf16 weights and lr 1e-6 most AdamW steps are
  below half a bf16 ulp and vanish; the fp32 copy keeps them.
"""

from __future__ import annotations

import torch

from . import distributed

OPTIMIZERS = ("adamw8bit", "adamw")


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
    inner:  the torch / bitsandbytes optimizer (stepping `master` when it exists, else `params`).
    """

    def __init__(self, model, optim_cfg, device: torch.device):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = None
        if optim_cfg.master_weights and any(p.dtype != torch.float32 for p in self.params):
            self.master = [torch.nn.Parameter(p.detach().float().clone()) for p in self.params]
        cls = optimizer_class(optim_cfg.optimizer, device.type)
        self.inner = cls(self.master or self.params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas),
                         weight_decay=optim_cfg.weight_decay)

    def zero_grad(self) -> None:
        self.inner.zero_grad(set_to_none=True)

    def clip_grad_norm(self, max_norm: float) -> float:
        """Global gradient norm before clipping (clipped to `max_norm` when it is > 0). Collective under FSDP."""
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        return float(distributed.full_tensor(norm))

    def step(self) -> None:
        if self.master is None:
            self.inner.step()
        else:
            self._master_step()

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

    def master_state(self) -> dict[str, torch.Tensor] | None:
        """{parameter name: fp32 master} when master weights are on (saved with every checkpoint)."""
        if self.master is None:
            return None
        by_id = {id(p): m for p, m in zip(self.params, self.master)}
        return {n: by_id[id(p)] for n, p in self.model.named_parameters() if id(p) in by_id}
