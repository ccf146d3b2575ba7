"""Per-token maths of every policy-loss type for the Triton kernels of `policy_loss.py`.

`_token_terms` returns, for one [BLOCK] chunk of a row, the token loss and its two derivatives the
backward kernel chains: `dlr` = d tok / d log_ratio (at the importance-sampling level; the kernel gates it
by the log-ratio clamp, or sums it over the row at sequence level) and `dlp` = the direct d tok / d logp
(terms linear in logp, the KL term). The loss type is a runtime code (`LOSS_TYPE_CODE`): a scalar branch per
chunk, one compiled binary for all types. Formulas and sources: `reference.clipped_policy_loss`.
Row-coupled quantities (the sequence log-ratio, vespo's log weight, geo_mean's row ratio and advantage) come
from `_row_pass` first, as two row scalars `row_a`, `row_b`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import reference as ref

LOSS_TYPE_CODE = {name: i for i, name in enumerate(ref.LOSS_TYPES)}
# the codes as compile-time constants of the kernels (a plain global is rejected by the compiler)
PPO: tl.constexpr = tl.constexpr(LOSS_TYPE_CODE["ppo"])
CISPO: tl.constexpr = tl.constexpr(LOSS_TYPE_CODE["cispo"])
CISPO_CLIP: tl.constexpr = tl.constexpr(LOSS_TYPE_CODE["cispo_clip"])
SAPO: tl.constexpr = tl.constexpr(LOSS_TYPE_CODE["sapo"])
VESPO: tl.constexpr = tl.constexpr(LOSS_TYPE_CODE["vespo"])
GPG: tl.constexpr = tl.constexpr(LOSS_TYPE_CODE["gpg"])
GEO_MEAN: tl.constexpr = tl.constexpr(LOSS_TYPE_CODE["geo_mean"])
CLIP_COV: tl.constexpr = tl.constexpr(LOSS_TYPE_CODE["clip_cov"])
KL_COV: tl.constexpr = tl.constexpr(LOSS_TYPE_CODE["kl_cov"])
DPPO_TV: tl.constexpr = tl.constexpr(LOSS_TYPE_CODE["dppo_tv"])
DPPO_KL: tl.constexpr = tl.constexpr(LOSS_TYPE_CODE["dppo_kl"])
DRO: tl.constexpr = tl.constexpr(LOSS_TYPE_CODE["dro"])
LOG_RATIO_CLAMP: tl.constexpr = tl.constexpr(ref.LOG_RATIO_CLAMP)
VESPO_LOG_W_MIN: tl.constexpr = tl.constexpr(ref.VESPO_LOG_W_MIN)


@triton.jit
def _clamp_lr(x):
    return tl.minimum(tl.maximum(x, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP)


@triton.jit
def _row_pass(logp_ptr, old_ptr, adv_ptr, mask_ptr, row, T, s_lp, s_old, s_adv, s_adv_t, s_mask, eps_low, eps_high,
              BLOCK: tl.constexpr):
    """Row sums of m * lr, m * lr* (geo_mean's sign-clipped lr), m * A, and the token count."""
    acc_lr = tl.zeros([BLOCK], dtype=tl.float32)
    acc_min = tl.zeros([BLOCK], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK], dtype=tl.float32)
    cnt = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, T, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        inb = cols < T
        m = (tl.load(mask_ptr + row * s_mask + cols, mask=inb, other=0) != 0) & inb
        lp = tl.load(logp_ptr + row * s_lp + cols, mask=m, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + row * s_old + cols, mask=m, other=0.0).to(tl.float32)
        a = tl.load(adv_ptr + row * s_adv + cols * s_adv_t, mask=m, other=0.0).to(tl.float32)
        lr = _clamp_lr(lp - old)
        lr_c = tl.minimum(tl.maximum(lr, -eps_low), eps_high)
        lr_min = tl.where(a > 0, tl.minimum(lr, lr_c), tl.where(a < 0, tl.maximum(lr, lr_c), 0.0))
        acc_lr += tl.where(m, lr, 0.0)
        acc_min += tl.where(m, lr_min, 0.0)
        acc_a += tl.where(m, a, 0.0)
        cnt += m.to(tl.float32)
    return tl.sum(acc_lr, axis=0), tl.sum(acc_min, axis=0), tl.sum(acc_a, axis=0), tl.sum(cnt, axis=0)


@triton.jit
def _row_scalars(s_lr, s_min, s_a, count, ltype, LEVEL: tl.constexpr):
    """(row_a, row_b): the sequence log-ratio (levels), vespo's clamped log weight, or geo_mean's row ratio and
    row advantage (verl divides by count + 1e-8)."""
    row_a = s_lr / tl.maximum(count, 1.0)
    row_b = s_a / (count + 1e-8)
    if LEVEL == 0:
        row_a = tl.where(ltype == VESPO, tl.minimum(tl.maximum(s_lr, VESPO_LOG_W_MIN), LOG_RATIO_CLAMP),
                         tl.exp(s_min / (count + 1e-8)))
    return row_a, row_b


@triton.jit
def _token_terms(lp, old, ref_lp, a, sel, row_a, row_b, eps_low, eps_high, dual_c, beta, kl_est, ltype, corr,
                 tau_pos, tau_neg, k_pos, lam_pos, k_neg, lam_neg, c_tis, div_low, div_high, dro_beta, kl_cov_coef,
                 LEVEL: tl.constexpr, HAS_REF: tl.constexpr):
    """Returns (token loss, clipped flag, kl, ratio for the metric, dlr, dlp); see the module docstring.
    sel: the chunk's `selected` flags (bool); row_a / row_b: `_row_scalars` (unused by token-local types)."""
    lr_tok = _clamp_lr(lp - old)
    if LEVEL == 0:
        log_ratio = lr_tok
    else:
        log_ratio = tl.zeros_like(lp) + row_a
    ratio = tl.exp(log_ratio)
    zero = tl.zeros_like(lp)
    pg = zero
    dlr = zero
    dlp = zero
    clipped = zero != zero
    ratio_m = ratio
    if (ltype == PPO) | (ltype == CLIP_COV):
        pg_unclipped = -a * ratio
        pg_clipped = -a * tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
        clipped = pg_clipped > pg_unclipped
        pg = tl.where(clipped, pg_clipped, pg_unclipped)
        # d pg / d log_ratio: -A * ratio on the unclipped branch, 0 where a clip bound is active
        dlr = tl.where(clipped, 0.0, -a * ratio)
        bound = -a * dual_c
        dual = (a < 0) & (pg > bound) & (dual_c > 1.0)
        pg = tl.where(dual, bound, pg)
        dlr = tl.where(dual, 0.0, dlr)
        clipped = clipped | dual
        if ltype == CLIP_COV:
            pg = tl.where(sel, 0.0, pg)
            dlr = tl.where(sel, 0.0, dlr)
            clipped = clipped | sel
    elif (ltype == CISPO) | (ltype == CISPO_CLIP):
        w = tl.minimum(ratio, eps_high)
        clipped = ratio > eps_high
        if ltype == CISPO_CLIP:
            w = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
            clipped = w != ratio
        pg = -w * a * lp
        dlp = -w * a
    elif ltype == SAPO:
        tau = tl.where(a > 0, tau_pos, tau_neg)
        s = tl.sigmoid(tau * (ratio - 1.0))
        pg = -s * (4.0 / tau) * a
        dlr = -4.0 * a * s * (1.0 - s) * ratio
    elif (ltype == VESPO) | (ltype == GPG):
        w = zero + 1.0
        if ltype == VESPO:
            nonneg = a >= 0
            k = tl.where(nonneg, k_pos, k_neg)
            lam = tl.maximum(tl.where(nonneg, lam_pos, lam_neg), 1e-4)
            w = tl.exp(lam + k * row_a - lam * tl.exp(row_a))
            w = tl.where(tl.abs(w) <= 3.4028234663852886e38, w, 0.0)  # TRL: nan / inf -> 0 (NaN compares false)
        pg = -w * a * lp
        dlp = -w * a
    elif ltype == GEO_MEAN:
        # every token carries the row's loss -A_row r_row; d/d lr_t = -A_row r_row [lr*_t follows lr_t] (the row's
        # 1 / (count + 1e-8) times the count of tokens carrying it is 1 in fp32)
        pg = zero - row_b * row_a
        follows = ((a > 0) & (lr_tok <= eps_high)) | ((a < 0) & (lr_tok >= -eps_low))
        dlr = tl.where(follows, -row_b * row_a, 0.0)
        clipped = ((a > 0) & (lr_tok > eps_high)) | ((a < 0) & (lr_tok < -eps_low))
        ratio_m = zero + row_a
    elif ltype == KL_COV:
        pg = -a * ratio + tl.where(sel, kl_cov_coef * tl.abs(log_ratio), 0.0)
        sign = tl.where(log_ratio > 0, 1.0, tl.where(log_ratio < 0, -1.0, 0.0))
        dlr = -a * ratio + tl.where(sel, kl_cov_coef * sign, 0.0)
        clipped = sel
    elif (ltype == DPPO_TV) | (ltype == DPPO_KL):
        p = tl.exp(lp)
        p_old = tl.exp(old)
        ok_pos = (p - p_old) <= div_high
        ok_neg = (p - p_old) >= -div_low
        if ltype == DPPO_KL:
            bkl = p_old * (old - lp) + (1.0 - p_old) * tl.log((1.0 - p_old + 1e-8) / (1.0 - p + 1e-8))
            ok_pos = (bkl <= div_high) | (p <= p_old)
            ok_neg = (bkl <= div_low) | (p >= p_old)
        ok = tl.where(a > 0, ok_pos, ok_neg)
        w = tl.where(ok, tl.minimum(ratio, c_tis), 0.0)
        pg = -a * w * lp
        dlp = -a * w
        clipped = (ok == 0) | (ratio > c_tis)
    else:  # DRO
        d = lp - old
        pg = -(lp * a - 0.5 * dro_beta * d * d)
        dlp = dro_beta * d - a
    if HAS_REF:
        diff = lp - ref_lp
        # k1 = logp - ref (d/dlogp = 1); k2 = (logp - ref)^2 / 2 (d/dlogp = logp - ref);
        # k3 = e^d - d - 1 with d = clamp(ref - logp) (d/dlogp = 1 - e^d inside the clamp, 0 outside)
        d = _clamp_lr(-diff)
        ed = tl.exp(d)
        inside = (-diff >= -LOG_RATIO_CLAMP) & (-diff <= LOG_RATIO_CLAMP)
        kl = tl.where(kl_est == 0, diff, tl.where(kl_est == 1, 0.5 * diff * diff, ed - d - 1.0))
        dkl = tl.where(kl_est == 0, 1.0, tl.where(kl_est == 1, diff, tl.where(inside, 1.0 - ed, 0.0)))
        # TRL use_bias_correction_kl: beta * kl * ratio, the ratio differentiable
        w_kl = tl.where(corr != 0, ratio, 1.0)
        tok = pg + beta * kl * w_kl
        dlp += beta * dkl * w_kl
        dlr += tl.where(corr != 0, beta * kl * ratio, 0.0)
    else:
        kl = zero
        tok = pg
    return tok, clipped, kl, ratio_m, dlr, dlp
