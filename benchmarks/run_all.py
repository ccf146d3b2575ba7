"""Run every benchmark suite and write `benchmarks/results/<suite>_<device>.json` plus a markdown table.

Protocol: each `benchmarks/bench_<suite>.py` defines
    collect(device: str, quick: bool) -> list[dict]
returning one row per (shape, implementation) with at least the keys `case` and `impl`;
timings in `*_ms`, memory in `*_mb`, bandwidth in `*_gbps`, ratios in `speedup*`.
Usage: python benchmarks/run_all.py [--quick] [--only SUITE ...] [--device cpu|cuda] [--timeout S]
                                   [--cases NAME ...]

Each suite runs in its own process with a timeout: a suite that crashes, hangs or runs out of
memory is recorded in the summary (`status` and the tail of its output) and the next one runs.
`--cases` narrows suites whose `collect` takes `only=` (bench_linear) to the named cases.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from _isolate import run_group

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


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


def load_suite(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(HERE))
    spec.loader.exec_module(module)
    return module


def run_suite(path: Path, device: str, quick: bool, out: Path, suffix: str, cases: list[str] | None) -> int:
    """One suite in this process: collect, then write its JSON and markdown table. Returns 1 when a row
    says that its case failed or timed out (suites that run cases in child processes record them so)."""
    suite = path.stem[len("bench_"):]
    module = load_suite(path)
    kwargs = {"only": cases} if cases and "only" in inspect.signature(module.collect).parameters else {}
    rows = module.collect(device, quick, **kwargs)
    env = environment(device)
    (out / f"{suite}{suffix}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    table = markdown_table(rows)
    (out / f"{suite}{suffix}.md").write_text(f"# {suite} on {env['device_name']}\n\n{json.dumps(env)}\n\n{table}\n")
    print(table, flush=True)
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
    t0 = time.perf_counter()
    code, tail = run_group(cmd, args.timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           errors="replace")
    status = f"timed out after {args.timeout:.0f} s" if code is None else "ok" if code == 0 else f"failed (exit {code})"
    record = {"suite": suite, "status": status, "seconds": round(time.perf_counter() - t0, 1)}
    if status != "ok":
        record["tail"] = tail[-3000:]
    print(f"== {suite}: {status} ({record['seconds']} s)", flush=True)
    if status == "ok":
        print(tail[-4000:], flush=True)
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes only (smoke run)")
    p.add_argument("--only", nargs="*", default=None, help="suite names, e.g. policy_loss advantages")
    p.add_argument("--device", default=None, help="default: cuda when torch sees a GPU, else cpu")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds each suite may take")
    p.add_argument("--cases", nargs="*", default=None, help="case names for suites that can select cases")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None:  # torch is imported only here and in the suites' own processes
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.device}" + ("_quick" if args.quick else "")
    if args.child:
        return run_suite(HERE / f"bench_{args.child}.py", args.device, args.quick, out, suffix, args.cases)
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
        e = data["environment"]
        summary += [f"## {result.stem[:-len(suffix)]}", "",
                    f"{e['device_name']}, torch {e['torch']}, triton {e['triton']}, CUDA {e['cuda']}, {e['date']}", "",
                    markdown_table(data["rows"]), ""]
    (out / f"SUMMARY{suffix}.md").write_text("\n".join(summary))
    (out / f"SUMMARY{suffix}.status.json").write_text(json.dumps(status, indent=1))
    return 0 if all(r["status"] == "ok" for r in status) else 1


if __name__ == "__main__":
    sys.exit(main())
