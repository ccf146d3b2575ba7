"""The optimizer: bf16 weights at lr 1e-6 lose their AdamW steps without fp32 master weights; `optim.master_weights`
keeps them."""

from __future__ import annotations

import pytest
import torch

from engine.config import load_config
from engine.trainer import PairGRPOTrainer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from engine.data.toyworld import generate_toy_world

    out = tmp_path_factory.mktemp("masterworld") / "world"
    generate_toy_world(8, out, seed=0, size=32, progress=False)
    return out / "pairs.jsonl"


def make(world, run_dir, **extra):
    base = {"data.pairs_path": world, "train.run_dir": run_dir, "train.progress": "false", "data.pairs_per_step": 2,
            "rollout.group_size": 4, "rollout.max_new_tokens": 3, "model.dtype": "bfloat16", "optim.lr": 1e-6,
            "algo.mu": 1, "optim.optimizer": "adamw8bit"}
    base.update(extra)
    return PairGRPOTrainer.from_config(load_config(None, [f"{k}={v}" for k, v in base.items()]))


def _weights(tr):
    return torch.cat([p.detach().float().flatten() for p in tr.optimizer.params])


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_adamw8bit_is_never_paged(device_type):
    """Paged optimizer state lives in CUDA managed memory: torch.cuda.max_memory_allocated would not count it
    and a shared GPU could be oversubscribed. The choice is made without a GPU, so it is tested on CPU."""
    import bitsandbytes as bnb

    from engine.optim import optimizer_class

    chosen = optimizer_class("adamw8bit", device_type)
    assert chosen is bnb.optim.AdamW8bit and not issubclass(chosen, bnb.optim.PagedAdamW8bit)
    assert optimizer_class("adamw", device_type) is torch.optim.AdamW
    with pytest.raises(ValueError, match="optim.optimizer"):
        optimizer_class("sgd", device_type)


@pytest.mark.parametrize("optimizer", ["adamw8bit", "adamw"])
def test_lr_1e6_updates_survive_only_with_master_weights(world, tmp_path, optimizer):
    moved = {}
    for master in (False, True):
        tr = make(world, tmp_path / str(master), **{"optim.master_weights": master, "optim.optimizer": optimizer})
        before = _weights(tr)
        for _ in range(3):
            tr.train_step()
        moved[master] = float((_weights(tr) != before).float().mean())
        print(f"{optimizer}, master_weights={master}: {moved[master]:.1%} of bf16 weights changed in 3 steps")
        if master:
            kept = float((torch.cat([m.detach().flatten() for m in tr.optimizer.master]) != before).float().mean())
            print(f"{optimizer}: {kept:.1%} of the fp32 masters changed")
            assert kept > 0.5  # the steps are all there, accumulating until they cross a bf16 rounding point
            # the masters carry what bf16 cannot: they moved by ~lr per step, off the bf16 grid
            pairs = zip(tr.optimizer.params, tr.optimizer.master)
            drift = torch.cat([(m.detach() - p.detach().float()).abs().flatten() for p, m in pairs])
            assert 0 < float(drift.max()) and all(m.dtype == torch.float32 for m in tr.optimizer.master)
            assert all(p.dtype == torch.bfloat16 for p in tr.optimizer.params)
    # bf16 weights alone lose nearly every 1e-6 step (only near-zero weights have a fine enough grid)
    assert moved[False] < 0.05
    assert moved[True] > moved[False]
