"""Shared timing and bandwidth helpers for the benchmark suites.

GPU: CUDA events around each repetition after warm-up, median of the repetitions;
the inputs of a timed call are fixed, so for tensors that fit in L2 the number is an
upper bound on bandwidth (the Janus shapes here are far larger than L2).
CPU: perf_counter around each repetition, median. Absolute CPU numbers are only
meaningful side by side inside one run.

Rows: `failure_note` turns an exception of one implementation into the row's note, so a suite
records it and goes on ("baseline failed: ..." for a baseline such as transformers' `generate`,
which does not fail the suite; "failed: ..." for this project's own code, which does), and
`flush(rows)` writes rows changed after they were appended (run_all's RowLog; a plain list ignores it).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def failure_note(exc: BaseException, *, baseline: bool) -> str:
    """One line naming the error: what a row records instead of its timings."""
    text = str(exc).strip().splitlines()
    return f"{'baseline failed' if baseline else 'failed'}: {type(exc).__name__}: {text[0] if text else ''}"[:400]


def flush(rows) -> None:
    """Writes `rows` out again after rows already appended were changed (a no-op for a plain list)."""
    if hasattr(rows, "flush"):
        rows.flush()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, *, warmup: int = 3, reps: int = 10) -> dict:
    """Median / p20 / p80 wall time of `fn()` in milliseconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return {"median_ms": statistics.median(times), "p20_ms": q(0.2), "p80_ms": q(0.8)}


def copy_ms(nbytes: int, device: str) -> float:
    """Median time of copying a buffer of `nbytes` (it moves 2 * nbytes: read + write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src), device, warmup=3, reps=20)["median_ms"]


def copy_bandwidth_gbps(nbytes: int, device: str) -> float:
    """Measured device-to-device copy bandwidth (bytes read + bytes written) when moving `nbytes` in all."""
    half = max(nbytes // 2, 1 << 20)
    return 2 * half / (copy_ms(half, device) * 1e-3) / 1e9


def peak_cuda_mb(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
