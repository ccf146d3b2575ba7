"""The PairGRPO step: advantages with pair weights, micro-batch invariance, reference model, CLI run,
atomic checkpoints and exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from engine import checkpoint, cli
from engine.config import load_config
from engine.trainer import PairGRPOTrainer
from pairuni_kernels import group_advantages


@pytest.fixture
def make_trainer(toy_world, tiny_overrides):
    def make(run_dir, **extra):
        return PairGRPOTrainer.from_config(load_config(None, tiny_overrides(toy_world, run_dir, **extra)))
    return make


def test_advantages_are_grouped_and_pair_weighted(toy_world, tmp_path, make_trainer):
    tr = make_trainer(tmp_path, **{"data.shuffle": "false", "data.pairs_per_step": 8})
    batch = tr.make_batch(1, tr.sampler.next())
    g = tr.cfg.rollout.group_size
    group_ids = torch.arange(len(batch.pairs)).repeat_interleave(g)
    w = torch.tensor([1.0 if p.aligned else math.sqrt(p.similarity) for p in batch.pairs]).repeat_interleave(g)
    assert any(not p.aligned for p in batch.pairs) and any(p.aligned for p in batch.pairs)
    for rewards, adv in ((batch.rewards_und, batch.adv_und), (batch.rewards_gen, batch.adv_gen)):
        torch.testing.assert_close(adv, group_advantages(rewards, group_ids) * w)
    assert batch.rewards_gen.std() > 0


@pytest.mark.parametrize("weighting, weight_of", [("linear", lambda s: s), ("sqrt", math.sqrt)])
def test_pair_weighting_scales_retrieved_pairs(toy_world, tmp_path, make_trainer, weighting, weight_of):
    tr = make_trainer(tmp_path, **{"data.shuffle": "false", "data.pairs_per_step": 8, "algo.pair_weighting": weighting})
    batch = tr.make_batch(1, tr.sampler.next())
    g = tr.cfg.rollout.group_size
    group_ids = torch.arange(len(batch.pairs)).repeat_interleave(g)
    w = torch.tensor([1.0 if p.aligned else weight_of(p.similarity) for p in batch.pairs]).repeat_interleave(g)
    assert any(0 < p.similarity < 1 for p in batch.pairs if not p.aligned)
    torch.testing.assert_close(batch.adv_gen, group_advantages(batch.rewards_gen, group_ids) * w)


def test_gradient_does_not_depend_on_micro_batch_size(toy_world, tmp_path, make_trainer):
    grads = []
    for mb in (16, 3):
        tr = make_trainer(tmp_path / str(mb), **{"optim.micro_batch_size": mb})
        batch = tr.make_batch(1, tr.sampler.next())
        # one fake update step moves the policy so that ratios differ from 1 (clipping active)
        tr.update(batch)
        tr.model.zero_grad()
        tr.backward(batch)
        grads.append(torch.cat([p.grad.flatten() for p in tr.optimizer.params]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_reference_model_only_when_beta_is_positive(toy_world, tmp_path, make_trainer):
    assert make_trainer(tmp_path / "a").ref_model is None
    tr = make_trainer(tmp_path / "b", **{"algo.beta": 0.1})
    assert tr.ref_model is not None and not any(p.requires_grad for p in tr.ref_model.parameters())
    row = tr.train_step()
    assert row["kl.understanding"] >= 0 and math.isfinite(row["loss.generation"])


def _rows(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time.")} for r in rows]


def test_cli_run_writes_artifacts_and_resume_is_exact(toy_world, tmp_path, capsys, tiny_overrides):
    full = tmp_path / "full"
    assert cli.main(["train", *tiny_overrides(toy_world, full, **{"train.steps": 4})]) == 0
    out = capsys.readouterr().out
    assert "PairGRPO: 4 steps" in out and "understanding reward" in out
    assert (full / "reward_curve.png").stat().st_size > 0
    assert list((full / "tb").glob("events.out.tfevents.*"))
    assert checkpoint.latest_checkpoint(full).name == "step_000004"
    assert len(_rows(full)) == 4

    part = tmp_path / "part"
    assert cli.main(["train", *tiny_overrides(toy_world, part, **{"train.steps": 2})]) == 0
    assert cli.main(["train", *tiny_overrides(toy_world, part, **{"train.steps": 4, "train.resume": "true"})]) == 0
    assert "resumed at step 2" in capsys.readouterr().out
    assert _rows(part) == _rows(full)  # losses, rewards, grad norms: bit for bit


def test_rollouts_in_chunks_equal_one_big_rollout(toy_world, tmp_path, make_trainer):
    batches = []
    for max_batch in (0, 3):
        tr = make_trainer(tmp_path / str(max_batch), **{"rollout.max_batch": max_batch})
        batches.append(tr.make_batch(1, tr.sampler.next()))
    a, b = batches
    assert torch.equal(a.gen.image_tokens, b.gen.image_tokens)
    torch.testing.assert_close(a.gen.old_logp, b.gen.old_logp, atol=1e-5, rtol=0)
    t = a.und.response_ids.shape[1]
    assert torch.equal(a.und.response_mask, b.und.response_mask[:, :t])
    assert not b.und.response_mask[:, t:].any()
    assert torch.equal(a.und.response_ids[a.und.response_mask], b.und.response_ids[:, :t][a.und.response_mask])
    assert a.und.texts == b.und.texts
    torch.testing.assert_close(a.rewards_gen, b.rewards_gen)


def test_pairgrpo_raises_both_rewards(toy_world, tmp_path):
    """On the toy world with a fixed seed both mean rewards rise clearly; a sign error in the advantages or
    the loss makes them fall or stay flat."""
    cfg = load_config(None, [
        f"data.pairs_path={toy_world}", f"train.run_dir={tmp_path}", "train.progress=false",
        "data.max_pairs=4", "data.pairs_per_step=2", "rollout.group_size=8", "rollout.max_new_tokens=3",
        "algo.mu=2", "optim.lr=1e-2", "train.steps=30", "train.seed=0",
    ])
    PairGRPOTrainer.from_config(cfg).train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for task in ("understanding", "generation"):
        r = [row[f"reward.{task}"] for row in rows]
        first, last = sum(r[:5]) / 5, sum(r[-8:]) / 8
        assert last > first + 0.15, (task, first, last, r)


def test_trainer_ratio_is_one_before_the_first_update(toy_world, tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides(toy_world, tmp_path, **{"rollout.image_logprob": "cfg"}))
    tr = PairGRPOTrainer.from_config(cfg)
    batch = tr.make_batch(1, tr.sampler.next())
    assert batch.und.response_mask.any() and batch.adv_gen.abs().sum() > 0
    tr.model.zero_grad()
    sums = tr.backward(batch)
    for task, (loss, clip_fraction, ratio_mean, _) in sums.items():
        assert ratio_mean == pytest.approx(1.0, abs=1e-5), task
        assert clip_fraction == 0.0, task


def test_loss_type_estimator_and_entropy_knobs_run_and_log_entropy(toy_world, tmp_path, tiny_overrides, trained_run):
    """`pairuni train` with a non-default loss type, estimator, entropy bonus and top-entropy mask: finite rows
    with `entropy.<task>`; a default run's rows have no entropy key (metrics.jsonl as before)."""
    run = tmp_path / "knobs"
    knobs = {"algo.loss_type": "sapo", "algo.importance_sampling_level": "sequence_token",
             "algo.advantage_estimator": "rloo", "algo.entropy_coef": 0.01, "algo.top_entropy_quantile": 0.3,
             "train.steps": 1}
    assert cli.main(["train", *tiny_overrides(toy_world, run, **knobs)]) == 0
    (row,) = _rows(run)
    assert {"entropy.understanding", "entropy.generation"} <= row.keys()
    assert all(math.isfinite(v) for k, v in row.items() if k != "step") and row["entropy.generation"] > 0
    assert json.loads((run / "config.json").read_text())["algo"]["loss_type"] == "sapo"
    assert not any(k.startswith("entropy") for r in _rows(trained_run[1]) for k in r)
