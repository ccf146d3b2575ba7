"""Clipped policy-ratio loss (PPO / GRPO / PairGRPO): Triton kernels, torch.library ops, front.

Four layers, as in Liger-Kernel:
  kernels      `_policy_loss_fwd_kernel`, `_policy_loss_bwd_kernel` (one program per row,
               looping over T in BLOCK chunks; int64 offsets)
  launchers    `_launch_fwd`, `_launch_bwd`
  ops          `pairuni::clipped_policy_loss_fwd` / `_bwd` (torch.library custom ops with a fake
               implementation and registered autograd, so torch.compile(fullgraph=True) traces them)
  front        `clipped_policy_loss` (validation, dispatch, PolicyLossOutput); `clipped_policy_loss_and_grad`
               (the loss and d loss / d logp in one call, for the fused linear loss inside its op)

Every aggregation mode lives in the kernels: each row emits `num_row` and `den_row` such that
    loss = sum(num) / max(sum(den), 1)
  token-mean               num = row_sum            den = row_count
  seq-mean-token-mean      num = row_sum / count    den = [count > 0]
  seq-mean-token-sum       num = row_sum            den = 1
  seq-mean-token-sum-norm  num = row_sum / T        den = 0
so the only work outside the kernels is summing [N]-sized partials (deterministic, no atomics).

Bytes moved at N*T tokens (fp32 logp/old, bool mask, advantages per row):
  forward  4 + 4 + 1 = 9 B/token read (+4 with ref_logp, +4 with per-token advantages)
  backward the same 9 B/token read + 4 B/token written (grad in logp's dtype)
Sequence-level ratios re-read the row once more in each direction (row reduction first).
"""

from __future__ import annotations

import contextlib
import itertools

import torch
import triton
import triton.language as tl

from . import reference as ref
from ._backend import use_triton
from ._checks import FLOAT_DTYPES
from ._launch import KERNEL_FLOAT_DTYPES, KernelLaunch, unique
from .reference import PolicyLossOutput

_KL_CODE = {name: i for i, name in enumerate(ref.KL_ESTIMATORS)}
_AGG_CODE = {name: i for i, name in enumerate(ref.LOSS_AGG_MODES)}
# rows of the per-row statistics tensor written by the forward kernel
_NUM, _DEN, _COUNT, _CLIP, _KL, _RATIO, _SEQ_LR = range(7)
_N_STATS = 7
# a plain float global is rejected by the Triton compiler (the interpreter accepts it)
LOG_RATIO_CLAMP: tl.constexpr = tl.constexpr(ref.LOG_RATIO_CLAMP)


@triton.jit
def _token_terms(lp, old, ref_lp, a, seq_lr, eps_low, eps_high, dual_c, beta, kl_est,
                 SEQ_LEVEL: tl.constexpr, HAS_REF: tl.constexpr):
    """Per-token loss pieces. Returns (token loss, clipped flag, kl, ratio, dpg/dlog_ratio, dkl/dlogp).

    The dual clip (on when dual_c > 1) and the KL estimator (0, 1, 2 = k1, k2, k3) are runtime
    choices: a few selects per token cost nothing next to the loads, and each constexpr would
    double the compiled variants."""
    if SEQ_LEVEL:
        log_ratio = tl.zeros_like(lp) + seq_lr
    else:
        log_ratio = tl.minimum(tl.maximum(lp - old, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP)
    ratio = tl.exp(log_ratio)
    pg_unclipped = -a * ratio
    pg_clipped = -a * tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
    clipped = pg_clipped > pg_unclipped
    pg = tl.where(clipped, pg_clipped, pg_unclipped)
    # d pg / d log_ratio: -A * ratio on the unclipped branch, 0 where a clip bound is active
    dpg = tl.where(clipped, 0.0, -a * ratio)
    bound = -a * dual_c
    dual = (a < 0) & (pg > bound) & (dual_c > 1.0)
    pg = tl.where(dual, bound, pg)
    dpg = tl.where(dual, 0.0, dpg)
    clipped = clipped | dual
    if HAS_REF:
        diff = lp - ref_lp
        # k1 = logp - ref (d/dlogp = 1); k2 = (logp - ref)^2 / 2 (d/dlogp = logp - ref);
        # k3 = e^d - d - 1 with d = clamp(ref - logp) (d/dlogp = 1 - e^d inside the clamp, 0 outside)
        d = tl.minimum(tl.maximum(-diff, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP)
        ed = tl.exp(d)
        inside = (-diff >= -LOG_RATIO_CLAMP) & (-diff <= LOG_RATIO_CLAMP)
        kl = tl.where(kl_est == 0, diff, tl.where(kl_est == 1, 0.5 * diff * diff, ed - d - 1.0))
        dkl = tl.where(kl_est == 0, 1.0, tl.where(kl_est == 1, diff, tl.where(inside, 1.0 - ed, 0.0)))
        tok = pg + beta * kl
    else:
        kl = tl.zeros_like(lp)
        dkl = tl.zeros_like(lp)
        tok = pg
    return tok, clipped, kl, ratio, dpg, dkl


@triton.jit
def _load_row_chunk(logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, row, cols, T,
                    s_lp, s_old, s_ref, s_adv, s_adv_t, s_mask, HAS_REF: tl.constexpr):
    """Loads one [BLOCK] chunk of a row; masked entries read as 0 so garbage there never leaks.
    Advantages per row are read with a zero stride along T (every lane loads the row's value)."""
    inb = cols < T
    m = (tl.load(mask_ptr + row * s_mask + cols, mask=inb, other=0) != 0) & inb
    lp = tl.load(logp_ptr + row * s_lp + cols, mask=m, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + row * s_old + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_REF:
        ref_lp = tl.load(ref_ptr + row * s_ref + cols, mask=m, other=0.0).to(tl.float32)
    else:
        ref_lp = lp
    a = tl.load(adv_ptr + row * s_adv + cols * s_adv_t, mask=m, other=0.0).to(tl.float32)
    return m, lp, old, ref_lp, a


@triton.jit
def _seq_log_ratio(logp_ptr, old_ptr, mask_ptr, row, T, s_lp, s_old, s_mask, BLOCK: tl.constexpr):
    """Masked mean over a row of clamp(logp - old); also returns the row's token count."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    cnt = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, T, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        inb = cols < T
        m = (tl.load(mask_ptr + row * s_mask + cols, mask=inb, other=0) != 0) & inb
        lp = tl.load(logp_ptr + row * s_lp + cols, mask=m, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + row * s_old + cols, mask=m, other=0.0).to(tl.float32)
        lr = tl.minimum(tl.maximum(lp - old, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP)
        acc += tl.where(m, lr, 0.0)
        cnt += m.to(tl.float32)
    count = tl.sum(cnt, axis=0)
    return tl.sum(acc, axis=0) / tl.maximum(count, 1.0), count


# kl_est and agg are mode codes: the JIT would otherwise specialise a value of 1 into a constant (and
# 0 into a multiple of 16), one compiled binary per mode, which their runtime selects avoid
@triton.jit(do_not_specialize=["kl_est", "agg"])
def _policy_loss_fwd_kernel(
    logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, stats_ptr,
    N, T, s_lp, s_old, s_adv, s_adv_t, s_mask, s_ref,
    eps_low, eps_high, dual_c, beta, inv_T, kl_est, agg,
    SEQ_LEVEL: tl.constexpr, HAS_REF: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    seq_lr = 0.0
    if SEQ_LEVEL:
        # the count is recomputed below; a name bound here must keep one type through the loop
        seq_lr, _seq_count = _seq_log_ratio(logp_ptr, old_ptr, mask_ptr, row, T, s_lp, s_old, s_mask, BLOCK)
    # stored before the token loop, not after it: a scalar kept live across the loop only to be stored
    # at the end is what ptxas spilled first (4-8 B with Triton 3.6 before MAX_REGISTERS)
    tl.store(stats_ptr + 6 * N + row, seq_lr)

    loss_acc = tl.zeros([BLOCK], dtype=tl.float32)
    cnt_acc = tl.zeros([BLOCK], dtype=tl.float32)
    clip_acc = tl.zeros([BLOCK], dtype=tl.float32)
    kl_acc = tl.zeros([BLOCK], dtype=tl.float32)
    ratio_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, T, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        m, lp, old, ref_lp, a = _load_row_chunk(
            logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, row, cols, T,
            s_lp, s_old, s_ref, s_adv, s_adv_t, s_mask, HAS_REF)
        tok, clipped, kl, ratio, _dpg, _dkl = _token_terms(
            lp, old, ref_lp, a, seq_lr, eps_low, eps_high, dual_c, beta, kl_est, SEQ_LEVEL, HAS_REF)
        loss_acc += tl.where(m, tok, 0.0)
        cnt_acc += m.to(tl.float32)
        clip_acc += (m & clipped).to(tl.float32)
        kl_acc += tl.where(m, kl, 0.0)
        ratio_acc += tl.where(m, ratio, 0.0)

    row_sum = tl.sum(loss_acc, axis=0)
    count = tl.sum(cnt_acc, axis=0)
    # agg 0..3 = token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm
    num = tl.where(agg == 1, row_sum / tl.maximum(count, 1.0), tl.where(agg == 3, row_sum * inv_T, row_sum))
    den = tl.where(agg == 0, count, tl.where(agg == 1, tl.where(count > 0, 1.0, 0.0), tl.where(agg == 2, 1.0, 0.0)))
    tl.store(stats_ptr + 0 * N + row, num)
    tl.store(stats_ptr + 1 * N + row, den)
    tl.store(stats_ptr + 2 * N + row, count)
    tl.store(stats_ptr + 3 * N + row, tl.sum(clip_acc, axis=0))
    tl.store(stats_ptr + 4 * N + row, tl.sum(kl_acc, axis=0))
    tl.store(stats_ptr + 5 * N + row, tl.sum(ratio_acc, axis=0))


@triton.jit(do_not_specialize=["kl_est", "agg"])
def _policy_loss_bwd_kernel(
    grad_loss_ptr, den_total_ptr, logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, stats_ptr, grad_ptr,
    N, T, s_lp, s_old, s_adv, s_adv_t, s_mask, s_ref, s_grad,
    eps_low, eps_high, dual_c, beta, inv_T, kl_est, agg,
    SEQ_LEVEL: tl.constexpr, HAS_REF: tl.constexpr, BLOCK: tl.constexpr,
):
    # dL/dlogp_t = g / den_total * c_row * m_t * (d pg_t/d log_ratio_t * d log_ratio_t/d logp_t + beta * dkl_t)
    #   c_row = 1, 1/count, 1, 1/T for the four aggregation modes;
    #   token level: d log_ratio_t/d logp_t = [|logp_t - old_t| <= 20]
    #   sequence level: log_ratio_u = mean_v(clamped lr_v) for all u, so
    #   d/dlogp_t = [inside_t] / count * sum_u m_u * d pg_u/d log_ratio
    row = tl.program_id(0).to(tl.int64)
    seq_lr = tl.load(stats_ptr + 6 * N + row)
    # the row's count and the scale are read after the sequence-level pass: a scalar kept live across
    # that loop is what ptxas spilled first (4 B with registers to spare, Triton 3.9, before MAX_REGISTERS)
    dpg_sum = 0.0
    if SEQ_LEVEL:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, T, BLOCK):
            cols = start + tl.arange(0, BLOCK).to(tl.int64)
            m, lp, old, ref_lp, a = _load_row_chunk(
                logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, row, cols, T,
                s_lp, s_old, s_ref, s_adv, s_adv_t, s_mask, HAS_REF)
            _tok, _clipped, _kl, _ratio, dpg, _dkl = _token_terms(
                lp, old, ref_lp, a, seq_lr, eps_low, eps_high, dual_c, beta, kl_est, SEQ_LEVEL, HAS_REF)
            acc += tl.where(m, dpg, 0.0)
        dpg_sum = tl.sum(acc, axis=0)
    count = tl.load(stats_ptr + 2 * N + row)
    seq_grad = dpg_sum / tl.maximum(count, 1.0)
    scale = tl.load(grad_loss_ptr).to(tl.float32) / tl.load(den_total_ptr)
    scale = tl.where(agg == 1, scale / tl.maximum(count, 1.0), tl.where(agg == 3, scale * inv_T, scale))

    for start in range(0, T, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        m, lp, old, ref_lp, a = _load_row_chunk(
            logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, row, cols, T,
            s_lp, s_old, s_ref, s_adv, s_adv_t, s_mask, HAS_REF)
        _tok, _clipped, _kl, _ratio, dpg, dkl = _token_terms(
            lp, old, ref_lp, a, seq_lr, eps_low, eps_high, dual_c, beta, kl_est, SEQ_LEVEL, HAS_REF)
        d_raw = lp - old
        inside = (d_raw >= -LOG_RATIO_CLAMP) & (d_raw <= LOG_RATIO_CLAMP)
        if SEQ_LEVEL:
            g = tl.where(inside, seq_grad, 0.0)
        else:
            g = tl.where(inside, dpg, 0.0)
        if HAS_REF:
            g += beta * dkl
        g = tl.where(m, g * scale, 0.0)
        tl.store(grad_ptr + row * s_grad + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < T)


# ----------------------------------------------------------------------------- launchers
#: Tiles a row is walked in: one for short answers, one for long ones. Every entry is a compiled
#: variant of each kernel, so the list stays short; a tile larger than T only masks lanes.
BLOCK_SIZES = (128, 1024)


def _block_for(t: int) -> int:
    return next((b for b in BLOCK_SIZES if b >= t), BLOCK_SIZES[-1])


def _inner_contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels take a row stride and need unit stride along T."""
    if x is None or x.dim() == 1 or x.stride(-1) == 1:
        return x
    return x.contiguous()


def _kernel_dtype(logp, old_logp, ref_logp) -> torch.dtype:
    """The dtype the kernels read the log-probs in: the caller's when they all share one the kernels
    take, else float32 (an upcast never loses what the reference path would see)."""
    same = all(x is None or x.dtype == logp.dtype for x in (old_logp, ref_logp))
    return logp.dtype if same and logp.dtype in KERNEL_FLOAT_DTYPES else torch.float32


def _kernel_tensors(logp, old_logp, advantages, mask, ref_logp):
    """Inputs as the kernels read them: log-probs in one dtype, advantages in fp32 (per row they are
    [N]-sized; per token a cast is one pass), the mask as uint8."""
    dt = _kernel_dtype(logp, old_logp, ref_logp)
    logp, old_logp, ref_logp = (None if x is None else _inner_contiguous(x.to(dt)) for x in (logp, old_logp, ref_logp))
    advantages = _inner_contiguous(advantages.to(torch.float32))
    if advantages.dim() == 1:
        advantages = advantages.contiguous()
    mask = mask.view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).view(torch.uint8)
    return logp, old_logp, advantages, _inner_contiguous(mask), ref_logp


def _row_args(logp, old_logp, advantages, mask, ref_logp):
    """(ref tensor or a stand-in, strides) shared by both kernels; per-row advantages get a zero T stride."""
    ref_arg = ref_logp if ref_logp is not None else logp
    adv_strides = (advantages.stride(0), 1) if advantages.dim() == 2 else (1, 0)
    return ref_arg, (logp.stride(0), old_logp.stride(0), *adv_strides, mask.stride(0), ref_arg.stride(0))


def _knob_args(t, eps_low, eps_high, dual_c, beta, kl_est, agg):
    return float(eps_low), float(eps_high), float(dual_c), float(beta), 1.0 / t, int(kl_est), int(agg)


def _constexprs(t, ref_logp, seq_level) -> dict:
    return {"SEQ_LEVEL": bool(seq_level), "HAS_REF": ref_logp is not None, "BLOCK": _block_for(t)}


#: The register budget ptxas gets for both kernels (Triton's `maxnreg`). Left to pick its own, ptxas
#: aims lower (for occupancy) and spilled 4 B in 46 (Triton 3.9) and 4 (Triton 3.6) of their 432
#: compiles (variant x specialisation x sm_80/90/100), some with only 32 registers in use; with it none
#: spills and no variant uses more than 84 (benchmarks/results/kernel_resources_triton*.md).
MAX_REGISTERS = 128


def _launch_config(constexprs: dict) -> tuple[int, dict]:
    """(num_warps, other options): 8 warps for the long tile (4 tokens per thread, not 8: fewer live
    registers per thread), 4 for the short one."""
    return (8 if constexprs["BLOCK"] >= 1024 else 4), {"maxnreg": MAX_REGISTERS}


def _fwd_launch(logp, old_logp, advantages, mask, ref_logp, eps_low, eps_high, dual_c, beta, kl_est, agg,
                seq_level) -> tuple[KernelLaunch, torch.Tensor]:
    n, t = logp.shape
    logp, old_logp, advantages, mask, ref_logp = _kernel_tensors(logp, old_logp, advantages, mask, ref_logp)
    ref_arg, strides = _row_args(logp, old_logp, advantages, mask, ref_logp)
    stats = torch.empty(_N_STATS, n, dtype=torch.float32, device=logp.device)
    constexprs = _constexprs(t, ref_logp, seq_level)
    launch = KernelLaunch.build(
        _policy_loss_fwd_kernel, (n,),
        (logp, old_logp, advantages, mask, ref_arg, stats, n, t, *strides,
         *_knob_args(t, eps_low, eps_high, dual_c, beta, kl_est, agg)),
        constexprs, *_launch_config(constexprs))
    return launch, stats


def _bwd_launch(grad_loss, den_total, logp, old_logp, advantages, mask, ref_logp, stats, eps_low, eps_high,
                dual_c, beta, kl_est, agg, seq_level) -> tuple[KernelLaunch, torch.Tensor]:
    n, t = logp.shape
    logp, old_logp, advantages, mask, ref_logp = _kernel_tensors(logp, old_logp, advantages, mask, ref_logp)
    ref_arg, strides = _row_args(logp, old_logp, advantages, mask, ref_logp)
    grad = torch.empty((n, t), dtype=logp.dtype, device=logp.device)
    constexprs = _constexprs(t, ref_logp, seq_level)
    launch = KernelLaunch.build(
        _policy_loss_bwd_kernel, (n,),
        (grad_loss.float().contiguous(), den_total, logp, old_logp, advantages, mask, ref_arg, stats, grad,
         n, t, *strides, grad.stride(0), *_knob_args(t, eps_low, eps_high, dual_c, beta, kl_est, agg)),
        constexprs, *_launch_config(constexprs))
    return launch, grad


def _launch_fwd(*args) -> torch.Tensor:
    launch, stats = _fwd_launch(*args)
    launch()
    return stats


def _launch_bwd(grad_loss, den_total, logp, *args) -> torch.Tensor:
    launch, grad = _bwd_launch(grad_loss, den_total, logp, *args)
    launch()
    return grad.to(logp.dtype)


def kernel_variants() -> list[KernelLaunch]:
    """Every distinct forward / backward launch the launchers can make: each accepted dtype of the
    log-probs, the advantages and the mask, with and without a reference policy, token and sequence
    level, advantages per row and per token, and a T for every block size (built on meta tensors)."""
    launches = []
    knobs = (0.2, 0.2, 3.0, 0.1, 2, 0)
    for lp_dt, other_dt, mask_dt in itertools.product(FLOAT_DTYPES, FLOAT_DTYPES, (torch.bool, torch.int64,
                                                                                 torch.float32)):
        for t, has_ref, seq_level, per_token in itertools.product(BLOCK_SIZES, (False, True), (False, True),
                                                                 (False, True)):
            n = 2
            meta = dict(device="meta")
            logp = torch.empty(n, t, dtype=lp_dt, **meta)
            old = torch.empty(n, t, dtype=other_dt, **meta)
            adv = torch.empty((n, t) if per_token else (n,), dtype=other_dt, **meta)
            mask = torch.empty(n, t, dtype=mask_dt, **meta)
            ref_lp = torch.empty(n, t, dtype=other_dt, **meta) if has_ref else None
            fwd, stats = _fwd_launch(logp, old, adv, mask, ref_lp, *knobs, seq_level)
            one = torch.empty(1, dtype=torch.float32, **meta)
            bwd, _ = _bwd_launch(one, one, logp, old, adv, mask, ref_lp, stats, *knobs, seq_level)
            launches += [fwd, bwd]
    return unique(launches)


def _combine(stats: torch.Tensor):
    """[7, N] per-row partials -> (loss, clip_fraction, kl, ratio_mean, den_total[1])."""
    totals = stats[:_RATIO + 1].sum(dim=1)
    den_total = totals[_DEN].clamp(min=1.0)
    tokens = totals[_COUNT].clamp(min=1.0)
    loss = totals[_NUM] / den_total
    return loss, totals[_CLIP] / tokens, totals[_KL] / tokens, totals[_RATIO] / tokens, den_total.reshape(1)


# ----------------------------------------------------------------------------- torch.library ops
@torch.library.custom_op("pairuni::clipped_policy_loss_fwd", mutates_args=())
def clipped_policy_loss_fwd(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    ref_logp: torch.Tensor | None, epsilon_low: float, epsilon_high: float, dual_clip_c: float, beta: float,
    kl_estimator: int, loss_agg_mode: int, sequence_level: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, clip_fraction, kl, ratio_mean, stats[7, N], den_total[1]); dual_clip_c <= 1 disables it."""
    stats = _launch_fwd(logp, old_logp, advantages, mask, ref_logp, epsilon_low, epsilon_high, dual_clip_c, beta,
                        kl_estimator, loss_agg_mode, sequence_level)
    loss, clip_fraction, kl, ratio_mean, den_total = _combine(stats)
    return loss, clip_fraction, kl, ratio_mean, stats, den_total


@clipped_policy_loss_fwd.register_fake
def _(logp, old_logp, advantages, mask, ref_logp, epsilon_low, epsilon_high, dual_clip_c, beta, kl_estimator,
      loss_agg_mode, sequence_level):
    torch._check(logp.dim() == 2, lambda: "logp must be [N, T]")
    scalar = logp.new_empty((), dtype=torch.float32)
    return (scalar, scalar.clone(), scalar.clone(), scalar.clone(),
            logp.new_empty((_N_STATS, logp.shape[0]), dtype=torch.float32), logp.new_empty((1,), dtype=torch.float32))


@torch.library.custom_op("pairuni::clipped_policy_loss_bwd", mutates_args=())
def clipped_policy_loss_bwd(
    grad_loss: torch.Tensor, den_total: torch.Tensor, logp: torch.Tensor, old_logp: torch.Tensor,
    advantages: torch.Tensor, mask: torch.Tensor, ref_logp: torch.Tensor | None, stats: torch.Tensor,
    epsilon_low: float, epsilon_high: float, dual_clip_c: float, beta: float, kl_estimator: int,
    loss_agg_mode: int, sequence_level: bool,
) -> torch.Tensor:
    """d(loss)/d(logp), [N, T] in logp's dtype, from the forward's per-row statistics."""
    return _launch_bwd(grad_loss, den_total, logp, old_logp, advantages, mask, ref_logp, stats, epsilon_low,
                       epsilon_high, dual_clip_c, beta, kl_estimator, loss_agg_mode, sequence_level)


@clipped_policy_loss_bwd.register_fake
def _(grad_loss, den_total, logp, *args):
    return torch.empty_like(logp)


def _setup_context(ctx, inputs, output):
    logp, old_logp, advantages, mask, ref_logp, *knobs = inputs
    ctx.save_for_backward(logp, old_logp, advantages, mask, ref_logp, output[4], output[5])
    ctx.knobs = knobs
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_loss, *unused):
    logp, old_logp, advantages, mask, ref_logp, stats, den_total = ctx.saved_tensors
    grad = torch.ops.pairuni.clipped_policy_loss_bwd(
        grad_loss, den_total, logp, old_logp, advantages, mask, ref_logp, stats, *ctx.knobs)
    return grad, None, None, None, None, None, None, None, None, None, None, None


clipped_policy_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- front
def loss_denominator(mask: torch.Tensor, loss_agg_mode: str) -> torch.Tensor:
    """The denominator `clipped_policy_loss` divides by for this mask, as a 0-d float32 tensor.

    Needed to split one logical batch into micro-batches or data-parallel ranks exactly:
    `loss_part * max(den_part, 1) / max(den_total, 1)` summed over the parts equals the
    loss of the whole batch, where `den_total` is the sum of the parts' denominators
    (all-reduced across ranks). "seq-mean-token-sum-norm" divides by T, not by a count,
    so its denominator is 1 for every part and the parts' losses simply add up.

    Args:
        mask: [N, T] bool/int/float, nonzero = counted token.
        loss_agg_mode: one of `reference.LOSS_AGG_MODES`.
    """
    if loss_agg_mode not in ref.LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode: expected one of {ref.LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    counts = (mask != 0).sum(-1)
    if loss_agg_mode == "token-mean":
        den = counts.sum()
    elif loss_agg_mode == "seq-mean-token-mean":
        den = (counts > 0).sum()
    elif loss_agg_mode == "seq-mean-token-sum":
        den = torch.tensor(mask.shape[0], device=mask.device)
    else:
        den = torch.tensor(1, device=mask.device)
    return den.to(torch.float32)


def loss_share(part_mask: torch.Tensor, loss_agg_mode: str, den_total: torch.Tensor) -> torch.Tensor:
    """``max(den_part, 1) / max(den_total, 1)``: the factor that turns the aggregated loss of a part of a
    batch (micro-batch, rank's share, chunk) into its share of the batch's loss, where `den_part` is
    `loss_denominator(part_mask, loss_agg_mode)` and `den_total` the batch's. A 0-d tensor in den_total's
    dtype, no host sync. Exact for parts made of whole rows; a part that holds only some tokens of a row
    is exact too except in "seq-mean-token-mean", which divides each row by its own token count (see
    `fused_linear_policy_loss`)."""
    return loss_denominator(part_mask, loss_agg_mode).to(den_total.dtype).clamp(min=1) / den_total.clamp(min=1)


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        *, ref_logp: torch.Tensor | None = None, epsilon_low: float = 0.2,
                        epsilon_high: float = 0.2, dual_clip_c: float | None = None, beta: float = 0.0,
                        kl_estimator: str = "k3", loss_agg_mode: str = "token-mean",
                        importance_sampling_level: str = "token") -> PolicyLossOutput:
    """PPO/GRPO clipped surrogate over [N, T] token log-probs; differentiable in `logp`.

    `log_ratio = clamp(logp - old_logp, -20, 20)` (the row's masked mean at sequence level),
    `pg = max(-A r, -A clip(r, 1 - epsilon_low, 1 + epsilon_high))`, for A < 0 with dual clip
    `pg = min(pg, -A c)`; per-token loss `pg + beta * kl`, aggregated by `loss_agg_mode`.

    Args:
        logp:       [N, T] float32/bf16/fp16, log pi_theta of the sampled tokens.
        old_logp:   [N, T] float, log-probs recorded at rollout.
        advantages: [N] or [N, T] float (e.g. from `group_advantages`).
        mask:       [N, T] bool/int/float, nonzero = counted token. Masked entries of all inputs are ignored.
        ref_logp:   [N, T] float or None; needed when beta > 0.
        epsilon_low, epsilon_high: clip range of the ratio (asymmetric "clip-higher" allowed).
        dual_clip_c: None or c > 1 (dual-clip PPO for negative advantages).
        beta:       KL coefficient (0 by default, as in PairUni).
        kl_estimator: "k1" | "k2" | "k3".
        loss_agg_mode: "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum" | "seq-mean-token-sum-norm".
        importance_sampling_level: "token" | "sequence".
    Returns:
        PolicyLossOutput(loss, clip_fraction, kl, ratio_mean): 0-d float32 tensors; only `loss` has a gradient.

    Example:
        >>> out = clipped_policy_loss(logp, old_logp, adv, mask, loss_agg_mode="seq-mean-token-mean")
        >>> out.loss.backward()
    """
    if not use_triton(logp):
        return ref.clipped_policy_loss(
            logp, old_logp, advantages, mask, ref_logp=ref_logp, epsilon_low=epsilon_low,
            epsilon_high=epsilon_high, dual_clip_c=dual_clip_c, beta=beta, kl_estimator=kl_estimator,
            loss_agg_mode=loss_agg_mode, importance_sampling_level=importance_sampling_level)
    ref.validate_policy_loss_inputs(
        logp, old_logp, advantages, mask, ref_logp=ref_logp, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
        dual_clip_c=dual_clip_c, beta=beta, kl_estimator=kl_estimator, loss_agg_mode=loss_agg_mode,
        importance_sampling_level=importance_sampling_level)
    loss, clip_fraction, kl, ratio_mean, _, _ = torch.ops.pairuni.clipped_policy_loss_fwd(
        logp, old_logp, advantages, mask, ref_logp, *_op_knobs(
            epsilon_low, epsilon_high, dual_clip_c, beta, kl_estimator, loss_agg_mode, importance_sampling_level))
    return PolicyLossOutput(loss, clip_fraction, kl, ratio_mean)


def _op_knobs(epsilon_low, epsilon_high, dual_clip_c, beta, kl_estimator, loss_agg_mode, importance_sampling_level):
    """The loss knobs as the ops and launchers take them (dual_clip_c None -> 0: off; codes for the names)."""
    return (float(epsilon_low), float(epsilon_high), float(dual_clip_c) if dual_clip_c is not None else 0.0,
            float(beta), _KL_CODE[kl_estimator], _AGG_CODE[loss_agg_mode], importance_sampling_level == "sequence")


# the dispatch keys a torch.library op's implementation runs without (torch._C._AutoDispatchBelowAutograd)
_AUTOGRAD_KEYS = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                  torch._C.DispatchKey.AutogradNestedTensor)


@contextlib.contextmanager
def _autograd_on():
    """Autograd records again inside a torch.library op's implementation: grad mode on and the autograd
    dispatch keys no longer excluded. (torch.func.vjp is no way out: a compiled graph runs ops with
    functorch disabled.) Restores both on exit."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def clipped_policy_loss_and_grad(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                                 mask: torch.Tensor, *, grad_scale: torch.Tensor | None,
                                 ref_logp: torch.Tensor | None = None,
                                 epsilon_low: float = 0.2, epsilon_high: float = 0.2, dual_clip_c: float | None = None,
                                 beta: float = 0.0, kl_estimator: str = "k3", loss_agg_mode: str = "token-mean",
                                 importance_sampling_level: str = "token") -> tuple[PolicyLossOutput, torch.Tensor | None]:
    """`clipped_policy_loss` and ``grad_scale * d loss / d logp`` ([N, T], logp's dtype) in one call: for
    callers inside a torch.library op (the fused linear loss), where autograd does not record by itself.
    Inputs are not validated again (the caller's front did).

    Dispatch as `clipped_policy_loss`: the Triton forward and backward kernels (the op's own launchers)
    where `use_triton`, else `reference.clipped_policy_loss` differentiated by autograd (`_autograd_on`).
    grad_scale: 0-d float tensor on logp's device, or None: no gradient (None returned; no autograd, so
    inference-mode tensors are fine).
    """
    knobs = _op_knobs(epsilon_low, epsilon_high, dual_clip_c, beta, kl_estimator, loss_agg_mode,
                      importance_sampling_level)
    if use_triton(logp):
        stats = _launch_fwd(logp, old_logp, advantages, mask, ref_logp, *knobs)
        loss, clip_fraction, kl, ratio_mean, den_total = _combine(stats)
        grad = None if grad_scale is None else _launch_bwd(grad_scale, den_total, logp, old_logp, advantages, mask,
                                                           ref_logp, stats, *knobs)
        return PolicyLossOutput(loss, clip_fraction, kl, ratio_mean), grad

    def reference_loss(lp):
        return ref.clipped_policy_loss(
            lp, old_logp, advantages, mask, ref_logp=ref_logp, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
            dual_clip_c=dual_clip_c, beta=beta, kl_estimator=kl_estimator, loss_agg_mode=loss_agg_mode,
            importance_sampling_level=importance_sampling_level)

    if grad_scale is None:
        with torch.no_grad():
            return reference_loss(logp), None
    with _autograd_on():
        lp = logp.detach().requires_grad_(True)
        out = reference_loss(lp)
        (grad,) = torch.autograd.grad(out.loss, lp, grad_outputs=grad_scale.to(out.loss.dtype))
    return PolicyLossOutput(out.loss.detach(), *out[1:]), grad
