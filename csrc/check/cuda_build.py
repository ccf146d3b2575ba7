"""`make cuda-build`: install this package as a GPU user does, with the GPU machine's versions, and
check what they get. Runs without a GPU (CI does it at every commit); skips in one line without nvcc.

    python3 csrc/check/cuda_build.py            # what `make cuda-build` runs (standard library only)

In a venv kept outside the checkout (PAIRUNI_CUDA_VENV, default ~/.cache/pairuni/cuda-venv) and reused
between runs, holding the versions of csrc/check/gpu_machine.txt (torch 2.11.0, the CUDA 13 build;
Triton 3.6.0; transformers 5.17.0):
  1. venv      created once per version file: pip, wheel, ninja, then torch and the pins, alone;
  2. source    the checkout's files (tracked and not ignored) mirrored into VENV/src, the user's clone;
  3. build     FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" pip install --no-build-isolation -e "src[dev,train]"
               (the README's GPU install), redone only when setup.py, csrc/ or the pins changed;
  4. import    pairuni_kernels._C imports, from src, and `pairuni::cfg_sample` has CPU and CUDA kernels;
  5. sampler   the sampler tests (the CPU kernel of this CUDA build against the reference);
  6. kernels   every Triton kernel variant compiles for sm_80/sm_90 with zero spills under Triton 3.6;
  7. session   the GPU session's dry run (benchmarks/gpu_session.py --dry-run) with transformers 5.17.
Each step prints its time; the first failure ends the run with one line naming the step (exit 1).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PINS = ROOT / "csrc" / "check" / "gpu_machine.txt"
ARCHS = "8.0;9.0"
#: build outputs of the editable install that the mirror keeps between runs
KEEP = ("pairuni_kernels/_C", "pairuni.egg-info", "build/")


class StepFailed(Exception):
    pass


def run(cmd: list[str], **kwargs) -> None:
    print("  $ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, **kwargs)
    if proc.returncode != 0:
        raise StepFailed(f"`{' '.join(cmd[:6])}{' ...' if len(cmd) > 6 else ''}` exited {proc.returncode}")


def digest(paths: list[Path], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for p in sorted(paths):
        h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def tree_files(root: Path) -> list[str]:
    """The files a clone of this checkout has: tracked ones and new ones git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout.decode()
    return [f for f in out.split("\0") if f and (root / f).is_file()]


def mirror(src: Path) -> int:
    """Makes `src` hold exactly the checkout's files (plus the build outputs of KEEP); returns the count."""
    files = tree_files(ROOT)
    wanted = set(files)
    if src.exists():
        for path in sorted(src.rglob("*"), reverse=True):
            rel = path.relative_to(src).as_posix()
            if rel.startswith(KEEP) or "__pycache__" in rel:
                continue
            if path.is_dir() and not path.is_symlink():
                if not any(path.iterdir()):
                    path.rmdir()
            elif rel not in wanted:
                path.unlink()
    for rel in files:
        target = src / rel
        data = (ROOT / rel).read_bytes()
        if not target.exists() or target.read_bytes() != data:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".tmp_mirror")
            tmp.write_bytes(data)
            shutil.copymode(ROOT / rel, tmp)
            os.replace(tmp, target)
    return len(files)


def main() -> int:
    nvcc = shutil.which("nvcc") or (os.environ.get("CUDA_HOME") and shutil.which("nvcc", path=os.path.join(
        os.environ["CUDA_HOME"], "bin")))
    if not nvcc:
        print("cuda-build: nvcc not found (install the CUDA toolkit or set CUDA_HOME), skipped")
        return 0
    venv = Path(os.environ.get("PAIRUNI_CUDA_VENV", Path.home() / ".cache" / "pairuni" / "cuda-venv"))
    venv.parent.mkdir(parents=True, exist_ok=True)
    py, src = venv / "bin" / "python", venv / "src"
    env = dict(os.environ, PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    env.pop("TRITON_INTERPRET", None)
    pip = [str(py), "-m", "pip", "install", "-q"]
    pins = [line for line in PINS.read_text().splitlines() if line.strip() and not line.startswith("#")]
    times: list[tuple[str, float]] = []
    t_all = time.perf_counter()

    with open(venv.parent / (venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two `make test` at once share one venv
        step = "venv"
        try:
            t0 = time.perf_counter()
            stamp, want = venv / ".pairuni-pins", digest([PINS], sys.version)
            if not (py.exists() and stamp.exists() and stamp.read_text() == want):
                print(f"cuda-build: creating {venv} with {', '.join(pins)}", flush=True)
                shutil.rmtree(venv, ignore_errors=True)
                run([sys.executable, "-m", "venv", str(venv)])
                run(pip + ["--upgrade", "pip", "wheel", "ninja"], env=env)
                run(pip + pins, env=env)  # torch first and alone with its pins: nothing later may swap it
                stamp.write_text(want)
            times.append((step, time.perf_counter() - t0))

            step = "source"
            t0 = time.perf_counter()
            count = mirror(src)
            times.append((step, time.perf_counter() - t0))
            print(f"cuda-build: {count} files of the checkout in {src}", flush=True)

            step = "build"
            t0 = time.perf_counter()
            build_inputs = [ROOT / "setup.py", PINS] + [p for p in (ROOT / "csrc").rglob("*") if p.is_file()]
            built, want = venv / ".pairuni-build", digest(build_inputs)
            so = list((src / "pairuni_kernels").glob("_C*.so"))
            if not (built.exists() and built.read_text() == want and so):
                built.unlink(missing_ok=True)
                run(pip + ["--no-build-isolation", "-c", str(PINS), "-e", f"{src}[dev,train]"], cwd=venv,
                    env=dict(env, FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=ARCHS))
                built.write_text(want)
            else:
                print("  (setup.py, csrc/ and the pins unchanged since the last build: not rebuilt)")
            times.append((step, time.perf_counter() - t0))

            step = "import"
            t0 = time.perf_counter()
            check = ("import sys, torch, triton, transformers, pairuni_kernels._C as C; "
                     "assert C.__file__.startswith(sys.argv[1]), C.__file__; "
                     "missing = [k for k in ('CPU', 'CUDA') if not torch._C._dispatch_has_kernel_for_dispatch_key("
                     "'pairuni::cfg_sample', k)]; "
                     "assert not missing, f'pairuni::cfg_sample has no {missing} kernel'; "
                     "print(f'  {C.__file__}: pairuni::cfg_sample has CPU and CUDA kernels (torch {torch.__version__}, "
                     "CUDA {torch.version.cuda}, triton {triton.__version__}, transformers {transformers.__version__})')")
            run([str(py), "-c", check, str(src)], cwd=venv, env=env)
            times.append((step, time.perf_counter() - t0))

            step = "sampler"
            t0 = time.perf_counter()
            run([str(py), "-m", "pytest", "-q", "tests/pairuni_kernels/test_sampling.py"], cwd=src, env=env)
            times.append((step, time.perf_counter() - t0))

            step = "kernels"
            t0 = time.perf_counter()
            run([str(py), "benchmarks/kernel_resources.py", "--check", "--out",
                 str(ROOT / "benchmarks" / "results" / "kernel_resources_triton{triton}.md")], cwd=src, env=env)
            times.append((step, time.perf_counter() - t0))

            step = "session"
            t0 = time.perf_counter()
            work = venv.parent / "cuda-venv-dry-run"
            run([str(py), "benchmarks/gpu_session.py", "--dry-run", "--work", str(work / "work"),
                 "--out", str(work / "out")], cwd=src, env=env)
            times.append((step, time.perf_counter() - t0))
        except (StepFailed, OSError, subprocess.SubprocessError) as exc:
            print(f"cuda-build: step '{step}' failed: {exc}", file=sys.stderr)
            return 1
    print("cuda-build: ok in {:.0f} s ({})".format(time.perf_counter() - t_all,
                                                   ", ".join(f"{name} {s:.0f} s" for name, s in times)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
