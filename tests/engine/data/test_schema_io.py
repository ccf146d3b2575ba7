"""PairUG schema and streaming IO: round trips, kind inference, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.data.io import (
    iter_pairs,
    iter_samples,
    read_pairs,
    relocate_image_path,
    write_pairs,
    write_samples,
)
from engine.data.schema import (
    MC_SUFFIX,
    Pair,
    Sample,
    format_multiple_choice,
    parse_multiple_choice,
)
from engine.files import atomic_writer


def _ann(image, prompt="a red circle", question="What color?\nA. red\nB. blue\n" + MC_SUFFIX, answer="A", tag="t", **extra):
    return {"image_path": image, "prompt": prompt, "question": question, "answer": answer, "tag": tag, **extra}


def test_pairug_round_trip_keeps_every_key(tmp_path):
    lines = [
        {"similarity": 0.71, "generate_ann": _ann("g/1.png", tag="gen", note={"x": [1, 2]}),
         "understand_ann": _ann("u/1.png", answer="B", id="u-1"), "source": "pairug-v1"},
        {"similarity": 1, "kind": "aligned", "generate_ann": _ann("a.png"), "understand_ann": _ann("a.png")},
        {"similarity": 0.0, "generate_ann": _ann("same.png", prompt="üñí ✓"), "understand_ann": _ann("same.png")},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")  # trailing blank line is allowed
    pairs = read_pairs(src)
    assert [p.kind for p in pairs] == ["retrieved", "aligned", "aligned"]  # last: inferred from the shared image
    assert pairs[0].understand.source_id == "u-1" and pairs[0].understand.answer == "B"
    assert pairs[0].generate.meta == {"note": {"x": [1, 2]}} and pairs[0].extra == {"source": "pairug-v1"}
    assert pairs[2].generate.prompt == "üñí ✓"

    out = tmp_path / "out.jsonl"
    assert write_pairs(out, pairs) == 3
    back = [json.loads(x) for x in out.read_text().splitlines()]
    for original, written in zip(lines, back):
        expected = dict(original)
        expected.setdefault("kind", written["kind"])
        expected["similarity"] = float(expected["similarity"])
        assert written == expected
    assert read_pairs(out) == pairs


def test_iter_pairs_streams_and_names_the_bad_line(tmp_path):
    good = json.dumps({"similarity": 0.7, "generate_ann": _ann("g.png"), "understand_ann": _ann("u.png")})
    path = tmp_path / "p.jsonl"
    path.write_text(f"{good}\n{good}\n{{not json\n")
    stream = iter_pairs(path)
    assert next(stream).similarity == 0.7  # lines before the bad one come out: nothing is read ahead
    assert next(stream).generate.image_path == "g.png"
    with pytest.raises(ValueError, match=r"p\.jsonl:3: malformed JSON"):
        next(stream)


@pytest.mark.parametrize("record, message", [
    ({"similarity": 1.5, "generate_ann": _ann("g"), "understand_ann": _ann("u")}, r"similarity.*\[0, 1\]"),
    ({"similarity": True, "generate_ann": _ann("g"), "understand_ann": _ann("u")}, "similarity"),
    ({"generate_ann": _ann("g"), "understand_ann": _ann("u")}, "missing field 'similarity'"),
    ({"similarity": 0.5, "generate_ann": {"prompt": "x"}, "understand_ann": _ann("u")},
     r"generate_ann: missing field 'image_path'"),
    ({"similarity": 0.5, "generate_ann": _ann("g", prompt=3), "understand_ann": _ann("u")},
     r"generate_ann\.prompt: expected a string"),
    ({"similarity": 0.5, "kind": "random", "generate_ann": _ann("g"), "understand_ann": _ann("u")}, "kind"),
])
def test_pair_from_record_rejects_bad_records(record, message):
    with pytest.raises(ValueError, match=message):
        Pair.from_record(record, where="f.jsonl:7")


def test_samples_round_trip(tmp_path):
    samples = [Sample("a.png", prompt="p"), Sample("b.png", question="q", answer="C", source_id="7", meta={"k": 1})]
    path = tmp_path / "s.jsonl"
    write_samples(path, samples)
    assert list(iter_samples(path)) == samples
    assert samples[1].has_qa and not samples[1].has_caption and not samples[1].is_complete
    assert Sample("a.png", prompt="p", question="q", answer="A").is_complete


def test_atomic_writer_survives_kill_9_mid_write(tmp_path):
    """SIGKILL between the first bytes and the rename (no cleanup runs): the old file is intact and whole."""
    import subprocess
    import sys

    path = tmp_path / "result.md"
    path.write_text("old complete table\n")
    child = (
        "import os, signal, sys\n"
        "from engine.files import atomic_writer\n"
        "with atomic_writer(sys.argv[1]) as fh:\n"
        "    fh.write('new half-written tab'); fh.flush(); os.fsync(fh.fileno())\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", child, str(path)], cwd=Path(__file__).resolve().parents[3])
    assert proc.returncode == -9
    assert path.read_text() == "old complete table\n"


def test_atomic_writer_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("old\n")

    def records():
        yield {"similarity": 0.9}
        raise KeyboardInterrupt  # Ctrl-C half-way through

    from engine.data.io import write_jsonl

    with pytest.raises(KeyboardInterrupt):
        write_jsonl(path, records())
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]  # no temp file left behind

    with atomic_writer(tmp_path / "new" / "x.bin", "wb") as fh:
        fh.write(b"ok")
        assert not (tmp_path / "new" / "x.bin").exists()  # invisible until complete
    assert (tmp_path / "new" / "x.bin").read_bytes() == b"ok"


def test_multiple_choice_format_round_trip():
    text = format_multiple_choice("What shape?", ["circle", "square", "triangle"])
    assert text == f"What shape?\nA. circle\nB. square\nC. triangle\n{MC_SUFFIX}"
    assert parse_multiple_choice(text) == ("What shape?", ["circle", "square", "triangle"])
    assert parse_multiple_choice("Describe the image.") == ("Describe the image.", [])
    with pytest.raises(ValueError, match="repeated"):
        format_multiple_choice("Q", ["a", "A"])
    with pytest.raises(ValueError, match="2.."):
        format_multiple_choice("Q", ["a"])


def test_relocate_image_path(tmp_path):
    (tmp_path / "src" / "img").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    assert relocate_image_path("img/a.png", tmp_path / "src", tmp_path / "out") == "../src/img/a.png"
    assert relocate_image_path("img/a.png", tmp_path / "src", tmp_path / "src") == "img/a.png"
    absolute = str(tmp_path / "elsewhere.png")
    assert relocate_image_path(absolute, tmp_path / "src", tmp_path / "out") == "../elsewhere.png"


def test_atomic_writer_honours_the_umask(tmp_path):
    import os
    import stat

    from engine.files import atomic_writer

    old = os.umask(0o002)
    try:
        with atomic_writer(tmp_path / "shared.txt") as fh:
            fh.write("x")
        os.umask(0o077)
        with atomic_writer(tmp_path / "private.bin", "wb") as fh:
            fh.write(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "shared.txt").stat().st_mode) == 0o664
    assert stat.S_IMODE((tmp_path / "private.bin").stat().st_mode) == 0o600
