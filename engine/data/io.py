"""Streaming JSONL IO for PairUG pairs and source samples, with all-or-nothing writes.

Readers are generators: one line is parsed at a time, so a file of millions of lines never
sits in memory. Writers go through `engine.files.atomic_writer`: an exception or Ctrl-C half-way
leaves the old file (or no file) behind, never a truncated one.

Paths inside records (`image_path`) are relative to a data root, by default the folder that
holds the JSONL file; `resolve_image_path` turns them into real paths.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..files import atomic_writer
from .schema import Pair, Sample


def dumps_line(record: dict[str, Any]) -> str:
    """One JSONL line (no trailing newline): compact, UTF-8 kept readable, NaN refused."""
    return json.dumps(record, ensure_ascii=False, separators=(", ", ": "), allow_nan=False)


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """Yield `(line_number, text)` for every non-blank line; line numbers start at 1."""
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                yield number, line


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield `(line_number, parsed_json)`; raises ValueError `path:line: malformed JSON ...`."""
    for number, line in iter_lines(path):
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno})") from None


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write `records` (any iterable, consumed lazily) atomically; returns the number written."""
    count = 0
    with atomic_writer(path) as fh:
        for record in records:
            fh.write(dumps_line(record))
            fh.write("\n")
            count += 1
    return count


def iter_pairs(path: str | os.PathLike) -> Iterator[Pair]:
    """Stream the pairs of a PairUG JSONL file.

    Raises ValueError `path:line: ...` at the first malformed line; run `validate_pairs`
    (or `pairuni validate`) for a report of every problem at once.
    """
    for number, record in iter_jsonl(path):
        yield Pair.from_record(record, where=f"{path}:{number}")


def read_pairs(path: str | os.PathLike) -> list[Pair]:
    """All pairs of a (small) PairUG file as a list; prefer `iter_pairs` for large files."""
    return list(iter_pairs(path))


def write_pairs(path: str | os.PathLike, pairs: Iterable[Pair]) -> int:
    """Write pairs as PairUG JSONL, atomically; returns the number written."""
    return write_jsonl(path, (pair.to_record() for pair in pairs))


def iter_samples(path: str | os.PathLike) -> Iterator[Sample]:
    """Stream a source set: one JSON object per line with the `Sample` keys
    (`image_path` required; `prompt`, `question`, `answer`, `tag`, `id` optional)."""
    for number, record in iter_jsonl(path):
        yield Sample.from_ann(record, where=f"{path}:{number}")


def write_samples(path: str | os.PathLike, samples: Iterable[Sample]) -> int:
    """Write a source set as JSONL, atomically; returns the number written."""
    return write_jsonl(path, (sample.to_ann() for sample in samples))


def data_root_of(jsonl_path: str | os.PathLike) -> Path:
    """The folder against which a JSONL file's relative image paths are resolved."""
    return Path(jsonl_path).resolve().parent


def resolve_image_path(image_path: str, data_root: str | os.PathLike) -> Path:
    """`image_path` itself when absolute, else `data_root / image_path`."""
    if not image_path:
        raise ValueError("image_path: empty")
    path = Path(image_path)
    return path if path.is_absolute() else Path(data_root) / path


def relocate_image_path(image_path: str, from_root: str | os.PathLike, to_root: str | os.PathLike) -> str:
    """Re-express an image path relative to `to_root` (kept absolute when it leaves that tree's drive)."""
    absolute = resolve_image_path(image_path, from_root).resolve()
    try:
        return os.path.relpath(absolute, Path(to_root).resolve())
    except ValueError:  # different drives on Windows
        return str(absolute)
