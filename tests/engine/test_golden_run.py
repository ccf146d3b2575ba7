"""The embedded-default run (`pairuni train` / `make demo`, 40 steps) reproduces its recorded metrics.

tests/engine/golden/default_run_metrics.jsonl holds that run's metrics.jsonl without the timing
(`time.*`) and CUDA memory (`mem.*`) keys. Two runs on one machine agree bit for bit (and with 1 or
2 CPU threads), so the tolerance is tight: integers exactly, floats to rel 1e-5 / abs 1e-6, which
leaves room only for a different CPU's float rounding, never for a changed step.

A change that must move these numbers regenerates the file in its own commit, saying why:

    python tests/engine/test_golden_run.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

GOLDEN = Path(__file__).with_name("golden") / "default_run_metrics.jsonl"
VOLATILE = ("time.", "mem.")  # wall-clock timings and CUDA memory depend on the machine, not on the step


def default_run_rows(run_dir: Path) -> list[dict]:
    """Metrics rows of `pairuni train` with every default except where it writes (and no progress bar)."""
    from engine import cli

    assert cli.main(["train", f"train.run_dir={run_dir}", "train.progress=false"]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if not k.startswith(VOLATILE)} for row in rows]


@pytest.mark.slow
def test_default_run_reproduces_the_golden_metrics(tmp_path):
    golden = [json.loads(line) for line in GOLDEN.read_text().splitlines()]
    got = default_run_rows(tmp_path / "run")
    assert len(got) == len(golden) == 40
    for want, have in zip(golden, got):
        assert have.keys() == want.keys(), want["step"]
        for key, value in want.items():
            if isinstance(value, int):
                assert have[key] == value, (want["step"], key)
            else:
                assert have[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (want["step"], key)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    with tempfile.TemporaryDirectory() as tmp:
        rows = default_run_rows(Path(tmp) / "run")
    GOLDEN.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} rows to {GOLDEN}")
