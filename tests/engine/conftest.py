"""Fixtures of the engine tests: a small toy world on disk, tiny-run config overrides, a tiny Janus and its prompts."""

from __future__ import annotations

import pytest
import torch

from engine import model as janus


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """A 16-pair toy world (pairs.jsonl + images) written once per session."""
    from engine.data.toyworld import generate_toy_world

    out = tmp_path_factory.mktemp("toyworld") / "world"
    generate_toy_world(16, out, seed=0, size=32, progress=False)
    return out / "pairs.jsonl"


def _tiny_overrides(pairs_path, run_dir, **extra) -> list[str]:
    base = {
        "data.pairs_path": str(pairs_path), "train.run_dir": str(run_dir), "train.progress": "false",
        "data.pairs_per_step": 2, "rollout.group_size": 4, "rollout.max_new_tokens": 3,
        "optim.micro_batch_size": 8, "train.steps": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def tiny_overrides():
    """`tiny_overrides(pairs_path, run_dir, **{"key": value})` -> `key=value` overrides of a run
    small enough for a few seconds per step on 2 shared CPU cores."""
    return _tiny_overrides


@pytest.fixture
def tiny():
    """A tiny random Janus with a 96-word vocabulary, fresh per test (building it takes milliseconds)."""
    return janus.tiny_janus(96, seed=3)


@pytest.fixture
def image_prompts():
    """`image_prompts(n, length, seed=0)` -> (ids, mask): n unpadded generation prompts `<bos> words <boi>`."""
    def make(n, length, seed=0):
        g = torch.Generator().manual_seed(seed)
        body = torch.randint(6, 96, (n, length), generator=g)
        bos, boi = torch.full((n, 1), janus.TINY_SPECIAL.bos), torch.full((n, 1), janus.TINY_SPECIAL.boi)
        ids = torch.cat([bos, body, boi], 1)
        return ids, torch.ones_like(ids)
    return make


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model construction fails the test: errors must come first."""
    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the config/data error")

    monkeypatch.setattr(janus, "tiny_janus", boom)
    monkeypatch.setattr(janus, "load_janus", boom)


@pytest.fixture(scope="session")
def trained_run(toy_world, tmp_path_factory, tiny_overrides):
    """(trainer after 2 steps, run dir): a tiny-model run on the toy world, checkpointed at its last step.
    Session-scoped: tests read it, never change it (the trainer's model is the checkpoint's policy)."""
    from engine.config import load_config
    from engine.trainer import PairGRPOTrainer

    run = tmp_path_factory.mktemp("trained") / "run"
    trainer = PairGRPOTrainer.from_config(load_config(None, tiny_overrides(toy_world, run)))
    trainer.train()
    return trainer, run


@pytest.fixture(scope="session")
def lora_run(toy_world, tmp_path_factory, tiny_overrides):
    """(trainer after 2 steps, run dir): a tiny-model LoRA run (rank 4 on every target, fp32 base, lr 1e-2 so the
    adapters move far from B = 0), checkpointed at its last step. Session-scoped: tests read it, never change it."""
    from engine.config import load_config
    from engine.trainer import PairGRPOTrainer

    run = tmp_path_factory.mktemp("lora") / "run"
    extra = {"model.lora.rank": 4, "model.lora.alpha": 8, "model.lora.targets": "[attention,mlp,generation_head,lm_head]",
             "optim.lr": 1e-2}
    trainer = PairGRPOTrainer.from_config(load_config(None, tiny_overrides(toy_world, run, **extra)))
    trainer.train()
    return trainer, run
