"""Compile every Triton kernel variant of pairuni_kernels for real GPU targets, without a GPU.

    python benchmarks/kernel_resources.py            # writes benchmarks/results/kernel_resources.md

The variants are those the launchers themselves produce (`kernel_variants()` of each kernel module,
which drives the launch builders over every knob, dtype and block size). Each is compiled with
`triton.compile(ASTSource, target=GPUTarget("cuda", arch, 32))` for sm_80, sm_90 and, when the
installed Triton can, sm_100; the PTX then goes through `ptxas -v` (the one Triton ships and uses
for that arch) for registers, spills and static shared memory. Triton's own shared-memory
allocation (dynamic) is added to the static figure.

What it does not cover: Triton also specialises integer arguments by value at launch (1 becomes a
constant, multiples of 16 get alignment hints); those specialisations are not enumerated, only the
argument types are.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODULES = ("pairuni_kernels.advantages", "pairuni_kernels.policy_loss", "pairuni_kernels.linear_logprobs")
REQUIRED_ARCHS = (80, 90)
OPTIONAL_ARCHS = (100,)
#: Largest shared memory one block may use on sm_80 (A100), the smallest of the targets.
SM80_MAX_SHARED_BYTES = 163 * 1024
REPORT = ROOT / "benchmarks" / "results" / "kernel_resources.md"


@functools.cache
def variants(module: str) -> list:
    return importlib.import_module(module).kernel_variants()


def all_variants() -> list[tuple[str, int]]:
    return [(m, i) for m in MODULES for i in range(len(variants(m)))]


def _ptxas(arch: int) -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError):
        import triton.backends.nvidia as nvidia

        return str(Path(nvidia.__file__).parent / "bin" / "ptxas")


def _ptxas_resources(ptx: str, arch: int) -> dict:
    target = re.search(r"^\.target\s+(\S+)", ptx, flags=re.M).group(1).rstrip(",")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={target}", str(src), "-o", str(Path(tmp) / "k.o")],
                              capture_output=True, text=True, check=True)
    info = proc.stdout + proc.stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, info)
        return int(found.group(1)) if found else 0

    return {"ptx_target": target, "registers": number(r"Used (\d+) registers"),
            "spill_stores": number(r"(\d+) bytes spill stores"), "spill_loads": number(r"(\d+) bytes spill loads"),
            "stack_bytes": number(r"(\d+) bytes stack frame"), "static_smem": number(r"(\d+) bytes smem")}


def compile_launch(launch, arch: int) -> dict:
    """Compile one launch for one arch; never raises (a failure is a row with `error`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"kernel": launch.kernel.__name__, "variant": launch.label(), "arch": f"sm_{arch}"}
    t0 = time.perf_counter()
    try:
        options = {} if launch.num_warps is None else {"num_warps": launch.num_warps}
        src = ASTSource(fn=launch.kernel, signature=launch.signature(), constexprs=launch.constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        row.update(_ptxas_resources(compiled.asm["ptx"], arch))
        row["num_warps"] = compiled.metadata.num_warps
        row["shared_bytes"] = compiled.metadata.shared + row["static_smem"]
    except Exception as exc:  # noqa: BLE001 - the report must list every failing variant, whatever broke
        text = str(exc).strip()
        row["error"] = f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"[:300]
    row["seconds"] = time.perf_counter() - t0
    return row


def _worker_setup(cache_dir: str) -> None:
    # before the first triton import of this process: a kernel decorated while the interpreter is
    # on is an interpreter object that cannot be compiled, and a fresh cache makes every run compile
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir


def _compile_job(job: tuple[str, int, int]) -> dict:
    module, index, arch = job
    return compile_launch(variants(module)[index], arch)


def _variant_ids() -> list[tuple[str, int]]:
    return all_variants()


def compile_all(workers: int | None = None) -> tuple[list[dict], dict]:
    """Every variant for every arch, in fresh processes with an empty Triton cache (so each run really
    compiles, whatever the calling process has imported). Returns (rows, run facts)."""
    import multiprocessing

    t0 = time.perf_counter()
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as cache, ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_setup, initargs=(cache,)) as pool:
        ids = pool.submit(_variant_ids).result()
        archs, notes = list(REQUIRED_ARCHS), []
        probe_id = ids[0]
        for arch, probe in zip(OPTIONAL_ARCHS, pool.map(_compile_job, [(*probe_id, a) for a in OPTIONAL_ARCHS])):
            if "error" in probe:
                notes.append(f"sm_{arch} skipped: this Triton does not compile for it ({probe['error']})")
            else:
                archs.append(arch)
        jobs = [(m, i, arch) for arch in archs for m, i in ids]
        rows = list(pool.map(_compile_job, jobs, chunksize=4))
        triton_version = pool.submit(_triton_version).result()
    facts = {"triton": triton_version, "archs": [f"sm_{a}" for a in archs], "notes": notes,
             "variants": len(ids), "compiles": len(rows), "workers": workers,
             "seconds": time.perf_counter() - t0}
    return rows, facts


def _triton_version() -> str:
    import triton

    return triton.__version__


def problems(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        where = f"{r['variant']} {r['arch']}"
        if "error" in r:
            out.append(f"{where}: does not compile: {r['error']}")
        elif r["spill_stores"] or r["spill_loads"]:
            out.append(f"{where}: spills {r['spill_stores']} B stored / {r['spill_loads']} B loaded")
        elif r["shared_bytes"] > SM80_MAX_SHARED_BYTES:
            out.append(f"{where}: {r['shared_bytes']} B shared memory > sm_80 limit {SM80_MAX_SHARED_BYTES}")
    return out


def markdown(rows: list[dict], facts: dict) -> str:
    ok = [r for r in rows if "error" not in r]
    lines = ["# Triton kernel resources (compiled without a GPU)", "",
             f"Triton {facts['triton']}, targets {', '.join(facts['archs'])}; {facts['variants']} variants x "
             f"{len(facts['archs'])} targets = {facts['compiles']} compiles. Written by "
             "`benchmarks/kernel_resources.py` (run by tests/pairuni_kernels/test_compile.py, which prints how long "
             "it took; no time is written here, so a test run leaves this file unchanged).", ""]
    lines += [f"- {n}" for n in facts["notes"]]
    if ok:
        lines += [f"Max registers per thread: {max(r['registers'] for r in ok)}; variants with spills: "
                  f"{sum(1 for r in ok if r['spill_stores'] or r['spill_loads'])}; max shared memory: "
                  f"{max(r['shared_bytes'] for r in ok)} B (sm_80 limit {SM80_MAX_SHARED_BYTES} B).", ""]
    lines += ["| variant | arch | warps | registers | spill st/ld (B) | stack (B) | shared (B) |",
              "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["variant"], r["arch"])):
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['arch']} | - | - | - | - | FAILED: {r['error']} |")
        else:
            lines.append(f"| {r['variant']} | {r['arch']} | {r['num_warps']} | {r['registers']} | "
                         f"{r['spill_stores']}/{r['spill_loads']} | {r['stack_bytes']} | {r['shared_bytes']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPORT))
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args(argv)
    rows, facts = compile_all(args.workers)
    Path(args.out).write_text(markdown(rows, facts))
    bad = problems(rows)
    print(f"{facts['compiles']} compiles ({facts['variants']} variants, {', '.join(facts['archs'])}) in "
          f"{facts['seconds']:.0f} s; {len(bad)} problems; report: {args.out}")
    for line in bad:
        print("  " + line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
