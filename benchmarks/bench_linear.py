"""Fused linear PairGRPO loss vs the unfused paths: time and peak extra memory at Janus head shapes.

    python benchmarks/run_all.py --only linear [--quick]          # all cases, table + JSON
    python benchmarks/bench_linear.py --case fused 8 576 2048 16384 --device cpu   # one case

Implementations (forward + backward of the loss w.r.t. hidden and head weight, bf16 inputs):
  fused     pairuni_kernels.fused_linear_policy_loss (chunked; never builds [M, V] logits)
  unfused   what a user writes: logits = hidden @ W.T, log_softmax in fp32, gather, reference loss
  compiled  torch.compile of `unfused`
  liger     liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss (loss_type="bnpo" = token-mean,
            beta=0), when liger-kernel is installed (a benchmark-only extra)
  matmuls   (CUDA only) the three matmuls no implementation can avoid: logits, grad hidden,
            grad weight; the floor the fused time is compared with

--quick (a check that the suite runs: CI's dry run of the GPU session) takes the two small shapes and
leaves out `compiled`. `impls=` (run_all --impls) runs only the named implementations (the GPU
session leaves out `compiled`, whose Inductor compile per case would not fit its time).
Each row is written as soon as its case's child returns (run_all's RowLog); the ratios of a shape
are added once its rows are in.

Every case runs in its own subprocess so that one case's allocations cannot hide another's peak.
Peak extra memory is the peak above what was resident just before the measured step (inputs,
weights, warm-up leftovers): on CUDA `max_memory_allocated - memory_allocated`, on CPU the peak
resident set size (VmHWM, reset through /proc/self/clear_refs) minus the resident size before.
`peak_extra_mb` includes the gradients every implementation must return (grad hidden
[M, H] + grad weight [V, H]); `peak_extra_no_grads_mb` subtracts them, leaving the working memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from _timing import flush, time_ms

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# (name, N, T, H, V): Janus-Pro image head (576 tokens per image, 16384 codes; 1B H=2048, 7B H=4096)
# and text head (102400 vocabulary)
FULL_SHAPES = [
    ("image 8x576 H2048", 8, 576, 2048, 16384),
    ("image 8x576 H4096", 8, 576, 4096, 16384),
    ("image 64x576 H2048", 64, 576, 2048, 16384),
    ("image 64x576 H4096", 64, 576, 4096, 16384),
    ("text 8x512 H4096", 8, 512, 4096, 102400),
]
QUICK_SHAPES = [
    ("quick image 4x128 H256", 4, 128, 256, 4096),
    ("quick text 2x128 H256", 2, 128, 256, 16384),
]
IMPLS = ("fused", "unfused", "compiled", "liger")
QUICK_IMPLS = ("fused", "unfused", "liger")  # --quick checks the suite runs: no torch.compile
DTYPE = torch.bfloat16
CASE_TIMEOUT_S = 900
# glibc: serve every allocation >= 64 KiB by mmap and give freed memory straight back, so the CPU
# resident set size follows the live tensors (the default heap keeps freed blocks resident)
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


# ----------------------------------------------------------------------------- implementations
def _inputs(n, t, h, v, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, t, h, generator=g).to(device=device, dtype=DTYPE).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(device=device, dtype=DTYPE).requires_grad_()
    targets = torch.randint(0, v, (n, t), generator=g).to(device)
    old_logp = (-torch.rand(n, t, generator=g) * 10 - 5).to(device)
    adv = torch.randn(n, generator=g).to(device)
    mask = torch.ones(n, t, dtype=torch.bool, device=device)
    return hidden, weight, targets, old_logp, adv, mask


def unfused_loss(hidden, weight, targets, old_logp, adv, mask):
    from pairuni_kernels import reference as ref

    logits = hidden.flatten(0, 1) @ weight.t()
    logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.reshape(-1, 1)).view(mask.shape)
    return ref.clipped_policy_loss(logp, old_logp, adv, mask).loss


def _make_step(impl, device):
    """Returns step(hidden, weight, targets, old_logp, adv, mask) -> (grad_hidden, grad_weight)."""
    if impl == "fused":
        from pairuni_kernels import fused_linear_policy_loss

        def loss_fn(*args):
            return fused_linear_policy_loss(*args).loss
    elif impl == "unfused":
        loss_fn = unfused_loss
    elif impl == "compiled":
        loss_fn = torch.compile(unfused_loss, dynamic=True)
    elif impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        module = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="bnpo", chunk_size=1)

        def loss_fn(hidden, weight, targets, old_logp, adv, mask):
            out = module(hidden, weight, targets, mask.to(hidden.dtype), adv, old_per_token_logps=old_logp)
            return out[0] if isinstance(out, tuple) else out
    else:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")

    def step(hidden, weight, *rest):
        loss = loss_fn(hidden, weight, *rest)
        return torch.autograd.grad(loss, [hidden, weight])

    return step


# ----------------------------------------------------------------------------- one case, in a child process
def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def run_case(impl, n, t, h, v, device) -> dict:
    mb = 1 / 2 ** 20
    grads_mb = (n * t * h + v * h) * DTYPE.itemsize * mb
    row = {"impl": impl, "M": n * t, "H": h, "V": v, "dtype": str(DTYPE).replace("torch.", "")}
    if device == "cuda":
        torch.cuda.init()
        if impl == "matmuls":
            a = torch.randn(n * t, h, device=device, dtype=DTYPE)
            w = torch.randn(v, h, device=device, dtype=DTYPE)
            gl = torch.randn(n * t, v, device=device, dtype=DTYPE)

            def three():
                torch.mm(a, w.t())
                torch.mm(gl, w)
                torch.mm(gl.t(), a)
            three()
            row["time_ms"] = time_ms(three, "cuda", warmup=0, reps=10)["median_ms"]
            return row
        args = _inputs(n, t, h, v, device)
        step = _make_step(impl, device)
        for _ in range(2):
            step(*args)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(*args)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) * mb
        row["time_ms"] = time_ms(lambda: step(*args), "cuda", warmup=0, reps=10)["median_ms"]
    else:
        step = _make_step(impl, device)
        # warm-up (lazy initialisation, compilation) on a smaller batch with the same T, H, V; its
        # memory is handed back to the OS (see MALLOC_* in `_child`), so it cannot hide the peak
        step(*_inputs(min(n, 2), t, h, v, device, seed=1))
        args = _inputs(n, t, h, v, device)
        before_kb = _rss_kb("VmRSS")
        _reset_peak_rss()
        t0 = time.perf_counter()
        grads = step(*args)
        row["time_ms"] = (time.perf_counter() - t0) * 1e3
        peak = (_rss_kb("VmHWM") - before_kb) / 1024
        del grads
    row["peak_extra_mb"] = peak
    row["peak_extra_no_grads_mb"] = peak - grads_mb
    return row


def _child(impl, n, t, h, v, device) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", impl, str(n), str(t), str(h), str(v),
           "--device", device]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=CASE_TIMEOUT_S, cwd=str(ROOT),
                              env=dict(os.environ, PYTHONPATH=str(ROOT), **_MALLOC_ENV))
    except subprocess.TimeoutExpired:
        return {"impl": impl, "M": n * t, "H": h, "V": v, "note": f"timed out after {CASE_TIMEOUT_S} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
        return {"impl": impl, "M": n * t, "H": h, "V": v, "note": f"failed: {err}"}
    return json.loads(lines[-1])


def _liger_available() -> str | None:
    try:
        import liger_kernel.chunked_loss  # noqa: F401
    except ImportError as exc:
        return f"not importable: {exc}"
    return None


def collect(device: str, quick: bool, only: list[str] | None = None, rows: list | None = None,
            impls: list[str] | None = None) -> list[dict]:
    """`only`: case names (from FULL_SHAPES / QUICK_SHAPES) to run instead of all of them; `impls`:
    implementations to run instead of all of them (`matmuls` runs on CUDA only)."""
    rows = [] if rows is None else rows
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    if only:
        shapes = [s for s in shapes if s[0] in only]
    chosen = list(QUICK_IMPLS if quick else IMPLS) + (["matmuls"] if device == "cuda" else [])
    if impls:
        chosen = [i for i in chosen if i in impls]
    liger_missing = _liger_available() if "liger" in chosen else None
    for name, n, t, h, v in shapes:
        case_rows = []
        for impl in chosen:
            if impl == "liger" and liger_missing:
                row = {"impl": impl, "M": n * t, "H": h, "V": v, "note": f"liger-kernel {liger_missing}"}
            else:
                row = _child(impl, n, t, h, v, device)
            if impl != "fused" and str(row.get("note", "")).startswith(("failed", "timed out")):
                row["note"] = "baseline " + row["note"]  # recorded; only the fused loss's failure fails the suite
            row = dict(case=name, **row)
            print(json.dumps(row), flush=True)
            case_rows.append(row)
            rows.append(row)
        add_ratios(case_rows)
        flush(rows)
    return rows


def add_ratios(case_rows: list[dict]) -> list[dict]:
    """Adds memory ratios to the unfused path and time ratios to the three matmuls (one shape's rows)."""
    by_impl = {r["impl"]: r for r in case_rows}
    unfused, floor = by_impl.get("unfused", {}), by_impl.get("matmuls", {})
    for r in case_rows:
        if "peak_extra_mb" in r and "peak_extra_mb" in unfused:
            r["mem_vs_unfused"] = r["peak_extra_mb"] / unfused["peak_extra_mb"]
            r["mem_no_grads_vs_unfused"] = r["peak_extra_no_grads_mb"] / unfused["peak_extra_no_grads_mb"]
        if "time_ms" in r and "time_ms" in floor and r["impl"] != "matmuls":
            r["time_vs_matmuls"] = r["time_ms"] / floor["time_ms"]
    return case_rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", nargs=5, metavar=("IMPL", "N", "T", "H", "V"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.case:
        impl, *dims = args.case
        print(json.dumps(run_case(impl, *map(int, dims), args.device)), flush=True)
    else:
        for row in collect(args.device, args.quick):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
