"""Fault injection on the tiny model: kills, damaged files, bad values, reused and bad run folders.

Each test ends with the run resumable and no checkpoint lost; README's fault matrix names them.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine import cli
from engine.checkpoint_store import KILL_ENV, MANIFEST
from engine.config import load_config
from engine.optim import PolicyOptimizer
from engine.trainer import NonFiniteError, PairGRPOTrainer


@pytest.fixture
def train(toy_world, tiny_overrides, capsys, caplog):
    """`train(run_dir, **overrides) -> (exit code, stderr + log)`: `pairuni train` in this process."""
    def run(run_dir, **extra):
        caplog.clear()
        rc = cli.main(["train", *tiny_overrides(toy_world, run_dir, **extra)])
        return rc, capsys.readouterr().err + caplog.text
    return run


def steps_of(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))


def rows_of(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_damaged_latest_falls_back_and_prunes_nothing(train, tmp_path):
    run = tmp_path / "run"
    assert train(run, **{"train.steps": 6, "train.save_every": 2})[0] == 0
    assert steps_of(run) == [4, 6]
    (run / "checkpoints" / "step_000006" / "state.json").unlink()  # a lost file, or a kill mid-rewrite
    rc, err = train(run, **{"train.steps": 8, "train.save_every": 2, "train.resume": "true"})
    assert rc == 0, err
    assert "resume: skipped latest -> step_000006" in err and "missing" in err
    assert steps_of(run) == [4, 6, 8]  # resumed at 4: the fall-back pruned nothing
    assert rows_of(run) == list(range(1, 9))


@pytest.mark.parametrize("damage", ["truncate", "empty", "zero4k", "bad_state"])
def test_damaged_files_are_named_and_skipped(train, tmp_path, damage):
    run = tmp_path / "run"
    assert train(run, **{"train.steps": 4, "train.save_every": 2})[0] == 0
    newest = run / "checkpoints" / "step_000004"
    policy = newest / "policy.safetensors"
    if damage == "truncate":
        policy.write_bytes(policy.read_bytes()[:-4096])
    elif damage == "empty":
        policy.write_bytes(b"")
    elif damage == "zero4k":
        data = bytearray(policy.read_bytes())
        data[-8192:-4096] = bytes(4096)  # inside the tensor data: the safetensors header still parses
        policy.write_bytes(bytes(data))
    else:
        (newest / "state.json").write_text("{not json")
    rc, err = train(run, **{"train.steps": 5, "train.resume": "true"})
    assert rc == 0, err
    assert "resume: skipped latest -> step_000004" in err and str(newest) in err
    assert rows_of(run) == [1, 2, 3, 4, 5]


def test_no_usable_checkpoint_is_one_line_naming_the_run(train, tmp_path):
    run = tmp_path / "run"
    assert train(run, **{"train.steps": 2})[0] == 0
    (run / "checkpoints" / "step_000002" / MANIFEST).unlink()
    metrics = (run / "metrics.jsonl").read_bytes()
    rc, err = train(run, **{"train.steps": 4, "train.resume": "true"})
    assert rc == 2 and len([line for line in err.splitlines() if line.startswith("pairuni")]) == 1
    assert f"train.resume: run {run}: no usable checkpoint" in err and "the save did not finish" in err
    assert (run / "metrics.jsonl").read_bytes() == metrics  # nothing was restarted from scratch


KILL_RUN = "import sys; from engine.train_cli import main; sys.exit(main(sys.argv[1:]))"


def metric_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time.", "mem."))} for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(toy_world, tiny_overrides, tmp_path_factory):
    """Metrics of the 6-step run that the killed-and-resumed runs must reproduce."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    args = tiny_overrides(toy_world, run, **{"train.steps": 6, "train.save_every": 2})
    done = subprocess.run([sys.executable, "-c", KILL_RUN, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return metric_rows(run)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["save:files_written", "save:sealed", "save:published"])
def test_kill_9_during_a_save(toy_world, tiny_overrides, tmp_path, point, uninterrupted):
    run = tmp_path / "run"
    args = tiny_overrides(toy_world, run, **{"train.steps": 4, "train.save_every": 2})
    first = subprocess.run([sys.executable, "-c", KILL_RUN, *args], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    # the resumed run dies at `point` of its first save (step 6)
    args = tiny_overrides(toy_world, run, **{"train.steps": 6, "train.save_every": 2, "train.resume": "true"})
    killed = subprocess.run([sys.executable, "-c", KILL_RUN, *args], capture_output=True, text=True,
                            env={**os.environ, KILL_ENV: point})
    assert killed.returncode == -9
    assert any(p.name.startswith(".tmp_") for p in (run / "checkpoints").iterdir()) == (point != "save:published")
    resumed = subprocess.run([sys.executable, "-c", KILL_RUN, *args], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert not any(p.name.startswith(".") for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert steps_of(run) == [4, 6] and metric_rows(run) == uninterrupted


def test_reused_run_dir_is_refused_untouched_then_set_aside(train, tmp_path):
    run = tmp_path / "run"
    assert train(run)[0] == 0
    before = {p: p.read_bytes() for p in (run / "metrics.jsonl", run / "config.json")}
    rc, err = train(run, **{"optim.lr": 0.5})
    assert rc == 2 and "train.run_dir:" in err and "holds an earlier run" in err
    assert all(p.read_bytes() == b for p, b in before.items())
    assert train(run, **{"train.on_existing": "set_aside", "train.steps": 1})[0] == 0
    (aside,) = run.glob("previous-*")
    assert all((aside / p.name).read_bytes() == b for p, b in before.items())
    assert rows_of(run) == [1] and steps_of(run) == [1] and steps_of(aside) == [2]


def test_overwrite_deletes_the_old_run_only_after_a_step_succeeded(train, toy_world, tiny_overrides, tmp_path,
                                                                   monkeypatch):
    run = tmp_path / "run"
    assert train(run)[0] == 0
    old_metrics = (run / "metrics.jsonl").read_bytes()

    def crash(self):
        raise RuntimeError("power cut in step 1")

    monkeypatch.setattr(PairGRPOTrainer, "train_step", crash)
    trainer = PairGRPOTrainer.from_config(load_config(None, tiny_overrides(toy_world, run, **{
        "train.on_existing": "overwrite"})))
    with pytest.raises(RuntimeError, match="power cut"):
        trainer.train()
    (aside,) = run.glob("overwritten-*")
    assert (aside / "metrics.jsonl").read_bytes() == old_metrics  # the crash lost nothing
    monkeypatch.undo()
    assert train(run, **{"train.on_existing": "overwrite"})[0] == 0
    assert not list(run.glob("overwritten-*")) and rows_of(run) == [1, 2]


def test_resume_refuses_a_changed_trajectory(train, tmp_path):
    run = tmp_path / "run"
    assert train(run)[0] == 0
    rc, err = train(run, **{"train.resume": "true", "train.steps": 3, "rollout.group_size": 2, "optim.lr": 0.5})
    assert rc == 2 and "rollout.group_size: 4 -> 2" in err and "optim.lr: 0.01 -> 0.5" in err
    assert steps_of(run) == [2]
    assert train(run, **{"train.resume": "true", "train.steps": 3, "train.save_every": 5})[0] == 0  # allowed keys


def test_non_finite_updates_are_skipped_then_stop_the_run(toy_world, tiny_overrides, tmp_path, monkeypatch):
    run = tmp_path / "run"
    trainer = PairGRPOTrainer.from_config(load_config(None, tiny_overrides(toy_world, run, **{
        "train.steps": 8, "train.save_every": 1, "algo.mu": 1})))
    norm = PolicyOptimizer.clip_grad_norm
    calls = []

    def broken_after_two(self, max_norm):
        calls.append(1)
        return float("nan") if len(calls) > 2 else norm(self, max_norm)

    monkeypatch.setattr(PolicyOptimizer, "clip_grad_norm", broken_after_two)
    with pytest.raises(NonFiniteError, match=r"^step 5: the loss or gradient norm was not finite in 3 steps in a row"):
        trainer.train()
    assert steps_of(run) == [3, 4]  # saves went on during the skipped steps (keep 2) ...
    frozen = load_file(str(run / "checkpoints" / "step_000004" / "policy.safetensors"))
    before = load_file(str(run / "checkpoints" / "step_000003" / "policy.safetensors"))
    assert all(torch.equal(frozen[k], before[k]) for k in frozen)  # ... and no skipped update moved a weight
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped_updates", 0) for r in rows] == [0, 0, 1, 1, 1]


def test_a_non_finite_tensor_is_never_saved(toy_world, tiny_overrides, tmp_path):
    from engine.checkpoint_store import CheckpointError

    run = tmp_path / "run"
    trainer = PairGRPOTrainer.from_config(load_config(None, tiny_overrides(toy_world, run)))
    trainer.train_step()
    good = trainer.save()
    name, param = next((n, p) for n, p in trainer.model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        param[0] = float("inf")
    with pytest.raises(CheckpointError, match=f"refusing to save step 1: parameter '{name}' holds NaN or inf"):
        trainer.save()
    assert steps_of(run) == [1] and (good / MANIFEST).is_file()


@pytest.mark.parametrize("case, message", [
    ("run_dir_is_a_file", "train.run_dir: .* exists and is not a folder"),
    ("device_missing", "train.device: 'cuda:3' asked for"),
    ("device_malformed", "train.device: expected auto | cpu | cuda | cuda:N, got 'cudax'"),
    ("model_without_weights", "model.path: .* has no \\*.safetensors weights"),
    ("model_broken_config", "model.path: .*config.json is not valid JSON"),
    ("image_not_an_image", "data.pairs_path: .*pair #1: understand_ann.image_path: not a readable image"),
    ("lr_inf", "optim.lr: expected a finite number"),
])
def test_bad_values_fail_in_one_line_before_the_model_loads(train, toy_world, tmp_path, case, message,
                                                            no_model_loads):
    import re
    import shutil

    run, extra = tmp_path / "run", {}
    if case == "run_dir_is_a_file":
        run.write_text("x")
    elif case.startswith("device"):
        if torch.cuda.is_available() and case == "device_missing":
            pytest.skip("this machine has a GPU")
        extra["train.device"] = "cuda:3" if case == "device_missing" else "cudax"
    elif case.startswith("model"):
        model = tmp_path / "model"
        model.mkdir()
        (model / "config.json").write_text('{"model_type": "janus"}' if case == "model_without_weights" else "{")
        extra["model.path"] = str(model)
    elif case == "image_not_an_image":
        world = tmp_path / "world"
        shutil.copytree(toy_world.parent, world)
        first = json.loads((world / "pairs.jsonl").read_text().splitlines()[0])
        (world / first["understand_ann"]["image_path"]).write_bytes(b"GIF89a broken")
        extra["data.pairs_path"] = str(world / "pairs.jsonl")
    else:
        extra["optim.lr"] = ".inf"
    rc, err = train(run, **extra)
    assert rc == 2 and len([line for line in err.splitlines() if line.startswith("pairuni")]) == 1, err
    assert re.search(message, err), err


def test_debug_shows_the_traceback(toy_world, tiny_overrides, tmp_path):
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match="optim.lr"):
        cli.main(["--debug", "train", *tiny_overrides(toy_world, tmp_path, **{"optim.lr": ".nan"})])


def test_probe_checks_its_output_folder_first(toy_world, tmp_path, capsys, no_model_loads):
    (tmp_path / "taken").write_text("x")
    rc = cli.main(["probe-gradients", "--pairs", str(toy_world), "--out", str(tmp_path / "taken")])
    assert rc == 2 and "--out: " in capsys.readouterr().err


def test_files_honour_the_umask(train, tmp_path):
    old = os.umask(0o027)
    try:
        assert train(tmp_path / "run")[0] == 0
    finally:
        os.umask(old)
    run = tmp_path / "run"
    for path in (run / "metrics.jsonl", run / "config.json", run / "checkpoints" / "step_000002" / MANIFEST,
                 run / "checkpoints" / "step_000002" / "policy.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
    assert stat.S_IMODE((run / "checkpoints" / "step_000002").stat().st_mode) == 0o750


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("pairuni")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_no_space_during_a_save_is_one_line_keeping_the_previous_checkpoint(train, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import engine.checkpoint

    real, calls = engine.checkpoint.save_file, []

    def full_disk(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if "step_000004" in filename:  # what safetensors raises on ENOSPC: no file name in it
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(engine.checkpoint, "save_file", full_disk)
    run = tmp_path / "run"
    rc, err = train(run, **{"train.steps": 4, "train.save_every": 2})
    line = one_line(err)
    assert rc == 2 and line.startswith("pairuni train: saving step 4: [Errno 28] No space left on device")
    assert "policy.safetensors" in line and ".tmp_step_000004" in line
    assert line.endswith(f"the checkpoint of step 2 ({run / 'checkpoints' / 'step_000002'}) is kept; "
                         "resume with train.resume=true")
    assert steps_of(run) == [2] and not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    assert train(run, **{"train.steps": 4, "train.save_every": 2, "train.resume": "true"})[0] == 0
    assert steps_of(run) == [2, 4] and rows_of(run) == [1, 2, 3, 4]


@pytest.mark.parametrize("error", [errno.EROFS, errno.EACCES, errno.ENOSPC])
def test_a_failing_metrics_write_is_one_line_naming_file_and_step(train, toy_world, tiny_overrides, tmp_path,
                                                                  monkeypatch, error):
    from engine.metrics import MetricsLog

    real = MetricsLog.write

    def read_only(self, row):
        if row["step"] == 3:
            raise OSError(error, os.strerror(error), str(self.path))
        return real(self, row)

    monkeypatch.setattr(MetricsLog, "write", read_only)
    run = tmp_path / "run"
    rc, err = train(run, **{"train.steps": 4, "train.save_every": 2})
    line = one_line(err)
    assert rc == 2 and line.startswith(f"pairuni train: step 3: [Errno {error}] {os.strerror(error)}")
    assert str(run / "metrics.jsonl") in line and "the checkpoint of step 2" in line
    with pytest.raises(OSError, match="metrics.jsonl"):  # --debug: the exception itself
        cli.main(["--debug", "train", *tiny_overrides(toy_world, tmp_path / "debug", **{"train.steps": 3})])


def test_an_unwritable_run_folder_at_the_start_is_one_line(train, tmp_path, monkeypatch):
    import engine.trainer

    def denied(path, obj):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(engine.trainer, "write_json", denied)  # chmod does not stop root: fake it
    run = tmp_path / "run"
    rc, err = train(run)
    line = one_line(err)
    assert rc == 2 and "preparing the run folder: [Errno 13] Permission denied" in line
    assert str(run / "config.json") in line and line.endswith("no checkpoint of this run yet")


def test_dead_saves_of_any_host_are_removed_at_the_next_start(train, tmp_path):
    run = tmp_path / "run"
    assert train(run, **{"train.steps": 2})[0] == 0
    for name in (".tmp_step_000003.old-pod-name.4242", f".old_step_000002.other-host.{os.getpid()}"):
        (run / "checkpoints" / name).mkdir()
        (run / "checkpoints" / name / "policy.safetensors").write_bytes(b"x" * 100)
    assert train(run, **{"train.steps": 3, "train.resume": "true"})[0] == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000002", "step_000003"]
