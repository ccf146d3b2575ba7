"""`pairuni export`: which weights are written, reload equality, refusal, atomicity, bad inputs, and the
toy-world workflow train -> export -> eval -> train model.path=DIR."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine import cli, export
from engine import model as janus
from engine.config import load_config
from engine.policy_io import TOY_TOKENIZER_FILE, load_policy, tiny_policy
from engine.text import ToyPrompts, ToyTokenizer
from engine.trainer import PairGRPOTrainer


def _checkpoint(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("pairuni ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def master_run(toy_world, tmp_path_factory, tiny_overrides):
    """A 1-step bf16 run that keeps fp32 master weights."""
    run = tmp_path_factory.mktemp("master") / "run"
    cfg = load_config(None, tiny_overrides(toy_world, run, **{"train.steps": 1, "model.dtype": "bfloat16",
                                                              "optim.master_weights": "true"}))
    PairGRPOTrainer.from_config(cfg).train()
    return run


def test_export_writes_the_fp32_masters_cast_to_dtype(master_run, tmp_path):
    ckpt = _checkpoint(master_run)
    masters = load_file(str(ckpt / "master.safetensors"))
    policy = load_file(str(ckpt / "policy.safetensors"))
    assert export.main([str(master_run), "--out", str(tmp_path / "f32"), "--dtype", "float32"]) == 0
    written = load_file(str(tmp_path / "f32" / "model.safetensors"))
    moved_below_bf16 = 0
    for name, master in masters.items():
        assert written[name].dtype == torch.float32
        assert torch.equal(written[name], master), name
        moved_below_bf16 += int((written[name] != policy[name].float()).sum())
    assert moved_below_bf16 > 0  # the bf16 policy copy lost what the masters kept
    # frozen weights: those the run trained with (the tiny model at bf16), cast up
    state = json.loads((ckpt / "state.json").read_text())
    base, _ = tiny_policy(ToyTokenizer.from_json(state["tokenizer"]), "cpu", dtype="bfloat16")
    frozen = {n: p for n, p in base.named_parameters() if n not in masters}
    assert frozen and all(torch.equal(written[n], p.float()) for n, p in frozen.items())
    # bf16 export: the masters rounded to bf16, which is what the run's policy copy holds
    assert export.main([str(ckpt), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    written = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    for name, master in masters.items():
        assert torch.equal(written[name], master.to(torch.bfloat16)) and torch.equal(written[name], policy[name])
    info = json.loads((tmp_path / "bf16" / export.EXPORT_INFO_FILE).read_text())
    assert info["step"] == 1 and "master" in info["weights"] and info["source"] == str(ckpt)


def test_reloaded_export_computes_what_the_trained_policy_computes(trained_run, tmp_path):
    from transformers import JanusForConditionalGeneration

    trainer, run = trained_run
    out = tmp_path / "exported"
    assert export.main([str(run), "--out", str(out), "--dtype", "float32"]) == 0
    reloaded = JanusForConditionalGeneration.from_pretrained(out, local_files_only=True, use_safetensors=True).eval()
    trained = trainer.model
    theirs, ours = reloaded.state_dict(), trained.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(6, len(trainer.prompts.tok), (3, 9), generator=g)
    with torch.no_grad():
        a = reloaded(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        b = trained(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        h = torch.randn(3, 4, trained.config.text_config.hidden_size, generator=g)
        img_a, img_b = reloaded.model.generation_head(h), trained.model.generation_head(h)
    assert torch.equal(a, b) and torch.equal(img_a, img_b)
    assert reloaded.generation_config.generation_kwargs["boi_token_id"] == janus.TINY_SPECIAL.boi
    # the toy tokenizer travels with the weights: load_policy gives the run's prompts back
    assert (out / TOY_TOKENIZER_FILE).read_text() == trainer.parts.tokenizer_json
    policy = load_policy(out)
    assert isinstance(policy.prompts, ToyPrompts) and policy.prompts.tok.vocab == trainer.prompts.tok.vocab
    assert policy.step == 2 and policy.config["rollout"] == trainer.cfg.to_dict()["rollout"]


def _refused_over(out: Path, run: Path, capsys) -> None:
    """`pairuni export run --out out` over an existing `out` is a one-line error that leaves `out` as it was."""
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(["export", str(run), "--out", str(out)]) == 2
    assert "--overwrite" in _one_line_error(capsys)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_export_refuses_an_existing_out_without_overwrite(trained_run, tmp_path, capsys):
    _, run = trained_run
    out = tmp_path / "out"
    _refused_over(out, run, capsys)
    (out / "keep.txt").unlink()
    assert cli.main(["export", str(run), "--out", str(out), "--overwrite"]) == 0  # an empty folder: filled
    assert (out / export.EXPORT_MARKER).is_file() and (out / "model.safetensors").is_file()
    (out / "model.safetensors").write_bytes(b"stale")
    assert cli.main(["export", str(run), "--out", str(out), "--overwrite"]) == 0  # an earlier export: replaced
    assert (out / "model.safetensors").read_bytes() != b"stale"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no stage or old copy left beside it


def test_export_overwrite_replaces_only_an_earlier_export(trained_run, tmp_path, capsys, no_model_loads):
    """--overwrite onto a folder that no export wrote (no .pairuni-export in it) is one line and deletes nothing."""
    _, run = trained_run
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("private")
    (home / "thesis.tex").write_text("\\documentclass{book}")
    before = sorted((p.relative_to(home), p.read_bytes() if p.is_file() else None) for p in home.rglob("*"))
    assert cli.main(["export", str(run), "--out", str(home), "--overwrite"]) == 2
    err = _one_line_error(capsys)
    assert "was not written by this command (no .pairuni-export in it)" in err and "nothing was deleted" in err, err
    assert sorted((p.relative_to(home), p.read_bytes() if p.is_file() else None) for p in home.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]  # nothing staged beside it either
    with pytest.raises(export.ExportError, match="no .pairuni-export"):
        export.export_policy(run, home, overwrite=True)
    from engine.files import staged_folder

    with pytest.raises(ValueError, match="no .pairuni-folder"), staged_folder(home, overwrite=True):
        pass  # every --overwrite of the engine goes through this check
    assert (home / "thesis.tex").is_file() and (home / ".ssh" / "id_ed25519").read_text() == "private"


def test_exported_config_unties_the_text_head(trained_run, tmp_path, monkeypatch):
    """Janus's lm_head is its own trained weight: config.json says tie_word_embeddings: false (top level and
    text config) even when the loaded config said true (a base config that omits the key), and the head is saved."""
    trainer, run = trained_run
    real = export.load_policy

    def tied(*args, **kwargs):
        policy = real(*args, **kwargs)
        policy.model.config.tie_word_embeddings = True
        policy.model.config.text_config.tie_word_embeddings = True
        return policy

    monkeypatch.setattr(export, "load_policy", tied)
    out = tmp_path / "out"
    export.export_policy(run, out, dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["text_config"]["tie_word_embeddings"] is False
    written = load_file(str(out / "model.safetensors"))
    heads = [n for n in written if n.endswith("lm_head.weight")]
    assert heads and all(torch.equal(written[n], trainer.model.state_dict()[n]) for n in heads)


def test_a_failed_export_leaves_out_absent_or_intact(trained_run, tmp_path, monkeypatch):
    from transformers import JanusForConditionalGeneration

    _, run = trained_run

    def half_then_fail(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(JanusForConditionalGeneration, "save_pretrained", half_then_fail)
    fresh = tmp_path / "fresh"
    with pytest.raises(OSError, match="disk full"):
        export.export_policy(run, fresh, dtype="float32")
    assert not fresh.exists()
    old = tmp_path / "old"  # an earlier export (its marker), which --overwrite may replace
    old.mkdir()
    (old / "config.json").write_text("{}")
    (old / export.EXPORT_MARKER).write_text("")
    with pytest.raises(OSError, match="disk full"):
        export.export_policy(run, old, dtype="float32", overwrite=True)
    assert sorted(p.name for p in old.iterdir()) == [export.EXPORT_MARKER, "config.json"]
    assert (old / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_an_export_killed_between_writes_leaves_nothing_under_out(trained_run, tmp_path):
    _, run = trained_run
    out = tmp_path / "out"
    script = (
        "import os, signal, sys\n"
        "from transformers import JanusForConditionalGeneration\n"
        "from engine import export\n"
        "real = JanusForConditionalGeneration.save_pretrained\n"
        "def write_then_die(self, folder, **kw):\n"
        "    real(self, folder, **kw)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "JanusForConditionalGeneration.save_pretrained = write_then_die\n"
        "export.main(sys.argv[1:])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(run), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert not out.exists()
    leftovers = list(tmp_path.iterdir())
    assert all(p.name.startswith(".out.") for p in leftovers) and leftovers  # the hidden stage only
    assert export.main([str(run), "--out", str(out)]) == 0 and (out / "model.safetensors").is_file()


def test_bad_sources_give_one_line_errors(trained_run, tmp_path, capsys, no_model_loads):
    _, run = trained_run
    out = str(tmp_path / "out")
    assert cli.main(["export", str(tmp_path / "missing"), "--out", out]) == 2
    assert "does not exist" in _one_line_error(capsys)
    (tmp_path / "empty").mkdir()
    assert cli.main(["export", str(tmp_path / "empty"), "--out", out]) == 2
    assert "is not a run" in _one_line_error(capsys)
    damaged = tmp_path / "damaged"
    shutil.copytree(_checkpoint(run), damaged)
    weights = damaged / "policy.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert cli.main(["export", str(damaged), "--out", out]) == 2
    assert "checksum" in _one_line_error(capsys)
    unsealed = tmp_path / "unsealed"
    shutil.copytree(_checkpoint(run), unsealed)
    (unsealed / "manifest.json").unlink()
    assert cli.main(["export", str(unsealed), "--out", out]) == 2
    assert "manifest.json" in _one_line_error(capsys)
    fresh_run = tmp_path / "fresh_run"
    (fresh_run / "checkpoints").mkdir(parents=True)
    (fresh_run / "metrics.jsonl").write_text("")
    assert cli.main(["export", str(fresh_run), "--out", out]) == 2
    assert "no checkpoint yet" in _one_line_error(capsys)
    assert cli.main(["export", str(run), "--out", str(run / "checkpoints"), "--overwrite"]) == 2
    assert "holds the source" in _one_line_error(capsys)
    assert not Path(out).exists()


def test_toy_workflow_train_export_eval_train(trained_run, toy_world, tmp_path, tiny_overrides, capsys):
    """A folder exported from a tiny-model run is a model.path: training continues from its weights with its
    toy tokenizer, and files of the base folder (here a stand-in processor file) are carried to the next export."""
    trainer, run = trained_run
    first = tmp_path / "first"
    assert cli.main(["export", str(run), "--out", str(first), "--dtype", "float32"]) == 0
    (first / "processor_config.json").write_text('{"stand_in": true}\n')
    assert cli.main(["eval", "--model", str(first), "--pairs", str(toy_world), "--samples", "2",
                     "--max-pairs", "3", "--no-progress"]) == 0
    assert "overall" in capsys.readouterr().out
    run2 = tmp_path / "run2"
    cfg = load_config(None, tiny_overrides(toy_world, run2, **{"model.path": str(first), "train.steps": 1}))
    continued = PairGRPOTrainer.from_config(cfg)
    start = continued.model.state_dict()
    assert all(torch.equal(start[k], v) for k, v in trainer.model.state_dict().items())
    assert continued.parts.tokenizer_json == trainer.parts.tokenizer_json
    continued.train()
    second = tmp_path / "second"
    assert cli.main(["export", str(run2), "--out", str(second), "--dtype", "float32"]) == 0
    assert (second / "processor_config.json").read_bytes() == (first / "processor_config.json").read_bytes()
    assert (second / TOY_TOKENIZER_FILE).read_text() == trainer.parts.tokenizer_json
    moved = load_file(str(second / "model.safetensors"))
    assert any(not torch.equal(moved[n], p) for n, p in trainer.model.state_dict().items() if n in moved)


def test_a_sharded_checkpoint_exports_its_parameters(trained_run, tmp_path):
    """A torchrun run's checkpoint (DCP shards; its fp32 shards are the masters) is read whole in one process.
    Written here by DCP itself without a process group, as a single-rank job would write it."""
    import torch.distributed.checkpoint as dcp

    from engine.checkpoint_store import write_manifest

    _, run = trained_run
    ckpt = _checkpoint(run)
    params = load_file(str(ckpt / "policy.safetensors"))
    g = torch.Generator().manual_seed(11)
    params = {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in params.items()}  # not the policy file's
    sharded = tmp_path / "step_000002"
    dcp.save({"model": params}, checkpoint_id=str(sharded), no_dist=True)
    state = json.loads((ckpt / "state.json").read_text())
    (sharded / "state.json").write_text(json.dumps({**state, "format": "dcp", "world_size": 1}))
    write_manifest(sharded, 2)
    assert export.main([str(sharded), "--out", str(tmp_path / "out"), "--dtype", "float32"]) == 0
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(written[n], t) for n, t in params.items())


def test_janus_pro_format_train_export_reload_eval_train(janus_pro_dir, toy_world, tmp_path, tiny_overrides, capsys):
    """On a directory in the exact Janus-Pro-1B format: bf16 training with fp32 masters -> export -> transformers
    loads the model and the processor (whose prompts equal the original's) -> eval -> training continues."""
    from transformers import JanusForConditionalGeneration, JanusProcessor

    small = {"model.path": str(janus_pro_dir), "data.pairs_per_step": 1, "rollout.group_size": 2,
             "model.dtype": "bfloat16", "optim.master_weights": "true"}
    run = tmp_path / "run"
    assert cli.main(["train", *tiny_overrides(toy_world, run, **small)]) == 0
    out = tmp_path / "exported"
    assert cli.main(["export", str(run), "--out", str(out)]) == 0
    masters = load_file(str(_checkpoint(run) / "master.safetensors"))
    written = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(written[n], m.to(torch.bfloat16)) for n, m in masters.items())
    reloaded = JanusForConditionalGeneration.from_pretrained(out, local_files_only=True)
    assert reloaded.dtype == torch.bfloat16
    assert reloaded.generation_config.generation_kwargs["boi_token_id"] is not None
    ours, theirs = (JanusProcessor.from_pretrained(d, local_files_only=True) for d in (out, janus_pro_dir))
    chat = [{"role": "user", "content": [{"type": "text", "text": "two blue squares"}]}]
    text = theirs.apply_chat_template(chat, add_generation_prompt=True)
    assert ours.apply_chat_template(chat, add_generation_prompt=True) == text
    assert torch.equal(ours(text=[text], return_tensors="pt")["input_ids"], theirs(text=[text], return_tensors="pt")["input_ids"])
    carried = export.carried_files(Path(janus_pro_dir))
    assert {"tokenizer.json", "preprocessor_config.json", "chat_template.json"} <= {p.name for p in carried}
    assert all((out / p.name).read_bytes() == p.read_bytes() for p in carried)
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(out), "--pairs", str(toy_world), "--samples", "2", "--max-pairs", "2",
                     "--no-progress", "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["summary"]["overall"]["images"] == 4
    again = tmp_path / "again"
    assert cli.main(["train", *tiny_overrides(toy_world, again, **{**small, "model.path": str(out), "train.steps": 1})]) == 0


def test_a_lora_run_exports_and_evaluates_with_its_adapters_merged(toy_world, tmp_path, tiny_overrides, capsys):
    """A LoRA run's checkpoints hold the adapters only; export and eval put them on the base and merge them
    (this failed with "holds '...lora_A.default.weight', which the model does not have"). The exported folder,
    a plain Janus without adapters, computes what the trained adapted model computes."""
    from transformers import JanusForConditionalGeneration

    run = tmp_path / "run"
    lora_run = {"model.lora.rank": 4, "model.lora.alpha": 8, "optim.lr": 0.05, "train.steps": 1}
    trainer = PairGRPOTrainer.from_config(load_config(None, tiny_overrides(toy_world, run, **lora_run)))
    trainer.train()
    assert all(p.abs().max() > 0 for n, p in trainer.model.named_parameters() if ".lora_B." in n)  # the merge matters
    out = tmp_path / "out"
    assert export.main([str(run), "--out", str(out), "--dtype", "float32"]) == 0
    reloaded = JanusForConditionalGeneration.from_pretrained(out, local_files_only=True).eval()
    assert not any("lora" in n for n in load_file(str(out / "model.safetensors")))
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, trainer.model.config.text_config.vocab_size, (2, 9), generator=g)
    hidden = torch.randn(2, 5, trainer.model.config.text_config.hidden_size, generator=g)
    with torch.no_grad():
        trained = trainer.model.eval()
        # fp32 both ways; the merged W + s B A differs from W x + s B (A x) by float reassociation only
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reloaded.model.generation_head(hidden), trained.model.generation_head(hidden),
                                   rtol=1e-5, atol=1e-5)
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(run), "--pairs", str(toy_world), "--samples", "1", "--max-pairs", "2",
                     "--no-progress"]) == 0
    assert "overall" in capsys.readouterr().out


# ----------------------------------------------------------------------------- LoRA runs
def _logits(model, vocab: int, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(text logits [3, 9, V], image logits [3, 4, K]) of `model` on fresh random ids and hidden states, in fp32."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, vocab, (3, 9), generator=g)
    dtype = next(model.parameters()).dtype
    janus_model = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a peft.PeftModel
    h = torch.randn(3, 4, model.config.text_config.hidden_size, generator=g).to(dtype)
    with torch.no_grad():
        text = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        image = janus_model.model.generation_head(h)
    return text.float(), image.float()


def _max_rel_error(got, want) -> float:
    return float((got - want).abs().max()) / float(want.abs().max())


def test_lora_run_exports_merged_and_reloads_without_peft(lora_run, tmp_path):
    """The merged export is a plain JanusForConditionalGeneration whose logits equal the adapted policy's: in fp32
    up to the merge's reassociation (W x + s B (A x) vs (W + s B A) x: a few fp32 ulps of the largest logit); at
    bfloat16 equal to the adapted policy loaded in bf16 (base weights and activations in bf16, fp32 adapters) up to
    bf16 noise: both round every weight and activation to 8 mantissa bits (relative 2^-9 each), differently, through
    2 layers; 3% of the largest logit, while the adapters move the logits by far more than that."""
    from transformers import JanusForConditionalGeneration

    from engine import lora

    trainer, run = lora_run
    vocab = len(trainer.prompts.tok)
    want = _logits(trainer.model, vocab)
    base = load_policy(run).model
    assert any(lora.is_adapted(m) for m in base.modules())
    plain = lora.merged_model(base)
    for layer in (m for m in base.modules() if lora.is_adapted(m)):  # the base alone: adapters off
        layer.lora_B["default"].weight.data.zero_()
    unadapted = _logits(base, vocab)
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 3e-2)):
        out = tmp_path / dtype
        assert export.main([str(run), "--out", str(out), "--dtype", dtype]) == 0
        assert not (out / "adapter_model.safetensors").exists()
        reloaded = JanusForConditionalGeneration.from_pretrained(out, local_files_only=True, use_safetensors=True).eval()
        assert set(reloaded.state_dict()) == set(plain.state_dict())  # no peft names: a plain model
        assert all(p.dtype == janus.DTYPES[dtype] for p in reloaded.parameters())
        ref = want if dtype == "float32" else _logits(load_policy(run, dtype=dtype).model, vocab)
        for got, expected, before in zip(_logits(reloaded, vocab), ref, unadapted):
            assert _max_rel_error(got, expected) < tol, (dtype, _max_rel_error(got, expected))
            assert _max_rel_error(before, expected) > 10 * tol  # the adapters matter
        info = json.loads((out / export.EXPORT_INFO_FILE).read_text())
        assert info["lora"]["merged"] and info["lora"]["rank"] == 4 and "adapters" in info["weights"]
    # fp32 export: every merged weight is W + s B A added in fp32, the rest the run's frozen base
    written = load_file(str(tmp_path / "float32" / "model.safetensors"))
    for name, layer in trainer.model.named_modules():
        if lora.is_adapted(layer):
            a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
            assert torch.equal(written[f"{name}.weight"], layer.get_base_layer().weight + (b @ a) * s), name


def test_lora_run_exports_the_adapter_alone_for_peft(lora_run, tmp_path, capsys):
    import peft

    trainer, run = lora_run
    out = tmp_path / "adapter"
    assert cli.main(["export", str(run), "--out", str(out), "--adapter-only"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(["adapter_model.safetensors", "adapter_config.json",
                                                            TOY_TOKENIZER_FILE, export.EXPORT_INFO_FILE,
                                                            export.EXPORT_MARKER])
    info = json.loads((out / export.EXPORT_INFO_FILE).read_text())
    assert info["lora"]["merged"] is False and info["base_model"] is None and "tiny random Janus" in info["base"]
    assert all(".lora_A." in n or ".lora_B." in n for n in load_file(str(out / "adapter_model.safetensors")))
    # a fresh base, rebuilt from what the folder says, with peft's own loader
    model_cfg = info["config"]["model"]
    fresh, _ = tiny_policy(ToyTokenizer.from_json((out / TOY_TOKENIZER_FILE).read_text()), "cpu",
                           dtype=model_cfg["dtype"], seed=model_cfg["tiny_seed"], palette=model_cfg["tiny_palette"])
    before = _logits(fresh, len(trainer.prompts.tok))
    adapted = peft.PeftModel.from_pretrained(fresh, str(out)).eval()
    got, want = _logits(adapted, len(trainer.prompts.tok)), _logits(trainer.model, len(trainer.prompts.tok))
    for g, w, b in zip(got, want, before):
        assert torch.equal(g, w) and not torch.allclose(b, w)
    # the folder is a policy source of its own: its base rebuilt from pairuni_export.json, its adapters on it
    policy = load_policy(out)
    assert policy.source.kind == "adapter" and policy.step == 2 and policy.lora.rank == 4
    for g, w in zip(_logits(policy.model, len(trainer.prompts.tok)), want):
        assert torch.equal(g, w)
    (out / export.EXPORT_INFO_FILE).rename(tmp_path / "info.json")
    with pytest.raises(export.PolicySourceError, match="base model is unknown"):
        load_policy(out)
    (tmp_path / "info.json").rename(out / export.EXPORT_INFO_FILE)
    # refused where it makes no sense, and like every export over an existing folder
    assert cli.main(["export", str(run), "--out", str(out), "--adapter-only"]) == 2
    assert "--overwrite" in _one_line_error(capsys)


def test_lora_export_refuses_an_existing_out_and_adapter_only_of_a_full_run(lora_run, trained_run, tmp_path, capsys,
                                                                            no_model_loads):
    _, run = lora_run
    _refused_over(tmp_path / "out", run, capsys)
    _, full = trained_run
    assert cli.main(["export", str(full), "--out", str(tmp_path / "adapter"), "--adapter-only"]) == 2
    assert "not a LoRA run" in _one_line_error(capsys)
    assert not (tmp_path / "adapter").exists()


def test_training_continues_from_a_merged_lora_export(lora_run, toy_world, tmp_path, tiny_overrides):
    trainer, run = lora_run
    merged = tmp_path / "merged"
    assert export.main([str(run), "--out", str(merged), "--dtype", "float32"]) == 0
    written = load_file(str(merged / "model.safetensors"))
    run2 = tmp_path / "run2"
    assert cli.main(["train", *tiny_overrides(toy_world, run2, **{"model.path": str(merged), "train.steps": 1})]) == 0
    cfg = load_config(None, tiny_overrides(toy_world, tmp_path / "run3", **{"model.path": str(merged)}))
    start = PairGRPOTrainer.from_config(cfg).model.state_dict()
    assert all(torch.equal(start[n], t) for n, t in written.items() if n in start)
    moved = load_file(str(next((run2 / "checkpoints").glob("step_*")) / "policy.safetensors"))
    assert moved and any(not torch.equal(t, written[n]) for n, t in moved.items())


def test_nf4_lora_run_merges_its_dequantized_base(lora_run, tmp_path):
    """A LoRA run on an NF4 base (its checkpoint, relabelled: NF4 training needs CUDA) exports W_nf4 + s B A, with
    W_nf4 the bitsandbytes NF4 round trip of the base weight (what the 4-bit run computed with), not W + s B A.
    Needs a bitsandbytes that quantizes on CPU; else the error says to load it on CUDA."""
    bnb = pytest.importorskip("bitsandbytes")
    from engine import lora
    from engine.checkpoint_store import write_manifest

    trainer, run = lora_run
    ckpt = tmp_path / "step_000002"
    shutil.copytree(_checkpoint(run), ckpt)
    (ckpt / "manifest.json").unlink()
    state = json.loads((ckpt / "state.json").read_text())
    state["config"]["model"]["lora"]["quantize"] = "nf4"
    (ckpt / "state.json").write_text(json.dumps(state))
    write_manifest(ckpt, 2)
    out = tmp_path / "merged"
    try:
        export.export_policy(ckpt, out, dtype="float32")
    except export.PolicySourceError as err:
        assert "NF4" in str(err) and "CUDA" in str(err)
        pytest.skip(f"this bitsandbytes has no CPU NF4: {err}")
    written = load_file(str(out / "model.safetensors"))
    name = "model.language_model.layers.1.mlp.down_proj"
    layer = trainer.model.get_submodule(name)
    w = layer.get_base_layer().weight.detach()
    q, qs = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    with torch.no_grad():
        delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.scaling["default"]
    want = bnb.functional.dequantize_4bit(q, qs).float() + delta
    assert torch.equal(written[f"{name}.weight"], want)
    assert float((written[f"{name}.weight"] - (w + delta)).abs().max()) > 1e-3 * float(w.abs().max())
    assert torch.equal(written["lm_head.weight"], lora.merged_model(trainer.model).lm_head.weight)  # heads: not NF4
    # the policy load_policy rebuilds (4-bit layers + adapters, what eval runs) computes what the merged folder does
    from transformers import JanusForConditionalGeneration

    policy = load_policy(ckpt)
    assert type(policy.model.get_submodule(name).get_base_layer()).__name__ == "Linear4bit"
    reloaded = JanusForConditionalGeneration.from_pretrained(out, local_files_only=True, use_safetensors=True).eval()
    vocab = len(trainer.prompts.tok)
    # within bf16 noise (3%, as for the bf16 export): on CPUs with AVX512-BF16, bitsandbytes' CPU NF4 kernel
    # (eval mode, no grad) repacks the weight with bf16 block scales and computes in bf16
    for got, want in zip(_logits(reloaded, vocab), _logits(policy.model, vocab)):
        assert _max_rel_error(got, want) < 3e-2
