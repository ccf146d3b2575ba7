"""One run per run folder (engine/lock.py): a second `pairuni train` or resume on a folder whose run is alive is
refused in one line naming the holder; a dead holder's lock file (any host, SIGKILL included) never blocks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from engine import cli
from engine.checkpoint_store import CheckpointStore
from engine.lock import LOCK_FILE, RunLock, held_here

from .test_signals import RUN, Paused


def test_a_held_lock_refuses_a_second_taker_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    with RunLock.acquire(run) as held:
        assert held_here(run) and RunLock.acquire(run) is held  # re-entrant in one process
        info = json.loads((run / LOCK_FILE).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        taker = subprocess.run([sys.executable, "-c", "import sys; from engine.lock import RunLock; "
                                "RunLock.acquire(sys.argv[1])", str(run)], capture_output=True, text=True)
        assert taker.returncode == 1 and "RunLockError" in taker.stderr
        assert f"is in use by another run (host {socket.gethostname()}, pid {os.getpid()}" in taker.stderr
    assert not held_here(run) and not run.exists()  # made for the lock, empty again: removed


def test_a_stale_lock_file_of_any_host_does_not_block(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / LOCK_FILE).write_text(json.dumps({"host": "gone-pod-7f9c", "pid": 1, "started": "yesterday"}))
    with RunLock.acquire(run):
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (run / "config.json").is_file()


def test_with_the_lock_held_every_foreign_temp_folder_is_dead(tmp_path):
    store = CheckpointStore(tmp_path)
    store.root.mkdir()
    names = [f".tmp_step_000004.oldpod-1.{os.getppid()}", f".tmp_step_000005.{store.host}.{os.getppid()}",
             f".tmp_step_000006.{store.host}.{os.getpid()}"]  # the last one is this process's own
    for name in names:
        (store.root / name).mkdir()
    assert store.remove_dead_temps() == []  # unlocked: another host's, or a live pid, are not ours to judge
    with RunLock.acquire(tmp_path):
        assert sorted(p.name for p in store.remove_dead_temps()) == sorted(names[:2])
    assert [p.name for p in store.root.iterdir()] == [names[2]]


@pytest.mark.slow
def test_two_runs_on_one_folder(toy_world, tiny_overrides, tmp_path, capsys):
    run = tmp_path / "run"
    first = Paused(tiny_overrides(toy_world, run, **{"train.steps": 2}), "step:update@2", tmp_path / "paused")
    first.wait_paused()
    pid = first.proc.pid
    for extra in ({}, {"train.resume": "true"}, {"train.on_existing": "set_aside"}):
        rc = cli.main(["train", *tiny_overrides(toy_world, run, **extra)])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, err
        assert err.startswith(f"pairuni train: train.run_dir: {run} is in use by another run "
                              f"(host {socket.gethostname()}, pid {pid}, since ")
    (tmp_path / "paused").unlink()
    rc, out, err = first.finish()
    assert rc == 0, err
    rows = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2] and not list(run.glob("previous-*"))  # the refused runs touched nothing


@pytest.mark.slow
def test_the_lock_of_a_killed_run_does_not_block_its_resume(toy_world, tiny_overrides, tmp_path):
    run = tmp_path / "run"
    args = tiny_overrides(toy_world, run, **{"train.steps": 3, "train.save_every": 1})
    first = Paused(args, "step:update@3", tmp_path / "paused")
    first.wait_paused()
    first.proc.send_signal(signal.SIGKILL)
    assert first.finish()[0] == -9
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == first.proc.pid  # left behind, not held
    done = subprocess.run([sys.executable, "-c", RUN, *args, "train.resume=true"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3]
