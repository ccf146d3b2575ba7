"""`pairuni train model.family=dimoo` (engine/family.py, engine/dimoo/trainer.py): one config line switches the
family; the engine's resume rules, optimizer (8-bit, masters, Kahan, stochastic rounding), signals, LoRA and
export hold for DiMOO; the keys of the other family are refused in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.checkpoint_store import PAUSE_ENV, PAUSE_FILE_ENV, verify
from engine.cli import main
from engine.family import family_of_source

REPO = Path(__file__).resolve().parents[3]
RUN = "import sys; from engine.train_cli import main; sys.exit(main(sys.argv[1:]))"
#: A short DiMOO run: 4 pairs, 2 per step, G = 2, the toy world's 4 x 4 code grid.
TINY = ["model.family=dimoo", "data.max_pairs=4", "data.pairs_per_step=2", "rollout.group_size=2",
        "train.progress=false"]


pytestmark = pytest.mark.usefixtures("one_thread")


def train(run_dir: Path, *extra: str) -> int:
    return main(["train", *TINY, f"train.run_dir={run_dir}", *extra])


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The trained weights of a run's latest checkpoint (a LoRA run's: its adapters)."""
    from safetensors.torch import load_file

    ck = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    adapters = ck / "adapters.safetensors"
    return load_file(str(adapters if adapters.is_file() else ck / "model" / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_one_config_line_switches_the_family(tmp_path, capsys):
    assert train(tmp_path / "run", "train.steps=2") == 0
    out = capsys.readouterr().out
    assert "PairGRPO: 2 steps" in out
    ck = tmp_path / "run" / "checkpoints" / "step_000002"
    verify(ck)
    state = json.loads((ck / "state.json").read_text())
    assert state["family"] == "dimoo" and state["config"]["model"]["family"] == "dimoo"
    assert state["cfg"]["group_size"] == 2 and state["cfg"]["cfg_scale"] == 4.0  # w = rollout.cfg_scale 5 - 1
    assert [r["step"] for r in rows(tmp_path / "run")] == [1, 2]
    assert family_of_source(tmp_path / "run") == family_of_source(ck) == "dimoo"


@pytest.mark.parametrize("optim", [
    [],                                                                       # adamw8bit (bitsandbytes), fp32
    ["model.dtype=bfloat16", "optim.optimizer=adamw", "optim.update=stochastic_rounding"],
    ["model.dtype=bfloat16", "optim.optimizer=adamw", "optim.update=kahan"],
    ["model.dtype=bfloat16", "optim.optimizer=adamw", "optim.master_weights=true"],
    ["model.lora.rank=4", "optim.lr=0.05"],                                  # adapter-only checkpoints
    ["algo.beta=0.1", "optim.optimizer=adamw"],                               # the KL's reference: the start model
], ids=["adamw8bit", "stochastic_rounding", "kahan", "master_weights", "lora", "kl"])
def test_resume_through_the_cli_equals_the_straight_run(tmp_path, optim):
    """2 steps, stop, resume to 4 == 4 straight: the optimizer's whole state (8-bit moments, the rounding
    generator, Kahan buffers, fp32 masters) is in the checkpoint."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(straight, "train.steps=4", *optim) == 0
    assert train(split, "train.steps=2", *optim) == 0
    assert train(split, "train.steps=4", "train.resume=true", *optim) == 0
    assert rows(split) == rows(straight)
    assert_same_weights(weights(split), weights(straight))
    beta = any(o.startswith("algo.beta") for o in optim)
    assert all(("kl.generation" in r) == beta for r in rows(split))
    if beta:  # k3 >= 0, and > 0 once the policy has moved from the start model (the reference)
        assert all(r["kl.generation"] > 1e-6 and r["kl.understanding"] >= 0 for r in rows(split))


def test_a_resume_with_another_objective_is_refused_in_one_line(tmp_path, capsys):
    assert train(tmp_path / "run", "train.steps=1") == 0
    capsys.readouterr()
    assert train(tmp_path / "run", "train.steps=2", "train.resume=true", "algo.epsilon_high=0.3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "algo.epsilon_high" in err[0] and "train.resume" in err[0]
    # a fresh start into the used folder is refused too, naming the way out
    assert train(tmp_path / "run", "train.steps=2") == 2
    assert "train.on_existing" in capsys.readouterr().err


@pytest.mark.parametrize(("family", "key", "value"), [
    ("janus_pro", "rollout.score_groups", "2"), ("janus_pro", "rollout.reveal_order", "confidence"),
    ("dimoo", "rollout.image_top_k", "3"), ("dimoo", "optim.micro_batch_size", "4"), ("dimoo", "rollout.compile", "true"),
    ("dimoo", "algo.loss_type", "geo_mean"), ("dimoo", "rollout.temperature", "0"),
    ("dimoo", "rollout.text_steps", "3"), ("dimoo", "reward.generation", "clip"),
])
def test_keys_the_family_does_not_read_are_refused_in_one_line(tmp_path, capsys, family, key, value):
    rc = main(["train", f"model.family={family}", f"{key}={value}", f"train.run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and key in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("point", "save_every", "saved_step"), [
    ("save:files_written@1", "1", 1),  # during step 1's save: the save finishes, the run stops
    ("step:rollout@2", "0", 1),        # during step 2's rollouts: abandoned, step 1 (never saved) is saved
    ("step:update@2", "0", 2),         # during step 2's update: it finishes and is saved
    ("step:rollout@1", "0", 0),        # nothing trained yet: step 0 is saved
])
def test_a_signal_saves_the_last_finished_step_and_the_resume_is_exact(tmp_path, point, save_every, saved_step):
    """SIGTERM at a named point of a real `pairuni train` (paused there): exit 143, one line naming the
    checkpoint of the last finished step, and the resume reaches the uninterrupted run's numbers."""
    import time

    straight, run = tmp_path / "straight", tmp_path / "run"
    assert train(straight, "train.steps=3") == 0
    flag = tmp_path / "paused"
    env = {**os.environ, PAUSE_ENV: point, PAUSE_FILE_ENV: str(flag), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", RUN, *TINY, f"train.run_dir={run}", "train.steps=3",
                             f"train.save_every={save_every}"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not flag.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    flag.unlink()
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err
    name = f"step_{saved_step:06d}"
    line = [x for x in err.splitlines() if x.startswith("pairuni train:")]
    assert len(line) == 1 and f"after step {saved_step}" in line[0] and name in line[0], err
    verify(run / "checkpoints" / name)
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))[-1] == name
    assert train(run, "train.steps=3", "train.resume=true") == 0
    assert rows(run) == rows(straight)
    assert_same_weights(weights(run), weights(straight))


def test_lora_run_trains_the_adapters_only_and_exports_merged(tmp_path):
    from engine.dimoo.commands import load_run
    from engine.dimoo.lora import adapter_state
    from engine.dimoo.model import DimooModel

    run = tmp_path / "run"
    assert train(run, "train.steps=2", "model.lora.rank=4", "optim.optimizer=adamw", "optim.lr=0.05") == 0
    ck = run / "checkpoints" / "step_000002"
    assert (ck / "adapters.safetensors").is_file() and not (ck / "model").exists()  # the adapters only
    loaded = load_run(run)
    base, _ = load_run_base(loaded.cfg)
    trained = loaded.model.state_dict()
    adapters = adapter_state(loaded.model)
    assert adapters and any(bool(v.abs().sum()) for k, v in adapters.items() if "lora_B" in k)  # B moved from 0
    for name, t in base.state_dict().items():  # the frozen base is the tiny model of model.tiny_seed
        assert torch.equal(trained[name], t), name
    assert main(["export", str(run), "--out", str(tmp_path / "exported"), "--dtype", "float32"]) == 0
    merged = DimooModel.from_pretrained(tmp_path / "exported", dtype="float32")
    ids = torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, loaded.model(ids).logits, rtol=1e-5, atol=1e-5)


def load_run_base(cfg):
    """The run's model without adapters (LoRA off): its frozen base."""
    import copy

    from engine.data import default_pairs_path
    from engine.data.io import data_root_of, read_pairs
    from engine.dimoo.trainer import build_model_and_world

    plain = copy.deepcopy(cfg)
    plain.model.lora.rank = 0
    pairs = read_pairs(default_pairs_path())[:4]
    return build_model_and_world(plain, pairs, data_root_of(default_pairs_path()))


def test_export_round_trips_the_trained_weights(tmp_path):
    from engine.dimoo import run as dr
    from engine.dimoo.model import DimooModel

    run = tmp_path / "run"
    assert train(run, "train.steps=1") == 0
    assert main(["export", str(run), "--out", str(tmp_path / "out"), "--dtype", "float32"]) == 0
    got = DimooModel.from_pretrained(tmp_path / "out", dtype="float32").state_dict()
    want = dr.load_state(run / "checkpoints" / "step_000001").model.state_dict()
    assert_same_weights(got, want)
    assert (tmp_path / "out" / "vqvae" / "config.json").is_file() and (tmp_path / "out" / dr.TOKENIZER).is_file()
    assert family_of_source(tmp_path / "out") == "dimoo"


def test_a_lumina_dimoo_folder_trains_through_the_cli(dimoo_dir, tmp_path):
    """model.path = a DiMOO-format folder (the real id layout, HF tokenizer, diffusers VQ): one step at 32 px."""
    run = tmp_path / "run"
    rc = main(["train", "model.family=dimoo", f"model.path={dimoo_dir}", "rollout.image_resolution=32",
               "rollout.group_size=2", "data.pairs_per_step=1", "data.max_pairs=2", "train.steps=1",
               "optim.optimizer=adamw", "train.progress=false", f"train.run_dir={run}"])
    assert rc == 0
    state = json.loads((run / "checkpoints" / "step_000001" / "state.json").read_text())
    assert state["config"]["model"]["path"] == str(dimoo_dir)
    assert not (run / "checkpoints" / "step_000001" / "toy_tokenizer.json").exists()
    assert all(isinstance(v, float) for k, v in rows(run)[0].items() if k.startswith(("loss.", "grad_norm")))


def test_eval_of_the_exported_folder_equals_eval_of_the_run(tmp_path, capsys):
    """`pairuni eval` reads a DiMOO run, its LoRA adapters included, and the folder `pairuni export` wrote of it
    (toy ids and painter VQ carried): same seeds, same numbers."""
    from engine.data import default_pairs_path

    run = tmp_path / "run"
    assert train(run, "train.steps=1", "model.lora.rank=2", "optim.optimizer=adamw", "optim.lr=0.05") == 0
    assert main(["export", str(run), "--out", str(tmp_path / "exported"), "--dtype", "float32"]) == 0
    reports = []
    for model, out in ((run, tmp_path / "eval_run"), (tmp_path / "exported", tmp_path / "eval_export")):
        assert main(["eval", "--model", str(model), "--pairs", str(default_pairs_path()), "--max-pairs", "3",
                     "--samples", "2", "--dtype", "float32", "--no-progress", "--out", str(out)]) == 0
        reports.append(json.loads((out / "eval.json").read_text()))
    capsys.readouterr()
    a, b = reports
    assert a["summary"]["overall"]["questions"] == 3 and a["summary"] == b["summary"]
    assert a["questions"] == b["questions"] and a["prompts"] == b["prompts"]  # every answer and image reward


def test_evaluation_during_training_logs_eval_and_changes_no_training_number(tmp_path):
    """train.eval_every for DiMOO: eval/* numbers join the rows, run_dir/eval/step_N.json is written, the held-out
    pairs are saved for `pairuni eval`, and every training number equals the run without evaluation."""
    held = ["data.max_pairs=6", "data.eval_fraction=0.34"]
    assert train(tmp_path / "plain", "train.steps=2", *held) == 0
    assert train(tmp_path / "evald", "train.steps=2", *held, "train.eval_every=1", "train.eval_samples=2") == 0
    plain, evald = rows(tmp_path / "plain"), rows(tmp_path / "evald")
    assert all("eval/understanding_accuracy" in r and "eval/generation_reward" in r for r in evald)
    assert [{k: v for k, v in r.items() if not k.startswith("eval/")} for r in evald] == plain
    report = json.loads((tmp_path / "evald" / "eval" / "step_000002.json").read_text())
    assert report["summary"]["overall"]["questions"] == 2 and report["summary"]["overall"]["images"] == 4
    assert report["summary"]["overall"]["understanding_accuracy"] == evald[1]["eval/understanding_accuracy"]
    assert (tmp_path / "evald" / "eval" / "heldout_pairs.jsonl").is_file()
