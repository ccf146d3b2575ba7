"""A DiMOO world from a Lumina-DiMOO folder: the folder's tokenizer, VQ model and DiMOO's real id layout and prompts.

    check_dimoo_folder(path)                                   # preflight: one-line ValueError, nothing loaded
    world = DimooFolderWorld.build(path, pairs, data_root, resolution=512, gen_length=32)
    model = world.load_model(dtype="bfloat16")                 # DimooModel.from_pretrained(path)
    start, uncond, pos = world.generation_rows(caption)       # T2I rows, grid x grid masked codes
    start, pos = world.understanding_rows(question, image)    # MMU rows: the VQ codes of the image in the prompt

The same interface as `engine.dimoo.toyworld.ToyDimooWorld` (what engine/dimoo/pairgrpo.py reads: text_slice, grid,
gen_length, ids, tokenizer, vq, generation_rows, understanding_rows, load_image, decode_text, decode_images,
understanding_rewards, generation_rewards), built from the folder (../shared/DIMOO.md section 1):

- tokenizer: `transformers.PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)`, which reads only
  the tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json): no remote code, no download
  (the released scripts use `AutoTokenizer(..., trust_remote_code=True)`, DIMOO.md 1.1; its class is [U]).
  Text is encoded as DiMOO's scripts do, `tokenizer(text)["input_ids"]` (whatever BOS/EOS the tokenizer adds).
- vq: `diffusers.VQModel.from_pretrained(folder / "vqvae")` in float32, eval (inference_t2i.py:L78-79).
- ids: `ids.DIMOO_IDS` (mask 126336, newline 126084, codes 126356 + k, ...); the folder's config.json must have
  134548 vocabulary rows and vqvae/config.json 8192 codes, and the tokenizer must put `<|mdm_mask|>` at 126336.
- grid = resolution // 16 (`ids.DOWNSAMPLE`): square images of `resolution` pixels, grid x grid codes.

Prompt layouts (DIMOO.md 1.6; templates of Lumina-DiMOO@81344e6:utils/prompt_utils.py):
- generation (T2I): tok("<system>Generate an image according to the text prompt.</system><user>{caption}</user>")
  + [BOA, BOI] + grid x grid MASK (newline 126084 after every row) + [EOI, EOA]; the unconditional row (CFG) is
  tok("<system>...</system><user><uncondition></user>") + the same tail from BOA on (`sampler.image_rows`).
  [U] the shipped T2I sample file spells the system text "accroding" while inference uses "according"; inference's
  spelling is used here.
- understanding (MMU, train.py:L66-96 / VLMEvalKit lumina_dimmo/model.py:L64-107, not inference_mmu.py, whose
  second `add_break_line` drops the EOI, DIMOO.md 1.6): p = tok("<system>You are a multimodal model that can
  process both text and images. Answer the following question based on the provided images. Analyze each image
  and combine relevant details to answer.</system><user>{question}</user>"); row = p[:-1] + [BOI] + the image's
  grid of codes (newline after every row) + [EOI] + p[-1:] + [BOA] + MASK * gen_length + [EOA]
  (`sampler.text_rows`). [U] the split assumes `</user>` is the prompt's one last token (the chat tags' ids are
  not in any stored source, DIMOO.md 5.1); `build` logs a warning when the tokenizer does not end the prompt so.
  The image is encoded as DiMOO's `encode_img_with_breaks`: pixels in [0, 1] (`VaeImageProcessor(do_normalize=
  False)`), `vq.quantize(vq.encode(x).latents)[2][2]` = row-major code indices.

Answer vocabulary (`text_slice` = ids [0, 126336)): the released text sampler draws from the full vocabulary (DIMOO.md
2.2 and section 4 row 7), which lets an answer hold image codes or MASK itself; here the slice stops before the mask
id, so it excludes MASK, every DiMOO special above it (answer pad 126339, `<IMAGE>`, `</IMAGE>`, `<uncondition>`,
`<answer>`, `</answer>`, the chat tags [U] 126340-126343) and the 8192 image codes, and keeps LLaDA's text ids
(the image newline 126084 and `<|endoftext|>` 126081 included: they lie inside the text block). It starts at 0, so a
column of the slice is its token id (pairgrpo's text sampler uses vocab_offset 0).

Rewards: callables over `engine.rewards.RewardInput` (the engine passes its registry's choice); defaults as the toy
world: understanding = `AccuracyReward` (`answer_accuracy` of the decoded answer), generation = `ToyWorldReward`
(colour and shape read from the decoded pixels).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.io import resolve_image_path
from ..rewards import AccuracyReward, RewardInput, ToyWorldReward
from ..text import load_image
from .ids import DIMOO_IDS, DOWNSAMPLE, DimooIds
from .model import SAFETENSORS_INDEX, DimooConfig, DimooModel
from .sampler import image_rows, text_rows
from .vq import decode_codes

log = logging.getLogger(__name__)

#: System texts of the two prompts (Lumina-DiMOO@81344e6:utils/prompt_utils.py `create_prompt_templates`).
T2I_SYSTEM = "Generate an image according to the text prompt."
MMU_SYSTEM = ("You are a multimodal model that can process both text and images. Answer the following question "
              "based on the provided images. Analyze each image and combine relevant details to answer.")
UNCONDITION_TEXT = "<uncondition>"  # config.py:L35; the unconditional prompt uses the string (prompt_utils.py:L38)
END_USER = "</user>"
MASK_TOKEN = "<|mdm_mask|>"


def chat_prompt(system: str, user: str) -> str:
    """DiMOO's prompt text: "<system>{system}</system><user>{user}</user>" (prompt_utils.py)."""
    return f"<system>{system}</system><user>{user}</user>"


# ----------------------------------------------------------------------------- preflight
def _json_file(path: Path, name: str):
    if not path.is_file():
        raise ValueError(f"{name}: missing in {str(path.parent)!r}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{name}: not readable JSON ({type(exc).__name__})") from None


def check_dimoo_folder(path: str | os.PathLike) -> None:
    """Check a Lumina-DiMOO folder's files without loading any model; one-line ValueError naming the first missing
    or bad one: config.json (a JSON object, model_type "llada", 134548 vocabulary rows), the weights
    (model.safetensors.index.json and every shard it names, else model.safetensors), tokenizer.json (JSON),
    vqvae/config.json (JSON, num_vq_embeddings 8192) and vqvae's weights (diffusion_pytorch_model*.safetensors/.bin)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"path: {str(folder)!r} is not a directory")
    cfg = _json_file(folder / "config.json", "config.json")
    if not isinstance(cfg, dict) or cfg.get("model_type") != "llada":
        got = cfg.get("model_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise ValueError(f"config.json: expected model_type 'llada' (Lumina-DiMOO), got {got!r}")
    rows = cfg.get("embedding_size") or cfg.get("vocab_size")
    if rows != DIMOO_IDS.vocab_size:
        raise ValueError(f"config.json: expected embedding_size (or vocab_size) {DIMOO_IDS.vocab_size} (DiMOO's "
                         f"126356 text ids + 8192 codes), got {rows!r}")
    index = folder / SAFETENSORS_INDEX
    if index.exists():
        spec = _json_file(index, SAFETENSORS_INDEX)
        weight_map = spec.get("weight_map") if isinstance(spec, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{SAFETENSORS_INDEX}: expected a non-empty 'weight_map'")
        for name in sorted(set(weight_map.values())):
            if not (folder / name).is_file():
                raise ValueError(f"{name}: missing (named by {SAFETENSORS_INDEX})")
    elif not (folder / "model.safetensors").is_file():
        raise ValueError(f"model.safetensors: missing in {str(folder)!r} (and no {SAFETENSORS_INDEX})")
    if not isinstance(_json_file(folder / "tokenizer.json", "tokenizer.json"), dict):
        raise ValueError("tokenizer.json: expected a JSON object")
    vq = _json_file(folder / "vqvae" / "config.json", "vqvae/config.json")
    if not isinstance(vq, dict) or vq.get("num_vq_embeddings") != DIMOO_IDS.codebook_size:
        got = vq.get("num_vq_embeddings") if isinstance(vq, dict) else type(vq).__name__
        raise ValueError(f"vqvae/config.json: expected num_vq_embeddings {DIMOO_IDS.codebook_size}, got {got!r}")
    weights = [p for p in (folder / "vqvae").glob("diffusion_pytorch_model*") if p.suffix in (".safetensors", ".bin")]
    if not weights:
        raise ValueError(f"vqvae/diffusion_pytorch_model.safetensors: missing in {str(folder / 'vqvae')!r}")


# ----------------------------------------------------------------------------- the world
@dataclass
class DimooFolderWorld:
    """Everything the DiMOO step needs, from a Lumina-DiMOO folder (module docstring).

    folder: the checkpoint folder; tokenizer: its HF fast tokenizer; ids: `DIMOO_IDS`; vq: its diffusers VQModel
    (float32, eval); grid: codes per image side (image side = 16 grid pixels); gen_length: answer tokens;
    data_root: of relative image paths; understanding_reward / generation_reward: callables over RewardInput
    returning [B] float32."""

    folder: Path
    tokenizer: object
    ids: DimooIds
    vq: object
    grid: int
    gen_length: int
    data_root: Path | None = None
    understanding_reward: Callable | None = None
    generation_reward: Callable | None = None

    @classmethod
    def build(cls, folder: str | os.PathLike, pairs: list | None = None, data_root=None, *, resolution: int = 512,
              gen_length: int = 32, generation_reward: Callable | None = None,
              understanding_reward: Callable | None = None) -> DimooFolderWorld:
        """The world of `folder` (checked by `check_dimoo_folder` first). pairs: unused (the tokenizer is the
        folder's; kept for ToyDimooWorld.build's signature). resolution: image side in pixels, a multiple of 16;
        rewards default to AccuracyReward / ToyWorldReward."""
        from diffusers import VQModel
        from transformers import PreTrainedTokenizerFast

        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 2 * DOWNSAMPLE \
                or resolution % DOWNSAMPLE:
            raise ValueError(f"resolution: expected a multiple of {DOWNSAMPLE} >= {2 * DOWNSAMPLE}, got {resolution!r}")
        if isinstance(gen_length, bool) or not isinstance(gen_length, int) or gen_length < 1:
            raise ValueError(f"gen_length: expected an int >= 1, got {gen_length!r}")
        check_dimoo_folder(folder)
        folder = Path(folder)
        vq_cfg = json.loads((folder / "vqvae" / "config.json").read_text(encoding="utf-8"))
        cfg = DimooConfig.from_json_dict(json.loads((folder / "config.json").read_text(encoding="utf-8")),
                                         codebook_size=int(vq_cfg["num_vq_embeddings"]))
        ids = cfg.ids()
        if ids != DIMOO_IDS or cfg.vocab_rows != DIMOO_IDS.vocab_size:
            raise ValueError(f"config.json: expected DiMOO's id layout ({DIMOO_IDS.vocab_size} rows, mask "
                             f"{DIMOO_IDS.mask}), got {cfg.vocab_rows} rows, mask {cfg.mask_token_id}")
        tok = PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
        mask = tok.convert_tokens_to_ids(MASK_TOKEN)
        if mask != ids.mask:
            raise ValueError(f"tokenizer.json: expected {MASK_TOKEN} at id {ids.mask}, got {mask!r}")
        if len(tok) > ids.vocab_size:
            raise ValueError(f"tokenizer.json: expected at most {ids.vocab_size} tokens (the model's rows), "
                             f"got {len(tok)}")
        vq = VQModel.from_pretrained(str(folder / "vqvae"), local_files_only=True).float().eval()
        for p in vq.parameters():
            p.requires_grad_(False)
        world = cls(folder, tok, ids, vq, resolution // DOWNSAMPLE, gen_length,
                    None if data_root is None else Path(data_root),
                    understanding_reward or AccuracyReward(), generation_reward or ToyWorldReward())
        end = world.encode(chat_prompt(MMU_SYSTEM, "?"))[-1:].tolist()
        if end != [tok.convert_tokens_to_ids(END_USER)]:
            log.warning("%s: the tokenized prompt does not end in one %s token; the MMU layout's p[:-1] + image + "
                        "p[-1:] split (train.py:L78) puts the image before token %s", folder, END_USER, end)
        return world

    def load_model(self, *, dtype: str = "bfloat16", device: str | torch.device = "cpu", **kwargs) -> DimooModel:
        """`DimooModel.from_pretrained(folder, dtype=, device=)` (kwargs: attn_backend)."""
        return DimooModel.from_pretrained(self.folder, dtype=dtype, device=device, **kwargs)

    @property
    def text_slice(self) -> slice:
        """The answer vocabulary: ids [0, MASK) = [0, 126336) (module docstring); column j is token id j."""
        return slice(0, self.ids.mask)

    @property
    def image_size(self) -> int:
        return self.grid * DOWNSAMPLE

    # ------------------------------------------------------------------ prompts
    def encode(self, text: str) -> torch.Tensor:
        """[n] long: `tokenizer(text)["input_ids"]` (as DiMOO's scripts); ids must be text ids (< 126356)."""
        out = torch.tensor(self.tokenizer(text)["input_ids"], dtype=torch.long)
        if out.numel() and int(out.max()) >= self.ids.image_offset:
            raise ValueError(f"text: encodes to an image-code id ({int(out.max())}); got {text[:60]!r}")
        return out

    def generation_rows(self, caption: str):
        """(start [L], uncond_start [Lu], positions [grid^2]) of DiMOO's T2I prompt (module docstring)."""
        return image_rows(self.ids, self.encode(chat_prompt(T2I_SYSTEM, caption)),
                          self.encode(chat_prompt(T2I_SYSTEM, UNCONDITION_TEXT)), self.grid, self.grid)

    def understanding_rows(self, question: str, image: torch.Tensor):
        """(start [L], positions [gen_length]) of DiMOO's MMU prompt; image: [3, S, S] in [0, 1], S = image_size."""
        if image.dim() != 3:
            raise ValueError(f"image: expected [3, {self.image_size}, {self.image_size}], got {tuple(image.shape)}")
        codes = self.image_codes(image[None])[0]
        p = self.encode(chat_prompt(MMU_SYSTEM, question))
        grid = self.ids.add_newlines(self.ids.code_to_id(codes))
        prompt = torch.cat([p[:-1], torch.tensor([self.ids.boi]), grid, torch.tensor([self.ids.eoi]), p[-1:]])
        return text_rows(self.ids, prompt, self.gen_length)

    # ------------------------------------------------------------------ images
    def load_image(self, sample) -> torch.Tensor:
        """[3, S, S] float in [0, 1]: `sample.image_path` (relative to data_root) at S = image_size."""
        path = resolve_image_path(sample.image_path, self.data_root) if self.data_root else sample.image_path
        return load_image(path, self.image_size).float() / 255.0

    @torch.no_grad()
    def image_codes(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [0, 1] (S = image_size) -> [B, grid, grid] long codes: the VQ encoder's
        `quantize(encode(x).latents)[2][2]` (DiMOO's encode_img_with_breaks, no normalisation to [-1, 1])."""
        s = self.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s) or not images.is_floating_point():
            raise ValueError(f"images: expected float [B, 3, {s}, {s}] in [0, 1], got {images.dtype} "
                             f"{tuple(images.shape)}")
        p = next(self.vq.parameters())
        latents = self.vq.encode(images.to(device=p.device, dtype=p.dtype)).latents
        b, _, h, w = latents.shape
        if (h, w) != (self.grid, self.grid):
            raise ValueError(f"vqvae: encodes {s} px to a {h}x{w} grid, expected {self.grid}x{self.grid}")
        return self.vq.quantize(latents)[2][2].reshape(b, h, w).long().cpu()

    def decode_images(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, grid, grid] codes -> [B, 3, S, S] float32 images in [0, 1] (`vq.decode_codes`)."""
        return decode_codes(self.vq, codes.to(next(self.vq.parameters()).device))

    def decode_text(self, tokens) -> str:
        """Answer tokens (columns of text_slice) -> text: the tokenizer's decode of ids column + text_slice.start,
        special tokens skipped."""
        start = self.text_slice.start
        return self.tokenizer.decode([int(t) + start for t in tokens], skip_special_tokens=True)

    # ------------------------------------------------------------------ rewards
    def understanding_rewards(self, samples: list, answers: list[str]) -> torch.Tensor:
        """[B] float32: `understanding_reward` of the decoded answers."""
        return torch.as_tensor(self.understanding_reward(RewardInput(samples=samples, texts=list(answers))),
                               dtype=torch.float32)

    def generation_rewards(self, samples: list, images: torch.Tensor) -> torch.Tensor:
        """[B] float32: `generation_reward` of [B, 3, S, S] images in [0, 1]."""
        return torch.as_tensor(self.generation_reward(RewardInput(samples=samples, images=images)),
                               dtype=torch.float32)
