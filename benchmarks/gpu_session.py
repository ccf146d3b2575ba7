"""The whole GPU session in one call: build, GPU tests, kernel benchmarks, a Janus-Pro-7B PairGRPO step.

    # on the lent GPU machine (wheels/ carried; see `make wheels`), one device call:
    #   run(command="bash benchmarks/gpu_session.sh", carry=["wheels"], timeout_s=600)
    python benchmarks/gpu_session.py --dry-run     # every stage on CPU with tiny shapes (CI runs this)

Stages, in this order, each in its own process with its own timeout inside one overall deadline
(`--budget`, 9 minutes by default), so a stage that fails, hangs or runs out of memory is recorded
and the next one still runs, and the summary is always written:
  environment  GPU name, driver, torch / triton / CUDA versions
  build        pairuni_kernels._C with the CUDA sources, against the machine's torch (no deps)
  optimizer    bitsandbytes from the carried wheel (pip --no-index --target); without it the
               7B step uses torch AdamW and the summary says so
  gpu_tests    the kernel test suite on GPU tensors
  sampler, policy_loss, advantages   benchmarks/run_all.py suites
  linear       the fused linear loss at two Janus head shapes (image 7B, text 7B)
  train_7b     two PairGRPO steps of random-weight Janus-Pro-7B (benchmarks/train_one_gpu.py)
Everything is written under --work (outside $OUT); at the end it is packed into $OUT as
session.tgz plus summary.md and summary.json (3 files; the device returns at most 8).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
LINEAR_CASES = ("image 8x576 H4096", "text 8x512 H4096")
DRY_LINEAR_CASES = ("quick image 4x128 H256",)
WHEELS = ROOT / "wheels"


def stages(args, work: Path) -> list[tuple[str, list[str] | None, float]]:
    """(name, command, timeout seconds); a None command is a stage done in this process."""
    dry = args.dry_run
    results = str(work / "results")
    device = "cpu" if dry else "cuda"
    bench = [PY, str(ROOT / "benchmarks" / "run_all.py"), "--device", device, "--out", results] + (["--quick"] if dry
                                                                                                   else [])
    if dry:
        build = [PY, "-c", "import pairuni_kernels._ext as e; assert e.has_extension(); print('extension present')"]
        tests = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests/pairuni_kernels/test_launch.py")]
    else:
        build = [PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", str(ROOT)]
        tests = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests/pairuni_kernels"),
                 "--ignore", str(ROOT / "tests/pairuni_kernels/test_compile.py"),
                 "--ignore", str(ROOT / "tests/pairuni_kernels/integrations")]
    train = [PY, str(ROOT / "benchmarks" / "train_one_gpu.py"), "--only", "janus-pro-7b", "--steps", "2",
             "--out", results] + (["--smoke"] if dry else [])
    cases = DRY_LINEAR_CASES if dry else LINEAR_CASES
    return [
        ("environment", None, 30),
        ("build", build, 150),
        ("optimizer", None, 60),
        ("gpu_tests", tests, 75),
        ("sampler", bench + ["--only", "sampling"], 45),
        ("policy_loss", bench + ["--only", "policy_loss"], 60),
        ("advantages", bench + ["--only", "advantages"], 20),
        ("linear", bench + ["--only", "linear", "--cases", *cases], 90),
        ("train_7b", train, 170),
    ]


def environment(dry: bool) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "dry_run": dry, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        env["nvidia_smi"] = smi.stdout.strip()
    return env


def install_bitsandbytes(work: Path, dry: bool) -> dict:
    """Installs the carried bitsandbytes wheel into work/site; says which optimizer the 7B step gets."""
    wheels = sorted(glob.glob(str(WHEELS / "bitsandbytes-*.whl")))
    if not wheels:
        return {"optimizer": "adamw", "note": "no bitsandbytes wheel in wheels/ (make wheels): torch AdamW used"}
    site = work / "site"
    proc = subprocess.run([PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target",
                           str(site), wheels[-1]], capture_output=True, text=True, timeout=55)
    if proc.returncode != 0:
        return {"optimizer": "adamw", "note": f"bitsandbytes wheel did not install: {proc.stderr[-500:]}"}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    check = subprocess.run([PY, "-c", "import bitsandbytes; print(bitsandbytes.__version__)"], capture_output=True,
                           text=True, timeout=55)
    if check.returncode != 0:
        return {"optimizer": "adamw", "note": f"bitsandbytes does not import: {check.stderr[-500:]}"}
    return {"optimizer": "adamw8bit", "bitsandbytes": check.stdout.strip(), "wheel": Path(wheels[-1]).name}


def run_stage(name: str, cmd: list[str], timeout: float, logs: Path) -> dict:
    log = logs / f"{name}.log"
    t0 = time.perf_counter()
    with log.open("w") as fh:
        try:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout:.0f} s"
    record = {"stage": name, "status": status, "seconds": round(time.perf_counter() - t0, 1)}
    if status != "ok":
        record["tail"] = log.read_text(errors="replace")[-2000:]
    return record


def summary_markdown(records: list[dict], env: dict, extra: dict) -> str:
    lines = ["# GPU session" + (" (dry run on CPU)" if env.get("dry_run") else ""), "",
             "```", json.dumps(env, indent=1), "```", "",
             "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']} |" for r in records]
    lines += ["", f"Optimizer of the 7B step: {extra.get('optimizer', {}).get('optimizer', '?')}"
              f" ({extra.get('optimizer', {}).get('note', extra.get('optimizer', {}).get('wheel', ''))})", ""]
    train = extra.get("train")
    if train:
        lines += ["## 7B step", "", train, ""]
    for r in records:
        if "tail" in r:
            lines += [f"## {r['stage']}: {r['status']}", "", "```", r["tail"], "```", ""]
    return "\n".join(lines) + "\n"


def pack(work: Path, out: Path, summary: str, data: dict) -> list[Path]:
    """At most 3 files in $OUT: the whole work directory as one tar, and the summary twice."""
    out.mkdir(parents=True, exist_ok=True)
    (work / "summary.md").write_text(summary)
    (work / "summary.json").write_text(json.dumps(data, indent=1))
    with tarfile.open(out / "session.tgz", "w:gz") as tar:
        tar.add(work, arcname="session", filter=lambda t: None if "/site" in t.name else t)
    shutil.copy(work / "summary.md", out / "summary.md")
    shutil.copy(work / "summary.json", out / "summary.json")
    return [out / "session.tgz", out / "summary.md", out / "summary.json"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="every stage on CPU with tiny shapes")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for the whole session")
    ap.add_argument("--work", default="/tmp/pairuni_session", help="where results are written (not $OUT)")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/pairuni_out"), help="where the packed files go")
    args = ap.parse_args(argv)
    deadline = time.monotonic() + args.budget
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    (work / "results").mkdir()
    if not args.dry_run:
        os.environ.setdefault("FORCE_CUDA", "1")
        os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    env = environment(args.dry_run)
    records, extra = [{"stage": "environment", "status": "ok", "seconds": 0.0}], {}
    for name, cmd, timeout in stages(args, work):
        if name == "environment":
            continue
        left = deadline - time.monotonic() - 15  # the packing needs a few seconds
        if left < 5:
            records.append({"stage": name, "status": "skipped: session budget spent", "seconds": 0.0})
            continue
        if name == "optimizer":
            t0 = time.perf_counter()
            extra["optimizer"] = install_bitsandbytes(work, args.dry_run)
            records.append({"stage": name, "status": "ok", "seconds": round(time.perf_counter() - t0, 1)})
            continue
        if name == "train_7b":
            cmd = cmd + ["--optimizer", extra["optimizer"]["optimizer"]]
        record = run_stage(name, cmd, min(timeout, left), work / "logs")
        records.append(record)
        print(f"{name}: {record['status']} ({record['seconds']} s)", flush=True)
    trained = sorted((work / "results").glob("train_one_gpu_*.md"))
    if trained:
        extra["train"] = trained[0].read_text()
    summary = summary_markdown(records, env, extra)
    files = pack(work, Path(args.out), summary, {"environment": env, "stages": records, **extra})
    print(summary)
    print("packed:", ", ".join(str(f) for f in files))
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
