"""Run metrics: a resumed run rewrites history after its checkpoint; the summary's first and last means."""

from __future__ import annotations

import json

import pytest

from engine.metrics import MetricsLog, summarize


def _row(step):
    return {"step": step, "reward.understanding": step / 10, "reward.generation": 1 - step / 10}


def test_a_resumed_log_keeps_the_rows_up_to_its_checkpoint(tmp_path):
    log = MetricsLog(tmp_path, 0)
    for step in range(1, 6):
        log.write(_row(step))
    log.close()
    resumed = MetricsLog(tmp_path, 3)  # the checkpoint was at step 3; steps 4-5 are recomputed
    assert [r["step"] for r in resumed.rows] == [1, 2, 3]
    resumed.write(_row(4))
    resumed.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    quiet = MetricsLog(tmp_path / "other", 0, enabled=False)
    quiet.write(_row(1))
    assert quiet.rows == [_row(1)] and not (tmp_path / "other").exists()


def test_summary_means_the_first_and_last_third_up_to_five_steps():
    s = summarize([_row(step) for step in range(1, 10)])  # 9 rows: k = 3
    assert s["reward.understanding.first"] == pytest.approx(0.2)
    assert s["reward.understanding.last"] == pytest.approx(0.8)
    assert s["reward.generation.first"] == pytest.approx(0.8)


def _strict(line: str) -> dict:
    """json.loads that refuses NaN / Infinity / -Infinity, as strict JSON parsers do."""
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(line, parse_constant=refuse)


def test_metrics_jsonl_is_strict_json_with_nonfinite_values_flagged(tmp_path):
    """A NaN / inf value is written as null and named in `nonfinite`; read back (a resume), it is NaN again, and
    the summary and reward curve still work. An older file's bare NaN is rewritten strictly."""
    import math

    log = MetricsLog(tmp_path, 0)
    log.write(_row(1))
    log.write({**_row(2), "loss.generation": float("nan"), "grad_norm": float("inf"), "loss.understanding": 0.5})
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [_strict(line) for line in lines]
    assert "nonfinite" not in rows[0] and rows[0] == _row(1)
    assert rows[1]["loss.generation"] is None and rows[1]["grad_norm"] is None and rows[1]["loss.understanding"] == 0.5
    assert rows[1]["nonfinite"] == ["loss.generation", "grad_norm"]
    with pytest.raises(ValueError, match="not strict JSON"):
        _strict('{"step": 1, "loss": NaN}')
    resumed = MetricsLog(tmp_path, 2)
    assert math.isnan(resumed.rows[1]["loss.generation"]) and math.isnan(resumed.rows[1]["grad_norm"])
    assert "nonfinite" not in resumed.rows[1]
    assert summarize(resumed.rows)["reward.generation.last"] == pytest.approx(0.8)
    assert resumed.plot() is None or resumed.plot().is_file()
    resumed.close()
    # a file written before (bare NaN): its kept rows are made strict when the resumed run writes
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "reward.understanding": 0.1, "reward.generation": 0.9, '
                                            '"loss.generation": NaN}\n')
    old = MetricsLog(tmp_path, 1)
    old.write(_row(2))
    old.close()
    rows = [_strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["nonfinite"] == ["loss.generation"] and [r["step"] for r in rows] == [1, 2]
