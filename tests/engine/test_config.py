"""Configuration: defaults, YAML + overrides, errors that name the key, and failing before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine import cli
from engine.config import Config, ConfigError, load_config, parse_override

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_yaml_is_the_embedded_default():
    assert load_config(str(ROOT / "configs" / "tiny.yaml")) == Config()


@pytest.mark.parametrize("name, group_size", [("janus_pro_1b.yaml", 8), ("janus_pro_7b_1gpu.yaml", 4)])
def test_janus_configs_carry_the_paper_settings(name, group_size):
    # The weights and data are not in the repository: point those keys elsewhere to validate the rest.
    cfg = load_config(str(ROOT / "configs" / name),
                      ["model.path=null", "data.pairs_path=null", "reward.generation=toyworld"])
    assert cfg.rollout.group_size == group_size
    assert (cfg.rollout.cfg_scale, cfg.rollout.image_temperature, cfg.rollout.temperature) == (5.0, 1.0, 1.0)
    assert cfg.optim.lr == 1e-6 and cfg.algo.beta == 0.0
    assert cfg.model.dtype == "bfloat16" and cfg.optim.optimizer == "adamw8bit"


def test_overrides_parse_yaml_values_into_nested_keys():
    cfg = load_config(None, ["rollout.group_size=4", "optim.betas=[0.8, 0.95]", "data.max_pairs=null",
                             "optim.lr=3e-4", "train.progress=false"])
    assert cfg.rollout.group_size == 4
    assert cfg.optim.betas == [0.8, 0.95]
    assert cfg.data.max_pairs is None
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.progress is False
    assert parse_override("a.b.c=1") == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize("override, key", [
    ("rollout.group_sise=4", "rollout.group_sise"),     # unknown key
    ("rollout.group_size=four", "rollout.group_size"),  # wrong type
    ("rollout.group_size=1", "rollout.group_size"),     # out of range
    ("algo.loss_agg_mode=mean", "algo.loss_agg_mode"),
    ("algo.pair_weighting=cubic", "algo.pair_weighting"),
    ("algo.loss_type=grpo", "algo.loss_type: expected one of ppo | cispo"),  # TRL's grpo is ppo here
    ("algo.top_entropy_quantile=-0.1", "algo.top_entropy_quantile: expected a number in"),
    ("algo.epsilon_low=1.5", "algo.epsilon_low: expected a number in"),  # moved to engine/algo.py
    ("optim.betas=[0.9]", "optim.betas"),
    ("data.pairs_path=/nonexistent/pairs.jsonl", "data.pairs_path"),
    ("model.path=/nonexistent/janus", "model.path"),
    ("reward.generation=clip", "reward.clip_path"),     # clip needs a local model
    ("rollout.group_size", "key=value"),                # not an override at all
    ("optim.lr=.inf", "optim.lr: expected a finite number"),
    ("optim.lr=.nan", "optim.lr: expected a finite number"),
    ("algo.beta=-.inf", "algo.beta: expected a finite number"),
    ("optim.betas=[0.9, .nan]", "1]: expected a finite number"),  # optim.betas[1]
    ("optim.max_grad_norm=inf", "optim.max_grad_norm: expected a finite number"),  # the string form too
    ("model.dtype=float64", "model.dtype: expected one of float32 | bfloat16 | float16"),  # a Literal choice
    ("model.train_modules=[lm_head, vision]", r"model.train_modules\[1\]: expected one of language_model"),
    ("train.run_dir=", "train.run_dir: expected a folder"),  # would write into the current folder
    ("data.pairs_path=", "data.pairs_path: expected a path or null"),  # would train on the bundled pairs
    ("data.image_root=''", "data.image_root: expected a path or null"),
    ("data.eval_pairs_path=", "data.eval_pairs_path: expected a path or null"),
    ("reward.clip_path=' '", "reward.clip_path: expected a path or null"),
    ("reward.hpsv2_path=", "reward.hpsv2_path: expected a path or null"),
])
def test_bad_values_raise_config_error_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_valid_reward_names_come_from_the_registry():
    from engine.rewards import REWARDS, RewardNeeds, register_reward, reward_names

    assert reward_names("generation") == ("clip", "hpsv2", "pair_qa", "toyworld")
    with pytest.raises(ConfigError, match=r"reward\.generation: expected one of \('clip', 'hpsv2', 'pair_qa', 'toyworld'\)"):
        load_config(None, ["reward.generation=hps"])

    @register_reward("constant")
    class Constant:
        needs = RewardNeeds("generation")

    try:  # a newly registered reward is a valid name at once, and without images decode_images may be off
        assert load_config(None, ["reward.generation=constant", "rollout.decode_images=false"]).reward.generation == "constant"
    finally:
        del REWARDS["constant"]


def test_a_reward_that_reads_images_needs_decoded_images():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["reward.generation=pair_qa", "rollout.decode_images=false"])
    message = str(exc.value)
    assert message.startswith("rollout.decode_images: expected true (reward.generation=pair_qa reads decoded images)")
    assert "\n" not in message


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  group_size: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(bad))


def _write_pairs(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _good_record(toy_world):
    return json.loads(Path(toy_world).read_text().splitlines()[0])


@pytest.mark.parametrize("case, message", [
    ("malformed", r"pairs\.jsonl:2: malformed JSON"),
    ("no_answer", "needs a question and an answer"),
    ("no_prompt", "needs a prompt"),
    ("missing_image", "does not exist"),
    ("bad_similarity", "similarity"),
    ("too_few", "pairs_per_step"),
    ("no_attributes", "needs generate_ann.attributes"),
    ("pair_qa_without_qa", r"reward\.generation=pair_qa needs a question and an answer in generate_ann"),
])
def test_bad_data_fails_before_the_model_loads(case, message, toy_world, tmp_path, capsys, no_model_loads):
    good = _good_record(toy_world)
    root = Path(toy_world).parent
    good["understand_ann"]["image_path"] = str(root / good["understand_ann"]["image_path"])
    bad = json.loads(json.dumps(good))
    records = [good, bad]
    if case == "malformed":
        records = [good, '{"similarity": 0.7, "generate_ann": ']
    elif case == "no_answer":
        bad["understand_ann"]["answer"] = ""
    elif case == "no_prompt":
        bad["generate_ann"]["prompt"] = ""
    elif case == "missing_image":
        bad["understand_ann"]["image_path"] = str(tmp_path / "nope.png")
    elif case == "bad_similarity":
        bad["similarity"], bad["kind"] = 1.7, "retrieved"
    elif case == "too_few":
        records = [good]
    elif case == "no_attributes":
        del bad["generate_ann"]["attributes"]
    elif case == "pair_qa_without_qa":
        bad["generate_ann"]["question"] = ""
    pairs = _write_pairs(tmp_path / "pairs.jsonl", records)
    extra = ["reward.generation=pair_qa"] if case == "pair_qa_without_qa" else []
    rc = cli.main(["train", f"data.pairs_path={pairs}", f"train.run_dir={tmp_path / 'run'}", "data.pairs_per_step=2",
                   *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert "config error" in err
    assert pytest.importorskip("re").search(message, err), err


def test_bad_config_fails_before_the_model_loads(tmp_path, capsys, no_model_loads):
    rc = cli.main(["train", "rollout.group_size=1", f"train.run_dir={tmp_path}"])
    assert rc == 2
    assert "rollout.group_size" in capsys.readouterr().err


def test_print_config_resolves_overrides(capsys):
    assert cli.main(["train", "--print-config", "rollout.group_size=3"]) == 0
    assert "group_size: 3" in capsys.readouterr().out


def test_24gb_config_is_lora_on_a_4bit_base():
    """Paper settings as the 1-GPU config, LoRA on an NF4 base; NF4 is refused by name without CUDA."""
    import torch

    from engine.config import ConfigError

    path, keep_out = str(ROOT / "configs" / "janus_pro_7b_24gb.yaml"), ["model.path=null", "data.pairs_path=null",
                                                                         "reward.generation=toyworld"]
    if torch.cuda.is_available():
        cfg = load_config(path, keep_out)
    else:
        with pytest.raises(ConfigError, match="model.lora.quantize: expected none on a machine without CUDA"):
            load_config(path, keep_out)
        cfg = load_config(path, keep_out + ["model.lora.quantize=none"])
        cfg.model.lora.quantize = "nf4"
    assert cfg.model.lora.rank > 0 and cfg.model.lora.quantize == "nf4"
    assert set(cfg.model.lora.targets) >= {"attention", "mlp", "generation_head"}
    assert (cfg.rollout.group_size, cfg.rollout.cfg_scale, cfg.algo.beta) == (4, 5.0, 0.0)


def test_keys_added_after_a_checkpoint_change_nothing_while_at_their_default():
    """A checkpoint written before optim.update / model.lora existed resumes; a non-default value is a change."""
    from engine.run_start import trajectory_changes

    saved = Config().to_dict()
    del saved["optim"]["update"]
    del saved["model"]["lora"]
    for key in ("loss_type", "importance_sampling_level", "entropy_coef", "top_entropy_quantile",
                "advantage_estimator", "scale_rewards", "sapo_temperature_neg", "dro_beta"):  # issue 25's algo keys
        del saved["algo"][key]
    assert trajectory_changes(saved, Config().to_dict()) == []
    changed = Config()
    changed.model.lora.rank = 4
    changed.algo.loss_type = "sapo"
    assert trajectory_changes(saved, changed.to_dict()) == ["algo.loss_type: 'ppo' -> 'sapo'",
                                                            "model.lora.rank: 0 -> 4"]


def test_checking_a_config_changes_nothing_on_disk(trained_run, toy_world, tiny_overrides, tmp_path):
    """load_config only reads; where a run starts (clearing a dead save, refusing a changed config) is
    run_start.start_point's, which the trainer calls before the model loads."""
    import shutil
    import subprocess
    import sys

    from engine.checkpoint_store import CheckpointStore
    from engine.run_start import start_point

    run = tmp_path / "run"
    shutil.copytree(trained_run[1], run)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    store = CheckpointStore(run)
    temp = store.root / f".tmp_step_000009.{store.host}.{int(dead.stdout)}"
    temp.mkdir()
    before = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*"))
    changed = load_config(None, tiny_overrides(toy_world, run, **{"train.resume": "true", "algo.beta": 0.5}))
    assert sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*")) == before
    with pytest.raises(ConfigError, match="written with another config, .*algo.beta"):
        start_point(changed)
    assert not temp.exists()  # start_point cleared the dead save
    point = start_point(load_config(None, tiny_overrides(toy_world, run, **{"train.resume": "true"})))
    assert point.path is not None and point.path.parent == store.root


# ----------------------------------------------------------------------------- YAML: plain data only
#: 9 levels of 9 aliases each: 400 bytes that `yaml.safe_load` expands to 9**9 (387 million) strings
ALIAS_BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("text, message", [
    ("train:\n  steps: 3\nrollout:\n  group_size: 4\ntrain:\n  seed: 1\n",
     r"line 5: duplicate key 'train' \(first on line 1"),  # last-wins would drop the first train: block
    ("train:\n  steps: 3\n  steps: 4\n", r"line 3: duplicate key 'steps' \(first on line 2"),
    (ALIAS_BOMB, "line 1: YAML anchor &a refused"),
    ("optim:\n  betas: *b\n", "line 2: YAML alias [*]b refused"),
    ("train:\n  <<: {steps: 3}\n  seed: 1\n", "line 2: YAML merge key << refused"),
    ("train: [\n", "invalid YAML at line 2"),
], ids=["duplicate_block", "duplicate_key", "alias_bomb", "alias", "merge_key", "invalid"])
def test_config_files_refuse_duplicate_keys_and_aliases_in_one_line(tmp_path, text, message, capsys, no_model_loads):
    import time

    path = tmp_path / "run.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=f"^--config {path}: {message}") as info:
        load_config(str(path), check=False)
    assert time.perf_counter() - start < 1 and "\n" not in str(info.value) and len(str(info.value)) < 300
    assert cli.main(["train", "--config", str(path), f"train.run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and len(err) < 400 and not (tmp_path / "run").exists(), err


def test_the_alias_bomb_is_400_bytes_and_refused_in_overrides_too():
    assert len(ALIAS_BOMB) <= 400
    for override, message in [("optim.betas=&a [0.9, 0.99]", "YAML anchor &a refused"),
                              ("optim.betas=*a", "YAML alias [*]a refused"),
                              ("train={steps: 1, steps: 2}", "duplicate key 'steps'"),
                              ("train=" + ALIAS_BOMB.replace("\n", ", ").join("{}"), "YAML anchor &a refused")]:
        with pytest.raises(ConfigError, match=f"^override {override.split('=')[0]}: cannot parse value: line 1: {message}"):
            load_config(None, [override])


# ----------------------------------------------------------------------------- the data fingerprint
def _latest_state(run: Path) -> dict:
    return json.loads((run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip() / "state.json").read_text())


def test_resume_compares_the_pairs_content_not_the_path_spelling(trained_run, toy_world, tiny_overrides, tmp_path,
                                                                   monkeypatch, capsys, no_model_loads):
    """Every checkpoint stores the pairs file resolved and hashed; resume accepts that content by any path
    (relative, symlink, a copy) and refuses, in one line naming the file, a file whose content changed."""
    import hashlib
    import shutil

    from engine.run_start import start_point

    run = tmp_path / "run"
    shutil.copytree(trained_run[1], run)
    saved = _latest_state(run)["data_fingerprint"]["data.pairs_path"]
    assert saved == {"path": str(Path(toy_world).resolve()), "sha256": hashlib.sha256(Path(toy_world).read_bytes()).hexdigest()}
    resume = {"train.resume": "true"}
    monkeypatch.chdir(Path(toy_world).parent)
    (tmp_path / "link.jsonl").symlink_to(toy_world)
    world = tmp_path / "world"
    shutil.copytree(Path(toy_world).parent, world)
    for same in ("pairs.jsonl", "./../world/pairs.jsonl", tmp_path / "link.jsonl", world / "pairs.jsonl"):
        assert start_point(load_config(None, tiny_overrides(same, run, **resume))).path is not None, same
    lines = (world / "pairs.jsonl").read_text().splitlines(keepends=True)
    (world / "pairs.jsonl").write_text("".join(lines[1:] + lines[:1]))  # same pairs, another order: other data
    assert cli.main(["train", *tiny_overrides(world / "pairs.jsonl", run, **resume)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"data.pairs_path: {world / 'pairs.jsonl'} is not the pairs file" in err, err
    assert "content changed" in err


def test_a_checkpoint_without_a_fingerprint_still_resumes(trained_run, toy_world, tiny_overrides, tmp_path, monkeypatch,
                                                          caplog):
    """Written before fingerprints: resumed with one warning; its pairs path still counts by the file it names."""
    import shutil

    from engine import checkpoint, run_start

    run = tmp_path / "run"
    shutil.copytree(trained_run[1], run)
    real = checkpoint.read_state

    def unprinted(path):
        state = real(path)
        del state["data_fingerprint"]
        return state

    monkeypatch.setattr(checkpoint, "read_state", unprinted)
    monkeypatch.chdir(Path(toy_world).parent)
    for _ in range(2):
        assert run_start.start_point(load_config(None, tiny_overrides("pairs.jsonl", run, **{"train.resume": "true"}))).path
    warned = [r.getMessage() for r in caplog.records if "predates data fingerprints" in r.getMessage()]
    assert len(warned) == 1 and str(run) in warned[0], warned  # once, naming the checkpoint
    elsewhere = tmp_path / "elsewhere.jsonl"
    shutil.copyfile(toy_world, elsewhere)
    with pytest.raises(ConfigError, match="data.pairs_path: "):
        run_start.start_point(load_config(None, tiny_overrides(elsewhere, run, **{"train.resume": "true"})))
