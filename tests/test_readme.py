"""Every ```python block of README.md runs as written (each in a fresh interpreter, on CPU).

A block that is not meant to run (it needs real weights or a GPU) is fenced ```py instead.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = {p.read_text() for p in (README.parent / "docs" / "snippets").glob("*.py")}
# blocks quoted verbatim from docs/snippets/ run in tests/pairuni_kernels/integrations/test_readme_snippets.py
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if b not in SNIPPETS]


def test_readme_has_runnable_examples():
    assert BLOCKS, "README.md should carry at least one runnable ```python example"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path):
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(BLOCKS[index])
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"README block {index} failed:\n{BLOCKS[index]}\n--- stderr ---\n{proc.stderr[-3000:]}"
