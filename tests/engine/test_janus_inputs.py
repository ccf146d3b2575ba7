"""What a real Janus-Pro checkpoint feeds the engine: images as the processor makes them, a
generation config written without `generation_kwargs`, the language model's cache argument."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from engine import model as janus
from engine.data.sampler import ImageCache
from engine.data.schema import Sample
from engine.text import BACKGROUND, load_image, to_pixel_values


def _photo(path, width, height, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    # smooth gradients plus noise: bicubic resampling of it differs from a stretch everywhere
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("width,height,size", [(200, 120, 384), (120, 200, 384), (200, 120, 32), (300, 12, 32)])
def test_non_square_images_equal_the_janus_image_processor(tmp_path, width, height, size):
    from PIL import Image
    from transformers import JanusImageProcessor

    path = _photo(tmp_path / "im.png", width, height)
    proc = JanusImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    assert tuple(proc.background_color) == BACKGROUND
    with Image.open(path) as im:
        expected = proc(images=im.convert("RGB"), return_tensors="pt")["pixel_values"][0]
    image = load_image(path, size)
    assert image.dtype == torch.uint8 and image.shape == (3, size, size)
    got = to_pixel_values(image.float()[None] / 255.0, size)[0]
    torch.testing.assert_close(got, expected.float(), atol=1e-6, rtol=0)
    # a stretched image (the old resize) is far from it: the test would see a regression to it
    with Image.open(path) as im:
        stretched = np.array(im.convert("RGB").resize((size, size), Image.BICUBIC))
    stretched = torch.from_numpy(stretched).permute(2, 0, 1).float() / 255.0 * 2 - 1
    assert (stretched - expected).abs().mean() > 0.1


def test_image_cache_keeps_uint8_and_returns_unit_floats(tmp_path):
    _photo(tmp_path / "a.png", 64, 40)
    cache = ImageCache(tmp_path, 32, load_image)
    sample = Sample(image_path="a.png")
    first = cache(sample)
    assert first.dtype == torch.float32 and 0 <= float(first.min()) and float(first.max()) <= 1
    (stored,) = cache._images.values()
    assert stored.dtype == torch.uint8 and stored.numel() == 3 * 32 * 32
    torch.testing.assert_close(cache(sample), stored.float() / 255.0)
    assert len(cache._images) == 1


class _Tokenizer:
    boi_token, pad_token_id, bos_token_id = "<begin_of_image>", 7, 6

    def convert_tokens_to_ids(self, token):
        return {"<begin_of_image>": 9}[token]


def test_complete_generation_config_without_generation_kwargs():
    from transformers import GenerationConfig

    m = janus.tiny_janus(40)
    m.generation_config = GenerationConfig(eos_token_id=2)  # as generation_config.json without the key loads
    assert not hasattr(m.generation_config, "generation_kwargs")
    janus.complete_generation_config(m, _Tokenizer())
    assert janus.special_ids(m) == {"bos": 6, "pad": 7, "eos": 2, "boi": 9, "image": janus.TINY_SPECIAL.image}


def test_policy_hidden_uses_the_cache_argument_without_deprecation_warning():
    from transformers import StaticCache

    m = janus.tiny_janus(40)
    ids = torch.tensor([[1, 10, 11, 12]])
    mask = torch.ones_like(ids)
    embeds = m.get_input_embeddings()(ids)
    cache = StaticCache(config=m.config.text_config, max_cache_len=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            cached = janus.policy_hidden(m, embeds[:, :3], mask[:, :3], janus.positions_from_mask(mask)[:, :3], cache)
            last = janus.policy_hidden(m, embeds[:, 3:], mask, torch.tensor([[3]]), cache)
            full = janus.policy_hidden(m, embeds, mask, janus.positions_from_mask(mask))
    torch.testing.assert_close(torch.cat([cached, last], 1), full, atol=1e-5, rtol=1e-5)
