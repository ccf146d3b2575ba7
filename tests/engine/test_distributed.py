"""torchrun + FSDP2 on CPU (gloo, 2 processes): the same training as one process, and resume across world sizes.

Every run goes through `tests/engine/dist_worker.py` in a subprocess (fresh process groups, free
ports, the trainer's own `from_config` -> `init_from_env` -> `shard_model` path). The reference is
the plain single-process trainer (no process group, no FSDP) on the same global batch.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("dist_worker.py")
STEPS = 3  # step 3 of this seed has nonzero understanding advantages (steps 1-2: generation only)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    from engine.data.toyworld import generate_toy_world

    out = tmp_path_factory.mktemp("dist") / "world"
    generate_toy_world(16, out, seed=0, size=32, progress=False)
    return out


def overrides(world_dir: Path, run_dir: Path, **extra) -> list[str]:
    base = {"data.pairs_path": str(world_dir / "pairs.jsonl"), "train.run_dir": str(run_dir), "train.progress": False,
            "data.pairs_per_step": 4, "rollout.group_size": 4, "rollout.max_new_tokens": 3,
            "optim.micro_batch_size": 8, "optim.optimizer": "adamw", "train.steps": STEPS}
    base.update(extra)
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in base.items()]


# A free port found by binding port 0 can be taken by another process before rank 0 listens on it;
# only that rendezvous failure is retried (with a new port), never a wrong result.
_RENDEZVOUS_ERRORS = ("EADDRINUSE", "Address already in use", "DistNetworkError", "Connection refused")
# Also retried: a gloo rank aborting in C++ ("terminate called without an active exception", SIGABRT, no
# Python traceback). Seen in 2 of 4 fresh-clone suite runs (and once before), never in 24 direct runs of the
# same worker (tests/engine/dist_worker.py) with or without CPU load, so not yet explained; an abort is a crash,
# never a wrong result, and a repeated one still fails the test.
_RETRIED = _RENDEZVOUS_ERRORS + ("terminate called without an active exception",)


def run(world: int, out: Path, args: list[str]) -> dict:
    """Runs the worker; a retried attempt starts from the run dir as it was before the first one (an abort
    can come after the run has written its files)."""
    run_dir = Path(next(a.split("=", 1)[1] for a in args if a.startswith("train.run_dir=")))
    before = out.with_name(out.name + ".run_dir_before")
    if run_dir.exists():
        shutil.copytree(run_dir, before)
    for attempt in range(3):
        if attempt:
            shutil.rmtree(run_dir, ignore_errors=True)
            if before.exists():
                shutil.copytree(before, run_dir)
            out.unlink(missing_ok=True)
        proc = subprocess.run([sys.executable, str(WORKER), "--world", str(world), "--out", str(out), "--", *args],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode == 0 or not any(e in proc.stderr for e in _RETRIED):
            break
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def single(world_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    return run(0, tmp / "r.pt", overrides(world_dir, tmp / "run"))


def _metrics(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time.")} for r in rows]


def assert_same_run(got: dict, ref: dict) -> dict:
    """Metrics to fp32 rounding, gradients tightly, parameters to what Adam's sign-like step allows."""
    a, b = _metrics(got["rows"]), _metrics(ref["rows"])
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    worst = 0.0
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (ra["step"], k)
            worst = max(worst, abs(ra[k] - rb[k]))
    assert any(r["loss.understanding"] != 0 for r in b) and any(r["loss.generation"] != 0 for r in b)
    assert got["params"].keys() == ref["params"].keys() and got["grads"].keys() == ref["grads"].keys()
    for n, g in ref["grads"].items():  # gradient of the last backward (step 3, inner epoch 2)
        # summed over ranks in another order: an element that cancels to near zero keeps the rounding of
        # summands of the order of the tensor's largest gradient, so atol scales with max |g|. Measured:
        # at most 3.7e-5 max |g| beyond rtol (aligner.fc1.bias; lm_head 1.05e-7 absolute), 2.1e-5 before the
        # rollouts took cfg_sample's one-pass log-probs; 1e-4 max |g| leaves a margin of ~3
        torch.testing.assert_close(got["grads"][n], g, rtol=1e-4, atol=1e-4 * float(g.abs().max()), msg=n)
    pdiff = max(float((got["params"][n] - p).abs().max()) for n, p in ref["params"].items())
    gdiff = max(float((got["grads"][n] - g).abs().max()) for n, g in ref["grads"].items())
    # AdamW (lr 1e-2) moves each weight by up to ~1e-2 per step and amplifies rounding in near-zero
    # gradients (m / sqrt(v) ~ sign(g)); 1e-4 is two orders below one step
    assert pdiff < 1e-4
    return {"metric": worst, "param": pdiff, "grad": gdiff}


@pytest.mark.slow
def test_two_ranks_equal_one_process(world_dir, single, tmp_path):
    two = run(2, tmp_path / "r.pt", overrides(world_dir, tmp_path / "run"))
    assert two["param_type"] == "DTensor" and single["param_type"] == "Parameter"
    diffs = assert_same_run(two, single)
    print(f"2 ranks vs 1 process: max |d metric| {diffs['metric']:.2e}, |d grad| {diffs['grad']:.2e}, "
          f"|d param| {diffs['param']:.2e}")
    # rank 0 alone writes the run's files
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    ckpt = tmp_path / "run" / "checkpoints" / f"step_{STEPS:06d}"
    assert (ckpt / ".metadata").is_file() and (ckpt / "state.json").is_file()
    # a single process (no torchrun) refuses the sharded checkpoint with a message, not a traceback, and
    # before any model loads: where the run starts (run_start.start_point) looks at the checkpoint it would resume
    from engine.config import ConfigError, load_config
    from engine.run_start import start_point

    with pytest.raises(ConfigError, match="torchrun"):
        start_point(load_config(None, overrides(world_dir, tmp_path / "run", **{"train.resume": True})))


@pytest.mark.slow
@pytest.mark.parametrize("save_world,resume_world", [(1, 2), (2, 1)])
def test_resume_on_another_world_size(world_dir, single, tmp_path, save_world, resume_world):
    run_dir = tmp_path / "run"
    run(save_world, tmp_path / "a.pt", overrides(world_dir, run_dir, **{"train.steps": STEPS - 1}))
    resumed = run(resume_world, tmp_path / "b.pt", overrides(world_dir, run_dir, **{"train.resume": True}))
    assert resumed["summary"]["resumed_from"] == STEPS - 1
    diffs = assert_same_run(resumed, single)
    print(f"saved on {save_world}, resumed on {resume_world}: max |d metric| {diffs['metric']:.2e}, "
          f"|d param| {diffs['param']:.2e}")


def test_pairs_must_split_into_whole_pairs_per_rank():
    from engine.distributed import DistEnv, local_pairs

    env = DistEnv(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"), mesh=None)
    assert local_pairs(4, env) == slice(2, 4)
    assert local_pairs(3, None) == slice(0, 3)
    with pytest.raises(ValueError, match="pairs_per_step"):
        local_pairs(3, env)


def test_fsdp_config_carries_the_paper_settings_and_fp32_master_shards():
    from engine.config import load_config

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(str(root / "configs" / "janus_pro_7b_fsdp.yaml"),
                      ["model.path=null", "data.pairs_path=null", "reward.generation=toyworld"])
    assert cfg.rollout.group_size == 4 and cfg.data.pairs_per_step == 16 and cfg.optim.lr == 1e-6
    assert cfg.model.dtype == "float32" and cfg.distributed.param_dtype == "bfloat16"
    assert cfg.distributed.reduce_dtype == "float32" and cfg.optim.optimizer == "adamw"
    assert cfg.data.pairs_per_step % 8 == 0
