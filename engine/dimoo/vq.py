"""DiMOO's image tokenizer side: decoding codes with a diffusers `VQModel`, and a tiny painter VQ for the toy world.

    images = decode_codes(vq, codes)                      # [B, h, w] codes -> [B, 3, 16h, 16w] in [0, 1]
    vq = toy_vqmodel(codebook_size=64, palette=colours)   # code k decodes to a flat 16x16 block of colours[k]

Decoding follows Lumina-DiMOO@81344e6:utils/image_utils.py:L53-61 and diffusers' AmusedPipeline (DIMOO.md 1.5):
`vq.decode(codes.flatten(), force_not_quantize=True, shape=(B, h, w, latent_channels)).sample.clip(0, 1)`; the
image processor has `do_normalize=False`, so the decoder's output is already the [0, 1] image.
"""

from __future__ import annotations

import torch

from .ids import CODEBOOK_SIZE, DOWNSAMPLE


def decode_codes(vq, codes: torch.Tensor) -> torch.Tensor:
    """[B, h, w] integer codes in [0, num_vq_embeddings) -> [B, 3, h * f, w * f] float32 images in [0, 1]
    (f = 2^(levels - 1): 16 for DiMOO's VQ)."""
    if codes.dim() != 3 or codes.is_floating_point():
        raise ValueError(f"codes: expected an integer [B, h, w] tensor, got {codes.dtype} {tuple(codes.shape)}")
    n = vq.config.num_vq_embeddings
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= n):
        raise ValueError(f"codes: expected values in [0, {n})")
    b, h, w = codes.shape
    with torch.no_grad():
        out = vq.decode(codes.flatten(), force_not_quantize=True, shape=(b, h, w, vq.config.latent_channels))
    return out.sample.float().clip(0, 1)


def toy_vqvae_config(codebook_size: int = CODEBOOK_SIZE) -> dict:
    """VQModel kwargs of the toy world's painter: aMUSEd's 5-level layout (16x) with 16 channels at every
    level and 4 GroupNorm groups (4 channels per group, which `paint_vqmodel` needs)."""
    return {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 5,
            "up_block_types": ["UpDecoderBlock2D"] * 5, "block_out_channels": [16] * 5, "layers_per_block": 1,
            "act_fn": "silu", "latent_channels": 4, "sample_size": 64, "num_vq_embeddings": codebook_size,
            "norm_num_groups": 4, "vq_embed_dim": None, "scaling_factor": 0.18215, "norm_type": "group",
            "mid_block_add_attention": False, "lookup_from_codebook": True, "force_upcast": True}


def toy_vqmodel(codebook_size: int = 64, *, seed: int = 0, palette: torch.Tensor | None = None):
    """A seeded diffusers VQModel of `toy_vqvae_config`; with `palette` ([codebook_size, 3] in [0, 1]) its
    decoder is made a painter (`paint_vqmodel`). The global RNG is left as it was."""
    from diffusers import VQModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vq = VQModel(**toy_vqvae_config(codebook_size))
    if palette is not None:
        paint_vqmodel(vq, palette)
    return vq.eval()


@torch.no_grad()
def paint_vqmodel(vq, palette) -> None:
    """Set `vq`'s weights so code k decodes to a flat block of colour palette[k] (to ~1e-6), so pixel rewards
    see what the tokens say (the DiMOO twin of engine.model.paint_vq_decoder).

    Codebook entry k = (r, g, b, 0); post_quant_conv copies it; conv_in writes each colour a as the group of
    four channels (a, -a, L, -L), L = 1000; every resnet's conv2 is zeroed (block = identity), every upsampler
    conv copies its centre tap; the last GroupNorm then sees mean 0 and variance (a^2 + L^2) / 2, i.e.
    a * sqrt(2) / L to 5e-7 relative, which its weight L / sqrt(2) and bias 20 undo; silu(a + 20) = a + 20 to
    4e-8 and conv_out subtracts 20. Needs `toy_vqvae_config`'s layout (4 channels per group, >= 3 groups)."""
    pal = torch.as_tensor(palette, dtype=torch.float32)
    n_codes, lat = vq.quantize.embedding.weight.shape
    if pal.shape != (n_codes, 3) or float(pal.min()) < 0 or float(pal.max()) > 1:
        raise ValueError(f"palette: expected [{n_codes}, 3] colours in [0, 1], got {tuple(pal.shape)}")
    dec = vq.decoder
    width = dec.conv_in.out_channels
    if dec.conv_norm_out.num_groups * 4 != width or width < 12 or lat < 3:
        raise ValueError("paint_vqmodel: needs 4 channels per group in the decoder's last GroupNorm (toy_vqvae_config)")
    big, shift = 1000.0, 20.0

    def centre(conv, mapping, bias=None):
        conv.weight.zero_()
        conv.bias.zero_()
        k = conv.weight.shape[-1] // 2
        for o, i, v in mapping:
            conv.weight[o, i, k, k] = v
        for o, v in (bias or {}).items():
            conv.bias[o] = v

    code = torch.zeros(n_codes, lat)
    code[:, :3] = pal
    vq.quantize.embedding.weight.copy_(code)
    centre(vq.post_quant_conv, [(c, c, 1.0) for c in range(lat)])
    centre(dec.conv_in, [m for c in range(3) for m in ((4 * c, c, 1.0), (4 * c + 1, c, -1.0))],
           {o: v for c in range(3) for o, v in ((4 * c + 2, big), (4 * c + 3, -big))})
    for module in dec.modules():
        kind = type(module).__name__
        if kind == "ResnetBlock2D":
            module.conv2.weight.zero_()
            module.conv2.bias.zero_()
            if module.conv_shortcut is not None:
                raise ValueError("paint_vqmodel: needs equal channels at every level (toy_vqvae_config)")
        elif kind == "Upsample2D":
            centre(module.conv, [(c, c, 1.0) for c in range(module.conv.in_channels)])
    norm = dec.conv_norm_out
    norm.weight.zero_()
    norm.bias.zero_()
    for c in range(3):
        norm.weight[4 * c] = (big**2 / 2) ** 0.5
        norm.bias[4 * c] = shift
    centre(dec.conv_out, [(c, 4 * c, 1.0) for c in range(3)], dict.fromkeys(range(3), -shift))


def grid_pixels(height: int, width: int, downsample: int = DOWNSAMPLE) -> tuple[int, int]:
    """Code grid (h, w) -> decoded image size (h * 16, w * 16)."""
    return height * downsample, width * downsample
