"""One run per run folder: an exclusive `fcntl.flock` on `run_dir/.run.lock`, held for the run's life.

    held = RunLock.acquire(run_dir)     # RunLockError (one line naming the holder) when another run holds it
    ...
    held.release()                      # also done by the kernel on any exit, SIGKILL included

Why flock: the kernel (or the NFS server, where Linux emulates flock with byte-range locks) drops the lock
when its process dies, however it dies, so a lock file left by a dead process (on any host) never blocks:
only a live holder does. The file records the holder's host, pid and start time, for the refusal message
only; it is left in place after release (it is the lock's inode, not its content, that matters).
Under torchrun only rank 0 takes it. While this process holds the lock of a run folder, no other live
process can be saving into it, which is what lets `CheckpointStore.remove_dead_temps` remove every temp
folder that is not this process's own, whatever host its name gives (`held_here`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".run.lock"
_HELD: dict[Path, RunLock] = {}  # run folders this process holds, by resolved path


class RunLockError(ValueError):
    """Another live process holds the run folder's lock; the message is one line naming it."""


def _key(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir).resolve()


def held_here(run_dir: str | os.PathLike) -> bool:
    """True when this process holds the lock of `run_dir`."""
    return _key(run_dir) in _HELD


def _holder(path: Path) -> str:
    """'host H, pid P, since T' from a lock file (retried briefly: a new holder writes it just after locking)."""
    for _ in range(20):
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(path.read_text())
            return f"host {info['host']}, pid {info['pid']}, since {info['started']}"
        time.sleep(0.05)
    return "holder unknown"


class RunLock:
    """The held lock of one run folder (see the module docstring)."""

    def __init__(self, run_dir: Path, fd: int, created_dir: bool):
        self.run_dir, self.path, self._fd, self._created_dir = run_dir, run_dir / LOCK_FILE, fd, created_dir

    @classmethod
    def acquire(cls, run_dir: str | os.PathLike) -> RunLock:
        """Take the lock of `run_dir` (created when missing); re-entrant within one process (the same lock
        is returned, released by its first taker). Raises RunLockError naming the live holder."""
        key = _key(run_dir)
        if key in _HELD:
            return _HELD[key]
        folder = Path(run_dir)
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_FILE
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunLockError(f"train.run_dir: {run_dir} is in use by another run ({_holder(path)}; lock "
                                   f"file {path}); wait for it to end or stop it, then resume with "
                                   "train.resume=true") from None
            except BaseException:
                os.close(fd)
                raise
            # the file may have been unlinked (a released lock of an empty folder) between open and flock
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        held = cls(folder, fd, created)
        _HELD[key] = held
        return held

    def release(self) -> None:
        """Drop the lock (idempotent). A folder this lock created and that holds nothing else is removed."""
        if self._fd < 0:
            return
        _HELD.pop(_key(self.run_dir), None)
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        with contextlib.suppress(OSError):
            if [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
                self.path.unlink()  # still locked: a taker that opened it retries on the new inode
                if self._created_dir:
                    self.run_dir.rmdir()
        os.close(self._fd)  # closing the only descriptor releases the flock
        self._fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["LOCK_FILE", "RunLock", "RunLockError", "held_here"]
