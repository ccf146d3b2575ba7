"""The engine on a directory in the exact format of `deepseek-community/Janus-Pro-1B` (tiny random weights,
engine/testing/janus_pro_format.py), against transformers' own `JanusProcessor` and `generate`:
prompts and pixels, greedy text and CFG image rollouts, a training run that resumes exactly, the probe."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import JanusConfig

from engine import cli
from engine import model as janus
from engine.data.sampler import ImageCache
from engine.data.schema import Sample
from engine.rollout import rollout_generation, rollout_understanding
from engine.testing import janus_pro_format as fmt
from engine.text import JanusPrompts, load_image

QUESTIONS = ["What color are the circles in the image?\nA. red\nB. blue\nAnswer with the option's letter.",
             "How many squares?"]
CAPTIONS = ["two blue squares", "a photo of three green triangles and four yellow diamonds"]


@pytest.fixture(scope="module")
def prompts(janus_pro_dir):
    return JanusPrompts(str(janus_pro_dir))


@pytest.fixture(scope="module")
def engine_model(janus_pro_dir, prompts):
    """The policy as `pairuni train model.path=DIR` builds it (engine/build.py)."""
    model = janus.load_janus(str(janus_pro_dir), dtype="float32")
    janus.complete_generation_config(model, prompts.processor.tokenizer)
    return model


@pytest.fixture(scope="module")
def hf_model(janus_pro_dir):
    """transformers' own load of the directory: the reference."""
    from transformers import JanusForConditionalGeneration

    return JanusForConditionalGeneration.from_pretrained(janus_pro_dir, local_files_only=True).eval()


@pytest.fixture(scope="module")
def processor(janus_pro_dir):
    from transformers import JanusProcessor

    return JanusProcessor.from_pretrained(janus_pro_dir, local_files_only=True)


def _photo(path: Path, width: int, height: int, seed: int) -> Path:
    """A PNG of smooth colour ramps plus noise (every resampling choice shows in its pixels)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    ramps = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                            np.broadcast_to((x + y) / 2, (height, width, 1))], -1)
    Image.fromarray(np.clip(ramps + rng.normal(0, 25, ramps.shape), 0, 255).astype(np.uint8)).save(path)
    return path


def _chat(processor, text: str, with_image: bool) -> str:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


# ----------------------------------------------------------------------------- the directory
def test_the_directory_has_the_hub_files_and_janus_special_token_layout(janus_pro_dir, processor, engine_model):
    assert sorted(p.name for p in janus_pro_dir.iterdir()) == sorted([
        "chat_template.json", "config.json", "generation_config.json", "model.safetensors",
        "preprocessor_config.json", "processor_config.json", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json"])
    gen = json.loads((janus_pro_dir / "generation_config.json").read_text())
    assert "generation_kwargs" not in gen and gen["boi_token_id"] is not None  # as the converter writes it
    tok = processor.tokenizer
    n = tok.convert_tokens_to_ids(fmt.BOS)
    assert {name: tok.convert_tokens_to_ids(name) - n for name in fmt.SPECIAL_OFFSETS} == fmt.SPECIAL_OFFSETS
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (fmt.BOS, fmt.EOS, fmt.PAD)
    assert n + fmt.SPECIAL_OFFSETS[fmt.IMAGE] == engine_model.config.image_token_id
    assert fmt.SPECIAL_OFFSETS[fmt.IMAGE] == JanusConfig().image_token_id - 100_000  # Janus-Pro's own id
    assert (tok.image_token, tok.boi_token, tok.eoi_token) == (fmt.IMAGE, fmt.BOI, fmt.EOI)
    # what the engine reads off the checkpoint once `complete_generation_config` has run
    assert janus.special_ids(engine_model) == {
        "bos": n, "eos": n + 1, "pad": n + 15, "boi": n + 16, "image": n + 581}
    assert engine_model.config.text_config.vocab_size >= len(tok)
    # byte-level BPE: merges learned, any text round-trips, BOS added in front
    text = "What colour are the circles? Ünïcode & tabs\t ok"
    ids = tok(text).input_ids
    assert ids[0] == n and len(ids) < len(text.encode()) and tok.decode(ids, skip_special_tokens=True) == text
    assert processor.num_image_tokens == janus.image_token_count(engine_model) == 16
    assert processor.image_processor.size["height"] == engine_model.config.vision_config.image_size


def test_the_builder_is_deterministic_and_atomic(janus_pro_dir, tmp_path):
    again = fmt.write_janus_pro_format(tmp_path / "again", seed=0)
    assert {p.name: p.read_bytes() for p in again.iterdir()} == {p.name: p.read_bytes() for p in janus_pro_dir.iterdir()}
    other = fmt.write_janus_pro_format(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
    with pytest.raises(FileExistsError, match="out_dir"):
        fmt.write_janus_pro_format(again)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]  # no staging folder left behind


def test_engine_and_transformers_load_the_same_weights(engine_model, hf_model):
    ours, theirs = engine_model.state_dict(), hf_model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert max(float(v.float().std()) for v in ours.values() if v.numel() > 1) > 0  # random, not zeros


# ----------------------------------------------------------------------------- prompts and pixels
def test_understanding_prompts_and_non_square_pixels_equal_the_processor(tmp_path, prompts, processor):
    """The engine's path (file -> uint8 cache -> [0, 1] -> JanusPrompts) against the processor fed the
    PIL images and the chat-templated text, as a transformers user would call it."""
    from PIL import Image

    files = [_photo(tmp_path / "wide.png", 200, 120, 0), _photo(tmp_path / "tall.png", 120, 200, 1)]
    cache = ImageCache(tmp_path, prompts.image_size,
                       functools.partial(load_image, background=prompts.background_color))
    images = torch.stack([cache(Sample(image_path=f.name)) for f in files])
    ids, mask, pixels = prompts.understanding(QUESTIONS, images)

    pil = [Image.open(f).convert("RGB") for f in files]
    ref = processor(text=[_chat(processor, q, True) for q in QUESTIONS], images=pil, padding=True,
                    return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    # uint8 in both paths: equal up to float rounding of (k/255 - 0.5) / 0.5
    torch.testing.assert_close(pixels, ref["pixel_values"].float(), atol=1e-6, rtol=0)
    # the padding is there: a band of the background colour, (127/255 - 0.5) / 0.5, on both images
    bg = (127 / 255 - 0.5) / 0.5
    assert torch.allclose(pixels[0, :, 0], torch.full_like(pixels[0, :, 0], bg), atol=1e-6)
    assert torch.allclose(pixels[1, :, :, 0], torch.full_like(pixels[1, :, :, 0], bg), atol=1e-6)

    tok = processor.tokenizer
    n_img = processor.num_image_tokens
    for row, m in zip(ids, mask):
        real = row[m.bool()].tolist()
        assert not m[: len(row) - len(real)].any()  # left padding only
        first = real.index(tok.image_token_id)
        assert real[0] == tok.bos_token_id and real[first - 1] == tok.convert_tokens_to_ids(fmt.BOI)
        assert real[first: first + n_img] == [tok.image_token_id] * n_img
        assert real[first + n_img] == tok.convert_tokens_to_ids(fmt.EOI)
        assert tok.decode(real[1:first - 1]).startswith("You are a helpful language and vision assistant.")
        assert tok.decode(real).endswith("\n\n<|Assistant|>:")
    assert mask.sum(1).tolist()[0] != mask.sum(1).tolist()[1]  # different lengths: padding exercised


def test_generation_prompts_equal_the_processor(prompts, processor):
    ids, mask = prompts.generation(CAPTIONS)
    tok = processor.tokenizer
    # built here from the tokenizer alone: chat text + begin-of-image, no system prompt, left-padded
    rows = [tok(_chat(processor, c, False) + fmt.BOI).input_ids for c in CAPTIONS]
    width = max(map(len, rows))
    assert ids.tolist() == [[tok.pad_token_id] * (width - len(r)) + r for r in rows]
    assert mask.tolist() == [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    assert tok.decode(rows[0], skip_special_tokens=False).startswith(f"{fmt.BOS}<|User|>: two blue squares\n\n")
    ref = processor(text=[_chat(processor, c, False) for c in CAPTIONS], generation_mode="image", padding=True,
                    return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])


# ----------------------------------------------------------------------------- rollouts vs generate
def test_greedy_text_rollout_equals_transformers_generate(tmp_path, prompts, engine_model, hf_model):
    files = [_photo(tmp_path / "a.png", 200, 120, 2), _photo(tmp_path / "b.png", 120, 200, 3)]
    images = torch.stack([load_image(f, prompts.image_size).float() / 255 for f in files])
    ids, mask, pixels = prompts.understanding(QUESTIONS, images)
    steps = 12
    ro = rollout_understanding(engine_model, ids, mask, pixels, max_new_tokens=steps, temperature=0.0,
                               seeds=torch.zeros(len(ids), dtype=torch.long), decode_text=prompts.decode)
    out = hf_model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=steps,
                            do_sample=False, generation_mode="text")
    expected = out[:, ids.shape[1]:]
    eos = engine_model.generation_config.eos_token_id
    for i in range(len(ids)):
        ours = ro.response_ids[i][ro.response_mask[i]].tolist()
        theirs = expected[i].tolist()
        if eos in theirs:
            theirs = theirs[: theirs.index(eos) + 1]
        assert ours == theirs, f"row {i}"
        assert ro.texts[i] == prompts.decode(ours)
    assert ro.response_ids[0].tolist() != ro.response_ids[1].tolist()  # the image and question matter


@pytest.mark.parametrize("cfg_scale", [5.0, 1.5])
def test_greedy_cfg_image_rollout_equals_transformers_generate(prompts, engine_model, hf_model, cfg_scale):
    """Batched, left-padded prompts in the engine; each prompt alone (unpadded) through transformers,
    whose image generate counts pad positions. On CPU transformers needs guidance_scale > 1."""
    ids, mask = prompts.generation(CAPTIONS)
    ro = rollout_generation(engine_model, ids, mask, cfg_scale=cfg_scale, temperature=0.0,
                            seeds=torch.arange(len(ids)), decode=False)
    # transformers reads begin-of-image from `generation_kwargs`, which a converted checkpoint's
    # generation_config.json lacks: it is passed here as a user of transformers must pass it
    gc = copy.deepcopy(hf_model.generation_config)
    gc.generation_kwargs = {"boi_token_id": prompts.processor.tokenizer.convert_tokens_to_ids(fmt.BOI)}
    gc.do_sample, gc.guidance_scale = False, cfg_scale
    for i in range(len(ids)):
        one = ids[i: i + 1, mask[i].bool()]
        expected = hf_model.generate(one, attention_mask=torch.ones_like(one), generation_mode="image",
                                     generation_config=copy.deepcopy(gc))
        assert torch.equal(ro.image_tokens[i], expected[0]), f"prompt {i}"
    assert len(set(ro.image_tokens.flatten().tolist())) > 4  # not one code repeated
    if cfg_scale == 5.0:  # strong guidance: the caption shows in the tokens
        assert ro.image_tokens[0].tolist() != ro.image_tokens[1].tolist()


# ----------------------------------------------------------------------------- training
def _rows(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time.")} for r in rows]


def test_train_on_the_directory_resumes_exactly(janus_pro_dir, toy_world, tmp_path, capsys, tiny_overrides):
    model = {"model.path": str(janus_pro_dir), "data.pairs_per_step": 1, "rollout.group_size": 2}
    full = tmp_path / "full"
    assert cli.main(["train", *tiny_overrides(toy_world, full, **model, **{"train.steps": 3})]) == 0
    part = tmp_path / "part"
    assert cli.main(["train", *tiny_overrides(toy_world, part, **model, **{"train.steps": 2})]) == 0
    assert cli.main(["train", *tiny_overrides(toy_world, part, **model,
                                              **{"train.steps": 3, "train.resume": "true"})]) == 0
    assert "resumed at step 2" in capsys.readouterr().out
    rows = _rows(full)
    assert len(rows) == 3 and _rows(part) == rows  # losses, rewards, grad norms: bit for bit
    assert any(r["grad_norm"] > 0 for r in rows)  # the policy moved: the resumed steps start from trained weights


def test_probe_gradients_runs_on_the_directory(janus_pro_dir, toy_world, tmp_path, capsys):
    out = tmp_path / "probe"
    assert cli.main(["probe-gradients", "--model", str(janus_pro_dir), "--pairs", str(toy_world),
                     "--num-batches", "2", "--pairs-per-batch", "1", "--seed", "0", "--out", str(out),
                     "rollout.group_size=2", "rollout.max_new_tokens=3", "train.progress=false"]) == 0
    data = json.loads((out / "gradient_probe.json").read_text())
    assert len(data["records"]) == 4 and data["groups"] == ["layers.0", "layers.1", "norm"]
    assert "median" in capsys.readouterr().out


def test_the_janus_pro_1b_config_trains_on_the_directory(janus_pro_dir, toy_world, tmp_path, capsys):
    """configs/janus_pro_1b.yaml as the README runs it (bf16 weights, fp32 masters, AdamW8bit, gradient
    checkpointing), sizes cut down; `pair_qa` for the CLIP reward, whose model is not on disk here."""
    config = Path(__file__).parents[2] / "configs" / "janus_pro_1b.yaml"
    run = tmp_path / "run"
    assert cli.main(["train", "--config", str(config), f"model.path={janus_pro_dir}", f"data.pairs_path={toy_world}",
                     f"train.run_dir={run}", "data.pairs_per_step=1", "rollout.group_size=2",
                     "rollout.max_new_tokens=3", "train.steps=1", "train.progress=false",
                     "reward.generation=pair_qa"]) == 0
    (row,) = _rows(run)
    assert row["step"] == 1 and all(np.isfinite(v) for v in row.values() if isinstance(v, float))
    assert "PairGRPO: 1 steps" in capsys.readouterr().out
