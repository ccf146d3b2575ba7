"""`validate_pairs` / `pairuni validate`: every bad input is reported, with its line, in one pass."""

from __future__ import annotations

import argparse
import json

import pytest

from engine.data.schema import MC_SUFFIX
from engine.data.validate import validate_pairs

QUESTION = f"What color is the circle?\nA. red\nB. blue\nC. green\n{MC_SUFFIX}"


def ann(image, **over):
    base = {"image_path": image, "prompt": "a red circle", "question": QUESTION, "answer": "A", "tag": "toy/color"}
    base.update(over)
    return base


def line(sim=0.7, u=None, g=None, **extra):
    return json.dumps({"similarity": sim, "generate_ann": g or ann("g.png"), "understand_ann": u or ann("u.png"), **extra})


def png(path):
    from PIL import Image

    Image.new("RGB", (4, 3), (200, 30, 30)).save(path)


@pytest.fixture
def root(tmp_path):
    for name in ("u.png", "g.png", "u2.png", "g2.png"):
        png(tmp_path / name)
    return tmp_path


def run(root, lines, **kw):
    path = root / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return validate_pairs(path, **kw)


def test_clean_file_is_ok(root):
    report = run(root, [line(), line(0.6, u=ann("u2.png"), g=ann("g2.png")), line(1.0, u=ann("u.png"), g=ann("u.png"))])
    assert report.ok and report.n_lines == 3 and report.n_valid == 3 and report.problems == []
    assert report.kinds == {"retrieved": 2, "aligned": 1}


BAD_LINES = {
    "malformed JSON": ('{"similarity": 0.7, "generate_ann": ', "", "malformed JSON"),
    "not an object": ("[1, 2]", "", "expected a JSON object"),
    "missing similarity": (json.dumps({"generate_ann": ann("g.png"), "understand_ann": ann("u2.png")}), "similarity",
                           "missing field"),
    "missing generate_ann": (json.dumps({"similarity": 0.7, "understand_ann": ann("u2.png")}), "generate_ann", "missing field"),
    "missing half field": (line(u=ann("u2.png"), g={k: v for k, v in ann("g2.png").items() if k != "tag"}),
                           "generate_ann.tag", "missing field"),
    "similarity above 1": (line(1.2, u=ann("u2.png")), "similarity", "outside [0, 1]"),
    "similarity below 0": (line(-0.1, u=ann("u2.png")), "similarity", "outside [0, 1]"),
    "similarity not a number": (line("0.7", u=ann("u2.png")), "similarity", "expected a number"),
    "similarity NaN": (f'{{"similarity": NaN, "generate_ann": {json.dumps(ann("g.png"))}, '
                       f'"understand_ann": {json.dumps(ann("u2.png"))}}}',
                       "similarity", "outside [0, 1]"),
    "empty question": (line(u=ann("u2.png", question="  ")), "understand_ann.question", "empty"),
    "empty answer": (line(u=ann("u2.png", answer="")), "understand_ann.answer", "empty"),
    "empty prompt": (line(g=ann("g2.png", prompt=""), u=ann("u2.png")), "generate_ann.prompt", "empty"),
    "non-string field": (line(u=ann("u2.png", question=7)), "understand_ann.question", "expected a string"),
    "missing understand image": (line(u=ann("nope/u.png")), "understand_ann.image_path", "image file not found"),
    "missing generate image": (line(g=ann("gone.png"), u=ann("u2.png")), "generate_ann.image_path", "image file not found"),
    "answer names no option": (line(u=ann("u2.png", answer="D")), "understand_ann.answer", "names no option"),
    "unknown kind": (line(u=ann("u2.png"), kind="random"), "kind", "expected one of"),
}


@pytest.mark.parametrize("name", sorted(BAD_LINES))
def test_each_bad_input_is_reported_with_its_line(root, name):
    bad, field, message = BAD_LINES[name]
    report = run(root, [line(), bad, line(0.9, u=ann("u.png"), g=ann("g2.png"))])
    assert not report.ok
    assert report.n_valid == 2
    assert [(p.line, p.field) for p in report.problems] == [(2, field)], report.problems
    assert message in report.problems[0].message


def test_duplicate_pair_points_at_first_occurrence(root):
    report = run(root, [line(), line(0.6, u=ann("u2.png")), line(0.95)])  # same halves as line 1, other similarity
    assert [(p.line, p.message) for p in report.problems] == [(3, "duplicate pair (same halves as line 1)")]


def test_all_problems_of_all_lines_in_one_pass(root):
    lines = [
        line(),                                                      # 1 ok
        "{oops",                                                     # 2 malformed
        line(2.0, u=ann("u2.png", question=""), g=ann("missing.png", prompt="")),  # 3: four problems
        line(),                                                      # 4 duplicate of 1
        "",                                                          # 5 blank: skipped, still counted as a line number
        json.dumps({"similarity": 0.5}),                             # 6 two missing halves
    ]
    report = run(root, lines)
    got = [(p.line, p.field) for p in report.problems]
    assert got == [(2, ""), (3, "similarity"), (3, "understand_ann.question"), (3, "generate_ann.prompt"),
                   (3, "generate_ann.image_path"), (4, ""), (6, "generate_ann"), (6, "understand_ann")]
    assert report.n_lines == 5 and report.n_valid == 1 and report.n_problems == 8


def test_image_checks_use_data_root_and_can_be_skipped(root, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    report = run(root, [line()], data_root=other)
    assert {p.field for p in report.problems} == {"understand_ann.image_path", "generate_ann.image_path"}
    assert run(root, [line()], data_root=other, check_images=False).ok
    png(other / "u.png")
    png(other / "g.png")
    assert run(root, [line()], data_root=other).ok


def test_keep_valid_and_problem_cap(root):
    out = root / "clean.jsonl"
    lines = [line(), "{bad", line(0.6, u=ann("u2.png")), line(3.0, u=ann("u2.png", answer=""))]
    report = run(root, lines, keep_valid=out, max_problems=1)
    assert report.n_problems == 3 and len(report.problems) == 1
    assert out.read_text().splitlines() == [lines[0], lines[2]]
    assert validate_pairs(out).ok


def test_empty_file_is_a_problem(root):
    for text in ("", "\n  \n"):
        path = root / "pairs.jsonl"
        path.write_text(text)
        report = validate_pairs(path)
        assert not report.ok and report.n_lines == 0
        assert report.problems[0].format(path) == f"{path}: no pairs: the file is empty"


def test_duplicate_source_ids_are_reported_by_line(root):
    lines = [line(u=ann("u.png", id="s1"), g=ann("g.png", id="s1")),   # the same id in both halves is fine
             line(u=ann("u2.png", id="s2"), g=ann("g2.png", id="t2")),
             line(0.5, u=ann("u.png", id="s1", question=QUESTION + " "), g=ann("g2.png", id="t3"))]
    report = run(root, lines)
    assert [(p.line, p.field) for p in report.problems] == [(3, "understand_ann.id")]
    assert "duplicate id \"s1\" (first used on line 1)" in report.problems[0].message


@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"])
def test_undecodable_images_are_reported_by_line(root, content):
    if content == "truncated":
        import io

        import numpy as np
        from PIL import Image

        noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(noise).save(buffer, format="PNG")
        content = buffer.getvalue()[: len(buffer.getvalue()) // 2]  # the header reads, the pixels do not
    (root / "bad.png").write_bytes(content)
    report = run(root, [line(), line(u=ann("bad.png"), g=ann("g2.png"))])
    assert [(p.line, p.field) for p in report.problems] == [(2, "understand_ann.image_path")]
    assert report.problems[0].message.startswith(f"not a readable image: {root / 'bad.png'}")
    assert run(root, [line(), line(u=ann("bad.png"), g=ann("g2.png"))], check_images=False).ok


def test_keep_valid_into_another_folder_keeps_images_resolvable(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("elsewhere") / "sub" / "clean.jsonl"
    absolute = str(root / "g2.png")
    report = run(root, [line(), line(0.6, u=ann("u2.png"), g=ann(absolute)), "{bad"], keep_valid=out)
    assert report.n_valid == 2
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    assert kept[1]["generate_ann"]["image_path"] == absolute  # absolute paths are left as they are
    assert not kept[0]["understand_ann"]["image_path"].startswith("/")
    assert validate_pairs(out).ok  # every image resolves from the new file's folder


def test_missing_file_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        validate_pairs(tmp_path / "absent.jsonl")


def _cli(argv):
    from engine.data.cli import register

    parser = argparse.ArgumentParser(prog="pairuni")
    register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_validate_prints_every_problem_and_sets_exit_code(root, capsys):
    path = root / "pairs.jsonl"
    path.write_text("\n".join([line(), "{x", line(1.5, u=ann("u2.png"))]) + "\n")
    assert _cli(["validate", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{path}:2: malformed JSON (Expecting property name enclosed in double quotes at column 2)"
    assert out[1] == f"{path}:3: similarity: 1.5 is outside [0, 1]"
    assert out[2].endswith("3 lines, 1 valid (1 retrieved): 2 problem(s)")

    assert _cli(["validate", str(path), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["n_problems"] == 2 and [p["line"] for p in data["problems"]] == [2, 3]

    path.write_text(line() + "\n")
    assert _cli(["validate", str(path)]) == 0
    assert capsys.readouterr().out.strip().endswith(": OK")
    assert _cli(["validate", str(root / "nothing.jsonl")]) == 2
