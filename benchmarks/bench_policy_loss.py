"""clipped_policy_loss forward+backward: Triton kernels vs the torch reference (eager and compiled).

Bytes counted per token (the fewest the op must move): forward reads logp, old_logp (4 B each,
fp32) and the mask (1 B); backward reads them again and writes the fp32 gradient (4 B):
22 B/token plus [N]-sized advantages. Effective GB/s = counted bytes / median time, and
`of_copy` = that over the measured device-to-device copy bandwidth.
On CPU only the reference runs (Triton on CPU is the interpreter: correctness only).
--quick (a check that the suite runs) leaves out torch.compile and times 3 repetitions.
The compiled reference is compiled once with dynamic shapes (one compile serves every shape, where
static shapes compile the first and then recompile dynamically anyway), and runs last per shape, so
the eager and Triton rows of a shape are written before the compile; each row is written as it is
measured (run_all's RowLog), its speed-up once the shape's eager time is known.
"""

from __future__ import annotations

import torch
from _timing import copy_bandwidth_gbps, failure_note, flush, time_ms

from pairuni_kernels import reference
from pairuni_kernels.policy_loss import clipped_policy_loss as fused_loss

SHAPES = [(64, 576), (128, 1024), (256, 2048), (512, 4096), (4096, 4096)]
QUICK_SHAPES = [(64, 576)]
BYTES_PER_TOKEN = 4 + 4 + 1 + 4 + 4 + 1 + 4


def _inputs(n, t, device):
    g = torch.Generator(device=device).manual_seed(0)
    lp = -torch.rand(n, t, device=device, generator=g) * 3
    old = lp + 0.1 * torch.randn(n, t, device=device, generator=g)
    adv = torch.randn(n, device=device, generator=g)
    mask = torch.rand(n, t, device=device, generator=g) > 0.1
    return lp.requires_grad_(), old, adv, mask


def _step(loss_fn, lp, old, adv, mask):
    def run():
        lp.grad = None
        loss_fn(lp, old, adv, mask).loss.backward()
    return run


def collect(device: str, quick: bool, rows: list | None = None) -> list[dict]:
    rows = [] if rows is None else rows
    shapes = QUICK_SHAPES if quick else (SHAPES if device == "cuda" else SHAPES[:4])
    compiled_ref = None if quick else torch.compile(reference.clipped_policy_loss, dynamic=True)
    for n, t in shapes:
        lp, old, adv, mask = _inputs(n, t, device)
        nbytes = n * t * BYTES_PER_TOKEN
        impls = {"reference_eager": reference.clipped_policy_loss}
        if device == "cuda":
            impls["triton"] = fused_loss
        if compiled_ref is not None:
            impls["reference_compiled"] = compiled_ref
        copy_gbps = copy_bandwidth_gbps(nbytes, device) if device == "cuda" else None
        shape_rows = []
        for name, fn in impls.items():
            warmup, reps = (1, 3) if quick else (3, 10 if n * t < 2**22 else 5)
            row = {"case": f"N={n} T={t}", "impl": name}
            try:
                stats = time_ms(_step(fn, lp, old, adv, mask), device, warmup=warmup, reps=reps)
            except Exception as exc:  # noqa: BLE001 - recorded; the next implementation runs
                row["note"] = failure_note(exc, baseline=name != "triton")
                rows.append(row)
                continue
            gbps = nbytes / (stats["median_ms"] * 1e-3) / 1e9
            row.update({"fwd_bwd_ms": stats["median_ms"], "p20_ms": stats["p20_ms"], "p80_ms": stats["p80_ms"],
                        "eff_gbps": gbps})
            if copy_gbps:
                row["of_copy"] = gbps / copy_gbps
            shape_rows.append(row)
            rows.append(row)
        eager = [r for r in shape_rows if r["impl"] == "reference_eager"]
        if eager:
            for row in shape_rows:
                row["speedup_vs_eager"] = eager[0]["fwd_bwd_ms"] / row["fwd_bwd_ms"]
            flush(rows)
    return rows
