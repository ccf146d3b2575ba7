"""Our fused head + loss against TRL 1.16's fused head + its torch loss: peak memory and time, side by side.

    python benchmarks/run_all.py --only trl_head [--quick]             # all cases, table + JSON
    python benchmarks/bench_trl_head.py --case trl 2 256 3584 151936 dapo --device cpu   # one case

Implementations (forward + backward of the loss w.r.t. hidden and head weight, bf16 inputs, one step):
  pairuni  pairuni_kernels.fused_linear_policy_loss on hidden [N, T, H]: log-probs, the clipped loss and its
           gradients in one chunked pass; masked tokens never reach the head
  trl      trl.kernels.ChunkedLogProbFunction called as TRL 1.16's `add_fused_lm_head` calls it for GRPOTrainer
           (outputs log-probs and entropy, vocabulary tiles of trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE;
           only the unmasked positions where TRL finds a Triton device, every position elsewhere, as TRL does),
           then the torch maths of `GRPOTrainer._compute_loss` on the [N, T] log-probs: token-level ratios,
           two-sided clip, beta = 0, no entropy bonus; loss_type "dapo" (sum over tokens / tokens in the batch,
           one process, no accumulation) or "grpo" (mean over rows of each row's token mean)
Both sides get the same inputs and the same knobs (epsilon_low 0.2, epsilon_high 0.28; our loss_agg_mode
"token-mean" for dapo, "seq-mean-token-mean" for grpo), and each row records its loss and gradient norms:
`add_ratios` puts their differences next to the memory and time ratios, so a row pair that computed two
different things says so (`same_result`). tests/benchmarks/test_bench_trl_head.py checks on a small shape
that both sides give the float64 reference's loss and gradients.

Shapes: Qwen-class policy heads (V = 151,936; H = 896 / 1536 / 3584 for 0.5B / 1.5B / 7B) and Janus-Pro's
two heads (text V = 102,400, image V = 16,384; H = 2048 / 4096 for 1B / 7B). The completions are ragged:
row i holds between T/2 and T tokens (the rest is padding, as in a GRPO batch). On CUDA a few thousand
tokens per case; on CPU the same V and H with fewer tokens (the step is three [M, H] x [H, V] matmuls).

Memory: on CPU every (case, implementation) runs in its own subprocess and the peak is the peak resident
set size above the resident size before the step (as bench_linear: VmHWM reset through
/proc/self/clear_refs, glibc returning freed memory at once); on CUDA all cases run in one process and
the peak is torch.cuda.max_memory_allocated above memory_allocated before the step. `peak_extra_mb`
includes the returned gradients (grad hidden [M, H] and grad weight [V, H] in bf16, which every
implementation returns); `peak_extra_no_grads_mb` subtracts them. Time: CUDA events, median of 5 steps
after 2 warm-ups; CPU: median of 3 steps after a warm-up on a smaller batch. CPU times only mean something
as the ratio of two rows measured in the same run (`time_vs_trl`), and the CPU runs TRL's torch fallback
(its Triton kernels need a GPU) against our torch path.

TRL is imported from the environment; where it is not installed (the GPU machine) from a wheel in
wheels/ (trl-*.whl, a zip that Python imports from, as `make wheels` carries bitsandbytes). Where
`trl.trainer.utils` does not import (pandas or datasets missing), its `maybe_gather_lm_head_ctx` (which
ChunkedLogProbFunction.backward enters) is given as a null context, what TRL itself returns without
DeepSpeed ZeRO-3; rows say so in `trl_source`. Without TRL the trl rows are notes and the suite goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
from _timing import failure_note, flush, time_ms

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench_linear import _MALLOC_ENV, _reset_peak_rss, _rss_kb  # noqa: E402

QWEN_V, JANUS_TEXT_V, JANUS_IMAGE_V = 151936, 102400, 16384
# (name, N, T, H, V, loss_type)
CPU_SHAPES = [
    ("qwen-0.5B 4x256 H896 dapo", 4, 256, 896, QWEN_V, "dapo"),
    ("qwen-1.5B 4x256 H1536 dapo", 4, 256, 1536, QWEN_V, "dapo"),
    ("qwen-7B 2x256 H3584 dapo", 2, 256, 3584, QWEN_V, "dapo"),
    ("qwen-7B 2x256 H3584 grpo", 2, 256, 3584, QWEN_V, "grpo"),
    ("janus-1B text 4x256 H2048 dapo", 4, 256, 2048, JANUS_TEXT_V, "dapo"),
    ("janus-7B text 2x256 H4096 dapo", 2, 256, 4096, JANUS_TEXT_V, "dapo"),
    ("janus-1B image 4x576 H2048 dapo", 4, 576, 2048, JANUS_IMAGE_V, "dapo"),
    ("janus-7B image 4x576 H4096 dapo", 4, 576, 4096, JANUS_IMAGE_V, "dapo"),
]
CUDA_SHAPES = [
    ("qwen-0.5B 8x512 H896 dapo", 8, 512, 896, QWEN_V, "dapo"),
    ("qwen-1.5B 8x512 H1536 dapo", 8, 512, 1536, QWEN_V, "dapo"),
    ("qwen-7B 8x512 H3584 dapo", 8, 512, 3584, QWEN_V, "dapo"),
    ("qwen-7B 8x512 H3584 grpo", 8, 512, 3584, QWEN_V, "grpo"),
    ("janus-1B text 8x512 H2048 dapo", 8, 512, 2048, JANUS_TEXT_V, "dapo"),
    ("janus-7B text 8x512 H4096 dapo", 8, 512, 4096, JANUS_TEXT_V, "dapo"),
    ("janus-1B image 8x576 H2048 dapo", 8, 576, 2048, JANUS_IMAGE_V, "dapo"),
    ("janus-7B image 8x576 H4096 dapo", 8, 576, 4096, JANUS_IMAGE_V, "dapo"),
]
QUICK_SHAPES = [  # --quick (the GPU session's dry run): checks that the suite runs
    ("quick text 2x64 H64 V4096 dapo", 2, 64, 64, 4096, "dapo"),
    ("quick image 2x64 H64 V1024 grpo", 2, 64, 64, 1024, "grpo"),
]
IMPLS = ("pairuni", "trl")
LOSS_TYPES = {"dapo": "token-mean", "grpo": "seq-mean-token-mean"}  # TRL loss_type -> our loss_agg_mode
EPSILON_LOW, EPSILON_HIGH = 0.2, 0.28
DTYPE = torch.bfloat16
CASE_TIMEOUT_S = 900
# a row pair agrees when the losses differ by at most this (absolute; the loss is O(|advantage|) = O(1))
# and the gradient norms by at most GRAD_NORM_RTOL (bf16 matmuls on both sides, fp32 softmax)
LOSS_ATOL, GRAD_NORM_RTOL = 2e-3, 2e-2


# ----------------------------------------------------------------------------- TRL, from wherever it is
_TRL: dict = {}


def load_trl() -> dict:
    """{"function": ChunkedLogProbFunction, "chunk_size", "use_triton", "source"}; raises ImportError."""
    if _TRL:
        return _TRL
    source = "installed"
    try:
        import trl.kernels.chunked_logprob as chunked
    except ImportError:
        wheels = sorted(glob.glob(str(ROOT / "wheels" / "trl-*.whl")))
        if not wheels:
            raise
        sys.path.insert(0, wheels[-1])  # a pure-Python wheel is a zip Python imports from
        for name in [m for m in sys.modules if m == "trl" or m.startswith("trl.")]:
            del sys.modules[name]
        import trl.kernels.chunked_logprob as chunked
        source = f"wheels/{Path(wheels[-1]).name}"
    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk_size
    except ImportError as exc:  # the backward only needs maybe_gather_lm_head_ctx (ZeRO-3 gathering)
        shim = types.ModuleType("trl.trainer.utils")
        shim.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
        sys.modules["trl.trainer.utils"] = shim
        chunk_size = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16
        source += f"; trl.trainer.utils not importable ({exc}): maybe_gather_lm_head_ctx = nullcontext"
    from importlib import metadata

    try:
        version = metadata.version("trl")
    except metadata.PackageNotFoundError:
        version = getattr(sys.modules.get("trl"), "__version__", "?")
    _TRL.update(function=chunked.ChunkedLogProbFunction, chunk_size=chunk_size, use_triton=chunked._use_triton,
                source=f"trl {version} ({source})")
    return _TRL


def environment() -> dict:
    """Versions of the baseline and of this checkout (run_all adds them to the results' header)."""
    from importlib import metadata

    missing = trl_unavailable()
    env = {"trl": missing or load_trl()["source"]}
    try:
        env["transformers"] = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        env["transformers"] = None
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    changed = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    env["commit"] = (commit.stdout.strip() + (" + uncommitted changes" if changed.stdout.strip() else "")) or None
    return env


def trl_unavailable() -> str | None:
    try:
        load_trl()
    except ImportError as exc:
        return f"trl not importable ({exc}; `make wheels` carries it to the GPU machine)"
    return None


# ----------------------------------------------------------------------------- inputs and the two losses
def make_inputs(n: int, t: int, h: int, v: int, device, *, dtype=DTYPE, seed: int = 0) -> dict:
    """Random inputs of one case, drawn on `device` (large heads are not drawn on the CPU and copied).

    hidden [N, T, H] and weight [V, H] in `dtype` (requires grad; logits of unit scale), targets [N, T],
    mask [N, T] bool with row i holding its first L_i tokens, L_i uniform in [T/2, T], advantages [N],
    old_logp [N, T] float32 = the head's own log-probs (computed in `dtype`, 256 rows at a time) plus
    N(0, 0.05^2) noise, so the importance ratios sit near 1 and some tokens are clipped, as in training."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, t, h, generator=g, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, device=device) / h ** 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n, t), generator=g, device=device)
    lengths = torch.randint(t // 2, t + 1, (n,), generator=g, device=device)
    mask = torch.arange(t, device=device)[None, :] < lengths[:, None]
    advantages = torch.randn(n, generator=g, device=device)
    with torch.no_grad():
        flat, tgt = hidden.detach().reshape(n * t, h), targets.reshape(n * t)
        logp = torch.cat([torch.log_softmax((flat[i:i + 256] @ weight.detach().t()).float(), -1)
                          .gather(-1, tgt[i:i + 256, None])[:, 0] for i in range(0, n * t, 256)])
        old_logp = logp.view(n, t) + 0.05 * torch.randn(n, t, generator=g, device=device)
    return {"hidden": hidden, "weight": weight, "targets": targets, "mask": mask, "advantages": advantages,
            "old_logp": old_logp}


def pairuni_loss(inp: dict, loss_type: str) -> torch.Tensor:
    from pairuni_kernels import fused_linear_policy_loss

    return fused_linear_policy_loss(inp["hidden"], inp["weight"], inp["targets"], inp["old_logp"], inp["advantages"],
                                    inp["mask"], epsilon_low=EPSILON_LOW, epsilon_high=EPSILON_HIGH,
                                    loss_agg_mode=LOSS_TYPES[loss_type]).loss


def trl_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor):
    """(log-probs, entropy), each [N, T] float32 and 0 where mask is off: the head as TRL 1.16's fused forward
    for GRPOTrainer runs it (`add_fused_lm_head(..., outputs=("log_probs", "entropy"))`, temperature 1,
    no bias, softcap or logit scale)."""
    trl = load_trl()
    n, t, h = hidden.shape
    compact = trl["use_triton"](hidden.device)  # TRL scores only the unmasked positions on Triton devices
    rows = hidden[mask] if compact else hidden.reshape(n * t, h)
    labels = targets[mask] if compact else targets.reshape(n * t)
    out = trl["function"].apply(rows, weight, None, labels, 1.0, trl["chunk_size"], None, 1.0,
                                ("log_probs", "entropy"))
    logp, entropy = out[0], out[1]
    if compact:
        return tuple(x.new_zeros(mask.shape).masked_scatter(mask, x) for x in (logp, entropy))
    return tuple(x.view(n, t).masked_fill(~mask, 0) for x in (logp, entropy))


def trl_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    loss_type: str) -> torch.Tensor:
    """GRPOTrainer._compute_loss of TRL 1.16 for loss_type "dapo" / "grpo" with token-level importance sampling,
    beta = 0, no entropy bonus, one process and no gradient accumulation, written out here:
        r = exp(logp - old_logp);  l_t = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)
        dapo: sum_t(l_t * m_t) / sum(m)            (normalised by num_items_in_batch = the batch's tokens)
        grpo: mean_i(sum_t(l_t * m_t) / max(sum_t m_t, 1))."""
    m = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - EPSILON_LOW, 1 + EPSILON_HIGH) * adv)
    if loss_type == "dapo":
        return (per_token * m).sum() / m.sum().clamp(min=1.0)
    if loss_type == "grpo":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    raise ValueError(f"loss_type: expected one of {tuple(LOSS_TYPES)}, got {loss_type!r}")


def trl_loss(inp: dict, loss_type: str) -> torch.Tensor:
    logp, _entropy = trl_logprobs(inp["hidden"], inp["weight"], inp["targets"], inp["mask"])
    return trl_policy_loss(logp, inp["old_logp"], inp["advantages"], inp["mask"], loss_type)


def step(impl: str, inp: dict, loss_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training step of the head: (loss, grad hidden, grad weight)."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    loss = (pairuni_loss if impl == "pairuni" else trl_loss)(inp, loss_type)
    grad_hidden, grad_weight = torch.autograd.grad(loss, [inp["hidden"], inp["weight"]])
    return loss.detach(), grad_hidden, grad_weight


# ----------------------------------------------------------------------------- one case
def _base_row(impl, n, t, h, v, loss_type) -> dict:
    return {"impl": impl, "loss_type": loss_type, "M": n * t, "H": h, "V": v}


def run_case(impl: str, n: int, t: int, h: int, v: int, loss_type: str, device: str) -> dict:
    """Measures one (case, implementation) in this process: peak memory, time, loss and gradient norms."""
    row = _base_row(impl, n, t, h, v, loss_type)
    row["dtype"] = str(DTYPE).replace("torch.", "")
    if impl == "trl":
        row["trl_source"] = load_trl()["source"]
    mb = 1 / 2 ** 20
    grads_mb = (n * t * h + v * h) * DTYPE.itemsize * mb
    inp = make_inputs(n, t, h, v, device)
    row["tokens"] = int(inp["mask"].sum())
    if device == "cuda":
        for _ in range(2):
            step(impl, inp, loss_type)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss, gh, gw = step(impl, inp, loss_type)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) * mb
        row["time_ms"] = time_ms(lambda: step(impl, inp, loss_type), "cuda", warmup=0, reps=5)["median_ms"]
    else:
        # warm-up (lazy initialisation) on one row; its memory goes back to the OS (see _MALLOC_ENV)
        step(impl, make_inputs(1, t, h, v, device, seed=1), loss_type)
        before_kb = _rss_kb("VmRSS")
        _reset_peak_rss()
        t0 = time.perf_counter()
        loss, gh, gw = step(impl, inp, loss_type)
        times = [(time.perf_counter() - t0) * 1e3]
        peak = (_rss_kb("VmHWM") - before_kb) / 1024
        del gh, gw
        for _ in range(2):
            t0 = time.perf_counter()
            loss, gh, gw = step(impl, inp, loss_type)
            times.append((time.perf_counter() - t0) * 1e3)
        row["time_ms"] = statistics.median(times)
    row["peak_extra_mb"] = peak
    row["peak_extra_no_grads_mb"] = peak - grads_mb
    row["loss"] = float(loss)
    row["grad_hidden_norm"] = float(gh.float().norm())
    row["grad_weight_norm"] = float(gw.float().norm())
    return row


def _child(impl, n, t, h, v, loss_type, device) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", impl, str(n), str(t), str(h), str(v), loss_type,
           "--device", device]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=CASE_TIMEOUT_S, cwd=str(ROOT),
                              env=dict(os.environ, PYTHONPATH=str(ROOT), **_MALLOC_ENV))
    except subprocess.TimeoutExpired:
        return {**_base_row(impl, n, t, h, v, loss_type), "note": f"timed out after {CASE_TIMEOUT_S} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {**_base_row(impl, n, t, h, v, loss_type), "note": f"failed: {err}"}
    return json.loads(lines[-1])


def _in_process(impl, n, t, h, v, loss_type, device) -> dict:
    try:
        return run_case(impl, n, t, h, v, loss_type, device)
    except Exception as exc:  # an OOM of one case is its row; the next case runs
        return {**_base_row(impl, n, t, h, v, loss_type), "note": failure_note(exc, baseline=False)}
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()


def add_ratios(case_rows: list[dict]) -> list[dict]:
    """On the pairuni row of one case: memory and time over TRL's, and whether both computed the same step."""
    by_impl = {r["impl"]: r for r in case_rows}
    ours, trl = by_impl.get("pairuni", {}), by_impl.get("trl", {})
    if "peak_extra_mb" not in ours or "peak_extra_mb" not in trl:
        return case_rows
    ours["mem_vs_trl"] = ours["peak_extra_mb"] / trl["peak_extra_mb"]
    ours["mem_no_grads_vs_trl"] = ours["peak_extra_no_grads_mb"] / trl["peak_extra_no_grads_mb"]
    ours["time_vs_trl"] = ours["time_ms"] / trl["time_ms"]
    ours["loss_diff"] = abs(ours["loss"] - trl["loss"])
    ours["grad_norm_rel_diff"] = max(abs(ours[k] - trl[k]) / max(trl[k], 1e-30)
                                     for k in ("grad_hidden_norm", "grad_weight_norm"))
    ours["same_result"] = ours["loss_diff"] <= LOSS_ATOL and ours["grad_norm_rel_diff"] <= GRAD_NORM_RTOL
    return case_rows


def collect(device: str, quick: bool, only: list[str] | None = None, rows: list | None = None,
            impls: list[str] | None = None) -> list[dict]:
    """`only`: case names to run instead of all of them; `impls`: implementations instead of both.
    CPU: each (case, implementation) in its own subprocess; CUDA: all in this process."""
    rows = [] if rows is None else rows
    shapes = QUICK_SHAPES if quick else CUDA_SHAPES if device == "cuda" else CPU_SHAPES
    if only:
        shapes = [s for s in shapes if s[0] in only]
    chosen = [i for i in IMPLS if not impls or i in impls]
    missing = trl_unavailable() if "trl" in chosen else None
    for name, n, t, h, v, loss_type in shapes:
        case_rows = []
        for impl in chosen:
            if impl == "trl" and missing:
                row = {**_base_row(impl, n, t, h, v, loss_type), "note": f"baseline unavailable: {missing}"}
            elif device == "cuda":
                row = _in_process(impl, n, t, h, v, loss_type, device)
            else:
                row = _child(impl, n, t, h, v, loss_type, device)
            if impl == "trl" and str(row.get("note", "")).startswith(("failed", "timed out")):
                row["note"] = "baseline " + row["note"]  # recorded; only our loss's failure fails the suite
            row = dict(case=name, **row)
            print(json.dumps(row), flush=True)
            case_rows.append(row)
            rows.append(row)
        add_ratios(case_rows)
        flush(rows)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", nargs=6, metavar=("IMPL", "N", "T", "H", "V", "LOSS_TYPE"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.case:
        impl, *dims, loss_type = args.case
        print(json.dumps(run_case(impl, *map(int, dims), loss_type, args.device)), flush=True)
    else:
        collect(args.device, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
