"""Preemption: real SIGTERM / SIGINT sent to a real `pairuni train` paused at named points of a step and of a
save (PAIRUNI_PAUSE_AT); the stopped run saves a verified checkpoint of its last finished step, says so in one
line, exits 143 / 130, and `train.resume=true` reaches the metrics of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.checkpoint_store import MANIFEST, PAUSE_ENV, PAUSE_FILE_ENV, verify

RUN = "import sys; from engine.train_cli import main; sys.exit(main(sys.argv[1:]))"
STEPS = 4


def metric_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time.", "mem."))} for r in rows]


class Paused:
    """A `pairuni train` subprocess that pauses at `points` (PAIRUNI_PAUSE_AT) for the test to signal it."""

    def __init__(self, args: list[str], points: str, flag: Path):
        self.flag = flag
        env = {**os.environ, PAUSE_ENV: points, PAUSE_FILE_ENV: str(flag)}
        self.proc = subprocess.Popen([sys.executable, "-c", RUN, *args], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def wait_paused(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not self.flag.exists():
            assert self.proc.poll() is None, self.proc.communicate()[1]
            assert time.monotonic() < deadline, "the run never reached its pause point"
            time.sleep(0.02)

    def signal(self, sig: int, *, resume: bool = True) -> None:
        self.proc.send_signal(sig)
        if resume:
            time.sleep(0.3)  # the handler runs within one 20 ms sleep of the pause loop
            self.flag.unlink()

    def finish(self, timeout: float = 300) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err


@pytest.fixture(scope="module")
def uninterrupted(toy_world, tiny_overrides, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = subprocess.run([sys.executable, "-c", RUN, *tiny_overrides(toy_world, run, **{"train.steps": STEPS})],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return metric_rows(run)


def pairuni_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("pairuni")]


def resume(toy_world, tiny_overrides, run: Path, **extra) -> None:
    args = tiny_overrides(toy_world, run, **{"train.steps": STEPS, "train.resume": "true", **extra})
    done = subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not any(p.name.startswith(".") for p in (run / "checkpoints").iterdir())  # dead saves cleared


@pytest.mark.slow
@pytest.mark.parametrize("point, sig, saved_step, extra", [
    ("step:rollout@3", signal.SIGTERM, 2, {}),                       # rollouts of step 3 abandoned
    ("step:rollout@1", signal.SIGTERM, 0, {}),                       # nothing trained yet: step 0 saved
    ("step:update@2", signal.SIGINT, 2, {}),                         # the update of step 2 finishes
    ("save:files_written@1", signal.SIGTERM, 2, {"train.save_every": 2}),  # the save of step 2 finishes
    ("save:published@1", signal.SIGINT, 2, {"train.save_every": 2}),
], ids=["term-rollout-3", "term-rollout-1", "int-update-2", "term-save-files", "int-save-published"])
def test_a_signal_saves_the_last_finished_step_and_resume_is_exact(toy_world, tiny_overrides, tmp_path, point, sig,
                                                                   saved_step, extra, uninterrupted):
    run = tmp_path / "run"
    args = tiny_overrides(toy_world, run, **{"train.steps": STEPS, **extra})
    child = Paused(args, point, tmp_path / "paused")
    child.wait_paused()
    child.signal(sig)
    rc, out, err = child.finish()
    assert rc == (143 if sig == signal.SIGTERM else 130), err
    assert "Traceback" not in err and out == ""
    (line,) = pairuni_lines(err)
    name = signal.Signals(sig).name
    path = run / "checkpoints" / f"step_{saved_step:06d}"
    assert line.startswith(f"pairuni train: stopped by {name} after step {saved_step}; checkpoint ")
    assert str(path) in line and line.endswith("train.resume=true")
    verify(path)
    assert (run / "checkpoints" / "latest").read_text().strip() == path.name
    resume(toy_world, tiny_overrides, run, **extra)
    assert metric_rows(run) == uninterrupted


@pytest.mark.slow
def test_a_second_signal_exits_at_once_and_the_previous_checkpoint_stays(toy_world, tiny_overrides, tmp_path,
                                                                          uninterrupted):
    run = tmp_path / "run"
    args = tiny_overrides(toy_world, run, **{"train.steps": STEPS, "train.save_every": 2})
    # stop during step 3's update; the stop's save of step 3 (the second save) is then hit by a second signal
    child = Paused(args, "step:update@3,save:sealed@2", tmp_path / "paused")
    child.wait_paused()
    child.signal(signal.SIGTERM)
    child.wait_paused()
    child.signal(signal.SIGTERM, resume=False)
    rc, _, err = child.finish(timeout=30)
    assert rc == 143 and "Traceback" not in err
    assert pairuni_lines(err)[-1].startswith("pairuni train: second signal (SIGTERM): exiting now without saving")
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000002" and (ckpts / "step_000002" / MANIFEST).is_file()
    assert not (ckpts / "step_000003").exists() and any(p.name.startswith(".tmp_step_000003") for p in ckpts.iterdir())
    resume(toy_world, tiny_overrides, run, **{"train.save_every": 2})
    assert metric_rows(run) == uninterrupted


@pytest.mark.slow
def test_a_signal_while_the_run_starts_writes_nothing(toy_world, tiny_overrides, tmp_path):
    run = tmp_path / "run"
    child = Paused(tiny_overrides(toy_world, run), "start", tmp_path / "paused")
    child.wait_paused()
    child.signal(signal.SIGINT)
    rc, _, err = child.finish()
    assert rc == 130 and "Traceback" not in err
    (line,) = pairuni_lines(err)
    assert "SIGINT before the first step started: nothing written" in line
    assert not run.exists()  # the lock's folder, made for this run, is gone again
