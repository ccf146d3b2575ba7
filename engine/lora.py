"""LoRA adapters (peft) on Janus-Pro: what trains, how the fused losses see an adapted head, merging.

    counts = add_adapters(model, cfg.model.lora)        # base frozen; adapters fp32, trainable
    x, weight, bias = linear_operands(model.lm_head, h)  # F.linear(x, weight, bias) == lm_head(h)
    plain = merged_model(model)                          # a JanusForConditionalGeneration without adapters
    save_adapter(model, "out/adapter")                   # the adapters alone, as a peft adapter directory

Targets (`model.lora.targets`, names from `TARGETS`): the language model's attention projections
(q/k/v/o), its MLP projections (gate/up/down), the generation head (proj_out and vision_head) and,
optionally, the text head (lm_head). The base weights stay frozen in `model.dtype`, or in 4-bit
NF4 (bitsandbytes, CUDA only) for the language model's projections with `model.lora.quantize=nf4`
(`quantize_nf4`; the heads, embeddings, vision encoder and VQ model stay in `model.dtype`). Adapter
weights are fp32 (a few MB even for 7B), so lr 1e-6 steps are not lost to bf16 rounding.

The fused losses never build `[N, V]` logits; they take the head's input, weight and bias. A
LoRA-adapted head computes `W x + b + s B A drop(x)`; `linear_operands` writes that as one linear
layer with r extra input features, `[x, s A drop(x)] @ [W, B]^T + b`, exact and without forming
`W + s B A` (whose bf16 rounding would swallow small adapter updates), so the loss's gradient reaches
A and B through the same fused kernel as in full fine-tuning.
"""

from __future__ import annotations

import copy
import typing

import torch
import torch.nn.functional as F

from .config import DEFAULT_TRAIN_MODULES, LORA_DEFAULT_TARGETS, Config, LoraQuantize, LoraTarget, require
from .preflight import require_importable

ADAPTER = "default"
#: `model.lora.targets` (`config.LoraTarget`) -> regular expressions of the module names they adapt.
TARGETS = {
    "attention": r"model\.language_model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj",
    "mlp": r"model\.language_model\.layers\.\d+\.mlp\.(gate|up|down)_proj",
    "generation_head": r"model\.generation_head\.(proj_out|vision_head)",
    "lm_head": r"lm_head",
}
assert tuple(TARGETS) == typing.get_args(LoraTarget)
DEFAULT_TARGETS = LORA_DEFAULT_TARGETS
#: `model.lora.quantize`: the frozen base of the language model's projections.
QUANTIZE = typing.get_args(LoraQuantize)
#: Module names whose linear layers `quantize_nf4` turns into 4-bit ones.
QUANTIZED_PROJECTIONS = r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"


def target_pattern(targets) -> str:
    """One regular expression (peft matches it against the full module name) for `targets`."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"model.lora.targets: expected names from {tuple(TARGETS)}, got {list(targets)}")
    return "(" + "|".join(TARGETS[t] for t in targets) + ")"


def is_adapted(layer) -> bool:
    """True for a peft LoRA layer with an active, unmerged adapter."""
    return hasattr(layer, "lora_A") and ADAPTER in layer.lora_A and not layer.merged


def add_adapters(model, lora_cfg) -> dict[str, int]:
    """Freeze `model` and inject LoRA adapters (rank, alpha, dropout, targets of `lora_cfg`) in place.

    Adapter weights become fp32 and trainable: A ~ kaiming-uniform, B = 0, so the adapted model starts
    equal to the base. Returns {"adapters": trainable parameter count, "base": frozen count}.
    """
    import peft

    config = peft.LoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                             target_modules=target_pattern(lora_cfg.targets), bias="none")
    model.requires_grad_(False)
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    adapters = 0
    for name, p in model.named_parameters():
        is_lora = ".lora_A." in name or ".lora_B." in name
        if is_lora:
            p.data = p.data.float()
            adapters += p.numel()
        p.requires_grad_(is_lora)
    if adapters == 0:
        raise ValueError(f"model.lora.targets: {list(lora_cfg.targets)} matched no linear layer of the model")
    return {"adapters": adapters, "base": sum(p.numel() for p in model.parameters()) - adapters}


def linear_operands(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x', weight, bias) with `F.linear(x', weight, bias)` equal to `layer(x)`.

    x: [..., H] in the layer's dtype. A plain `nn.Linear` gives (x, W [V, H], b). A LoRA-adapted one
    gives x' = [x, s A drop(x)]: [..., H + r] and weight [W, B]: [V, H + r] in x's dtype, b unchanged.
    """
    if not is_adapted(layer):
        return x, layer.weight, layer.bias
    base = layer.get_base_layer()
    a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    z = F.linear(layer.lora_dropout[ADAPTER](x).to(a.dtype), a) * layer.scaling[ADAPTER]
    return torch.cat([x, z.to(x.dtype)], -1), torch.cat([base.weight, b.to(base.weight.dtype)], 1), base.bias


def adapter_state(model) -> dict[str, torch.Tensor]:
    """{parameter name: tensor} of every LoRA weight (names as in `model.named_parameters()`)."""
    return {n: p.detach() for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


#: Prefix of the parameter names in a peft adapter file: what `peft.PeftModel` puts before the model's own names.
PEFT_PREFIX = "base_model.model."
#: The weights file of a peft adapter folder.
ADAPTER_FILE = "adapter_model.safetensors"


def adapter_file_weights(file):
    """(parameter name as in an adapted model's `named_parameters()`, tensor) of every weight in a peft adapter
    file: `base_model.model.X.lora_A.weight` -> `X.lora_A.default.weight`."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as fh:
        for name in fh.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
            inner = name.removeprefix(PEFT_PREFIX)
            module, _, param = inner.rpartition(".")
            yield f"{module}.{ADAPTER}.{param}", fh.get_tensor(name)


def write_adapter(model, folder, *, base_model: str | None = None) -> None:
    """Write the adapters of `model` into the existing `folder` as `peft.PeftModel.save_pretrained` would:
    adapter_model.safetensors (names `PEFT_PREFIX` + module + `.lora_A.weight`, fp32) and adapter_config.json
    (base_model_name_or_path: `base_model`). `peft.PeftModel.from_pretrained(base, folder)` loads them."""
    import json
    from pathlib import Path

    import peft
    from safetensors.torch import save_file

    if not hasattr(model, "peft_config"):
        raise ValueError("save_adapter: the model carries no LoRA adapter (model.lora.rank is 0)")
    # save_embedding_layers off: with lm_head among the targets peft would also save the frozen head itself
    state = peft.get_peft_model_state_dict(model, adapter_name=ADAPTER, save_embedding_layers=False)
    tensors = {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in state.items()}
    config = model.peft_config[ADAPTER].to_dict()
    config["target_modules"] = config["target_modules"] if isinstance(config["target_modules"], str) else \
        sorted(config["target_modules"])
    config["base_model_name_or_path"] = base_model
    folder = Path(folder)
    save_file(tensors, str(folder / ADAPTER_FILE))
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=1, default=str))


def save_adapter(model, out_dir, *, base_model: str | None = None) -> None:
    """Write the adapters alone as a peft adapter directory (`write_adapter`), loadable with
    `peft.PeftModel.from_pretrained(base, out_dir)`; atomic: a folder beside `out_dir` renamed into place."""
    from .files import staged_folder

    if not hasattr(model, "peft_config"):
        raise ValueError("save_adapter: the model carries no LoRA adapter (model.lora.rank is 0)")
    with staged_folder(out_dir, overwrite=True) as stage:
        write_adapter(model, stage, base_model=base_model)


def _dense_weight(base) -> torch.Tensor:
    """The weight of `base` as a dense tensor (a 4-bit layer's is dequantized)."""
    weight = base.weight
    if getattr(weight, "quant_state", None) is not None:
        import bitsandbytes as bnb

        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # a CPU forward in eval mode repacked it for bitsandbytes' bf16 kernel; undone as bitsandbytes'
            # own state_dict does (its absmax has been rounded to bf16 by then)
            data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data, state)
        return bnb.functional.dequantize_4bit(data, state)
    return weight.detach()


@torch.no_grad()
def merged_model(model, dtype: torch.dtype | None = None, *, inplace: bool = False):
    """A copy of `model` with every adapter merged (`W + s B A`, added in fp32, stored in `dtype`, default
    the base weight's dtype; a 4-bit base is dequantized first): plain `nn.Linear` layers only, so it
    saves as an ordinary Hugging Face `JanusForConditionalGeneration`. `model` is left unchanged, unless
    `inplace` (no copy: what an export of a 7B model on CPU can afford), when it is the one returned."""
    merged = model if inplace else copy.deepcopy(model)
    for name, layer in list(merged.named_modules()):
        if not is_adapted(layer):
            continue
        base = layer.get_base_layer()
        weight = _dense_weight(base)
        out_dtype = dtype or (weight.dtype if weight.is_floating_point() else torch.bfloat16)
        delta = layer.lora_B[ADAPTER].weight.float() @ layer.lora_A[ADAPTER].weight.float() * layer.scaling[ADAPTER]
        plain = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                                device=weight.device, dtype=out_dtype)
        plain.weight.copy_(weight.float() + delta)
        if base.bias is not None:
            plain.bias.copy_(base.bias)
        parent, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent) if parent else merged, child, plain)
    if hasattr(merged, "peft_config"):
        del merged.peft_config
    return merged.requires_grad_(False)


def quantize_nf4(model, device: torch.device):
    """Replace the language model's projections (`QUANTIZED_PROJECTIONS`) with bitsandbytes 4-bit NF4
    layers (compute dtype: the model's), then move the model to `device` (CUDA), which quantizes them."""
    if device.type != "cuda":
        raise ValueError(f"model.lora.quantize=nf4: needs a CUDA device, got {device}")
    return nf4_layers(model).to(device)


def nf4_layers(model):
    """`model` with its language model's projections replaced in place by bitsandbytes `Linear4bit` (NF4)
    layers holding the same weights, not yet quantized (that happens on the move to CUDA)."""
    import re

    import bitsandbytes as bnb

    pattern = re.compile(QUANTIZED_PROJECTIONS + "$")
    for name, layer in list(model.named_modules()):
        if not (pattern.match(name) and isinstance(layer, torch.nn.Linear)):
            continue
        q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                              compute_dtype=layer.weight.dtype, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(layer.weight.data, requires_grad=False, quant_type="nf4")  # quantized by .to(cuda)
        if layer.bias is not None:
            q.bias = torch.nn.Parameter(layer.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    model.is_loaded_in_4bit = True  # peft then wraps these layers with its bitsandbytes LoRA layer
    return model


def check_config(cfg: Config, world: int | None) -> None:
    """`model.lora.*` and the keys it constrains: ranges, the default train_modules, a single process (`world`:
    torchrun's process count, None outside it), round updates, a bf16/fp16 base under NF4."""
    lo = cfg.model.lora
    require(lo.rank >= 0, "model.lora.rank", "an integer >= 0 (0: no LoRA)", lo.rank)
    require(lo.alpha > 0, "model.lora.alpha", "a number > 0", lo.alpha)
    require(0 <= lo.dropout < 1, "model.lora.dropout", "a number in [0, 1)", lo.dropout)
    require(bool(lo.targets) and len(set(lo.targets)) == len(lo.targets), "model.lora.targets",
            f"distinct names from {tuple(TARGETS)}", lo.targets)
    if lo.rank == 0:
        require(lo.quantize == "none", "model.lora.quantize", "none while model.lora.rank is 0 (a 4-bit base cannot "
                "be fully fine-tuned)", lo.quantize)
        return
    require(sorted(cfg.model.train_modules) == sorted(DEFAULT_TRAIN_MODULES), "model.train_modules",
            "the default with model.lora.rank > 0 (only the adapters train; choose them with model.lora.targets)",
            cfg.model.train_modules)
    require(world is None, "model.lora.rank", "0 under torchrun (LoRA runs in a single process)", lo.rank)
    require(cfg.optim.update == "round", "optim.update", "round with LoRA (the adapters are fp32)", cfg.optim.update)
    if lo.quantize == "nf4":
        require(cfg.model.dtype != "float32", "model.dtype", "bfloat16 or float16 with model.lora.quantize=nf4 "
                "(the 4-bit layers compute in model.dtype)", cfg.model.dtype)


def check_environment(cfg: Config) -> None:
    """What a LoRA run needs of this machine: peft, and for NF4 bitsandbytes and a CUDA device."""
    lo = cfg.model.lora
    if lo.rank == 0:
        return
    if lo.quantize == "nf4":
        device = cfg.train.device
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        require(cuda, "model.lora.quantize", f"none on {device if device != 'auto' else 'a machine without CUDA'} "
                "(bitsandbytes NF4 runs on CUDA only; use quantize=none for a frozen model.dtype base)", lo.quantize)
        require_importable("model.lora.quantize", "nf4", "bitsandbytes", "pip install bitsandbytes")
    require_importable("model.lora.rank", str(lo.rank), "peft", "pip install peft")
