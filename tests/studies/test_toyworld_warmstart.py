"""studies/toyworld/toyworld_warmstart.py: block tokens, the teacher-forced losses, and a warm start that teaches."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "studies" / "toyworld"))

import toyworld_warmstart as ws  # noqa: E402

from engine import model as janus  # noqa: E402
from engine.data import toyworld  # noqa: E402


def _painted_model(vocab: int = 40, seed: int = 0):
    n_codes = janus.tiny_janus_config(vocab).vq_config.num_embeddings
    colours = janus.codebook_palette([toyworld.BACKGROUND, *toyworld.COLORS.values()], n_codes, seed=seed)
    return janus.tiny_janus(vocab, seed=seed, palette=colours)


def test_block_tokens_invert_the_painted_decoder():
    # random token grids -> the painted VQ decoder's images -> block_tokens gives the grids back
    model = _painted_model()
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, len(ws.toy_palette()), (6, 16), generator=gen)
    with torch.no_grad():
        images = janus.decode_images(model, tokens)
    assert torch.equal(ws.block_tokens(images, 4), tokens)


def test_block_tokens_follow_the_quarter_rule_on_rendered_scenes():
    scene = toyworld.Scene("red", "square", (4,))
    image = torch.from_numpy(np.array(toyworld.render(scene, 32))).permute(2, 0, 1).float() / 255
    tokens = ws.block_tokens(image[None], 4)[0]
    red = 1 + list(toyworld.COLORS).index("red")
    cells = image.reshape(3, 4, 8, 4, 8).permute(1, 3, 0, 2, 4).reshape(16, 3, 64)
    share = ((cells - torch.tensor(toyworld.COLORS["red"]).view(3, 1) / 255).abs().sum(1) < 0.05).float().mean(-1)
    assert torch.equal(tokens, torch.where(share >= 0.25, red, 0))
    assert (tokens == red).any() and (tokens == 0).any()
    with pytest.raises(ValueError, match="images"):
        ws.block_tokens(image[None, :, :30, :30], 4)


def test_supervised_loss_is_the_token_nll_of_a_plain_forward(tmp_path):
    """The teacher-forced losses equal the NLL of the answer / image tokens read off full forward logits."""
    from engine.data.io import read_pairs
    from engine.data.toyworld import generate_toy_world
    from engine.policy_io import tiny_policy
    from engine.text import ToyTokenizer

    generate_toy_world(6, tmp_path / "w", seed=2, size=32, progress=False)
    pairs = read_pairs(tmp_path / "w" / "pairs.jsonl")
    tok = ToyTokenizer.from_texts([t for p in pairs for t in (p.understand.question, p.understand.answer, p.generate.prompt)])
    model, prompts = tiny_policy(tok, "cpu", seed=3)
    torch.manual_seed(0)
    with torch.no_grad():  # move the weights off their init so the heads' biases and norms matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    from engine.text import load_image

    und = [p.understand for p in pairs]
    imgs = torch.stack([load_image(tmp_path / "w" / s.image_path, 32).float() / 255 for s in und])
    ro = ws.truth_understanding(prompts, und, imgs)
    for i, s in enumerate(und):  # targets: the answer's tokens, then EOS, then nothing
        want = tok.encode(s.answer) + [janus.TINY_SPECIAL.eos]
        assert ro.response_ids[i, : len(want)].tolist() == want and int(ro.response_mask[i].sum()) == len(want)
    loss = ws.supervised_loss(model, "understanding", ro)
    # reference: one forward over prompt + answer, log-softmax of the text head at each answer position
    nll = []
    for i in range(len(und)):
        n = int(ro.response_mask[i].sum())
        keep = ro.prompt_mask[i].bool()
        ids = torch.cat([ro.prompt_ids[i][keep], ro.response_ids[i, : n - 1]])[None]
        embeds = janus.text_embeddings(model, ids, ro.pixel_values[i: i + 1])
        h = janus.policy_hidden(model, embeds, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
        logp = torch.log_softmax(janus.text_logits(model, h)[0, -n:], -1)
        nll.append(-logp.gather(-1, ro.response_ids[i, :n, None]).squeeze(-1))
    want = torch.cat(nll).mean()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)

    gen = [p.generate for p in pairs]
    gimgs = torch.stack([load_image(tmp_path / "w" / s.image_path, 32).float() / 255 for s in gen])
    gro = ws.truth_generation(prompts, gen, gimgs, 4)
    assert torch.equal(gro.image_tokens, ws.block_tokens(gimgs, 4))
    gloss = ws.supervised_loss(model, "generation", gro)
    nll = []
    for i in range(len(gen)):
        keep = gro.prompt_mask[i].bool()
        p_ids = gro.prompt_ids[i][keep][None]
        embeds = torch.cat([model.get_input_embeddings()(p_ids),
                            janus.image_token_embeddings(model, gro.image_tokens[i: i + 1, :-1])], 1)
        h = janus.policy_hidden(model, embeds, torch.ones(embeds.shape[:2], dtype=torch.long),
                                torch.arange(embeds.shape[1])[None])
        x, w, b = janus.image_head_operands(model, janus.image_head_input(model, h))
        logits = x[0, p_ids.shape[1] - 1:] @ w.T + b
        nll.append(-torch.log_softmax(logits, -1).gather(-1, gro.image_tokens[i, :, None]).squeeze(-1))
    torch.testing.assert_close(gloss, torch.cat(nll).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_warm_start_lowers_both_losses_and_exports_a_loadable_folder(tmp_path):
    from engine.data.io import read_pairs
    from engine.data.toyworld import generate_toy_world
    from engine.policy_io import load_policy

    generate_toy_world(48, tmp_path / "w", seed=5, size=64, progress=False)
    pairs_path = tmp_path / "w" / "pairs.jsonl"
    short = ws.warm_start(pairs_path, tmp_path / "m1", seed=0, steps=1, batch=16)
    long = ws.warm_start(pairs_path, tmp_path / "m60", seed=0, steps=60, batch=16)
    for task in ("understanding", "generation"):
        assert long[f"loss.{task}"] < 0.8 * short[f"loss.{task}"], (task, short, long)
    policy = load_policy(long["path"], dtype="float32", key="test")
    pairs = read_pairs(pairs_path)
    from engine.text import load_image

    und = [p.understand for p in pairs[:16]]
    imgs = torch.stack([load_image(tmp_path / "w" / s.image_path, 32).float() / 255 for s in und])
    with torch.no_grad():
        reloaded = ws.supervised_loss(policy.model, "understanding", ws.truth_understanding(policy.prompts, und, imgs))
        first = ws.supervised_loss(load_policy(short["path"], dtype="float32", key="test").model, "understanding",
                                   ws.truth_understanding(policy.prompts, und, imgs))
    assert reloaded < first  # the exported folder holds the trained weights, vision encoder included


@pytest.mark.slow
def test_skipped_generation_colour_leaves_only_that_colour_out(tmp_path):
    from safetensors.torch import load_file

    from engine.data.io import read_pairs
    from engine.data.toyworld import generate_toy_world

    generate_toy_world(24, tmp_path / "w", seed=6, size=64, progress=False)
    pairs_path = tmp_path / "w" / "pairs.jsonl"
    colours = {p.generate.meta["attributes"]["color"] for p in read_pairs(pairs_path)}
    absent = next((c for c in toyworld.COLORS if c not in colours), "magenta")  # magenta: in no toy world
    present = sorted(colours)[0]

    def weights(name, skip):
        ws.warm_start(pairs_path, tmp_path / name, seed=1, steps=3, batch=8, skip_generation_colour=skip)
        return load_file(tmp_path / name / "model.safetensors")

    plain = weights("plain", None)
    same = weights("absent", absent)  # a colour the data lacks: nothing left out, the same model
    assert all(torch.equal(plain[k], same[k]) for k in plain)
    other = weights("present", present)
    assert any(not torch.equal(plain[k], other[k]) for k in plain)
