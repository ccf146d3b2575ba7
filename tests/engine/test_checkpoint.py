"""Checkpoints (engine/checkpoint.py): a failed save leaves the previous one, master weights are saved, resume is exact."""

from __future__ import annotations

import pytest
import torch

from engine import checkpoint
from engine.config import load_config
from engine.trainer import PairGRPOTrainer


@pytest.fixture
def make_trainer(toy_world, tiny_overrides):
    def make(run_dir, **extra):
        return PairGRPOTrainer.from_config(load_config(None, tiny_overrides(toy_world, run_dir, **extra)))
    return make


def test_failed_save_leaves_the_previous_checkpoint(toy_world, tmp_path, monkeypatch, make_trainer):
    tr = make_trainer(tmp_path)
    tr.train_step()
    first = tr.save()
    tr.train_step()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        tr.save()
    assert checkpoint.latest_checkpoint(tmp_path) == first
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()] == [first.name]
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    checkpoint.load_checkpoint(first, tr.model, tr.optimizer.inner)
    assert any(not torch.equal(before[n], p) for n, p in tr.model.named_parameters() if p.requires_grad)


def test_master_weights_are_checkpointed(tmp_path, make_trainer):
    master = {"model.dtype": "bfloat16", "algo.mu": 1, "optim.master_weights": True, "optim.lr": 1e-3}
    tr = make_trainer(tmp_path, **master)
    tr.train_step()
    path = tr.save()
    assert (path / "master.safetensors").is_file()
    fresh = make_trainer(tmp_path, **master, **{"train.resume": True})
    assert fresh.maybe_resume()
    for a, b in zip(tr.optimizer.master, fresh.optimizer.master):
        assert torch.equal(a, b)
    for a, b in zip(tr.optimizer.params, fresh.optimizer.params):
        assert torch.equal(a, b)
    # the resumed trainer continues exactly as the original one does
    a, b = tr.train_step(), fresh.train_step()
    assert {k: v for k, v in a.items() if not k.startswith("time.")} == {k: v for k, v in b.items()
                                                                         if not k.startswith("time.")}
    for x, y in zip(tr.optimizer.master, fresh.optimizer.master):
        assert torch.equal(x, y)


@pytest.mark.parametrize("update", ["kahan", "stochastic_rounding"])
def test_compensated_update_resumes_exactly(tmp_path, make_trainer, update):
    extra = {"model.dtype": "bfloat16", "algo.mu": 1, "optim.update": update, "optim.lr": 1e-4}
    tr = make_trainer(tmp_path, **extra)
    tr.train_step()
    path = tr.save()
    assert (path / "update.safetensors").is_file()
    tr.train_step()  # the state moves on, so the resumed one must come from the file
    tr = make_trainer(tmp_path / "again", **extra)
    tr.train_step()
    fresh = make_trainer(tmp_path, **extra, **{"train.resume": True})
    assert fresh.maybe_resume()
    for a, b in zip(tr.optimizer.update_state().values(), fresh.optimizer.update_state().values()):
        assert torch.equal(a, b)
    if update == "kahan":
        assert any(bool(c.ne(0).any()) for c in fresh.optimizer.compensation)
    for _ in range(2):
        a, b = tr.train_step(), fresh.train_step()
        assert {k: v for k, v in a.items() if not k.startswith("time.")} == {k: v for k, v in b.items()
                                                                             if not k.startswith("time.")}
    for x, y in zip(tr.optimizer.params, fresh.optimizer.params):
        assert torch.equal(x, y)
    for a, b in zip(tr.optimizer.update_state().values(), fresh.optimizer.update_state().values()):
        assert torch.equal(a, b)
