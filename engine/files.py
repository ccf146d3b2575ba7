"""Writing files and folders so that a crash never leaves a half-written one: every writer of the engine
(metrics, exports, checkpoints, data files, evaluation reports) goes through these.

    with atomic_writer(path) as fh: ...          # a file: temp beside it, fsync, rename onto it
    write_json(path, obj)                        # one JSON document, atomically
    with staged_folder(target, marker=".pairuni-export") as stage: ...  # a folder: filled beside it, swapped in
    old = swap_in(stage, target, old)            # the swap itself (checkpoints keep `old` a moment longer)
"""

from __future__ import annotations

import contextlib
import hashlib
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


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The hex SHA-256 of a file's content, read in `chunk`-byte pieces (any size, constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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


#: The marker `staged_folder(overwrite=True)` writes and looks for when its caller names none.
FOLDER_MARKER = ".pairuni-folder"


def check_replaceable(target: str | os.PathLike, marker: str, *, overwrite: bool) -> None:
    """Raise ValueError (one line) unless `target` is absent, an empty folder, or (with `overwrite`) a folder
    holding `marker`, the file the command that wrote it left there: overwrite never deletes anything else."""
    target = Path(target)
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return
    if not overwrite:
        raise ValueError(f"{target} exists and is not empty (pass --overwrite to replace it)")
    if not (target.is_dir() and (target / marker).is_file()):
        raise ValueError(f"{target} exists and was not written by this command (no {marker} in it): --overwrite "
                         "replaces only such a folder; nothing was deleted (move it away or pick another folder)")


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike, *, overwrite: bool = False, marker: str | None = None) -> Iterator[Path]:
    """A fresh folder beside `target` to fill; on clean exit it replaces `target` (`swap_in`).

    On any exception the stage is removed and `target` is untouched, so `target` is never seen
    half-written: it is the old folder or the finished new one. A process killed while filling
    leaves only the hidden stage `.NAME.*` beside `target`. The stage starts with the file `marker`
    (which command wrote the folder; FOLDER_MARKER when `overwrite` names none; without either, none is
    written). Before anything is written, a `target` that exists and is not an empty folder is refused
    (ValueError, one line): always without `overwrite`, and with it unless it holds `marker`
    (`check_replaceable`), so --overwrite replaces only what the same command wrote.
    """
    target = Path(target)
    marker = marker or (FOLDER_MARKER if overwrite else None)
    check_replaceable(target, marker or FOLDER_MARKER, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        stage.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the result is ordinary data
        if marker is not None:
            (stage / marker).write_text(f"Written by pairuni; --overwrite replaces this folder only while {marker} "
                                        "is in it.\n")
        yield stage
        remove(swap_in(stage, target, target.parent / f".{target.name}.old-{os.getpid()}"))
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
