"""Lumina-DiMOO's token-id layout (../shared/DIMOO.md section 1.4, 1.6) and the helpers the samplers need.

Sources (DIMOO.md cites them as `repo@commit:path:Lx`; Lumina-DiMOO@81344e6 unless named):

    text ids                        0 .. 126355
    <|endoftext|>       126081      LLaDA@b7e6c35:generate.py:L92-98
    image newline       126084      config.py:L29; image_utils.py:L158 (one after each grid row, the last too)
    <|mdm_mask|>        126336      config.py:L28
    answer padding      126339      train.py:L89-90
    <|eot_id|>          126348      LLaDA@b7e6c35:generate.py:L92-98
    <IMAGE> / </IMAGE>  126349 / 126350    config.py:L33-34
    <uncondition>       126351      config.py:L35
    <answer> / </answer>  126354 / 126355  config.py:L31-32
    image code k        126356 + k, k in [0, 8192)   config.py:L30; image_utils.py:L53, L156
    logits width        134548 = 126356 + 8192       [I] image_generation_generator.py:L82-85 (offset = width - 8192)

The image codes are the LAST `codebook_size` ids of the vocabulary (DiMOO's sampler computes the offset as
`logits.size(-1) - 8192`); `DimooIds` keeps that rule for any vocabulary, so a compact layout for a tiny model
(`DimooIds.compact`) and the real one (`DIMOO_IDS`) are read by the same code.

Unverified (DIMOO.md section 5.1), chosen here and kept in one place (`CHAT_TAG_IDS`, `NEWLINE_TOKEN`,
`ANSWER_PAD_TOKEN`, `IMAGE_TOKEN_FORMAT`): the ids of `<system>`, `</system>`, `<user>`, `</user>` (the prompts use
them as strings; train.py's `[:-1]` split needs `</user>` to be one token, so they are single tokens here, at
126340-126343, a free slot range of the text block); the token strings of 126084, 126339 and the image codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TEXT_VOCAB_SIZE = 126356  # first image-code id: config.py:L30 (code + 126356); image_utils.py:L53, L156
CODEBOOK_SIZE = 8192  # image_generation_generator.py:L26 (`codebook_size=8192`)
VOCAB_SIZE = TEXT_VOCAB_SIZE + CODEBOOK_SIZE  # 134548 [I]: logits width, image_generation_generator.py:L82-85
ENDOFTEXT = 126081  # `<|endoftext|>` LLaDA@b7e6c35:generate.py:L92-98 (LLaDA's eos/pad in its config [I])
NEWLINE = 126084  # image row end: config.py:L29; image_utils.py:L158
MASK = 126336  # `<|mdm_mask|>`: config.py:L28; LLaDA generate.py
ANSWER_PAD = 126339  # pads answers to a fixed length: train.py:L89-90; VLMEvalKit lumina_dimmo/model.py:L195
EOT = 126348  # `<|eot_id|>` LLaDA@b7e6c35:generate.py:L92-98
BOI = 126349  # `<IMAGE>`: config.py:L33
EOI = 126350  # `</IMAGE>`: config.py:L34
UNCONDITION = 126351  # `<uncondition>`: config.py:L35
BOA = 126354  # `<answer>`: config.py:L31
EOA = 126355  # `</answer>`: config.py:L32
DOWNSAMPLE = 16  # VQ pixels per code side: image_utils.py:L39, L82 (`vae_scale=16`)

#: Token strings of the specials whose strings the code uses (config.py; prompt_utils.py; LLaDA generate.py).
SPECIAL_TOKENS = {"<|endoftext|>": ENDOFTEXT, "<|mdm_mask|>": MASK, "<|eot_id|>": EOT, "<IMAGE>": BOI,
                  "</IMAGE>": EOI, "<uncondition>": UNCONDITION, "<answer>": BOA, "</answer>": EOA}
#: [U] the strings of these two ids are not in any stored source; chosen names.
NEWLINE_TOKEN = "<|image_newline|>"
ANSWER_PAD_TOKEN = "<|answer_pad|>"
#: [U] ids of the chat tags (used as strings in prompt_utils.py:L36-38); chosen: one token each, 126340-126343.
CHAT_TAG_IDS = {"<system>": 126340, "</system>": 126341, "<user>": 126342, "</user>": 126343}
#: [U] string of image code k's token (the tokenizer is presumed to have 134548 entries, train.py:L182-183).
IMAGE_TOKEN_FORMAT = "<|image_{}|>"


@dataclass(frozen=True)
class DimooIds:
    """A DiMOO id layout: the specials plus `codebook_size` image codes occupying the last ids of `vocab_size`.

    `DIMOO_IDS` is the released model's; `DimooIds.compact(n)` puts the same specials after an n-token text
    vocabulary (a tiny model's), in the same order."""

    vocab_size: int = VOCAB_SIZE
    codebook_size: int = CODEBOOK_SIZE
    mask: int = MASK
    newline: int = NEWLINE
    boi: int = BOI
    eoi: int = EOI
    uncondition: int = UNCONDITION
    boa: int = BOA
    eoa: int = EOA
    answer_pad: int = ANSWER_PAD
    endoftext: int = ENDOFTEXT

    def __post_init__(self):
        if not 0 < self.codebook_size < self.vocab_size:
            raise ValueError(f"codebook_size: expected 0 < codebook_size < vocab_size={self.vocab_size}, "
                             f"got {self.codebook_size}")
        specials = self.specials()
        if any(not 0 <= v < self.image_offset for v in specials.values()) or len(set(specials.values())) != 9:
            raise ValueError(f"DimooIds: specials must be distinct text ids below {self.image_offset}, got {specials}")

    @classmethod
    def compact(cls, text_vocab_size: int, codebook_size: int) -> DimooIds:
        """Layout of a tiny model: text ids [0, n), the nine specials at n..n+8 (mask, newline, boi, eoi,
        uncondition, boa, eoa, answer_pad, endoftext), codes at n+9+k; vocab n + 9 + codebook_size."""
        if text_vocab_size < 1:
            raise ValueError(f"text_vocab_size: expected >= 1, got {text_vocab_size}")
        n = text_vocab_size
        return cls(vocab_size=n + 9 + codebook_size, codebook_size=codebook_size, mask=n, newline=n + 1, boi=n + 2,
                   eoi=n + 3, uncondition=n + 4, boa=n + 5, eoa=n + 6, answer_pad=n + 7, endoftext=n + 8)

    def specials(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("mask", "newline", "boi", "eoi", "uncondition", "boa", "eoa",
                                              "answer_pad", "endoftext")}

    # ------------------------------------------------------------------ codes <-> ids
    @property
    def image_offset(self) -> int:
        """Id of image code 0: vocab_size - codebook_size (126356 for DiMOO)."""
        return self.vocab_size - self.codebook_size

    @property
    def image_slice(self) -> slice:
        """The image-code columns of the logits: [image_offset, vocab_size) (8192 wide for DiMOO)."""
        return slice(self.image_offset, self.vocab_size)

    def code_to_id(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes k in [0, codebook_size) (any shape, integer) -> token ids image_offset + k."""
        codes = torch.as_tensor(codes)
        if codes.is_floating_point() or (codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size)):
            raise ValueError(f"codes: expected integers in [0, {self.codebook_size})")
        return codes + self.image_offset

    def id_to_code(self, ids: torch.Tensor) -> torch.Tensor:
        """Image token ids (any shape) -> codes id - image_offset; any non-image id is an error."""
        ids = torch.as_tensor(ids)
        if ids.is_floating_point() or (ids.numel() and (ids.min() < self.image_offset or ids.max() >= self.vocab_size)):
            raise ValueError(f"ids: expected image ids in [{self.image_offset}, {self.vocab_size})")
        return ids - self.image_offset

    def is_image(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool mask of image-code ids."""
        return (ids >= self.image_offset) & (ids < self.vocab_size)

    # ------------------------------------------------------------------ grids
    @staticmethod
    def grid_length(height: int, width: int) -> int:
        """Tokens of an h x w code grid with a newline after every row: h * (w + 1) (512 px: 32 * 33 = 1056)."""
        if height < 1 or width < 1:
            raise ValueError(f"height, width: expected >= 1, got {height}, {width}")
        return height * (width + 1)

    def add_newlines(self, grid: torch.Tensor) -> torch.Tensor:
        """[..., h, w] token ids -> [..., h * (w + 1)] with `newline` after every row (image_utils.py:L136-144)."""
        if grid.dim() < 2:
            raise ValueError(f"grid: expected [..., h, w], got shape {tuple(grid.shape)}")
        nl = torch.full((*grid.shape[:-1], 1), self.newline, dtype=grid.dtype, device=grid.device)
        return torch.cat([grid, nl], -1).flatten(-2)

    def newline_positions(self, height: int, width: int) -> torch.Tensor:
        """[h] positions (within the h * (w + 1) grid tokens) of the newlines: (r + 1) * (w + 1) - 1."""
        self.grid_length(height, width)
        return torch.arange(1, height + 1) * (width + 1) - 1

    def code_positions(self, height: int, width: int) -> torch.Tensor:
        """[h * w] positions (within the grid tokens) of the codes, row-major."""
        self.grid_length(height, width)
        return (torch.arange(height)[:, None] * (width + 1) + torch.arange(width)[None, :]).flatten()

    def strip_newlines(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """[..., h * (w + 1)] grid tokens -> [..., h, w] (the newline column dropped; it must hold newlines)."""
        if tokens.shape[-1] != self.grid_length(height, width):
            raise ValueError(f"tokens: expected last dim {self.grid_length(height, width)} for a {height}x{width} "
                             f"grid, got {tokens.shape[-1]}")
        rows = tokens.unflatten(-1, (height, width + 1))
        if not bool((rows[..., -1] == self.newline).all()):
            raise ValueError(f"tokens: every row of the grid must end in the newline id {self.newline}")
        return rows[..., :-1]

    def mask_grid(self, height: int, width: int, batch: int = 1) -> torch.Tensor:
        """[batch, h * (w + 1)] a fully masked grid (codes MASK, newlines kept), as the T2I prompt starts."""
        grid = torch.full((batch, height, width), self.mask, dtype=torch.long)
        return self.add_newlines(grid)


DIMOO_IDS = DimooIds()


def grid_shape(image_height: int, image_width: int, downsample: int = DOWNSAMPLE) -> tuple[int, int]:
    """Pixel size -> code grid (h, w) = (H / 16, W / 16); sizes must be multiples of `downsample`."""
    if image_height % downsample or image_width % downsample or image_height <= 0 or image_width <= 0:
        raise ValueError(f"image size: expected positive multiples of {downsample}, got {image_height}x{image_width}")
    return image_height // downsample, image_width // downsample
