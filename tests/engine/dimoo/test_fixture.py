"""The offline DiMOO-format folder (engine/dimoo/fixture.py): files, released names, exact loading, the
tokenizer's id layout, and the diffusers VQ decoder."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.dimoo import fixture, ids
from engine.dimoo.ids import DIMOO_IDS
from engine.dimoo.model import DimooModel, released_parameter_names

#: DIMOO.md section 1.3, written out again here for two blocks (not generated from the module tree).
RELEASED_NAMES = sorted(
    ["model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"]
    + [f"model.transformer.blocks.{i}.{p}.weight" for i in (0, 1)
       for p in ("attn_norm", "ff_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")])


def _file_tensors(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for name in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / name), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    assert all(index["weight_map"][k] for k in out) and set(index["weight_map"]) == set(out)
    return out


@pytest.fixture(scope="module")
def tokenizer(dimoo_dir):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(dimoo_dir, local_files_only=True)


def test_the_folder_has_the_released_layout(dimoo_dir):
    assert sorted(p.name for p in dimoo_dir.iterdir()) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vqvae"]
    vq_files = sorted(p.name for p in (dimoo_dir / "vqvae").iterdir())
    assert vq_files == ["config.json", "diffusion_pytorch_model.safetensors"]
    cfg = json.loads((dimoo_dir / "config.json").read_text())
    assert cfg["model_type"] == "llada" and cfg["vocab_size"] == cfg["embedding_size"] == 134548
    assert (cfg["mask_token_id"], cfg["eos_token_id"], cfg["rope_theta"]) == (126336, 126081, 500000.0)
    assert (cfg["block_type"], cfg["activation_type"], cfg["layer_norm_type"]) == ("llama", "silu", "rms")
    assert not cfg["weight_tying"] and not cfg["alibi"] and cfg["rope"]
    assert all(cfg[k] == 0.0 for k in ("attention_dropout", "residual_dropout", "embedding_dropout"))
    tensors = _file_tensors(dimoo_dir)
    assert sorted(tensors) == RELEASED_NAMES == released_parameter_names(2)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert tensors["model.transformer.wte.weight"].shape == (134548, 32)
    assert tensors["model.transformer.ff_out.weight"].shape == (134548, 32)
    assert tensors["model.transformer.blocks.1.ff_proj.weight"].shape == (64, 32)


def test_load_gives_the_file_tensors_and_saves_them_back(dimoo_dir, tmp_path):
    tensors = _file_tensors(dimoo_dir)
    model = DimooModel.from_pretrained(dimoo_dir, dtype="bfloat16")
    state = model.state_dict()
    assert sorted(state) == RELEASED_NAMES and all(torch.equal(state[k], tensors[k]) for k in tensors)
    assert model.ids == DIMOO_IDS and model.config.codebook_size == 8192  # read from vqvae/config.json
    assert max(float(t.float().std()) for t in tensors.values() if t.dim() == 2) > 0  # random, not zeros
    # fp32 load: the bf16 values exactly
    f32 = DimooModel.from_pretrained(dimoo_dir, dtype="float32").state_dict()
    assert all(f32[k].dtype == torch.float32 and torch.equal(f32[k], tensors[k].float()) for k in tensors)
    # save as one file and as shards: the same tensors and config come back
    for shards in (1, 3):
        out = tmp_path / f"s{shards}"
        model.save_pretrained(out, shards=shards)
        again = DimooModel.from_pretrained(out, dtype="bfloat16", codebook_size=8192)
        assert again.config == model.config
        assert all(torch.equal(again.state_dict()[k], tensors[k]) for k in tensors)
    assert json.loads((tmp_path / "s1" / "config.json").read_text()) == json.loads(
        (dimoo_dir / "config.json").read_text())
    assert len(list((tmp_path / "s3").glob("model-*-of-00003.safetensors"))) == 3


def test_load_refuses_renamed_missing_or_misshapen_weights(dimoo_dir, tmp_path):
    tensors = _file_tensors(dimoo_dir)
    (tmp_path / "config.json").write_text((dimoo_dir / "config.json").read_text())
    cases = {"renamed": {("model." + k if "ln_f" in k else k): v for k, v in tensors.items()},
             "missing": {k: v for k, v in tensors.items() if "blocks.1.up_proj" not in k},
             "shape": {**tensors, "model.transformer.ln_f.weight": torch.ones(31, dtype=torch.bfloat16)}}
    for case, state in cases.items():
        save_file(state, tmp_path / "model.safetensors")
        with pytest.raises(ValueError, match="shape" if case == "shape" else "missing"):
            DimooModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="path"):
        DimooModel.from_pretrained(tmp_path / "absent")


def test_the_builder_is_deterministic_and_atomic(dimoo_dir, tmp_path):
    again = fixture.write_dimoo_format(tmp_path / "again", seed=0)
    names = ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors", "tokenizer.json"]
    assert all((again / n).read_bytes() == (dimoo_dir / n).read_bytes() for n in names)
    assert ((again / "vqvae" / "diffusion_pytorch_model.safetensors").read_bytes()
            == (dimoo_dir / "vqvae" / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(FileExistsError, match="out_dir"):
        fixture.write_dimoo_format(again)
    other = fixture.write_dimoo_format(tmp_path / "other", seed=1, shards=1)
    assert (other / "model.safetensors").is_file()
    a = DimooModel.from_pretrained(other).state_dict()["model.transformer.wte.weight"]
    assert not torch.equal(a, _file_tensors(dimoo_dir)["model.transformer.wte.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]  # no staging folder left


def test_tokenizer_has_the_dimoo_id_layout(tokenizer):
    assert len(tokenizer) == 134548
    for token, i in {**ids.SPECIAL_TOKENS, **ids.CHAT_TAG_IDS, ids.NEWLINE_TOKEN: 126084,
                     ids.ANSWER_PAD_TOKEN: 126339}.items():
        assert tokenizer.convert_tokens_to_ids(token) == i, token
    assert tokenizer.convert_tokens_to_ids(["<|image_0|>", "<|image_8191|>"]) == [126356, 134547]
    assert (tokenizer.mask_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (126336, 126081, 126081)
    # the T2I prompt of prompt_utils.py:L36-38: one token per tag, text as BPE pieces, no BOS/EOS added
    prompt = "<system>Generate an image according to the text prompt.</system><user>a red circle</user>"
    got = tokenizer(prompt).input_ids
    assert got[0] == 126340 and got[-1] == 126343 and 126341 in got and 126342 in got
    assert max(i for i in got if i < 126000) < 1000 and len(got) < len(prompt) // 2
    assert tokenizer.decode(got) == prompt
    assert tokenizer("<user><uncondition></user>").input_ids == [126342, 126351, 126343]
    assert tokenizer("Ünïcode & tabs\t ok").input_ids  # byte-level: any text encodes
    assert tokenizer.decode(tokenizer("Ünïcode & tabs\t ok").input_ids) == "Ünïcode & tabs\t ok"


@pytest.mark.parametrize(("h", "w"), [(4, 4), (2, 3)])
def test_vq_decoder_decodes_the_fixture_codes_to_the_right_size(dimoo_dir, gen, h, w):
    """As DiMOO decodes (image_utils.py:L53-61): ids - 126356 -> VQModel.decode(force_not_quantize=True,
    shape=(B, h, w, latent_channels)) -> [B, 3, 16h, 16w]; different codes give different pixels."""
    from diffusers import VQModel

    vq = VQModel.from_pretrained(dimoo_dir, subfolder="vqvae").eval()
    assert 2 ** (len(vq.config.block_out_channels) - 1) == ids.DOWNSAMPLE == 16
    assert vq.config.num_vq_embeddings == 8192 and vq.config.lookup_from_codebook
    codes = torch.randint(0, 8192, (2, h, w), generator=gen)
    grid = DIMOO_IDS.add_newlines(DIMOO_IDS.code_to_id(codes))  # what a sampler returns
    back = DIMOO_IDS.id_to_code(DIMOO_IDS.strip_newlines(grid, h, w))
    with torch.no_grad():
        img = vq.decode(back.flatten(), force_not_quantize=True, shape=(2, h, w, vq.config.latent_channels)).sample
    assert img.shape == (2, 3, 16 * h, 16 * w) and torch.isfinite(img).all()
    assert (img[0] - img[1]).abs().max() > 1e-3
