"""Where checkpoints live on disk, and how a run finds one it can trust.

The store knows the directory layout and nothing of what a checkpoint holds:

    run_dir/checkpoints/
        step_000120/            one finished checkpoint (any files, any sub-folders)
            ...
            manifest.json       size + CRC-32 of every other file; written last, it is the commit mark
        latest                  text file naming the newest published checkpoint
        .tmp_step_000140.HOST.PID/   a save in progress (or the remains of a dead one)

Rules, each tested by killing or damaging a run (tests/engine/test_faults.py):
- A checkpoint counts only when its manifest exists and every file matches it; `verify` names
  the first file that does not.
- `resume_candidate` never answers "start from scratch" while a verified checkpoint exists:
  when `latest` is missing, dangling or damaged it falls back to the newest verified one, and
  says what it skipped.
- Publishing a step that already exists swaps the old folder aside before the new one moves in,
  so some complete copy of that step exists at every instant.
- Pruning orders by step number, never deletes the checkpoint `latest` names, and deletes
  nothing in a run that fell back (the skipped folders are evidence, not garbage).
- A temp folder belongs to the process named in it; it is removed at the next start when that
  process is certainly dead: while this process holds the run folder's lock (engine/lock.py, what
  `pairuni train` takes before touching the folder) no other live process can be saving into it, so
  every temp folder not this process's own is dead, whatever host its name gives (pods restart with a
  new hostname); without the lock, only those of dead processes on this host go, never a live one's
  or another machine's (a shared file system).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .files import current_umask, fsync_dir, remove, swap_in

LATEST = "latest"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp_"
OLD_PREFIX = ".old_"
_STEP_NAME = re.compile(r"^step_(\d+)$")
# ".tmp_step_000140.host.1234" (this store) or ".tmp_step_000140_1234" (older saves)
_TMP_NAME = re.compile(r"^\.(?:tmp|old)_step_(\d+)(?:\.(?P<host>[^/]+)\.(?P<pid>\d+)|_(?P<oldpid>\d+))$")
_CHUNK = 16 << 20
# Test hook: `PAIRUNI_KILL_AT=<point>` makes the process SIGKILL itself when a save reaches that
# point, so the fault tests can stop a real run at the worst moments. Points, in save order:
KILL_POINTS = ("save:files_written", "save:sealed", "save:swapped", "save:published")
KILL_ENV = "PAIRUNI_KILL_AT"
# Test hook: `PAIRUNI_PAUSE_AT=<point>[@N][,<point>[@N]...]` and `PAIRUNI_PAUSE_FILE=<path>` make the process
# write `path` (its pid) when it reaches `point` for the N-th time (default 1; a save point above, or
# "start", "step:rollout", "step:update" of `pairuni train`) and wait there until the file is removed (at
# most 120 s), so a test can send signals at that moment.
PAUSE_ENV, PAUSE_FILE_ENV = "PAIRUNI_PAUSE_AT", "PAIRUNI_PAUSE_FILE"
_REACHED: dict[str, int] = {}


def kill_point(name: str) -> None:
    """SIGKILL this process when `PAIRUNI_KILL_AT` names `name`; pause when `PAIRUNI_PAUSE_AT` does (no cost
    otherwise)."""
    if os.environ.get(KILL_ENV) == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    pauses = os.environ.get(PAUSE_ENV)
    if not pauses:
        return
    _REACHED[name] = _REACHED.get(name, 0) + 1
    if f"{name}@{_REACHED[name]}" in pauses.split(",") or (_REACHED[name] == 1 and name in pauses.split(",")):
        import time

        flag = Path(os.environ[PAUSE_FILE_ENV])
        flag.write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while flag.exists() and time.monotonic() < deadline:
            time.sleep(0.02)


class CheckpointError(ValueError):
    """A checkpoint (or the checkpoint folder of a run) cannot be used; the message names it."""


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


def step_of(path: Path) -> int | None:
    """The step a `step_NNNNNN` folder holds, None for any other name."""
    match = _STEP_NAME.match(path.name)
    return int(match.group(1)) if match else None


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            yield path


def _checksums(folder: Path, paths: list[Path]) -> dict[str, dict]:
    # zlib releases the GIL on large buffers: files hash in parallel (6+ GB/s per core).
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(paths)))) as pool:
        crcs = list(pool.map(_crc32, paths))
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "crc32": c} for p, c in zip(paths, crcs)}


def write_manifest(folder: Path, step: int) -> None:
    """Record size and CRC-32 of every file under `folder`; call it last, after every file is fsynced."""
    files = list(_files(folder))
    manifest = {"format": MANIFEST_FORMAT, "step": step, "files": _checksums(folder, files)}
    tmp = folder / f".{MANIFEST}.tmp"
    with open(tmp, "w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / MANIFEST)
    fsync_dir(folder)


def verify(folder: Path, *, deep: bool = True) -> None:
    """Raise CheckpointError naming the first missing, truncated or altered file of `folder`.

    deep=False skips the checksums (reads no file but the manifest)."""
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder}: no such folder")
    if not manifest_path.is_file():
        legacy = " or it predates sealed checkpoints" if (folder / "state.json").is_file() else ""
        raise CheckpointError(f"checkpoint {folder}: no {MANIFEST} (the save did not finish{legacy})")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"unknown format {manifest.get('format')!r}")
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {manifest_path}: unreadable manifest ({err})") from None
    paths = []
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path}: missing")
        if path.stat().st_size != expected["bytes"]:
            raise CheckpointError(f"checkpoint file {path}: {path.stat().st_size} bytes, "
                                  f"the manifest says {expected['bytes']} (truncated or replaced)")
        paths.append(path)
    if not deep:
        return
    actual = _checksums(folder, paths)
    for name, expected in files.items():
        if actual[name]["crc32"] != expected["crc32"]:
            raise CheckpointError(f"checkpoint file {folder / name}: checksum {actual[name]['crc32']} != "
                                  f"{expected['crc32']} in the manifest (the file is damaged)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@dataclass
class ResumePoint:
    """What `CheckpointStore.resume_candidate` found. path None: the run has no checkpoint."""

    path: Path | None
    skipped: list[str] = field(default_factory=list)  # one line per checkpoint passed over, with why

    @property
    def fell_back(self) -> bool:
        return bool(self.skipped)


class CheckpointStore:
    """The checkpoint folder of one run: `run_dir/checkpoints`."""

    def __init__(self, run_dir: str | os.PathLike):
        self.root = Path(run_dir) / "checkpoints"
        self.host = socket.gethostname().replace("/", "_").replace(".", "-")
        self.prune_enabled = True

    # -- reading ---------------------------------------------------------------------------------
    def step_folders(self) -> list[tuple[int, Path]]:
        """Every `step_*` folder as (step, path), oldest step first (numeric order, not names)."""
        if not self.root.is_dir():
            return []
        found = [(step_of(p), p) for p in self.root.iterdir() if p.is_dir()]
        return sorted((s, p) for s, p in found if s is not None)

    def latest_named(self) -> Path | None:
        """The folder `latest` names (it may be missing or damaged), None without a pointer."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        return self.root / name if name else None

    def resume_candidate(self, *, deep: bool = True) -> ResumePoint:
        """The newest verified checkpoint, preferring the one `latest` names.

        Raises CheckpointError naming the run's checkpoint folder and everything found there when
        checkpoints exist but none verifies; returns ResumePoint(None) when there are none at all.
        """
        skipped: list[str] = []
        named = self.latest_named()
        if named is not None:
            try:
                verify(named, deep=deep)
                return ResumePoint(named)
            except CheckpointError as err:
                skipped.append(f"latest -> {named.name}: {err}")
        for _, path in reversed(self.step_folders()):
            if path == named:
                continue
            try:
                verify(path, deep=deep)
                return ResumePoint(path, skipped)
            except CheckpointError as err:
                skipped.append(str(err))
        if skipped:
            raise CheckpointError(f"run {self.root.parent}: no usable checkpoint in {self.root}; found: "
                                  + "; ".join(skipped))
        return ResumePoint(None)

    # -- writing ---------------------------------------------------------------------------------
    def begin(self, step: int) -> Path:
        """A fresh, empty temp folder for checkpoint `step`, owned by this process."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{TMP_PREFIX}{step_name(step)}.{self.host}.{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()  # not mkdtemp: that would make it 0700 whatever the umask says
        return tmp

    def abort(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def publish(self, tmp: Path, step: int, keep: int) -> Path:
        """Seal `tmp` (manifest last), move it in as `step_NNNNNN`, point `latest` at it, prune.

        keep: how many verified checkpoints to keep (<= 0: all).
        """
        kill_point("save:files_written")
        mode = 0o666 & ~current_umask()
        for path in _files(tmp):  # some writers (safetensors) create 0600 files whatever the umask says
            os.chmod(path, mode)
        write_manifest(tmp, step)
        kill_point("save:sealed")
        final = self.root / step_name(step)
        # swap, then delete: a complete copy of this step exists at every instant; the old copy's name
        # carries host and pid, so `remove_dead_temps` can move it back if this process dies in between
        old = swap_in(tmp, final, self.root / f"{OLD_PREFIX}{step_name(step)}.{self.host}.{os.getpid()}",
                      swapped=lambda: kill_point("save:swapped"))
        pointer = self.root / f".{LATEST}.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, self.root / LATEST)
        fsync_dir(self.root)
        kill_point("save:published")
        remove(old)
        self.prune(keep)
        return final

    def prune(self, keep: int) -> list[Path]:
        """Delete all but the newest `keep` complete checkpoints (by step); returns what went.

        Never deletes the one `latest` names, folders without a manifest (a damaged checkpoint is
        evidence), or anything once the run fell back on resume.
        """
        if keep <= 0 or not self.prune_enabled:
            return []
        named = self.latest_named()
        complete = [p for _, p in self.step_folders() if (p / MANIFEST).is_file()]
        doomed = [p for p in complete[:-keep] if p != named]
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)
        return doomed

    def remove_dead_temps(self) -> list[Path]:
        """Remove temp / swapped-out folders of saves whose process is dead: any but this process's own
        while it holds the run folder's lock, else those of dead processes on this host (module docstring).

        A swapped-out folder whose step has no folder any more is moved back instead: its save
        died between moving the old copy aside and moving the new one in.
        """
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        from .lock import held_here

        locked = held_here(self.root.parent)  # no other live process can be saving here
        for path in self.root.iterdir():
            match = _TMP_NAME.match(path.name)
            if not match or not path.is_dir():
                continue
            host, pid = match.group("host"), int(match.group("pid") or match.group("oldpid"))
            if pid == os.getpid() and host in (None, self.host):
                continue  # this process's own
            if not locked and host is not None and host != self.host:
                continue  # another machine's save on a shared file system: not ours to judge
            if not locked and _pid_alive(pid):
                continue
            final = self.root / step_name(int(match.group(1)))
            if path.name.startswith(OLD_PREFIX) and not final.exists():
                os.rename(path, final)  # the save died between its two renames: this is the only copy
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        return removed
