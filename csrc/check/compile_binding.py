"""Compile the CUDA binding `csrc/cfg_sampling.cu` to object files for each target arch, the way
setup.py's CUDA build would (torch's headers, torch's own nvcc flags, the project's flags from
csrc/nvcc_flags.txt), without linking: a CPU-only torch has no CUDA libraries to link against.

    python csrc/check/compile_binding.py [--arch 80 90] [--out DIR]

Exit status 0 when every arch compiled; nvcc's errors are printed otherwise.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent


def nvcc_command(arch: int, out: Path) -> list[str]:
    import torch
    from torch.utils import cpp_extension

    project = (CSRC / "nvcc_flags.txt").read_text().split()
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{CSRC}"]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    # a CPU-only torch lacks the configured c10/cuda/impl/cuda_cmake_macros.h; it only sets Windows
    # export macros, and c10 has a switch to go without it
    generated = Path(cpp_extension.include_paths()[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not generated.exists():
        abi += " -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"
    return ["nvcc", "-c", str(CSRC / "cfg_sampling.cu"), "-o", str(out), *includes,
            *cpp_extension.COMMON_NVCC_FLAGS, *project, *abi.split(), "-DTORCH_EXTENSION_NAME=_C",
            "-DTORCH_API_INCLUDE_EXTENSION_H", "--compiler-options", "-fPIC",
            f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--out", default=None, help="where the .o files go (default: a temporary directory)")
    args = ap.parse_args(argv)
    if shutil.which("nvcc") is None:
        print("compile_binding: nvcc not found, skipped")
        return 0
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args.out or tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        objs = {arch: out_dir / f"cfg_sampling_sm{arch}.o" for arch in args.arch}
        # one nvcc per arch, side by side: each is single-threaded
        procs = {arch: subprocess.Popen(nvcc_command(arch, obj), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True) for arch, obj in objs.items()}
        for arch, proc in procs.items():
            _, err = proc.communicate()
            took = time.perf_counter() - t0
            if proc.returncode != 0:
                failed.append(arch)
                print(f"sm_{arch}: FAILED after {took:.0f} s\n{err[-4000:]}")
            else:
                print(f"sm_{arch}: {objs[arch].name} {objs[arch].stat().st_size} bytes ({took:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
