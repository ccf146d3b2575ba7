"""Streaming JSONL IO for PairUG pairs and source samples, with all-or-nothing writes.

Readers are generators: one line is parsed at a time, so a file of millions of lines never
sits in memory. Writers fill a temporary file next to the target and `os.replace` it into
place only after the last record was written and flushed to disk: an exception or Ctrl-C
half-way leaves the old file (or no file) behind, never a truncated one.

Paths inside records (`image_path`) are relative to a data root, by default the folder that
holds the JSONL file; `resolve_image_path` turns them into real paths.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from .schema import Pair, Sample


def current_umask() -> int:
    """The process umask (read without leaving it changed)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside `path`; on clean exit fsync it and rename it onto `path`.

    On any exception (KeyboardInterrupt included) the temporary file is removed and `path`
    is untouched. `mode` is "w" (text) or "wb" (binary). The file's permissions honour the
    umask, as a plain `open(path, "w")` would.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode: expected 'w' or 'wb', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        # mkstemp creates 0600; the finished file gets the mode `open()` would give it.
        os.chmod(tmp, 0o666 & ~current_umask())
        with os.fdopen(fd, mode, encoding=None if mode == "wb" else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """A fresh folder beside `target` to fill; on clean exit it replaces `target` (two renames).

    On any exception the stage is removed and `target` is untouched, so `target` is never seen
    half-written: it is the old folder or the finished new one. A process killed while filling
    leaves only the hidden stage `.NAME.*` beside `target`. `overwrite=False` refuses (ValueError)
    a `target` that exists and is not an empty folder, before anything is written.
    """
    target = Path(target)
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"{target} exists and is not empty (pass --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        stage.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the result is ordinary data
        yield stage
        _swap_into_place(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _swap_into_place(stage: Path, target: Path) -> None:
    """Replace `target` (a folder or a file, when it exists) by the finished `stage` folder with two renames."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    try:
        os.replace(stage, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                old.unlink()


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


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write one pretty-printed JSON document atomically."""
    with atomic_writer(path) as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False, allow_nan=False)
        fh.write("\n")


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
