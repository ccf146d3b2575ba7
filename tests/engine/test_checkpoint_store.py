"""CheckpointStore: verified checkpoints, fall-back resume, pruning by step, dead temp folders."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from engine.checkpoint_store import MANIFEST, CheckpointError, CheckpointStore, step_name, verify


def save(store: CheckpointStore, step: int, keep: int = 0, payload: bytes | None = None):
    tmp = store.begin(step)
    (tmp / "policy.bin").write_bytes(payload if payload is not None else os.urandom(64 << 10))
    (tmp / "shards").mkdir()
    (tmp / "shards" / "rank0.bin").write_bytes(os.urandom(1000))
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    return store.publish(tmp, step, keep)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_publish_seals_with_a_manifest_and_verifies(tmp_path):
    store = CheckpointStore(tmp_path)
    path = save(store, 3)
    assert path.name == "step_000003" and (path / MANIFEST).is_file()
    manifest = json.loads((path / MANIFEST).read_text())
    assert set(manifest["files"]) == {"policy.bin", "shards/rank0.bin", "state.json"}
    verify(path)
    assert store.resume_candidate().path == path and not store.resume_candidate().fell_back
    assert not any(p.name.startswith(".") for p in store.root.iterdir() if p.is_dir())


@pytest.mark.parametrize("damage, message", [
    ("truncate", "bytes, the manifest says"),
    ("empty", "bytes, the manifest says"),
    ("zero4k", "checksum"),
    ("delete", "missing"),
    ("manifest", "unreadable manifest"),
    ("no_manifest", "the save did not finish"),
])
def test_damage_is_named_and_resume_falls_back(tmp_path, damage, message):
    store = CheckpointStore(tmp_path)
    older = save(store, 2)
    newest = save(store, 4)
    policy = newest / "policy.bin"
    if damage == "truncate":
        policy.write_bytes(policy.read_bytes()[:1000])
    elif damage == "empty":
        policy.write_bytes(b"")
    elif damage == "zero4k":
        data = bytearray(policy.read_bytes())
        data[8192:12288] = bytes(4096)
        policy.write_bytes(bytes(data))
    elif damage == "delete":
        policy.unlink()
    elif damage == "manifest":
        (newest / MANIFEST).write_text("{")
    else:
        (newest / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=message) as err:
        verify(newest)
    assert str(newest) in str(err.value)
    found = store.resume_candidate()
    assert found.path == older and found.fell_back
    assert "latest -> step_000004" in found.skipped[0] and message in found.skipped[0]


def test_dangling_latest_and_nothing_usable(tmp_path):
    store = CheckpointStore(tmp_path)
    first = save(store, 1)
    second = save(store, 2)
    (store.root / "latest").write_text("step_000009\n")  # names a folder that does not exist
    assert store.resume_candidate().path == second
    (second / "state.json").write_text("{}")
    (first / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=f"run {tmp_path}: no usable checkpoint") as err:
        store.resume_candidate()
    assert "step_000001" in str(err.value) and "step_000002" in str(err.value)
    assert CheckpointStore(tmp_path / "fresh").resume_candidate().path is None


def test_prune_orders_by_step_and_spares_latest_and_damaged(tmp_path):
    store = CheckpointStore(tmp_path)
    for step in (999_998, 999_999, 1_000_000):  # name order != step order past six digits
        save(store, step, keep=2)
    assert [s for s, _ in store.step_folders()] == [999_999, 1_000_000]
    # a second run in the same folder writes an older step: latest names it, so it stays beside
    # the two newest by step (pruning by name would have deleted it and left latest dangling)
    fresh = save(store, 2, keep=2)
    assert fresh.is_dir() and store.latest_named() == fresh
    assert [s for s, _ in store.step_folders()] == [2, 999_999, 1_000_000]
    (fresh / MANIFEST).unlink()  # damaged folders are never pruned
    save(store, 3, keep=1)
    assert [s for s, _ in store.step_folders()] == [2, 3, 1_000_000]
    store.prune_enabled = False
    save(store, 4, keep=1)
    assert [s for s, _ in store.step_folders()] == [2, 3, 4, 1_000_000]


def test_rewriting_a_step_swaps_then_deletes(tmp_path):
    store = CheckpointStore(tmp_path)
    save(store, 5, payload=b"old" * 1000)
    path = save(store, 5, payload=b"new" * 1000)
    assert (path / "policy.bin").read_bytes() == b"new" * 1000
    verify(path)
    assert sorted(p.name for p in store.root.iterdir()) == ["latest", "step_000005"]


def test_dead_temp_folders_go_live_ones_stay_and_a_lost_swap_comes_back(tmp_path):
    store = CheckpointStore(tmp_path)
    save(store, 1)
    dead, live = dead_pid(), os.getppid()
    names = {
        f".tmp_step_000002.{store.host}.{dead}": False,    # dead save of ours: removed
        f".tmp_step_000002_{dead}": False,                 # older naming, same
        f".tmp_step_000003.{store.host}.{live}": True,     # a live process: kept
        f".tmp_step_000004.otherhost.{dead}": True,        # another machine's: kept
    }
    for name in names:
        (store.root / name).mkdir()
        (store.root / name / "x").write_bytes(b"x")
    # a save of step 7 died after moving the old step 7 aside and before moving the new one in
    lost = store.root / f".old_{step_name(7)}.{store.host}.{dead}"
    lost.mkdir()
    (lost / "state.json").write_text("{}")
    removed = store.remove_dead_temps()
    assert sorted(p.name for p in removed) == sorted(n for n, keep in names.items() if not keep)
    for name, keep in names.items():
        assert (store.root / name).exists() == keep
    assert (store.root / step_name(7) / "state.json").is_file() and not lost.exists()


def test_folders_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = save(CheckpointStore(tmp_path), 1)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755


SAVE_TWICE = """
import os, sys
from engine.checkpoint_store import CheckpointStore
store = CheckpointStore(sys.argv[1])
for attempt, step in enumerate((1, int(sys.argv[2]))):
    tmp = store.begin(step)
    (tmp / "state.json").write_text(str(step) * 1000 + str(attempt))
    if attempt == 1:
        os.environ["PAIRUNI_KILL_AT"] = sys.argv[3]
    store.publish(tmp, step, keep=1)
"""


@pytest.mark.parametrize("second_step", [1, 2], ids=["rewrite-same-step", "next-step"])
@pytest.mark.parametrize("point", ["save:files_written", "save:sealed", "save:swapped", "save:published"])
def test_kill_9_during_a_save_loses_no_checkpoint(tmp_path, point, second_step):
    if point == "save:swapped" and second_step == 2:
        pytest.skip("only a rewrite of an existing step swaps")
    child = subprocess.run([sys.executable, "-c", SAVE_TWICE, str(tmp_path), str(second_step), point])
    assert child.returncode == -9  # killed at the named point, not finished
    store = CheckpointStore(tmp_path)
    store.remove_dead_temps()
    found = store.resume_candidate()
    assert found.path is not None and not any(p.name.startswith(".") for p in store.root.iterdir() if p.is_dir())
    published = point == "save:published"
    expected = (second_step, 1) if published else (1, 0)  # (step, attempt that wrote it)
    assert found.path.name == step_name(expected[0])
    assert (found.path / "state.json").read_text() == str(expected[0]) * 1000 + str(expected[1])
