"""Every Triton kernel variant the launchers can produce compiles for sm_80 and sm_90 (and sm_100 when
this Triton knows it) without a GPU, with no register spills and shared memory within sm_80's limit.
Writes benchmarks/results/kernel_resources.md. Also: the variant lists are the launchers' own (every
launch the ops make is one of them), and the compile check does catch a kernel the compiler rejects."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from pairuni_kernels import clipped_policy_loss, fused_linear_policy_loss, group_advantages, linear_logprobs, pair_weights
from pairuni_kernels._launch import KernelLaunch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import kernel_resources  # noqa: E402


def _modules():
    return [importlib.import_module(m) for m in kernel_resources.MODULES]


def test_every_variant_compiles_for_every_target():
    rows, facts = kernel_resources.compile_all()
    kernel_resources.REPORT.write_text(kernel_resources.markdown(rows, facts))
    print(f"\n{facts['compiles']} compiles of {facts['variants']} variants for {facts['archs']} "
          f"in {facts['seconds']:.1f} s")
    assert {"sm_80", "sm_90"} <= set(facts["archs"])
    assert facts["compiles"] == facts["variants"] * len(facts["archs"])
    assert kernel_resources.problems(rows) == []
    # every @triton.jit kernel (`*_kernel`) of the modules is in the list, for every target
    kernels = {name for mod in _modules() for name, obj in vars(mod).items()
               if name.endswith("_kernel") and hasattr(obj, "arg_names")}
    for arch in facts["archs"]:
        assert {r["kernel"] for r in rows if r["arch"] == arch} == kernels


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


def test_problems_flag_spills_and_shared_memory():
    ok = {"kernel": "k", "variant": "k[]", "arch": "sm_80", "spill_stores": 0, "spill_loads": 0, "shared_bytes": 0}
    assert kernel_resources.problems([ok]) == []
    assert kernel_resources.problems([dict(ok, spill_loads=8)])
    assert kernel_resources.problems([dict(ok, shared_bytes=kernel_resources.SM80_MAX_SHARED_BYTES + 1)])
