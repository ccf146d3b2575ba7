"""Hostile and unusual data files: exact image decoding, the pixel budget, undecodable images, non-UTF-8 and
huge lines in `pairuni validate`, and pairs longer than the model's positions refused before it loads."""

from __future__ import annotations

import json
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from engine.config import ConfigError, load_config
from engine.data.cli import register
from engine.data.io import ImageError, iter_lines, open_rgb
from engine.data.schema import MC_SUFFIX
from engine.data.validate import validate_pairs
from engine.run_start import data_splits, position_budget
from engine.text import load_image


def write_png16(path, array: np.ndarray) -> None:
    """A 16-bit PNG written by hand (PIL writes none): gray [H, W], gray+alpha [H, W, 2], RGB, RGBA."""
    color_type = 0 if array.ndim == 2 else {2: 4, 3: 2, 4: 6}[array.shape[2]]
    height, width = array.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def bomb_png(path) -> None:
    """A 20000 x 20000 RGB PNG header over a few bytes of pixel data (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def rgb(path) -> np.ndarray:
    return np.asarray(open_rgb(path))


def over_white(values: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64) / 255
    return np.rint(values.astype(np.float64) * a + 255 * (1 - a)).astype(np.uint8)


def test_16_bit_and_other_modes_decode_like_their_8_bit_twins(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (6, 9), dtype=np.uint8)
    gray[0, 0], gray[0, 1] = 0, 255
    write_png16(tmp_path / "gray16.png", gray.astype(np.uint16) * 257)
    Image.fromarray(gray, "L").save(tmp_path / "gray8.png")
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I;16")
    twin = np.repeat(gray[..., None], 3, axis=2)
    assert np.array_equal(rgb(tmp_path / "gray16.png"), twin)  # not all white
    assert np.array_equal(rgb(tmp_path / "gray8.png"), twin)
    assert np.array_equal(load_image(tmp_path / "gray16.png", 16), load_image(tmp_path / "gray8.png", 16))

    Image.fromarray(gray.astype(np.int32) * 257, "I").save(tmp_path / "gray32.tif")  # 32-bit int holding 16-bit
    Image.fromarray(gray.astype(np.float32) / 255, "F").save(tmp_path / "float.tif")  # float in [0, 1]
    for name, mode in (("gray32.tif", "I"), ("float.tif", "F")):
        assert Image.open(tmp_path / name).mode == mode
        assert np.array_equal(rgb(tmp_path / name), twin), name

    colour = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    write_png16(tmp_path / "rgb16.png", colour.astype(np.uint16) * 257)
    assert np.array_equal(rgb(tmp_path / "rgb16.png"), colour)

    alpha = rng.integers(0, 256, (6, 9), dtype=np.uint8)
    write_png16(tmp_path / "la16.png", np.stack([gray, alpha], axis=2).astype(np.uint16) * 257)
    Image.fromarray(np.stack([gray, alpha], axis=2), "LA").save(tmp_path / "la8.png")
    expected = np.repeat(over_white(gray, alpha)[..., None], 3, axis=2)
    for name in ("la16.png", "la8.png"):
        assert np.abs(rgb(tmp_path / name).astype(int) - expected).max() <= 1, name  # composited over white

    Image.fromarray(colour).convert("CMYK").save(tmp_path / "cmyk.tif")
    assert Image.open(tmp_path / "cmyk.tif").mode == "CMYK"
    assert np.array_equal(rgb(tmp_path / "cmyk.tif"), colour)

    palette = Image.fromarray(colour).quantize(8)
    palette.save(tmp_path / "p.png")
    assert np.array_equal(rgb(tmp_path / "p.png"), np.asarray(palette.convert("RGB")))
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p_transparent.png", transparency=0)
    seen = rgb(tmp_path / "p_transparent.png")
    index = np.asarray(palette)
    assert (seen[index == 0] == 255).all() and np.array_equal(seen[index != 0], np.asarray(palette.convert("RGB"))[index != 0])

    bits = gray > 127
    Image.fromarray(bits).save(tmp_path / "bits.png")
    assert Image.open(tmp_path / "bits.png").mode == "1"
    assert np.array_equal(rgb(tmp_path / "bits.png"), np.repeat(np.where(bits, 255, 0)[..., None], 3, axis=2))


def test_pixel_budget_is_one_line_naming_the_file(tmp_path, monkeypatch):
    big = tmp_path / "bomb.png"  # no pixel of it is ever decoded: the budget is checked from the header
    bomb_png(big)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor PIL's DecompressionBombWarning
        with pytest.raises(ImageError, match=r"bomb\.png is 20000x20000 = 400,000,000 pixels, over the budget") as err:
            open_rgb(big)
    assert "\n" not in str(err.value)
    Image.new("RGB", (100, 100)).save(tmp_path / "small.png")
    open_rgb(tmp_path / "small.png")
    monkeypatch.setenv("PAIRUNI_MAX_IMAGE_PIXELS", "5000")
    with pytest.raises(ImageError, match="small.png is 100x100 = 10,000 pixels, over the budget of 5,000"):
        open_rgb(tmp_path / "small.png")


def pair_line(u_image="u.png", g_image="g.png", question=None, prompt="a red circle", uid="u", gid="g") -> str:
    question = question or f"What colour?\nA. red\nB. blue\n{MC_SUFFIX}"
    return json.dumps({"similarity": 0.9,
                       "understand_ann": {"image_path": u_image, "prompt": "", "question": question, "answer": "A",
                                         "tag": "", "id": uid},
                       "generate_ann": {"image_path": g_image, "prompt": prompt, "question": "", "answer": "",
                                        "tag": "", "id": gid, "attributes": {"color": "red", "shape": "circle"}}})


def test_validate_reports_every_decode_and_line_problem_with_its_line_and_goes_on(tmp_path, capsys):
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "g.png")
    Image.new("RGB", (8, 8), (10, 10, 200)).save(tmp_path / "u.png")
    good = (tmp_path / "u.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "key.png").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    bomb_png(tmp_path / "bomb.png")
    Image.new("RGB", (4, 4)).convert("LAB").save(tmp_path / "lab.tif")
    lines = [pair_line("truncated.png", uid="1", gid="1"), pair_line("key.png", uid="2", gid="2"),
             pair_line("bomb.png", uid="3", gid="3"), pair_line("lab.tif", uid="4", gid="4")]
    data = "\n".join(lines).encode() + b"\n" + pair_line(uid="5", gid="5").encode().replace(b"red", b"r\xe9d") + b"\n"
    huge = b'{"similarity": "' + b"x" * (25 << 20) + b'"}\n'  # 25 MB on one line
    data += huge + pair_line(uid="7", gid="7").encode() + b"\n"
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(data)
    report = validate_pairs(path)
    by_line = {p.line: p.message for p in report.problems}
    assert report.n_lines == 7 and report.n_valid == 1 and report.n_problems == 6, report.problems
    assert "not a readable image" in by_line[1] and "truncated.png" in by_line[1]
    assert "not a readable image" in by_line[2] and "key.png" in by_line[2]
    assert "20000x20000" in by_line[3] and "over the budget" in by_line[3]
    assert "mode 'LAB'" in by_line[4] and "lab.tif" in by_line[4]
    assert by_line[5].startswith("not UTF-8 text (byte 0xe9")
    assert by_line[6].startswith(f"line of {len(huge)} bytes is longer than the limit")
    with pytest.raises(ValueError, match=r"pairs\.jsonl:5: not UTF-8"):  # the training reader names the line too
        list(iter_lines(path))

    import argparse

    parser = argparse.ArgumentParser(prog="pairuni")
    register(parser.add_subparsers())
    args = parser.parse_args(["validate", str(path)])
    assert args.func(args) == 1
    out = capsys.readouterr()
    printed = out.out.strip().splitlines()
    assert len(printed) == 7 and "Traceback" not in out.out + out.err  # one line per problem, then the summary
    assert [line.split(":")[1] for line in printed[:6]] == ["1", "2", "3", "4", "5", "6"]
    assert all(len(line) < 600 for line in printed)


def long_pairs(tmp_path, words: int, where: str = "question"):
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "u.png")
    Image.new("RGB", (8, 8), (10, 10, 200)).save(tmp_path / "g.png")
    text = " ".join(["red"] * words)
    lines = [pair_line(uid=str(i), gid=str(i), prompt=f"a red circle {i}") for i in range(4)]
    if where == "question":
        lines.insert(2, pair_line(uid="x", gid="x", question=f"{text}?\nA. red\nB. blue\n{MC_SUFFIX}"))
    else:
        lines.insert(2, pair_line(uid="x", gid="x", prompt=text))
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("where", ["question", "prompt"])
def test_texts_longer_than_the_models_positions_are_refused_before_it_loads(tmp_path, tiny_overrides, no_model_loads,
                                                                            where):
    path = long_pairs(tmp_path, 10_000, where)
    cfg = load_config(None, tiny_overrides(path, tmp_path / "run", **{"data.max_pairs": "null",
                                                                      "data.pairs_per_step": 2}))
    half = "understand_ann" if where == "question" else "generate_ann"
    with pytest.raises(ConfigError, match=rf"pairs\.jsonl:3: pair #3: {half}: .* more than the model's 1024") as err:
        data_splits(cfg)
    assert "\n" not in str(err.value)
    fits = long_pairs(tmp_path, 900, where)  # 900 words + 16 image tokens + 4 answer tokens fit 1024
    assert len(data_splits(load_config(None, tiny_overrides(fits, tmp_path / "run", **{"data.max_pairs": "null",
                                                                                      "data.pairs_per_step": 2}))).train) == 5


def test_a_model_folders_positions_are_read_from_its_config(tmp_path, tiny_overrides):
    folder = tmp_path / "janus"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 64},
                                                    "vision_config": {"num_image_tokens": 16}}))
    path = long_pairs(tmp_path, 50)
    cfg = load_config(None, tiny_overrides(path, tmp_path / "run"))
    cfg.model.path = str(folder)
    budget = position_budget(cfg)
    assert (budget.positions, budget.image_tokens, budget.how) == (64, 16, "at least one token per word")
    assert budget.count("a few  words here") == 4
    (folder / "toy_tokenizer.json").write_text("[]")
    assert position_budget(cfg).count("red, blue.") == 4  # the toy tokenizer counts punctuation too
    cfg.model.path = str(tmp_path)  # not a model folder (no config.json): nothing to check against
    assert position_budget(cfg) is None
