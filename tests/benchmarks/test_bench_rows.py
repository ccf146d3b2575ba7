"""The benchmark suites keep what they measured: run_all writes a suite's JSON after every row (a suite
that raises leaves its rows and the error), and a baseline that raises is a row saying so while the
suite goes on (transformers' image `generate` in the rollout suite).
"""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import run_all  # noqa: E402

FAKE_SUITE = """
def collect(device, quick, rows=None):
    rows = [] if rows is None else rows
    rows.append({"case": "a", "impl": "x", "ms": 1.0})
    rows.append({"case": "b", "impl": "x", "ms": 2.0})
    raise RuntimeError("died after two rows")
"""


def test_a_suite_that_raises_keeps_its_rows_and_the_error(tmp_path, monkeypatch):
    suite = tmp_path / "bench_fake.py"
    suite.write_text(FAKE_SUITE)
    seen = []
    original = run_all.atomic_write

    def spy(path, data):  # every write of the JSON, as it happens
        if str(path).endswith(".json"):
            seen.append(len(json.loads(data)["rows"]))
        original(path, data)

    monkeypatch.setattr(run_all, "atomic_write", spy)
    with pytest.raises(RuntimeError, match="died after two rows"):
        run_all.run_suite(suite, "cpu", True, tmp_path, "_cpu", None)
    assert seen == [0, 1, 2, 2]  # before the first row, after each row, with the error
    data = json.loads((tmp_path / "fake_cpu.json").read_text())
    assert data["complete"] is False and data["error"] == "RuntimeError: died after two rows"
    assert [r["case"] for r in data["rows"]] == ["a", "b"]
    assert "(incomplete: 2 rows so far; RuntimeError: died after two rows)" in (tmp_path / "fake_cpu.md").read_text()


@pytest.mark.slow
def test_a_failing_transformers_baseline_is_a_row_and_the_engine_is_still_measured(monkeypatch):
    import bench_rollout

    def broken(*args, **kwargs):
        raise TypeError("GenerationMixin._prepare_static_cache() missing 1 required positional argument: "
                        "'prefill_chunk_size'")

    monkeypatch.setattr(bench_rollout, "generate_cache_kwargs", broken)
    rows = {r["impl"]: r for r in bench_rollout.collect("cpu", True)}
    assert set(rows) == {"transformers", "engine"}
    assert rows["transformers"]["note"].startswith("baseline failed: TypeError: GenerationMixin._prepare_static_cache")
    assert "rollout_ms" not in rows["transformers"]
    assert rows["engine"]["rollout_ms"] > 0 and "speedup_vs_transformers" not in rows["engine"]
