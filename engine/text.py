"""Prompts and images in, token ids out: the toy word tokenizer (tiny model) or Janus-Pro's processor.

Two builders with one interface:

    prompts.understanding(questions, images) -> (ids [B, L], mask [B, L], pixel_values [B, 3, S, S])
    prompts.generation(captions)             -> (ids [B, L], mask [B, L])     # ends with begin-of-image
    prompts.decode(token_ids)                -> str

Prompts are left-padded (the rollouts append to the right).
"""

from __future__ import annotations

import json
import re

import torch
import torch.nn.functional as F

from .model import TINY_SPECIAL

_WORD = re.compile(r"\w+|[^\w\s]")
#: Janus / SigLIP normalisation: pixels in [0, 1] -> [-1, 1].
IMAGE_MEAN, IMAGE_STD = 0.5, 0.5


#: Padding colour of non-square images when no processor says otherwise: the mean pixel, as Janus pads.
BACKGROUND = (int(IMAGE_MEAN * 255),) * 3


def load_image(path, size: int, background: tuple[int, int, int] = BACKGROUND) -> torch.Tensor:
    """RGB file -> [3, size, size] uint8: the long side resized to `size` (bicubic, aspect ratio kept),
    then centred on a `background` square, as Janus and `JanusImageProcessor` do (a stretched image
    would show the vision encoder shapes it never saw). uint8 so a cache of many images stays small.

    Any mode decodes faithfully (16-bit, palette, alpha over white, CMYK, ...; `engine.data.io.open_rgb`);
    a file that does not decode or is over the pixel budget raises `ImageError`, one line naming it."""
    from PIL import Image

    from .data.io import open_rgb

    with open_rgb(path) as im:
        w, h = im.size
        # the processor's rule, floor included (14 px: the smallest side it lets through)
        new_w, new_h = max(round(w * size / max(w, h)), 14), max(round(h * size / max(w, h)), 14)
        im = im.resize((new_w, new_h), Image.BICUBIC)
        if (new_w, new_h) != (size, size):
            square = Image.new("RGB", (max(new_w, new_h),) * 2, tuple(background))
            square.paste(im, ((square.width - new_w) // 2, (square.height - new_h) // 2))
            im = square
        side = im.width
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return data.view(side, side, 3).permute(2, 0, 1).contiguous()


def to_pixel_values(images: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> [B, 3, size, size] normalised for the vision encoder."""
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return (images - IMAGE_MEAN) / IMAGE_STD


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


class ToyTokenizer:
    """Word-level tokenizer over a fixed vocabulary; ids 0-5 are the tiny model's special tokens."""

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<boi>", "<image>", "<unk>")

    def __init__(self, words):
        self.vocab = list(self.SPECIALS) + [w for w in words if w not in self.SPECIALS]
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def from_texts(cls, texts) -> ToyTokenizer:
        words = set()
        for t in texts:
            words.update(_WORD.findall(t))
        words.update("ABCDEFGHIJ")
        return cls(sorted(words))

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, TINY_SPECIAL.unk) for w in _WORD.findall(text)]

    def decode(self, ids) -> str:
        return " ".join(self.vocab[i] for i in ids if i >= len(self.SPECIALS) and i < len(self.vocab))

    def to_json(self) -> str:
        return json.dumps(self.vocab[len(self.SPECIALS):])

    @classmethod
    def from_json(cls, text: str) -> ToyTokenizer:
        return cls(json.loads(text))


class ToyPrompts:
    """Prompt layout of the tiny model: `<bos> <image>*n question` and `<bos> caption <boi>`."""

    background_color = BACKGROUND

    def __init__(self, tokenizer: ToyTokenizer, *, image_size: int, num_image_tokens: int):
        self.tok, self.image_size, self.n_img = tokenizer, image_size, num_image_tokens

    def understanding(self, questions: list[str], images: torch.Tensor):
        rows = [[TINY_SPECIAL.bos] + [TINY_SPECIAL.image] * self.n_img + self.tok.encode(q) for q in questions]
        ids, mask = left_pad(rows, TINY_SPECIAL.pad)
        return ids, mask, to_pixel_values(images, self.image_size)

    def generation(self, captions: list[str]):
        rows = [[TINY_SPECIAL.bos] + self.tok.encode(c) + [TINY_SPECIAL.boi] for c in captions]
        return left_pad(rows, TINY_SPECIAL.pad)

    def decode(self, ids) -> str:
        return self.tok.decode(ids)


class JanusPrompts:
    """Janus-Pro's own chat layout through transformers' `JanusProcessor` (loaded from the model dir)."""

    def __init__(self, path: str):
        from transformers import JanusProcessor

        self.processor = JanusProcessor.from_pretrained(path, local_files_only=True)
        self.image_size = self.processor.image_processor.size["height"]
        self.background_color = tuple(self.processor.image_processor.background_color)

    def _chat(self, text: str, with_image: bool) -> str:
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def understanding(self, questions: list[str], images: torch.Tensor):
        texts = [self._chat(q, True) for q in questions]
        out = self.processor(text=texts, images=[im for im in images.float()], return_tensors="pt", padding=True,
                             do_rescale=False)
        return out["input_ids"], out["attention_mask"], out["pixel_values"]

    def generation(self, captions: list[str]):
        texts = [self._chat(c, False) for c in captions]
        out = self.processor(text=texts, generation_mode="image", return_tensors="pt", padding=True)
        return out["input_ids"], out["attention_mask"]

    def decode(self, ids) -> str:
        return self.processor.tokenizer.decode(ids, skip_special_tokens=True)
