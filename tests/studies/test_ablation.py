"""studies/toyworld/ablation_toyworld.py: its re-pairing, and its --quick mode end to end (so the study keeps working)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parents[2] / "studies" / "toyworld"


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("ablation_toyworld", STUDY / "ablation_toyworld.py")
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
    assert ablation.main(["--quick", "--jobs", "2", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads((out / "ablation_toyworld.json").read_text())
    assert "2 processes" in result["meta"]["machine"]  # the runs went through the process pool
    assert [r["variant"] for r in result["runs"]] == list(ablation.QUICK_VARIANTS)
    assert set(result["table"]) == {ablation.START, *ablation.QUICK_VARIANTS}
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
    # the paired comparisons: each run minus its own seed's start, and minus PairUni's arm of the same seed
    start = result["initial"][0]
    for r in result["runs"]:
        got = result["table"][r["variant"]]["delta/held_out/generation_reward"]["mean"]
        assert got == pytest.approx(r["end"]["generation_reward"] - start["start"]["generation_reward"])
    vs = result["table"]["random pairs"]["vs_pairuni/seen/generation_reward"]
    assert (a["variant"], b["variant"]) == ("random pairs", ablation.PAIRUNI)
    assert vs["mean"] == pytest.approx(a["end_seen"]["generation_reward"] - b["end_seen"]["generation_reward"])


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


def test_transfer_split_keeps_the_colour_out_of_every_understanding_half(ablation, tmp_path):
    import dataclasses

    from engine.data.io import read_pairs
    from engine.data.toyworld import scene_similarity

    for open_questions in (True, False):
        s = ablation.StudySettings(n_train=40, n_eval=20, n_pretrain=60, seeds=(0,), transfer="purple",
                                   open_questions=open_questions)
        files = ablation.build_world(tmp_path / str(open_questions), s)
        world = files["built"].parent
        plain = ablation.build_world(tmp_path / f"plain_{open_questions}", dataclasses.replace(s, transfer=None))
        for key, n in (("built", 40), ("eval", 20), ("pretrain", 60), ("repaired_0", 40)):
            pairs, before = read_pairs(files[key]), read_pairs(plain[key])
            assert len(pairs) == n and not any(ablation.involves(p.understand, "purple") for p in pairs), key
            # generation halves are untouched; an understanding half changes only when it showed or named purple
            assert [p.generate for p in pairs] == [p.generate for p in before]
            changed = [(p, b) for p, b in zip(pairs, before) if p.understand != b.understand]
            assert all(ablation.involves(b.understand, "purple") for _, b in changed)
            if key in ("built", "pretrain"):
                assert changed
            for p, b in changed:
                assert p.kind == "retrieved" and (world / p.understand.image_path).is_file()
                assert p.similarity == scene_similarity(ablation.scene_of(p.generate), ablation.scene_of(p.understand))
                assert ablation.scene_of(p.understand).shape == ablation.scene_of(b.understand).shape
        generated = [p.generate.meta["attributes"]["color"] for key in ("built", "pretrain") for p in read_pairs(files[key])]
        assert generated.count("purple") >= len(generated) // 12  # the concept keeps its share of generation data
        concept = read_pairs(files["transfer_concept"])
        control = read_pairs(files["transfer_control"])
        assert concept and control
        assert all(p.understand.answer == "purple" and p.understand.question.startswith("What color") for p in concept)
        assert all(p.understand.answer != "purple" and p.understand.answer == p.understand.meta["attributes"]["color"]
                   for p in control)
    with pytest.raises(ValueError, match="transfer"):
        ablation.build_world(tmp_path / "bad", ablation.StudySettings(n_train=8, n_eval=4, n_pretrain=20, seeds=(0,),
                                                                     transfer="magenta"))


@pytest.mark.slow
def test_quick_transfer_study_reports_the_concept_scores(ablation, tmp_path):
    out = tmp_path / "out"
    assert ablation.main(["--quick", "--transfer", "purple", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads((out / "ablation_transfer.json").read_text())
    assert set(result["transfer"]) == {ablation.START, ablation.CONTROL, *ablation.QUICK_VARIANTS}
    gap = result["transfer"][ablation.START]["lift_minus_control"]
    assert gap["mean"] == pytest.approx(result["initial"][0]["transfer_start"]["lift"]
                                        - result["control"][0]["transfer_start"]["lift"])
    for run in [*result["runs"], *result["initial"], *result["control"]]:
        scores = run.get("transfer_end") or run["transfer_start"]
        assert 0.0 <= scores["concept_accuracy"] <= 1.0 and 0.0 <= scores["control_accuracy"] <= 1.0
        assert math.isfinite(scores["lift"]) and scores["logp_concept"] < 0
    assert "Transfer test" in (out / "ablation_transfer.md").read_text()
    assert not (out / "ablation_toyworld.json").exists()  # the main study's results are not overwritten


@pytest.mark.slow
def test_every_run_gets_one_thread_whatever_jobs_says(ablation):
    """1 and 2 CPU threads round reductions differently and sampled tokens follow them: --jobs must not change
    the numbers, so every call runs on one thread, in this process or in a worker, and the caller's count
    comes back."""
    import torch

    before = torch.get_num_threads()
    calls = [((), {})] * 3
    assert ablation.parallel_map(torch.get_num_threads, calls, 1) == [1, 1, 1]
    assert torch.get_num_threads() == before
    assert ablation.parallel_map(torch.get_num_threads, calls, 2) == [1, 1, 1]


@pytest.mark.parametrize("argv, message", [
    (["--transfer", "magenta"], "--transfer: expected a toy-world colour"),
    (["--seeds", "0"], "--seeds: expected an integer >= 1"),
    (["--jobs", "0"], "--jobs: expected an integer >= 1"),
    (["--set", "optim.lr=-1"], "optim.lr"),
    (["--set", "optim.nonsense=1"], "optim.nonsense"),
])
def test_bad_arguments_get_one_line_before_any_work(ablation, tmp_path, capsys, argv, message):
    work = tmp_path / "work"
    try:
        code = ablation.main([*argv, "--quick", "--work", str(work), "--out", ""])
    except SystemExit as exc:  # argparse's error: usage + one line
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and "Traceback" not in "\n".join(err)
    assert not work.exists()  # nothing built, no model loaded
