"""Pure-torch versions of every pairuni op: the executable spec and the CPU path.

Each function here defines the semantics its fast twin (Triton / C++ / CUDA) is tested
against. They compute in `promote_types(input dtype, float32)`: fp16/bf16/fp32 inputs
are computed in fp32 and float64 inputs in float64, so tests can get an fp64 ground
truth by passing fp64 tensors. Everything is vectorised (no Python loops over rows or
groups) so that this is also a reasonable CPU path.

The formulas are those of `shared/DESIGN.md` ("pairuni_kernels: the contract").
"""

from __future__ import annotations

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


def validate_pair_weight_inputs(similarity, aligned) -> None:
    check_tensor("similarity", similarity, ndim=1, dtypes=FLOAT_DTYPES)
    check_tensor("aligned", aligned, ndim=1, dtypes=(torch.bool,), device=similarity.device)
    check_shape("aligned", aligned, similarity.shape)
    bad = ~torch.isfinite(similarity) & ~aligned
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"similarity: non-finite similarity {similarity[i].item()} for retrieved pair {i}")


def pair_weights(similarity: torch.Tensor, aligned: torch.Tensor) -> torch.Tensor:
    """PairGRPO pair weights: 1 for aligned pairs, `sqrt(clamp(s, 0, 1))` for retrieved pairs.

    Args:
        similarity: [P] float, the pair's similarity (ignored where aligned).
        aligned:    [P] bool.
    Returns:
        [P] weights in the compute dtype.
    """
    validate_pair_weight_inputs(similarity, aligned)
    return _pair_weights_impl(similarity, aligned)


def _pair_weights_impl(similarity, aligned):
    s = similarity.to(compute_dtype(similarity.dtype))
    return torch.where(aligned, torch.ones_like(s), torch.nan_to_num(s).clamp(0.0, 1.0).sqrt())


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
