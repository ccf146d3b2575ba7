"""Writing files and folders so that a crash never leaves a half-written one: every writer of the engine
(metrics, exports, checkpoints, data files, evaluation reports) goes through these.

    with atomic_writer(path) as fh: ...          # a file: temp beside it, fsync, rename onto it
    write_json(path, obj)                        # one JSON document, atomically
    with staged_folder(target) as stage: ...     # a folder: filled beside it, swapped in whole
    old = swap_in(stage, target, old)            # the swap itself (checkpoints keep `old` a moment longer)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def current_umask() -> int:
    """The process umask (read without leaving it changed)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    with contextlib.suppress(OSError):
        os.fsync(fd)
    os.close(fd)


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


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write one pretty-printed JSON document atomically (NaN refused: strict JSON)."""
    with atomic_writer(path) as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False, allow_nan=False)
        fh.write("\n")


def swap_in(stage: Path, target: Path, old: Path, *, swapped: Callable[[], None] | None = None) -> Path | None:
    """Move the finished folder `stage` to `target` with at most two renames: an existing `target` is
    first renamed to `old` (then `swapped()` runs), so a complete copy exists at every instant. Returns
    `old` when it was made, for the caller to delete once nothing needs it; on a failed second rename
    `old` is moved back."""
    moved = None
    if target.exists():
        os.replace(target, old)
        moved = old
        if swapped is not None:
            swapped()
    try:
        os.replace(stage, target)
    except BaseException:
        if moved is not None:
            os.replace(moved, target)
        raise
    return moved


def remove(path: Path | None) -> None:
    """Delete a file or folder tree if it exists (best effort)."""
    if path is None:
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """A fresh folder beside `target` to fill; on clean exit it replaces `target` (`swap_in`).

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
        remove(swap_in(stage, target, target.parent / f".{target.name}.old-{os.getpid()}"))
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
