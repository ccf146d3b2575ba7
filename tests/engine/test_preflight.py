"""Checks before the model loads: one line naming the key or path, for every mistake a user can make."""

from __future__ import annotations

import json
import os

import pytest
import torch

from engine.config import Config
from engine.preflight import (
    PreflightError,
    check_device,
    check_model_dir,
    check_run_dir,
    history_of,
    set_aside,
)
from engine.run_start import trajectory_changes


def test_run_dir_must_be_a_writable_folder(tmp_path):
    check_run_dir(tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()  # checked, not created
    (tmp_path / "file").write_text("x")
    with pytest.raises(PreflightError, match=r"^train\.run_dir: .*file exists and is not a folder$"):
        check_run_dir(tmp_path / "file")
    with pytest.raises(PreflightError, match=r"cannot be created: .*file is not a folder$"):
        check_run_dir(tmp_path / "file" / "run")
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(PreflightError, match="is not writable"):
        check_run_dir(locked)


@pytest.mark.parametrize("device, message", [
    ("gpu", "expected auto | cpu | cuda | cuda:N"),
    ("cudax", "expected auto | cpu | cuda | cuda:N"),
    ("cuda:one", "expected auto | cpu | cuda | cuda:N"),
    ("cuda", "no usable CUDA GPU"),
    ("cuda:0", "no usable CUDA GPU"),
])
def test_device_must_exist(device, message):
    if torch.cuda.is_available() and "CUDA GPU" in message:
        pytest.skip("this machine has a GPU")
    with pytest.raises(PreflightError, match=f"^train.device: .*{message}"):
        check_device(device)
    check_device("cpu")
    check_device("auto")


def test_model_dir_needs_config_and_weights(tmp_path):
    with pytest.raises(PreflightError, match="is not a folder"):
        check_model_dir(tmp_path / "absent")
    with pytest.raises(PreflightError, match="has no config.json"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": ')
    with pytest.raises(PreflightError, match=r"config.json is not valid JSON"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "janus"}')
    with pytest.raises(PreflightError, match=r"has no \*.safetensors weights"):
        check_model_dir(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x")
    with pytest.raises(PreflightError, match="lacks weight shard"):
        check_model_dir(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"x")
    check_model_dir(tmp_path)


def test_history_is_found_and_set_aside_whole(tmp_path):
    assert history_of(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "checkpoints" / "step_000001").mkdir(parents=True)
    (tmp_path / "unrelated.txt").write_text("mine")
    assert history_of(tmp_path) == ["metrics.jsonl", "checkpoints/"]
    aside = set_aside(tmp_path)
    assert history_of(tmp_path) == [] and (tmp_path / "unrelated.txt").is_file()
    assert (aside / "metrics.jsonl").read_text() == '{"step": 1}\n' and (aside / "checkpoints" / "step_000001").is_dir()
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert set_aside(tmp_path) != aside  # a second set-aside in the same second gets its own folder


def test_resume_refuses_trajectory_changes_only():
    saved = Config().to_dict()
    same = Config().to_dict()
    same["train"].update(steps=99, save_every=3, progress=False, resume=True, run_dir="elsewhere")
    assert trajectory_changes(saved, same) == []
    changed = Config().to_dict()
    changed["rollout"]["group_size"] = 4
    changed["optim"]["lr"] = 1.0
    changed["data"]["max_pairs"] = 7
    assert trajectory_changes(saved, changed) == [
        f"data.max_pairs: {saved['data']['max_pairs']!r} -> 7", f"optim.lr: {saved['optim']['lr']!r} -> 1.0",
        f"rollout.group_size: {saved['rollout']['group_size']!r} -> 4"]


def test_resume_of_a_checkpoint_written_before_the_evaluation_keys():
    """A saved config that lacks a key (written before it existed) counts as that key's default; evaluation
    settings may change on resume, the held-out fraction (it changes the training pairs) may not."""
    saved = Config().to_dict()
    for section, key in (("data", "eval_fraction"), ("data", "eval_pairs_path"), ("train", "eval_every"),
                         ("train", "eval_samples")):
        del saved[section][key]
    assert trajectory_changes(saved, Config().to_dict()) == []
    later = Config().to_dict()
    later["train"].update(eval_every=5, eval_samples=2)
    later["data"]["eval_pairs_path"] = "heldout.jsonl"
    assert trajectory_changes(saved, later) == []
    later["data"]["eval_fraction"] = 0.1
    assert trajectory_changes(saved, later) == ["data.eval_fraction: 0.0 -> 0.1"]
