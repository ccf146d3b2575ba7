"""`pairuni plan`: per-GPU memory estimate of a PairGRPO run before renting the GPUs.

    pairuni plan --config configs/janus_pro_1b.yaml [--gpus N] [--model NAME]   # a run's own config
    pairuni plan --model janus-pro-7b rollout.group_size=4 model.dtype=bfloat16  # the defaults + overrides
    pairuni plan --config configs/dimoo_8b_1gpu.yaml [--steps 35]                # model.family: dimoo

A config with `model.family: dimoo` (or `--model dimoo-*`) is planned by engine/dimoo/plan.py, from the same
config plus its DiMOO keys (rollout.image_steps, score_groups, image_resolution; the flags --steps,
--score-groups, --resolution are those keys by another name, `DIMOO_FLAGS`, refused for a Janus-Pro plan).

The plan is built from a run's `Config` (`plan_of_run`; the flags --group-size, --optimizer, ... are
`key=value` overrides by another name, `PLAN_FLAGS`), checked by the same rules as a run for the
process count it plans, so it has no defaults or rules of its own. Two assumptions are not config keys:
prompts of `--prompt-tokens` text tokens (default `PROMPT_TOKENS`) and fused-loss chunks of
`LOSS_CHUNK_ROWS` rows.

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
from dataclasses import asdict, dataclass
from pathlib import Path

from .cli import user_error
from .dimoo.shapes import MODEL_NAMES as DIMOO_MODEL_NAMES
from .janus_shapes import IMAGE_CODEBOOK, IMAGE_TOKENS, MODEL_NAMES, janus_pro_config, linear_shapes, parameter_counts
from .lora import QUANTIZED_PROJECTIONS, target_pattern

GiB = 2**30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
FROZEN_BY_DEFAULT = ("vision_model", "vqmodel")
#: bytes per NF4 weight: 4 bits, an 8-bit absmax per 64-weight block, an fp32 scale per 256 absmaxes
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
#: heads whose LoRA-adapted weight the fused loss receives as one [V, H + r] tensor
ADAPTED_HEADS = ("lm_head", "model.generation_head.vision_head")
# Parameters of the reward models a run keeps resident (approximate sizes of the public checkpoints).
REWARD_MODEL_PARAMS = {"clip": 428_000_000, "hpsv2": 986_000_000}
# language-model hidden size -> preset, to recognise a downloaded Janus-Pro folder
PRESET_BY_HIDDEN = {2048: "janus-pro-1b", 4096: "janus-pro-7b"}
#: Assumed text tokens of a generation prompt / question (without image tokens): data, not config.
PROMPT_TOKENS = 64
#: Rows of the fused linear loss assumed computed at once (the kernels size chunks by free memory).
LOSS_CHUNK_ROWS = 1024


@dataclass(frozen=True)
class PlanConfig:
    """What the estimate depends on, read off a run's Config by `plan_of_run` (no defaults of its own)."""

    model: str
    """janus-pro-1b | janus-pro-7b (exact shapes via engine.janus_shapes)."""
    gpus: int
    """Data-parallel GPUs; > 1 shards weights, grads and optimizer state with FSDP2."""
    group_size: int
    """G rollouts per task of a pair (`rollout.group_size`)."""
    pairs_per_gpu: int
    """Pairs rolled out and updated on each GPU per step (`data.pairs_per_step` / gpus, rounded up)."""
    prompt_tokens: int
    """Text tokens of a generation prompt / question (without image tokens)."""
    answer_tokens: int
    """Maximum new tokens of an understanding answer (`rollout.max_new_tokens`)."""
    micro_batch: int
    """Sequences per forward/backward in the update (`optim.micro_batch_size`)."""
    gradient_checkpointing: bool
    optimizer: str
    master_weights: bool
    """fp32 master copy of the trainable weights (`optim.master_weights`, or fp32 FSDP shards computed lower)."""
    update: str
    """`optim.update`: round | kahan (+2 bytes per trained parameter) | stochastic_rounding."""
    lora_rank: int
    """LoRA rank (0: full fine-tuning of the default train modules)."""
    lora_targets: tuple[str, ...]
    lora_quantize: str
    """`model.lora.quantize`: none | nf4 (the language model's projections in 4 bits)."""
    param_dtype: str
    """Compute dtype of weights, grads and activations."""
    loss_chunk_rows: int
    """Rows of the fused linear loss computed at once."""
    rollout_batch: int
    """Rollout rows decoded at once (`rollout.max_batch`; 0: all G x pairs_per_gpu rows)."""
    reward_params: int
    """Parameters of resident reward models (fp32)."""


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


def plan_of_run(run, *, gpus: int = 1, model: str | None = None, prompt_tokens: int = PROMPT_TOKENS) -> PlanConfig:
    """The PlanConfig of an `engine.config.Config` on `gpus` GPUs: its group size, pairs per step, answer
    length, micro-batch, rollout chunking, dtypes, optimizer, checkpointing and reward models. The run is
    checked as a launch of `gpus` processes would be (ranges and rules, not files or devices).

    model: the preset; by default read off `run.model.path` (which must then exist)."""
    from .checks import check

    if gpus < 1:
        raise ValueError(f"--gpus: expected an integer >= 1, got {gpus}")
    check(run, world=gpus if gpus > 1 else None, environment=False)
    if model is None:
        if run.model.family == "dimoo":
            raise ValueError("model.family: dimoo runs are planned by engine.dimoo.plan.plan_of_run")
        if run.model.path is None:
            raise ValueError("model.path: null is the tiny demo model, not a Janus-Pro preset; pass --model")
        model = preset_of(run.model.path)
    if model not in MODEL_NAMES + DIMOO_MODEL_NAMES:
        raise ValueError(f"--model: expected one of {MODEL_NAMES + DIMOO_MODEL_NAMES}, got {model!r}")
    dtype = run.model.dtype if gpus == 1 else (run.distributed.param_dtype or run.model.dtype)
    return PlanConfig(
        model=model, gpus=gpus, group_size=run.rollout.group_size,
        pairs_per_gpu=math.ceil(run.data.pairs_per_step / gpus), prompt_tokens=prompt_tokens,
        answer_tokens=run.rollout.max_new_tokens, micro_batch=run.optim.micro_batch_size,
        gradient_checkpointing=run.model.gradient_checkpointing, optimizer=run.optim.optimizer, param_dtype=dtype,
        # under FSDP, fp32 shards computed in a lower dtype are the master weights
        master_weights=run.optim.master_weights or (gpus > 1 and run.model.dtype == "float32" and dtype != "float32"),
        update=run.optim.update, lora_rank=run.model.lora.rank, lora_targets=tuple(run.model.lora.targets),
        lora_quantize=run.model.lora.quantize, loss_chunk_rows=LOSS_CHUNK_ROWS, rollout_batch=run.rollout.max_batch,
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


#: (label, config overrides) of the methods in `methods_table`, all on a bf16 model
METHODS = (
    ("full, fp32 master weights", ("optim.master_weights=true",)),
    ("full, bf16 + Kahan compensation", ("optim.update=kahan",)),
    ("full, bf16 + stochastic rounding", ("optim.update=stochastic_rounding",)),
    ("LoRA, bf16 base", ("model.lora.rank=64",)),
    ("LoRA, 4-bit NF4 base", ("model.lora.rank=64", "model.lora.quantize=nf4")),
)
#: GPU memory sizes (GB) the table names; a run fits when its planned peak leaves 1 GB for the CUDA context
GPU_SIZES_GB = (16, 24, 40, 48, 80, 141)


def methods_table(run, *, gpus: int = 1, prompt_tokens: int = PROMPT_TOKENS) -> str:
    """Markdown: planned peak per model x method (`METHODS`) of `run` (a Config), and the smallest GPU it fits."""
    import copy

    from .config import layered

    lines = ["| model | method | trainable params | planned peak (GiB) | (GB) | fits a GPU of |", "|---|---|---|---|---|---|"]
    for model in MODEL_NAMES:
        for label, changes in METHODS:
            method = layered(copy.deepcopy(run), None, ("model.dtype=bfloat16", *changes))
            cfg = plan_of_run(method, gpus=gpus, model=model, prompt_tokens=prompt_tokens)
            terms = estimate(cfg)
            gb = terms["peak"] / 1e9
            fits = next((f"{size} GB" for size in GPU_SIZES_GB if gb + 1 <= size), "none listed")
            lines.append(f"| {model} | {label}{f' (r={cfg.lora_rank})' if cfg.lora_rank else ''} | "
                         f"{terms['trainable_parameters'] / 1e9:.2f} B | {terms['peak'] / GiB:.2f} | {gb:.1f} | {fits} |")
    return "\n".join(lines)


#: flag -> (config key, what it does); each flag is that `key=value` override under another name
PLAN_FLAGS = {
    "--group-size": ("rollout.group_size", "G rollouts per task of a pair"),
    "--answer-tokens": ("rollout.max_new_tokens", "longest understanding answer"),
    "--micro-batch": ("optim.micro_batch_size", "sequences per forward/backward"),
    "--optimizer": ("optim.optimizer", "adamw8bit | adamw"),
    "--update": ("optim.update", "round | kahan | stochastic_rounding"),
    "--lora-rank": ("model.lora.rank", "LoRA rank r (0: full fine-tuning)"),
    "--lora-quantize": ("model.lora.quantize", "none | nf4 (the language model's projections in 4 bits)"),
    "--param-dtype": ("model.dtype", "float32 | bfloat16 | float16"),
}
#: DiMOO-only flags -> (config key, what it does), overrides as PLAN_FLAGS'; refused for a Janus-Pro plan
DIMOO_FLAGS = {
    "--steps": ("rollout.image_steps", "denoising steps T of the image sampler (Lumina-DiMOO: 64)"),
    "--score-groups": ("rollout.score_groups", "scoring forwards per sample (0: one per step)"),
    "--resolution": ("rollout.image_resolution", "image side in px (0: the preset's, 512 for dimoo-8b)"),
}


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="estimate per-GPU memory of a PairGRPO run",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a run's YAML config (default: the embedded defaults, as `pairuni train`)")
    p.add_argument("--model", default=None, choices=MODEL_NAMES + DIMOO_MODEL_NAMES,
                   help="preset whose shapes are planned (default: read off model.path's config.json; for "
                        "model.family=dimoo, dimoo-8b while that folder is absent); dimoo-*: plan the config as a "
                        "Lumina-DiMOO run (engine/dimoo/plan.py)")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs (FSDP2 under torchrun)")
    p.add_argument("--pairs-per-gpu", type=int, default=None, help="data.pairs_per_step = this x --gpus")
    p.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS,
                   help=f"assumed text tokens of a prompt or question (default {PROMPT_TOKENS})")
    for flag, (key, what) in PLAN_FLAGS.items():
        p.add_argument(flag, default=None, metavar="VALUE", help=f"{key}={flag[2:].upper()}: {what}")
    p.add_argument("--checkpointing", action="store_true", help="model.gradient_checkpointing=true")
    p.add_argument("--master-weights", action="store_true", help="optim.master_weights=true")
    for flag, (key, what) in DIMOO_FLAGS.items():
        p.add_argument(flag, type=int, default=None, metavar="N", help=f"DiMOO only: {key}=N: {what}")
    p.add_argument("--json", action="store_true", help="print the terms as JSON (bytes)")
    p.add_argument("--methods-table", action="store_true",
                   help="a markdown table of every preset x method (full fine-tuning with fp32 masters, Kahan or "
                        "stochastic rounding; LoRA r=64 on a bf16 or NF4 base) of this config on bf16 weights")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for `pairuni train`")
    p.set_defaults(func=_run)


def plan_overrides(args) -> list[str]:
    """The `key=value` overrides of the flags given, before the explicit ones (which win)."""
    flags = {**PLAN_FLAGS, **DIMOO_FLAGS}
    out = [f"{key}={getattr(args, flag[2:].replace('-', '_'))}" for flag, (key, _) in flags.items()
           if getattr(args, flag[2:].replace("-", "_")) is not None]
    if args.pairs_per_gpu is not None:
        out.append(f"data.pairs_per_step={args.pairs_per_gpu * args.gpus}")
    out += ["model.gradient_checkpointing=true"] * args.checkpointing + ["optim.master_weights=true"] * args.master_weights
    return out + list(args.overrides)


def is_dimoo_plan(args, run) -> bool:
    """Whether `pairuni plan` plans DiMOO: `--model dimoo-*`, or no --model and `model.family: dimoo`. Raises a
    one-line ValueError for a DiMOO flag on a Janus-Pro plan or a Janus-Pro --model on a DiMOO config."""
    if args.model in DIMOO_MODEL_NAMES:
        return True
    if run.model.family == "dimoo":
        if args.model is not None:
            raise ValueError(f"--model: expected one of {DIMOO_MODEL_NAMES} for model.family=dimoo, "
                             f"got {args.model!r}")
        return True
    given = [flag for flag in DIMOO_FLAGS if getattr(args, flag[2:].replace("-", "_")) is not None]
    if given:
        raise ValueError(f"{given[0]}: only for a DiMOO plan (model.family=dimoo or --model "
                         f"{'|'.join(DIMOO_MODEL_NAMES)}), got model.family={run.model.family}")
    return False


def _run(args) -> int:
    from .config import ConfigError, load_config

    try:
        run = load_config(args.config, plan_overrides(args), check=False)
        if is_dimoo_plan(args, run):
            if args.methods_table:
                raise ValueError("--methods-table: Janus-Pro presets only, not a DiMOO plan (model.family=dimoo)")
            from .dimoo.plan import run_plan

            print(run_plan(args, run))
            return 0
        if args.methods_table:
            print(methods_table(run, gpus=args.gpus, prompt_tokens=args.prompt_tokens))
            return 0
        cfg = plan_of_run(run, gpus=args.gpus, model=args.model, prompt_tokens=args.prompt_tokens)
        terms = estimate(cfg)
    except (ConfigError, ValueError) as exc:
        return user_error("plan", args, exc)
    print(json.dumps({"config": asdict(cfg), "bytes": terms}, indent=2) if args.json else format_table(cfg, terms))
    return 0


__all__ = ["DIMOO_FLAGS", "PLAN_FLAGS", "PlanConfig", "estimate", "format_table", "is_dimoo_plan", "methods_table",
           "plan_of_run", "preset_of", "register"]
