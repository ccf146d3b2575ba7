"""The "Use the loss in TRL", "Use the loss in verl" (docs/KERNELS.md) and "Measure task interference"
(docs/TRAINING.md) snippets run.

Each snippet lives in docs/snippets/ and runs here in a fresh interpreter (its own working
directory), exactly as a reader would paste it; tests/test_readme.py checks that the documents quote
each snippet word for word.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
SNIPPETS = {
    "verl": (ROOT / "docs/snippets/verl_snippet.py", "pg_loss"),
    "trl": (ROOT / "docs/snippets/trl_snippet.py", "train_loss"),
    "probe": (ROOT / "docs/snippets/probe_snippet.py", "median_paired"),
}


def _run(path: pathlib.Path, cwd: pathlib.Path) -> str:
    done = subprocess.run([sys.executable, str(path)], cwd=cwd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_snippet_runs(name, tmp_path):
    if name == "trl" and importlib.util.find_spec("trl") is None:
        pytest.skip("trl is not installed (pip install '.[test-integrations]')")
    path, marker = SNIPPETS[name]
    out = _run(path, tmp_path)
    line = next(ln for ln in out.splitlines() if ln.startswith(marker))
    values = [float(tok) for tok in line.split()[1::2]]
    assert values and all(math.isfinite(v) and abs(v) < 1e3 for v in values), line
    assert not any(tmp_path.iterdir()), "the snippet left files in the working directory"
