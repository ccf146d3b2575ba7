"""Model: the tiny Janus, the painted VQ decoder, what trains, loading from a local directory."""

from __future__ import annotations

import logging

import pytest
import torch

from engine import model as janus
from engine.config import DEFAULT_TRAIN_MODULES


def test_tiny_janus_shapes():
    m = janus.tiny_janus(80)
    assert janus.image_token_count(m) == 16
    assert m.model.vqmodel.config.num_embeddings == 64
    assert m.config.text_config.hidden_size == 64 and m.config.text_config.num_hidden_layers == 2
    assert m.model.generation_head.vision_head.out_features == 64
    assert janus.special_ids(m) == {"bos": 1, "pad": 0, "eos": 2, "boi": 3, "image": 4}


def test_painted_decoder_draws_each_token_as_a_colour_block():
    palette = janus.codebook_palette([(255, 255, 255), (220, 30, 30), (30, 70, 220)], 64, seed=1)
    m = janus.tiny_janus(80, palette=palette)
    tokens = torch.randint(0, 64, (5, 16), generator=torch.Generator().manual_seed(0))
    images = janus.decode_images(m, tokens)
    block = images.shape[-1] // 4
    expected = palette[tokens].view(5, 4, 4, 3).permute(0, 3, 1, 2)
    expected = expected.repeat_interleave(block, 2).repeat_interleave(block, 3)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="palette"):
        janus.paint_vq_decoder(m, palette[:10])


def test_set_trainable_freezes_vision_and_vq():
    m = janus.tiny_janus(80)
    counts = janus.set_trainable(m, DEFAULT_TRAIN_MODULES)
    assert set(counts) == set(DEFAULT_TRAIN_MODULES)
    assert not any(p.requires_grad for p in m.model.vision_model.parameters())
    assert not any(p.requires_grad for p in m.model.vqmodel.parameters())
    assert not m.model.generation_embeddings.weight.requires_grad
    assert all(p.requires_grad for p in m.model.language_model.parameters())
    assert all(p.requires_grad for p in m.model.generation_head.parameters())
    with pytest.raises(ValueError, match="train_modules"):
        janus.set_trainable(m, ["language_model", "decoder"])


def test_load_janus_from_a_local_safetensors_directory(tmp_path, caplog):
    m = janus.tiny_janus(80, seed=5)
    m.save_pretrained(tmp_path / "tiny", safe_serialization=True)
    with caplog.at_level(logging.INFO, logger="pairuni.model"):
        loaded = janus.load_janus(str(tmp_path / "tiny"), dtype="float32")
    assert "attention implementation: sdpa" in caplog.text
    ids = torch.tensor([[1, 10, 11, 3]])
    with torch.no_grad():
        mask = torch.ones_like(ids)
        a = janus.policy_hidden(m, m.get_input_embeddings()(ids), mask, janus.positions_from_mask(mask))
        b = janus.policy_hidden(loaded, loaded.get_input_embeddings()(ids), mask, janus.positions_from_mask(mask))
    torch.testing.assert_close(a, b)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        janus.load_janus(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        janus.load_janus("deepseek-community/Janus-Pro-1B")


def test_gradient_checkpointing_gives_the_same_gradient():
    ids = torch.tensor([[1, 10, 11, 12, 3], [0, 1, 13, 14, 3]])
    mask = (ids != 0).long()
    grads = []
    for checkpointing in (False, True):
        m = janus.tiny_janus(80, seed=2).train()
        if checkpointing:
            janus.enable_gradient_checkpointing(m)
            assert m.model.language_model.gradient_checkpointing
        h = janus.policy_hidden(m, m.get_input_embeddings()(ids), mask, janus.positions_from_mask(mask))
        (janus.image_head_input(m, h) ** 2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.model.language_model.parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])
