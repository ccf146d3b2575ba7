"""Exact Janus-Pro shapes as transformers `JanusConfig`s, for random-weight runs and the memory planner.

Weights do not change memory or speed, so a randomly initialised model with exactly
Janus-Pro-7B's shapes measures what a real 7B run costs without downloading anything.
Shapes (docs/ARCHITECTURE.md "Janus facts"): Janus-Pro-1B language model 24 layers x 2048 hidden,
Janus-Pro-7B 30 layers x 4096 hidden (LLaMA blocks, MHA), vocabulary 102400; SigLIP-L/16
vision encoder at 384 px; VQ tokenizer with a 16384-entry codebook; 576 image tokens.
"""

from __future__ import annotations

import torch

TEXT_VOCAB = 102400
IMAGE_CODEBOOK = 16384
IMAGE_TOKENS = 576

# language-model shapes of the released checkpoints
JANUS_PRO_TEXT = {
    "janus-pro-1b": dict(hidden_size=2048, num_hidden_layers=24, intermediate_size=5632,
                         num_attention_heads=16, num_key_value_heads=16),
    "janus-pro-7b": dict(hidden_size=4096, num_hidden_layers=30, intermediate_size=11008,
                         num_attention_heads=32, num_key_value_heads=32),
}
MODEL_NAMES = tuple(JANUS_PRO_TEXT)


def janus_pro_config(name: str, **text_overrides):
    """A `JanusConfig` with exactly the shapes of Janus-Pro-1B or -7B (`name` in MODEL_NAMES).

    `text_overrides` changes language-model fields (e.g. `num_hidden_layers=4` for a scaled-down copy).
    """
    from transformers import JanusConfig

    if name not in JANUS_PRO_TEXT:
        raise ValueError(f"model: expected one of {MODEL_NAMES}, got {name!r}")
    text = dict(model_type="llama", vocab_size=TEXT_VOCAB, tie_word_embeddings=False, max_position_embeddings=16384,
                rms_norm_eps=1e-6, **JANUS_PRO_TEXT[name])
    text.update(text_overrides)
    hidden = text["hidden_size"]
    vision = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=384, patch_size=16,
                  mlp_ratio=4.0, projection_dim=hidden, depth=2, num_image_tokens=IMAGE_TOKENS)
    vq = dict(num_embeddings=IMAGE_CODEBOOK, embed_dim=8, projection_dim=hidden, image_token_embed_dim=hidden,
              num_patches=24)
    # Janus-Pro has a separate lm_head (not tied to the input embeddings)
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq, tie_word_embeddings=False)


def _meta_model(config):
    from transformers import JanusForConditionalGeneration

    with torch.device("meta"):
        return JanusForConditionalGeneration(config)


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """{module name: (in_features, out_features)} of every `nn.Linear` of the model (what LoRA can adapt
    and NF4 can quantize), read on the meta device."""
    return {n: (m.in_features, m.out_features) for n, m in _meta_model(config).named_modules()
            if isinstance(m, torch.nn.Linear)}


def parameter_counts(config) -> dict[str, int]:
    """Parameters per top-level submodule of `JanusForConditionalGeneration`, counted on the meta device."""
    model = _meta_model(config)
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = parts[1] if parts[0] == "model" and len(parts) > 2 else parts[0]
        counts[key] = counts.get(key, 0) + p.numel()
    return counts
