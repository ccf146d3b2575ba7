"""engine/dimoo/vq.py: DiMOO's decode call and the toy world's painter VQ."""

import pytest
import torch

from engine.dimoo.vq import decode_codes, grid_pixels, paint_vqmodel, toy_vqmodel


def _blocks(palette, codes):
    """[B, h, w] codes -> [B, 3, 16h, 16w]: each code a flat 16 x 16 block of its colour (by hand)."""
    return palette[codes].permute(0, 3, 1, 2).repeat_interleave(16, 2).repeat_interleave(16, 3)


def test_painter_decodes_each_code_to_its_colour(gen):
    palette = torch.rand(64, 3, generator=gen)
    vq = toy_vqmodel(64, seed=3, palette=palette)
    codes = torch.randint(0, 64, (2, 4, 3), generator=gen)
    img = decode_codes(vq, codes)
    assert img.shape == (2, 3, *grid_pixels(4, 3)) == (2, 3, 64, 48)
    torch.testing.assert_close(img, _blocks(palette, codes), atol=1e-5, rtol=0)
    plain = decode_codes(toy_vqmodel(64, seed=3), codes)  # negative control: random decoder, far off
    assert (plain - _blocks(palette, codes)).abs().max() > 0.1


def test_decode_codes_is_dimoos_call_clipped(dimoo_dir, gen):
    from diffusers import VQModel

    vq = VQModel.from_pretrained(dimoo_dir, subfolder="vqvae").eval()
    codes = torch.randint(0, 8192, (2, 2, 3), generator=gen)
    with torch.no_grad():
        raw = vq.decode(codes.flatten(), force_not_quantize=True, shape=(2, 2, 3, 4)).sample
    assert torch.equal(decode_codes(vq, codes), raw.clip(0, 1))
    for bad in (codes[0], codes.float(), codes + 8192, codes - 8192):
        with pytest.raises(ValueError, match="codes"):
            decode_codes(vq, bad)


def test_painter_refuses_bad_palettes_and_layouts(gen):
    vq = toy_vqmodel(16)
    for bad in (torch.rand(15, 3, generator=gen), torch.rand(16, 3, generator=gen) + 1):
        with pytest.raises(ValueError, match="palette"):
            paint_vqmodel(vq, bad)
    from diffusers import VQModel

    from engine.dimoo.fixture import tiny_vqvae_config

    with pytest.raises(ValueError, match="paint_vqmodel"):
        paint_vqmodel(VQModel(**tiny_vqvae_config(16)), torch.rand(16, 3, generator=gen))
