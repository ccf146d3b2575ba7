"""PairUG data: schema and streaming IO, validation, pair construction, semantic completion, toy world.

Modules: `schema` (Sample, Pair), `io` (streaming JSONL, atomic writes), `validate`,
`pairing` (build-pairs), `embed` (offline sentence-transformers), `completion` (complete),
`toyworld` (synthetic data and the attribute vocabulary rewards read), `sampler` (training pairs,
their seeded order, the image cache), `cli` (subcommands).

The engine's embedded default data is a toy world bundled in `toyworld_default/`
(pairs.jsonl, understand.jsonl, generate.jsonl, stats.json, images/); it is regenerated with
`pairuni toy-world --n 300 --seed 0 --out engine/data/toyworld_default --overwrite`.
"""

from __future__ import annotations

from pathlib import Path

from .io import iter_pairs, read_pairs, resolve_image_path, write_pairs
from .schema import MC_SUFFIX, Pair, Sample

DEFAULT_TOYWORLD_DIR = Path(__file__).resolve().parent / "toyworld_default"
# How the bundled world was made; tests check that the files match a regeneration.
DEFAULT_TOYWORLD_ARGS = {"n": 300, "seed": 0}


def default_data_root() -> Path:
    """Data root of the bundled toy world: image paths in its pairs file are relative to it."""
    return DEFAULT_TOYWORLD_DIR


def default_pairs_path() -> Path:
    """The bundled toy-world PairUG file, the engine's default training data."""
    path = DEFAULT_TOYWORLD_DIR / "pairs.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"bundled pairs missing: {path}; regenerate with "
                                "`pairuni toy-world --n 300 --seed 0 --out engine/data/toyworld_default --overwrite`")
    return path


__all__ = ["MC_SUFFIX", "Pair", "Sample", "default_data_root", "default_pairs_path", "iter_pairs", "read_pairs",
           "resolve_image_path", "write_pairs"]
