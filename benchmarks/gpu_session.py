"""The whole GPU session in one call: build, GPU tests, kernel benchmarks, a Janus-Pro-7B PairGRPO step.

    # on the lent GPU machine (wheels/ carried; see `make wheels` and README "Benchmarks"), one device call:
    #   run(command="bash benchmarks/gpu_session.sh", carry=["wheels"], timeout_s=600)
    python benchmarks/gpu_session.py --dry-run     # every stage on CPU with tiny shapes (CI runs this)

Stages, in this order, each in its own process group with its own timeout inside one overall deadline
(`--budget`, 9 minutes by default), so a stage that fails, hangs or runs out of memory is recorded,
nothing it started keeps running, the next one still runs, and the summary is always written:
  environment  device name, driver, python / torch / triton / CUDA versions
  build        pairuni_kernels._C with the CUDA sources, against the machine's torch (no deps)
  optimizer    bitsandbytes from the carried wheel (pip --no-index --target); without it the
               7B step uses torch AdamW and the summary says so (the dry run installs the wheel
               when there is one, but its 7B step always uses AdamW)
  gpu_tests    the kernel test suite on GPU tensors
  sampler, policy_loss, advantages   benchmarks/run_all.py suites
  linear       the fused linear loss at two Janus head shapes (image 7B, text 7B)
  train_7b     two PairGRPO steps of random-weight Janus-Pro-7B (benchmarks/train_one_gpu.py)
  rollout      the engine's image rollout vs transformers' generate, Janus-Pro-1B shapes, B=16, 64 tokens
  lora_4bit    two PairGRPO steps of random-weight Janus-Pro-7B with LoRA r=64 on a 4-bit NF4 base
               (configs/janus_pro_7b_24gb.yaml's method; peaks from torch and cudaMemGetInfo); the dry
               run trains the tiny shapes' LoRA on a bf16 base and says that NF4 was skipped
The dry run takes the same stages with tiny shapes and no torch.compile: the quick benchmark suites,
the two quick linear shapes, and train_one_gpu.py --smoke (the engine's tiny vision and VQ models).
Everything is written under --work (outside $OUT); at the end it is packed into --out ($OUT) as
session.tgz plus summary.md and summary.json (3 files; the device returns at most 8). The stages run
without OUT in their environment, so none of them writes there directly.

Testing the isolation: `--inject STAGE=raise` makes a stage fail, `--inject STAGE=hang` makes it start
a child and both sleep until the stage's timeout (`--stage-timeout STAGE=SECONDS` shortens it).
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

from _isolate import run_group

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
LINEAR_CASES = ("image 8x576 H4096", "text 8x512 H4096")
DRY_LINEAR_CASES = ("quick image 4x128 H256", "quick text 2x128 H256")
WHEELS = ROOT / "wheels"
STAGES = ("environment", "build", "optimizer", "gpu_tests", "sampler", "policy_loss", "advantages", "linear",
          "train_7b", "rollout", "lora_4bit")
# seconds per stage on the GPU machine; the 9-minute deadline cuts any of them shorter
TIMEOUTS = {"environment": 30, "build": 150, "optimizer": 60, "gpu_tests": 75, "sampler": 45, "policy_loss": 60,
            "advantages": 20, "linear": 90, "train_7b": 170,
            "rollout": 90, "lora_4bit": 150}
DRY_TIMEOUT = 120  # per stage in the dry run: generous, since CI machines are slow and shared
PACK_RESERVE_S = 15  # kept back from the deadline for the summary and the packing
HANG = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)']);"
        " open(sys.argv[1], 'w').write(str(child.pid)); time.sleep(3600)")


def stage_commands(dry: bool, work: Path) -> dict[str, list[str]]:
    """The command of every stage (each runs in its own process)."""
    results = str(work / "results")
    me = [PY, str(Path(__file__).resolve()), "--work", str(work)] + (["--dry-run"] if dry else [])
    bench = [PY, str(ROOT / "benchmarks" / "run_all.py"), "--device", "cpu" if dry else "cuda", "--out", results]
    bench += ["--quick"] if dry else []
    if dry:
        build = [PY, "-c", "import pairuni_kernels._ext as e; assert e.has_extension(); print('extension present')"]
        tests = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests/pairuni_kernels/test_launch.py")]
    else:
        build = [PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", str(ROOT)]
        tests = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests/pairuni_kernels"),
                 "--ignore", str(ROOT / "tests/pairuni_kernels/test_compile.py"),
                 "--ignore", str(ROOT / "tests/pairuni_kernels/integrations")]
    train = [PY, str(ROOT / "benchmarks" / "train_one_gpu.py"), "--only", "janus-pro-7b", "--steps", "2",
             "--out", results, "--run-dir", str(work / "train_run")] + (["--smoke"] if dry else [])
    return {
        "environment": me + ["--stage", "environment"],
        "build": build,
        "optimizer": me + ["--stage", "optimizer"],
        "gpu_tests": tests,
        "sampler": bench + ["--only", "sampling"],
        "policy_loss": bench + ["--only", "policy_loss"],
        "advantages": bench + ["--only", "advantages"],
        "linear": bench + ["--only", "linear", "--cases", *(DRY_LINEAR_CASES if dry else LINEAR_CASES)],
        "train_7b": train,
        "rollout": bench + ["--only", "rollout"] + ([] if dry else ["--quick"]),
        "lora_4bit": [PY, str(ROOT / "benchmarks" / "train_one_gpu.py"), "--only", "janus-pro-7b", "--steps", "2",
                      "--lora-rank", "64", "--lora-quantize", "nf4", "--out", results,
                      "--run-dir", str(work / "lora_run")] + (["--smoke"] if dry else []),
    }


# ----------------------------------------------------------------------------- stages run by this script
def environment(dry: bool) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "dry_run": dry, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({env['cpu']})"
    if torch.cuda.is_available():
        env["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        env["nvidia_smi"] = smi.stdout.strip()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    env["commit"] = commit.stdout.strip() or None  # the device's copy of the tree has no .git
    return env


def install_bitsandbytes(work: Path) -> dict:
    """Installs the carried bitsandbytes wheel into work/site; says which optimizer the 7B step gets."""
    wheels = sorted(glob.glob(str(WHEELS / "bitsandbytes-*.whl")))
    if not wheels:
        return {"optimizer": "adamw", "note": "no bitsandbytes wheel in wheels/ (make wheels): torch AdamW used"}
    if len(wheels) > 1:
        return {"optimizer": "adamw", "note": f"several bitsandbytes wheels in wheels/, keep one: {wheels}"}
    site = work / "site"
    proc = subprocess.run([PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target",
                           str(site), wheels[0]], capture_output=True, text=True, timeout=40)
    if proc.returncode != 0:
        return {"optimizer": "adamw", "note": f"bitsandbytes wheel did not install: {proc.stderr[-500:]}"}
    check = subprocess.run([PY, "-c", "import bitsandbytes; print(bitsandbytes.__version__)"], capture_output=True,
                           text=True, timeout=40, env=dict(os.environ, PYTHONPATH=site_path(site)))
    if check.returncode != 0:
        return {"optimizer": "adamw", "note": f"bitsandbytes does not import: {check.stderr[-500:]}"}
    return {"optimizer": "adamw8bit", "bitsandbytes": check.stdout.strip(), "wheel": Path(wheels[0]).name,
            "site": str(site)}


def site_path(site: Path | str) -> str:
    return os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))


def run_in_process_stage(name: str, work: Path, dry: bool, inject: str | None) -> int:
    """`--stage NAME`: one of this script's own stages, in the child process; writes work/NAME.json."""
    if inject == "raise":
        raise RuntimeError(f"injected failure of stage {name} (--inject {name}=raise)")
    data = environment(dry) if name == "environment" else install_bitsandbytes(work)
    (work / f"{name}.json").write_text(json.dumps(data, indent=1))
    print(json.dumps(data, indent=1))
    return 0


# ----------------------------------------------------------------------------- the session
def run_stage(name: str, cmd: list[str], timeout: float, logs: Path, env: dict) -> dict:
    """Runs one stage in its own process group; its output goes to logs/NAME.log."""
    log = logs / f"{name}.log"
    t0 = time.perf_counter()
    with log.open("w") as fh:
        code, _ = run_group(cmd, timeout, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    status = f"timed out after {timeout:.0f} s" if code is None else "ok" if code == 0 else f"failed (exit {code})"
    record = {"stage": name, "status": status, "seconds": round(time.perf_counter() - t0, 1)}
    if status != "ok":
        record["tail"] = log.read_text(errors="replace")[-2000:]
    return record


def injected_command(name: str, kind: str, work: Path, dry: bool) -> list[str] | None:
    if kind == "hang":
        return [PY, "-c", HANG, str(work / "logs" / f"{name}.hang_child.pid")]
    if name in ("environment", "optimizer"):
        return None  # raised inside the stage's own code, see run_in_process_stage
    return [PY, "-c", f"raise RuntimeError('injected failure of stage {name} (--inject {name}=raise)')"]


def summary_markdown(records: list[dict], env: dict, extra: dict) -> str:
    opt = extra.get("optimizer", {})
    lines = ["# GPU session" + (" (dry run on CPU)" if env.get("dry_run") else ""), "",
             f"Device: {env.get('device', '?')}; python {env.get('python', '?')}, torch {env.get('torch', '?')}, "
             f"triton {env.get('triton', '?')}, CUDA {env.get('cuda', '?')}", "",
             "```", json.dumps(env, indent=1), "```", "",
             "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']} |" for r in records]
    lines += ["", f"Optimizer of the 7B step: {extra.get('train_optimizer', 'none (the step did not run)')}; "
              f"optimizer stage: {opt.get('optimizer', '?')} ({opt.get('note', opt.get('wheel', ''))})", ""]
    if extra.get("train"):
        lines += ["## 7B step", "", extra["train"], ""]
    if extra.get("train_lora"):
        lines += ["## 7B step, LoRA on a 4-bit base", "", extra["train_lora"], ""]
    for r in records:
        if "tail" in r:
            lines += [f"## {r['stage']}: {r['status']}", "", "```", r["tail"], "```", ""]
    return "\n".join(lines) + "\n"


def pack(work: Path, out: Path, summary: str, data: dict) -> list[Path]:
    """At most 3 files in $OUT: the work directory (less the installed wheel and the trainer's run
    directory) as one tar, and the summary twice."""
    out.mkdir(parents=True, exist_ok=True)
    (work / "summary.md").write_text(summary)
    (work / "summary.json").write_text(json.dumps(data, indent=1))
    skip = {"session/site", "session/train_run"}
    with tarfile.open(out / "session.tgz", "w:gz") as tar:
        tar.add(work, arcname="session", filter=lambda t: None if t.name in skip else t)
    shutil.copy(work / "summary.md", out / "summary.md")
    shutil.copy(work / "summary.json", out / "summary.json")
    return [out / "session.tgz", out / "summary.md", out / "summary.json"]


def pairs(values: list[str], what: str, choices=None) -> dict[str, str]:
    result = {}
    for value in values:
        name, sep, arg = value.partition("=")
        if not sep or name not in STAGES or (choices and arg not in choices):
            raise SystemExit(f"{what}: expected STAGE=" + ("|".join(choices) if choices else "VALUE")
                             + f" with STAGE in {STAGES}, got {value!r}")
        result[name] = arg
    return result


def session(args, inject: dict[str, str], timeouts: dict[str, float]) -> int:
    deadline = time.monotonic() + args.budget
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    (work / "results").mkdir()
    child_env = {k: v for k, v in os.environ.items() if k != "OUT"}  # results go to work/, never to $OUT
    child_env["PYTHONUNBUFFERED"] = "1"
    if not args.dry_run:
        child_env.setdefault("FORCE_CUDA", "1")
        child_env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    env = {"python": platform.python_version(), "dry_run": args.dry_run}
    records, extra = [], {"optimizer": {"optimizer": "adamw", "note": "optimizer stage did not run"}}
    try:
        commands = stage_commands(args.dry_run, work)
        for name in STAGES:
            left = deadline - time.monotonic() - PACK_RESERVE_S
            if left < 5:
                records.append({"stage": name, "status": "skipped: session budget spent", "seconds": 0.0})
                continue
            cmd = commands[name]
            if name in inject:
                cmd = injected_command(name, inject[name], work, args.dry_run) or cmd + ["--inject", "raise"]
            if name in ("train_7b", "lora_4bit"):  # the 8-bit optimizer needs CUDA: the dry run only checks the wheel
                extra["train_optimizer"] = "adamw" if args.dry_run else extra["optimizer"]["optimizer"]
                cmd = cmd + ["--optimizer", extra["train_optimizer"]]
            record = run_stage(name, cmd, min(timeouts[name], left), work / "logs", child_env)
            records.append(record)
            print(f"{name}: {record['status']} ({record['seconds']} s)", flush=True)
            if name == "environment" and record["status"] == "ok":
                env = json.loads((work / "environment.json").read_text())
            elif name == "optimizer":
                if record["status"] == "ok":
                    extra["optimizer"] = json.loads((work / "optimizer.json").read_text())
                else:
                    extra["optimizer"] = {"optimizer": "adamw", "note": f"optimizer stage {record['status']}"}
                if "site" in extra["optimizer"]:
                    child_env["PYTHONPATH"] = site_path(extra["optimizer"]["site"])
    except Exception as exc:  # a fault of this script itself: still write what was recorded
        records.append({"stage": "session", "status": f"failed: {type(exc).__name__}: {exc}", "seconds": 0.0})
    trained = sorted((work / "results").glob("train_one_gpu_*.md"))
    full = [t for t in trained if "_lora" not in t.name]
    if full:
        extra["train"] = full[0].read_text()
    lora = [t for t in trained if "_lora" in t.name]
    if lora:
        extra["train_lora"] = lora[0].read_text()
    summary = summary_markdown(records, env, extra)
    files = pack(work, Path(args.out), summary, {"environment": env, "stages": records, **extra})
    print(summary)
    print("packed:", ", ".join(str(f) for f in files))
    return 0 if len(records) == len(STAGES) and all(r["status"] == "ok" for r in records) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="every stage on CPU with tiny shapes")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for the whole session")
    ap.add_argument("--work", default="/tmp/pairuni_session", help="where results are written (not $OUT)")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/pairuni_out"), help="where the packed files go")
    ap.add_argument("--inject", action="append", default=[], metavar="STAGE=raise|hang",
                    help="make a stage fail or hang (tests the isolation)")
    ap.add_argument("--stage-timeout", action="append", default=[], metavar="STAGE=SECONDS",
                    help="another timeout for a stage")
    ap.add_argument("--stage", choices=("environment", "optimizer"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stage:  # a child process running one of this script's own stages
        return run_in_process_stage(args.stage, Path(args.work), args.dry_run, "raise" if args.inject else None)
    inject = pairs(args.inject, "--inject", ("raise", "hang"))
    timeouts = {name: DRY_TIMEOUT if args.dry_run else TIMEOUTS[name] for name in STAGES}
    timeouts.update({name: float(s) for name, s in pairs(args.stage_timeout, "--stage-timeout").items()})
    return session(args, inject, timeouts)


if __name__ == "__main__":
    sys.exit(main())
