"""Toy world: deterministic generation, exact captions/answers, pixels that read back as their attributes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from engine.data import DEFAULT_TOYWORLD_ARGS, default_data_root, default_pairs_path
from engine.data.io import read_pairs, resolve_image_path
from engine.data.schema import MC_SUFFIX, OPTION_LETTERS, parse_multiple_choice
from engine.data.toyworld import (
    COLORS,
    POSITIONS,
    SHAPES,
    Scene,
    caption_for,
    classify_shape,
    describe_image,
    dominant_color,
    generate_toy_world,
    parse_caption,
    question_for,
    random_scene,
    related_scene,
    render,
    scene_similarity,
)
from engine.data.validate import validate_pairs


def test_colors_are_far_apart_and_saturated():
    names = list(COLORS)
    rgb = np.array([COLORS[n] for n in names], dtype=float)
    distances = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(len(names)) * 1e9
    assert distances.min() > 60
    assert (rgb.max(1) - rgb.min(1)).min() >= 120  # well above CHROMA_MIN: never mistaken for background


@pytest.mark.parametrize("size", [32, 64, 384])
def test_render_then_describe_recovers_every_attribute(size):
    rng = np.random.default_rng(size)
    for _ in range(60 if size < 100 else 12):
        scene = random_scene(rng)
        got = describe_image(render(scene, size, rng))
        assert got == scene.attributes(), (size, scene)


def test_dominant_color_accepts_arrays_and_ignores_background():
    scene = Scene("purple", "square", (0, 8))
    image = np.asarray(render(scene))
    assert dominant_color(image) == "purple"
    assert dominant_color(image.astype(np.float32) / 255.0) == "purple"  # float in [0, 1]
    assert dominant_color(np.transpose(image, (2, 0, 1))) == "purple"     # [3, H, W]
    noisy = np.clip(image.astype(int) + np.random.default_rng(0).integers(-25, 26, image.shape), 0, 255).astype(np.uint8)
    assert dominant_color(noisy) == "purple"
    grey = np.full((64, 64, 3), 128, np.uint8)
    grey[:8, :8] = 0
    assert dominant_color(grey) is None
    with pytest.raises(ValueError, match="RGB"):
        dominant_color(np.zeros((4, 4)))


def test_classify_shape_on_large_masks():
    for shape in SHAPES:
        image = np.asarray(render(Scene("blue", shape, (4,)), 300))
        mask = (image.max(-1).astype(int) - image.min(-1)) > 60
        assert classify_shape(mask) == shape


def test_caption_round_trip_and_free_text():
    for shape in SHAPES:
        for cells in ((0,), (4,), (8,), (1, 2), (0, 3, 5, 7)):
            scene = Scene("green", shape, cells)
            parsed = parse_caption(caption_for(scene))
            assert parsed == {"color": "green", "shape": shape, "count": scene.count, "position": scene.position}
    assert parse_caption("Two ORANGE triangles, drawn on white.") == {"color": "orange", "shape": "triangle",
                                                                      "count": 2, "position": None}
    assert parse_caption("a yellow diamond in the bottom left corner")["position"] == "bottom left"
    assert parse_caption("a yellow diamond on the left")["position"] == "left"


def test_questions_have_four_options_and_the_right_letter():
    rng = np.random.default_rng(3)
    scene = Scene("red", "triangle", (2,))
    truths = {"color": "red", "shape": "triangle", "count": "1", "position": "top right"}
    for qtype, truth in truths.items():
        question, answer = question_for(scene, qtype, rng)
        _, options = parse_multiple_choice(question)
        assert question.endswith(MC_SUFFIX) and len(options) == 4 and len(set(options)) == 4
        assert options[OPTION_LETTERS.index(answer)] == truth
    with pytest.raises(ValueError, match="one object"):
        question_for(Scene("red", "circle", (0, 1)), "position", rng)
    with pytest.raises(ValueError, match="qtype"):
        question_for(scene, "size", rng)


def test_scene_similarity_and_related_scenes():
    a = Scene("red", "circle", (4,))
    assert scene_similarity(a, a) == 1.0
    assert scene_similarity(a, Scene("blue", "circle", (4,))) == 0.65
    assert scene_similarity(a, Scene("red", "circle", (0,))) == 0.85
    assert scene_similarity(a, Scene("red", "circle", (0, 1))) == 0.7
    assert scene_similarity(a, Scene("blue", "square", (0, 1))) == 0.0
    rng = np.random.default_rng(0)
    for _ in range(200):
        s = random_scene(rng)
        r = related_scene(s, rng, 0.6)
        assert 0.6 <= scene_similarity(s, r) < 1.0
    with pytest.raises(ValueError, match="min_similarity"):
        related_scene(a, rng, 0.9)
    with pytest.raises(ValueError, match="color"):
        Scene("pink", "circle", (0,))
    with pytest.raises(ValueError, match="cells"):
        Scene("red", "circle", (0, 0))


def test_generation_is_deterministic_and_valid(tmp_path):
    a = generate_toy_world(12, tmp_path / "a", seed=5, progress=False)
    generate_toy_world(12, tmp_path / "b", seed=5, progress=False)
    generate_toy_world(12, tmp_path / "c", seed=6, progress=False)
    for name in ("pairs.jsonl", "understand.jsonl", "generate.jsonl", "stats.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "pairs.jsonl").read_bytes() != (tmp_path / "c" / "pairs.jsonl").read_bytes()
    assert a["n_pairs"] == 12 and a["n_aligned"] == 4 and a["n_retrieved"] == 8
    assert validate_pairs(tmp_path / "a" / "pairs.jsonl").ok
    with pytest.raises(ValueError, match="not empty"):
        generate_toy_world(3, tmp_path / "a", progress=False)
    generate_toy_world(3, tmp_path / "a", overwrite=True, progress=False)
    assert len(read_pairs(tmp_path / "a" / "pairs.jsonl")) == 3
    assert len(list((tmp_path / "a" / "images").iterdir())) == 1 + 2 * 2  # old images are gone
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folders left


def test_bundled_world_matches_a_fresh_generation(tmp_path):
    bundled = default_data_root()
    assert default_pairs_path() == bundled / "pairs.jsonl"
    fresh = tmp_path / "fresh"
    generate_toy_world(DEFAULT_TOYWORLD_ARGS["n"], fresh, seed=DEFAULT_TOYWORLD_ARGS["seed"], progress=False)
    for name in ("pairs.jsonl", "understand.jsonl", "generate.jsonl", "stats.json"):
        assert (bundled / name).read_text() == (fresh / name).read_text(), name
    bundled_images = sorted(p.name for p in (bundled / "images").iterdir())
    assert bundled_images == sorted(p.name for p in (fresh / "images").iterdir())
    for name in bundled_images[::25]:
        assert np.array_equal(np.asarray(Image.open(bundled / "images" / name)), np.asarray(Image.open(fresh / "images" / name)))
    total = sum(p.stat().st_size for p in bundled.rglob("*") if p.is_file())
    assert total < 5 * 2**20


def test_bundled_pairs_are_consistent_with_their_pixels():
    report = validate_pairs(default_pairs_path())
    assert report.ok, report.problems[:3]
    assert report.n_lines == DEFAULT_TOYWORLD_ARGS["n"] and set(report.kinds) == {"aligned", "retrieved"}
    stats = json.loads((default_data_root() / "stats.json").read_text())
    assert stats["n_pairs"] == report.n_lines
    for pair in read_pairs(default_pairs_path()):
        if pair.aligned:
            assert pair.similarity == 1.0 and pair.understand == pair.generate
        else:
            assert 0.6 <= pair.similarity < 1.0
        for half in (pair.understand, pair.generate):
            attrs = half.meta["attributes"]
            pixels = describe_image(Image.open(resolve_image_path(half.image_path, default_data_root())))
            assert pixels == attrs
            assert parse_caption(half.prompt)["color"] == attrs["color"]
            _, options = parse_multiple_choice(half.question)
            truth = {"color": attrs["color"], "shape": attrs["shape"], "count": str(attrs["count"]),
                     "position": attrs["positions"][0]}[half.tag.split("/")[1]]
            assert options[OPTION_LETTERS.index(half.answer)] == truth
        assert all(p in POSITIONS for p in pair.generate.meta["attributes"]["positions"])


def test_toy_world_overwrite_replaces_only_a_toy_world(tmp_path, capsys):
    """`pairuni toy-world --overwrite` replaces a folder it wrote (its .pairuni-toy-world marker, also in the
    bundled world, so the documented regeneration works) and refuses any other in one line, deleting nothing."""
    from engine.cli import main
    from engine.data.toyworld import TOY_WORLD_MARKER

    assert (default_data_root() / TOY_WORLD_MARKER).is_file()
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("private")
    (home / "thesis.tex").write_text("\\documentclass{book}")
    before = sorted((p.relative_to(home), p.read_bytes() if p.is_file() else None) for p in home.rglob("*"))
    assert main(["toy-world", "--n", "2", "--size", "32", "--out", str(home), "--overwrite", "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{home} exists and was not written by this command (no {TOY_WORLD_MARKER}" in err, err
    with pytest.raises(ValueError, match="nothing was deleted"):
        generate_toy_world(2, home, size=32, overwrite=True, progress=False)
    assert sorted((p.relative_to(home), p.read_bytes() if p.is_file() else None) for p in home.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]
    world = tmp_path / "world"
    assert main(["toy-world", "--n", "3", "--size", "32", "--out", str(world), "--quiet"]) == 0
    assert (world / TOY_WORLD_MARKER).is_file()
    assert main(["toy-world", "--n", "2", "--size", "32", "--out", str(world), "--overwrite", "--quiet"]) == 0
    assert len(read_pairs(world / "pairs.jsonl")) == 2 and (world / TOY_WORLD_MARKER).is_file()
