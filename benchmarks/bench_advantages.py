"""group_advantages (with pair weights): Triton kernel vs the torch reference.

Per element the op must read the reward (4 B), group id (8 B) and weight (4 B) and write the
advantage (4 B): 20 B. The sort that segments arbitrary group ids is included in the timing.
"""

from __future__ import annotations

import torch
from _timing import time_ms

from pairuni_kernels import reference
from pairuni_kernels.advantages import group_advantages

SIZES = [(128, 8), (4096, 8), (1 << 20, 8), (1 << 22, 16)]
QUICK_SIZES = [(128, 8), (4096, 8)]


def collect(device: str, quick: bool) -> list[dict]:
    rows = []
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
            ms = time_ms(fn, device, warmup=1 if quick else 2, reps=3 if quick else 10)["median_ms"]
            base = base or ms
            rows.append({"case": f"N={n} G={group}", "impl": name, "ms": ms,
                         "eff_gbps": n * 20 / (ms * 1e-3) / 1e9, "speedup_vs_reference": base / ms})
    return rows
