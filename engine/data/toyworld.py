"""Toy world: a synthetic, fully known UG dataset of coloured shapes on a white canvas.

In the spirit of "Are Unified VLMs Necessary" (docs/PAIRUNI.md "A toy world"): every image is drawn from a
`Scene` with known attributes (colour, shape, count, position), so captions, questions and
answers are exact, and a reward can read the attributes back from pixels with
`describe_image` / `dominant_color`, using the same vocabulary constants (`COLORS`, `SHAPES`,
`POSITIONS`) the renderer used.

A scene holds `count` (1-4) copies of one shape in one colour, each centred in a different
cell of a 3 x 3 grid. Captions name colour, shape and count, plus the cell when there is
one object ("a red circle in the top left corner", "three blue squares"). Every sample is
a full quadruple (image, caption, multiple-choice question, letter answer).

Pairs. An aligned pair uses one scene for both halves (similarity 1). A retrieved pair joins a
generation scene with an understanding scene that differs in exactly one attribute; its
similarity is the known attribute overlap `scene_similarity` (colour 0.35, shape 0.35,
layout 0.3), so retrieved similarities are 0.65, 0.7 or 0.85, all at or above the paper's
delta = 0.6. Everything is a deterministic function of the seed.

Run: `pairuni toy-world --n 300 --out DIR [--seed 0]`.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..files import check_replaceable, staged_folder, write_json
from .io import write_pairs, write_samples
from .schema import Pair, Sample, format_multiple_choice

# Attribute vocabulary: the single source of truth for the renderer, the captions and the rewards.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 190),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# Cells of the 3 x 3 grid, row-major; index i is row i // 3, column i % 3.
POSITIONS: tuple[str, ...] = ("top left", "top", "top right", "left", "center", "right",
                              "bottom left", "bottom", "bottom right")
POSITION_PHRASES: dict[str, str] = {
    "top left": "in the top left corner", "top": "at the top", "top right": "in the top right corner",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left corner", "bottom": "at the bottom",
    "bottom right": "in the bottom right corner",
}
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
MAX_COUNT = 4
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "position")
# Weights of `scene_similarity`; they sum to 1.
SIMILARITY_WEIGHTS: dict[str, float] = {"color": 0.35, "shape": 0.35, "layout": 0.3}
# A pixel is foreground when max(R,G,B) - min(R,G,B) reaches this: every colour in COLORS
# does by a wide margin, white / grey / black backgrounds never do.
CHROMA_MIN = 60
DEFAULT_IMAGE_SIZE = 64
DEFAULT_ALIGNED_FRACTION = 1 / 3
TOYWORLD_VERSION = 1


@dataclass(frozen=True)
class Scene:
    """`count` objects of `shape` in `color`, one per grid cell listed in `cells` (indices into POSITIONS)."""

    color: str
    shape: str
    cells: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.color not in COLORS:
            raise ValueError(f"color: expected one of {list(COLORS)}, got {self.color!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape: expected one of {list(SHAPES)}, got {self.shape!r}")
        if not 1 <= len(self.cells) <= MAX_COUNT or len(set(self.cells)) != len(self.cells) \
                or any(not 0 <= c < len(POSITIONS) for c in self.cells):
            raise ValueError(f"cells: expected 1..{MAX_COUNT} distinct cells in [0, {len(POSITIONS)}), got {self.cells}")
        object.__setattr__(self, "cells", tuple(sorted(self.cells)))

    @property
    def count(self) -> int:
        return len(self.cells)

    @property
    def position(self) -> str | None:
        """The cell name of a single object; None when there are several."""
        return POSITIONS[self.cells[0]] if self.count == 1 else None

    def attributes(self) -> dict[str, Any]:
        """JSON-ready attributes; stored in each sample's `attributes` key for rewards and analysis."""
        return {"color": self.color, "shape": self.shape, "count": self.count,
                "positions": [POSITIONS[c] for c in self.cells]}


def random_scene(rng: np.random.Generator) -> Scene:
    """A uniformly drawn scene: colour, shape, count 1..MAX_COUNT, distinct cells."""
    count = int(rng.integers(1, MAX_COUNT + 1))
    cells = rng.choice(len(POSITIONS), size=count, replace=False)
    return Scene(color=str(rng.choice(list(COLORS))), shape=str(rng.choice(SHAPES)), cells=tuple(int(c) for c in cells))


def _plural(shape: str, count: int) -> str:
    return shape if count == 1 else shape + "s"


def caption_for(scene: Scene) -> str:
    """Exact caption: "a red circle in the top left corner" or "three blue squares"."""
    if scene.count == 1:
        return f"a {scene.color} {scene.shape} {POSITION_PHRASES[scene.position]}"
    return f"{COUNT_WORDS[scene.count]} {scene.color} {_plural(scene.shape, scene.count)}"


def parse_caption(caption: str) -> dict[str, Any]:
    """Attributes named by a toy-world caption (the inverse of `caption_for`).

    Returns {"color", "shape", "count", "position"}; a key is None when the caption does not
    say it (position is only said for one object). Works on free text too: the first colour,
    shape, count word and position phrase found win.
    """
    text = " " + " ".join(caption.lower().replace(",", " ").replace(".", " ").split()) + " "
    found: dict[str, Any] = {"color": None, "shape": None, "count": None, "position": None}

    def first(words):
        """The word of `words` that appears earliest in the caption, or None."""
        return min(((text.find(f" {w} "), w) for w in words if f" {w} " in text), default=(-1, None))[1]

    found["color"] = first(COLORS)
    shape = first([s for s in SHAPES] + [s + "s" for s in SHAPES])
    found["shape"] = shape if shape in SHAPES or shape is None else shape[:-1]  # plural: drop one "s"
    count_word = first(COUNT_WORDS[1:] + ("a", "an"))
    if count_word is not None:
        found["count"] = 1 if count_word in ("a", "an") else COUNT_WORDS.index(count_word)
    # Longest phrase first so "in the top left corner" is not read as "on the left".
    for name, phrase in sorted(POSITION_PHRASES.items(), key=lambda kv: -len(kv[1])):
        if f" {phrase} " in text:
            found["position"] = name
            break
    return found


def question_for(scene: Scene, qtype: str, rng: np.random.Generator) -> tuple[str, str]:
    """A 4-option multiple-choice question about one attribute, and its answer letter.

    qtype: one of QUESTION_TYPES; "position" needs a single object (ValueError otherwise).
    """
    if qtype == "color":
        stem = f"What color {'is the ' + scene.shape if scene.count == 1 else 'are the ' + _plural(scene.shape, 2)} in the image?"
        truth, pool = scene.color, list(COLORS)
    elif qtype == "shape":
        one = scene.count == 1
        stem = f"What shape {'is' if one else 'are'} the {scene.color} object{'' if one else 's'} in the image?"
        truth, pool = scene.shape, list(SHAPES)
    elif qtype == "count":
        stem = f"How many {scene.color} {_plural(scene.shape, 2)} are in the image?"
        truth, pool = str(scene.count), [str(c) for c in range(1, MAX_COUNT + 1)]
    elif qtype == "position":
        if scene.count != 1:
            raise ValueError(f"qtype: 'position' needs a scene with one object, this one has {scene.count}")
        stem = f"Where is the {scene.color} {scene.shape} in the image?"
        truth, pool = scene.position, list(POSITIONS)
    else:
        raise ValueError(f"qtype: expected one of {QUESTION_TYPES}, got {qtype!r}")
    distractors = [p for p in pool if p != truth]
    picked = [distractors[i] for i in rng.choice(len(distractors), size=3, replace=False)]
    options = picked + [truth]
    order = rng.permutation(len(options))
    options = [options[i] for i in order]
    return format_multiple_choice(stem, options), "ABCD"[options.index(truth)]


def render(scene: Scene, size: int = DEFAULT_IMAGE_SIZE, rng: np.random.Generator | None = None):
    """Draw `scene` as a `size` x `size` RGB PIL image (no anti-aliasing: every shape pixel is
    exactly `COLORS[scene.color]`). `rng` adds a jitter of up to 8% of a cell to each centre."""
    from PIL import Image, ImageDraw

    if size < 24:
        raise ValueError(f"size: expected at least 24 pixels, got {size}")
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = size / 3
    radius = 0.3 * cell
    fill = COLORS[scene.color]
    for c in scene.cells:
        jitter = rng.uniform(-0.08, 0.08, size=2) * cell if rng is not None else np.zeros(2)
        cx = (c % 3 + 0.5) * cell + jitter[0]
        cy = (c // 3 + 0.5) * cell + jitter[1]
        box = [cx - radius, cy - radius, cx + radius, cy + radius]
        if scene.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif scene.shape == "square":
            draw.rectangle(box, fill=fill)
        elif scene.shape == "triangle":
            draw.polygon([(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)], fill=fill)
        else:  # diamond
            draw.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=fill)
    return image


def _as_rgb_array(image) -> np.ndarray:
    """[H, W, 3] uint8 from a PIL image or an array ([H, W, 3] or [3, H, W]; uint8, or float in [0, 1])."""
    array = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = np.transpose(array, (1, 2, 0))
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"image: expected an RGB array of shape [H, W, 3] or [3, H, W], got {array.shape}")
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array.astype(np.float64) * (255.0 if array.max() <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
    return array


_PALETTE = np.array(list(COLORS.values()), dtype=np.int32)  # [C, 3]
_COLOR_NAMES = tuple(COLORS)


def _foreground(rgb: np.ndarray) -> np.ndarray:
    """[H, W] bool: pixels saturated enough to be a drawn colour."""
    rgb = rgb.astype(np.int32)
    return (rgb.max(axis=-1) - rgb.min(axis=-1)) >= CHROMA_MIN


def _nearest_color_index(pixels: np.ndarray) -> np.ndarray:
    """[K, 3] uint8 pixels -> [K] index into COLORS of the nearest colour (Euclidean RGB)."""
    d = ((pixels.astype(np.int32)[:, None, :] - _PALETTE[None, :, :]) ** 2).sum(-1)
    return d.argmin(axis=1)


def dominant_color(image, min_fraction: float = 0.002) -> str | None:
    """Name (a key of COLORS) of the most frequent non-background colour of `image`.

    image:        PIL image or RGB array ([H, W, 3] / [3, H, W]; uint8 or float in [0, 1]).
    min_fraction: below this share of saturated pixels the image counts as empty -> None.
    Each saturated pixel votes for its nearest colour in COLORS; white, grey and black never vote.
    """
    rgb = _as_rgb_array(image)
    mask = _foreground(rgb)
    if mask.sum() < max(1, min_fraction * mask.size):
        return None
    votes = np.bincount(_nearest_color_index(rgb[mask]), minlength=len(_COLOR_NAMES))
    return _COLOR_NAMES[int(votes.argmax())]


def classify_shape(mask: np.ndarray) -> str:
    """Shape name (from SHAPES) of one blob given as a 2-D bool mask.

    Fill ratio of the bounding box separates squares (~1), circles (~pi/4) and the two
    half-filling shapes; the row where the blob is widest separates triangles (apex up,
    widest at the bottom) from diamonds (widest in the middle).
    """
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("mask: empty")
    crop = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    fill = crop.mean()
    if fill > 0.9:
        return "square"
    if fill > 0.68:
        return "circle"
    widths = crop.sum(axis=1)
    widest = np.nonzero(widths == widths.max())[0].mean() / max(crop.shape[0] - 1, 1)
    return "triangle" if widest > 0.7 else "diamond"


def describe_image(image, min_area_fraction: float = 0.004) -> dict[str, Any]:
    """Read a toy-world scene back from pixels.

    Returns {"color": str | None, "shape": str | None, "count": int, "positions": [cell names]}:
    the dominant colour, the most common shape among blobs, the number of blobs (connected
    saturated regions of at least `min_area_fraction` of the image) and each blob's grid cell.
    """
    from scipy import ndimage

    rgb = _as_rgb_array(image)
    mask = _foreground(rgb)
    labels, _ = ndimage.label(mask)
    h, w = mask.shape
    blobs = []
    for index, slc in enumerate(ndimage.find_objects(labels), start=1):
        blob = labels[slc] == index
        if blob.sum() < min_area_fraction * h * w:
            continue
        ys, xs = np.nonzero(blob)
        cy, cx = ys.mean() + slc[0].start, xs.mean() + slc[1].start
        cell = min(int(cy * 3 / h), 2) * 3 + min(int(cx * 3 / w), 2)
        blobs.append((classify_shape(blob), cell))
    shapes = Counter(s for s, _ in blobs)
    return {"color": dominant_color(rgb), "shape": shapes.most_common(1)[0][0] if shapes else None,
            "count": len(blobs), "positions": sorted((POSITIONS[c] for _, c in blobs), key=POSITIONS.index)}


def scene_similarity(a: Scene, b: Scene) -> float:
    """Known relatedness of two scenes in [0, 1]: SIMILARITY_WEIGHTS-weighted attribute agreement.

    Layout agrees fully when count and cells match, half when only the count matches.
    """
    layout = 1.0 if a.cells == b.cells else 0.5 if a.count == b.count else 0.0
    w = SIMILARITY_WEIGHTS
    return round(w["color"] * (a.color == b.color) + w["shape"] * (a.shape == b.shape) + w["layout"] * layout, 6)


def related_scene(scene: Scene, rng: np.random.Generator, min_similarity: float) -> Scene:
    """A scene differing from `scene` in one attribute, with `min_similarity` <= similarity < 1.

    Raises ValueError when no single-attribute change can reach `min_similarity`.
    """
    edits = ["color", "shape", "cells", "count"]
    order = rng.permutation(len(edits))
    for i in order:
        edit = edits[i]
        if edit == "color":
            other = Scene(str(rng.choice([c for c in COLORS if c != scene.color])), scene.shape, scene.cells)
        elif edit == "shape":
            other = Scene(scene.color, str(rng.choice([s for s in SHAPES if s != scene.shape])), scene.cells)
        elif edit == "cells":
            while True:
                cells = tuple(int(c) for c in rng.choice(len(POSITIONS), size=scene.count, replace=False))
                if tuple(sorted(cells)) != scene.cells:
                    break
            other = Scene(scene.color, scene.shape, cells)
        else:
            count = int(rng.choice([c for c in range(1, MAX_COUNT + 1) if c != scene.count]))
            other = Scene(scene.color, scene.shape, tuple(int(c) for c in rng.choice(len(POSITIONS), size=count, replace=False)))
        if scene_similarity(scene, other) >= min_similarity:
            return other
    raise ValueError(f"min_similarity: {min_similarity} is above what a one-attribute change gives "
                     f"(at most {1 - SIMILARITY_WEIGHTS['layout'] / 2})")


def _sample(scene: Scene, image_path: str, source_id: str, rng: np.random.Generator) -> Sample:
    qtypes = QUESTION_TYPES if scene.count == 1 else tuple(q for q in QUESTION_TYPES if q != "position")
    qtype = str(rng.choice(qtypes))
    question, answer = question_for(scene, qtype, rng)
    return Sample(image_path=image_path, prompt=caption_for(scene), question=question, answer=answer,
                  tag=f"toy/{qtype}", source_id=source_id, meta={"attributes": scene.attributes()})


#: The file every toy-world folder holds: `overwrite` replaces only a folder that has it.
TOY_WORLD_MARKER = ".pairuni-toy-world"


def generate_toy_world(n: int, out: str | os.PathLike, *, seed: int = 0, size: int = DEFAULT_IMAGE_SIZE,
                       aligned_fraction: float = DEFAULT_ALIGNED_FRACTION, delta: float = 0.6,
                       overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write a toy world of `n` pairs into the folder `out` and return its stats.

    Layout of `out`: pairs.jsonl (PairUG, image paths relative to `out`), understand.jsonl and
    generate.jsonl (the source sets the pairs were drawn from; aligned quadruples alternate
    between them), stats.json, images/*.png ({a,u,g}_NNNNN.png) and the marker `.pairuni-toy-world`
    (TOY_WORLD_MARKER). The folder is built beside `out` and moved into place at the end, so a crash
    never leaves a half-written world. An existing non-empty folder is refused (ValueError, one line,
    nothing deleted) without `overwrite`, and with it unless it is a toy world (holds the marker).

    n: number of pairs (>= 1); round(n * aligned_fraction) of them are aligned.
    delta: lower bound on retrieved-pair similarity (at most 0.85, see `related_scene`).
    """
    from tqdm import tqdm

    if n < 1:
        raise ValueError(f"n: expected at least 1 pair, got {n}")
    if not 0.0 <= aligned_fraction <= 1.0:
        raise ValueError(f"aligned_fraction: expected a value in [0, 1], got {aligned_fraction}")
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise ValueError(f"out: {target} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    try:
        check_replaceable(target, TOY_WORLD_MARKER, overwrite=True)
    except ValueError as exc:  # not a toy world: overwrite deletes nothing it did not write
        raise ValueError(f"out: {exc}") from None
    with staged_folder(target, overwrite=True, marker=TOY_WORLD_MARKER) as stage:
        (stage / "images").mkdir()
        rng = np.random.default_rng(seed)
        n_aligned = round(n * aligned_fraction)
        pairs: list[Pair] = []
        understand: list[Sample] = []
        generate: list[Sample] = []

        def save(scene: Scene, name: str) -> str:
            render(scene, size, rng).save(stage / "images" / name, format="PNG", optimize=True)
            return f"images/{name}"

        for i in tqdm(range(n), desc="toy-world", unit="pair", disable=not progress):
            if i < n_aligned:
                scene = random_scene(rng)
                sample = _sample(scene, save(scene, f"a_{i:05d}.png"), f"toy-a-{i:05d}", rng)
                pairs.append(Pair("aligned", 1.0, understand=sample, generate=sample))
                (understand if i % 2 == 0 else generate).append(sample)
            else:
                g_scene = random_scene(rng)
                u_scene = related_scene(g_scene, rng, delta)
                g = _sample(g_scene, save(g_scene, f"g_{i:05d}.png"), f"toy-g-{i:05d}", rng)
                u = _sample(u_scene, save(u_scene, f"u_{i:05d}.png"), f"toy-u-{i:05d}", rng)
                pairs.append(Pair("retrieved", scene_similarity(g_scene, u_scene), understand=u, generate=g))
                understand.append(u)
                generate.append(g)

        write_pairs(stage / "pairs.jsonl", pairs)
        write_samples(stage / "understand.jsonl", understand)
        write_samples(stage / "generate.jsonl", generate)
        stats = toy_world_stats(pairs, seed=seed, size=size, delta=delta)
        write_json(stage / "stats.json", stats)
    return stats


def toy_world_stats(pairs: list[Pair], *, seed: int, size: int, delta: float) -> dict[str, Any]:
    retrieved = [p.similarity for p in pairs if not p.aligned]
    halves = [s for p in pairs for s in ((p.understand,) if p.aligned else (p.understand, p.generate))]
    return {
        "toyworld_version": TOYWORLD_VERSION, "seed": seed, "image_size": size, "delta": delta,
        "n_pairs": len(pairs), "n_aligned": len(pairs) - len(retrieved), "n_retrieved": len(retrieved),
        "n_images": len(halves),
        "retrieved_similarity": {f"{s:.2f}": c for s, c in sorted(Counter(retrieved).items())},
        "question_types": dict(sorted(Counter(s.tag for s in halves).items())),
        "colors": dict(sorted(Counter(s.meta["attributes"]["color"] for s in halves).items())),
        "shapes": dict(sorted(Counter(s.meta["attributes"]["shape"] for s in halves).items())),
        "counts": {str(k): v for k, v in sorted(Counter(s.meta["attributes"]["count"] for s in halves).items())},
    }
