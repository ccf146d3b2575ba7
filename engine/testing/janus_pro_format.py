"""A directory in the format of `deepseek-community/Janus-Pro-1B`, with tiny random weights, built offline.

    path = write_janus_pro_format(tmp / "janus-pro-tiny", seed=0)
    model = engine.model.load_janus(str(path), dtype="float32")           # what `pairuni train model.path=` runs
    prompts = engine.text.JanusPrompts(str(path))
    JanusForConditionalGeneration.from_pretrained(path); JanusProcessor.from_pretrained(path)

The files are those of the transformers-converted Hub repo (what `convert_janus_weights_to_hf.py`
writes), so a test on this directory meets what a user with the real checkpoint meets:

- config.json: a `JanusConfig` (Llama text config, SigLIP-style vision config, VQ config), tiny sizes:
  LM hidden 64, 2 layers; 32 px images -> 16 image tokens; a 64-entry VQ codebook.
- generation_config.json: as the converter writes it: `boi_token_id` and `pad_token_id` at the top
  level (no `generation_kwargs`), `guidance_scale` 5, `temperature` 1.
- model.safetensors: random weights (seeded): transformers' initialisation, except the image-generation
  path (`_spread_image_path`), redrawn at unit gain so that greedy image tokens vary.
- tokenizer.json: a byte-level BPE (the `tokenizers` library, trained here on a few strings) whose
  special tokens sit at Janus-Pro's ids relative to the end of the BPE vocabulary `N` (Janus-Pro:
  N = 100000): BOS `<｜begin▁of▁sentence｜>` N, EOS `<｜end▁of▁sentence｜>` N+1, pad `<｜▁pad▁｜>` N+15,
  `<begin_of_image>` N+16, `<image_placeholder>` N+581 (JanusConfig's default image_token_id 100581),
  `<|User|>` N+588, `<|Assistant|>` N+589, `<end_of_image>` N+593; the ids between are filler added
  tokens. Of these ids only the image placeholder's is checked against a source here (`JanusConfig`'s
  default); the others are Janus-Pro's as recalled, not checked offline against the Hub files. The
  engine reads every id off the tokenizer and the generation config, never a constant, so the tests
  hold for any layout. The LM vocabulary is the tokenizer's rounded up to a multiple of 64
  (Janus-Pro: 102400).
- tokenizer_config.json, special_tokens_map.json: LlamaTokenizerFast, BOS added, pad `<｜▁pad▁｜>`,
  the image tokens as the converter's `extra_special_tokens`; the converter's chat template.
- preprocessor_config.json: `JanusImageProcessor`, image size = the vision config's, mean = std = 0.5,
  background (127, 127, 127), bicubic, min size 14.
- processor_config.json, chat_template.json: `JanusProcessor` with `use_default_system_prompt` true
  (the converter's choice: text prompts start with Janus's system prompt) and the number of image
  tokens of the tiny vision tower.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..files import staged_folder
from ..model import tiny_janus_config

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
BOI, EOI, IMAGE = "<begin_of_image>", "<end_of_image>", "<image_placeholder>"
USER, ASSISTANT = "<|User|>", "<|Assistant|>"
#: Offset of each special token from the end of the BPE vocabulary, as in Janus-Pro's tokenizer.
SPECIAL_OFFSETS = {BOS: 0, EOS: 1, PAD: 15, BOI: 16, IMAGE: 581, "<patch_placeholder>": 582, "<|ref|>": 583,
                   "<|/ref|>": 584, "<|det|>": 585, "<|/det|>": 586, "<|grounding|>": 587, USER: 588,
                   ASSISTANT: 589, EOI: 593}
#: Tokens the converter marks as additional special tokens (special_tokens_map.json).
ADDITIONAL_SPECIAL = [IMAGE, "<patch_placeholder>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>",
                      USER, ASSISTANT]

#: The chat template transformers' converter (convert_janus_weights_to_hf.py) gives `JanusProcessor`,
#: spelled out again here: user turns `<|User|>: `, images `<image_placeholder>` on their own line,
#: turns separated by a blank line, the generation prompt `<|Assistant|>:`.
CHAT_TEMPLATE = (
    "{%set seps=['\n\n','<\uff5cend\u2581of\u2581sentence\uff5c>']%}"
    "{%set i=0%}"
    "{%for message in messages%}"
    "{%if message['role']|lower=='user'%}"
    "<|User|>: "
    "{%elif message['role']|lower=='assistant'%}"
    "<|Assistant|>:{%if not (loop.last and not add_generation_prompt and message['content'][0]['type']=='text' "
    "and message['content'][0]['text']=='')%} {%endif%}"
    "{%else%}"
    "{{message['role'].capitalize()}}: "
    "{%endif%}"
    "{%for content in message['content']%}"
    "{%if content['type']=='image'%}"
    "{%if not loop.first%}{{'\n'}}{%endif%}"
    "<image_placeholder>"
    "{%if not loop.last%}{{'\n'}}{%endif%}"
    "{%elif content['type']=='text'%}"
    "{%set text=content['text']%}"
    "{%if loop.first%}{%set text=text.lstrip()%}{%endif%}"
    "{%if loop.last%}{%set text=text.rstrip()%}{%endif%}"
    "{%if not loop.first and message['content'][loop.index0-1]['type']=='text'%}"
    "{{' '+text}}"
    "{%else%}"
    "{{text}}"
    "{%endif%}"
    "{%endif%}"
    "{%endfor%}"
    "{%if not loop.last or add_generation_prompt%}"
    "{%if message['role']|lower=='user'%}"
    "{{seps[0]}}"
    "{%else%}"
    "{{seps[1]}}"
    "{%endif%}"
    "{%endif%}"
    "{%endfor%}"
    "{%if add_generation_prompt%}<|Assistant|>:{%endif%}"
)

#: What the tiny BPE learns its merges from: Janus's system prompt and the toy world's words, so
#: prompts tokenize into multi-byte pieces as a real vocabulary would.
_TRAINING_TEXTS = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language.",
    "What color are the circles in the image? How many squares are in the image? What shape is shown?",
    "A. red B. green C. blue D. yellow purple orange white black one two three four five six",
    "Answer with the options letter from the given choices directly.",
    "a photo of a red circle, two blue squares, three green triangles and four yellow diamonds",
)


def _tokenizer(bpe_vocab_size: int):
    """(tokenizers.Tokenizer, BPE vocabulary size N): byte-level BPE, special tokens added at N + offset."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_TRAINING_TEXTS, trainer=trainer)
    n = tok.get_vocab_size()
    by_offset = {off: name for name, off in SPECIAL_OFFSETS.items()}
    last = max(by_offset)
    names = [by_offset.get(k, f"<｜place▁holder▁no▁{k}｜>") for k in range(last + 1)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in names])
    assert all(tok.token_to_id(name) == n + off for name, off in SPECIAL_OFFSETS.items())
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, n)])
    return tok, n


@torch.no_grad()
def _spread_image_path(model) -> None:
    """Redraw the image-generation path (generation embeddings, aligner, head) at unit gain,
    N(0, 1 / fan_in) weights and N(0, 0.1) biases: at transformers' init (std 0.02) the tiny
    model's greedy image tokens repeat one code, and a test comparing them would see little."""
    for module in (model.model.generation_embeddings, model.model.generation_aligner, model.model.generation_head):
        for p in module.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
            else:
                p.normal_(0.0, 0.1)


def _token_entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_janus_pro_format(out_dir: str | os.PathLike, *, seed: int = 0, bpe_vocab_size: int = 320,
                           hidden_size: int = 64, num_layers: int = 2, image_size: int = 32,
                           patch_size: int = 8, codebook_size: int = 64) -> Path:
    """Write the directory (see the module docstring) to `out_dir` and return its path.

    Written in a temporary sibling and renamed into place, so `out_dir` is either absent or complete;
    an existing `out_dir` is an error. Deterministic in `seed` (weights) and the sizes.
    """
    from safetensors.torch import save_file
    from transformers import JanusForConditionalGeneration

    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"out_dir: {out} exists")
    with staged_folder(out) as stage:
        tok, n = _tokenizer(bpe_vocab_size)
        ids = {name: n + off for name, off in SPECIAL_OFFSETS.items()}
        vocab_size = -(-tok.get_vocab_size() // 64) * 64
        config = tiny_janus_config(vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                                   image_size=image_size, patch_size=patch_size, codebook_size=codebook_size)
        text = config.text_config
        text.bos_token_id, text.eos_token_id, text.pad_token_id = ids[BOS], ids[EOS], ids[PAD]
        config.image_token_id = ids[IMAGE]
        config._attn_implementation = "sdpa"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = JanusForConditionalGeneration(config)
            _spread_image_path(model)
        config.save_pretrained(stage)
        # one file, contiguous tensors, the metadata transformers writes ({"format": "pt"})
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, stage / "model.safetensors",
                  metadata={"format": "pt"})
        _write_json(stage / "generation_config.json", {
            "_from_model_config": False, "boi_token_id": ids[BOI], "bos_token_id": ids[BOS],
            "eos_token_id": ids[EOS], "guidance_scale": 5, "pad_token_id": ids[PAD], "temperature": 1,
            "transformers_version": "4.52.0.dev0"})
        tok.save(str(stage / "tokenizer.json"))
        image_tokens = {"boi_token": BOI, "eoi_token": EOI, "image_token": IMAGE}
        _write_json(stage / "tokenizer_config.json", {
            "add_bos_token": True, "add_eos_token": False,
            "added_tokens_decoder": {str(ids[t]): _token_entry(t) for t in sorted(ids, key=ids.get)},
            **image_tokens, "bos_token": BOS, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
            "eos_token": EOS, "extra_special_tokens": image_tokens, "legacy": True, "model_max_length": 16384,
            "pad_token": PAD, "processor_class": "JanusProcessor", "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizerFast", "unk_token": None, "use_default_system_prompt": False})
        _write_json(stage / "special_tokens_map.json", {
            "additional_special_tokens": ADDITIONAL_SPECIAL, "bos_token": _token_entry(BOS),
            "eos_token": _token_entry(EOS), "pad_token": _token_entry(PAD)})
        _write_json(stage / "preprocessor_config.json", {
            "background_color": [127, 127, 127], "do_convert_rgb": None, "do_normalize": True, "do_pad": True,
            "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "JanusImageProcessor", "image_std": [0.5, 0.5, 0.5], "min_size": 14,
            "processor_class": "JanusProcessor", "resample": 3, "rescale_factor": 1 / 255,
            "size": {"height": image_size, "width": image_size}})
        _write_json(stage / "processor_config.json", {
            "num_image_tokens": config.vision_config.num_image_tokens, "processor_class": "JanusProcessor",
            "use_default_system_prompt": True})
        _write_json(stage / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    return out
