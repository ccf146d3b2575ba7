"""benchmarks/ablation_toyworld.py: its re-pairing, and its --quick mode end to end (so the study keeps working)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("ablation_toyworld", ROOT / "benchmarks" / "ablation_toyworld.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_repairing_moves_every_generation_half_and_keeps_real_similarities(ablation, tmp_path):
    from engine.data.io import read_pairs
    from engine.data.toyworld import generate_toy_world, scene_similarity

    generate_toy_world(12, tmp_path / "w", seed=3, size=32, progress=False)
    pairs = read_pairs(tmp_path / "w" / "pairs.jsonl")
    out = ablation.repaired(pairs, seed=5)
    assert [p.understand for p in out] == [p.understand for p in pairs]  # same understanding halves, same order
    assert sorted(p.generate.source_id for p in out) == sorted(p.generate.source_id for p in pairs)  # a permutation
    assert all(o.generate.source_id != p.generate.source_id for o, p in zip(out, pairs))  # nobody keeps its own
    for o in out:
        assert o.kind == "retrieved"
        assert o.similarity == scene_similarity(ablation.scene_of(o.generate), ablation.scene_of(o.understand))
    assert any(o.similarity < 0.6 for o in out)  # random partners are mostly less related than built ones
    assert [p.generate.source_id for p in ablation.repaired(pairs, seed=5)] == [p.generate.source_id for p in out]


@pytest.mark.slow
def test_quick_study_writes_its_table_json_and_plot(ablation, tmp_path):
    out = tmp_path / "out"
    assert ablation.main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads((out / "ablation_toyworld.json").read_text())
    assert [r["variant"] for r in result["runs"]] == list(ablation.QUICK_VARIANTS)
    assert set(result["table"]) == {"(untrained)", *ablation.QUICK_VARIANTS}
    for r in result["runs"]:
        for where in ("end", "end_seen"):
            for key in ("understanding_accuracy", "generation_reward", "attribute_score"):
                assert 0.0 <= r[where][key] <= 1.0
        assert all(v is None or -1.0 <= v <= 1.0 for v in r["probe_end"].values())
    # the two variants trained on different pairs: their policies (and so their evaluations) differ
    a, b = result["runs"]
    assert a["end_seen"] != b["end_seen"] or a["end"] != b["end"]
    md = (out / "ablation_toyworld.md").read_text()
    assert all(name in md for name in ablation.QUICK_VARIANTS)
    assert (out / "ablation_toyworld.png").stat().st_size > 1000
    assert math.isfinite(result["meta"]["wall_min"])


def test_open_questions_drop_the_options_and_answer_with_the_attribute(ablation, tmp_path):
    from engine.data.io import read_pairs
    from engine.data.toyworld import generate_toy_world
    from engine.rewards import answer_accuracy

    generate_toy_world(20, tmp_path / "w", seed=4, size=32, progress=False)
    pairs = read_pairs(tmp_path / "w" / "pairs.jsonl")
    for p, o in zip(pairs, ablation.with_open_questions(pairs)):
        q, a = o.understand.question, o.understand.answer
        assert "\n" not in q and q == p.understand.question.split("\n")[0]
        # the open answer is the option the letter pointed at
        options = dict(line.split(". ", 1) for line in p.understand.question.split("\n")[1:5])
        assert options[p.understand.answer] == a
        assert answer_accuracy(a, a) == 1.0 and answer_accuracy(p.understand.answer, a) == 0.0
        assert o.generate == p.generate
    # the answer-prior baseline: perfect on a set where every question kind has one answer, below 1 otherwise
    opened = ablation.with_open_questions(pairs)
    assert 0.0 < ablation.answer_prior(opened, opened) < 1.0
