"""Evaluation: the toy attribute score, determinism, the CLI against in-process numbers, the held-out split
and its config checks, evaluation during training (trajectory unchanged, eval/* rows, grid PNG, TensorBoard)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import cli
from engine.build import image_cache
from engine.config import ConfigError, load_config
from engine.data import toyworld
from engine.data.io import read_pairs
from engine.evaluate import GRID_PROMPTS, HELDOUT_FILE, attribute_checks, attribute_score, evaluate
from engine.preflight import set_aside
from engine.run_start import data_splits
from engine.trainer import PairGRPOTrainer


def _as_tensor(pil) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)


@pytest.mark.parametrize("scene", [toyworld.Scene("red", "circle", (4,)), toyworld.Scene("blue", "square", (0, 8)),
                                   toyworld.Scene("green", "triangle", (1, 3, 5))])
def test_attribute_score_reads_hand_made_images(scene):
    image = _as_tensor(toyworld.render(scene, 64))
    truth = scene.attributes()
    assert attribute_checks(image, truth) == {"color": True, "shape": True, "count": True}
    assert attribute_score(attribute_checks(image, truth)) == 1.0
    other = next(c for c in toyworld.COLORS if c != scene.color)
    wrong_colour = attribute_checks(image, {**truth, "color": other})
    assert wrong_colour == {"color": False, "shape": True, "count": True}
    assert attribute_score(wrong_colour) == pytest.approx(2 / 3)
    assert not attribute_checks(image, {**truth, "count": truth["count"] + 1})["count"]
    blank = torch.ones(3, 64, 64)
    assert attribute_score(attribute_checks(blank, truth)) == 0.0
    assert attribute_checks(image, {"color": "red"}) is None  # not a toy-world prompt: no score


def _eval(trainer, pairs, root, **kwargs):
    return evaluate(trainer.model, trainer.prompts, pairs, trainer.cfg, images=image_cache(root, trainer.prompts),
                    progress=False, **kwargs)


def test_evaluation_is_deterministic_given_the_seed(trained_run, toy_world):
    trainer, _ = trained_run
    pairs = read_pairs(toy_world)[:5]
    root = Path(toy_world).parent
    a = _eval(trainer, pairs, root, seed=1, samples=3)
    b = _eval(trainer, pairs, root, seed=1, samples=3)
    c = _eval(trainer, pairs, root, seed=2, samples=3)
    assert a.to_json() == b.to_json()
    assert np.array_equal(np.asarray(a.grid), np.asarray(b.grid))
    assert [p["rewards"] for p in a.prompts] != [p["rewards"] for p in c.prompts]
    overall = a.summary["overall"]
    assert overall["questions"] == 5 and overall["images"] == 15
    rewards = [r for p in a.prompts for r in p["rewards"]]
    assert overall["generation_reward"] == pytest.approx(sum(rewards) / len(rewards))
    by_tag = {k: v for k, v in a.summary.items() if k != "overall"}
    assert sum(v["questions"] for v in by_tag.values()) == 5 and sum(v["prompts"] for v in by_tag.values()) == 5
    # the accuracy is the accuracy reward of the greedy answers
    assert overall["understanding_accuracy"] == sum(q["correct"] for q in a.questions) / 5
    metrics = a.metrics("eval/")
    assert metrics["eval/understanding_accuracy"] == overall["understanding_accuracy"]
    assert any(k.startswith("eval/tag/toy/") for k in metrics)


def test_cli_eval_of_a_checkpoint_equals_in_process_evaluate(trained_run, toy_world, tmp_path, capsys):
    trainer, run = trained_run
    out = tmp_path / "eval"
    assert cli.main(["eval", "--model", str(run / "checkpoints" / "step_000002"), "--pairs", str(toy_world),
                     "--out", str(out), "--seed", "7", "--samples", "2", "--max-pairs", "6", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "eval.json").read_text())
    mine = _eval(trainer, read_pairs(toy_world)[:6], Path(toy_world).parent, seed=7, samples=2)
    assert saved["summary"] == json.loads(json.dumps(mine.summary))
    assert saved["prompts"] == json.loads(json.dumps(mine.prompts)) and saved["questions"] == mine.questions
    assert "overall" in printed and f"{mine.summary['overall']['generation_reward']:.3f}" in printed
    from PIL import Image

    with Image.open(out / "eval.png") as grid:
        assert grid.size == mine.grid.size and grid.height > 6 * 128  # one row of tiles per prompt


def test_eval_cli_errors_come_before_the_model_loads(trained_run, toy_world, tmp_path, capsys, no_model_loads):
    _, run = trained_run
    cases = [(["--model", str(tmp_path / "none"), "--pairs", str(toy_world)], "does not exist"),
             (["--model", str(run), "--pairs", str(tmp_path / "none.jsonl")], "--pairs"),
             (["--model", str(run), "--pairs", str(toy_world), "reward.generation=nope"], "reward.generation"),
             (["--model", str(run), "--pairs", str(toy_world), "--samples", "0"], "--samples")]
    for args, expected in cases:
        assert cli.main(["eval", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("pairuni eval: ") and "\n" not in err and expected in err, err


def test_held_out_split_is_seeded_disjoint_and_validated(toy_world, tmp_path, tiny_overrides, no_model_loads):
    def cfg(**extra):
        return load_config(None, tiny_overrides(toy_world, tmp_path, **{"data.max_pairs": "null", **extra}))

    all_pairs = read_pairs(toy_world)
    split = data_splits(cfg(**{"data.eval_fraction": 0.25}))
    assert len(split.eval) == 4 and len(split.train) == 12
    ids = {id(p) for p in split.train}
    assert not ids & {id(p) for p in split.eval}
    key = [(p.understand.source_id, p.generate.source_id) for p in split.eval]
    assert key == [(p.understand.source_id, p.generate.source_id) for p in data_splits(cfg(**{"data.eval_fraction": 0.25})).eval]
    other = data_splits(cfg(**{"data.eval_fraction": 0.25, "train.seed": 1})).eval
    assert key != [(p.understand.source_id, p.generate.source_id) for p in other]
    order = [(p.understand.source_id, p.generate.source_id) for p in all_pairs]
    kept = [(p.understand.source_id, p.generate.source_id) for p in split.train]
    assert kept == [k for k in order if k not in key]  # training pairs keep the file's order
    held = data_splits(cfg(**{"data.eval_pairs_path": str(toy_world)}))
    assert len(held.eval) == 16 and len(held.train) == 16 and held.eval_root == Path(toy_world).parent
    assert data_splits(cfg()).eval == []
    bad = [({"train.eval_every": 2}, "train.eval_every"), ({"data.eval_fraction": 1.0}, "data.eval_fraction"),
           ({"data.eval_fraction": 0.5, "data.eval_pairs_path": str(toy_world)}, "data.eval_fraction"),
           ({"data.eval_pairs_path": str(tmp_path / "none.jsonl")}, "data.eval_pairs_path"),
           ({"train.eval_samples": 0}, "train.eval_samples"), ({"train.eval_every": -1}, "train.eval_every")]
    for extra, key_name in bad:
        with pytest.raises(ConfigError, match=key_name.replace(".", r"\.")):
            cfg(**extra)
    with pytest.raises(ConfigError, match="data.pairs_per_step"):  # 0.9 of 16 held out leaves 2 < 4 per step
        data_splits(cfg(**{"data.eval_fraction": 0.9, "data.pairs_per_step": 4}))


def _training_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time.", "eval/"))} for r in rows]


def test_evaluation_during_training_leaves_the_trajectory_unchanged(toy_world, tmp_path, tiny_overrides):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    split = {"data.max_pairs": "null", "data.eval_fraction": 0.25, "train.eval_samples": 2}
    plain, evaluated = tmp_path / "plain", tmp_path / "evaluated"
    PairGRPOTrainer.from_config(load_config(None, tiny_overrides(toy_world, plain, **split))).train()
    PairGRPOTrainer.from_config(load_config(None, tiny_overrides(toy_world, evaluated, **split,
                                                                 **{"train.eval_every": 1}))).train()
    assert _training_rows(evaluated) == _training_rows(plain)  # losses, rewards, grad norms: bit for bit
    rows = [json.loads(line) for line in (evaluated / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["eval/understanding_accuracy"] <= 1 and r["eval/images"] == 8 for r in rows)
    assert all("eval/attribute_score" in r and any(k.startswith("eval/tag/") for k in r) for r in rows)
    for step in (1, 2):
        report = json.loads((evaluated / "eval" / f"step_{step:06d}.json").read_text())
        assert report["summary"]["overall"]["prompts"] == 4 and report["settings"]["step"] == step
        assert (evaluated / "eval" / f"step_{step:06d}.png").stat().st_size > 0
    assert not list((evaluated / "eval").glob(".*"))  # no temp file left
    events = EventAccumulator(str(evaluated / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert "eval/images" in events.Tags()["images"]
    assert [e.step for e in events.Images("eval/images")] == [1, 2]
    assert "eval/understanding_accuracy" in events.Tags()["scalars"]
    assert [p.name for p in (plain / "eval").iterdir()] == [HELDOUT_FILE]  # no evaluation without eval_every
    assert GRID_PROMPTS >= 4
    aside = set_aside(evaluated)  # train.on_existing=set_aside moves the evaluations with the rest of the run
    assert not (evaluated / "eval").exists() and (aside / "eval" / "step_000001.png").is_file()
    # the held-out pairs are written for a later `pairuni eval --pairs`, their images found from there
    held = aside / "eval" / HELDOUT_FILE
    expected = data_splits(load_config(None, tiny_overrides(toy_world, tmp_path / "x", **split))).eval
    assert [p.to_record()["generate_ann"]["id"] for p in read_pairs(held)] == [p.generate.source_id for p in expected]
    for p, q in zip(read_pairs(held), expected):
        assert Path(p.understand.image_path) == (Path(toy_world).parent / q.understand.image_path).resolve()


def test_cli_eval_of_a_lora_run_equals_in_process_evaluate(lora_run, toy_world, tmp_path, capsys):
    """`pairuni eval --model RUN_DIR` of a LoRA run rebuilds the adapted policy (base + the run's adapters)."""
    trainer, run = lora_run
    out = tmp_path / "eval"
    assert cli.main(["eval", "--model", str(run), "--pairs", str(toy_world), "--out", str(out), "--seed", "3",
                     "--samples", "2", "--max-pairs", "4", "--no-progress"]) == 0
    saved = json.loads((out / "eval.json").read_text())
    mine = _eval(trainer, read_pairs(toy_world)[:4], Path(toy_world).parent, seed=3, samples=2)
    assert saved["summary"] == json.loads(json.dumps(mine.summary))
    assert saved["prompts"] == json.loads(json.dumps(mine.prompts)) and saved["questions"] == mine.questions
    assert "adapters" in saved["settings"]["weights"]
