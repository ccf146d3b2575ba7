"""Training pairs: read and checked before any model loads, visited in a seeded order, images cached.

    pairs, root = read_training_pairs(path, checks=[...])   # ValueError naming the file and pair
    sampler = PairSampler(pairs, per_step=4, seed=0, shuffle=True)
    batch_pairs = sampler.next()                            # the next P pairs; state_dict() resumes exactly

What a pair must carry depends on the rewards; the caller passes one check per reward
(`engine.rewards.check_sample`), so this module names no reward.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..seeds import data_order
from .io import iter_jsonl, resolve_image_path
from .schema import Pair, Sample
from .validate import image_file_problem

#: `check(pair) -> problem or None`, one per reward.
PairCheck = Callable[[Pair], "str | None"]


def read_training_pairs(path: str | Path, *, max_pairs: int | None = None, image_root: str | Path | None = None,
                        checks: list[PairCheck] = ()) -> tuple[list[Pair], Path]:
    """The first `max_pairs` pairs of `path` and their image root (default: the file's folder, as in PairUG).

    Every pair needs what the rollouts read (a question and an image that decodes, `io.open_rgb`, on the
    understanding half, a prompt on the generation half) and passes `checks`. Raises ValueError
    `path:line: pair #n: ...` naming the first problem, OSError when the file cannot be read.
    """
    pairs: list[Pair] = []
    lines: list[int] = []
    for number, record in iter_jsonl(path):
        if max_pairs is not None and len(pairs) >= max_pairs:
            break
        pairs.append(Pair.from_record(record, where=f"{path}:{number}"))
        lines.append(number)
    if not pairs:
        raise ValueError(f"{path} holds no pairs")
    root = Path(image_root) if image_root else Path(path).resolve().parent

    def where(i: int) -> str:
        return f"{path}:{lines[i]}: pair #{i + 1}"

    for i, pair in enumerate(pairs):
        if not pair.understand.has_qa:
            raise ValueError(f"{where(i)}: understand_ann needs a question and an answer")
        if not pair.generate.has_caption:
            raise ValueError(f"{where(i)}: generate_ann needs a prompt (caption)")
        for check in checks:
            problem = check(pair)
            if problem:
                raise ValueError(f"{where(i)}: {problem}")
    # every image the run will load must decode: a bad file found at step 1 would cost a model load
    first_use = {}
    for i, pair in enumerate(pairs):
        image = resolve_image_path(pair.understand.image_path, root)
        if not image.is_file():
            raise ValueError(f"{where(i)}: understand_ann.image_path {str(image)!r} does not exist")
        first_use.setdefault(image, i)
    with ThreadPoolExecutor(max_workers=8) as pool:
        for (image, i), problem in zip(first_use.items(), pool.map(image_file_problem, first_use)):
            if problem is not None:
                raise ValueError(f"{where(i)}: understand_ann.image_path: {problem}")
    return pairs, root


class PairSampler:
    """Pairs in a seeded order reshuffled each epoch; the cursor is part of every checkpoint."""

    def __init__(self, pairs: list[Pair], per_step: int, seed: int, shuffle: bool):
        self.pairs, self.per_step, self.seed, self.shuffle = pairs, per_step, seed, shuffle
        self.epoch, self.cursor = 0, 0

    def _order(self) -> list[int]:
        n = len(self.pairs)
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(data_order(self.seed, self.epoch))
        return torch.randperm(n, generator=g).tolist()

    def next_indices(self) -> list[int]:
        """Indices (into `pairs`) of the next `per_step` pairs, wrapping into the next epoch."""
        out: list[int] = []
        while len(out) < self.per_step:
            order = self._order()
            take = order[self.cursor: self.cursor + self.per_step - len(out)]
            out += take
            self.cursor += len(take)
            if self.cursor >= len(self.pairs):
                self.epoch, self.cursor = self.epoch + 1, 0
        return out

    def next(self) -> list[Pair]:
        """The next `per_step` pairs."""
        return [self.pairs[i] for i in self.next_indices()]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


class ImageCache:
    """Understanding images, read and resized once per path.

    Kept as `load` returns them ([3, size, size] uint8 from `engine.text.load_image`: 0.44 MB at
    384 px, a quarter of float32); each call returns float in [0, 1]."""

    def __init__(self, root: str | Path, size: int, load: Callable[[Path, int], torch.Tensor]):
        self.root, self.size, self.load = Path(root), size, load
        self._images: dict[str, torch.Tensor] = {}

    def __call__(self, sample: Sample) -> torch.Tensor:
        key = sample.image_path
        if key not in self._images:
            self._images[key] = self.load(resolve_image_path(key, self.root), self.size)
        image = self._images[key]
        return image.float() / 255.0 if image.dtype == torch.uint8 else image
