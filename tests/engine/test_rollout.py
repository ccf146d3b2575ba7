"""Rollouts: parity with transformers' image generate, batch independence, uncond prompts."""

from __future__ import annotations

import pytest
import torch

from engine import model as janus
from engine.rollout import rollout_generation, uncond_prompt


@pytest.mark.parametrize("cfg_scale", [5.0, 2.0])
def test_greedy_image_rollout_matches_transformers_generate(tiny, image_prompts, cfg_scale):
    ids, mask = image_prompts(3, 7)
    expected = tiny.generate(ids, attention_mask=mask, generation_mode="image", do_sample=False,
                             guidance_scale=cfg_scale)
    ro = rollout_generation(tiny, ids, mask, cfg_scale=cfg_scale, temperature=0.0, seeds=torch.arange(3),
                            decode=False)
    assert ro.image_tokens.shape == (3, janus.image_token_count(tiny))
    assert torch.equal(ro.image_tokens, expected)
    assert len(set(map(tuple, ro.image_tokens.tolist()))) > 1  # the prompts matter: not a vacuous match


def test_a_rollout_does_not_depend_on_its_batch_neighbours(tiny, image_prompts):
    ids, mask = image_prompts(4, 5, seed=1)
    seeds = torch.tensor([11, 22, 33, 44])
    both = rollout_generation(tiny, ids, mask, cfg_scale=5.0, temperature=1.0, seeds=seeds, decode=False)
    alone = rollout_generation(tiny, ids[2:3], mask[2:3], cfg_scale=5.0, temperature=1.0, seeds=seeds[2:3],
                               decode=False)
    assert torch.equal(both.image_tokens[2], alone.image_tokens[0])
    other = rollout_generation(tiny, ids[2:3], mask[2:3], cfg_scale=5.0, temperature=1.0,
                               seeds=torch.tensor([45]), decode=False)
    assert not torch.equal(other.image_tokens, alone.image_tokens)


def test_uncond_prompt_keeps_only_bos_and_boi():
    ids = torch.tensor([[0, 1, 7, 8, 3], [1, 9, 3, 10, 3]])
    out = uncond_prompt(ids, bos=1, boi=3, pad=0)
    assert out.tolist() == [[0, 1, 0, 0, 3], [1, 0, 3, 0, 3]]
