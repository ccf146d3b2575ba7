"""The whole GPU session in one call: build, Triton compiles, GPU tests, kernel benchmarks, PairGRPO steps of 7B.

    bash benchmarks/gpu_session.sh                 # on the GPU machine, with wheels/ beside it (`make wheels`)
    python benchmarks/gpu_session.py --dry-run     # every stage on CPU with tiny shapes (make test runs it)

Written for one command on a GPU machine with no network and a hard time limit (one H100 80 GB or H200,
16 cores, torch 2.11 + CUDA 13, Triton 3.6, transformers 5.17), so nothing it measured may be lost:
- every stage runs in its own process group with its own time cap (CAPS), so a stage that fails,
  hangs or runs out of memory is recorded, nothing it started keeps running, and the next one runs;
- every stage imports this checkout (it is first on the children's PYTHONPATH), so a failed build
  leaves the Python stages running: the sampler records that cfg_sample ran the reference;
- every benchmark writes each row as soon as it is measured (run_all's RowLog, train_one_gpu after
  each step), so a stage cut by its cap keeps the rows before the cut;
- a baseline that fails (transformers' `generate`, a missing wheel) is a row or a stage that says
  so, and the stage goes on; a stage whose precondition is missing (no bitsandbytes for lora_4bit,
  no nvcc for build, no GPU) is "skipped: <why>", not "failed";
- after EVERY stage, and every SNAPSHOT_EVERY_S seconds while one runs, this script rewrites $OUT
  atomically (session.tgz, summary.md, summary.json; 3 files, the device returns at most 8), so even
  when the device kills the whole command, $OUT holds everything measured until then. The stages
  run without OUT in their environment and never write there themselves;
- the caps sum to at most 7 minutes with the pack reserve (test_gpu_session checks the sum). A stage
  may run until the end of its slot in the schedule (the sum of the caps up to it), so time that an
  earlier stage did not use goes to the next ones, and no stage can take a later stage's time.

Stages, in this order (seconds: the cap on the GPU machine, see CAPS for the reasoning):
  environment  device, driver, compute capability, python / torch / triton / transformers / CUDA,
               nvcc, ninja, which pairuni_kernels the stages import
  build        pairuni_kernels._C with the CUDA sources, against the machine's torch (pip -e, no deps),
               for the machine's own arch only (TORCH_CUDA_ARCH_LIST from its compute capability);
               then, in a fresh process, whether the CPU and CUDA kernels of pairuni::cfg_sample registered
  compile      every Triton kernel variant for this GPU, ahead, on all cores (`kernel_resources.py
               --warm-cache --workers N --verify-jit`) into the one TRITON_CACHE_DIR every stage uses;
               --verify-jit then runs each kernel's JIT launch path (`warmup`) and fails on a cache miss
  optimizer    bitsandbytes from the carried wheel (pip --no-index --target); without it the 7B step
               uses torch AdamW and the summary says so
  gpu_tests    the kernel test suite on GPU tensors, in parallel pytest processes (one block of the
               collected tests each)
  sampler, policy_loss, advantages   benchmarks/run_all.py suites
  linear       the fused linear loss at two Janus head shapes (image 7B, text 7B): fused, unfused, matmuls
  trl_head     our fused head + loss against TRL 1.16's fused head (ChunkedLogProbFunction) + its torch loss,
               Qwen-class (V 151,936) and Janus-Pro text / image heads, a few thousand tokens, one process;
               TRL from the environment or wheels/trl-*.whl (benchmarks/bench_trl_head.py)
  train_7b     two PairGRPO steps of random-weight Janus-Pro-7B (benchmarks/train_one_gpu.py)
  rollout      the engine's image rollout vs transformers' generate, Janus-Pro-1B shapes, B=16, 64 tokens
  lora_4bit    one PairGRPO step of random-weight Janus-Pro-7B with LoRA r=64 on a 4-bit NF4 base
               (configs/janus_pro_7b_24gb.yaml's method; peaks from torch and cudaMemGetInfo)

The dry run takes the same stages on CPU with tiny shapes and no torch.compile: the extension check
instead of the build, the Triton compiles for sm_90, the launch tests, the quick benchmark suites, the
two quick linear shapes, train_one_gpu.py --smoke (LoRA on a bf16 base: NF4 needs CUDA), each stage
under its cap x DRY_SLOWDOWN (a 2-core CI machine against the 16-core GPU machine). Everything is
written under --work; $OUT gets the packed copies.

Testing: `--inject STAGE=raise` makes a stage fail, `--inject STAGE=hang` makes it start a child and
both sleep, `--inject SUITE_STAGE=hang-after-N` makes a benchmark suite hang after N rows;
`--stage-timeout STAGE=SECONDS` sets a stage's cap; `--only A,B` runs only those stages;
`--kernel-resources PATH` replaces the compile stage's script.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from _isolate import STAGE_GROUP_ENV, atomic_write, run_group
from run_all import HANG_AFTER_ROWS_ENV, markdown_table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
WHEELS = ROOT / "wheels"
KERNEL_RESOURCES = HERE / "kernel_resources.py"
STAGES = ("environment", "build", "compile", "optimizer", "gpu_tests", "sampler", "policy_loss", "advantages",
          "linear", "trl_head", "train_7b", "rollout", "lora_4bit")
# Seconds each stage may take on the GPU machine (one H100/H200, 16 cores, torch 2.11, Triton 3.6),
# estimated from what it must do there; they sum to 405 s, 420 s with PACK_RESERVE_S.
CAPS = {
    # import torch on a cold disk (~5 s), CUDA init, nvidia-smi, nvcc --version
    "environment": 12,
    # two translation units (the C++ op with torch's headers, ~30 s; the .cu for the one arch of this GPU,
    # ~40 s), in parallel under ninja, plus pip's own ~5 s (~45 s); without ninja they run one after the
    # other (~75 s, over the cap: the environment stage records whether ninja is there)
    "build": 70,
    # 119 Triton variants x 3 divisibility specialisations for the one arch, ~0.2-0.4 s each (ptxas
    # included; 357 took 72 s on 2 CPU cores) over 16 workers, plus the workers' start (import triton)
    "compile": 20,
    # unzip one bitsandbytes wheel (--target) and import it once (torch warm by now); 0 s without a wheel
    "optimizer": 10,
    # ~630 tests in 8 parallel pytest processes: each starts torch + CUDA (~4 s), runs its block with the
    # kernels warm from the compile stage, and builds Triton's launchers for its signatures (~1 s each)
    "gpu_tests": 40,
    # 2 dtypes x 4 batches x 7 implementations of one sub-millisecond decode step, 30 repetitions, one
    # CUDA graph capture per case; mostly the start (torch, transformers' logits processors)
    "sampler": 15,
    # 5 shapes x {eager, Triton, compiled}: one dynamic-shape Inductor compile of forward + backward
    # (~15 s) dominates; the largest shape (16M tokens) runs in about a millisecond
    "policy_loss": 30,
    # 4 sizes x 2 implementations, up to 4M elements, 10 repetitions: start-up bound
    "advantages": 8,
    # 2 shapes x 3 implementations, each in its own process (~4 s start + CUDA context, warm-up and 11
    # steps at 8x576 / 8x512 tokens against a 4096 x 16384 or 102400 head); `compiled` is left out: an
    # Inductor compile per case would double the stage
    "linear": 30,
    # 8 shapes x {pairuni, trl} in ONE process (memory from max_memory_allocated): start, CUDA and TRL
    # imports (~8 s), TRL's two Triton kernels compiled at first use (~3 s; ours are warm from compile),
    # then 2 + 1 + 5 steps per row of at most ~40 ms (7B head, 4096 tokens: three 4.5 TFLOP matmuls)
    "trl_head": 25,
    # random-init 7B on the GPU (~5 s), then 2 steps, each dominated by 576 eager decode steps of 7B for
    # 4 CFG image rows (~25-35 ms a step) plus 64 answer tokens and the checkpointed update (~5 s)
    "train_7b": 75,
    # Janus-Pro-1B in bf16 (~3 s), transformers' generate and the engine, 64 image tokens for B=16, one
    # warm-up and one timed rollout each (~2 s), and the copy bandwidth; start-up dominates
    "rollout": 20,
    # 7B built, quantized to NF4 (~15 s), LoRA attached, then ONE step (peak memory is the point; the
    # 4-bit decode is ~2x slower than bf16, 576 steps ~35 s)
    "lora_4bit": 50,
}
PACK_RESERVE_S = 15  # kept back from the budget for the snapshots between stages and the final pack
BUDGET_S = 420.0  # the whole command: the device's 600 s per command less room for the start and transfers
# The dry run gives each stage its cap x this: the CI machine's 2 (shared) cores against the GPU machine's
# 16. The CPU-bound parallel work is the same in both runs (the Triton compiles: 357 for sm_90 took 72 s
# on 2 loaded cores, about 8x what 16 cores take), while the dry run's tiny shapes turn the GPU work
# into small CPU work, so each dry stage must finish within 8x what its real one may take.
DRY_SLOWDOWN = 8.0
SNAPSHOT_EVERY_S = 20.0  # $OUT is refreshed this often while a stage runs
LINEAR_CASES = ("image 8x576 H4096", "text 8x512 H4096")
DRY_LINEAR_CASES = ("quick image 4x128 H256", "quick text 2x128 H256")
LINEAR_IMPLS = ("fused", "unfused", "matmuls")
SUITES = {"sampler": "sampling", "policy_loss": "policy_loss", "advantages": "advantages", "linear": "linear",
          "trl_head": "trl_head", "rollout": "rollout"}
NEEDS_GPU = {"gpu_tests", "sampler", "policy_loss", "advantages", "linear", "trl_head", "train_7b", "rollout",
             "lora_4bit"}
IN_SCRIPT = ("environment", "build", "compile", "optimizer", "gpu_tests")
BUDGET_SPENT = "skipped: session budget spent"
NOT_SELECTED = "skipped: not selected (--only)"
INTERRUPTED = "skipped: the session was interrupted"
SHARD_ENV = "PAIRUNI_TEST_SHARD"
# left out of session.tgz: installed packages, the trainers' run directories, the Triton cache (MBs of cubins)
PACK_SKIP = {"site", "train_run", "lora_run", "triton_cache", "__pycache__"}
PACK_FILE_MAX = 4 << 20  # a larger file (a runaway log) travels as its last PACK_TAIL bytes
PACK_TAIL = 1 << 20
HANG = ("import os, subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)']);"
        " open(sys.argv[1], 'w').write(f'{os.getpid()} {child.pid}'); time.sleep(3600)")
EXTENSION_CHECK = """
import json, torch
info = {}
try:
    import pairuni_kernels._C  # noqa: F401
    info["extension"] = True
except ImportError as exc:
    info["extension"], info["import_error"] = False, str(exc)[:300]
import pairuni_kernels
info["module"] = pairuni_kernels.__file__
for key in ("CPU", "CUDA"):
    info[key.lower() + "_kernel"] = info["extension"] and torch._C._dispatch_has_kernel_for_dispatch_key(
        "pairuni::cfg_sample", key)
print(json.dumps(info))
"""


class Interrupted(BaseException):
    """SIGTERM / SIGHUP to the session: stop the running stage, save, exit."""


# ----------------------------------------------------------------------------- stages run by this script
def skip(work: Path, name: str, reason: str) -> int:
    """A stage whose precondition is missing: the session records "skipped: <reason>"."""
    atomic_write(work / "logs" / f"{name}.skip", reason)
    print(f"skipped: {reason}", flush=True)
    return 0


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if os.access("/usr/local/cuda/bin/nvcc", os.X_OK) else None)


def version_of(package: str) -> str | None:
    """The installed version, from the package's metadata (importing peft would import transformers: seconds)."""
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(dry: bool) -> dict:
    import importlib.util

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "dry_run": dry, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "cuda_available": torch.cuda.is_available()}
    for module in ("triton", "transformers", "peft", "setuptools"):
        env[module] = version_of(module)
    env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({env['cpu']})"
    if torch.cuda.is_available():
        env["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        env["capability"] = "{}.{}".format(*torch.cuda.get_device_capability())
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        env["nvidia_smi"] = smi.stdout.strip()
    nvcc = find_nvcc()
    env["nvcc"] = nvcc
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=10).stdout
        env["nvcc_version"] = (re.findall(r"release [\d.]+", out) or [out.strip()[-60:]])[0]
    env["ninja"] = shutil.which("ninja")
    env["CUDA_HOME"] = os.environ.get("CUDA_HOME")
    env["TRITON_CACHE_DIR"] = os.environ.get("TRITON_CACHE_DIR")
    spec = importlib.util.find_spec("pairuni_kernels")  # which copy the stages import (without importing it)
    env["pairuni_kernels"] = str(Path(spec.origin).parent) if spec and spec.origin else None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    env["commit"] = commit.stdout.strip() or None  # the device's copy of the tree has no .git
    return env


def build(work: Path, dry: bool, arch: str | None) -> int:
    """Real run: pip -e with the CUDA sources for `arch`; both: which kernels of the extension registered."""
    info: dict = {"dry_run": dry}
    if not dry:
        nvcc = find_nvcc()
        if nvcc is None:
            return skip(work, "build", "nvcc not found (CUDA_HOME, PATH, /usr/local/cuda): no CUDA kernel can be "
                                       "built, cfg_sample runs the reference")
        try:
            import setuptools  # noqa: F401  (pip --no-build-isolation builds with the environment's setuptools)
        except ImportError:
            print("build: setuptools is not installed in this Python: pip --no-build-isolation cannot build",
                  flush=True)
            return 1
        env = dict(os.environ)
        if arch:
            env["TORCH_CUDA_ARCH_LIST"] = arch
        info.update(nvcc=nvcc, arch_list=env.get("TORCH_CUDA_ARCH_LIST"), max_jobs=env.get("MAX_JOBS"),
                    ninja=shutil.which("ninja"), cuda_home=env.get("CUDA_HOME"))
        print(f"build: {json.dumps(info)}", flush=True)
        t0 = time.perf_counter()
        pip = subprocess.run([PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", str(ROOT)],
                             cwd=ROOT, env=env)
        info.update(pip_exit=pip.returncode, pip_seconds=round(time.perf_counter() - t0, 1))
        if pip.returncode != 0:
            atomic_write(work / "build.json", json.dumps(info, indent=1))
            return pip.returncode
    check = subprocess.run([PY, "-c", EXTENSION_CHECK], capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = [ln for ln in check.stdout.splitlines() if ln.startswith("{")]
    info.update(json.loads(lines[-1]) if lines else {"extension": False, "check_error": check.stderr[-800:]})
    atomic_write(work / "build.json", json.dumps(info, indent=1))
    print(json.dumps(info, indent=1), flush=True)
    if not info.get("extension"):
        print(f"build: pairuni_kernels._C does not import: {info.get('import_error', info.get('check_error'))}")
        return 1
    if not dry and not info.get("cuda_kernel"):
        print("build: pairuni_kernels._C has no CUDA kernel for pairuni::cfg_sample (built without CUDA)")
        return 1
    return 0


def cache_files(folder: str | None) -> int:
    return sum(len(files) for _, _, files in os.walk(folder)) if folder and os.path.isdir(folder) else 0


def compile_kernels(work: Path, dry: bool, arch: str | None, script: Path) -> int:
    """The Triton kernels compiled ahead into TRITON_CACHE_DIR by kernel_resources.py --warm-cache."""
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    helped = subprocess.run([PY, str(script), "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    if helped.returncode != 0 or "--warm-cache" not in helped.stdout:
        return skip(work, "compile", f"{shown} has no --warm-cache (exit {helped.returncode}): the Triton kernels "
                                     "compile at their first launch instead")
    workers = os.cpu_count() or 1
    cmd = [PY, str(script), "--warm-cache", "--workers", str(workers)]
    target = arch.replace(".", "") if arch else ("90" if dry else None)  # CPU: compile for sm_90, the H100's
    if target and "--arch" in helped.stdout:
        cmd += ["--arch", target]
    if "--verify-jit" in helped.stdout:  # then each kernel's JIT launch path must find its binary cached
        cmd += ["--verify-jit"]
    cache = os.environ.get("TRITON_CACHE_DIR")
    before = cache_files(cache)
    print("compile:", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT)
    info = {"command": [str(shown), *cmd[2:]], "workers": workers, "arch": target, "exit": proc.returncode,
            "seconds": round(time.perf_counter() - t0, 1), "triton_cache_dir": cache,
            "cache_files_before": before, "cache_files_after": cache_files(cache)}
    atomic_write(work / "compile.json", json.dumps(info, indent=1))
    print(json.dumps(info), flush=True)
    return proc.returncode


def install_bitsandbytes(work: Path) -> dict:
    """Installs the carried bitsandbytes wheel into work/site; says which optimizer the 7B step gets."""
    wheels = sorted(glob.glob(str(WHEELS / "bitsandbytes-*.whl")))
    if not wheels:
        return {"optimizer": "adamw", "skip": "no bitsandbytes wheel in wheels/ (make wheels): torch AdamW instead",
                "note": "no bitsandbytes wheel in wheels/ (make wheels): torch AdamW used"}
    if len(wheels) > 1:
        return {"optimizer": "adamw", "note": f"several bitsandbytes wheels in wheels/, keep one: {wheels}"}
    site = work / "site"
    proc = subprocess.run([PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target",
                           str(site), wheels[0]], capture_output=True, text=True, timeout=40)
    if proc.returncode != 0:
        return {"optimizer": "adamw", "note": f"bitsandbytes wheel did not install: {proc.stderr[-500:]}"}
    check = subprocess.run([PY, "-c", "import bitsandbytes; print(bitsandbytes.__version__)"], capture_output=True,
                           text=True, timeout=40, env=dict(os.environ, PYTHONPATH=prepend_path(site)))
    if check.returncode != 0:
        return {"optimizer": "adamw", "note": f"bitsandbytes does not import: {check.stderr[-500:]}"}
    return {"optimizer": "adamw8bit", "bitsandbytes": check.stdout.strip(), "wheel": Path(wheels[0]).name,
            "site": str(site)}


def test_shards(dry: bool) -> int:
    """Parallel pytest processes: half the cores (each also compiles), at most 8 CUDA contexts on the GPU."""
    return 2 if dry else max(1, min(8, (os.cpu_count() or 2) // 2))


def junit_summary(path: Path) -> dict:
    """Counts and the failing tests (first line of each message) of one pytest junit XML."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        return {"junit": f"unreadable: {exc}"}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {"junit": "no testsuite"}
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failing = []
    for case in suite.iter("testcase"):
        bad = case.find("failure")
        bad = bad if bad is not None else case.find("error")
        if bad is not None:
            message = (bad.get("message") or bad.text or "").strip().splitlines()
            failing.append(f"{case.get('classname')}::{case.get('name')}: {message[0][:200] if message else ''}")
    return {**counts, "failing": failing[:40]}


def gpu_tests(work: Path, dry: bool) -> int:
    """The kernel tests split into contiguous blocks, one pytest process each (see `pytest_collection_modifyitems`);
    one row per block in work/gpu_tests.json as each block finishes."""
    tests = ROOT / "tests" / "pairuni_kernels"
    if dry:  # the launch tests only: on CPU the Triton kernels run in the (slow) interpreter
        paths = [str(tests / "test_launch.py")]
    else:
        paths = [str(tests), "--ignore", str(tests / "test_compile.py"), "--ignore", str(tests / "integrations")]
    shards = test_shards(dry)
    folder = work / "gpu_tests"
    folder.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=prepend_path(HERE))  # this module is the sharding plugin
    running, rows = {}, []
    for i in range(shards):
        log = open(folder / f"shard{i}.log", "w")
        cmd = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_session", "--junitxml",
               str(folder / f"shard{i}.xml"), *paths]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=dict(env, **{SHARD_ENV: f"{i}/{shards}"}))
        running[i] = (proc, log, time.perf_counter())
    while running:
        for i, (proc, log, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[i]
            tail = (folder / f"shard{i}.log").read_text(errors="replace").strip().splitlines()
            row = {"shard": f"{i}/{shards}", "exit": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
                   "result": tail[-1][-200:] if tail else "", **junit_summary(folder / f"shard{i}.xml")}
            rows.append(row)
            atomic_write(work / "gpu_tests.json", json.dumps({"shards": shards, "complete": not running,
                                                              "rows": rows}, indent=1))
            print(f"shard {row['shard']}: exit {row['exit']}, {row['result']} ({row['seconds']} s)", flush=True)
            for name in row.get("failing", []):
                print("  FAILED", name, flush=True)
        time.sleep(0.2)
    return 0 if all(r["exit"] in (0, 5) for r in rows) else 1  # 5: a block without tests


def pytest_collection_modifyitems(config, items):
    """pytest hook (`-p gpu_session`): with PAIRUNI_TEST_SHARD=i/n, keep block i of n of the collected tests.
    Contiguous blocks keep a file's tests of one kernel together (fewer Triton compiles in each process)."""
    shard = os.environ.get(SHARD_ENV)
    if not shard:
        return
    index, count = (int(x) for x in shard.split("/"))
    lo, hi = len(items) * index // count, len(items) * (index + 1) // count
    dropped = items[:lo] + items[hi:]
    items[:] = items[lo:hi]
    if dropped:
        config.hook.pytest_deselected(items=dropped)


def run_in_process_stage(args) -> int:
    """`--stage NAME`: one of this script's own stages, in the child process; writes work/NAME.json."""
    name, work, dry = args.stage, Path(args.work), args.dry_run
    if args.inject:
        raise RuntimeError(f"injected failure of stage {name} (--inject {name}=raise)")
    if name == "build":
        return build(work, dry, args.arch)
    if name == "compile":
        return compile_kernels(work, dry, args.arch, Path(args.kernel_resources).resolve())
    if name == "gpu_tests":
        return gpu_tests(work, dry)
    data = environment(dry) if name == "environment" else install_bitsandbytes(work)
    atomic_write(work / f"{name}.json", json.dumps(data, indent=1))
    print(json.dumps(data, indent=1))
    if "skip" in data:
        return skip(work, name, data["skip"])
    # a carried wheel that does not install or import is a failure (torch AdamW is still used)
    return 1 if name == "optimizer" and data["optimizer"] != "adamw8bit" else 0


# ----------------------------------------------------------------------------- the session
def prepend_path(*paths) -> str:
    """PYTHONPATH with `paths` first (once each), then what it held."""
    out: list[str] = []
    for p in [*map(str, paths), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]:
        if p and p not in out:
            out.append(p)
    return os.pathsep.join(out)


def gpu_arch() -> str | None:
    """The GPU's compute capability ("9.0") from nvidia-smi, without importing torch; None without a GPU."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.findall(r"\d+\.\d+", smi.stdout)
    return found[0] if smi.returncode == 0 and found else None


def stage_command(name: str, dry: bool, work: Path, arch: str | None, kernel_resources: Path,
                  optimizer: str) -> list[str]:
    """The command of one stage (each runs in its own process)."""
    results = str(work / "results")
    if name in IN_SCRIPT:
        cmd = [PY, str(Path(__file__).resolve()), "--stage", name, "--work", str(work)]
        cmd += ["--dry-run"] if dry else []
        cmd += ["--arch", arch] if arch else []
        return cmd + (["--kernel-resources", str(kernel_resources)] if name == "compile" else [])
    if name in SUITES:
        cmd = [PY, str(HERE / "run_all.py"), "--device", "cpu" if dry else "cuda", "--out", results,
               "--only", SUITES[name]]
        # on the GPU the rollout stage runs the suite's short case (1B, 64 image tokens, no compile)
        cmd += ["--quick"] if dry or name == "rollout" else []
        if name == "linear":
            cmd += ["--cases", *(DRY_LINEAR_CASES if dry else LINEAR_CASES), "--impls", *LINEAR_IMPLS]
        return cmd
    train = [PY, str(HERE / "train_one_gpu.py"), "--only", "janus-pro-7b", "--out", results, "--optimizer", optimizer]
    train += ["--smoke"] if dry else []
    if name == "train_7b":
        return train + ["--steps", "2", "--run-dir", str(work / "train_run")]
    return train + ["--steps", "1", "--lora-rank", "64", "--lora-quantize", "nf4", "--run-dir", str(work / "lora_run")]


def injected_command(name: str, kind: str, work: Path) -> list[str] | None:
    if kind == "hang":
        return [PY, "-c", HANG, str(work / "logs" / f"{name}.hang.pids")]
    if name in IN_SCRIPT:
        return None  # raised inside the stage's own code, see run_in_process_stage
    return [PY, "-c", f"raise RuntimeError('injected failure of stage {name} (--inject {name}=raise)')"]


def good(status: str) -> bool:
    """ok, or skipped for a stated reason (a missing precondition, not selected); not cut, failed or killed."""
    return status == "ok" or (status.startswith("skipped: ") and status not in (BUDGET_SPENT, INTERRUPTED))


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pack_bytes(path: Path) -> bytes:
    """The file's bytes as read now (a file replaced or growing meanwhile cannot tear the archive)."""
    with open(path, "rb") as fh:
        data = fh.read()
    if len(data) > PACK_FILE_MAX:
        data = f"[first {len(data) - PACK_TAIL} bytes cut by gpu_session.py]\n".encode() + data[-PACK_TAIL:]
    return data


class Session:
    def __init__(self, args, caps: dict[str, float], explicit: dict[str, float]):
        self.args, self.caps, self.explicit = args, caps, explicit
        self.dry = args.dry_run
        self.work, self.out = Path(args.work), Path(args.out)
        self.records: list[dict] = []
        self.running: dict | None = None
        self.env: dict = {"python": platform.python_version(), "dry_run": self.dry}
        self.optimizer: dict = {"optimizer": "adamw", "note": "optimizer stage did not run"}
        self.train_optimizer: str | None = None
        self.complete = False
        self.t0 = time.monotonic()

    # ------------------------------------------------------------------ what is written
    def data(self) -> dict:
        """summary.json: the stages (done, running, pending), every result file's content, the set-up facts."""
        running = {k: v for k, v in self.running.items() if not k.startswith("_")} if self.running else None
        done = {r["stage"] for r in self.records} | ({running["stage"]} if running else set())
        stages = self.records + ([running] if running else [])
        stages += [] if self.complete else [{"stage": s, "status": "pending"} for s in STAGES if s not in done]
        results = {}
        for path in sorted((self.work / "results").glob("*.json")):
            content = read_json(path)
            if content is not None:
                results[path.name] = content
        facts = {name: read_json(self.work / f"{name}.json") for name in ("build", "compile", "gpu_tests")}
        return {"complete": self.complete, "elapsed_s": round(time.monotonic() - self.t0, 1),
                "budget_s": self.args.budget, "caps_s": self.caps, "dry_slowdown": DRY_SLOWDOWN if self.dry else 1,
                "environment": self.env, "stages": stages, "optimizer": self.optimizer,
                "train_optimizer": self.train_optimizer,
                **{k: v for k, v in facts.items() if v is not None}, "results": results}

    def markdown(self, data: dict) -> str:
        env, opt = self.env, self.optimizer
        state = "complete" if self.complete else f"IN PROGRESS or cut short (saved after {data['elapsed_s']} s)"
        lines = ["# GPU session" + (" (dry run on CPU)" if env.get("dry_run") else ""), "",
                 f"Session {state}. Device: {env.get('device', '?')}; python {env.get('python', '?')}, "
                 f"torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, CUDA {env.get('cuda', '?')}, "
                 f"transformers {env.get('transformers', '?')}", "",
                 "```", json.dumps(env, indent=1), "```", "",
                 "| stage | status | seconds | cap (s) |", "|---|---|---|---|"]
        lines += [f"| {r['stage']} | {r['status']} | {r.get('seconds', '')} | {r.get('cap_s', '')} |"
                  for r in data["stages"]]
        lines += ["", f"Optimizer of the 7B step: {self.train_optimizer or 'none (the step did not run)'}; "
                      f"optimizer stage: {opt.get('optimizer', '?')} ({opt.get('note', opt.get('wheel', ''))})", ""]
        for name in ("build", "compile"):
            if name in data:
                lines += [f"{name}: `{json.dumps(data[name])}`", ""]
        if "gpu_tests" in data:
            rows = data["gpu_tests"]["rows"]
            lines += ["## GPU tests", "", markdown_table([{k: v for k, v in r.items() if k != "failing"} for r in rows]),
                      ""] + [f"- FAILED {name}" for r in rows for name in r.get("failing", [])] + [""]
        trained = sorted((self.work / "results").glob("train_one_gpu_*.md"))
        for title, lora in (("7B step", False), ("7B step, LoRA on a 4-bit base", True)):
            lines += [x for path in trained if ("_lora" in path.name) == lora
                      for x in (f"## {title}", "", path.read_text(errors="replace"), "")]
        for file, content in data["results"].items():
            if isinstance(content, dict) and "rows" in content:
                note = "" if content.get("complete", True) else \
                    f" (INCOMPLETE: {len(content['rows'])} rows{'; ' + content['error'] if content.get('error') else ''})"
                lines += [f"## {file}{note}", "", markdown_table(content["rows"]) if content["rows"] else "(no rows)", ""]
        for r in data["stages"]:
            if "tail" in r:
                lines += [f"## {r['stage']}: {r['status']}", "", "```", r["tail"], "```", ""]
        return "\n".join(lines) + "\n"

    def save(self) -> None:
        """summary.{json,md} into work/, then session.tgz and both summaries into $OUT, each replaced whole."""
        data = self.data()
        summary_json, summary_md = json.dumps(data, indent=1, default=str), self.markdown(data)
        atomic_write(self.work / "summary.json", summary_json)
        atomic_write(self.work / "summary.md", summary_md)
        self.out.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for folder, dirs, files in os.walk(self.work):
                dirs[:] = sorted(d for d in dirs if d not in PACK_SKIP)
                for file in sorted(files):
                    path = Path(folder) / file
                    if file.endswith(".partial") or not path.is_file():
                        continue
                    try:
                        payload = pack_bytes(path)
                    except OSError:  # removed meanwhile
                        continue
                    info = tarfile.TarInfo("session/" + str(path.relative_to(self.work)))
                    info.size, info.mtime, info.mode = len(payload), int(time.time()), 0o644
                    tar.addfile(info, io.BytesIO(payload))
        atomic_write(self.out / "session.tgz", buffer.getvalue())
        atomic_write(self.out / "summary.md", summary_md)
        atomic_write(self.out / "summary.json", summary_json)

    def snapshot(self) -> None:
        """Called while a stage runs: its elapsed time, and whatever it has written, reach $OUT."""
        if self.running is not None:
            self.running["seconds"] = round(time.monotonic() - self.running["_t0"], 1)
        self.save()

    # ------------------------------------------------------------------ running the stages
    def child_env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "OUT"}  # results go to work/, never to $OUT
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = prepend_path(ROOT, *([self.optimizer["site"]] if "site" in self.optimizer else []))
        env["TRITON_CACHE_DIR"] = str(self.work / "triton_cache")
        env[STAGE_GROUP_ENV] = "1"  # nested runners (run_all) keep their children in the stage's group
        if not self.dry:
            env.setdefault("FORCE_CUDA", "1")
            env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
            if not env.get("CUDA_HOME") and not env.get("CUDA_PATH") and os.access("/usr/local/cuda/bin/nvcc", os.X_OK):
                env["CUDA_HOME"] = "/usr/local/cuda"  # where `nvcc` on PATH is a wrapper, torch would guess wrong
        return env

    def precondition(self, name: str) -> str | None:
        """Why a stage cannot run here ("skipped: ..."), decided before starting it; None when it can."""
        if self.dry:
            return None
        gpu = self.env.get("cuda_available")
        if gpu is None:  # the environment stage did not run or failed
            gpu = shutil.which("nvidia-smi") is not None
        if name in NEEDS_GPU and not gpu:
            return "skipped: no CUDA device (torch.cuda.is_available() is false)"
        if name == "lora_4bit" and "bitsandbytes" not in self.optimizer:
            return f"skipped: 4-bit NF4 needs bitsandbytes, not installed ({self.optimizer.get('note', '')})"
        return None

    def timeout(self, index: int, name: str, left: float) -> float:
        if name in self.explicit:
            return min(self.explicit[name], left)
        if self.dry:  # each stage within its own cap x DRY_SLOWDOWN: no time carried between stages
            return min(self.caps[name], left)
        slot_end = self.t0 + sum(self.caps[s] for s in STAGES[:index + 1])  # the schedule: time saved carries on
        return min(slot_end - time.monotonic(), left)

    def run_stage(self, index: int, name: str, inject: dict[str, str], deadline: float) -> dict:
        left = deadline - PACK_RESERVE_S - time.monotonic()
        record = {"stage": name, "cap_s": self.caps[name]}
        if self.args.only and name not in self.args.only:
            return {**record, "status": NOT_SELECTED, "seconds": 0.0}
        if left < 5:
            return {**record, "status": BUDGET_SPENT, "seconds": 0.0}
        reason = self.precondition(name)
        if reason:
            return {**record, "status": reason, "seconds": 0.0}
        if name in ("train_7b", "lora_4bit"):  # the 8-bit optimizer needs CUDA: the dry run only checks the wheel
            self.train_optimizer = "adamw" if self.dry else self.optimizer["optimizer"]
        arch = self.env.get("capability") or (None if self.dry else gpu_arch())
        cmd = stage_command(name, self.dry, self.work, arch, Path(self.args.kernel_resources),
                            self.train_optimizer or "adamw")
        env = self.child_env()
        kind = inject.get(name)
        if kind and kind.startswith("hang-after-"):
            env[HANG_AFTER_ROWS_ENV] = kind[len("hang-after-"):]
        elif kind:
            cmd = injected_command(name, kind, self.work) or cmd + ["--inject", "raise"]
        timeout = max(1.0, self.timeout(index, name, left))
        record["timeout_s"] = round(timeout, 1)
        log = self.work / "logs" / f"{name}.log"
        self.running = {**record, "status": "running", "seconds": 0.0, "_t0": time.monotonic()}
        self.save()
        t0 = time.monotonic()
        try:
            with log.open("w") as fh:
                code, _ = run_group(cmd, timeout, tick=self.snapshot, every=SNAPSHOT_EVERY_S, stdout=fh,
                                    stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        except Interrupted as stop:
            record.update(status=f"killed: the session was interrupted ({stop})",
                          seconds=round(time.monotonic() - t0, 1), tail=log.read_text(errors="replace")[-2000:])
            self.running = None
            self.records.append(record)
            raise
        self.running = None
        skipped = self.work / "logs" / f"{name}.skip"
        if code is None:
            status = f"timed out after {timeout:.0f} s"
        elif code == 0:
            status = f"skipped: {skipped.read_text()}" if skipped.exists() else "ok"
        else:
            status = f"failed (exit {code})"
        record.update(status=status, seconds=round(time.monotonic() - t0, 1))
        if not good(status):
            record["tail"] = log.read_text(errors="replace")[-2000:]
        return record

    def after(self, record: dict) -> None:
        """What later stages take from a finished one."""
        name, status = record["stage"], record["status"]
        if name == "environment" and status == "ok":
            self.env = read_json(self.work / "environment.json") or self.env
        elif name == "optimizer":
            found = read_json(self.work / "optimizer.json") if status != NOT_SELECTED else None
            self.optimizer = found or {"optimizer": "adamw", "note": f"optimizer stage {status}"}
            if found and not good(status):
                found["note"] = f"optimizer stage {status}: {found.get('note', '')}"

    def run(self, inject: dict[str, str]) -> int:
        deadline = self.t0 + self.args.budget
        shutil.rmtree(self.work, ignore_errors=True)
        for sub in ("logs", "results", "triton_cache"):
            (self.work / sub).mkdir(parents=True)
        self.save()
        try:
            for index, name in enumerate(STAGES):
                record = self.run_stage(index, name, inject, deadline)
                self.records.append(record)
                print(f"{name}: {record['status']} ({record['seconds']} s)", flush=True)
                self.after(record)
                self.save()
        except Interrupted:
            self.running = None
            done = {r["stage"] for r in self.records}
            self.records += [{"stage": s, "status": INTERRUPTED, "seconds": 0.0} for s in STAGES if s not in done]
        except Exception as exc:  # a fault of this script itself: still write what was recorded
            self.running = None
            self.records.append({"stage": "session", "status": f"failed: {type(exc).__name__}: {exc}", "seconds": 0.0})
        self.complete = True
        self.save()
        print(self.markdown(self.data()))
        print("packed:", ", ".join(str(self.out / f) for f in ("session.tgz", "summary.md", "summary.json")))
        return 0 if [r["stage"] for r in self.records] == list(STAGES) and all(good(r["status"]) for r in self.records) \
            else 1


def pairs(values: list[str], what: str, choices=None) -> dict[str, str]:
    """STAGE=VALUE options; `choices` also admits hang-after-N for the benchmark-suite stages."""
    result = {}
    for value in values:
        name, sep, arg = value.partition("=")
        rows = re.fullmatch(r"hang-after-\d+", arg) is not None and name in SUITES
        if not sep or name not in STAGES or (choices and arg not in choices and not rows):
            expected = "|".join(choices) + f"|hang-after-N (N rows; {', '.join(SUITES)})" if choices else "VALUE"
            raise SystemExit(f"{what}: expected STAGE={expected} with STAGE in {STAGES}, got {value!r}")
        result[name] = arg
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="every stage on CPU with tiny shapes")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds for the whole session ({BUDGET_S:.0f}; x{DRY_SLOWDOWN:g} in the dry run)")
    ap.add_argument("--work", default="/tmp/pairuni_session", help="where results are written (not $OUT)")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/pairuni_out"), help="where the packed files go")
    ap.add_argument("--inject", action="append", default=[], metavar="STAGE=raise|hang|hang-after-N",
                    help="make a stage fail or hang, or a benchmark stage hang after N rows (tests the isolation)")
    ap.add_argument("--stage-timeout", action="append", default=[], metavar="STAGE=SECONDS",
                    help="another cap for a stage")
    ap.add_argument("--only", action="append", default=[], metavar="STAGE[,STAGE...]",
                    help="run only these stages (the others are recorded as not selected)")
    ap.add_argument("--kernel-resources", default=str(KERNEL_RESOURCES),
                    help="the compile stage's script (kernel_resources.py; tests pass a stand-in)")
    ap.add_argument("--stage", choices=IN_SCRIPT, help=argparse.SUPPRESS)
    ap.add_argument("--arch", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stage:  # a child process running one of this script's own stages
        return run_in_process_stage(args)
    args.only = {s for value in args.only for s in value.split(",") if s}
    unknown = args.only - set(STAGES)
    if unknown:
        raise SystemExit(f"--only: unknown stages {sorted(unknown)}; stages: {STAGES}")
    inject = pairs(args.inject, "--inject", ("raise", "hang"))
    factor = DRY_SLOWDOWN if args.dry_run else 1.0
    if args.budget is None:
        args.budget = BUDGET_S * factor
    caps = {name: CAPS[name] * factor for name in STAGES}
    explicit = {name: float(s) for name, s in pairs(args.stage_timeout, "--stage-timeout").items()}
    caps.update(explicit)

    def interrupted(signum, frame):
        for sig in (signal.SIGTERM, signal.SIGHUP):  # once: the summary is being finished
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    return Session(args, caps, explicit).run(inject)


if __name__ == "__main__":
    sys.exit(main())
