"""The per-task policy view: teacher-forced log-probs equal the rollouts' own, one scoring temperature."""

from __future__ import annotations

import pytest
import torch

from engine import model as janus
from engine.policy import scoring_temperature, task_mask, task_view
from engine.rollout import rollout_generation, rollout_understanding
from pairuni_kernels import linear_logprobs


def _view_logp(model, task, ro):
    with torch.no_grad():
        v = task_view(model, task, ro)
        n, t, h = v.hidden.shape
        return linear_logprobs(v.hidden.reshape(n * t, h), v.weight, v.targets.reshape(-1), bias=v.bias,
                               temperature=v.temperature).view(n, t)


def test_scoring_temperature_scores_greedy_rollouts_at_one():
    assert scoring_temperature(0.0) == 1.0
    assert scoring_temperature(0.7) == 0.7


@pytest.mark.parametrize("image_logprob", ["cond", "cfg"])
def test_teacher_forced_logprobs_equal_rollout_logprobs(tiny, image_prompts, image_logprob):
    ids, mask = image_prompts(3, 6, seed=2)
    mask = mask.clone()
    mask[0, :3] = 0  # a left-padded row
    ids[0, :3] = janus.TINY_SPECIAL.pad
    ro = rollout_generation(tiny, ids, mask, cfg_scale=5.0, temperature=1.0, seeds=torch.arange(3),
                            image_logprob=image_logprob, decode=False)
    torch.testing.assert_close(_view_logp(tiny, "generation", ro), ro.old_logp, atol=2e-5, rtol=0)
    assert task_mask("generation", ro).all()

    q = torch.cat([torch.full((2, 1), janus.TINY_SPECIAL.bos), torch.full((2, 16), janus.TINY_SPECIAL.image),
                   torch.randint(6, 96, (2, 5))], 1)
    qmask = torch.ones_like(q)
    qmask[1, :1] = 0
    pv = torch.randn(2, 3, 32, 32)
    ru = rollout_understanding(tiny, q, qmask, pv, max_new_tokens=5, temperature=0.7, seeds=torch.arange(2))
    torch.testing.assert_close(_view_logp(tiny, "understanding", ru), ru.old_logp, atol=2e-5, rtol=0)
    assert torch.equal(task_mask("understanding", ru), ru.response_mask)
    with pytest.raises(ValueError, match="task"):
        task_mask("captioning", ru)
