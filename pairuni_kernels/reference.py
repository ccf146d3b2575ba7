"""Pure-torch versions of every pairuni op: the executable spec and the CPU path.

Each function here defines the semantics its fast twin (Triton / C++ / CUDA) is tested
against. They compute in `promote_types(input dtype, float32)`: fp16/bf16/fp32 inputs
are computed in fp32 and float64 inputs in float64, so tests can get an fp64 ground
truth by passing fp64 tensors. Everything is vectorised (no Python loops over rows or
groups) so that this is also a reasonable CPU path.

The formulas are those of `docs/ARCHITECTURE.md` ("pairuni_kernels: the contract").
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._checks import FLOAT_DTYPES, INT_DTYPES, check_mask, check_shape, check_tensor

# ----------------------------------------------------------------------------- constants
#: `log(pi/pi_old)` and the k3 exponent are clamped to +-LOG_RATIO_CLAMP before `exp`.
LOG_RATIO_CLAMP = 20.0
ADVANTAGE_SCALES = ("group", "batch", "none")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
#: w_p of a retrieved pair with similarity s: PairUni's sqrt(s), or s (the paper's weighting ablation).
PAIR_WEIGHTINGS = ("sqrt", "linear")


class PolicyLossOutput(NamedTuple):
    """Result of `clipped_policy_loss` / `fused_linear_policy_loss`.

    loss:          [] float32 (float64 for float64 inputs); differentiable.
    clip_fraction: [] share of unmasked tokens whose loss is clipped (PPO clip or dual clip).
    kl:            [] token-mean of the KL estimate over unmasked tokens (0 without ref_logp).
    ratio_mean:    [] token-mean of the importance ratio over unmasked tokens.
    """

    loss: torch.Tensor
    clip_fraction: torch.Tensor
    kl: torch.Tensor
    ratio_mean: torch.Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------- advantages
def validate_advantage_inputs(rewards, group_ids, weights, eps, scale) -> None:
    check_tensor("rewards", rewards, ndim=1, dtypes=FLOAT_DTYPES)
    check_tensor("group_ids", group_ids, ndim=1, dtypes=INT_DTYPES, device=rewards.device)
    check_shape("group_ids", group_ids, rewards.shape)
    if weights is not None:
        check_tensor("weights", weights, ndim=1, dtypes=FLOAT_DTYPES, device=rewards.device)
        check_shape("weights", weights, rewards.shape)
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale: expected one of {ADVANTAGE_SCALES}, got {scale!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps: expected a float >= 0, got {eps!r}")
    bad = ~torch.isfinite(rewards)
    if bool(bad.any()):  # one host sync: a non-finite reward must stop the step loudly
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"rewards: non-finite reward {rewards[i].item()} at index {i} in group {int(group_ids[i])}"
        )


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, weights: torch.Tensor | None = None,
                     eps: float = 1e-6, scale: str = "group") -> torch.Tensor:
    """Group-normalised (GRPO) advantages, optionally multiplied by per-sample weights.

    Args:
        rewards:   [N] float. One scalar reward per trajectory.
        group_ids: [N] int. Trajectories with the same id form a group; ids may come in any order.
        weights:   [N] float or None. Multiplies each advantage (PairGRPO: the pair weight).
        eps:       added to the std before dividing.
        scale:     "group": `(r - mean_g) / (std_g + eps)` with the unbiased std, 0 for a group of one;
                   "batch": `(r - mean_g) / (std_batch + eps)` (std over all N rewards);
                   "none":  `r - mean_g` (Dr.GRPO).
    Returns:
        [N] advantages in the compute dtype (float32, or float64 for float64 rewards).
    Raises:
        ValueError naming the group of a NaN/inf reward, or the argument with a bad shape/dtype.
    """
    validate_advantage_inputs(rewards, group_ids, weights, eps, scale)
    return _group_advantages_impl(rewards, group_ids, weights, float(eps), scale)


def _group_advantages_impl(rewards, group_ids, weights, eps, scale):
    dt = compute_dtype(rewards.dtype)
    r = rewards.to(dt)
    n = r.numel()
    if n == 0:
        return r.clone()
    _, inv, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    counts = counts.to(dt)
    mean = torch.zeros(counts.numel(), dtype=dt, device=r.device).index_add_(0, inv, r) / counts
    centered = r - mean[inv]
    if scale == "none":
        adv = centered
    elif scale == "group":
        sq = torch.zeros_like(mean).index_add_(0, inv, centered * centered)
        std = (sq / (counts - 1).clamp(min=1)).sqrt()
        adv = torch.where(counts[inv] > 1, centered / (std[inv] + eps), torch.zeros_like(centered))
    else:  # "batch"
        std = r.std() if n > 1 else r.new_zeros(())
        adv = centered / (std + eps)
    if weights is not None:
        adv = adv * weights.to(dt)
    return adv


def validate_pair_weight_inputs(similarity, aligned, weighting: str = "sqrt") -> None:
    if weighting not in PAIR_WEIGHTINGS:
        raise ValueError(f"weighting: expected one of {PAIR_WEIGHTINGS}, got {weighting!r}")
    check_tensor("similarity", similarity, ndim=1, dtypes=FLOAT_DTYPES)
    check_tensor("aligned", aligned, ndim=1, dtypes=(torch.bool,), device=similarity.device)
    check_shape("aligned", aligned, similarity.shape)
    bad = ~torch.isfinite(similarity) & ~aligned
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"similarity: non-finite similarity {similarity[i].item()} for retrieved pair {i}")


def pair_weights(similarity: torch.Tensor, aligned: torch.Tensor, weighting: str = "sqrt") -> torch.Tensor:
    """PairGRPO pair weights: 1 for aligned pairs, `sqrt(clamp(s, 0, 1))` for retrieved pairs (PairUni), or
    `clamp(s, 0, 1)` with weighting="linear" (the paper's weighting ablation).

    Args:
        similarity: [P] float, the pair's similarity (ignored where aligned).
        aligned:    [P] bool.
        weighting:  one of PAIR_WEIGHTINGS.
    Returns:
        [P] weights in the compute dtype.
    """
    validate_pair_weight_inputs(similarity, aligned, weighting)
    return _pair_weights_impl(similarity, aligned, weighting)


def _pair_weights_impl(similarity, aligned, weighting: str = "sqrt"):
    s = torch.nan_to_num(similarity.to(compute_dtype(similarity.dtype))).clamp(0.0, 1.0)
    return torch.where(aligned, torch.ones_like(s), s.sqrt() if weighting == "sqrt" else s)


# ----------------------------------------------------------------------------- policy loss
def validate_policy_loss_inputs(logp, old_logp, advantages, mask, *, ref_logp, epsilon_low, epsilon_high,
                                dual_clip_c, beta, kl_estimator, loss_agg_mode,
                                importance_sampling_level) -> None:
    """Shared by every implementation of the clipped policy loss (reference, Triton, fused linear)."""
    check_tensor("logp", logp, ndim=2, dtypes=FLOAT_DTYPES)
    n, t = logp.shape
    if n == 0 or t == 0:
        raise ValueError(f"logp: expected a non-empty [N, T] tensor, got shape {tuple(logp.shape)}")
    dev = logp.device
    check_tensor("old_logp", old_logp, ndim=2, dtypes=FLOAT_DTYPES, device=dev)
    check_shape("old_logp", old_logp, (n, t))
    check_tensor("advantages", advantages, ndim=(1, 2), dtypes=FLOAT_DTYPES, device=dev)
    check_shape("advantages", advantages, (n,) if advantages.dim() == 1 else (n, t))
    check_mask("mask", mask, (n, t), dev)
    if ref_logp is not None:
        check_tensor("ref_logp", ref_logp, ndim=2, dtypes=FLOAT_DTYPES, device=dev)
        check_shape("ref_logp", ref_logp, (n, t))
    for name, eps in (("epsilon_low", epsilon_low), ("epsilon_high", epsilon_high)):
        if not isinstance(eps, (int, float)) or not (0.0 <= eps):
            raise ValueError(f"{name}: expected a float >= 0, got {eps!r}")
    if epsilon_low > 1.0:
        raise ValueError(f"epsilon_low: expected <= 1 (the lower clip bound is 1 - epsilon_low), got {epsilon_low}")
    if dual_clip_c is not None and not (isinstance(dual_clip_c, (int, float)) and dual_clip_c > 1.0):
        raise ValueError(f"dual_clip_c: expected None or a float > 1, got {dual_clip_c!r}")
    if not isinstance(beta, (int, float)) or beta < 0:
        raise ValueError(f"beta: expected a float >= 0, got {beta!r}")
    if beta > 0 and ref_logp is None:
        raise ValueError("ref_logp: required when beta > 0 (the KL penalty needs reference log-probs)")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator: expected one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode: expected one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"importance_sampling_level: expected one of {IMPORTANCE_SAMPLING_LEVELS}, "
            f"got {importance_sampling_level!r}"
        )


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate. k1 = logp - ref, k2 = (logp - ref)^2 / 2,
    k3 = exp(d) - d - 1 with d = clamp(ref - logp, -20, 20) (Schulman's unbiased, >= 0)."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    d = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(d) - d - 1.0


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, *, ref_logp: torch.Tensor | None = None,
                        epsilon_low: float = 0.2, epsilon_high: float = 0.2, dual_clip_c: float | None = None,
                        beta: float = 0.0, kl_estimator: str = "k3", loss_agg_mode: str = "token-mean",
                        importance_sampling_level: str = "token") -> PolicyLossOutput:
    """PPO/GRPO clipped surrogate over [N, T] token log-probs (the spec of the fused kernels).

    Args:
        logp:       [N, T] float, log pi_theta of the sampled tokens; the loss is differentiable in it.
        old_logp:   [N, T] float, log pi_theta_old (rollout policy).
        advantages: [N] (one per trajectory) or [N, T] float.
        mask:       [N, T] bool/int/float; nonzero marks a counted token. Masked entries of every
                    input are ignored, even if they hold inf or NaN.
        ref_logp:   [N, T] float or None; reference policy for the KL term.
        epsilon_low, epsilon_high: ratio clipped to [1 - epsilon_low, 1 + epsilon_high].
        dual_clip_c: None, or c > 1: for A < 0 the loss is at most -A * c (dual-clip PPO).
        beta:       KL coefficient; beta > 0 needs ref_logp.
        kl_estimator: "k1" | "k2" | "k3".
        loss_agg_mode: "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum" | "seq-mean-token-sum-norm".
        importance_sampling_level: "token", or "sequence": every token of a row uses the row's
                    masked mean log-ratio (GSPO-style; the gradient flows to every token).
    Returns:
        PolicyLossOutput(loss, clip_fraction, kl, ratio_mean), all 0-d tensors.
    """
    validate_policy_loss_inputs(
        logp, old_logp, advantages, mask, ref_logp=ref_logp, epsilon_low=epsilon_low,
        epsilon_high=epsilon_high, dual_clip_c=dual_clip_c, beta=beta, kl_estimator=kl_estimator,
        loss_agg_mode=loss_agg_mode, importance_sampling_level=importance_sampling_level,
    )
    dt = compute_dtype(logp.dtype)
    valid = mask != 0
    zero = torch.zeros((), dtype=dt, device=logp.device)
    # Masked entries are replaced by 0 before any arithmetic so garbage there cannot leak (not even as NaN grads).
    lp = torch.where(valid, logp.to(dt), zero)
    old = torch.where(valid, old_logp.to(dt), zero)
    adv = advantages.to(dt)
    adv = torch.where(valid, adv[:, None] if adv.dim() == 1 else adv, zero)
    m = valid.to(dt)
    n, t = lp.shape

    log_ratio = (lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    count = m.sum(-1)
    if importance_sampling_level == "sequence":
        seq_log_ratio = (log_ratio * m).sum(-1) / count.clamp(min=1)
        log_ratio = seq_log_ratio[:, None].expand(n, t)
    ratio = torch.exp(log_ratio)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    clipped = pg_clipped > pg_unclipped
    if dual_clip_c is not None:
        bound = -adv * dual_clip_c
        dual = (adv < 0) & (pg > bound)
        pg = torch.where(dual, bound, pg)
        clipped = clipped | dual

    per_token = pg
    kl_tok = None
    if ref_logp is not None:
        ref = torch.where(valid, ref_logp.to(dt), zero)
        kl_tok = kl_penalty(lp, ref, kl_estimator)
        if beta > 0:
            per_token = per_token + beta * kl_tok

    row_sum = (per_token * m).sum(-1)
    if loss_agg_mode == "token-mean":
        loss = row_sum.sum() / count.sum().clamp(min=1)
    elif loss_agg_mode == "seq-mean-token-mean":
        loss = (row_sum / count.clamp(min=1)).sum() / (count > 0).sum().clamp(min=1)
    elif loss_agg_mode == "seq-mean-token-sum":
        loss = row_sum.sum() / n
    else:  # "seq-mean-token-sum-norm"
        loss = row_sum.sum() / t

    with torch.no_grad():
        total = count.sum().clamp(min=1)
        clip_fraction = (clipped & valid).to(dt).sum() / total
        kl = (kl_tok * m).sum() / total if kl_tok is not None else zero.clone()
        ratio_mean = (ratio * m).sum() / total
    return PolicyLossOutput(loss, clip_fraction, kl, ratio_mean)


# ============================================================================= linear head log-probs
# linear_logprobs / fused_linear_policy_loss (the spec materialises the logits; the fast paths never do)
def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    bias: torch.Tensor | None = None, temperature: float = 1.0, return_entropy: bool = False):
    """`log_softmax((hidden @ weight.T + bias) / temperature)[targets]`, materialising the [M, V] logits.

    Args:
        hidden: [M, H] float; weight: [V, H] float; targets: [M] int in [0, V); bias: [V] float or None.
        temperature: > 0. return_entropy: also return the entropy of each row's distribution.
    Returns:
        logp [M] in the compute dtype (or (logp, entropy)); differentiable in hidden, weight, bias.
    """
    dt = compute_dtype(hidden.dtype)
    logits = hidden.to(dt) @ weight.to(dt).t()
    if bias is not None:
        logits = logits + bias.to(dt)
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    logp = logprobs.gather(-1, targets.long()[:, None])[:, 0]
    if not return_entropy:
        return logp
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy


def fused_linear_policy_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                             bias: torch.Tensor | None = None, temperature: float = 1.0,
                             **loss_kwargs) -> PolicyLossOutput:
    """`clipped_policy_loss(linear_logprobs(hidden.flatten(0, 1), ...).view(N, T), ...)` (the spec).

    Masked tokens are ignored like every other masked input: only the rows where `mask` is set are
    fed to the head (their targets may be padding ids, their hidden rows garbage); logp is 0 elsewhere.
    """
    n, t, h = hidden.shape
    valid = (mask != 0).reshape(n * t)
    logp_valid = linear_logprobs(hidden.reshape(n * t, h)[valid], weight, targets.reshape(n * t)[valid],
                                 bias=bias, temperature=temperature)
    logp = torch.zeros(n * t, dtype=logp_valid.dtype, device=hidden.device).masked_scatter(valid, logp_valid)
    return clipped_policy_loss(logp.view(n, t), old_logp, advantages, mask, **loss_kwargs)


# ============================================================================ cfg_sample
# Classifier-free-guidance sampling of one decode step: the spec of the C++ CPU kernel
# (csrc/cfg_sampling.cpp) and the CUDA kernel (csrc/cfg_sampling.cuh), which implement the
# same random stream (csrc/cfg_sampling_common.h) so all three draw the same tokens for
# the same seeds where floating point allows (only a top-p boundary can differ, by ulps).
CFG_LAYOUTS = ("blocked", "interleaved")
CFG_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_U32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
# fp32 constants of the noise's log (exact fp32 values; see cfg_sampling_common.h)
_LN2_HI, _LN2_LO = 0.693145751953125, 1.428606765330187e-06
_INV3, _INV5, _INV7, _INV9 = 0.3333333432674408, 0.20000000298023224, 0.1428571492433548, 0.1111111119389534
_SQRT2_BITS = 0x3FB504F3


def _mul_hi_lo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of m * x for x holding uint32 values in int64 (no overflow)."""
    t = m * (x & 0xFFFF)  # < 2^48
    s = m * (x >> 16)  # < 2^48; m * x = t + s * 2^16
    return (s + (t >> 16)) >> 16, (t + ((s & 0xFFFF) << 16)) & _U32


def philox4x32_10(ctr: tuple, key: tuple) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 (Random123) on int64 tensors holding uint32 words; broadcasts."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mul_hi_lo(_PHILOX_M0, c0)
        hi1, lo1 = _mul_hi_lo(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W0) & _U32, (k1 + _PHILOX_W1) & _U32
    return c0, c1, c2, c3


def cfg_random_bits(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] uint32 words (in int64) of the stream keyed by (seeds[b], steps[b], token)."""
    seeds = seeds.to(torch.int64).view(-1, 1)
    steps = steps.to(torch.int64).view(-1, 1)
    groups = torch.arange((vocab + 3) // 4, dtype=torch.int64, device=seeds.device).view(1, -1)
    words = philox4x32_10((groups, torch.zeros_like(groups), steps & _U32, (steps >> 32) & _U32),
                          (seeds & _U32, (seeds >> 32) & _U32))
    bcast = torch.broadcast_shapes(seeds.shape, steps.shape, groups.shape)
    return torch.stack([w.expand(bcast) for w in words], dim=-1).flatten(1)[:, :vocab]


def _log_positive(x: torch.Tensor) -> torch.Tensor:
    """The sampler's fp32 log of positive normal floats, op for op as in cfg_sampling_common.h."""
    b = x.view(torch.int32).to(torch.int64)
    e = ((b >> 23) & 0xFF) - 127
    mb = (b & 0x7FFFFF) | 0x3F800000
    above = (mb > _SQRT2_BITS).to(torch.int64)
    mb = mb - (above << 23)
    e = (e + above).to(torch.float32)
    m = mb.to(torch.int32).view(torch.float32)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    t = torch.full_like(s, _INV9)
    for c in (_INV7, _INV5, _INV3):
        t = (t * s2) + c
    t = t * s2
    two_s = s + s
    log_m = two_s + (two_s * t)
    return (log_m + (e * _LN2_LO)) + (e * _LN2_HI)


def gumbel_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise -log(-log(u)) in fp32, u = (2*(bits >> 9) + 1) * 2^-24."""
    u = (((bits >> 9) << 1) | 1).to(torch.float32) * 5.9604644775390625e-08
    return -_log_positive(-_log_positive(u))


def validate_cfg_sample_inputs(logits, seeds, step, guidance_scale, temperature, top_k, top_p, layout,
                               *, dtypes=CFG_LOGIT_DTYPES + (torch.float64,), check_finite=True) -> int:
    """Raise ValueError naming the argument; returns B. `check_finite` reads the logits (a host sync on CUDA)."""
    check_tensor("logits", logits, ndim=2, dtypes=dtypes)
    if logits.shape[0] == 0 or logits.shape[0] % 2 != 0:
        raise ValueError(f"logits: expected [2B, V] with an even, positive first dimension "
                         f"(B conditional + B unconditional rows), got shape {tuple(logits.shape)}")
    if logits.shape[1] == 0:
        raise ValueError("logits: expected V > 0 columns, got 0")
    batch = logits.shape[0] // 2
    check_tensor("seeds", seeds, ndim=1, dtypes=(torch.int64,), device=logits.device)
    check_shape("seeds", seeds, (batch,))
    if isinstance(step, torch.Tensor):
        check_tensor("step", step, dtypes=(torch.int64,), device=logits.device)
        if step.numel() != 1 and tuple(step.shape) != (batch,):
            raise ValueError(f"step: expected an int, a one-element int64 tensor or shape ({batch},), "
                             f"got shape {tuple(step.shape)}")
    elif isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected an int >= 0 or an int64 tensor, got {step!r}")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale: expected a finite float, got {guidance_scale!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature: expected a finite float >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k: expected an int >= 0 (0 = off), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: expected a float in (0, 1] (1 = off), got {top_p!r}")
    if layout not in CFG_LAYOUTS:
        raise ValueError(f"layout: expected one of {CFG_LAYOUTS}, got {layout!r}")
    # one vectorised min/max pass (NaN propagates through both), ~10x cheaper than isfinite().all()
    if check_finite and not all(bool(torch.isfinite(v)) for v in torch.aminmax(logits)):
        bad = (~torch.isfinite(logits)).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"logits: rows {bad[:8]} contain NaN or inf (logits must be finite)")
    return batch


def split_cfg_logits(logits: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond [B, V], uncond [B, V]) views of [2B, V] logits in the given layout."""
    if layout == "interleaved":
        return logits[0::2], logits[1::2]
    batch = logits.shape[0] // 2
    return logits[:batch], logits[batch:]


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance, `uncond + guidance_scale * (cond - uncond)`, in the inputs' dtype, rounding
    once per operation in that order. The one home of the formula: the sampler's guided logits, the engine's
    scoring of a guided draw, and its guided head inputs (the head is linear, so mixing its inputs mixes its
    logits) all call it."""
    return uncond + guidance_scale * (cond - uncond)


def cfg_guided_logits(logits, guidance_scale: float, temperature: float = 1.0, layout: str = "blocked"):
    """z = (u + guidance_scale * (c - u)) / temperature in fp32 (float64 for float64 input),
    rounding once per operation in that order; temperature 0 returns the untempered guided logits."""
    dt = compute_dtype(logits.dtype)
    cond, uncond = (x.to(dt) for x in split_cfg_logits(logits, layout))
    guided = cfg_mix(cond, uncond, guidance_scale)
    return guided / temperature if temperature > 0 else guided


def cfg_keep_mask(z: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """[B, V] bool: the tokens top-k and then top-p keep (ties at a boundary kept together).

    top-k keeps z >= the k-th largest z (k >= V or 0: all). top-p then keeps token i when the
    probability mass of kept tokens with z strictly larger than z_i is < top_p (HF semantics).
    Masses are exp(z - max) in the compute dtype summed in float64.
    """
    vocab = z.shape[-1]
    keep = torch.ones_like(z, dtype=torch.bool)
    if 0 < top_k < vocab:
        keep = z >= torch.topk(z, top_k, dim=-1).values[:, -1:]
    if top_p < 1.0:
        m = z.max(dim=-1, keepdim=True).values
        mass = torch.where(keep, torch.exp(z - m), torch.zeros_like(z)).double()
        total = mass.sum(-1, keepdim=True)
        zk = torch.where(keep, z, torch.full_like(z, -math.inf))
        z_desc, order = torch.sort(zk, dim=-1, descending=True)
        cum = torch.cat([torch.zeros_like(total), mass.gather(-1, order).cumsum(-1)], dim=-1)
        n_greater = vocab - torch.searchsorted(z_desc.flip(-1).contiguous(), zk.contiguous(), right=True)
        above = cum.gather(-1, n_greater)
        keep = keep & (above < top_p * total)
    return keep


def cfg_sample(logits: torch.Tensor, *, guidance_scale: float, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, seeds: torch.Tensor, step, layout: str = "blocked",
               check_finite: bool = True, cond_logprobs: bool = False):
    """Reference of `pairuni_kernels.cfg_sample`: (tokens [B] int64, logprobs [B] float32), and with
    `cond_logprobs` a third [B] float32: `cfg_cond_logprobs` of the drawn tokens.

    Gumbel-max over the kept tokens with the noise of `gumbel_from_bits(cfg_random_bits(...))`,
    first index on ties; logprobs = log_softmax of the kept z at the drawn token; temperature 0
    gives the first argmax of the guided logits and logprob 0 (a point mass).
    """
    batch = validate_cfg_sample_inputs(logits, seeds, step, guidance_scale, temperature, top_k, top_p, layout,
                                       check_finite=check_finite)
    z = cfg_guided_logits(logits, float(guidance_scale), float(temperature), layout)
    if temperature == 0:
        tokens, logprobs = z.argmax(dim=-1), torch.zeros(batch, dtype=torch.float32, device=logits.device)
        return (tokens, logprobs) + ((cfg_cond_logprobs(logits, tokens, 0.0, layout),) if cond_logprobs else ())
    keep = cfg_keep_mask(z, top_k, top_p)
    steps = step if isinstance(step, torch.Tensor) else torch.tensor([step], dtype=torch.int64, device=logits.device)
    noise = gumbel_from_bits(cfg_random_bits(seeds, steps.reshape(-1), z.shape[-1])).to(z.dtype)
    neg_inf = torch.full_like(z, -math.inf)
    tokens = torch.where(keep, z + noise, neg_inf).argmax(dim=-1)
    kept = torch.where(keep, z, neg_inf)
    logprobs = (kept.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(kept, dim=-1)).to(torch.float32)
    if cond_logprobs:
        return tokens, logprobs, cfg_cond_logprobs(logits, tokens, float(temperature), layout)
    return tokens, logprobs


def cfg_cond_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float,
                      layout: str = "blocked") -> torch.Tensor:
    """[B] float32: log softmax(c / T)[tokens] of the conditional rows c, T = temperature, or 1 when
    greedy (0), with no top-k / top-p: the log-prob the policy's conditional branch gives the drawn
    token (the image rollouts' old log-prob, T2I-R1 / PairUni)."""
    cond = split_cfg_logits(logits, layout)[0].to(compute_dtype(logits.dtype))
    scaled = cond / (temperature if temperature > 0 else 1.0)
    return torch.log_softmax(scaled, dim=-1).gather(-1, tokens[:, None])[:, 0].to(torch.float32)
