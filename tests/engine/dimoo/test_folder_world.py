"""DimooFolderWorld (engine/dimoo/folder_world.py) on the tiny DiMOO-format folder (engine/dimoo/fixture.py): the
prompt layouts against DIMOO.md 1.6's literal ids, the MMU image codes against a direct VQ encode, text and image
decoding against the tokenizer / VQ, the folder preflight, and one PairGRPO step on the loaded folder model."""

import json
import math
import os

import pytest
import torch

from engine.data import default_pairs_path
from engine.data.io import data_root_of, read_pairs
from engine.dimoo import folder_world as fw
from engine.dimoo import pairgrpo as pg
from engine.dimoo.model import DimooModel

# DIMOO.md section 1.4, written out here (not read from engine.dimoo.ids)
MASK, NEWLINE, BOI, EOI, UNCOND, BOA, EOA, CODE0 = 126336, 126084, 126349, 126350, 126351, 126354, 126355, 126356
RES = 32  # 2 x 2 codes


@pytest.fixture(scope="module")
def pairs():
    return read_pairs(default_pairs_path())


@pytest.fixture(scope="module")
def world(dimoo_dir, pairs):
    torch.set_num_threads(1)
    return fw.DimooFolderWorld.build(dimoo_dir, pairs, data_root_of(default_pairs_path()), resolution=RES,
                                     gen_length=2)


def _tok(world, text):
    return list(world.tokenizer(text)["input_ids"])


def _grid_tokens(rows):
    """[[id, ...], ...] rows -> the grid's tokens with the newline after every row."""
    return [t for row in rows for t in (*row, NEWLINE)]


def test_generation_rows_layout(world, pairs):
    caption = pairs[0].generate.prompt
    start, uncond, positions = world.generation_rows(caption)
    g = world.grid
    assert g == RES // 16
    assert fw.T2I_SYSTEM == "Generate an image according to the text prompt."  # prompt_utils.py (inference)
    assert fw.MMU_SYSTEM.startswith("You are a multimodal model that can process both text and images.")
    prompt = _tok(world, f"<system>{fw.T2I_SYSTEM}</system><user>{caption}</user>")
    tail = [BOA, BOI, *_grid_tokens([[MASK] * g] * g), EOI, EOA]
    assert start.tolist() == prompt + tail
    assert positions.tolist() == [len(prompt) + 2 + r * (g + 1) + c for r in range(g) for c in range(g)]
    u_prompt = _tok(world, f"<system>{fw.T2I_SYSTEM}</system><user><uncondition></user>")
    assert UNCOND in u_prompt and uncond.tolist() == u_prompt + tail


def test_understanding_rows_hold_the_vq_codes(world, pairs):
    s = pairs[0].understand
    image = world.load_image(s)
    assert image.shape == (3, RES, RES) and 0 <= float(image.min()) and float(image.max()) <= 1
    gen = torch.Generator().manual_seed(0)
    for img in (image, torch.rand(3, RES, RES, generator=gen)):
        with torch.no_grad():
            lat = world.vq.encode(img[None]).latents
            codes = world.vq.quantize(lat)[2][2].view(world.grid, world.grid)
        start, positions = world.understanding_rows(s.question, img)
        p = _tok(world, f"<system>{fw.MMU_SYSTEM}</system><user>{s.question}</user>")
        assert p[-1] == world.tokenizer.convert_tokens_to_ids("</user>")
        grid = _grid_tokens((codes + CODE0).tolist())
        want = p[:-1] + [BOI, *grid, EOI] + p[-1:] + [BOA, MASK, MASK, EOA]
        assert start.tolist() == want
        assert positions.tolist() == [len(want) - 3, len(want) - 2]
        assert torch.equal(world.image_codes(img[None])[0], codes)
    with pytest.raises(ValueError, match="images"):
        world.image_codes(torch.rand(1, 3, RES + 16, RES + 16))


def test_text_slice_and_decode_text_round_trip(world):
    sl = world.text_slice
    assert sl.start == 0 and sl.stop == MASK  # no mask id, no specials above it, no image codes
    text = "What color are the circles in the image? a red circle"
    ids = _tok(world, text)
    assert world.decode_text([i - sl.start for i in ids]) == text
    eot = world.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert world.decode_text([i - sl.start for i in [*ids, eot]]) == text  # special tokens skipped


def test_decode_images_matches_a_direct_vq_decode(world):
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 8192, (2, world.grid, world.grid), generator=gen)
    with torch.no_grad():
        direct = world.vq.decode(codes.flatten(), force_not_quantize=True,
                                 shape=(2, world.grid, world.grid, world.vq.config.latent_channels)).sample
    out = world.decode_images(codes)
    assert out.shape == (2, 3, RES, RES)
    torch.testing.assert_close(out, direct.float().clip(0, 1))


def test_rewards(world, pairs):
    samples = [pairs[0].understand, pairs[1].understand]
    r = world.understanding_rewards(samples, [samples[0].answer, "no idea at all"])
    assert r.dtype == torch.float32 and r.tolist() == [1.0, 0.0]
    seen = []
    custom = fw.DimooFolderWorld(**{**world.__dict__, "generation_reward": lambda inp: seen.append(inp) or
                                    torch.arange(len(inp.samples)).float()})
    images = torch.rand(2, 3, RES, RES)
    assert custom.generation_rewards(samples, images).tolist() == [0.0, 1.0] and seen[0].images is images


def _link_copy(src, dst):
    """A copy of folder `src` made of symlinks (files can be deleted from it without touching src)."""
    for root, _, files in os.walk(src):
        rel = os.path.relpath(root, src)
        os.makedirs(dst / rel, exist_ok=True)
        for f in files:
            os.symlink(os.path.join(root, f), dst / rel / f)


def test_check_dimoo_folder_names_the_missing_file(dimoo_dir, tmp_path):
    fw.check_dimoo_folder(dimoo_dir)
    for i, name in enumerate(("config.json", "model-00002-of-00002.safetensors", "tokenizer.json",
                              "vqvae/config.json", "vqvae/diffusion_pytorch_model.safetensors")):
        d = tmp_path / f"c{i}"
        _link_copy(dimoo_dir, d)
        (d / name).unlink()
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            fw.check_dimoo_folder(d)
    d = tmp_path / "single"  # no index: model.safetensors is required
    _link_copy(dimoo_dir, d)
    (d / "model.safetensors.index.json").unlink()
    with pytest.raises(ValueError, match=r"model\.safetensors: missing"):
        fw.check_dimoo_folder(d)
    d = tmp_path / "bad"
    _link_copy(dimoo_dir, d)
    cfg = json.loads((dimoo_dir / "config.json").read_text())
    (d / "config.json").unlink()
    (d / "config.json").write_text(json.dumps({**cfg, "embedding_size": 1000, "vocab_size": 1000}))
    with pytest.raises(ValueError, match=r"config\.json: expected embedding_size"):
        fw.check_dimoo_folder(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not readable JSON"):
        fw.check_dimoo_folder(d)
    with pytest.raises(ValueError, match="resolution"):
        fw.DimooFolderWorld.build(dimoo_dir, [], resolution=40)


def test_one_pairgrpo_step_on_the_folder_model(world, dimoo_dir, pairs):
    torch.manual_seed(0)
    model = DimooModel.from_pretrained(dimoo_dir, dtype="float32")
    assert model.ids == world.ids
    cfg = pg.DimooGRPOConfig(group_size=2, image_steps=2, text_steps=2, block_length=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    aligned = next(p for p in pairs if p.aligned)
    retrieved = next(p for p in pairs if not p.aligned)
    row = pg.train_step(model, opt, world, [aligned, retrieved], cfg, seed=0, step=1)
    losses = {k: v for k, v in row.items() if k.startswith("loss.")}
    assert set(losses) == {"loss.understanding", "loss.generation"}
    assert all(math.isfinite(v) for v in losses.values())
    assert math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0 and "skipped_updates" not in row
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "model.transformer.ff_out.weight" in changed and len(changed) > 3
