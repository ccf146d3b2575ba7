"""LoRA adapters on the DiMOO network (`DimooModel`): what trains, how the head's rows see the adapter, merging.

    model = apply_lora(DimooModel.from_pretrained(path, dtype="bfloat16"), rank=64, alpha=16.0,
                       targets=("attention", "mlp", "generation_head"))   # base frozen, adapters fp32, trainable
    opt = torch.optim.AdamW([p for _, p in trainable_parameters(model)], lr=1e-5)
    W = model.head_weight(model.ids.image_slice)   # [8192, H] = W[slice] + (alpha / rank) B[slice] @ A
    tensors = adapter_state(model)                 # {"model.transformer.blocks.0.q_proj.lora_A.weight": [r, H], ...}
    load_adapter_state(other, tensors)             # into another apply_lora model of the same shapes
    merged_model(model).save_pretrained("out/dimoo-merged")   # a plain DimooModel under the released names

An adapted linear layer [out, in] computes y = x W^T + s (drop(x) A^T) B^T with A [r, in], B [out, r] and
s = alpha / r (the LoRA of Hu et al. 2021, as peft's `LoraLayer`); A is kaiming-uniform (nn.Linear's init),
B = 0, so an adapted model starts equal to its base. The layers are replaced by `LoraLinear`, an `nn.Linear`
that keeps the frozen base weight under its own name, so every released parameter name of the base stays
in the state dict (`model.transformer.blocks.{i}.q_proj.weight`) and the adapters sit beside it
(`...q_proj.lora_A.weight`, `...q_proj.lora_B.weight`). peft is not used (it is not a dependency of the DiMOO
path; its names would move the base to `...q_proj.base_layer.weight`).

Targets (`TARGETS`, the names of `engine.lora` / `config.LoraTarget`), per transformer block i:
- "attention": q_proj, k_proj, v_proj, attn_out;
- "mlp": the SwiGLU ff_proj (gate), up_proj, ff_out (down);
- "generation_head" and "lm_head": DiMOO has one untied output projection `model.transformer.ff_out` [V, H]
  (text ids and the 8192 image codes alike); either name (or both) adapts it. The losses never call it as a
  module: they read `model.head_weight(slice)` and fuse it with the hidden states, so an adapted head is a
  weight-space delta: `head_weight(slice)` returns W[slice] + s B[slice] @ A (computed in the adapters' dtype,
  cast to the base's), and the head's adapter applies no dropout. `apply_lora` makes the model a
  `LoraDimooModel` (a DimooModel subclass, no state of its own) whose `head_weight` does that.

Dtypes: adapters are fp32 for a bf16/fp16/fp32 base (so small lr steps are not lost to bf16 rounding), fp64 for an
fp64 base; adapted outputs are cast back to the layer input's dtype. `quantize`: "none" only; "nf4" (a 4-bit
bitsandbytes base, CUDA only) is refused here in one line. Checkpoints: `model.save_pretrained` of an adapted
model writes the base and the adapters under the names above (what engine/dimoo/run.py saves and restores by
name); a release is `merged_model(model).save_pretrained(...)`.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .model import DimooModel

log = logging.getLogger("pairuni.dimoo")

#: target name -> regular expression (full match) of the module names it adapts
TARGETS = {
    "attention": r"model\.transformer\.blocks\.\d+\.(q_proj|k_proj|v_proj|attn_out)",
    "mlp": r"model\.transformer\.blocks\.\d+\.(ff_proj|up_proj|ff_out)",
    "generation_head": r"model\.transformer\.ff_out",
    "lm_head": r"model\.transformer\.ff_out",
}
DEFAULT_TARGETS = ("attention", "mlp")
HEAD = "model.transformer.ff_out"
QUANTIZE = ("none", "nf4")


# ----------------------------------------------------------------------------- the adapted layer
class LoraLinear(nn.Linear):
    """An `nn.Linear` [out, in] with a LoRA adapter: y = x W^T + b + s (drop(x) A^T) B^T, s = alpha / rank.

    `weight` (and `bias`) are the base layer's own Parameters (frozen by `apply_lora`), under the same names;
    `lora_A.weight` [rank, in] and `lora_B.weight` [out, rank] are in `adapter_dtype`; `lora_dropout` is
    nn.Dropout(dropout) (nn.Identity for 0), active in train mode only."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 adapter_dtype: torch.dtype | None = None):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        dtype = adapter_dtype or torch.promote_types(base.weight.dtype, torch.float32)
        device = base.weight.device
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=dtype)  # kaiming-uniform
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=dtype)
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.train(base.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in the base's output dtype."""
        out = F.linear(x, self.weight, self.bias)
        a = self.lora_A.weight
        z = F.linear(F.linear(self.lora_dropout(x).to(a.dtype), a), self.lora_B.weight)
        return out + (z * self.scaling).to(out.dtype)

    def delta(self, rows: slice | None = None) -> torch.Tensor:
        """(B @ A) * s: [out, in] (or the rows `rows` of it, from B[rows]) in the adapters' dtype."""
        b = self.lora_B.weight if rows is None else self.lora_B.weight[rows]
        return (b @ self.lora_A.weight) * self.scaling

    def adapted_weight(self, rows: slice | None = None) -> torch.Tensor:
        """W + (B @ A) * s: [out, in] (or rows `rows`), summed in the adapters' dtype, cast to W's dtype.
        Differentiable in A and B (the head's losses use it); dropout is not applied."""
        w = self.weight if rows is None else self.weight[rows]
        d = self.delta(rows)
        return (w.to(d.dtype) + d).to(w.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


class LoraDimooModel(DimooModel):
    """A DimooModel carrying LoRA adapters (`apply_lora` sets this class on the model; no state of its own).
    Only `head_weight` differs: an adapted head returns its adapted rows, so `logits`, `forward` and the fused
    losses (which all read `head_weight`) see the adapter."""

    def head_weight(self, vocab: slice | None = None) -> torch.Tensor:
        """[V, H] (or rows `vocab`) of the output projection: W[vocab] + s B[vocab] @ A when the head is adapted."""
        head = self.model.transformer.ff_out
        if isinstance(head, LoraLinear):
            return head.adapted_weight(vocab)
        return super().head_weight(vocab)


# ----------------------------------------------------------------------------- checks
def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_arguments(rank, alpha, dropout, targets, quantize) -> tuple[str, ...]:
    """One-line ValueErrors naming the bad argument; returns the targets as a tuple."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: expected an integer >= 1, got {rank!r}")
    if not _is_number(alpha) or alpha <= 0:
        raise ValueError(f"alpha: expected a finite number > 0, got {alpha!r}")
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise ValueError(f"dropout: expected a number in [0, 1), got {dropout!r}")
    if isinstance(targets, str) or not hasattr(targets, "__iter__"):
        raise ValueError(f"targets: expected a sequence of names from {tuple(TARGETS)}, got {targets!r}")
    targets = tuple(targets)
    if not targets or any(t not in TARGETS for t in targets) or len(set(targets)) != len(targets):
        raise ValueError(f"targets: expected distinct names from {tuple(TARGETS)}, got {list(targets)}")
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize: expected one of {QUANTIZE}, got {quantize!r}")
    return targets


def _require_model(model) -> None:
    if not isinstance(model, DimooModel):
        raise ValueError(f"model: expected a DimooModel, got {type(model).__name__}")


# ----------------------------------------------------------------------------- the API
def apply_lora(model: DimooModel, *, rank: int, alpha: float = 16.0, dropout: float = 0.0,
               targets=DEFAULT_TARGETS, quantize: str = "none") -> DimooModel:
    """Freeze every parameter of `model` and add trainable LoRA adapters (A [rank, in], B [out, rank], B = 0) to
    the linear layers of `targets` (`TARGETS`) in every block; in place, and returned (as a `LoraDimooModel`).

    rank >= 1; alpha > 0 (scale s = alpha / rank); dropout in [0, 1) on the adapters' input (not on the head's);
    quantize: "none" ("nf4" is refused). The model keeps its train/eval mode; the adapters follow it."""
    _require_model(model)
    targets = check_arguments(rank, alpha, dropout, targets, quantize)
    if quantize == "nf4":
        device = model.model.transformer.wte.weight.device
        if device.type != "cuda":
            raise ValueError(f"quantize: nf4 needs a CUDA model and bitsandbytes, the model is on {device}; "
                             "use quantize='none'")
        raise ValueError("quantize: nf4 is not implemented for DiMOO (engine/dimoo/lora.py); use quantize='none'")
    if has_adapters(model):
        raise ValueError("model: already carries LoRA adapters (apply_lora once; merged_model to fold them in)")
    if type(model) is not DimooModel:
        raise ValueError(f"model: expected a plain DimooModel, got {type(model).__name__}")
    pattern = re.compile("|".join(f"(?:{TARGETS[t]})" for t in targets))
    model.requires_grad_(False)
    adapted = []
    for name, layer in list(model.named_modules()):
        if not (pattern.fullmatch(name) and isinstance(layer, nn.Linear)):
            continue
        lora = LoraLinear(layer, rank, alpha, 0.0 if name == HEAD else dropout)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, lora)
        adapted.append(name)
    if not adapted:  # unreachable for a DimooModel; kept so a renamed module cannot go silently unadapted
        raise ValueError(f"targets: {list(targets)} matched no linear layer of the model")
    model.__class__ = LoraDimooModel
    n = sum(p.numel() for _, p in trainable_parameters(model))
    log.info("LoRA r=%d alpha=%g on %d layers (%s): %d trainable parameters", rank, alpha, len(adapted),
             "/".join(targets), n)
    return model


def has_adapters(model) -> bool:
    """True when some layer of `model` is a `LoraLinear`."""
    return any(isinstance(m, LoraLinear) for m in model.modules())


def lora_layers(model) -> list[tuple[str, LoraLinear]]:
    """(module name, layer) of every adapted layer, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


def trainable_parameters(model) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter that requires grad: after `apply_lora`, exactly the adapters."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _adapter_parameters(model) -> dict[str, nn.Parameter]:
    out = {}
    for name, layer in lora_layers(model):
        out[f"{name}.lora_A.weight"] = layer.lora_A.weight
        out[f"{name}.lora_B.weight"] = layer.lora_B.weight
    return out


def adapter_state(model) -> dict[str, torch.Tensor]:
    """{name: tensor} of the adapters only (a LoRA checkpoint), names as in `model.state_dict()`:
    `<layer>.lora_A.weight` [r, in], `<layer>.lora_B.weight` [out, r]; detached copies."""
    return {n: p.detach().clone() for n, p in _adapter_parameters(model).items()}


@torch.no_grad()
def load_adapter_state(model, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy `tensors` (an `adapter_state`) into the adapters of `model` exactly. The names must be the model's
    adapter names, each tensor of the same shape and dtype; otherwise a one-line ValueError, model unchanged."""
    mine = _adapter_parameters(model)
    if not mine:
        raise ValueError("model: carries no LoRA adapters (apply_lora first)")
    if not isinstance(tensors, Mapping):
        raise ValueError(f"tensors: expected a mapping name -> tensor, got {type(tensors).__name__}")
    missing, unexpected = sorted(set(mine) - set(tensors)), sorted(set(tensors) - set(mine))
    if missing or unexpected:
        raise ValueError(f"tensors: adapter names differ from the model's: missing {missing[:3]} ({len(missing)}), "
                         f"unexpected {unexpected[:3]} ({len(unexpected)})")
    for name, p in mine.items():
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"tensors: {name} is a {type(t).__name__}, not a tensor")
        if t.shape != p.shape or t.dtype != p.dtype:
            raise ValueError(f"tensors: {name} is {t.dtype} {tuple(t.shape)}, the model's adapter is "
                             f"{p.dtype} {tuple(p.shape)} (another rank or dtype?)")
    for name, p in mine.items():
        p.copy_(tensors[name])


@torch.no_grad()
def merged_model(model: DimooModel, *, inplace: bool = False) -> DimooModel:
    """A plain DimooModel (same config, attn_backend, dtype, device, train mode; parameters frozen) whose adapted
    weights are W + (B @ A) * s (summed in the adapters' dtype, stored in W's), so its state dict holds exactly
    the released names and `save_pretrained` exports it. `model` is left unchanged unless `inplace` (no copy
    of the other weights: for an 8B model on a tight host), when `model` itself is turned into it and returned."""
    _require_model(model)
    if inplace:
        for name, layer in lora_layers(model):
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            plain.weight = nn.Parameter(layer.adapted_weight(), requires_grad=False)
            plain.bias = layer.bias
            plain.train(layer.training)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, plain)
        model.__class__ = DimooModel
        return model.requires_grad_(False)
    adapter_names = set(_adapter_parameters(model))
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in adapter_names}
    for name, layer in lora_layers(model):
        state[f"{name}.weight"] = layer.adapted_weight().detach()
    with torch.device("meta"):
        plain = DimooModel(model.config, attn_backend=model.attn_backend)
    plain.load_state_dict(state, strict=True, assign=True)
    plain.gradient_checkpointing = model.gradient_checkpointing
    plain.train(model.training)
    return plain.requires_grad_(False)


__all__ = ["DEFAULT_TARGETS", "TARGETS", "LoraDimooModel", "LoraLinear", "adapter_state", "apply_lora",
           "check_arguments", "has_adapters", "load_adapter_state", "lora_layers", "merged_model",
           "trainable_parameters"]
