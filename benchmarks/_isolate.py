"""Run a command in its own process group with a timeout, and leave nothing of it running afterwards.

`subprocess.run(..., timeout=)` kills only the child it started: a benchmark case the child spawned
would keep the GPU (and the CPUs) busy through the stages that follow. Here the command starts a new
session, and its whole process group is killed on timeout, on interrupt and after it exits.

Inside such a group (a stage of the GPU session: STAGE_GROUP_ENV is set), a nested runner must not
start a session of its own: its children would leave the group and outlive the stage when the stage
is killed. `run_group(..., new_session=False)` keeps the command in the caller's group (it is killed
alone on timeout; the enclosing group's kill takes whatever it started).

Also `atomic_write`: a file is replaced whole (written beside it, then renamed), so a reader, or a
process killed mid-write, never sees half of it. Nothing here imports torch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

STAGE_GROUP_ENV = "PAIRUNI_STAGE_GROUP"  # set by the GPU session for its stages: a group killed as a whole


def _kill(proc: subprocess.Popen) -> None:
    try:
        proc.kill()
    except ProcessLookupError:
        pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # every process of the group has already exited
        pass


def run_group(cmd: list[str], timeout: float, *, tick: Callable[[], None] | None = None, every: float = 20.0,
              echo: bool = False, new_session: bool = True, **popen_kwargs) -> tuple[int | None, str]:
    """Runs `cmd`; returns (exit code, or None when it ran past `timeout` seconds; its stdout when piped).

    tick: called about every `every` seconds while the command runs (the GPU session saves what has
    been measured so far with it); an exception it raises ends the command like an interrupt.
    echo: the command's output (stdout and stderr) is copied to this process's stdout as it comes,
    so a log shows how far a command got even when this process is killed too; returns its tail.
    new_session: False keeps the command in this process's group (see the module's docstring)."""
    if echo:
        return _run_echoed(cmd, timeout, new_session, **popen_kwargs)
    proc = subprocess.Popen(cmd, start_new_session=new_session, **popen_kwargs)
    kill = (lambda: _kill_group(proc.pid)) if new_session else (lambda: _kill(proc))
    end = time.monotonic() + timeout
    try:
        while True:
            left = max(0.0, end - time.monotonic())
            try:
                out, _ = proc.communicate(timeout=min(left, every) if tick else left)
                code = proc.returncode
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= end:
                    kill()
                    out, _ = proc.communicate()
                    code = None
                    break
                tick()
    except BaseException:
        kill()
        proc.wait()
        raise
    kill()  # whatever the command left running in its group
    return code, out or ""


def _run_echoed(cmd: list[str], timeout: float, new_session: bool, tail_chars: int = 8000,
                **popen_kwargs) -> tuple[int | None, str]:
    proc = subprocess.Popen(cmd, start_new_session=new_session, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            **popen_kwargs)
    kill = (lambda: _kill_group(proc.pid)) if new_session else (lambda: _kill(proc))
    tail: list[bytes] = []

    def copy() -> None:
        kept, sink = 0, getattr(sys.stdout, "buffer", None)
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            if sink is not None:
                sink.write(chunk)
                sink.flush()
            else:  # a text-only stdout (captured)
                sys.stdout.write(chunk.decode(errors="replace"))
            tail.append(chunk)
            kept += len(chunk)
            while kept - len(tail[0]) >= tail_chars:
                kept -= len(tail.pop(0))

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    except BaseException:
        kill()
        proc.wait()
        raise
    kill()  # on timeout, and whatever the command left running in its group
    proc.wait()
    reader.join(timeout=5)
    return code, b"".join(tail).decode(errors="replace")[-tail_chars:]


def atomic_write(path: Path | str, data: str | bytes) -> None:
    """Replaces `path` with `data` in one rename: readers see the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.partial")
    with open(tmp, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
