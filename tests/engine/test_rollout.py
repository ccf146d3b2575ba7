"""Rollouts: parity with transformers' image generate, batch independence, uncond prompts, ratio 1."""

from __future__ import annotations

import pytest
import torch

from engine import model as M
from engine.config import load_config
from engine.rollout import (
    generation_head_input,
    rollout_generation,
    rollout_understanding,
    uncond_prompt,
    understanding_hidden,
)
from pairuni_kernels import linear_logprobs


@pytest.fixture(scope="module")
def tiny():
    return M.tiny_janus(96, seed=3)


def _prompts(n, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    body = torch.randint(6, 96, (n, length), generator=g)
    ids = torch.cat([torch.full((n, 1), M.TINY_SPECIAL.bos), body, torch.full((n, 1), M.TINY_SPECIAL.boi)], 1)
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize("cfg_scale", [5.0, 2.0])
def test_greedy_image_rollout_matches_transformers_generate(tiny, cfg_scale):
    ids, mask = _prompts(3, 7)
    expected = tiny.generate(ids, attention_mask=mask, generation_mode="image", do_sample=False,
                             guidance_scale=cfg_scale)
    ro = rollout_generation(tiny, ids, mask, cfg_scale=cfg_scale, temperature=0.0, seeds=torch.arange(3),
                            decode=False)
    assert ro.image_tokens.shape == (3, M.image_token_count(tiny))
    assert torch.equal(ro.image_tokens, expected)
    assert len(set(map(tuple, ro.image_tokens.tolist()))) > 1  # the prompts matter: not a vacuous match


def test_a_rollout_does_not_depend_on_its_batch_neighbours(tiny):
    ids, mask = _prompts(4, 5, seed=1)
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


@pytest.mark.parametrize("image_logprob", ["cond", "cfg"])
def test_teacher_forced_logprobs_equal_rollout_logprobs(tiny, image_logprob):
    ids, mask = _prompts(3, 6, seed=2)
    mask = mask.clone()
    mask[0, :3] = 0  # a left-padded row
    ids[0, :3] = M.TINY_SPECIAL.pad
    ro = rollout_generation(tiny, ids, mask, cfg_scale=5.0, temperature=1.0, seeds=torch.arange(3),
                            image_logprob=image_logprob, decode=False)
    with torch.no_grad():
        h = generation_head_input(tiny, ro)
        w, b = M.image_head(tiny)
        lp = linear_logprobs(h.flatten(0, 1), w, ro.image_tokens.flatten(), bias=b).view_as(ro.old_logp)
    torch.testing.assert_close(lp, ro.old_logp, atol=2e-5, rtol=0)

    q = torch.cat([torch.full((2, 1), M.TINY_SPECIAL.bos), torch.full((2, 16), M.TINY_SPECIAL.image),
                   torch.randint(6, 96, (2, 5))], 1)
    qmask = torch.ones_like(q)
    qmask[1, :1] = 0
    pv = torch.randn(2, 3, 32, 32)
    ru = rollout_understanding(tiny, q, qmask, pv, max_new_tokens=5, temperature=0.7, seeds=torch.arange(2))
    with torch.no_grad():
        h = understanding_hidden(tiny, ru)
        lp = linear_logprobs(h.flatten(0, 1), tiny.lm_head.weight, ru.response_ids.flatten(),
                             temperature=0.7).view_as(ru.old_logp)
    torch.testing.assert_close(lp, ru.old_logp, atol=2e-5, rtol=0)


def test_trainer_ratio_is_one_before_the_first_update(toy_world, tmp_path, tiny_overrides):
    from engine.trainer import PairGRPOTrainer

    cfg = load_config(None, tiny_overrides(toy_world, tmp_path, **{"rollout.image_logprob": "cfg"}))
    tr = PairGRPOTrainer.from_config(cfg)
    batch = tr.make_batch(1, tr.sampler.next())
    assert batch.und.response_mask.any() and batch.adv_gen.abs().sum() > 0
    tr.model.zero_grad()
    sums = tr.backward(batch)
    for task, (loss, clip_fraction, ratio_mean, _) in sums.items():
        assert ratio_mean == pytest.approx(1.0, abs=1e-5), task
        assert clip_fraction == 0.0, task
