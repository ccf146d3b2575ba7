"""PairGRPO learns: on the toy world with a fixed seed both mean rewards rise clearly.

A sign error in the advantages or the loss makes the rewards fall or stay flat, failing this test.
"""

from __future__ import annotations

import json

from engine.config import load_config
from engine.trainer import PairGRPOTrainer


def test_pairgrpo_raises_both_rewards(toy_world, tmp_path):
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
