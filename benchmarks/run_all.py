"""Run every benchmark suite and write `benchmarks/results/<suite>_<device>.json` plus a markdown table.

Protocol: each `benchmarks/bench_<suite>.py` defines
    collect(device: str, quick: bool, rows: list | None = None) -> list[dict]
returning one row per (shape, implementation) with at least the keys `case` and `impl`;
timings in `*_ms`, memory in `*_mb`, bandwidth in `*_gbps`, ratios in `speedup*`. A suite appends
each row to `rows` as soon as it is measured: here `rows` is a `RowLog`, which rewrites the suite's
JSON and markdown (atomically) after every row, so a suite that is killed or times out keeps the
rows it measured (`"complete": false` in its JSON, and `"error"` when it raised). A suite that
changes rows after appending them calls `rows.flush()` (see `_timing.flush`).
A suite may also define `environment() -> dict` (versions of its baselines): its keys join the
machine and versions in the results' header, with the command that reproduces them.
Usage: python benchmarks/run_all.py [--quick] [--only SUITE ...] [--device cpu|cuda] [--timeout S]
                                   [--cases NAME ...] [--impls NAME ...]

Each suite runs in its own process with a timeout: a suite that crashes, hangs or runs out of
memory is recorded in the summary (`status` and the tail of its output) and the next one runs.
`--cases` narrows suites whose `collect` takes `only=` (bench_linear) to the named cases, `--impls`
those whose `collect` takes `impls=` to the named implementations. The checkout is put on the
suites' import path, so they run from a checkout that is not installed (or whose build failed).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import platform
import sys
import time
from pathlib import Path

from _isolate import STAGE_GROUP_ENV, atomic_write, run_group

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
# test hook (the GPU session's `--inject STAGE=hang-after-N`): a suite stops making progress once it
# has written this many rows, as a suite that hangs mid-way would
HANG_AFTER_ROWS_ENV = "PAIRUNI_BENCH_HANG_AFTER_ROWS"


def environment(device: str) -> dict:
    import torch

    env = {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def markdown_table(rows: list[dict]) -> str:
    cols: list[str] = []
    for row in rows:
        cols += [k for k in row if k not in cols]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


class RowLog(list):
    """A suite's rows: `write(rows)` runs after every row added and on `flush()` (the suite's
    files are rewritten each time, so what was measured survives a kill)."""

    def __init__(self, write, hang_after: int | None = None):
        super().__init__()
        self._write, self._hang_after = write, hang_after

    def append(self, row) -> None:
        super().append(row)
        self.flush()

    def extend(self, rows) -> None:
        super().extend(rows)
        self.flush()

    def __iadd__(self, rows):
        self.extend(rows)
        return self

    def flush(self) -> None:
        self._write(self)
        if self._hang_after is not None and len(self) >= self._hang_after:
            print(f"{HANG_AFTER_ROWS_ENV}={self._hang_after}: hanging after {len(self)} rows (pid {os.getpid()})",
                  flush=True)
            time.sleep(3600)


def load_suite(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(HERE))
    spec.loader.exec_module(module)
    return module


def run_suite(path: Path, device: str, quick: bool, out: Path, suffix: str, cases: list[str] | None,
              impls: list[str] | None = None) -> int:
    """One suite in this process: its JSON and markdown are written after every row (and once before
    the first), with `complete` true only at the end. Returns 1 when a row says that its case failed
    or timed out (suites that run cases in child processes record them so); a suite that raises
    leaves its rows and the error in its JSON and exits non-zero."""
    suite = path.stem[len("bench_"):]
    env = environment(device)
    env["command"] = " ".join(["python benchmarks/run_all.py", "--only", suite, "--device", device]
                              + (["--quick"] if quick else []) + (["--cases", *cases] if cases else [])
                              + (["--impls", *impls] if impls else []))
    state = {"complete": False, "error": None}

    def write(rows) -> None:
        data = {"environment": env, "complete": state["complete"], "rows": list(rows)}
        if state["error"]:
            data["error"] = state["error"]
        atomic_write(out / f"{suite}{suffix}.json", json.dumps(data, indent=2, default=str))
        error = f"; {state['error']}" if state["error"] else ""
        head = "" if state["complete"] else f"(incomplete: {len(rows)} rows so far{error})\n\n"
        atomic_write(out / f"{suite}{suffix}.md",
                     f"# {suite} on {env['device_name']}\n\n{json.dumps(env)}\n\n{head}{markdown_table(list(rows))}\n")

    hang = os.environ.get(HANG_AFTER_ROWS_ENV)
    rows = RowLog(write, int(hang) if hang else None)
    write(rows)
    module = load_suite(path)
    if hasattr(module, "environment"):  # what else the suite's numbers depend on (versions of its baselines)
        env.update(module.environment())
    params = inspect.signature(module.collect).parameters
    kwargs = {}
    if cases and "only" in params:
        kwargs["only"] = cases
    if impls and "impls" in params:
        kwargs["impls"] = impls
    if "rows" in params:
        kwargs["rows"] = rows
    try:
        result = module.collect(device, quick, **kwargs)
    except BaseException as exc:
        state["error"] = f"{type(exc).__name__}: {str(exc).strip()[:500]}"
        write(rows)
        raise
    if result is not rows:  # a suite that builds its own list
        list.clear(rows)
        list.extend(rows, result)
    state["complete"] = True
    write(rows)
    print(markdown_table(list(rows)), flush=True)
    failed = [r for r in rows if str(r.get("note", "")).startswith(("failed", "timed out"))]
    for r in failed:
        print(f"case failed: {r.get('case')} {r.get('impl')}: {r['note']}", file=sys.stderr)
    return 1 if failed else 0


def isolated(path: Path, args, out: Path) -> dict:
    """Runs one suite in a child process with a timeout; returns its status record."""
    suite = path.stem[len("bench_"):]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", suite, "--device", args.device, "--out", str(out)]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--cases", *args.cases] if args.cases else []
    cmd += ["--impls", *args.impls] if args.impls else []
    t0 = time.perf_counter()
    print(f"== {suite}", flush=True)
    # the suite's output reaches this process's stdout as it comes (a log that shows where a killed suite was);
    # inside a GPU-session stage the suite stays in the stage's process group, which is killed as a whole
    code, tail = run_group(cmd, args.timeout, echo=True, new_session=STAGE_GROUP_ENV not in os.environ,
                           env=with_checkout(os.environ))
    status = f"timed out after {args.timeout:.0f} s" if code is None else "ok" if code == 0 else f"failed (exit {code})"
    record = {"suite": suite, "status": status, "seconds": round(time.perf_counter() - t0, 1)}
    if status != "ok":
        record["tail"] = tail[-3000:]
    print(f"== {suite}: {status} ({record['seconds']} s)", flush=True)
    return record


def with_checkout(environ) -> dict:
    """`environ` with this checkout first on PYTHONPATH: pairuni_kernels and engine import from it even
    where the package is not installed (a failed build on the GPU machine)."""
    paths = [str(ROOT)] + [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)]
    return dict(environ, PYTHONPATH=os.pathsep.join(paths))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes only (smoke run)")
    p.add_argument("--only", nargs="*", default=None, help="suite names, e.g. policy_loss advantages")
    p.add_argument("--device", default=None, help="default: cuda when torch sees a GPU, else cpu")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds each suite may take")
    p.add_argument("--cases", nargs="*", default=None, help="case names for suites that can select cases")
    p.add_argument("--impls", nargs="*", default=None, help="implementations for suites that can select them")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(1, str(ROOT))
    if args.device is None:  # torch is imported only here and in the suites' own processes
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.device}" + ("_quick" if args.quick else "")
    if args.child:
        return run_suite(HERE / f"bench_{args.child}.py", args.device, args.quick, out, suffix, args.cases,
                         args.impls)
    suites = sorted(HERE.glob("bench_*.py"))
    if args.only:
        suites = [s for s in suites if s.stem[len("bench_"):] in args.only]
    status = [isolated(path, args, out) for path in suites]
    # the summary gathers every suite's latest results on this device, not only the ones just run,
    # and says which suites of this run failed
    summary = [f"# Benchmarks ({args.device})", "", "| suite | status | seconds |", "|---|---|---|"]
    summary += [f"| {r['suite']} | {r['status']} | {r['seconds']} |" for r in status] + [""]
    for r in status:
        if "tail" in r:
            summary += [f"## {r['suite']}: {r['status']}", "", "```", r["tail"], "```", ""]
    for result in sorted(out.glob(f"*{suffix}.json")):
        data = json.loads(result.read_text())
        if not isinstance(data, dict) or "rows" not in data:  # another script's results (train_one_gpu_*)
            continue
        e = data["environment"]
        partial = "" if data.get("complete", True) else f" (incomplete{': ' + data['error'] if data.get('error') else ''})"
        summary += [f"## {result.stem[:-len(suffix)]}{partial}", "",
                    f"{e['device_name']}, torch {e['torch']}, triton {e['triton']}, CUDA {e['cuda']}, {e['date']}", "",
                    markdown_table(data["rows"]), ""]
    (out / f"SUMMARY{suffix}.md").write_text("\n".join(summary))
    (out / f"SUMMARY{suffix}.status.json").write_text(json.dumps(status, indent=1))
    return 0 if all(r["status"] == "ok" for r in status) else 1


if __name__ == "__main__":
    sys.exit(main())
