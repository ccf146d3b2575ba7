"""Streaming JSONL IO for PairUG pairs and source samples, with all-or-nothing writes.

Readers are generators: one line is parsed at a time, so a file of millions of lines never
sits in memory. Writers go through `engine.files.atomic_writer`: an exception or Ctrl-C half-way
leaves the old file (or no file) behind, never a truncated one.

Paths inside records (`image_path`) are relative to a data root, by default the folder that
holds the JSONL file; `resolve_image_path` turns them into real paths.

Lines are read as bytes and decoded one at a time: a line that is not UTF-8, or longer than
`MAX_LINE_BYTES`, is one problem naming the file and line (`iter_line_results`), and the lines
after it are still read. Images are opened through `open_rgb`: every decode problem (not an
image, truncated, over the pixel budget `max_image_pixels()`, a mode with no RGB meaning) is one
`ImageError` line naming the file, and every mode maps faithfully to 8-bit RGB.
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


#: Longest JSONL line read, in bytes (newline included). A PairUG line is a few KB; a longer one is
#: refused by number instead of being held in memory.
MAX_LINE_BYTES = 1 << 20


def iter_line_results(path: str | os.PathLike, *, max_bytes: int = MAX_LINE_BYTES
                      ) -> Iterator[tuple[int, str | None, str | None]]:
    """Yield `(line_number, text, None)` for every non-blank line, or `(line_number, None, problem)` for a
    line that is longer than `max_bytes` or not UTF-8; reading goes on after either. Line numbers start
    at 1 and count `\\n`-separated lines. Memory stays within `max_bytes` whatever the line length."""
    with open(path, "rb") as fh:
        number = 0
        while True:
            raw = fh.readline(max_bytes + 1)
            if not raw:
                return
            number += 1
            if len(raw) > max_bytes:
                size = len(raw)
                while not raw.endswith(b"\n"):  # skip the rest of the long line, a chunk at a time
                    raw = fh.readline(1 << 20)
                    if not raw:
                        break
                    size += len(raw)
                if size > max_bytes:
                    yield number, None, f"line of {size} bytes is longer than the limit of {max_bytes} bytes"
                    continue
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield number, None, (f"not UTF-8 text (byte 0x{raw[err.start]:02x} at byte {err.start + 1} of the "
                                     "line); save the file as UTF-8")
                continue
            yield number, text, None


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """Yield `(line_number, text)` for every non-blank line; line numbers start at 1.

    Raises ValueError `path:line: ...` at a line that is not UTF-8 or longer than MAX_LINE_BYTES."""
    for number, text, problem in iter_line_results(path):
        if problem is not None:
            raise ValueError(f"{path}:{number}: {problem}")
        yield number, text


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


# ----- images ------------------------------------------------------------------------------------------

#: Default pixel budget of one image (width x height): 2^28 = 268 M pixels, e.g. 16384 x 16384, far above
#: any training image, below the ~1 GB of RGB a decode would take. Override with PAIRUNI_MAX_IMAGE_PIXELS.
DEFAULT_MAX_IMAGE_PIXELS = 1 << 28
MAX_IMAGE_PIXELS_ENV = "PAIRUNI_MAX_IMAGE_PIXELS"
#: Modes whose alpha is composited over white (as transformers' `convert_to_rgb` does for Janus).
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})


class ImageError(ValueError):
    """An image file that cannot be used; the message is one line naming the file."""


def max_image_pixels() -> int:
    """The pixel budget: PAIRUNI_MAX_IMAGE_PIXELS when set (a positive integer), else DEFAULT_MAX_IMAGE_PIXELS."""
    raw = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ImageError(f"{MAX_IMAGE_PIXELS_ENV}: expected a positive integer, got {raw!r}")
    return value


def _to_rgb(im):
    """A decoded PIL image of any mode as 8-bit RGB, each value mapped faithfully:

    16-bit gray (I;16*) and 32-bit integer (I, as 16-bit PNGs open) scale 0..65535 -> 0..255 (rounded, so a
    16-bit file written as x * 257 gives back x exactly); float (F) takes [0, 1] when its values lie there,
    else [0, 255], clipped; 1-bit, palette, gray, CMYK, YCbCr, HSV through PIL's conversions; alpha
    (LA, PA, RGBA, or a palette / gray / RGB transparency) composited over white. Raises ImageError for a
    mode without such a mapping."""
    import numpy as np
    from PIL import Image

    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        wide = np.asarray(im).astype(np.int64)
        gray = ((np.clip(wide, 0, 65535) + 128) // 257).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0)
        scale = 255.0 if values.size and values.min() >= 0.0 and values.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return im
    if mode in ("1", "L", "P", "CMYK", "YCbCr", "HSV", "RGBX"):
        return im.convert("RGB")
    raise ImageError(f"image mode {mode!r} has no RGB mapping here")


def open_rgb(path: str | os.PathLike, *, max_pixels: int | None = None, data: bytes | None = None):
    """The image at `path` decoded to an 8-bit RGB PIL image (EXIF orientation applied, first frame);
    `data`, when given, holds the file's bytes already read (they are decoded; `path` only names them).
    The source format (PNG, JPEG, ...) is kept in the result's `.info["format"]`.

    Raises ImageError, one line naming the file, for a missing file, a file that is not an image or is
    truncated, an image over the pixel budget (`max_pixels`, default `max_image_pixels()`; checked from
    the header, before any pixel is decoded), or a mode without an RGB mapping (see `_to_rgb`)."""
    import io as _io

    from PIL import Image, ImageOps

    budget = max_image_pixels() if max_pixels is None else max_pixels
    # PIL's own check warns, then raises DecompressionBombError, at a fixed limit; the budget above (which
    # the user can set) replaces it, checked from the header before any pixel is decoded.
    Image.MAX_IMAGE_PIXELS = None
    path = Path(path)
    if data is None and not path.is_file():
        raise ImageError(f"image file not found: {path}")
    try:
        with Image.open(path if data is None else _io.BytesIO(data)) as im:
            if im.width * im.height > budget:
                raise ImageError(f"image {path} is {im.width}x{im.height} = {im.width * im.height:,} pixels, over "
                                 f"the budget of {budget:,} ({MAX_IMAGE_PIXELS_ENV} raises it)")
            im.load()  # decodes the pixels: a truncated file fails here
            rgb = _to_rgb(ImageOps.exif_transpose(im) if im.getexif().get(0x0112, 1) != 1 else im)
            if rgb is im:
                rgb = im.copy()
            rgb.info["format"] = im.format
            return rgb
    except ImageError as err:
        if str(path) in str(err):
            raise
        raise ImageError(f"image {path}: {err}") from None
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, struct.error, DecompressionBombError ...)
        detail = " ".join(str(err).split())[:200]
        raise ImageError(f"not a readable image: {path} ({type(err).__name__}: {detail})") from None

