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
