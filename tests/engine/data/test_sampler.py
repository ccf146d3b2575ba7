"""Training pairs: checked before any model loads, visited once per epoch in a seeded order, resumable."""

from __future__ import annotations

import pytest

from engine.data.sampler import PairSampler, read_training_pairs


def test_every_pair_once_per_epoch_and_a_resumed_sampler_continues_the_order():
    pairs = list("abcdefg")
    sampler = PairSampler(pairs, per_step=3, seed=5, shuffle=True)
    steps = [sampler.next() for _ in range(7)]  # 21 draws = 3 epochs of 7
    flat = [p for s in steps for p in s]
    for epoch in range(3):
        assert sorted(flat[7 * epoch: 7 * (epoch + 1)]) == pairs
    assert flat[:7] != flat[7:14]  # reshuffled each epoch
    again = PairSampler(pairs, per_step=3, seed=5, shuffle=True)
    again.next(), again.next()
    resumed = PairSampler(pairs, per_step=3, seed=5, shuffle=True)
    resumed.load_state_dict(again.state_dict())
    assert [resumed.next() for _ in range(5)] == steps[2:]
    assert PairSampler(pairs, 4, 0, shuffle=False).next_indices() == [0, 1, 2, 3]


def test_checks_name_the_file_and_the_pair(toy_world):
    pairs, root = read_training_pairs(toy_world, max_pairs=3)
    assert len(pairs) == 3 and root == toy_world.resolve().parent
    seen = []

    def third_is_bad(pair):
        seen.append(pair)
        return "too blue" if len(seen) == 3 else None

    with pytest.raises(ValueError, match=r"pairs\.jsonl:3: pair #3: too blue"):
        read_training_pairs(toy_world, checks=[third_is_bad])
