"""Fixtures of the engine tests: a small toy world on disk, and tiny-run config overrides."""

from __future__ import annotations

import pytest


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


@pytest.fixture
def tiny_overrides():
    """`tiny_overrides(pairs_path, run_dir, **{"key": value})` -> `key=value` overrides of a run
    small enough for a few seconds per step on 2 shared CPU cores."""
    return _tiny_overrides
