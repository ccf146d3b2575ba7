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


def _effective(tr) -> torch.Tensor:
    """The weights a run holds, at its best precision: fp32 masters, bf16 + Kahan buffer, or the bf16 weights."""
    opt = tr.optimizer
    if opt.master is not None:
        return torch.cat([m.detach().flatten() for m in opt.master])
    if opt.compensation is not None:
        return torch.cat([(p.detach().float() + c.float()).flatten() for p, c in zip(opt.params, opt.compensation)])
    return _weights(tr)


@pytest.mark.parametrize("optimizer", ["adamw8bit", "adamw"])
def test_compensated_bf16_updates_follow_the_fp32_masters(world, tmp_path, optimizer):
    """At lr 1e-6, 3 steps from the same start: Kahan's bf16 + compensation moves about as many weights as
    fp32 masters do and lands near them; stochastic rounding's bf16 weights follow them on average (its
    displacement regressed on the masters' has slope ~1; rounding to nearest has ~0)."""
    runs = {"masters": {"optim.master_weights": True}, "kahan": {"optim.update": "kahan"},
            "stochastic_rounding": {"optim.update": "stochastic_rounding"}, "round": {}}
    start, moved = None, {}
    for name, extra in runs.items():
        tr = make(world, tmp_path / name, **{"optim.optimizer": optimizer, **extra})
        before = _weights(tr)
        assert start is None or torch.equal(before, start)
        start = before
        for _ in range(3):
            tr.train_step()
        moved[name] = _effective(tr) - before
        assert all(p.dtype == torch.bfloat16 for p in tr.optimizer.params)
    ref = moved["masters"]
    share = {name: float((d != 0).float().mean()) for name, d in moved.items()}
    error = {name: float((d - ref).norm() / ref.norm()) for name, d in moved.items()}
    slope = {name: float((d * ref).sum() / (ref * ref).sum()) for name, d in moved.items()}
    for name in runs:
        print(f"{optimizer} {name}: {share[name]:.1%} of weights moved, |d - d_masters| / |d_masters| = "
              f"{error[name]:.3f}, slope on the masters' displacement {slope[name]:.3f}")
    assert share["masters"] > 0.5 and share["kahan"] > share["masters"] - 0.05
    assert error["kahan"] < 0.02 and error["round"] > 0.9
    assert 0.8 < slope["stochastic_rounding"] < 1.2 and slope["round"] < 0.2
    assert 0.9 < slope["kahan"] < 1.1


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    """Each fp32 value rounds to one of its two bf16 neighbours, up with probability (x - lo) / (hi - lo)."""
    from engine.optim import stochastic_round_bf16

    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, generator=g) * 10.0 ** torch.randint(-4, 2, (64,), generator=g)
    down = x.to(torch.bfloat16)  # round to nearest, then pick the neighbour below and above
    lo = torch.where(down.float() > x, torch.nextafter(down, torch.full_like(down, -float("inf"))), down).float()
    hi = torch.nextafter(lo.to(torch.bfloat16), torch.full_like(down, float("inf"))).float()
    draws = torch.stack([stochastic_round_bf16(x, g).float() for _ in range(4000)])
    assert bool(((draws == lo) | (draws == hi)).all())
    p_up = (draws == hi).float().mean(0)
    expected = (x - lo) / (hi - lo)
    # 4000 Bernoulli draws: std of the frequency <= 0.008; 5 std
    assert float((p_up - expected).abs().max()) < 0.04
    assert float((draws.mean(0) - x).abs().div(hi - lo).max()) < 0.04


def test_compensated_update_needs_bf16_weights_without_masters(world, tmp_path):
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match="optim.update"):
        make(world, tmp_path, **{"optim.update": "kahan", "model.dtype": "float32"})
    with pytest.raises(ConfigError, match="optim.update"):
        make(world, tmp_path, **{"optim.update": "kahan", "optim.master_weights": True})
    with pytest.raises(ConfigError, match="optim.update"):
        make(world, tmp_path, **{"optim.update": "sr"})
