"""Run a command in its own process group with a timeout, and leave nothing of it running afterwards.

`subprocess.run(..., timeout=)` kills only the child it started: a benchmark case the child spawned
would keep the GPU (and the CPUs) busy through the stages that follow. Here the command starts a new
session, and its whole process group is killed on timeout, on interrupt and after it exits.
"""

from __future__ import annotations

import os
import signal
import subprocess


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # every process of the group has already exited
        pass


def run_group(cmd: list[str], timeout: float, **popen_kwargs) -> tuple[int | None, str]:
    """Runs `cmd`; returns (exit code, or None when it ran past `timeout` seconds; its stdout when piped)."""
    proc = subprocess.Popen(cmd, start_new_session=True, **popen_kwargs)
    try:
        out, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, _ = proc.communicate()
        code = None
    except BaseException:
        _kill_group(proc.pid)
        proc.wait()
        raise
    _kill_group(proc.pid)  # whatever the command left running in its group
    return code, out or ""
