"""Janus-Pro as the engine sees it: loading, a tiny random twin, what trains, and the forward pieces.

    policy = load_policy(path)                          # engine/policy_io.py: model folder, checkpoint or run
    hidden = policy_hidden(model, embeds, attention_mask, position_ids)

The engine never calls `JanusForConditionalGeneration.forward`: it builds input embeddings
itself (text + image features for understanding, text + VQ-token embeddings for
generation), runs the language model, and hands the final hidden states to the fused
losses together with the weight of the head that reads them:

- text:  logits = lm_head(h)                                  -> (h, lm_head.weight, None)
- image: logits = vision_head(gelu(proj_out(h)))              -> (gelu(proj_out(h)), vision_head.weight, vision_head.bias)

so `[N, V]` logits are never built in training (V = 102400 text, 16384 image for Janus-Pro).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import os
import typing
from dataclasses import dataclass

import torch

from . import lora
from .config import AttnImplementation, Dtype, TrainModule

log = logging.getLogger("pairuni.model")

#: Every name accepted in `model.train_modules`.
TRAINABLE_MODULE_NAMES = typing.get_args(TrainModule)
#: `model.attn_implementation` values; "auto" resolves with `attention_backend`.
ATTN_IMPLEMENTATIONS = typing.get_args(AttnImplementation)
DTYPES = {name: getattr(torch, name) for name in typing.get_args(Dtype)}


def attention_backend() -> str:
    """`flash_attention_2` when flash-attn is importable and CUDA is present, else `sdpa`."""
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


# ----------------------------------------------------------------------------- tiny model
@dataclass(frozen=True)
class TinySpecialTokens:
    """Token ids of the tiny model's special tokens (the toy tokenizer uses the same ids)."""

    pad: int = 0
    bos: int = 1
    eos: int = 2
    boi: int = 3  # begin of image: last prompt token of a generation prompt
    image: int = 4  # placeholder replaced by vision features in understanding prompts
    unk: int = 5


TINY_SPECIAL = TinySpecialTokens()


def tiny_janus_config(vocab_size: int = 128, *, hidden_size: int = 64, num_layers: int = 2,
                      image_size: int = 32, patch_size: int = 8, codebook_size: int = 64):
    """A JanusConfig small enough to build and run on CPU in milliseconds.

    Defaults: LM hidden 64, 2 layers; a 32x32 image -> 4x4 = 16 image tokens (vision patches and
    VQ grid alike); VQ codebook of 64 entries; VQ decoder upsamples 4x4 -> 32x32 (3 upsamples).
    """
    from transformers import (
        JanusConfig,
        JanusVisionConfig,
        JanusVQVAEConfig,
        LlamaConfig,
    )

    if image_size % patch_size:
        raise ValueError(f"image_size: expected a multiple of patch_size={patch_size}, got {image_size}")
    grid = image_size // patch_size
    n_up = (image_size // grid).bit_length() - 1  # decoder upsamples by 2 per level after the first
    if 2**n_up * grid != image_size:
        raise ValueError(f"image_size/patch_size must be a power of two, got {image_size}/{patch_size}")
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=TINY_SPECIAL.bos, eos_token_id=TINY_SPECIAL.eos, pad_token_id=TINY_SPECIAL.pad,
    )
    vision = JanusVisionConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=image_size,
        patch_size=patch_size, mlp_ratio=2.0, projection_dim=hidden_size, depth=2,
        num_image_tokens=grid * grid,
    )
    # Decoder levels: 32 channels at low resolution, 128 at full resolution (4 channels per
    # GroupNorm group there, which `paint_vq_decoder` needs); one resnet block per level.
    vq = JanusVQVAEConfig(
        embed_dim=8, num_embeddings=codebook_size, latent_channels=32, base_channels=32,
        channel_multiplier=[4] + [1] * n_up, num_res_blocks=0, projection_dim=hidden_size,
        image_token_embed_dim=hidden_size, num_hidden_layers=2,
    )
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                       image_token_id=TINY_SPECIAL.image, tie_word_embeddings=False)


def tiny_janus(vocab_size: int = 128, *, seed: int = 0, palette=None, **kwargs):
    """A randomly initialised `JanusForConditionalGeneration` (fp32, eval mode) for tests and the demo.

    Its generation config carries what image generation needs (BOS, pad, `boi_token_id`).
    palette: None keeps the random VQ decoder; a list of RGB colours (in [0, 1]) makes the VQ
    decoder a block painter (`paint_vq_decoder`), so pixel rewards see what the tokens say.
    """
    from transformers import JanusForConditionalGeneration

    config = tiny_janus_config(vocab_size, **kwargs)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(config)
    set_tiny_generation_config(model)
    if palette is not None:
        paint_vq_decoder(model, palette)
    return model.eval()


def set_tiny_generation_config(model) -> None:
    """Give `model` the toy tokenizer's special ids for image generation (BOS, EOS, pad, begin-of-image)."""
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = TINY_SPECIAL.bos, TINY_SPECIAL.eos, TINY_SPECIAL.pad
    gc.generation_kwargs = {"boi_token_id": TINY_SPECIAL.boi}


def codebook_palette(colors, size: int, *, seed: int = 0) -> torch.Tensor:
    """[size, 3] colours in [0, 1]: `colors` (RGB 0-255 or 0-1) repeated in order, then random fill."""
    base = torch.tensor([list(c) for c in colors], dtype=torch.float32)
    if base.max() > 1:
        base = base / 255.0
    reps = size // len(base)
    pal = base.repeat(reps, 1)
    extra = size - len(pal)
    if extra:
        pal = torch.cat([pal, torch.rand(extra, 3, generator=torch.Generator().manual_seed(seed))])
    return pal


@torch.no_grad()
def paint_vq_decoder(model, palette) -> None:
    """Set the tiny VQ decoder's weights so that token k decodes to a flat block of colour palette[k].

    Every residual branch is zeroed (blocks become identities), upsampling convs copy their centre
    tap, and the final GroupNorm (4 channels per group) sees each colour channel a beside -a, L, -L
    with L = 1000: the group mean is 0 and its variance ~L^2 / 2, so the norm is an affine map of a
    with known coefficients that the norm's own affine weights undo. Output: nearest-upsampled
    palette colours, exact to ~1e-6. Needs the layout of `tiny_janus_config`.
    """
    vq = model.model.vqmodel
    dec = vq.decoder
    pal = torch.as_tensor(palette, dtype=torch.float32)
    n_codes, emb_dim = vq.quantize.embedding.weight.shape
    if pal.shape != (n_codes, 3) or float(pal.min()) < 0 or float(pal.max()) > 1:
        raise ValueError(f"palette: expected [{n_codes}, 3] colours in [0, 1], got {tuple(pal.shape)}")
    out_ch = dec.conv_out.in_channels
    if out_ch != 4 * dec.norm_out.num_groups:
        raise ValueError("paint_vq_decoder: needs 4 channels per group in the decoder's last GroupNorm")
    alpha, big, shift = 0.5, 1000.0, 20.0
    # Unit codebook vectors (get_codebook_entry L2-normalises): colour scaled by alpha, then the remainder.
    code = torch.zeros(n_codes, emb_dim)
    code[:, :3] = alpha * pal
    code[:, 3] = (1 - (alpha * pal).pow(2).sum(-1)).sqrt()
    vq.quantize.embedding.weight.copy_(code)

    def centre(conv, mapping, scale=1.0):
        conv.weight.zero_()
        conv.bias.zero_()
        k = conv.weight.shape[-1] // 2
        for o, i in mapping:
            conv.weight[o, i, k, k] = scale

    lat = vq.post_quant_conv.out_channels
    centre(vq.post_quant_conv, [(c, c) for c in range(3)], 1.0 / alpha)
    centre(dec.conv_in, [(c, c) for c in range(3)])
    for module in dec.modules():
        if type(module).__name__ == "JanusVQVAEResnetBlock":
            module.conv2.weight.zero_()
            module.conv2.bias.zero_()
            if module.in_channels != module.out_channels:
                sc = module.nin_shortcut
                sc.weight.zero_()
                sc.bias.zero_()
                for c in range(3):  # group c: (a, -a, L, -L)
                    sc.weight[4 * c, c, 0, 0] = 1.0
                    sc.weight[4 * c + 1, c, 0, 0] = -1.0
                    sc.bias[4 * c + 2] = big
                    sc.bias[4 * c + 3] = -big
        elif type(module).__name__ == "JanusVQVAEAttnBlock":
            module.proj_out.weight.zero_()
            module.proj_out.bias.zero_()
        elif type(module).__name__ == "JanusVQVAEConvUpsample":
            centre(module.conv, [(c, c) for c in range(module.conv.in_channels)])
    del lat
    norm = dec.norm_out
    norm.weight.zero_()
    norm.bias.zero_()
    for c in range(3):
        norm.weight[4 * c] = (big**2 / 2) ** 0.5
        norm.bias[4 * c] = shift
    # swish(a + shift) = a + shift to 2e-9; conv_out maps a in [0, 1] to the decoder's [-1, 1].
    centre(dec.conv_out, [(c, 4 * c) for c in range(3)], 2.0)
    dec.conv_out.bias.fill_(-2.0 * shift - 1.0)


# ----------------------------------------------------------------------------- real weights
def load_janus(path: str, *, dtype: str = "bfloat16", device: str | torch.device = "cpu",
               attn_implementation: str = "auto"):
    """Load `JanusForConditionalGeneration` from a local Hugging Face directory (safetensors only).

    Nothing is downloaded (`local_files_only=True`) and remote code stays off.
    """
    from transformers import JanusForConditionalGeneration

    if not os.path.isdir(path):
        raise FileNotFoundError(f"model.path: {path!r} is not a local directory (nothing is downloaded)")
    if not any(f.endswith(".safetensors") for f in os.listdir(path)):
        raise FileNotFoundError(f"model.path: no *.safetensors file in {path!r} (only safetensors weights load)")
    attn = attention_backend() if attn_implementation == "auto" else attn_implementation
    log.info("attention implementation: %s", attn)
    model = JanusForConditionalGeneration.from_pretrained(
        path, dtype=DTYPES[dtype], attn_implementation=attn, local_files_only=True,
        use_safetensors=True, trust_remote_code=False,
    )
    return model.to(device).eval()


def complete_generation_config(model, tokenizer) -> None:
    """Fill BOS / pad / begin-of-image ids that image generation needs from the tokenizer when the
    checkpoint's generation_config.json lacks them (transformers reads `generation_kwargs.boi_token_id`)."""
    gc = model.generation_config
    # absent, not empty, when generation_config.json was written without it (`gc.boi_token_id = ...`)
    kwargs = dict(getattr(gc, "generation_kwargs", None) or {})
    if kwargs.get("boi_token_id") is None:
        kwargs["boi_token_id"] = tokenizer.convert_tokens_to_ids(tokenizer.boi_token)
    gc.generation_kwargs = kwargs
    if gc.pad_token_id is None:
        gc.pad_token_id = tokenizer.pad_token_id
    if gc.bos_token_id is None:
        gc.bos_token_id = tokenizer.bos_token_id
    missing = [k for k, v in (("pad", gc.pad_token_id), ("bos", gc.bos_token_id),
                              ("begin-of-image", kwargs["boi_token_id"])) if v is None]
    if missing:
        raise ValueError(f"model.path: cannot find the {', '.join(missing)} token id(s) for image generation")


def set_trainable(model, train_modules) -> dict[str, int]:
    """Freeze everything, then unfreeze the named modules. Returns {name: trainable parameter count}."""
    unknown = set(train_modules) - set(TRAINABLE_MODULE_NAMES)
    if unknown:
        raise ValueError(f"model.train_modules: unknown {sorted(unknown)}; expected names from {TRAINABLE_MODULE_NAMES}")
    model.requires_grad_(False)
    counts = {}
    for name in train_modules:
        module = model.lm_head if name == "lm_head" else getattr(model.model, name)
        module.requires_grad_(True)
        counts[name] = sum(p.numel() for p in module.parameters())
    return counts


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer in backward (non-reentrant, so frozen inputs are fine)."""
    lm = model.model.language_model
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # the name in recent transformers 5.x
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# ----------------------------------------------------------------------------- forward pieces
def image_token_count(model) -> int:
    """Image tokens per generated image (576 for Janus-Pro, 16 for the tiny model)."""
    grid = model.model.vqmodel.quantize.quant_state_dims
    return grid[0] * grid[1]


def special_ids(model) -> dict[str, int]:
    gc = model.generation_config
    return {"bos": gc.bos_token_id, "pad": gc.pad_token_id, "eos": gc.eos_token_id,
            "boi": gc.generation_kwargs["boi_token_id"], "image": model.config.image_token_id}


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] 0/1 mask -> [B, L] positions counting only attended tokens (left padding gets 0)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def text_embeddings(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L] ids (+ images) -> [B, L, H] embeddings, vision features written over image placeholders."""
    embeds = model.get_input_embeddings()(input_ids)
    if pixel_values is not None:
        feats = model.model.get_image_features(pixel_values.to(embeds.dtype), return_dict=True).pooler_output
        slots = (input_ids == model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(slots, feats.to(embeds.dtype).reshape(-1, embeds.shape[-1]))
    return embeds


def image_token_embeddings(model, tokens: torch.Tensor) -> torch.Tensor:
    """[B, K] VQ codebook ids -> [B, K, H] language-model inputs (generation embeddings + aligner)."""
    return model.prepare_embeddings_for_image_generation(tokens)


@functools.lru_cache(maxsize=None)
def _cache_kwarg(model_class: type) -> str:
    """The language model's KV-cache argument: `cache` in recent transformers, where `past_key_values` is
    deprecated (removal announced for 5.40); `past_key_values` in releases before the rename.
    Cached per class: the rollouts call this once per decoded token."""
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def policy_hidden(model, inputs_embeds, attention_mask, position_ids, past_key_values=None) -> torch.Tensor:
    """Final (normed) hidden states of the language model: [B, L, H]."""
    lm = model.model.language_model
    out = lm(
        inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
        use_cache=past_key_values is not None, **{_cache_kwarg(type(lm)): past_key_values},
    )
    return out.last_hidden_state


def _plain_head(layer, what: str):
    if lora.is_adapted(layer):
        raise ValueError(f"{what}: LoRA-adapted; use {what}_operands (the adapter adds input features)")
    return layer.weight, layer.bias


def text_head(model):
    """(weight [V, H], bias) of the text head (not LoRA-adapted; see `text_head_operands`)."""
    return _plain_head(model.lm_head, "text_head")


def text_head_operands(model, hidden: torch.Tensor):
    """(x [..., H'], weight [V, H'], bias) with `F.linear(x, weight, bias)` the text logits of `hidden`
    [..., H]; H' = H, or H + r when the text head carries a LoRA adapter (`lora.linear_operands`)."""
    return lora.linear_operands(model.lm_head, hidden)


def text_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """[..., H] final hidden states -> [..., V] text logits (rollouts: the head's own forward, which for a
    LoRA-adapted head adds B A x without concatenating [W, B] at every decoded token)."""
    return model.lm_head(hidden)


def image_head_input(model, hidden: torch.Tensor) -> torch.Tensor:
    """The generation head up to its last linear layer: gelu(proj_out(h))."""
    head = model.model.generation_head
    return head.activation_fn(head.proj_out(hidden))


def image_head(model):
    """(weight [V_img, P], bias [V_img]) of the generation head's last linear layer (not LoRA-adapted;
    see `image_head_operands`)."""
    return _plain_head(model.model.generation_head.vision_head, "image_head")


def image_head_operands(model, head_input: torch.Tensor):
    """(x [..., P'], weight [V_img, P'], bias [V_img]) with `F.linear(x, weight, bias)` the image logits of
    `head_input` [..., P] (`image_head_input`); P' = P + r when vision_head carries a LoRA adapter."""
    return lora.linear_operands(model.model.generation_head.vision_head, head_input)


def decode_images(model, tokens: torch.Tensor) -> torch.Tensor:
    """[B, K] image tokens -> [B, 3, S, S] float images in [0, 1] (the VQ decoder's [-1, 1] mapped)."""
    with torch.no_grad():
        pixels = model.model.vqmodel.decode(tokens)
    return ((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0)
