"""GRPO-family policy losses (PPO / GRPO / PairGRPO and every `reference.LOSS_TYPES`): Triton kernels,
torch.library ops, front.

Four layers, as in Liger-Kernel:
  kernels      `_policy_loss_fwd_kernel`, `_policy_loss_bwd_kernel` (one program per row,
               looping over T in BLOCK chunks; int64 offsets). The per-token maths of every loss type is
               `loss_terms._token_terms`, picked by a runtime code (one binary for all types); the
               importance-sampling level is a constexpr (token / sequence / sequence_token). A row pass comes
               first at the sequence levels and for the row-coupled types (vespo's log weight, geo_mean's
               row ratio); `selected` (clip_cov / kl_cov) and the entropy bonus are runtime-flagged inputs.
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
so the only work outside the kernels is summing [N]-sized partials (deterministic, no atomics). The
entropy bonus has its own num / den by `entropy_agg_mode` over mask & entropy_mask:
    loss = sum(num) / max(sum(den), 1) - entropy_coef * sum(ent_num) / max(sum(ent_den), 1)
and the backward op returns d loss / d entropy as its second output.

Bytes moved at N*T tokens (fp32 logp/old, bool mask, advantages per row):
  forward  4 + 4 + 1 = 9 B/token read (+4 with ref_logp, +4 with per-token advantages)
  backward the same 9 B/token read + 4 B/token written (grad in logp's dtype)
Sequence-level ratios and row-coupled types re-read the row once more in each direction (row reduction
first); `selected` adds 1 B/token, the entropy 4 + 1 B/token read (+4 written in backward).
"""

from __future__ import annotations

import contextlib
import itertools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import reference as ref
from ._backend import use_triton
from ._checks import FLOAT_DTYPES
from ._launch import KERNEL_FLOAT_DTYPES, KernelLaunch, unique
from .loss_terms import GEO_MEAN, LOG_RATIO_CLAMP, LOSS_TYPE_CODE, VESPO, _row_pass, _row_scalars, _token_terms
from .reference import PolicyLossOutput

_KL_CODE = {name: i for i, name in enumerate(ref.KL_ESTIMATORS)}
_AGG_CODE = {name: i for i, name in enumerate(ref.LOSS_AGG_MODES)}
_LEVEL_CODE = {name: i for i, name in enumerate(ref.IMPORTANCE_SAMPLING_LEVELS)}
# rows of the per-row statistics tensor written by the forward kernel
(_NUM, _DEN, _COUNT, _CLIP, _KL, _RATIO, _ROW_A, _ROW_B, _ENT_NUM, _ENT_DEN, _ENT_COUNT, _ENT_SUM) = range(12)
_N_STATS = 12


@triton.jit
def _load_row_chunk(logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, sel_ptr, row, cols, T,
                    s_lp, s_old, s_ref, s_adv, s_adv_t, s_mask, s_sel, has_sel, HAS_REF: tl.constexpr):
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
    sel_on = m & ((cols * 0 + has_sel) != 0)  # a block of flags: a runtime scalar in a mask is not portable
    sel = tl.load(sel_ptr + row * s_sel + cols, mask=sel_on, other=0) != 0
    return m, lp, old, ref_lp, a, sel


@triton.jit
def _load_entropy(ent_ptr, emask_ptr, row, cols, m, s_ent, s_emask, has_ent):
    """(entropy, in the bonus) of a chunk: 0 / False everywhere when has_ent is 0 (nothing is read)."""
    on = m & ((cols * 0 + has_ent) != 0)
    em = (tl.load(emask_ptr + row * s_emask + cols, mask=on, other=0) != 0) & on
    h = tl.load(ent_ptr + row * s_ent + cols, mask=on, other=0.0).to(tl.float32)
    return h, em


@triton.jit
def _agg_num_den(row_sum, count, agg, inv_T):
    """Per-row (num, den) of aggregation mode `agg` (0..3 = token-mean, seq-mean-token-mean, seq-mean-token-sum,
    seq-mean-token-sum-norm): loss = sum(num) / max(sum(den), 1)."""
    num = tl.where(agg == 1, row_sum / tl.maximum(count, 1.0), tl.where(agg == 3, row_sum * inv_T, row_sum))
    den = tl.where(agg == 0, count, tl.where(agg == 1, tl.where(count > 0, 1.0, 0.0), tl.where(agg == 2, 1.0, 0.0)))
    return num, den


@triton.jit
def _agg_scale(g, count, agg, inv_T):
    """d num / d row_sum times g (the `_agg_num_den` row factor)."""
    return tl.where(agg == 1, g / tl.maximum(count, 1.0), tl.where(agg == 3, g * inv_T, g))


# the mode codes are runtime values: the JIT would otherwise specialise a value of 1 into a constant (and
# 0 into a multiple of 16), one compiled binary per mode, which their runtime selects / branches avoid
_CODES = ["kl_est", "agg", "ltype", "corr", "has_sel", "has_ent", "ent_agg"]


@triton.jit(do_not_specialize=_CODES)
def _policy_loss_fwd_kernel(
    logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, sel_ptr, ent_ptr, emask_ptr, stats_ptr,
    N, T, s_lp, s_old, s_adv, s_adv_t, s_mask, s_ref, s_sel, s_ent, s_emask,
    eps_low, eps_high, dual_c, beta, inv_T, kl_est, agg, ltype, corr, tau_pos, tau_neg, k_pos, lam_pos, k_neg,
    lam_neg, c_tis, div_low, div_high, dro_beta, kl_cov_coef, has_sel, has_ent, ent_agg,
    LEVEL: tl.constexpr, HAS_REF: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_a = eps_low * 0.0  # fp32 scalars (the runtime branch below must yield the same type)
    row_b = eps_low * 0.0
    if LEVEL != 0:
        s_lr, s_min, s_a, cnt0 = _row_pass(logp_ptr, old_ptr, adv_ptr, mask_ptr, row, T, s_lp, s_old, s_adv,
                                           s_adv_t, s_mask, eps_low, eps_high, BLOCK)
        row_a, row_b = _row_scalars(s_lr, s_min, s_a, cnt0, ltype, LEVEL)
    elif (ltype == VESPO) | (ltype == GEO_MEAN):
        s_lr, s_min, s_a, cnt0 = _row_pass(logp_ptr, old_ptr, adv_ptr, mask_ptr, row, T, s_lp, s_old, s_adv,
                                           s_adv_t, s_mask, eps_low, eps_high, BLOCK)
        row_a, row_b = _row_scalars(s_lr, s_min, s_a, cnt0, ltype, LEVEL)
    # stored before the token loop, not after it: a scalar kept live across the loop only to be stored
    # at the end is what ptxas spilled first (4-8 B with Triton 3.6 before MAX_REGISTERS)
    tl.store(stats_ptr + 6 * N + row, row_a)
    tl.store(stats_ptr + 7 * N + row, row_b)

    loss_acc = tl.zeros([BLOCK], dtype=tl.float32)
    cnt_acc = tl.zeros([BLOCK], dtype=tl.float32)
    clip_acc = tl.zeros([BLOCK], dtype=tl.float32)
    kl_acc = tl.zeros([BLOCK], dtype=tl.float32)
    ratio_acc = tl.zeros([BLOCK], dtype=tl.float32)
    # the entropy sums are scalars reduced per chunk, and only with an entropy: three more [BLOCK] accumulators
    # took Triton 3.6 to 124 of the 128 registers
    ent_sum = eps_low * 0.0
    ent_in = eps_low * 0.0
    ent_count = eps_low * 0.0
    for start in range(0, T, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        m, lp, old, ref_lp, a, sel = _load_row_chunk(
            logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, sel_ptr, row, cols, T,
            s_lp, s_old, s_ref, s_adv, s_adv_t, s_mask, s_sel, has_sel, HAS_REF)
        tok, clipped, kl, ratio, _dlr, _dlp = _token_terms(
            lp, old, ref_lp, a, sel, row_a, row_b, eps_low, eps_high, dual_c, beta, kl_est, ltype, corr,
            tau_pos, tau_neg, k_pos, lam_pos, k_neg, lam_neg, c_tis, div_low, div_high, dro_beta, kl_cov_coef,
            LEVEL, HAS_REF)
        loss_acc += tl.where(m, tok, 0.0)
        cnt_acc += m.to(tl.float32)
        clip_acc += (m & clipped).to(tl.float32)
        kl_acc += tl.where(m, kl, 0.0)
        ratio_acc += tl.where(m, ratio, 0.0)
        if has_ent != 0:
            h, em = _load_entropy(ent_ptr, emask_ptr, row, cols, m, s_ent, s_emask, has_ent)
            ent_sum += tl.sum(h, axis=0)  # h is 0 outside the mask
            ent_in += tl.sum(tl.where(em, h, 0.0), axis=0)
            ent_count += tl.sum(em.to(tl.float32), axis=0)

    count = tl.sum(cnt_acc, axis=0)
    num, den = _agg_num_den(tl.sum(loss_acc, axis=0), count, agg, inv_T)
    tl.store(stats_ptr + 0 * N + row, num)
    tl.store(stats_ptr + 1 * N + row, den)
    tl.store(stats_ptr + 2 * N + row, count)
    tl.store(stats_ptr + 3 * N + row, tl.sum(clip_acc, axis=0))
    tl.store(stats_ptr + 4 * N + row, tl.sum(kl_acc, axis=0))
    tl.store(stats_ptr + 5 * N + row, tl.sum(ratio_acc, axis=0))
    ent_num, ent_den = _agg_num_den(ent_in, ent_count, ent_agg, inv_T)
    tl.store(stats_ptr + 8 * N + row, ent_num)
    tl.store(stats_ptr + 9 * N + row, ent_den)
    tl.store(stats_ptr + 10 * N + row, ent_count)
    tl.store(stats_ptr + 11 * N + row, ent_sum)


@triton.jit(do_not_specialize=_CODES)
def _policy_loss_bwd_kernel(
    grad_loss_ptr, den_total_ptr, logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, sel_ptr, ent_ptr, emask_ptr,
    stats_ptr, grad_ptr, grad_ent_ptr,
    N, T, s_lp, s_old, s_adv, s_adv_t, s_mask, s_ref, s_sel, s_ent, s_emask, s_grad, s_gent,
    eps_low, eps_high, dual_c, beta, inv_T, kl_est, agg, ltype, corr, tau_pos, tau_neg, k_pos, lam_pos, k_neg,
    lam_neg, c_tis, div_low, div_high, dro_beta, kl_cov_coef, ent_coef, has_sel, has_ent, ent_agg,
    LEVEL: tl.constexpr, HAS_REF: tl.constexpr, BLOCK: tl.constexpr,
):
    # dL/dlogp_t = g / den_total * c_row * m_t * (dlr_t * d log_ratio_t/d logp_t + dlp_t)
    #   c_row = 1, 1/count, 1, 1/T for the four aggregation modes; dlr, dlp from `_token_terms`;
    #   token level: d log_ratio_t/d logp_t = [|logp_t - old_t| <= 20]; sequence_token: 1;
    #   sequence level: log_ratio_u = mean_v(clamped lr_v) for all u, so the lr part of the gradient is
    #   [inside_t] / count * sum_u m_u dlr_u
    # dL/dentropy_t = -ent_coef * g / ent_den_total * c_row(entropy) * em_t
    row = tl.program_id(0).to(tl.int64)
    row_a = tl.load(stats_ptr + 6 * N + row)
    row_b = tl.load(stats_ptr + 7 * N + row)
    # the row's count and the scale are read after the sequence-level pass: a scalar kept live across
    # that loop is what ptxas spilled first (4 B with registers to spare, Triton 3.9, before MAX_REGISTERS)
    dlr_sum = 0.0
    if LEVEL == 1:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, T, BLOCK):
            cols = start + tl.arange(0, BLOCK).to(tl.int64)
            m, lp, old, ref_lp, a, sel = _load_row_chunk(
                logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, sel_ptr, row, cols, T,
                s_lp, s_old, s_ref, s_adv, s_adv_t, s_mask, s_sel, has_sel, HAS_REF)
            _tok, _clipped, _kl, _ratio, dlr, _dlp = _token_terms(
                lp, old, ref_lp, a, sel, row_a, row_b, eps_low, eps_high, dual_c, beta, kl_est, ltype, corr,
                tau_pos, tau_neg, k_pos, lam_pos, k_neg, lam_neg, c_tis, div_low, div_high, dro_beta, kl_cov_coef,
                LEVEL, HAS_REF)
            acc += tl.where(m, dlr, 0.0)
        dlr_sum = tl.sum(acc, axis=0)
    count = tl.load(stats_ptr + 2 * N + row)
    seq_grad = dlr_sum / tl.maximum(count, 1.0)
    g_out = tl.load(grad_loss_ptr).to(tl.float32)
    scale = _agg_scale(g_out / tl.load(den_total_ptr), count, agg, inv_T)

    for start in range(0, T, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        m, lp, old, ref_lp, a, sel = _load_row_chunk(
            logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, sel_ptr, row, cols, T,
            s_lp, s_old, s_ref, s_adv, s_adv_t, s_mask, s_sel, has_sel, HAS_REF)
        _tok, _clipped, _kl, _ratio, dlr, dlp = _token_terms(
            lp, old, ref_lp, a, sel, row_a, row_b, eps_low, eps_high, dual_c, beta, kl_est, ltype, corr,
            tau_pos, tau_neg, k_pos, lam_pos, k_neg, lam_neg, c_tis, div_low, div_high, dro_beta, kl_cov_coef,
            LEVEL, HAS_REF)
        d_raw = lp - old
        inside = (d_raw >= -LOG_RATIO_CLAMP) & (d_raw <= LOG_RATIO_CLAMP)
        if LEVEL == 0:
            g = tl.where(inside, dlr, 0.0) + dlp
        elif LEVEL == 1:
            g = tl.where(inside, seq_grad, 0.0) + dlp
        else:
            g = dlr + dlp
        g = tl.where(m, g * scale, 0.0)
        tl.store(grad_ptr + row * s_grad + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < T)
    if has_ent != 0:
        ent_count = tl.load(stats_ptr + 10 * N + row)
        ent_scale = _agg_scale(-ent_coef * g_out / tl.load(den_total_ptr + 1), ent_count, ent_agg, inv_T)
        for start in range(0, T, BLOCK):
            cols = start + tl.arange(0, BLOCK).to(tl.int64)
            inb = cols < T
            m = (tl.load(mask_ptr + row * s_mask + cols, mask=inb, other=0) != 0) & inb
            _h, em = _load_entropy(ent_ptr, emask_ptr, row, cols, m, s_ent, s_emask, has_ent)
            gh = tl.where(em, ent_scale, 0.0)
            tl.store(grad_ent_ptr + row * s_gent + cols, gh.to(grad_ent_ptr.dtype.element_ty), mask=inb)


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


def _as_u8(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None:
        return None
    return _inner_contiguous(mask.view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).view(torch.uint8))


def _kernel_tensors(logp, old_logp, advantages, mask, ref_logp, selected=None, entropy=None, entropy_mask=None):
    """Inputs as the kernels read them: log-probs (and the entropy) in one dtype, advantages in fp32 (per
    row they are [N]-sized; per token a cast is one pass), the masks and `selected` as uint8."""
    dt = _kernel_dtype(logp, old_logp, ref_logp)
    logp, old_logp, ref_logp, entropy = (None if x is None else _inner_contiguous(x.to(dt))
                                         for x in (logp, old_logp, ref_logp, entropy))
    advantages = _inner_contiguous(advantages.to(torch.float32))
    if advantages.dim() == 1:
        advantages = advantages.contiguous()
    return logp, old_logp, advantages, _as_u8(mask), ref_logp, _as_u8(selected), entropy, _as_u8(entropy_mask)


def _row_args(logp, old_logp, advantages, mask, ref_logp, selected, entropy, entropy_mask):
    """(the optional tensors or stand-ins, strides) shared by both kernels; per-row advantages get a zero T
    stride. A stand-in is never read (its flag is off)."""
    ref_arg = ref_logp if ref_logp is not None else logp
    sel_arg = selected if selected is not None else mask
    ent_arg = entropy if entropy is not None else logp
    emask_arg = entropy_mask if entropy_mask is not None else mask
    adv_strides = (advantages.stride(0), 1) if advantages.dim() == 2 else (1, 0)
    strides = (logp.stride(0), old_logp.stride(0), *adv_strides, mask.stride(0), ref_arg.stride(0),
               sel_arg.stride(0), ent_arg.stride(0), emask_arg.stride(0))
    return (ref_arg, sel_arg, ent_arg, emask_arg), strides


def _knob_args(t, knobs: PolicyLossKnobs, has_sel: bool, has_ent: bool, backward: bool = False) -> tuple:
    """The kernels' scalar arguments after the strides (the backward kernel also takes ent_coef)."""
    k = knobs
    out = (float(k.epsilon_low), float(k.epsilon_high), float(k.dual_clip_c), float(k.beta), 1.0 / t,
           int(k.kl_estimator), int(k.loss_agg_mode), int(k.loss_type), int(k.kl_ratio_correction),
           *(float(x) for x in k.type_knobs))
    return out + ((float(k.entropy_coef),) if backward else ()) + (int(has_sel), int(has_ent),
                                                                   int(k.entropy_agg_mode))


def _constexprs(t, ref_logp, level: int) -> dict:
    return {"LEVEL": int(level), "HAS_REF": ref_logp is not None, "BLOCK": _block_for(t)}


#: The register budget ptxas gets for both kernels (Triton's `maxnreg`). Left to pick its own, ptxas
#: aims lower (for occupancy) and spilled 4 B in 46 (Triton 3.9) and 4 (Triton 3.6) of their 432
#: compiles (variant x specialisation x sm_80/90/100), some with only 32 registers in use; with it none
#: spills, the loss types' branches included: at most 108 (Triton 3.9) and 122 (3.6) registers in use
#: (benchmarks/results/kernel_resources_triton*.md).
MAX_REGISTERS = 128


def _launch_config(constexprs: dict) -> tuple[int, dict]:
    """(num_warps, other options): 8 warps for the long tile (4 tokens per thread, not 8: fewer live
    registers per thread), 4 for the short one."""
    return (8 if constexprs["BLOCK"] >= 1024 else 4), {"maxnreg": MAX_REGISTERS}


def _fwd_launch(logp, old_logp, advantages, mask, ref_logp, selected, entropy, entropy_mask,
                knobs: PolicyLossKnobs) -> tuple[KernelLaunch, torch.Tensor]:
    n, t = logp.shape
    tensors = _kernel_tensors(logp, old_logp, advantages, mask, ref_logp, selected, entropy, entropy_mask)
    logp, old_logp, advantages, mask, ref_logp = tensors[:5]
    stand_ins, strides = _row_args(*tensors)
    stats = torch.empty(_N_STATS, n, dtype=torch.float32, device=logp.device)
    constexprs = _constexprs(t, ref_logp, knobs.level)
    launch = KernelLaunch.build(
        _policy_loss_fwd_kernel, (n,),
        (logp, old_logp, advantages, mask, *stand_ins, stats, n, t, *strides,
         *_knob_args(t, knobs, selected is not None, entropy is not None)),
        constexprs, *_launch_config(constexprs))
    return launch, stats


def _bwd_launch(grad_loss, den_total, logp, old_logp, advantages, mask, ref_logp, selected, entropy, entropy_mask,
                stats, knobs: PolicyLossKnobs) -> tuple[KernelLaunch, torch.Tensor, torch.Tensor | None]:
    n, t = logp.shape
    tensors = _kernel_tensors(logp, old_logp, advantages, mask, ref_logp, selected, entropy, entropy_mask)
    logp, old_logp, advantages, mask, ref_logp = tensors[:5]
    stand_ins, strides = _row_args(*tensors)
    grad = torch.empty((n, t), dtype=logp.dtype, device=logp.device)
    grad_ent = torch.empty((n, t), dtype=tensors[6].dtype, device=logp.device) if entropy is not None else None
    gent_arg = grad_ent if grad_ent is not None else grad
    constexprs = _constexprs(t, ref_logp, knobs.level)
    launch = KernelLaunch.build(
        _policy_loss_bwd_kernel, (n,),
        (grad_loss.float().contiguous(), den_total, logp, old_logp, advantages, mask, *stand_ins, stats, grad,
         gent_arg, n, t, *strides, grad.stride(0), gent_arg.stride(0),
         *_knob_args(t, knobs, selected is not None, entropy is not None, backward=True)),
        constexprs, *_launch_config(constexprs))
    return launch, grad, grad_ent


def _launch_fwd(*args) -> torch.Tensor:
    launch, stats = _fwd_launch(*args)
    launch()
    return stats


def _launch_bwd(grad_loss, den_total, logp, old_logp, advantages, mask, ref_logp, selected, entropy, entropy_mask,
                stats, knobs) -> tuple[torch.Tensor, torch.Tensor | None]:
    launch, grad, grad_ent = _bwd_launch(grad_loss, den_total, logp, old_logp, advantages, mask, ref_logp, selected,
                                         entropy, entropy_mask, stats, knobs)
    launch()
    return grad.to(logp.dtype), None if grad_ent is None else grad_ent.to(entropy.dtype)


def kernel_variants() -> list[KernelLaunch]:
    """Every distinct forward / backward launch the launchers can make: each accepted dtype of the
    log-probs, the advantages and the mask, with and without a reference policy, each importance-sampling
    level, advantages per row and per token, and a T for every block size (built on meta tensors). The loss
    type, the `selected` tokens and the entropy bonus are runtime arguments of the same binaries (their
    tensors are uint8 / the log-probs' dtype, as their stand-ins), so one loss type with all of them on covers
    them."""
    launches = []
    for lp_dt, other_dt, mask_dt in itertools.product(FLOAT_DTYPES, FLOAT_DTYPES, (torch.bool, torch.int64,
                                                                                 torch.float32)):
        for t, has_ref, level, per_token in itertools.product(BLOCK_SIZES, (False, True),
                                                             ref.IMPORTANCE_SAMPLING_LEVELS, (False, True)):
            n = 2
            meta = dict(device="meta")
            logp = torch.empty(n, t, dtype=lp_dt, **meta)
            old = torch.empty(n, t, dtype=other_dt, **meta)
            adv = torch.empty((n, t) if per_token else (n,), dtype=other_dt, **meta)
            mask = torch.empty(n, t, dtype=mask_dt, **meta)
            ref_lp = torch.empty(n, t, dtype=other_dt, **meta) if has_ref else None
            sel = torch.empty(n, t, dtype=torch.bool, **meta)
            ent = torch.empty(n, t, dtype=other_dt, **meta)
            knobs = _op_knobs(0.2, 0.2, 3.0, 0.1, "k3", "token-mean", level, loss_type="clip_cov",
                              entropy_coef=0.01)
            fwd, stats = _fwd_launch(logp, old, adv, mask, ref_lp, sel, ent, mask, knobs)
            one = torch.empty(2, dtype=torch.float32, **meta)
            bwd, _, _ = _bwd_launch(one, one, logp, old, adv, mask, ref_lp, sel, ent, mask, stats, knobs)
            launches += [fwd, bwd]
    return unique(launches)


def _combine(stats: torch.Tensor, entropy_coef: float = 0.0):
    """[12, N] per-row partials -> (loss, clip_fraction, kl, ratio_mean, entropy, den_total[2]: the policy
    and the entropy-bonus denominators)."""
    totals = stats.sum(dim=1)
    den_total = totals[[_DEN, _ENT_DEN]].clamp(min=1.0)
    tokens = totals[_COUNT].clamp(min=1.0)
    loss = totals[_NUM] / den_total[0]
    if entropy_coef != 0:
        loss = loss - entropy_coef * (totals[_ENT_NUM] / den_total[1])
    return (loss, totals[_CLIP] / tokens, totals[_KL] / tokens, totals[_RATIO] / tokens, totals[_ENT_SUM] / tokens,
            den_total)


# ----------------------------------------------------------------------------- torch.library ops
class PolicyLossKnobs(NamedTuple):
    """The loss knobs as the ops and launchers take them: names as codes (`_op_knobs`), dual_clip_c 0 = off,
    type_knobs = (sapo_temperature_pos, _neg, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg,
    clip_ratio_c_tis, divergence_low, divergence_high, dro_beta, kl_cov_coef) with the divergences resolved."""

    epsilon_low: float
    epsilon_high: float
    dual_clip_c: float
    beta: float
    kl_estimator: int
    loss_agg_mode: int
    level: int
    loss_type: int
    kl_ratio_correction: bool
    type_knobs: tuple
    entropy_coef: float
    entropy_agg_mode: int


@torch.library.custom_op("pairuni::clipped_policy_loss_fwd", mutates_args=())
def clipped_policy_loss_fwd(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    ref_logp: torch.Tensor | None, selected: torch.Tensor | None, entropy: torch.Tensor | None,
    entropy_mask: torch.Tensor | None, epsilon_low: float, epsilon_high: float, dual_clip_c: float, beta: float,
    kl_estimator: int, loss_agg_mode: int, level: int, loss_type: int, kl_ratio_correction: bool,
    type_knobs: list[float], entropy_coef: float, entropy_agg_mode: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, clip_fraction, kl, ratio_mean, entropy, stats[12, N], den_total[2]); dual_clip_c <= 1
    disables it; the knobs as in `PolicyLossKnobs`."""
    knobs = PolicyLossKnobs(epsilon_low, epsilon_high, dual_clip_c, beta, kl_estimator, loss_agg_mode, level,
                            loss_type, kl_ratio_correction, tuple(type_knobs), entropy_coef, entropy_agg_mode)
    stats = _launch_fwd(logp, old_logp, advantages, mask, ref_logp, selected, entropy, entropy_mask, knobs)
    loss, clip_fraction, kl, ratio_mean, ent, den_total = _combine(stats, entropy_coef)
    return loss, clip_fraction, kl, ratio_mean, ent, stats, den_total


@clipped_policy_loss_fwd.register_fake
def _(logp, old_logp, advantages, mask, ref_logp, selected, entropy, entropy_mask, *knobs):
    torch._check(logp.dim() == 2, lambda: "logp must be [N, T]")
    scalar = logp.new_empty((), dtype=torch.float32)
    return (scalar, scalar.clone(), scalar.clone(), scalar.clone(), scalar.clone(),
            logp.new_empty((_N_STATS, logp.shape[0]), dtype=torch.float32), logp.new_empty((2,), dtype=torch.float32))


@torch.library.custom_op("pairuni::clipped_policy_loss_bwd", mutates_args=())
def clipped_policy_loss_bwd(
    grad_loss: torch.Tensor, den_total: torch.Tensor, logp: torch.Tensor, old_logp: torch.Tensor,
    advantages: torch.Tensor, mask: torch.Tensor, ref_logp: torch.Tensor | None, selected: torch.Tensor | None,
    entropy: torch.Tensor | None, entropy_mask: torch.Tensor | None, stats: torch.Tensor,
    epsilon_low: float, epsilon_high: float, dual_clip_c: float, beta: float, kl_estimator: int,
    loss_agg_mode: int, level: int, loss_type: int, kl_ratio_correction: bool, type_knobs: list[float],
    entropy_coef: float, entropy_agg_mode: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d loss / d logp [N, T] in logp's dtype, d loss / d entropy [N, T] in entropy's dtype, or [0] without
    entropy) from the forward's per-row statistics."""
    knobs = PolicyLossKnobs(epsilon_low, epsilon_high, dual_clip_c, beta, kl_estimator, loss_agg_mode, level,
                            loss_type, kl_ratio_correction, tuple(type_knobs), entropy_coef, entropy_agg_mode)
    grad, grad_ent = _launch_bwd(grad_loss, den_total, logp, old_logp, advantages, mask, ref_logp, selected, entropy,
                                 entropy_mask, stats, knobs)
    return grad, grad_ent if grad_ent is not None else logp.new_empty(0)


@clipped_policy_loss_bwd.register_fake
def _(grad_loss, den_total, logp, old_logp, advantages, mask, ref_logp, selected, entropy, *args):
    return torch.empty_like(logp), torch.empty_like(entropy) if entropy is not None else logp.new_empty(0)


def _setup_context(ctx, inputs, output):
    logp, old_logp, advantages, mask, ref_logp, selected, entropy, entropy_mask, *knobs = inputs
    ctx.save_for_backward(logp, old_logp, advantages, mask, ref_logp, selected, entropy, entropy_mask, output[5],
                          output[6])
    ctx.knobs = knobs
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_loss, *unused):
    logp, old_logp, advantages, mask, ref_logp, selected, entropy, entropy_mask, stats, den_total = ctx.saved_tensors
    grad, grad_ent = torch.ops.pairuni.clipped_policy_loss_bwd(
        grad_loss, den_total, logp, old_logp, advantages, mask, ref_logp, selected, entropy, entropy_mask, stats,
        *ctx.knobs)
    return (grad, None, None, None, None, None, grad_ent if entropy is not None else None) + (None,) * 13


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
                        importance_sampling_level: str = "token", **loss_type_knobs) -> PolicyLossOutput:
    """GRPO-family policy loss over [N, T] token log-probs; differentiable in `logp` (and `entropy`).

    PPO (the default): `log_ratio = clamp(logp - old_logp, -20, 20)` (the row's masked mean at sequence level),
    `pg = max(-A r, -A clip(r, 1 - epsilon_low, 1 + epsilon_high))`, for A < 0 with dual clip
    `pg = min(pg, -A c)`; per-token loss `pg + beta * kl`, aggregated by `loss_agg_mode`. Every other
    `loss_type`, the KL ratio correction and the entropy bonus: `reference.clipped_policy_loss`, whose
    keyword arguments (and defaults, `reference.LOSS_TYPE_DEFAULTS`) this takes.

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
        importance_sampling_level: "token" | "sequence" | "sequence_token".
        loss_type_knobs: loss_type, kl_ratio_correction, sapo_temperature_pos/_neg, vespo_k_pos/_lambda_pos/
                    _k_neg/_lambda_neg, clip_ratio_c_tis, divergence_low/_high, dro_beta, kl_cov_coef,
                    selected ([N, T] bool), entropy ([N, T] float), entropy_coef, entropy_mask ([N, T]),
                    entropy_agg_mode.
    Returns:
        PolicyLossOutput(loss, clip_fraction, kl, ratio_mean, entropy): 0-d float32 tensors; only `loss` has
        a gradient.

    Example:
        >>> out = clipped_policy_loss(logp, old_logp, adv, mask, loss_agg_mode="seq-mean-token-mean")
        >>> out.loss.backward()
    """
    unknown = set(loss_type_knobs) - set(ref.LOSS_TYPE_DEFAULTS)
    if unknown:
        raise TypeError(f"clipped_policy_loss() got unexpected keyword arguments {sorted(unknown)}")
    ppo = dict(ref_logp=ref_logp, epsilon_low=epsilon_low, epsilon_high=epsilon_high, dual_clip_c=dual_clip_c,
               beta=beta, kl_estimator=kl_estimator, loss_agg_mode=loss_agg_mode,
               importance_sampling_level=importance_sampling_level)
    if not use_triton(logp):
        return ref.clipped_policy_loss(logp, old_logp, advantages, mask, **ppo, **loss_type_knobs)
    ref.validate_policy_loss_inputs(logp, old_logp, advantages, mask, **ppo, **loss_type_knobs)
    kw = {**ref.LOSS_TYPE_DEFAULTS, **loss_type_knobs}
    entropy = kw["entropy"]
    out = torch.ops.pairuni.clipped_policy_loss_fwd(
        logp, old_logp, advantages, mask, ref_logp, kw["selected"], entropy,
        kw["entropy_mask"] if entropy is not None else None,
        *_op_knobs(epsilon_low, epsilon_high, dual_clip_c, beta, kl_estimator, loss_agg_mode,
                   importance_sampling_level, **loss_type_knobs))
    return PolicyLossOutput(*out[:5])


_TYPE_KNOB_NAMES = ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
                    "vespo_lambda_neg", "clip_ratio_c_tis", "divergence_low", "divergence_high", "dro_beta",
                    "kl_cov_coef")


def _op_knobs(epsilon_low, epsilon_high, dual_clip_c, beta, kl_estimator, loss_agg_mode, importance_sampling_level,
              **loss_type_knobs) -> PolicyLossKnobs:
    """The loss knobs as the ops and launchers take them (dual_clip_c None -> 0: off; codes for the names;
    divergence_low / _high None -> epsilon_low / _high; dro_beta None -> 0)."""
    kw = {**ref.LOSS_TYPE_DEFAULTS, **loss_type_knobs}
    kw["divergence_low"] = epsilon_low if kw["divergence_low"] is None else kw["divergence_low"]
    kw["divergence_high"] = epsilon_high if kw["divergence_high"] is None else kw["divergence_high"]
    kw["dro_beta"] = 0.0 if kw["dro_beta"] is None else kw["dro_beta"]
    return PolicyLossKnobs(
        float(epsilon_low), float(epsilon_high), float(dual_clip_c) if dual_clip_c is not None else 0.0,
        float(beta), _KL_CODE[kl_estimator], _AGG_CODE[loss_agg_mode], _LEVEL_CODE[importance_sampling_level],
        LOSS_TYPE_CODE[kw["loss_type"]], bool(kw["kl_ratio_correction"]),
        [float(kw[name]) for name in _TYPE_KNOB_NAMES], float(kw["entropy_coef"]), _AGG_CODE[kw["entropy_agg_mode"]])


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
                                 importance_sampling_level: str = "token",
                                 **loss_type_knobs) -> tuple[PolicyLossOutput, torch.Tensor | None]:
    """`clipped_policy_loss` and ``grad_scale * d loss / d logp`` ([N, T], logp's dtype) in one call: for
    callers inside a torch.library op (the fused linear loss), where autograd does not record by itself.
    Inputs are not validated again (the caller's front did). loss_type_knobs: those of `clipped_policy_loss`
    but the entropy ones (the fused head adds its entropy bonus itself).

    Dispatch as `clipped_policy_loss`: the Triton forward and backward kernels (the op's own launchers)
    where `use_triton`, else `reference.clipped_policy_loss` differentiated by autograd (`_autograd_on`).
    grad_scale: 0-d float tensor on logp's device, or None: no gradient (None returned; no autograd, so
    inference-mode tensors are fine).
    """
    ppo = dict(ref_logp=ref_logp, epsilon_low=epsilon_low, epsilon_high=epsilon_high, dual_clip_c=dual_clip_c,
               beta=beta, kl_estimator=kl_estimator, loss_agg_mode=loss_agg_mode,
               importance_sampling_level=importance_sampling_level)
    if use_triton(logp):
        knobs = _op_knobs(epsilon_low, epsilon_high, dual_clip_c, beta, kl_estimator, loss_agg_mode,
                          importance_sampling_level, **loss_type_knobs)
        selected = loss_type_knobs.get("selected")
        stats = _launch_fwd(logp, old_logp, advantages, mask, ref_logp, selected, None, None, knobs)
        *metrics, den_total = _combine(stats)
        grad = None if grad_scale is None else _launch_bwd(grad_scale, den_total, logp, old_logp, advantages, mask,
                                                           ref_logp, selected, None, None, stats, knobs)[0]
        return PolicyLossOutput(*metrics), grad

    def reference_loss(lp):
        return ref.clipped_policy_loss(lp, old_logp, advantages, mask, **ppo, **loss_type_knobs)

    if grad_scale is None:
        with torch.no_grad():
            return reference_loss(logp), None
    with _autograd_on():
        lp = logp.detach().requires_grad_(True)
        out = reference_loss(lp)
        (grad,) = torch.autograd.grad(out.loss, lp, grad_outputs=grad_scale.to(out.loss.dtype))
    return PolicyLossOutput(out.loss.detach(), *out[1:]), grad
