"""group_advantages (with pair weights): Triton kernel vs the torch reference.

Per element the op must read the reward (4 B), group id (8 B) and weight (4 B) and write the
advantage (4 B): 20 B. The sort that segments arbitrary group ids is included in the timing.
Each row is written as soon as it is measured (run_all's RowLog).
"""

from __future__ import annotations

import torch
from _timing import failure_note, time_ms

from pairuni_kernels import reference
from pairuni_kernels.advantages import group_advantages

SIZES = [(128, 8), (4096, 8), (1 << 20, 8), (1 << 22, 16)]
QUICK_SIZES = [(128, 8), (4096, 8)]


def collect(device: str, quick: bool, rows: list | None = None) -> list[dict]:
    rows = [] if rows is None else rows
    for n, group in (QUICK_SIZES if quick else SIZES):
        g = torch.Generator(device=device).manual_seed(0)
        rewards = torch.rand(n, device=device, generator=g)
        ids = torch.randperm(n, device=device, generator=g) // group  # groups scattered in any order
        weights = torch.rand(n, device=device, generator=g)
        impls = {"reference": lambda: reference.group_advantages(rewards, ids, weights=weights)}
        if device == "cuda":
            impls["triton"] = lambda: group_advantages(rewards, ids, weights=weights)
        base = None
        for name, fn in impls.items():
            row = {"case": f"N={n} G={group}", "impl": name}
            try:
                ms = time_ms(fn, device, warmup=1 if quick else 2, reps=3 if quick else 10)["median_ms"]
            except Exception as exc:  # noqa: BLE001 - recorded; the next implementation runs
                rows.append({**row, "note": failure_note(exc, baseline=False)})
                continue
            if name == "reference":
                base = ms
            row.update({"ms": ms, "eff_gbps": n * 20 / (ms * 1e-3) / 1e9})
            if base is not None:
                row["speedup_vs_reference"] = base / ms
            rows.append(row)
    return rows
