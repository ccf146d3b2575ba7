"""Every Triton kernel variant the launchers can produce compiles for sm_80 and sm_90 (and sm_100 when
this Triton knows it) without a GPU, in each value specialisation a launch can get (pointers aligned or
not, sizes multiples of 16 or not), with no register spills and shared memory within sm_80's limit.
Writes benchmarks/results/kernel_resources_triton<X.Y>.md for the installed Triton. Also: the variant
lists are the launchers' own (every launch the ops make is one of them), the compile check does catch a
kernel the compiler rejects, the specialisations reach the compiled code, and the warm-up of the Triton
cache (`--warm-cache`) compiles exactly what the JIT's launch path looks up (under this Triton, and
under the GPU machine's, Triton 3.6, where `make cuda-build`'s venv exists)."""

import importlib
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pairuni_kernels import clipped_policy_loss, fused_linear_policy_loss, group_advantages, linear_logprobs, pair_weights
from pairuni_kernels._launch import KernelLaunch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "kernel_resources.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import kernel_resources  # noqa: E402

#: The GPU machine's Triton (3.6): the venv `make cuda-build` keeps (csrc/check/cuda_build.py).
GPU_MACHINE_PYTHON = Path(os.environ.get("PAIRUNI_CUDA_VENV", Path.home() / ".cache" / "pairuni" / "cuda-venv")
                          ) / "bin" / "python"


def _compiler_env(cache: Path | None = None) -> dict:
    """The environment of a process that compiles (not interprets) the kernels of this checkout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if cache is not None:
        env["TRITON_CACHE_DIR"] = str(cache)
    return env


def _script(python, args: list[str], cache: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=_compiler_env(cache), cwd=cache.parent)


def _modules():
    return [importlib.import_module(m) for m in kernel_resources.MODULES]


@pytest.mark.slow
def test_every_variant_compiles_for_every_target():
    rows, facts = kernel_resources.compile_all()
    kernel_resources.REPORT.write_text(kernel_resources.markdown(rows, facts))
    print(f"\nTriton {facts['triton']}: {facts['compiles']} compiles of {facts['variants']} variants x "
          f"{len(facts['specs'])} specialisations for {facts['archs']} in {facts['seconds']:.1f} s "
          f"with {facts['workers']} workers")
    assert {"sm_80", "sm_90"} <= set(facts["archs"])
    assert facts["specs"] == list(kernel_resources.SPECS)
    assert facts["compiles"] == facts["variants"] * len(facts["specs"]) * len(facts["archs"])
    assert kernel_resources.problems(rows) == []
    # every compile went through ptxas (its log gave the figures): nothing came from a cache
    assert all(r["compiled"] and r["registers"] > 0 for r in rows)
    # every @triton.jit kernel (`*_kernel`) of the modules is in the list, for every target and specialisation
    kernels = {name for mod in _modules() for name, obj in vars(mod).items()
               if name.endswith("_kernel") and hasattr(obj, "arg_names")}
    for arch in facts["archs"]:
        for spec in facts["specs"]:
            assert {r["kernel"] for r in rows if r["arch"] == arch and r["spec"] == spec} == kernels


def test_launches_the_ops_make_are_listed_variants(triton_backend, device, monkeypatch, gen):
    listed = {launch.key() for mod in _modules() for launch in mod.kernel_variants()}
    made = []
    real_call = KernelLaunch.__call__
    monkeypatch.setattr(KernelLaunch, "__call__", lambda self: made.append(self.key()) or real_call(self))
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        lp = -torch.rand(3, 20, generator=gen).to(device, dtype)
        old = (lp.float() + 0.1).to(device)  # mixed dtypes go through the float32 variant
        mask = torch.rand(3, 20, generator=gen).to(device) > 0.2
        adv = torch.randn(3, 20, generator=gen).to(device, dtype)
        clipped_policy_loss(lp.requires_grad_(), old, adv, mask.float(), ref_logp=old, beta=0.1,
                            importance_sampling_level="sequence").loss.backward()
        rewards = torch.rand(12, generator=gen).to(device, dtype)
        group_advantages(rewards, torch.arange(12, device=device) // 4, weights=rewards, scale="batch")
        pair_weights(rewards, rewards > 0.5)
        hidden = torch.randn(6, 8, generator=gen).to(device, dtype).requires_grad_()
        weight = torch.randn(300, 8, generator=gen).to(device, dtype)
        bias = torch.randn(300, generator=gen).to(device)
        targets = torch.randint(0, 300, (6,), generator=gen).to(device)
        logp, ent = linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True)
        (logp.sum() + ent.sum()).backward()
        fused_linear_policy_loss(hidden.view(2, 3, 8), weight, targets.view(2, 3), lp[:2, :3].detach().float(),
                                 torch.randn(2).to(device), torch.ones(2, 3, dtype=torch.bool, device=device))
    assert len(made) > 20
    missing = [key for key in made if key not in listed]
    assert not missing, f"launches not in kernel_variants(): {missing[:3]}"


def test_compile_check_reports_a_kernel_the_compiler_rejects():
    code = ("import json, sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
            "import kernel_resources, _bad_kernel\n"
            "print(json.dumps(kernel_resources.compile_launch(_bad_kernel.launch(), 90)))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "benchmarks"), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" in row and "CLAMP" in row["error"], row
    assert kernel_resources.problems([row])


_OK_ROW = {"kernel": "k", "variant": "k[]", "spec": "ptr16", "arch": "sm_80", "compiled": True, "num_warps": 4,
           "registers": 32, "spill_stores": 0, "spill_loads": 0, "stack_bytes": 0, "static_smem": 0, "shared_bytes": 0}


def test_problems_flag_spills_and_shared_memory():
    ok = _OK_ROW
    assert kernel_resources.problems([ok]) == []
    assert kernel_resources.problems([dict(ok, spill_loads=8)])
    assert kernel_resources.problems([dict(ok, spill_stores=4)])
    assert kernel_resources.problems([dict(ok, shared_bytes=kernel_resources.SM80_MAX_SHARED_BYTES + 1)])
    # a kernel the warm-up found in the cache has no figures: only a failure counts
    assert kernel_resources.problems([{"kernel": "k", "variant": "k[]", "arch": "sm_90", "compiled": False}]) == []


def test_report_depends_on_neither_timing_nor_order(tmp_path):
    rows = [dict(_OK_ROW, variant=f"k[{i}]", spec=spec, arch=arch, registers=16 + i, seconds=random.random())
            for i in range(3) for spec in kernel_resources.SPECS for arch in ("sm_80", "sm_90")]
    facts = {"triton": "3.6.0", "archs": ["sm_80", "sm_90"], "specs": list(kernel_resources.SPECS), "notes": [],
             "variants": 3, "compiles": len(rows), "workers": 2, "seconds": 12.3}
    text = kernel_resources.markdown(rows, facts)
    shuffled = random.Random(0).sample(rows, len(rows))
    assert kernel_resources.markdown(shuffled, dict(facts, workers=4, seconds=99.0)) == text
    assert "Problems: none." in text and "| k[2] | all16 | 4 | 18 / 18 |" in text
    spilled = kernel_resources.markdown(rows + [dict(_OK_ROW, variant="k[9]", spill_stores=4)], facts)
    assert "k[9] ptr16 sm_80: spills 4 B" in spilled
    assert kernel_resources.report_path("3.6.0").name == "kernel_resources_triton3.6.md"


def test_command_line_fails_on_problems_only_when_asked(tmp_path, monkeypatch):
    spilling = [dict(_OK_ROW, spill_stores=4, spill_loads=4)]
    facts = {"triton": "3.6.0", "archs": ["sm_80"], "specs": ["ptr16"], "notes": [], "variants": 1, "compiles": 1,
             "workers": 1, "seconds": 1.0}
    monkeypatch.setattr(kernel_resources, "compile_all", lambda *args: (spilling, facts))
    out = tmp_path / "report_triton{triton}.md"
    assert kernel_resources.main(["--out", str(out)]) == 0
    assert kernel_resources.main(["--out", str(out), "--check"]) == 1
    assert kernel_resources.main(["--out", str(out), "--fail-on-problems"]) == 1
    version = ".".join(kernel_resources.triton_version().split(".")[:2])
    assert "spills 4 B" in (tmp_path / f"report_triton{version}.md").read_text()
    monkeypatch.setattr(kernel_resources, "compile_all", lambda *args: ([_OK_ROW], facts))
    assert kernel_resources.main(["--out", str(out), "--check"]) == 0


_SPECIALISED = r"""
import importlib, json, re, sys
sys.path.insert(0, sys.argv[1])
import kernel_resources as kr, triton
out = {}
for module, prefix in [("policy_loss", "_policy_loss_fwd_kernel[LEVEL=0,HAS_REF=1,BLOCK=1024"),
                       ("advantages", "_pair_weights_kernel[BLOCK=1024,SQRT=1]")]:
    launch = next(v for v in importlib.import_module("pairuni_kernels." + module).kernel_variants()
                  if v.label().startswith(prefix))
    for spec in kr.SPECS:
        src, options = kr.jit_source(launch, spec, kr.make_target(90))
        compiled = triton.compile(src, target=kr.make_target(90), options=options)
        ttir = compiled.asm["ttir"]
        head = ttir[ttir.index("tt.func public"):].splitlines()[0]
        out[f"{module} {spec}"] = {
            "divisible": re.findall(r"%(\w+): [^,{]*\{tt.divisibility = 16 : i32\}", head),
            "args": {k: ("tensor" if hasattr(v, "dtype") else v) for k, v in launch.args.items()},
            "dns": [p.name for p in launch.kernel.params if p.do_not_specialize],
            "vector_loads": len(re.findall(r"ld\.global(\.\w+)*\.v[24]", compiled.asm["ptx"])),
            "ptx": compiled.asm["ptx"].split(".target")[1], "num_warps": compiled.metadata.num_warps}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def specialised(tmp_path_factory):
    """Two launches compiled for sm_90 in each specialisation (in a process that compiles, not interprets)."""
    cache = tmp_path_factory.mktemp("triton_cache")
    proc = subprocess.run([sys.executable, "-c", _SPECIALISED, str(ROOT / "benchmarks")], capture_output=True,
                          text=True, timeout=300, env=_compiler_env(cache), cwd=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["policy_loss", "advantages"])
def test_specialisations_reach_the_compiled_kernel(specialised, module):
    """The divisibility attrs each specialisation stands for are on the compiled kernel's arguments: no
    pointer when unaligned, every pointer otherwise, and in all16 every integer the JIT specialises
    (ints the launch passes as 0, zero strides, are divisible in every specialisation; a 1 is a constant)."""
    first = specialised[f"{module} unaligned"]
    pointers = {k for k, v in first["args"].items() if v == "tensor"}
    ints = {k for k, v in first["args"].items() if isinstance(v, int) and not isinstance(v, bool)
            and v != 1 and k not in first["dns"]}
    zeros = {k for k in ints if first["args"][k] == 0}
    assert pointers and ints - zeros
    got = {spec: set(specialised[f"{module} {spec}"]["divisible"]) for spec in kernel_resources.SPECS}
    assert got == {"unaligned": zeros, "ptr16": pointers | zeros, "all16": pointers | ints}


def test_divisibility_changes_the_compiled_code(specialised):
    """The specialisations compile to different code: sizes that are multiples of 16 change both kernels;
    aligned pointers alone change the pair weights, whose loads with all16 are vector loads, which no
    unaligned launch can use. (The policy-loss rows start at `row * stride`: with an odd stride, aligned
    pointers tell the compiler nothing, so its ptr16 code is its unaligned code.)"""
    for module in ("policy_loss", "advantages"):
        assert specialised[f"{module} all16"]["ptx"] != specialised[f"{module} ptr16"]["ptx"]
    pair = {spec: specialised[f"advantages {spec}"] for spec in kernel_resources.SPECS}
    assert len({p["ptx"] for p in pair.values()}) == 3
    assert pair["unaligned"]["vector_loads"] == 0 and pair["all16"]["vector_loads"] > 0
    assert specialised["policy_loss all16"]["num_warps"] == 8  # the launch's options are the compile's


#: A few variants of every kernel family, with constexpr 1 strides, do_not_specialize codes, maxnreg.
_WARM_SUBSET = ["_policy_loss_fwd_kernel[LEVEL=1,HAS_REF=1,BLOCK=1024", "_policy_loss_bwd_kernel[LEVEL=0",
                "_pair_weights_kernel", "_chunk_dlogits_kernel[HAS_BIAS=1,WITH_ENTROPY=1,BLOCK_V=256"]


def _only(texts):
    return [a for t in texts for a in ("--only", t)]


def _python_versions():
    found = [pytest.param(sys.executable, id="this-venv")]
    if GPU_MACHINE_PYTHON.exists():
        found.append(pytest.param(str(GPU_MACHINE_PYTHON), id="gpu-machine-venv"))
    else:
        found.append(pytest.param(str(GPU_MACHINE_PYTHON), id="gpu-machine-venv", marks=pytest.mark.skip(
            reason=f"no venv with the GPU machine's Triton at {GPU_MACHINE_PYTHON} (make cuda-build makes it)")))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("python", _python_versions())
def test_warm_cache_holds_what_the_jit_launch_looks_up(tmp_path, python):
    """`--warm-cache --dry-run` compiles for sm_90 into TRITON_CACHE_DIR; then, in a fresh process with a
    stand-in driver that reports sm_90, the JIT's own launch path (`kernel.warmup`, i.e. run(warmup=True))
    finds every kernel there instead of compiling it (`--verify-jit`); a second warm-up compiles nothing."""
    cache = tmp_path / "cache"
    proc = _script(python, ["--warm-cache", "--dry-run", "--verify-jit", "--check", "--workers", "2",
                            *_only(_WARM_SUBSET)], cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    warm = re.search(r"warm-cache: Triton (\S+), cuda:90: (\d+) compiles .*?; (\d+) compiled, (\d+) already cached, "
                     r"0 failed\) in ([\d.]+) s with 2 workers", proc.stdout)
    assert warm, proc.stdout
    n = int(warm.group(2))
    assert n >= 3 * len(_WARM_SUBSET) and int(warm.group(3)) == n
    assert f"verify-jit: {n} JIT warm-ups (cuda:90), 0 compiled again" in proc.stdout, proc.stdout
    print(f"\nTriton {warm.group(1)}: {n} kernels warmed in {warm.group(5)} s, every JIT lookup a cache hit")
    again = _script(python, ["--warm-cache", "--dry-run", *_only(_WARM_SUBSET)], cache)
    assert f"{n} compiles" in again.stdout and f"; 0 compiled, {n} already cached" in again.stdout, again.stdout


@pytest.mark.slow
def test_verify_jit_reports_a_kernel_the_warm_up_did_not_compile(tmp_path):
    """The check can fail: a cache warmed for one specialisation (for sm_80, without a GPU) leaves the
    JIT compiling the other two, and `--verify-jit --check` names them and exits 1."""
    cache = tmp_path / "cache"
    warm = _script(sys.executable, ["--warm-cache", "--arch", "80", "--specs", "ptr16", "--only", "_pair_weights"],
                   cache)
    assert warm.returncode == 0 and "0 failed" in warm.stdout, warm.stdout + warm.stderr[-2000:]
    proc = _script(sys.executable, ["--verify-jit", "--arch", "80", "--check", "--only", "_pair_weights"], cache)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
    counts = re.search(r"verify-jit: (\d+) JIT warm-ups \(cuda:80\), (\d+) compiled again", proc.stdout)
    assert counts, proc.stdout
    n = int(counts.group(1)) // 3  # pair-weights variants
    assert n >= 1 and (int(counts.group(1)), int(counts.group(2))) == (3 * n, 2 * n)
    missed = re.findall(r"compiled again: (.*) (\w+)$", proc.stdout, flags=re.M)
    assert sorted(spec for _, spec in missed) == ["all16"] * n + ["unaligned"] * n, missed
    assert len({variant for variant, _ in missed}) == n
