"""The toy world (engine/data/toyworld.py) for a tiny DiMOO: tokenizer, id layout, painter VQ, prompts, rewards.

    world = ToyDimooWorld.build(pairs, data_root)            # toy tokenizer from the pairs' words
    model = world.tiny_model(seed=0)                          # tiny_dimoo(len(tokenizer), codebook_size=64)
    start, uncond, pos = world.generation_rows(caption)      # T2I rows, image_rows layout, 4 x 4 code grid
    start, pos = world.understanding_rows(question, image)   # MMU rows: the image's codes in the prompt

Layouts (DiMOO's, ../shared/DIMOO.md 1.6, with the toy tokenizer's words instead of the chat template):
- generation: caption ids + [BOA, BOI] + masked grid (newline after each row) + [EOI, EOA]; the unconditional
  row is [<uncondition>] + the same tail (`sampler.image_rows`).
- understanding: [BOI] + grid of the image's codes (newlines) + [EOI] + question ids + [BOA] + MASK * gen_length
  + [EOA] (`sampler.text_rows`); DiMOO puts the image before the prompt's last token, which in the toy prompt
  (no `</user>`) is the same as before the question.

Images: the painter VQ (`vq.toy_vqmodel(palette=...)`) decodes code k to a flat 16 x 16 block of palette[k]
(palette = background then the six toy colours, repeated over the codebook, `engine.model.codebook_palette`),
so a `grid` x `grid` code image is a (16 grid)^2 picture; `image_codes` is its inverse on toy images (per block,
the most common foreground colour when foreground covers a quarter of it, else background), the "VQ encoding"
of an understanding image. Rewards: understanding = `engine.rewards.answer_accuracy` of the decoded answer,
generation = the toy world's pixel reward (`engine.rewards.ToyWorldReward`) on the decoded image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import toyworld
from ..data.io import resolve_image_path
from ..model import codebook_palette
from ..rewards import RewardInput, ToyWorldReward, answer_accuracy
from ..text import ToyTokenizer, load_image
from .ids import DOWNSAMPLE, DimooIds
from .model import DimooModel, tiny_dimoo
from .sampler import image_rows, text_rows
from .vq import decode_codes, toy_vqmodel


def toy_colours() -> torch.Tensor:
    """[7, 3] in [0, 1]: the toy world's background, then its six colours (COLORS order)."""
    return torch.tensor([toyworld.BACKGROUND, *toyworld.COLORS.values()], dtype=torch.float32) / 255.0


def tokenizer_texts(pairs: list) -> list[str]:
    """The words of the toy tokenizer: both halves' questions and answers and the captions (as engine.build)."""
    return [t for p in pairs for t in (p.understand.question, p.understand.answer, p.generate.prompt,
                                       p.generate.question, p.generate.answer)]


@dataclass
class ToyDimooWorld:
    """Everything a tiny DiMOO needs on the toy world. tokenizer: the toy word tokenizer (text ids [0, n));
    ids: `DimooIds.compact(n, codebook_size)`; palette [codebook_size, 3]; vq: the painter VQModel;
    grid: codes per image side (image side = 16 grid pixels); gen_length: answer tokens; data_root: of image paths."""

    tokenizer: ToyTokenizer
    ids: DimooIds
    palette: torch.Tensor
    vq: object
    grid: int = 4
    gen_length: int = 2
    data_root: Path | None = None

    @classmethod
    def build(cls, pairs: list, data_root=None, *, tokenizer: ToyTokenizer | None = None, codebook_size: int = 64,
              grid: int = 4, gen_length: int = 2) -> ToyDimooWorld:
        """The world of `pairs` (tokenizer from their words unless given, e.g. a resumed run's)."""
        if grid < 2 or codebook_size < len(toy_colours()):
            raise ValueError(f"grid, codebook_size: expected grid >= 2 and codebook_size >= 7, got {grid}, "
                             f"{codebook_size}")
        if gen_length < 1:
            raise ValueError(f"gen_length: expected >= 1, got {gen_length}")
        tok = tokenizer or ToyTokenizer.from_texts(tokenizer_texts(pairs))
        palette = codebook_palette(toy_colours(), codebook_size)
        return cls(tok, DimooIds.compact(len(tok), codebook_size), palette,
                   toy_vqmodel(codebook_size, palette=palette), grid, gen_length,
                   None if data_root is None else Path(data_root))

    # ------------------------------------------------------------------ model
    def tiny_model(self, seed: int = 0, **kwargs) -> DimooModel:
        """A random tiny DiMOO of this world's layout (`model.tiny_dimoo`)."""
        return tiny_dimoo(len(self.tokenizer), seed=seed, codebook_size=self.ids.codebook_size, **kwargs)

    @property
    def text_slice(self) -> slice:
        """The answer vocabulary: the toy tokenizer's ids [0, n) (no specials, no codes)."""
        return slice(0, len(self.tokenizer))

    @property
    def image_size(self) -> int:
        return self.grid * DOWNSAMPLE

    # ------------------------------------------------------------------ prompts
    def generation_rows(self, caption: str):
        """(start [L], uncond_start [Lu], positions [grid^2]) of the T2I prompt (module docstring)."""
        return image_rows(self.ids, torch.tensor(self.tokenizer.encode(caption), dtype=torch.long),
                          torch.tensor([self.ids.uncondition]), self.grid, self.grid)

    def understanding_rows(self, question: str, image: torch.Tensor):
        """(start [L], positions [gen_length]) of the MMU prompt; image: [3, S, S] in [0, 1] (S = image_size)."""
        codes = self.image_codes(image[None])[0]
        prompt = torch.cat([torch.tensor([self.ids.boi]), self.ids.add_newlines(self.ids.code_to_id(codes)),
                            torch.tensor([self.ids.eoi]), torch.tensor(self.tokenizer.encode(question),
                                                                       dtype=torch.long)])
        return text_rows(self.ids, prompt, self.gen_length)

    # ------------------------------------------------------------------ images
    def load_image(self, sample) -> torch.Tensor:
        """[3, S, S] float in [0, 1]: `sample.image_path` (relative to data_root) at S = image_size."""
        path = resolve_image_path(sample.image_path, self.data_root) if self.data_root else sample.image_path
        return load_image(path, self.image_size).float() / 255.0

    def image_codes(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [0, 1] -> [B, grid, grid] codes in [0, 7): per block the most common foreground
        colour (nearest of `toy_colours`, index > 0) when foreground covers >= 1/4 of it, else 0 (background)."""
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-1] != images.shape[-2] \
                or images.shape[-1] % self.grid:
            raise ValueError(f"images: expected [B, 3, S, S] with S a multiple of {self.grid}, "
                             f"got {tuple(images.shape)}")
        colours = toy_colours()
        b, s = images.shape[0], images.shape[-1]
        cell = s // self.grid
        pix = images.float().permute(0, 2, 3, 1)  # [B, S, S, 3]
        nearest = ((pix[..., None, :] - colours) ** 2).sum(-1).argmin(-1)  # [B, S, S]
        blocks = nearest.view(b, self.grid, cell, self.grid, cell).permute(0, 1, 3, 2, 4).flatten(-2)
        votes = torch.nn.functional.one_hot(blocks, len(colours)).sum(-2)[..., 1:]  # [B, g, g, 6] foreground
        colour = votes.argmax(-1) + 1
        return torch.where(votes.sum(-1) * 4 >= cell * cell, colour, torch.zeros_like(colour))

    def decode_images(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, grid, grid] codes -> [B, 3, S, S] images in [0, 1] through the painter VQ."""
        return decode_codes(self.vq, codes)

    def decode_text(self, tokens) -> str:
        """Answer token ids (text slice columns) -> the toy tokenizer's text."""
        return self.tokenizer.decode([int(t) for t in tokens])

    # ------------------------------------------------------------------ rewards
    def understanding_rewards(self, samples: list, answers: list[str]) -> torch.Tensor:
        """[B] float32: 1 where the answer checks (`answer_accuracy`: option letter) against sample.answer."""
        return torch.tensor([answer_accuracy(a, s.answer) for a, s in zip(answers, samples)], dtype=torch.float32)

    def generation_rewards(self, samples: list, images: torch.Tensor) -> torch.Tensor:
        """[B] float32: the toy world's pixel reward (colour and shape read back) of [B, 3, S, S] images."""
        return ToyWorldReward()(RewardInput(samples=samples, images=images))

