"""A folder in the Lumina-DiMOO layout (`Alpha-VLLM/Lumina-DiMOO`), tiny random weights, built offline.

    path = write_dimoo_format(tmp / "dimoo-tiny", seed=0)
    model = engine.dimoo.model.DimooModel.from_pretrained(path, dtype="float32")
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(path)  # no remote code
    vq = diffusers.VQModel.from_pretrained(path, subfolder="vqvae")   # as inference_t2i.py:L78-79 loads it

What is in it (../shared/DIMOO.md section 1; [U] marks layout choices no stored source confirms):

- config.json: the LLaDAConfig keys of `DimooConfig.to_json_dict` (LLaDA-8B's key set, DiMOO's ids, dropouts 0),
  the released vocabulary (vocab_size = embedding_size = 134548) and tiny sizes: d_model 32, 2 layers,
  4 heads, MLP 64 (8.6 M parameters, nearly all in wte and ff_out).
- weights under the released names (`released_parameter_names`), bf16 as released, seeded; sharded in
  `shards` files with model.safetensors.index.json in the transformers naming (shard names [U]), or one
  model.safetensors when shards == 1.
- tokenizer.json: byte-level BPE (the `tokenizers` library, trained here on a few strings) whose vocabulary
  is padded to exactly 134548 entries so every DiMOO id is where the real one is: the specials of
  `ids.SPECIAL_TOKENS` at their ids (mask 126336, `<IMAGE>` 126349, `<answer>` 126354, ...), the newline
  126084 and answer pad 126339 under chosen names [U], the chat tags at `ids.CHAT_TAG_IDS` [U], image code k
  at 126356 + k named `ids.IMAGE_TOKEN_FORMAT` [U], `<|reserved_token_i|>` fillers elsewhere. Fillers and
  image tokens are plain vocabulary entries (BPE never produces them from text); the specials and chat
  tags are added tokens, so each is one token in a prompt (train.py:L78's `[:-1]` split needs that).
  config.json carries an `auto_map` (the Hub's `custom_code` tag), so `AutoTokenizer` asks for remote code:
  load the tokenizer with `PreTrainedTokenizerFast.from_pretrained(path)`, which reads only the tokenizer files.
  No BOS/EOS is added when encoding [U].
- tokenizer_config.json, special_tokens_map.json: `PreTrainedTokenizerFast` (the real one loads with
  trust_remote_code=True, DIMOO.md 1.1: its class is [U]; nothing here needs remote code), eos/pad
  `<|endoftext|>`, mask `<|mdm_mask|>`.
- vqvae/: a diffusers `VQModel` (config.json + diffusion_pytorch_model.safetensors, as `save_pretrained`
  writes them) in aMUSEd-512's layout (DIMOO.md 1.5: 5 levels -> 16x downsampling, lookup_from_codebook,
  no mid-block attention, group norm, force_upcast) scaled down: channels (8, 8, 8, 8, 16), 4 groups,
  latent 4 channels, one resnet per level, the full 8192-entry codebook.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..files import staged_folder
from . import ids as dimoo_ids
from .model import DimooConfig, DimooModel

FIXTURE_SIZES = {"d_model": 32, "n_layers": 2, "n_heads": 4, "mlp_hidden_size": 64}

#: What the tiny BPE learns its merges from: DiMOO's prompt texts (prompt_utils.py) and the toy world's words.
_TRAINING_TEXTS = (
    "Generate an image according to the text prompt.",
    "You are a multimodal model that can process both text and images. Answer the following question based on "
    "the provided images. Analyze each image and combine relevant details to answer.",
    "What color are the circles in the image? How many squares are in the image? What shape is shown?",
    "a photo of a red circle, two blue squares, three green triangles and four yellow diamonds",
)


def tiny_vqvae_config(codebook_size: int = dimoo_ids.CODEBOOK_SIZE) -> dict:
    """diffusers VQModel kwargs: aMUSEd-512's vqvae layout (5 levels, 16x) with tiny channels."""
    return {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 5,
            "up_block_types": ["UpDecoderBlock2D"] * 5, "block_out_channels": [8, 8, 8, 8, 16],
            "layers_per_block": 1, "act_fn": "silu", "latent_channels": 4, "sample_size": 64,
            "num_vq_embeddings": codebook_size, "norm_num_groups": 4, "vq_embed_dim": None,
            "scaling_factor": 0.18215, "norm_type": "group", "mid_block_add_attention": False,
            "lookup_from_codebook": True, "force_upcast": True}


def tokenizer_vocabulary() -> dict[int, str]:
    """{id: token string} of every id from the end of the BPE vocabulary up to 134548 that is not a filler."""
    named = {v: k for k, v in dimoo_ids.SPECIAL_TOKENS.items()}
    named.update({v: k for k, v in dimoo_ids.CHAT_TAG_IDS.items()})
    named[dimoo_ids.NEWLINE] = dimoo_ids.NEWLINE_TOKEN
    named[dimoo_ids.ANSWER_PAD] = dimoo_ids.ANSWER_PAD_TOKEN
    for k in range(dimoo_ids.CODEBOOK_SIZE):
        named[dimoo_ids.TEXT_VOCAB_SIZE + k] = dimoo_ids.IMAGE_TOKEN_FORMAT.format(k)
    return named


def _tokenizer(bpe_vocab_size: int):
    """tokenizers.Tokenizer: byte-level BPE padded to the DiMOO vocabulary (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_TRAINING_TEXTS, trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    n = len(vocab)
    if sorted(vocab.values()) != list(range(n)) or n >= dimoo_ids.ENDOFTEXT:
        raise ValueError(f"bpe_vocab_size: the trained BPE must fill ids [0, n) below {dimoo_ids.ENDOFTEXT}")
    named = tokenizer_vocabulary()
    for i in range(n, dimoo_ids.VOCAB_SIZE):
        vocab[named.get(i, f"<|reserved_token_{i}|>")] = i
    added = {**{v: k for k, v in dimoo_ids.SPECIAL_TOKENS.items()}, dimoo_ids.NEWLINE: dimoo_ids.NEWLINE_TOKEN,
             dimoo_ids.ANSWER_PAD: dimoo_ids.ANSWER_PAD_TOKEN}
    chat = {v: k for k, v in dimoo_ids.CHAT_TAG_IDS.items()}
    spec["added_tokens"] = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": i not in chat}
                            for i, s in sorted({**added, **chat}.items())]
    out = Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    assert out.get_vocab_size() == dimoo_ids.VOCAB_SIZE
    return out, {**added, **chat}


def _token_entry(content: str, special: bool = True) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def fixture_config(**sizes) -> DimooConfig:
    """The fixture's DimooConfig: the released vocabulary and ids, `FIXTURE_SIZES` (overridable)."""
    s = {**FIXTURE_SIZES, **sizes}
    return DimooConfig(d_model=s["d_model"], n_layers=s["n_layers"], n_heads=s["n_heads"], n_kv_heads=s["n_heads"],
                       mlp_hidden_size=s["mlp_hidden_size"])


def write_dimoo_format(out_dir: str | os.PathLike, *, seed: int = 0, shards: int = 2, dtype: str = "bfloat16",
                       bpe_vocab_size: int = 400, **sizes) -> Path:
    """Write the folder (see the module docstring) to `out_dir` and return its path.

    Staged in a sibling and renamed into place (never half-written); an existing `out_dir` is an error.
    Deterministic in `seed`, the sizes and `shards` (>= 1). `sizes` override FIXTURE_SIZES."""
    from diffusers import VQModel

    from .model import DTYPES

    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"out_dir: {out} exists")
    if shards < 1:
        raise ValueError(f"shards: expected >= 1, got {shards}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    with staged_folder(out) as stage:
        cfg = fixture_config(**sizes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = DimooModel(cfg).to(DTYPES[dtype])
            vq = VQModel(**tiny_vqvae_config())
        model.save_pretrained(stage, shards=shards)
        vq.save_pretrained(stage / "vqvae", safe_serialization=True)
        tok, added = _tokenizer(bpe_vocab_size)
        tok.save(str(stage / "tokenizer.json"))
        chat = set(dimoo_ids.CHAT_TAG_IDS.values())
        _write_json(stage / "tokenizer_config.json", {
            "add_bos_token": False, "add_eos_token": False,
            "added_tokens_decoder": {str(i): _token_entry(s, i not in chat) for i, s in sorted(added.items())},
            "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>",
            "mask_token": "<|mdm_mask|>", "model_max_length": cfg.max_sequence_length, "pad_token": "<|endoftext|>",
            "tokenizer_class": "PreTrainedTokenizerFast"})
        _write_json(stage / "special_tokens_map.json", {
            "eos_token": _token_entry("<|endoftext|>"), "mask_token": _token_entry("<|mdm_mask|>"),
            "pad_token": _token_entry("<|endoftext|>")})
    return out
