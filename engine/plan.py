"""`pairuni plan`: per-GPU memory estimate of a PairGRPO run before renting the GPUs.

    pairuni plan --model janus-pro-7b --gpus 1 --group-size 4 --pairs-per-gpu 1
    pairuni plan --config configs/janus_pro_1b.yaml [--gpus N] [--model NAME]   # the run's own sizes

Terms (bytes per GPU; FSDP shards weights, gradients and optimizer state over the GPUs):
  weights      every parameter in `param_dtype` (frozen vision encoder and VQ included)
  grads        trainable parameters in `param_dtype`
  optimizer    AdamW8bit: two 8-bit moments + one fp32 absmax per 2048-value block;
               AdamW: two moments in the dtype of the tensors it steps (`optimizer_state_bytes`):
               the weights' own (bf16: 4 bytes per parameter), or fp32 (8) for master weights,
               the fp32 copies of a compensated update and LoRA's fp32 adapters
  master       optional fp32 master copy of the trainable weights. With bf16 weights and the
               paper's lr of 1e-6 most updates are below half a bf16 ulp and vanish; the
               master copy (or stochastic rounding) is what keeps them. It is the term that
               decides whether 7B fits on one 80 GB GPU, so it is shown separately.
  compensation `optim.update=kahan`: a bf16 compensation buffer per trained parameter (2 bytes);
               stochastic rounding needs none. Either steps one parameter at a time through a
               transient fp32 copy, as master weights do.
  step         the optimizer step's transient memory beside the gradients: with master weights the
               largest parameter's fp32 gradient (4 bytes per element), with kahan its fp32 copy and
               gradient (8), with stochastic rounding also the noise and result (14); the peak counts
               it where activations would be, whichever is larger
  LoRA         (`--lora-rank r`, `model.lora`) the base is frozen: `weights` holds it in `param_dtype`,
               or the language model's projections in NF4 (`--lora-quantize nf4`: 4 bits + one 8-bit
               absmax per 64 weights + one fp32 per 256 absmaxes), plus the fp32 adapters
               r x (in + out) per adapted linear layer; `grads` and `optimizer` cover the adapters
               only. `head_copy`: an adapted head enters the fused loss as one [V, H + r] weight
               (`engine.lora.linear_operands`), built per task and its gradient beside it.
  activations  per micro-batch of `micro_batch` sequences of S tokens through L LLaMA blocks
               (hidden H, MLP width I, in `param_dtype`, the compute dtype): without
               checkpointing every block keeps about 10 [S, H] and 4 [S, I] tensors for
               backward; with checkpointing only each block's input is kept and one block is
               recomputed at a time. S is the longest update sequence (an understanding prompt
               with its image tokens plus the answer); the sum with `grads` assumes that task
               has more than one micro-batch, so gradients already exist while it runs
  fsdp_gather  with FSDP, the unsharded parameters of the block being computed and the next
  loss         fused linear loss chunk: `loss_chunk_rows` x vocabulary logits in fp32, twice
  rollout_gather  with FSDP, rollouts gather every parameter once and keep them gathered for
               the whole decode loop (no collective per token; engine/distributed.py `unsharded`):
               the parameters this GPU does not own, in `param_dtype`
  kv_cache     image rollouts: K and V of every layer for the 2 x rows [cond; uncond] rows decoded
               at once (G per pair on this GPU, at most `rollout.max_batch`), over prompt + 576
               positions (text rollouts are smaller)
  reward_models  reward models resident beside the policy (CLIP ViT-L/14 ~428 M, HPSv2's
               ViT-H/14 ~986 M parameters, loaded in fp32)
Checked against the measured peak of the engine's update step on a scaled-down model on CPU
(tests/engine/test_plan_measured.py, within 20%). The peak is the larger of the rollout phase
(weights + optimizer + master + rollout gather + KV cache) and the update phase
(weights + grads + optimizer + master + activations + gather + loss).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .cli import user_error
from .janus_shapes import IMAGE_CODEBOOK, IMAGE_TOKENS, MODEL_NAMES, janus_pro_config, linear_shapes, parameter_counts
from .lora import DEFAULT_TARGETS as LORA_DEFAULT_TARGETS
from .lora import QUANTIZE as LORA_QUANTIZE
from .lora import QUANTIZED_PROJECTIONS, target_pattern
from .optim import UPDATES

GiB = 2**30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
FROZEN_BY_DEFAULT = ("vision_model", "vqmodel")
OPTIMIZERS = ("adamw8bit", "adamw")
#: bytes per NF4 weight: 4 bits, an 8-bit absmax per 64-weight block, an fp32 scale per 256 absmaxes
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
#: heads whose LoRA-adapted weight the fused loss receives as one [V, H + r] tensor
ADAPTED_HEADS = ("lm_head", "model.generation_head.vision_head")
# Parameters of the reward models a run keeps resident (approximate sizes of the public checkpoints).
REWARD_MODEL_PARAMS = {"clip": 428_000_000, "hpsv2": 986_000_000}
# language-model hidden size -> preset, to recognise a downloaded Janus-Pro folder
PRESET_BY_HIDDEN = {2048: "janus-pro-1b", 4096: "janus-pro-7b"}


@dataclass
class PlanConfig:
    """What the estimate depends on."""

    model: str = "janus-pro-7b"
    """janus-pro-1b | janus-pro-7b (exact shapes via engine.janus_shapes)."""
    gpus: int = 1
    """Data-parallel GPUs; > 1 shards weights, grads and optimizer state with FSDP2."""
    group_size: int = 4
    """G rollouts per task of a pair."""
    pairs_per_gpu: int = 1
    """Pairs rolled out and updated on each GPU per step."""
    prompt_tokens: int = 64
    """Text tokens of a generation prompt / question (without image tokens)."""
    answer_tokens: int = 256
    """Maximum new tokens of an understanding answer."""
    micro_batch: int = 1
    """Sequences per forward/backward in the update."""
    gradient_checkpointing: bool = True
    optimizer: str = "adamw8bit"
    master_weights: bool = False
    """Keep an fp32 master copy of the trainable weights (see module docstring)."""
    update: str = "round"
    """`optim.update`: round | kahan (+2 bytes per trained parameter) | stochastic_rounding."""
    lora_rank: int = 0
    """LoRA rank (0: full fine-tuning of the default train modules)."""
    lora_targets: tuple[str, ...] = LORA_DEFAULT_TARGETS
    """`model.lora.targets`."""
    lora_quantize: str = "none"
    """`model.lora.quantize`: none | nf4 (the language model's projections in 4 bits)."""
    param_dtype: str = "bfloat16"
    loss_chunk_rows: int = 1024
    """Rows of the fused linear loss computed at once."""
    rollout_batch: int = 0
    """Rollout rows decoded at once (`rollout.max_batch`; 0: all G x pairs_per_gpu rows)."""
    reward_params: int = 0
    """Parameters of resident reward models (fp32)."""

    def validate(self) -> None:
        if self.model not in MODEL_NAMES:
            raise ValueError(f"model: expected one of {MODEL_NAMES}, got {self.model!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.param_dtype not in DTYPE_BYTES:
            raise ValueError(f"param_dtype: expected one of {tuple(DTYPE_BYTES)}, got {self.param_dtype!r}")
        for name in ("gpus", "group_size", "pairs_per_gpu", "micro_batch", "loss_chunk_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.update not in UPDATES:
            raise ValueError(f"update: expected one of {UPDATES}, got {self.update!r}")
        if self.lora_quantize not in LORA_QUANTIZE:
            raise ValueError(f"lora_quantize: expected one of {LORA_QUANTIZE}, got {self.lora_quantize!r}")
        if self.lora_quantize != "none" and self.lora_rank == 0:
            raise ValueError("lora_quantize: a quantized base needs lora_rank > 0")
        if self.gpus > 1 and (self.lora_rank or self.update != "round"):
            raise ValueError("gpus: LoRA and compensated updates run in a single process (gpus=1)")
        if self.update != "round" and (self.lora_rank or self.master_weights):
            raise ValueError("update: a compensated update is for full fine-tuning without master weights")
        target_pattern(self.lora_targets)
        for name in ("rollout_batch", "reward_params", "lora_rank"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")


def preset_of(model_path: str | Path) -> str:
    """The preset (janus-pro-1b | -7b) whose shapes a local Janus folder has, read off its config.json."""
    config = Path(model_path) / "config.json"
    try:
        hidden = json.loads(config.read_text())["text_config"]["hidden_size"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"model.path: cannot read the language model's hidden size from {config} ({err}); "
                         f"pass --model {'|'.join(MODEL_NAMES)}") from None
    if hidden not in PRESET_BY_HIDDEN:
        raise ValueError(f"model.path: hidden size {hidden} in {config} is not a Janus-Pro preset "
                         f"({PRESET_BY_HIDDEN}); pass --model")
    return PRESET_BY_HIDDEN[hidden]


def plan_of_run(run, *, gpus: int = 1, model: str | None = None) -> PlanConfig:
    """The PlanConfig of an `engine.config.Config`: its group size, pairs per step over `gpus`, answer
    length, micro-batch, rollout chunking, dtypes, optimizer, checkpointing and reward models.

    model: the preset; by default read off `run.model.path` (which must then exist)."""
    if model is None:
        if run.model.path is None:
            raise ValueError("model.path: null is the tiny demo model, not a Janus-Pro preset; pass --model")
        model = preset_of(run.model.path)
    dtype = run.model.dtype if gpus == 1 else (run.distributed.param_dtype or run.model.dtype)
    return PlanConfig(
        model=model, gpus=gpus, group_size=run.rollout.group_size,
        pairs_per_gpu=math.ceil(run.data.pairs_per_step / gpus), answer_tokens=run.rollout.max_new_tokens,
        micro_batch=run.optim.micro_batch_size, gradient_checkpointing=run.model.gradient_checkpointing,
        optimizer=run.optim.optimizer, param_dtype=dtype,
        # under FSDP, fp32 shards computed in a lower dtype are the master weights
        master_weights=run.optim.master_weights or (gpus > 1 and run.model.dtype == "float32" and dtype != "float32"),
        update=run.optim.update, lora_rank=run.model.lora.rank, lora_targets=tuple(run.model.lora.targets),
        lora_quantize=run.model.lora.quantize,
        rollout_batch=run.rollout.max_batch,
        reward_params=sum(REWARD_MODEL_PARAMS.get(name, 0) for name in (run.reward.understanding, run.reward.generation)))


def optimizer_state_bytes(cfg: PlanConfig) -> float:
    """Optimizer state per trained parameter. AdamW8bit: two 8-bit moments and an fp32 absmax per
    2048 values. torch's AdamW: `exp_avg` and `exp_avg_sq` are `zeros_like` the tensor it steps (see
    engine.optim.PolicyOptimizer): the fp32 masters, a compensated update's fp32 proxy, the fp32 LoRA
    adapters, or else the weights themselves in `param_dtype`."""
    if cfg.optimizer == "adamw8bit":
        return 2 + 8 / 2048
    stepped_fp32 = cfg.master_weights or cfg.lora_rank > 0 or cfg.update != "round"
    return 2 * (4 if stepped_fp32 else DTYPE_BYTES[cfg.param_dtype])


def estimate(cfg: PlanConfig, *, counts: dict[str, int] | None = None, text: dict | None = None,
             linears: dict[str, tuple[int, int]] | None = None) -> dict[str, float]:
    """Bytes per GPU for each term, plus `rollout_peak`, `update_peak` and `peak` (all in bytes).

    `counts` / `text` / `linears` override the parameter counts, language-model shape and linear
    layers' (in, out) (the tests use a scaled-down model); by default they come from the exact
    Janus-Pro config of `cfg.model`.
    """
    cfg.validate()
    if counts is None or text is None or (linears is None and cfg.lora_rank):
        config = janus_pro_config(cfg.model)
        counts = counts or parameter_counts(config)
        linears = linears or linear_shapes(config)
        t = config.text_config
        text = text or dict(hidden=t.hidden_size, layers=t.num_hidden_layers, intermediate=t.intermediate_size,
                            kv_heads=t.num_key_value_heads, heads=t.num_attention_heads,
                            vocab=t.vocab_size, codebook=IMAGE_CODEBOOK, image_tokens=IMAGE_TOKENS)
    total = sum(counts.values())
    trainable = sum(v for k, v in counts.items() if k not in FROZEN_BY_DEFAULT)
    shard = cfg.gpus
    pb = DTYPE_BYTES[cfg.param_dtype]
    h, n_layers, inter = text["hidden"], text["layers"], text["intermediate"]
    kv_dim = h * text["kv_heads"] // text["heads"]
    # the longest update sequence: an understanding prompt (question + 576 image embeddings) + answer
    seq = cfg.prompt_tokens + text["image_tokens"] + cfg.answer_tokens

    weights, grad_bytes, head_copy = total * pb, pb, 0.0
    if cfg.lora_rank:
        weights, trainable, grad_bytes, head_copy = _lora_terms(cfg, total, pb, linears)
    terms = {
        "weights": weights / shard,
        "grads": trainable * grad_bytes / shard,
        "optimizer": trainable * optimizer_state_bytes(cfg) / shard,
        "master": trainable * 4 / shard if cfg.master_weights else 0.0,
        "compensation": trainable * 2.0 if cfg.update == "kahan" else 0.0,
        "head_copy": head_copy,
    }
    # the text embeddings and lm_head are Janus-Pro's largest parameters; a scaled-down model's may be a linear layer
    largest = max([text["vocab"] * h] + [i * o for i, o in (linears or {}).values()])
    step_bytes = {"kahan": 8, "stochastic_rounding": 14}.get(cfg.update, 4 if cfg.master_weights else 0)
    # under FSDP the fp32 shards are the masters: the optimizer steps them with no extra copy
    terms["step"] = 0.0 if cfg.lora_rank or cfg.gpus > 1 else largest * step_bytes
    block = cfg.micro_batch * seq * (10 * h + 4 * inter) * pb  # one block's saved tensors
    if cfg.gradient_checkpointing:
        terms["activations"] = n_layers * cfg.micro_batch * seq * h * pb + block
    else:
        terms["activations"] = n_layers * block
    layer_params = counts.get("language_model", 0) / max(n_layers, 1)
    terms["fsdp_gather"] = 2 * layer_params * pb if cfg.gpus > 1 else 0.0
    terms["loss"] = 2 * min(cfg.loss_chunk_rows, cfg.micro_batch * seq) * max(text["vocab"], text["codebook"]) * 4
    rows = cfg.group_size * cfg.pairs_per_gpu
    rows = 2 * (min(cfg.rollout_batch, rows) if cfg.rollout_batch else rows)
    terms["kv_cache"] = 2 * n_layers * rows * (cfg.prompt_tokens + text["image_tokens"]) * kv_dim * pb
    terms["rollout_gather"] = total * pb * (1 - 1 / shard)
    terms["reward_models"] = cfg.reward_params * 4.0

    persistent = terms["weights"] + terms["optimizer"] + terms["master"] + terms["compensation"] + terms["reward_models"]
    terms["rollout_peak"] = persistent + terms["rollout_gather"] + terms["kv_cache"]
    backward = terms["activations"] + terms["fsdp_gather"] + terms["loss"] + terms["head_copy"]
    terms["update_peak"] = persistent + terms["grads"] + max(backward, terms["step"])
    terms["peak"] = max(terms["rollout_peak"], terms["update_peak"])
    terms["parameters"] = float(total)
    terms["trainable_parameters"] = float(trainable)
    return terms


def _lora_terms(cfg: PlanConfig, total: int, pb: int, linears: dict[str, tuple[int, int]]):
    """(weight bytes, adapter parameters, bytes per adapter gradient, head copy bytes) of a LoRA run."""
    adapted = re.compile(target_pattern(cfg.lora_targets))
    quantized = re.compile(QUANTIZED_PROJECTIONS)
    r = cfg.lora_rank
    adapters = sum(r * (i + o) for n, (i, o) in linears.items() if adapted.fullmatch(n))
    if adapters == 0:
        raise ValueError(f"lora_targets: {list(cfg.lora_targets)} match no linear layer of {cfg.model}")
    nf4 = sum(i * o for n, (i, o) in linears.items() if quantized.fullmatch(n)) if cfg.lora_quantize == "nf4" else 0
    weights = (total - nf4) * pb + nf4 * NF4_BYTES + adapters * 4
    heads = [linears[n] for n in ADAPTED_HEADS if n in linears and adapted.fullmatch(n)]
    head_copy = max((2 * o * (i + r) * pb for i, o in heads), default=0.0)
    return weights, adapters, 4, head_copy


def format_table(cfg: PlanConfig, terms: dict[str, float]) -> str:
    lines = [f"memory plan: {cfg.model}, {cfg.gpus} GPU(s), G={cfg.group_size}, {cfg.pairs_per_gpu} pair(s)/GPU, "
             f"{cfg.optimizer}, checkpointing={'on' if cfg.gradient_checkpointing else 'off'}, "
             f"master={'fp32' if cfg.master_weights else 'none'}, update={cfg.update}, "
             + (f"LoRA r={cfg.lora_rank} on {'/'.join(cfg.lora_targets)}, base "
                f"{cfg.lora_quantize if cfg.lora_quantize != 'none' else cfg.param_dtype}" if cfg.lora_rank
                else "full fine-tuning"),
             f"parameters {terms['parameters'] / 1e9:.3f} B (trainable {terms['trainable_parameters'] / 1e9:.3f} B)",
             "| term | GiB per GPU |", "|---|---|"]
    for key in ("weights", "grads", "optimizer", "master", "compensation", "head_copy", "activations", "fsdp_gather", "loss",
                "step", "rollout_gather", "kv_cache",
                "reward_models", "rollout_peak", "update_peak", "peak"):
        lines.append(f"| {key} | {terms[key] / GiB:.2f} |")
    return "\n".join(lines)


#: (label, PlanConfig fields) of the methods in `methods_table`
METHODS = (
    ("full, fp32 master weights", dict(master_weights=True)),
    ("full, bf16 + Kahan compensation", dict(update="kahan")),
    ("full, bf16 + stochastic rounding", dict(update="stochastic_rounding")),
    ("LoRA, bf16 base", dict(lora_rank=64)),
    ("LoRA, 4-bit NF4 base", dict(lora_rank=64, lora_quantize="nf4")),
)
#: GPU memory sizes (GB) the table names; a run fits when its planned peak leaves 1 GB for the CUDA context
GPU_SIZES_GB = (16, 24, 40, 48, 80, 141)


def methods_table(base: PlanConfig) -> str:
    """Markdown: planned peak per model x method (`METHODS`) at `base`'s sizes, and the smallest GPU it fits."""
    lines = ["| model | method | trainable params | planned peak (GiB) | (GB) | fits a GPU of |", "|---|---|---|---|---|---|"]
    for model in MODEL_NAMES:
        for label, changes in METHODS:
            cfg = PlanConfig(**{**asdict(base), "model": model, **changes})
            terms = estimate(cfg)
            gb = terms["peak"] / 1e9
            fits = next((f"{size} GB" for size in GPU_SIZES_GB if gb + 1 <= size), "none listed")
            lines.append(f"| {model} | {label}{f' (r={cfg.lora_rank})' if cfg.lora_rank else ''} | "
                         f"{terms['trainable_parameters'] / 1e9:.2f} B | {terms['peak'] / GiB:.2f} | {gb:.1f} | {fits} |")
    return "\n".join(lines)


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="estimate per-GPU memory of a PairGRPO run",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = PlanConfig()
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a run's YAML config: its sizes are used (the flags below override them)")
    p.add_argument("--model", default=None, choices=MODEL_NAMES,
                   help=f"preset (default {defaults.model}; with --config: read off model.path's config.json)")
    p.add_argument("--gpus", type=int, default=defaults.gpus)
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--pairs-per-gpu", type=int, default=None)
    p.add_argument("--prompt-tokens", type=int, default=None)
    p.add_argument("--answer-tokens", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--optimizer", default=None, choices=OPTIMIZERS)
    p.add_argument("--master-weights", action="store_true")
    p.add_argument("--update", default=None, choices=UPDATES,
                   help="optim.update: kahan adds a bf16 compensation buffer per trained parameter")
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank r (model.lora.rank; 0: full fine-tuning)")
    p.add_argument("--lora-quantize", default=None, choices=LORA_QUANTIZE,
                   help="model.lora.quantize: nf4 keeps the language model's projections in 4 bits")
    p.add_argument("--param-dtype", default=None, choices=tuple(DTYPE_BYTES),
                   help="dtype of stored weights, grads and activations (float32: an upper bound for FSDP "
                        "with fp32 shards and bf16 compute)")
    p.add_argument("--json", action="store_true", help="print the terms as JSON (bytes)")
    p.add_argument("--methods-table", action="store_true",
                   help="a markdown table of every preset x method (full fine-tuning with fp32 masters, Kahan or "
                        "stochastic rounding; LoRA r=64 on a bf16 or NF4 base) at the other flags' sizes")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from .config import ConfigError, load_config

    try:
        if args.config is not None:
            cfg = plan_of_run(load_config(args.config, check=False), gpus=args.gpus, model=args.model)
        else:
            cfg = PlanConfig(model=args.model or PlanConfig.model, gpus=args.gpus)
        flags = {"group_size": args.group_size, "pairs_per_gpu": args.pairs_per_gpu, "prompt_tokens": args.prompt_tokens,
                 "answer_tokens": args.answer_tokens, "micro_batch": args.micro_batch, "optimizer": args.optimizer,
                 "param_dtype": args.param_dtype, "gradient_checkpointing": False if args.no_checkpointing else None,
                 "master_weights": True if args.master_weights else None, "update": args.update,
                 "lora_rank": args.lora_rank, "lora_quantize": args.lora_quantize}
        for f in fields(cfg):
            if flags.get(f.name) is not None:
                setattr(cfg, f.name, flags[f.name])
        if args.methods_table:
            print(methods_table(cfg))
            return 0
        terms = estimate(cfg)
    except (ConfigError, ValueError) as exc:
        return user_error("plan", args, exc)
    print(json.dumps({"config": asdict(cfg), "bytes": terms}, indent=2) if args.json else format_table(cfg, terms))
    return 0


__all__ = ["PlanConfig", "estimate", "format_table", "methods_table", "plan_of_run", "preset_of", "register"]
