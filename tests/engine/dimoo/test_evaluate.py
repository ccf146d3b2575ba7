"""`pairuni eval` on DiMOO (engine/dimoo/evaluate.py): a 2-step toy run evaluated through the CLI gives what the
samplers give when called directly with the evaluation seeds; the same seed gives the same eval.json; a damaged
checkpoint is refused in one line naming the file; a Lumina-DiMOO model folder evaluates too."""

import json
import shutil

import pytest

from engine.checkpoint_store import CheckpointStore
from engine.cli import main
from engine.data import default_pairs_path
from engine.data.io import data_root_of, read_pairs
from engine.dimoo import run as dr
from engine.dimoo.evaluate import eval_seeds
from engine.dimoo.pairgrpo import DimooGRPOConfig, rollout_generation, rollout_understanding
from engine.dimoo.toyworld import ToyDimooWorld
from engine.evaluate import write_pairs_elsewhere
from engine.rollout import rollout_seeds
from engine.seeds import ROLLOUT_STREAMS

CFG = DimooGRPOConfig(group_size=2, image_steps=2)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run folder, pairs file): a 2-step DiMOO run on 4 toy pairs, the pairs written with absolute image paths."""
    tmp = tmp_path_factory.mktemp("dimoo_eval")
    pairs = read_pairs(default_pairs_path())[:4]
    root = data_root_of(default_pairs_path())
    pairs_file = tmp / "pairs.jsonl"
    write_pairs_elsewhere(pairs, root, pairs_file)
    world = ToyDimooWorld.build(pairs, root)
    dr.run(world, CFG, 2, tmp / "run", pairs=pairs, pairs_per_step=2)
    return tmp / "run", pairs_file


def _eval(model, pairs_file, out, *extra):
    return main(["eval", "--model", str(model), "--pairs", str(pairs_file), "--samples", "2", "--out", str(out),
                 "--no-progress", *extra])


def _numbers(path):
    data = json.loads(path.read_text())
    return data["summary"], data["questions"], data["prompts"]


def test_eval_cli_equals_the_samplers_called_directly(trained, tmp_path, capsys):
    run_dir, pairs_file = trained
    assert _eval(run_dir, pairs_file, tmp_path / "out") == 0
    assert "overall" in capsys.readouterr().out
    summary, questions, prompts = _numbers(tmp_path / "out" / "eval.json")
    assert (tmp_path / "out" / "eval.png").is_file()

    # re-computation: the newest checkpoint, its tokenizer, the evaluation seeds, the samplers themselves
    st = dr.load_state(CheckpointStore(run_dir).resume_candidate().path)
    assert st.step == 2
    pairs = read_pairs(pairs_file)
    world = ToyDimooWorld.build(pairs, data_root_of(pairs_file), tokenizer=st.tokenizer)
    answers = rollout_seeds(0, 1, "evaluation", len(pairs))  # the documented streams, spelled out
    images = rollout_seeds(0, 0, "evaluation", 2 * len(pairs))
    predicted, correct, rewards = [], [], []
    for i, p in enumerate(pairs):
        ro = rollout_understanding(st.model, world, p.understand, answers[i:i + 1], st.cfg)
        text = world.decode_text(ro.targets()[0])
        predicted.append(text)
        correct.append(float(world.understanding_rewards([p.understand], [text])[0]))
        ro = rollout_generation(st.model, world, p.generate, images[2 * i:2 * i + 2], st.cfg)
        pics = world.decode_images(ro.targets().view(-1, world.grid, world.grid))
        rewards.append(world.generation_rewards([p.generate] * 2, pics).tolist())
    assert [q["predicted"] for q in questions] == predicted
    assert [q["correct"] for q in questions] == correct
    assert summary["overall"]["understanding_accuracy"] == pytest.approx(sum(correct) / len(correct), abs=0)
    assert [p["rewards"] for p in prompts] == rewards
    flat = [r for row in rewards for r in row]
    assert summary["overall"]["generation_reward"] == pytest.approx(sum(flat) / len(flat), rel=1e-12)
    # per tag: the questions / prompts carrying that tag
    for tag in {q["tag"] for q in questions if q["tag"]}:
        mine = [c for q, c in zip(questions, correct) if q["tag"] == tag]
        assert summary[tag]["understanding_accuracy"] == pytest.approx(sum(mine) / len(mine), abs=1e-12)


def test_eval_seeds_are_no_training_stream():
    """The evaluation stream differs from both training streams at every step a run takes (steps >= 1)."""
    from engine.seeds import rollout_stream

    evals = {rollout_stream(s, k, "evaluation") for s in range(4) for k in (0, 1)}
    train = {rollout_stream(s, step, task) for s in range(4) for step in range(1, 50)
             for task in ROLLOUT_STREAMS if task != "evaluation"}
    assert not evals & train
    a, b = eval_seeds(0, 3, 2)
    assert a.shape == (3,) and b.shape == (6,) and not set(a.tolist()) & set(b.tolist())


def test_same_seed_same_numbers(trained, tmp_path):
    run_dir, pairs_file = trained
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        assert _eval(run_dir, pairs_file, tmp_path / name, "--seed", seed) == 0
    a, b, c = (_numbers(tmp_path / n / "eval.json") for n in "abc")
    assert a == b
    assert (a[1], a[2]) != (c[1], c[2])  # the seed is what draws them


def test_damaged_checkpoint_one_line(trained, tmp_path, capsys):
    run_dir, pairs_file = trained
    ck = tmp_path / "step_000002"
    shutil.copytree(CheckpointStore(run_dir).resume_candidate().path, ck)
    weights = ck / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert _eval(ck, pairs_file, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pairuni eval:") and "model.safetensors" in err
    assert not (tmp_path / "out" / "eval.json").exists()


@pytest.mark.parametrize("extra, names", [(["rollout.image_top_k=3"], "rollout.image_top_k"),
                                          (["--batch", "4"], "--batch"),
                                          (["rollout.text_block_length=3"], "rollout.max_new_tokens")])
def test_bad_settings_one_line_before_the_weights_load(trained, tmp_path, capsys, monkeypatch, extra, names):
    """A Janus-only key, --batch, an answer length the block sampler cannot split: exit 2, one line naming it,
    and the checkpoint's weights are never read."""
    from engine.dimoo import evaluate as de

    run_dir, pairs_file = trained
    monkeypatch.setattr(de, "load_model", lambda *a, **k: pytest.fail("the weights loaded before the check"))
    capsys.readouterr()
    assert _eval(run_dir, pairs_file, tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and names in err


def test_model_folder(dimoo_dir, tmp_path, trained):
    pytest.importorskip("engine.dimoo.folder_world",
                        reason="engine/dimoo/folder_world.py (DimooFolderWorld) is not written yet")
    _, pairs_file = trained
    out = tmp_path / "out"
    assert main(["eval", "--model", str(dimoo_dir), "--pairs", str(pairs_file), "--samples", "1", "--max-pairs", "2",
                 "--out", str(out), "--no-progress", "--dtype", "float32", "rollout.image_resolution=32",
                 "rollout.image_steps=2"]) == 0
    summary, questions, prompts = _numbers(out / "eval.json")
    assert len(questions) == 2 and len(prompts) == 2 and all(len(p["rewards"]) == 1 for p in prompts)
    settings = json.loads((out / "eval.json").read_text())["settings"]
    assert (settings["weights"], settings["step"], settings["image_steps"]) == ("folder", None, 2)


def test_config_from_the_run_then_overrides(tmp_path):
    """A checkpoint without an engine config: its DimooGRPOConfig comes back exactly through the rollout keys
    (`trainer.step_config` of them); a stored config wins (unknown keys ignored); overrides and --config last."""
    from engine.dimoo.evaluate import Source, eval_config
    from engine.dimoo.trainer import step_config
    from engine.text import ToyTokenizer

    grpo = DimooGRPOConfig(group_size=3, image_steps=5, text_steps=4, cfg_scale=2.5, image_temperature=0.7,
                           text_temperature=0.9, order="confidence", score_groups=2)
    tok = ToyTokenizer.from_texts(["a b"])
    src = Source("checkpoint", tmp_path, 1, None, grpo, tok, None, 64)
    assert step_config(eval_config(src)) == grpo
    assert eval_config(src).rollout.max_new_tokens == ToyDimooWorld.build([], None).gen_length

    saved = {"rollout": {"image_steps": 7, "cfg_scale": 4.0, "no_such_key": 1}, "model": {"family": "dimoo"}}
    cfg = eval_config(Source("checkpoint", tmp_path, 1, saved, grpo, tok, None, 64))
    assert (cfg.rollout.image_steps, cfg.rollout.cfg_scale, cfg.rollout.text_steps) == (7, 4.0, 2)  # 2: default
    yaml = tmp_path / "eval.yaml"
    yaml.write_text("rollout:\n  image_steps: 9\n  image_temperature: 0.5\ntrain:\n  steps: 3\n")
    cfg = eval_config(Source("checkpoint", tmp_path, 1, saved, grpo, tok, None, 64), str(yaml),
                      ["rollout.image_temperature=0.25"])
    assert (cfg.rollout.image_steps, cfg.rollout.image_temperature) == (9, 0.25)
    assert step_config(cfg).cfg_scale == 3.0  # w = s - 1
