"""Compile every Triton kernel variant of pairuni_kernels for real GPU targets, without a GPU.

    python benchmarks/kernel_resources.py            # writes benchmarks/results/kernel_resources_triton<X.Y>.md
    python benchmarks/kernel_resources.py --check --out /tmp/resources_triton{triton}.md   # exit 1 on a problem
    python benchmarks/kernel_resources.py --warm-cache --workers 16           # on the GPU machine
    python benchmarks/kernel_resources.py --warm-cache --dry-run --verify-jit --check      # the same on CPU, sm_90

Compile check (the default). The variants are those the launchers themselves produce
(`kernel_variants()` of each kernel module, which drives the launch builders over every knob, dtype
and block size). Each variant is compiled for sm_80, sm_90 and, when the installed Triton can,
sm_100, in each of three value specialisations (`SPECS`): at a launch the JIT marks a pointer that
is 16-byte aligned and an integer that is a multiple of 16 with `tt.divisibility=16` and compiles
different code, so the check compiles what a launch on sliced (misaligned) tensors gets, what a
launch on aligned tensors with odd sizes gets, and what a launch with aligned tensors and sizes and
strides that are multiples of 16 gets. Integer arguments the launch itself passes as 0 or 1 (zero
and unit strides, the first vocabulary slice) keep their value in every specialisation, because a
real launch always passes them so (the JIT makes a 1 a constant, a 0 divisible).

The compile goes through the JIT's own code: the launch's keyword arguments (stand-in tensors on the
meta device whose address has the wanted alignment, stand-in integers with the wanted divisibility)
are bound by the binder Triton builds for the kernel (`create_function_from_signature`) and packed
by `JITFunction._pack_args`, exactly as `JITFunction.run` does before it compiles; the resulting
signature, constexprs, attrs and options go to `triton.compile(ASTSource(...), target=...)`, as
`JITFunction._do_compile` passes them. So the binary checked is the one a launch gets, and its
cache key is the one the launch computes. Registers, spills and static shared memory come from the
log of the ptxas run Triton itself makes for the cubin (`knobs.nvidia.dump_ptxas_log`), so they
describe that cubin: a separate `ptxas -v` misses Triton's flags (`-lineinfo`, and in Triton 3.9
`--regAllocOptLevel=2`, with which ptxas spilled where a plain run did not). Triton's own
shared-memory allocation is added to the static figure. `--check` (`--fail-on-problems`) exits 1 on
a failed compile, a spill or shared memory over sm_80's limit; `{triton}` in `--out` becomes the
installed Triton's major.minor.

Warm cache (`--warm-cache`). The same compiles, for the current GPU's target (or `--arch` /
`--dry-run` without one), into the caller's Triton cache (`TRITON_CACHE_DIR`, else Triton's default)
in `--workers` processes, so that the later launches of the benchmarks and GPU tests find their
kernels compiled instead of compiling them one after the other. `--verify-jit` (after a warm-up, or
alone on an existing cache) calls `kernel.warmup(...)` (the JIT's launch path, `run(..., warmup=True)`)
for every job in a fresh process and reports each one the JIT compiles again, i.e. whose
ahead-of-time cache key differs from the JIT's; without a GPU it installs a stand-in driver that
reports the target (the only thing the JIT asks the driver before it compiles).
What a warm cache does not cover: launches whose sizes are 1 (the JIT makes them constants) or
whose arguments mix divisible and odd sizes in other ways than the three specialisations.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.metadata
import io
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODULES = ("pairuni_kernels.advantages", "pairuni_kernels.policy_loss", "pairuni_kernels.chunked_head")
REQUIRED_ARCHS = (80, 90)
OPTIONAL_ARCHS = (100,)
#: Largest shared memory one block may use on sm_80 (A100), the smallest of the targets.
SM80_MAX_SHARED_BYTES = 163 * 1024
#: Value specialisations: name -> (pointers 16-byte aligned, integer sizes/strides multiples of 16).
SPECS = {
    "unaligned": (False, False),  # sliced tensors: no pointer aligned, odd sizes
    "ptr16": (True, False),  # aligned tensors (every fresh allocation), odd sizes: the common case
    "all16": (True, True),  # aligned tensors, every size and stride a multiple of 16
}
RESULTS = ROOT / "benchmarks" / "results"


def triton_version() -> str:
    return importlib.metadata.version("triton")


def report_path(version: str | None = None) -> Path:
    """The report of one Triton version: `kernel_resources_triton3.9.md` for 3.9.x."""
    major_minor = ".".join((version or triton_version()).split(".")[:2])
    return RESULTS / f"kernel_resources_triton{major_minor}.md"


REPORT = report_path()


@functools.cache
def variants(module: str) -> list:
    return importlib.import_module(module).kernel_variants()


def all_variants() -> list[tuple[str, int]]:
    return [(m, i) for m in MODULES for i in range(len(variants(m)))]


# ----------------------------------------------------------------------------- the JIT's compile inputs
def _stand_in(value, aligned: bool, divisible: bool):
    """An argument the JIT specialises the wanted way: a meta tensor (no memory; its address is 0, or
    one element further when misaligned) of the same dtype, or an integer of the same width that is
    (not) a multiple of 16. Floats and bools are never specialised; 0 and 1 are kept (see above)."""
    import torch

    if isinstance(value, torch.Tensor):
        t = torch.empty(64, dtype=value.dtype, device="meta")
        return t if aligned else t[1:]
    if isinstance(value, bool) or not isinstance(value, int) or value in (0, 1):
        return value
    wide = not -2**31 <= value < 2**31
    return (2**36 if wide else 48) + (0 if divisible else 1)


def launch_kwargs(launch, spec: str) -> dict:
    """The keyword arguments `KernelLaunch.__call__` passes to `kernel[grid](...)`, with stand-ins
    specialised as `spec` says."""
    aligned, divisible = SPECS[spec]
    args = {name: _stand_in(value, aligned, divisible) for name, value in launch.args.items()}
    return {**args, **launch.constexprs, **launch.launch_options()}


def _run_options(kernel) -> dict:
    """The option keywords `JITFunction.run` adds to the caller's before it binds them."""
    from triton import knobs

    options = {"debug": kernel.debug or knobs.runtime.debug,
               "instrumentation_mode": knobs.compilation.instrumentation_mode}
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # Triton 3.9 adds it, 3.6 has no such knob
        options["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    return options


def jit_source(launch, spec: str, target):
    """(ASTSource, options dict) as `JITFunction.run` -> `_do_compile` builds them for this launch."""
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(target)
    kwargs = {**launch_kwargs(launch, spec), **_run_options(kernel)}
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options.__dict__


def make_target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


# ----------------------------------------------------------------------------- one compile
def _ptxas_resources(log: str) -> dict:
    """Figures of the kernel's entry function from a `ptxas -v` log (the largest, should there be more)."""
    def number(pattern: str) -> int:
        return max((int(x) for x in re.findall(pattern, log)), default=0)

    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"), "stack_bytes": number(r"(\d+) bytes stack frame"),
            "static_smem": number(r"(\d+) bytes smem")}


@contextlib.contextmanager
def _ptxas_log():
    """Captures the log Triton prints of its own ptxas run (only when it compiles, not on a cache hit)."""
    from triton import knobs

    before = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            yield out
    finally:
        knobs.nvidia.dump_ptxas_log = before


def compile_launch(launch, arch: int, spec: str = "ptr16", *, need_log: bool = True, target=None) -> dict:
    """Compile one launch, specialised as `spec`, for one arch (or `target`); never raises (a failure
    is a row with `error`). `compiled` says whether Triton compiled (False: found in its cache);
    with `need_log` a compile whose ptxas log is missing is a failure."""
    import triton

    target = target or make_target(arch)
    row = {"kernel": launch.kernel.__name__, "variant": launch.label(), "spec": spec, "arch": f"sm_{target.arch}"}
    t0 = time.perf_counter()
    try:
        src, options = jit_source(launch, spec, target)
        with _ptxas_log() as log:
            compiled = triton.compile(src, target=target, options=options)
        row["compiled"] = "Used " in log.getvalue()
        if need_log and not row["compiled"]:
            raise RuntimeError("no ptxas log: Triton took the kernel from its cache instead of compiling it")
        row["num_warps"] = compiled.metadata.num_warps
        if row["compiled"]:  # a kernel found in the cache has no figures
            row.update(_ptxas_resources(log.getvalue()))
            row["shared_bytes"] = compiled.metadata.shared + row["static_smem"]
    except Exception as exc:  # noqa: BLE001 - the report must list every failing variant, whatever broke
        text = str(exc).strip()
        row["error"] = f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"[:300]
    row["seconds"] = time.perf_counter() - t0
    return row


# ----------------------------------------------------------------------------- process pool
def _worker_setup(cache_dir: str | None) -> None:
    # before the first triton import of this process: a kernel decorated while the interpreter is
    # on is an interpreter object that cannot be compiled (TRITON_INTERPRET is not part of Triton's
    # cache key); the compile check uses a fresh cache so every run really compiles, the warm-up
    # the caller's
    os.environ.pop("TRITON_INTERPRET", None)
    if cache_dir is not None:
        os.environ["TRITON_CACHE_DIR"] = cache_dir


def _compile_job(job: tuple) -> dict:
    from triton.backends.compiler import GPUTarget

    module, index, spec, target, need_log = job
    return compile_launch(variants(module)[index], target[1], spec, need_log=need_log, target=GPUTarget(*target))


def _variant_ids(only=None) -> list[tuple[str, int]]:
    """(module, index) of every variant, or of those whose label contains `only` (a text or a list of
    texts, any of which may match)."""
    texts = [only] if isinstance(only, str) else list(only or ())
    return [(m, i) for m, i in all_variants() if not texts or any(t in variants(m)[i].label() for t in texts)]


def _pool(workers: int, cache_dir: str | None) -> ProcessPoolExecutor:
    import multiprocessing

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_setup, initargs=(cache_dir,))


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _check_specs(specs) -> list[str]:
    specs = list(specs)
    unknown = [s for s in specs if s not in SPECS]
    if unknown:
        raise ValueError(f"unknown specialisation(s) {unknown}; known: {list(SPECS)}")
    return specs


def compile_all(workers: int | None = None, specs=tuple(SPECS), archs=None, only=None
                ) -> tuple[list[dict], dict]:
    """Every variant x specialisation x arch, in fresh processes with an empty Triton cache (so each
    run really compiles, whatever the calling process has imported). Returns (rows, run facts)."""
    t0 = time.perf_counter()
    specs = _check_specs(specs)
    workers = workers or default_workers()
    wanted = list(REQUIRED_ARCHS + OPTIONAL_ARCHS) if archs is None else list(archs)
    with tempfile.TemporaryDirectory() as cache, _pool(workers, cache) as pool:
        ids = pool.submit(_variant_ids, only).result()
        if not ids:
            raise ValueError(f"no variant label contains {only!r}")
        # an optional arch is probed with one compile (kept as that job's row: compiling it again
        # would be a cache hit without a ptxas log)
        optional = [a for a in wanted if a in OPTIONAL_ARCHS]
        probe_jobs = [(*ids[0], specs[0], ("cuda", a, 32), True) for a in optional]
        rows, notes, skipped = [], [], set()
        for arch, probe in zip(optional, pool.map(_compile_job, probe_jobs)):
            if "error" in probe:
                skipped.add(arch)
                notes.append(f"sm_{arch} skipped: this Triton does not compile for it ({probe['error']})")
            else:
                rows.append(probe)
        archs = [a for a in wanted if a not in skipped]
        jobs = [(m, i, s, ("cuda", a, 32), True) for a in archs for s in specs for m, i in ids]
        jobs = [j for j in jobs if j not in probe_jobs]
        rows += list(pool.map(_compile_job, jobs, chunksize=4))
    facts = {"triton": triton_version(), "archs": [f"sm_{a}" for a in archs], "specs": specs, "notes": notes,
             "variants": len(ids), "compiles": len(rows), "workers": workers, "seconds": time.perf_counter() - t0}
    return rows, facts


def problems(rows: list[dict]) -> list[str]:
    """One line per row that failed, spilled or needs more shared memory than sm_80 has (rows of
    kernels found in the cache, without figures, only count when they failed)."""
    out = []
    for r in rows:
        where = f"{r['variant']} {r.get('spec', '')} {r['arch']}".replace("  ", " ")
        if "error" in r:
            out.append(f"{where}: does not compile: {r['error']}")
        elif "registers" not in r:
            continue
        elif r["spill_stores"] or r["spill_loads"]:
            out.append(f"{where}: spills {r['spill_stores']} B stored / {r['spill_loads']} B loaded")
        elif r["shared_bytes"] > SM80_MAX_SHARED_BYTES:
            out.append(f"{where}: {r['shared_bytes']} B shared memory > sm_80 limit {SM80_MAX_SHARED_BYTES}")
    return out


def markdown(rows: list[dict], facts: dict) -> str:
    """The report: nothing in it depends on timing or worker count, so a rerun leaves it unchanged."""
    ok = [r for r in rows if "error" not in r]
    archs, specs = facts["archs"], facts["specs"]
    bad = problems(rows)
    lines = [f"# Triton {facts['triton']}: kernel resources (compiled without a GPU)", "",
             f"Triton {facts['triton']}, targets {', '.join(archs)}; {facts['variants']} variants x "
             f"{len(specs)} specialisations x {len(archs)} targets = {facts['compiles']} compiles. Written by "
             "`benchmarks/kernel_resources.py` (run by tests/pairuni_kernels/test_compile.py, which prints how long "
             "it took; no time is written here, so a rerun leaves this file unchanged).", "",
             "Specialisations (what the JIT compiles for a launch; see the script's docstring):",
             "- `unaligned`: no pointer 16-byte aligned, sizes and strides odd (sliced tensors)",
             "- `ptr16`: every pointer 16-byte aligned (`tt.divisibility=16`), sizes and strides odd",
             "- `all16`: pointers aligned and every size and stride a multiple of 16", ""]
    lines += [f"- {n}" for n in facts["notes"]]
    if ok:
        lines += [f"Max registers per thread: {max(r['registers'] for r in ok)}; compiles with spills: "
                  f"{sum(1 for r in ok if r['spill_stores'] or r['spill_loads'])}; max shared memory: "
                  f"{max(r['shared_bytes'] for r in ok)} B (sm_80 limit {SM80_MAX_SHARED_BYTES} B).", ""]
    lines += ["Problems:" if bad else "Problems: none.", *[f"- {b}" for b in bad], ""]
    lines += [f"| variant | spec | warps | registers {' / '.join(archs)} | spill st/ld (B) | stack (B) | shared (B) |",
              "|---|---|---|---|---|---|---|"]
    by_key = {}
    for r in rows:
        by_key.setdefault((r["kernel"], r["variant"], r.get("spec", "")), {})[r["arch"]] = r
    order = {s: i for i, s in enumerate(specs)}
    for (_kernel, variant, spec), per_arch in sorted(by_key.items(), key=lambda kv: (*kv[0][:2], order.get(kv[0][2]))):
        cells = [per_arch.get(a) for a in archs]
        good = [c for c in cells if c is not None and "error" not in c]
        regs = " / ".join("-" if c is None else "FAILED" if "error" in c else str(c["registers"]) for c in cells)
        if not good:
            lines.append(f"| {variant} | {spec} | - | {regs} | - | - | - |")
            continue
        warps = "/".join(sorted({str(c["num_warps"]) for c in good}))
        spills = max((c["spill_stores"], c["spill_loads"]) for c in good)
        lines.append(f"| {variant} | {spec} | {warps} | {regs} | {spills[0]}/{spills[1]} | "
                     f"{max(c['stack_bytes'] for c in good)} | {max(c['shared_bytes'] for c in good)} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- warm cache
class _TargetOnlyDriver:
    """Stands in for Triton's active driver where there is no GPU: the JIT's launch path up to the
    compile (binder, cache key, `triton.compile`) asks it for the target, device and stream only."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def current_target() -> tuple | None:
    """(backend, arch, warp size) of the current GPU, as the JIT sees it; None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    from triton.runtime.driver import driver

    t = driver.active.get_current_target()
    return (t.backend, t.arch, t.warp_size)


def _cache_dir() -> Path:
    from triton import knobs

    return Path(knobs.cache.dir)


def _verify_jit_job(jobs: list[tuple] | None, target: tuple, stand_in_driver: bool, specs=tuple(SPECS),
                    only=None) -> dict:
    """In a fresh process: the JIT's own launch path, `kernel.warmup(**kwargs)` (= run(warmup=True)),
    for each (module, index, spec) (None: every selected variant x spec); a job whose key the
    ahead-of-time compile missed makes the JIT compile, which adds an entry to the Triton cache.
    Returns the jobs that did."""
    if jobs is None:
        jobs = [(m, i, s) for s in _check_specs(specs) for m, i in _variant_ids(only)]
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    if stand_in_driver:
        driver.set_active(_TargetOnlyDriver(GPUTarget(*target)))
    seen = driver.active.get_current_target()
    if (seen.backend, seen.arch, seen.warp_size) != tuple(target):
        raise RuntimeError(f"the JIT would compile for {seen}, the cache was warmed for {target}")
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    missed, t0 = [], time.perf_counter()
    for module, index, spec in jobs:
        launch = variants(module)[index]
        before = set(os.listdir(cache))
        try:
            launch.kernel.warmup(grid=launch.grid, **launch_kwargs(launch, spec))
        except Exception as exc:  # noqa: BLE001 - a JIT compile that fails is a miss as well
            missed.append(f"{launch.label()} {spec} ({type(exc).__name__})")
            continue
        if set(os.listdir(cache)) - before:
            missed.append(f"{launch.label()} {spec}")
    return {"checked": len(jobs), "missed": missed, "seconds": time.perf_counter() - t0, "cache": str(cache)}


def verify_jit(jobs: list[tuple] | None, target: tuple, stand_in_driver: bool, specs=tuple(SPECS),
               only=None) -> dict:
    """`_verify_jit_job` in a fresh process (its JIT has compiled nothing yet), with the caller's cache."""
    with _pool(1, None) as pool:
        return pool.submit(_verify_jit_job, jobs, target, stand_in_driver, specs, only).result()


def warm_cache(workers: int | None, target: tuple, specs=tuple(SPECS), only=None) -> tuple[list, dict]:
    """Compiles every variant x specialisation for `target` into the caller's Triton cache."""
    t0 = time.perf_counter()
    specs = _check_specs(specs)
    workers = workers or default_workers()
    with _pool(workers, None) as pool:
        ids = pool.submit(_variant_ids, only).result()
        jobs = [(m, i, s, tuple(target), False) for s in specs for m, i in ids]
        rows = list(pool.map(_compile_job, jobs, chunksize=2))
        cache = pool.submit(_cache_dir).result()
    for row, job in zip(rows, jobs):
        row["job"] = job[:3]
    facts = {"triton": triton_version(), "target": f"{target[0]}:{target[1]}", "variants": len(ids),
             "specs": specs, "compiles": len(rows), "new": sum(1 for r in rows if r.get("compiled")),
             "failed": sum(1 for r in rows if "error" in r), "workers": workers, "cache": str(cache),
             "seconds": time.perf_counter() - t0}
    return rows, facts


# ----------------------------------------------------------------------------- command line
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None,
                    help=f"report path; `{{triton}}` in it becomes this Triton's major.minor (default "
                         f"{report_path().relative_to(ROOT)})")
    ap.add_argument("--fail-on-problems", "--check", action="store_true",
                    help="exit 1 when a compile fails or spills, shared memory is over sm_80's limit, or "
                         "--verify-jit finds a kernel the JIT compiles again")
    ap.add_argument("--workers", type=int, default=None, help=f"processes (default {default_workers()})")
    ap.add_argument("--specs", nargs="+", default=list(SPECS), choices=list(SPECS))
    ap.add_argument("--archs", nargs="+", type=int, default=None,
                    help="compile check: targets (default 80 90 and, where this Triton can, 100)")
    ap.add_argument("--only", action="append", default=None, metavar="TEXT",
                    help="only the variants whose label contains TEXT (repeatable: any of them)")
    ap.add_argument("--warm-cache", action="store_true",
                    help="compile into the caller's Triton cache for the current GPU instead of checking")
    ap.add_argument("--arch", type=int, default=None,
                    help="--warm-cache / --verify-jit: the target arch (default: the GPU's)")
    ap.add_argument("--dry-run", action="store_true",
                    help="--warm-cache / --verify-jit without a GPU: sm_90 unless --arch")
    ap.add_argument("--verify-jit", action="store_true",
                    help="check that the JIT's launch path finds every selected kernel in the Triton cache "
                         "(after --warm-cache: every kernel it compiled)")
    args = ap.parse_args(argv)
    if args.warm_cache or args.verify_jit:
        return _main_warm(args)
    out = Path(args.out.replace("{triton}", ".".join(triton_version().split(".")[:2]))) if args.out else report_path()
    rows, facts = compile_all(args.workers, args.specs, args.archs, args.only)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(rows, facts))
    bad = problems(rows)
    print(f"Triton {facts['triton']}: {facts['compiles']} compiles ({facts['variants']} variants x "
          f"{len(facts['specs'])} specialisations, {', '.join(facts['archs'])}) in {facts['seconds']:.0f} s with "
          f"{facts['workers']} workers; {len(bad)} problems; report: {out}")
    for line in bad:
        print("  " + line)
    return 1 if bad and args.fail_on_problems else 0


def _main_warm(args) -> int:
    gpu = None if args.dry_run else current_target()
    if args.arch is not None:
        target = ("cuda", args.arch, 32)
    elif gpu is not None:
        target = gpu
    elif args.dry_run:
        target = ("cuda", 90, 32)
    else:
        print("--warm-cache / --verify-jit: no GPU here; pass --dry-run (sm_90) or --arch N", file=sys.stderr)
        return 2
    bad, jobs = [], None
    if args.warm_cache:
        rows, facts = warm_cache(args.workers, target, args.specs, args.only)
        bad = problems(rows)
        print(f"warm-cache: Triton {facts['triton']}, {facts['target']}: {facts['compiles']} compiles "
              f"({facts['variants']} variants x {len(facts['specs'])} specialisations; {facts['new']} compiled, "
              f"{facts['compiles'] - facts['new'] - facts['failed']} already cached, {facts['failed']} failed) in "
              f"{facts['seconds']:.1f} s with {facts['workers']} workers; cache {facts['cache']}")
        for line in bad:
            print("  " + line)
        jobs = [r["job"] for r in rows if "error" not in r]
    if args.verify_jit:
        result = verify_jit(jobs, target, stand_in_driver=gpu is None or tuple(gpu) != tuple(target),
                            specs=args.specs, only=args.only)
        print(f"verify-jit: {result['checked']} JIT warm-ups ({target[0]}:{target[1]}), {len(result['missed'])} "
              f"compiled again (not found in the cache) in {result['seconds']:.1f} s; cache {result['cache']}")
        for line in result["missed"]:
            print("  compiled again: " + line)
        bad += [f"{m}: the JIT compiled it again" for m in result["missed"]]
    return 1 if bad and args.fail_on_problems else 0


if __name__ == "__main__":
    sys.exit(main())
