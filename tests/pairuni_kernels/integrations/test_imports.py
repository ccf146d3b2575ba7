"""The integrations are opt-in: importing pairuni_kernels (or the verl adapter) never imports TRL or verl."""

import subprocess
import sys


def test_package_import_needs_neither_trl_nor_verl():
    code = (
        "import sys, pairuni_kernels, pairuni_kernels.integrations, pairuni_kernels.integrations.verl\n"
        "loaded = sorted(m for m in ('trl', 'verl') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
        "import pairuni_kernels.integrations as i; assert i.verl.compute_policy_loss\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
