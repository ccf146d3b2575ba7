"""Run every benchmark suite and write `benchmarks/results/<suite>_<device>.json` plus a markdown table.

Protocol: each `benchmarks/bench_<suite>.py` defines
    collect(device: str, quick: bool) -> list[dict]
returning one row per (shape, implementation) with at least the keys `case` and `impl`;
timings in `*_ms`, memory in `*_mb`, bandwidth in `*_gbps`, ratios in `speedup*`.
Usage: python benchmarks/run_all.py [--quick] [--only SUITE ...] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def environment(device: str) -> dict:
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes only (smoke run)")
    p.add_argument("--only", nargs="*", default=None, help="suite names, e.g. policy_loss advantages")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suites = sorted(HERE.glob("bench_*.py"))
    if args.only:
        suites = [s for s in suites if s.stem[len("bench_"):] in args.only]
    env = environment(args.device)
    suffix = f"_{args.device}" + ("_quick" if args.quick else "")
    for path in suites:
        suite = path.stem[len("bench_"):]
        print(f"== {suite}", flush=True)
        rows = load_suite(path).collect(args.device, args.quick)
        (out / f"{suite}{suffix}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
        table = markdown_table(rows)
        (out / f"{suite}{suffix}.md").write_text(f"# {suite} on {env['device_name']}\n\n{json.dumps(env)}\n\n{table}\n")
        print(table, flush=True)
    # the summary gathers every suite's latest results on this device, not only the ones just run
    summary = [f"# Benchmarks ({args.device})", ""]
    for result in sorted(out.glob(f"*{suffix}.json")):
        data = json.loads(result.read_text())
        e = data["environment"]
        summary += [f"## {result.stem[:-len(suffix)]}", "",
                    f"{e['device_name']}, torch {e['torch']}, triton {e['triton']}, CUDA {e['cuda']}, {e['date']}", "",
                    markdown_table(data["rows"]), ""]
    (out / f"SUMMARY{suffix}.md").write_text("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
