"""Exact Lumina-DiMOO shapes and parameter counts, from the network's own formula (engine/dimoo/model.py).

    counts = parameter_counts(dimoo_config("dimoo-8b"))    # {"wte": ..., "blocks": ..., "ln_f": ..., "ff_out": ...}
    linears = linear_shapes(dimoo_config("dimoo-8b"))      # {module name: (in, out)} of every nn.Linear

DiMOO-8B (../shared/DIMOO.md section 1.3; `DimooConfig`'s defaults): d_model H = 4096, 32 blocks, 32 heads
(32 KV heads), SwiGLU MLP width M = 12288, vocabulary V = 134548 (126356 text ids + 8192 image codes), an untied
output head. Per block: two RMSNorm weights (2H), q_proj and attn_out (H x H each), k_proj and v_proj
(H x kv, kv = n_kv_heads * H / n_heads), ff_proj and up_proj (H x M each), the block's ff_out (M x H); no
biases. Outside the blocks: wte (V x H), ln_f (H), the head ff_out (V x H). So

    parameters = 2 V H + H + n_layers (2 H + 2 H^2 + 2 H kv + 3 H M)  = 8,081,805,312 for DiMOO-8B,

counted here from the formula; tests/engine/dimoo/test_plan.py checks it equals `DimooModel`'s real
`numel()` sum for small configs, and the linear layers' names and shapes equal the module tree's.

Sequences at `resolution` px (DIMOO.md section 1.6): an h x w grid of codes (h = w = resolution / 16) is laid
out row by row with a newline after every row: h (w + 1) tokens, 32 x 33 = 1056 at 512 px.
"""

from __future__ import annotations

from .ids import CODEBOOK_SIZE, DOWNSAMPLE
from .model import DimooConfig, tiny_dimoo_config

#: presets `pairuni plan --model` knows: the released 8B shapes and the tiny DiMOO of the toy world
PRESETS = {"dimoo-8b": DimooConfig, "dimoo-tiny": tiny_dimoo_config}
MODEL_NAMES = tuple(PRESETS)
#: DiMOO's default resolution for the plan (config.py defaults 512 px; DIMOO.md section 1.5)
RESOLUTION = 512


def dimoo_config(name: str, **overrides) -> DimooConfig:
    """The DimooConfig of a preset (`MODEL_NAMES`); `overrides` change its fields (e.g. n_layers=2)."""
    if name not in PRESETS:
        raise ValueError(f"model: expected one of {MODEL_NAMES}, got {name!r}")
    if name == "dimoo-8b":
        return DimooConfig(**overrides)
    return tiny_dimoo_config(**overrides)


def block_parameters(cfg: DimooConfig) -> int:
    """Parameters of one LLaDALlamaBlock: 2 H (norms) + 2 H^2 (q, attn_out) + 2 H kv (k, v) + 3 H M (SwiGLU)."""
    h, kv, m = cfg.d_model, cfg.kv_heads * cfg.head_dim, cfg.mlp_hidden_size
    return 2 * h + 2 * h * h + 2 * h * kv + 3 * h * m


def parameter_counts(cfg: DimooConfig) -> dict[str, int]:
    """Parameters per module of `DimooModel.model.transformer`: wte [V, H], blocks, ln_f [H], ff_out [V, H]
    (V = embedding_size, the logits width)."""
    v, h = cfg.vocab_rows, cfg.d_model
    return {"wte": v * h, "blocks": cfg.n_layers * block_parameters(cfg), "ln_f": h, "ff_out": v * h}


def linear_shapes(cfg: DimooConfig) -> dict[str, tuple[int, int]]:
    """{module name: (in_features, out_features)} of every nn.Linear of `DimooModel` (the released names)."""
    h, kv, m = cfg.d_model, cfg.kv_heads * cfg.head_dim, cfg.mlp_hidden_size
    per_block = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "attn_out": (h, h),
                 "ff_proj": (h, m), "up_proj": (h, m), "ff_out": (m, h)}
    out = {f"model.transformer.blocks.{i}.{name}": shape for i in range(cfg.n_layers)
           for name, shape in per_block.items()}
    out["model.transformer.ff_out"] = (h, cfg.vocab_rows)
    return out


#: DiMOO linear layer -> the module name engine.lora's targets give the same role (attention: q/k/v/o,
#: mlp: gate/up/down), so engine.plan's LoRA and NF4 terms apply to DiMOO unchanged
_LORA_ROLES = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
               "attn_out": "self_attn.o_proj", "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
               "ff_out": "mlp.down_proj"}


def lora_role_shapes(cfg: DimooConfig, targets) -> dict[str, tuple[int, int]]:
    """`linear_shapes(cfg)` under the names `engine.lora.TARGETS` / `QUANTIZED_PROJECTIONS` match by role: block i's
    projections as `model.language_model.layers.{i}.(self_attn|mlp).*_proj`; DiMOO's one head (ff_out, whose
    8192 last rows are the image head) as `model.generation_head.vision_head` when `targets` has generation_head,
    else `lm_head`: either target adapts it. A name map for the planner only, not the family's LoRA."""
    out = {}
    for name, shape in linear_shapes(cfg).items():
        parts = name.split(".")
        if parts[2] == "blocks":
            out[f"model.language_model.layers.{parts[3]}.{_LORA_ROLES[parts[4]]}"] = shape
        else:
            out["model.generation_head.vision_head" if "generation_head" in targets else "lm_head"] = shape
    return out


def image_grid(resolution: int = RESOLUTION) -> tuple[int, int]:
    """(codes, tokens) of a square image: (resolution / 16)^2 codes, laid out with a newline after each row."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < DOWNSAMPLE \
            or resolution % DOWNSAMPLE:
        raise ValueError(f"resolution: expected a positive multiple of {DOWNSAMPLE} px, got {resolution!r}")
    side = resolution // DOWNSAMPLE
    return side * side, side * (side + 1)


__all__ = ["CODEBOOK_SIZE", "MODEL_NAMES", "PRESETS", "RESOLUTION", "block_parameters", "dimoo_config", "image_grid",
           "linear_shapes", "lora_role_shapes", "parameter_counts"]
