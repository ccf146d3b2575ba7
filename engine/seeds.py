"""Every random stream of a run, each a named function of `train.seed`, in one table (so no two streams
draw alike by accident, and a new one is added here, next to the others).

| stream | seed of its generator | used by |
|---|---|---|
| rollouts of a task | `(seed * 1_000_003 + step) * 17 + ROLLOUT_STREAMS[task]` | trainer (understanding, generation), evaluate |
| data order | `seed * 7_919 + epoch` | data.sampler.PairSampler (one shuffle per epoch) |
| stochastic rounding | `seed + 0x5EED` | optim (optim.update=stochastic_rounding) |
| held-out split | `seed + 104_729` | run_start.data_splits (data.eval_fraction) |
| clip_cov's token choice | `token_selection`: step, inner epoch, task, rank, micro-batch | algo (loss_type=clip_cov) |
| LoRA adapters' initial A | `seed + 0x10BA` | dimoo.trainer (model.lora.rank > 0) |
"""

from __future__ import annotations

#: Rollout streams: training answers, training images, evaluation images.
ROLLOUT_STREAMS = {"understanding": 0, "generation": 1, "evaluation": 2}
ROUNDING_SEED_OFFSET = 0x5EED
EVAL_SPLIT_SEED = 104_729
ADAPTER_INIT_SEED_OFFSET = 0x10BA


def rollout_stream(seed: int, step: int, stream: str) -> int:
    """Seed of the generator that draws the per-row rollout seeds of `stream` at `step`."""
    return (seed * 1_000_003 + step) * 17 + ROLLOUT_STREAMS[stream]


def data_order(seed: int, epoch: int) -> int:
    """Seed of the shuffle of the pairs in `epoch`."""
    return seed * 7_919 + epoch


def rounding(seed: int) -> int:
    """Seed of the stochastic-rounding generator (its state is checkpointed)."""
    return seed + ROUNDING_SEED_OFFSET


def eval_split(seed: int) -> int:
    """Seed of the draw of data.eval_fraction's held-out pairs."""
    return seed + EVAL_SPLIT_SEED


def adapter_init(seed: int) -> int:
    """Seed of the LoRA adapters' initial A matrices (B starts at 0), so a LoRA run starts alike in any process."""
    return seed + ADAPTER_INIT_SEED_OFFSET


def token_selection(seed: int, step: int, task: str, row: int, epoch: int, rank: int) -> int:
    """Seed of clip_cov's random token choice for the micro-batch starting at `row` of `task` in inner epoch
    `epoch` of `step` on process `rank`. verl draws from the global RNG; here it is a pure function of
    train.seed and the place, so a run repeats and resumes exactly."""
    place = ((((seed * 1_000_003 + step) * 64 + epoch) * 2 + (task == "generation")) * 4096 + rank) * 65_537 + row
    return place % (1 << 63)  # torch.Generator.manual_seed takes 64 bits
