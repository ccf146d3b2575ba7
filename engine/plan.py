"""`pairuni plan`: per-GPU memory estimate of a PairGRPO run before renting the GPUs.

    pairuni plan --model janus-pro-7b --gpus 1 --group-size 4 --pairs-per-gpu 1

Terms (bytes per GPU; FSDP shards weights, gradients and optimizer state over the GPUs):
  weights      every parameter in `param_dtype` (frozen vision encoder and VQ included)
  grads        trainable parameters in `param_dtype`
  optimizer    AdamW8bit: two 8-bit moments + one fp32 absmax per 2048-value block;
               AdamW: two fp32 moments
  master       optional fp32 master copy of the trainable weights. With bf16 weights and the
               paper's lr of 1e-6 most updates are below half a bf16 ulp and vanish; the
               master copy (or stochastic rounding) is what keeps them. It is the term that
               decides whether 7B fits on one 80 GB GPU, so it is shown separately.
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
  kv_cache     image rollouts: K and V of every layer for the 2 x G [cond; uncond] rows of
               each pair on this GPU, over prompt + 576 positions (text rollouts are smaller)
Checked against the measured peak of the engine's update step on a scaled-down model on CPU
(tests/engine/test_plan_measured.py, within 20%). The peak is the larger of the rollout phase
(weights + optimizer + master + rollout gather + KV cache) and the update phase
(weights + grads + optimizer + master + activations + gather + loss).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

from .janus_shapes import IMAGE_CODEBOOK, IMAGE_TOKENS, MODEL_NAMES, janus_pro_config, parameter_counts

GiB = 2**30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
FROZEN_BY_DEFAULT = ("vision_model", "vqmodel")
OPTIMIZERS = ("adamw8bit", "adamw")


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
    param_dtype: str = "bfloat16"
    loss_chunk_rows: int = 1024
    """Rows of the fused linear loss computed at once."""

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


def estimate(cfg: PlanConfig, *, counts: dict[str, int] | None = None, text: dict | None = None) -> dict[str, float]:
    """Bytes per GPU for each term, plus `rollout_peak`, `update_peak` and `peak` (all in bytes).

    `counts` / `text` override the parameter counts and language-model shape (the tests use a
    scaled-down model); by default they come from the exact Janus-Pro config of `cfg.model`.
    """
    cfg.validate()
    if counts is None or text is None:
        config = janus_pro_config(cfg.model)
        counts = counts or parameter_counts(config)
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

    terms = {
        "weights": total * pb / shard,
        "grads": trainable * pb / shard,
        "optimizer": trainable * ((2 + 8 / 2048) if cfg.optimizer == "adamw8bit" else 8) / shard,
        "master": trainable * 4 / shard if cfg.master_weights else 0.0,
    }
    block = cfg.micro_batch * seq * (10 * h + 4 * inter) * pb  # one block's saved tensors
    if cfg.gradient_checkpointing:
        terms["activations"] = n_layers * cfg.micro_batch * seq * h * pb + block
    else:
        terms["activations"] = n_layers * block
    layer_params = counts.get("language_model", 0) / max(n_layers, 1)
    terms["fsdp_gather"] = 2 * layer_params * pb if cfg.gpus > 1 else 0.0
    terms["loss"] = 2 * min(cfg.loss_chunk_rows, cfg.micro_batch * seq) * max(text["vocab"], text["codebook"]) * 4
    rows = 2 * cfg.group_size * cfg.pairs_per_gpu
    terms["kv_cache"] = 2 * n_layers * rows * (cfg.prompt_tokens + text["image_tokens"]) * kv_dim * pb
    terms["rollout_gather"] = total * pb * (1 - 1 / shard)

    persistent = terms["weights"] + terms["optimizer"] + terms["master"]
    terms["rollout_peak"] = persistent + terms["rollout_gather"] + terms["kv_cache"]
    terms["update_peak"] = persistent + terms["grads"] + terms["activations"] + terms["fsdp_gather"] + terms["loss"]
    terms["peak"] = max(terms["rollout_peak"], terms["update_peak"])
    terms["parameters"] = float(total)
    terms["trainable_parameters"] = float(trainable)
    return terms


def format_table(cfg: PlanConfig, terms: dict[str, float]) -> str:
    lines = [f"memory plan: {cfg.model}, {cfg.gpus} GPU(s), G={cfg.group_size}, {cfg.pairs_per_gpu} pair(s)/GPU, "
             f"{cfg.optimizer}, checkpointing={'on' if cfg.gradient_checkpointing else 'off'}, "
             f"master={'fp32' if cfg.master_weights else 'none'}",
             f"parameters {terms['parameters'] / 1e9:.3f} B (trainable {terms['trainable_parameters'] / 1e9:.3f} B)",
             "| term | GiB per GPU |", "|---|---|"]
    for key in ("weights", "grads", "optimizer", "master", "activations", "fsdp_gather", "loss", "rollout_gather", "kv_cache",
                "rollout_peak", "update_peak", "peak"):
        lines.append(f"| {key} | {terms[key] / GiB:.2f} |")
    return "\n".join(lines)


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="estimate per-GPU memory of a PairGRPO run",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = PlanConfig()
    p.add_argument("--model", default=defaults.model, choices=MODEL_NAMES)
    p.add_argument("--gpus", type=int, default=defaults.gpus)
    p.add_argument("--group-size", type=int, default=defaults.group_size)
    p.add_argument("--pairs-per-gpu", type=int, default=defaults.pairs_per_gpu)
    p.add_argument("--prompt-tokens", type=int, default=defaults.prompt_tokens)
    p.add_argument("--answer-tokens", type=int, default=defaults.answer_tokens)
    p.add_argument("--micro-batch", type=int, default=defaults.micro_batch)
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--optimizer", default=defaults.optimizer, choices=OPTIMIZERS)
    p.add_argument("--master-weights", action="store_true")
    p.add_argument("--param-dtype", default=defaults.param_dtype, choices=tuple(DTYPE_BYTES),
                   help="dtype of stored weights, grads and activations (float32: an upper bound for FSDP "
                        "with fp32 shards and bf16 compute)")
    p.add_argument("--json", action="store_true", help="print the terms as JSON (bytes)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    cfg = PlanConfig(model=args.model, gpus=args.gpus, group_size=args.group_size, pairs_per_gpu=args.pairs_per_gpu,
                     prompt_tokens=args.prompt_tokens, answer_tokens=args.answer_tokens, micro_batch=args.micro_batch,
                     gradient_checkpointing=not args.no_checkpointing, optimizer=args.optimizer,
                     master_weights=args.master_weights, param_dtype=args.param_dtype)
    terms = estimate(cfg)
    print(json.dumps({"config": asdict(cfg), "bytes": terms}, indent=2) if args.json else format_table(cfg, terms))
    return 0


__all__ = ["PlanConfig", "estimate", "format_table", "register"]
