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
#: vespo's lower clamp of the row's log weight, log(1e-8) (TRL get_gamma_weights).
VESPO_LOG_W_MIN = math.log(1e-8)
ADVANTAGE_SCALES = ("group", "batch", "none")
#: `group_advantages(estimator=...)` (verl 0.9.1 names); "reinforce_plus_plus" is `token_returns_advantages`.
ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "opo", "grpo_passk", "reinforce_plus_plus_baseline", "reinforce_plus_plus")
#: Estimators that need the [N] response lengths (`lengths=`): opo's baseline, rf++-baseline's token whitening.
LENGTH_ESTIMATORS = ("opo", "reinforce_plus_plus_baseline")
#: `multi_reward_advantages(mode=...)`: TRL 1.16 multi_objective_aggregation="normalize_then_sum", verl 0.9.1 gdpo.
MULTI_REWARD_MODES = ("normalize_then_sum", "gdpo")
#: verl's masked_whiten adds this to the token count of its means and to the variance under its rsqrt.
WHITEN_EPS = 1e-8
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence", "sequence_token")
#: Policy-loss types of `clipped_policy_loss` (see its docstring for each formula and its source).
LOSS_TYPES = ("ppo", "cispo", "cispo_clip", "sapo", "vespo", "gpg", "geo_mean", "clip_cov", "kl_cov", "dppo_tv",
              "dppo_kl", "dro")
#: The importance-sampling levels each loss type defines; the others use the token ratio (or their own row ratio).
LOSS_TYPE_LEVELS = {name: ("token",) for name in LOSS_TYPES} | {
    name: IMPORTANCE_SAMPLING_LEVELS for name in ("ppo", "cispo", "cispo_clip", "sapo")}
#: Loss types whose token loss depends on the whole row (the kernels reduce the row first).
ROW_COUPLED_LOSS_TYPES = ("vespo", "geo_mean")
COV_SELECTION_MODES = ("clip_cov", "kl_cov")
#: w_p of a retrieved pair with similarity s: PairUni's sqrt(s), or s (the paper's weighting ablation).
PAIR_WEIGHTINGS = ("sqrt", "linear")


class PolicyLossOutput(NamedTuple):
    """Result of `clipped_policy_loss` / `fused_linear_policy_loss`.

    loss:          [] float32 (float64 for float64 inputs); differentiable.
    clip_fraction: [] share of unmasked tokens whose loss a clip / truncation / selection changed (per loss
                   type, see `clipped_policy_loss`).
    kl:            [] token-mean of the KL estimate over unmasked tokens (0 without ref_logp).
    ratio_mean:    [] token-mean of the importance ratio over unmasked tokens (geo_mean: its row ratio).
    entropy:       [] token-mean of the entropy over unmasked tokens (0 when none was given or computed).
    """

    loss: torch.Tensor
    clip_fraction: torch.Tensor
    kl: torch.Tensor
    ratio_mean: torch.Tensor
    entropy: torch.Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------- advantages
def validate_advantage_inputs(rewards, group_ids, weights, eps, scale, estimator="grpo", lengths=None) -> None:
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
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"estimator: expected one of {ADVANTAGE_ESTIMATORS}, got {estimator!r}")
    if estimator == "reinforce_plus_plus":
        raise ValueError("estimator: 'reinforce_plus_plus' discounts token rewards; call "
                         "token_returns_advantages(token_rewards, mask, gamma) instead")
    if lengths is not None:
        check_lengths(lengths, rewards.shape[0], rewards.device)
    elif estimator in LENGTH_ESTIMATORS:
        raise ValueError(f"lengths: required by estimator {estimator!r} (the [N] response lengths in tokens)")
    bad = ~torch.isfinite(rewards)
    if bool(bad.any()):  # one host sync: a non-finite reward must stop the step loudly
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"rewards: non-finite reward {rewards[i].item()} at index {i} in group {int(group_ids[i])}"
        )
    if estimator == "grpo_passk" and rewards.numel():
        _, inv, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
        lone = counts[inv] < 2
        if bool(lone.any()):
            i = int(lone.nonzero()[0, 0])
            raise ValueError(f"group_ids: grpo_passk needs at least 2 responses per group (as verl), "
                             f"group {int(group_ids[i])} has 1")
    if estimator == "reinforce_plus_plus_baseline" and rewards.numel():
        check_whiten_count("lengths", float(lengths.sum()))


def check_lengths(lengths, n: int, device) -> None:
    """lengths: [N] int or float token counts, finite and >= 0."""
    check_tensor("lengths", lengths, ndim=1, dtypes=INT_DTYPES + FLOAT_DTYPES, device=device)
    check_shape("lengths", lengths, (n,))
    bad = ~(torch.isfinite(lengths) & (lengths >= 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"lengths: expected finite token counts >= 0, got {lengths[i].item()} at index {i}")


def check_whiten_count(name: str, total: float) -> None:
    """verl's masked_var raises for a token total of 0 or 1 (its Bessel factor M / (M - 1)); so do we (M <= 1)."""
    if not total > 1:
        raise ValueError(f"{name}: whitening over the batch's tokens needs more than 1 token, got {total:g}")


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, weights: torch.Tensor | None = None,
                     eps: float = 1e-6, scale: str = "group", estimator: str = "grpo",
                     lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Group-baselined advantages of one scalar reward per trajectory, optionally times per-sample weights.

    With n the size of a sample's group g, mean_g / std_g its mean and unbiased std, `A` is multiplied by
    `weights` at the very end (PairGRPO's pair weight) for every estimator:

      "grpo" (default; TRL GRPOTrainer, verl compute_grpo_outcome_advantage), by `scale`:
          "group": `(r - mean_g) / (std_g + eps)`; "batch": `(r - mean_g) / (std(r) + eps)` (std over all N,
          TRL scale_rewards="batch"); "none": `r - mean_g` (Dr.GRPO, verl norm_adv_by_std_in_grpo=False).
          A group of one gets 0 (verl gives it `r / (1 + eps)`; its adapter restores that).
      "rloo" (verl compute_rloo_outcome_advantage; TRL RLOOTrainer): `r_i - mean_{j != i} r_j`
          `= n / (n - 1) * (r_i - mean_g)` (verl's form); a group of one gets 0 as in TRL and verl's
          rloo_vectorized (verl's loop rloo leaves it r).
      "opo" (verl compute_opo_outcome_advantage, arXiv 2505.23585): `r - sum_g(l r) / sum_g(l)`, l = `lengths`,
          the length-weighted group mean; a group of one, or one whose lengths sum to 0, has baseline 0 (`A = r`,
          verl's lone-response rule; verl divides 0 / 0 for the latter).
      "grpo_passk" (verl compute_grpo_passk_outcome_advantage, arXiv 2503.19595): the best response of each
          group gets `r_max - r_2nd` (the two largest rewards, `torch.topk(r_g, 2)`), divided by `std_g + eps`
          ("group", verl norm_adv_by_std_in_grpo=True), `std(r) + eps` ("batch") or 1 ("none"); the others get 0.
          Ties: when the maximum is shared, r_max = r_2nd and every member gets 0, so which tied index
          torch.topk returns (not the first one on CPU for n > 3) cannot change the result; the first is marked.
          Groups of one raise, as in verl.
      "reinforce_plus_plus_baseline" (verl compute_reinforce_plus_plus_baseline_outcome_advantage, arXiv
          2501.03262): `c = r - mean_g` (a group of one: `c = r`, verl's mean 0), then whitened over the batch's
          tokens as verl's masked_whiten does, row i holding c_i on l_i = `lengths[i]` tokens (M = sum l):
          `mu = sum(l c) / (M + 1e-8)`, `var = sum(l (c - mu)^2) / (M + 1e-8) * M / (M - 1)`,
          `A = (c - mu) / sqrt(var + 1e-8)`; M <= 1 raises (verl's masked_var does too).
    rloo, opo and reinforce_plus_plus_baseline have no std scaling in verl or TRL and ignore `scale` and `eps`,
    as verl ignores norm_adv_by_std_in_grpo and TRL's RLOO scale_rewards for them.

    Args:
        rewards:   [N] float. One scalar reward per trajectory.
        group_ids: [N] int. Trajectories with the same id form a group; ids may come in any order.
        weights:   [N] float or None. Multiplies each advantage (PairGRPO: the pair weight).
        eps:       added to the std before dividing.
        scale:     "group" | "batch" | "none" (see grpo / grpo_passk).
        estimator: one of ADVANTAGE_ESTIMATORS except "reinforce_plus_plus" (`token_returns_advantages`).
        lengths:   [N] int/float response lengths in tokens; required by LENGTH_ESTIMATORS, unused otherwise.
    Returns:
        [N] advantages in the compute dtype (float32, or float64 for float64 rewards).
    Raises:
        ValueError naming the group of a NaN/inf reward, or the argument with a bad shape/dtype/value.
    """
    validate_advantage_inputs(rewards, group_ids, weights, eps, scale, estimator, lengths)
    return _group_advantages_impl(rewards, group_ids, weights, float(eps), scale, estimator, lengths)


def _group_advantages_impl(rewards, group_ids, weights, eps, scale, estimator="grpo", lengths=None):
    if estimator != "grpo":
        adv = _estimator_advantages(rewards, group_ids, eps, scale, estimator, lengths)
        return adv * weights.to(adv.dtype) if weights is not None else adv
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


def _estimator_advantages(rewards, group_ids, eps, scale, estimator, lengths):
    """rloo / opo / grpo_passk / reinforce_plus_plus_baseline of `group_advantages`, without the weights."""
    dt = compute_dtype(rewards.dtype)
    r = rewards.to(dt)
    n = r.numel()
    if n == 0:
        return r.clone()
    _, inv, group_sizes = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n_groups = group_sizes.numel()

    def group_total(x):  # [N] -> [N]: the sum of x over each sample's group
        return torch.zeros(n_groups, dtype=dt, device=r.device).index_add_(0, inv, x)[inv]

    size = group_sizes.to(dt)[inv]
    lone = size == 1
    centred = r - group_total(r) / size
    zero = torch.zeros_like(r)
    if estimator == "rloo":
        return torch.where(lone, zero, centred * (size / (size - 1).clamp(min=1)))
    if estimator == "opo":
        ln = lengths.to(dt)
        ln_total = group_total(ln)
        shift = group_total(ln * centred) / torch.where(ln_total > 0, ln_total, torch.ones_like(ln_total))
        return torch.where(lone | (ln_total == 0), r, centred - shift)  # = r - sum(l r) / sum(l) otherwise
    if estimator == "reinforce_plus_plus_baseline":
        return whiten_rows(torch.where(lone, r, centred), lengths.to(dt))
    # grpo_passk: the first index of each group's maximum, and the largest reward of the rest
    idx = torch.arange(n, device=r.device)
    neg_inf = torch.full((n_groups,), -math.inf, dtype=dt, device=r.device)
    r_max = neg_inf.scatter_reduce(0, inv, r, "amax")[inv]
    first = torch.full((n_groups,), n, dtype=idx.dtype, device=r.device).scatter_reduce(
        0, inv, torch.where(r == r_max, idx, n), "amin")[inv]
    best = idx == first
    r_2nd = neg_inf.scatter_reduce(0, inv, torch.where(best, -math.inf, r), "amax")[inv]
    gap = r_max - torch.where(lone, r_max, r_2nd)  # a group of one (refused by the validation) gets 0
    if scale == "group":
        std = (group_total(centred * centred) / (size - 1).clamp(min=1)).sqrt()
        gap = gap / (std + eps)
    elif scale == "batch":
        gap = gap / ((r.std() if n > 1 else r.new_zeros(())) + eps)
    return torch.where(best, gap, zero)


def whiten_rows(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """verl's `masked_whiten` of an [N, T] tensor whose row i holds values[i] on counts[i] unmasked tokens, on [N].

    With M = sum(counts): `mu = sum(c v) / (M + 1e-8)`, `var = sum(c (v - mu)^2) / (M + 1e-8) * M / (M - 1)`
    (unbiased), returns `(v - mu) * rsqrt(var + 1e-8)` ([N]; the caller checked M > 1).
    """
    total = counts.sum()
    mu = (values * counts).sum() / (total + WHITEN_EPS)
    var = ((values - mu) ** 2 * counts).sum() / (total + WHITEN_EPS) * (total / (total - 1))
    return (values - mu) * torch.rsqrt(var + WHITEN_EPS)


# ----------------------------------------------------------------------------- multi-reward advantages
def as_reward_weights(reward_weights, rewards):
    """A list/tuple of K numbers (verl's gdpo_reward_weights) becomes a float64 [K] tensor on rewards' device."""
    if isinstance(reward_weights, (list, tuple)):
        return torch.tensor(reward_weights, dtype=torch.float64, device=getattr(rewards, "device", None))
    return reward_weights


def validate_multi_reward_inputs(rewards, group_ids, reward_weights, mode, eps, scale, lengths, weights) -> None:
    check_tensor("rewards", rewards, ndim=2, dtypes=FLOAT_DTYPES)
    n, k = rewards.shape
    if k == 0:
        raise ValueError(f"rewards: expected [N, K] with K >= 1 reward columns, got shape {tuple(rewards.shape)}")
    check_tensor("group_ids", group_ids, ndim=1, dtypes=INT_DTYPES, device=rewards.device)
    check_shape("group_ids", group_ids, (n,))
    check_tensor("reward_weights", reward_weights, ndim=1, dtypes=FLOAT_DTYPES, device=rewards.device)
    if reward_weights.shape[0] != k:
        raise ValueError(f"reward_weights: expected {k} weights (one per reward column of rewards [N, K]), "
                         f"got {reward_weights.shape[0]}")
    if not bool(torch.isfinite(reward_weights).all()):
        raise ValueError(f"reward_weights: expected finite weights, got {reward_weights.tolist()}")
    if weights is not None:
        check_tensor("weights", weights, ndim=1, dtypes=FLOAT_DTYPES, device=rewards.device)
        check_shape("weights", weights, (n,))
    if mode not in MULTI_REWARD_MODES:
        raise ValueError(f"mode: expected one of {MULTI_REWARD_MODES}, got {mode!r}")
    if scale not in ("group", "none"):
        raise ValueError(f"scale: expected 'group' or 'none' (the per-reward std division), got {scale!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps: expected a float >= 0, got {eps!r}")
    if lengths is not None:
        if mode != "gdpo":
            raise ValueError("lengths: only mode='gdpo' whitens over tokens (TRL's normalize_then_sum normalises "
                             "over samples); pass lengths=None")
        check_lengths(lengths, n, rewards.device)
    # NaN = "this reward function did not score this sample" in TRL; verl's gdpo has no such notion
    bad = torch.isinf(rewards) if mode == "normalize_then_sum" else ~torch.isfinite(rewards)
    if bool(bad.any()):
        i, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"rewards: non-finite reward {rewards[i, j].item()} at [{i}, {j}] in group "
                         f"{int(group_ids[i])}" + (" (mode='gdpo' accepts no NaN)" if mode == "gdpo" else ""))
    if mode == "gdpo" and n:
        check_whiten_count("lengths" if lengths is not None else "rewards",
                           float(lengths.sum()) if lengths is not None else float(n))


def multi_reward_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, reward_weights: torch.Tensor, *,
                            mode: str = "normalize_then_sum", eps: float = 1e-4, scale: str = "group",
                            lengths: torch.Tensor | None = None,
                            weights: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-reward advantages with each reward normalised in its group before the weighted sum (GDPO,
    arXiv 2601.05242), then normalised over the batch; times `weights` at the end (PairGRPO).

    Per reward column k and group g: `a_k = (r_k - mean_gk) / (std_gk + eps)` (unbiased std; scale="none":
    `r_k - mean_gk`), `s = sum_k w_k a_k` with w = `reward_weights`, then by `mode`:
      "normalize_then_sum" (TRL 1.16 GRPOTrainer, multi_objective_aggregation="normalize_then_sum"):
          `A = (s - mean(s)) / (std(s) + eps)` over the samples (unbiased std). NaN rewards are TRL's
          "not scored by this function": left out of their column's group mean/std and 0 in the sum; a
          column-group with fewer than 2 scored samples contributes 0 (TRL: std NaN or 0); a sample with no
          scored column gets 0 and is left out of the batch mean/std; fewer than 2 scored samples give 0 everywhere.
      "gdpo" (verl 0.9.1 compute_gdpo_outcome_advantage): a_k is verl's GRPO advantage, so a group of one has
          mean 0 and std 1 (`a_k = r_k / (1 + eps)`); s is whitened as verl's masked_whiten over the batch's
          tokens, sample i counting `lengths[i]` tokens (all 1 when lengths is None), see `whiten_rows`.
          No NaN allowed; a token total <= 1 raises (verl's masked_var does).

    Args:
        rewards:        [N, K] float, one column per reward function.
        group_ids:      [N] int, any order.
        reward_weights: [K] float tensor, or a list of K numbers.
        mode:           one of MULTI_REWARD_MODES.
        eps:            added to each std (TRL: 1e-4; verl's gdpo: its epsilon, 1e-6).
        scale:          "group" or "none" (verl norm_adv_by_std_in_grpo=False): divide each a_k by its std or not.
        lengths:        [N] token counts for gdpo's whitening, or None.
        weights:        [N] float or None.
    Returns:
        [N] advantages in the compute dtype.
    """
    reward_weights = as_reward_weights(reward_weights, rewards)
    validate_multi_reward_inputs(rewards, group_ids, reward_weights, mode, eps, scale, lengths, weights)
    return _multi_reward_impl(rewards, group_ids, reward_weights, mode, float(eps), scale, lengths, weights)


def _multi_reward_impl(rewards, group_ids, reward_weights, mode, eps, scale, lengths, weights):
    per_reward = _per_reward_group_advantages(rewards, group_ids, eps, scale, mode)
    return _combine_rewards(per_reward, rewards, reward_weights, eps, mode, lengths, weights)


def _per_reward_group_advantages(rewards, group_ids, eps, scale, mode):
    """[N, K] a_k of `multi_reward_advantages` (0 where a column contributes nothing)."""
    dt = compute_dtype(rewards.dtype)
    r = rewards.to(dt)
    if r.shape[0] == 0:
        return r.clone()
    _, inv, group_sizes = torch.unique(group_ids, return_inverse=True, return_counts=True)
    scored = ~torch.isnan(r)
    x = torch.where(scored, r, torch.zeros_like(r))

    def group_total(v):  # [N, K] -> [N, K]: the sum of v over each sample's group, per column
        return torch.zeros(group_sizes.numel(), v.shape[1], dtype=dt, device=r.device).index_add_(0, inv, v)[inv]

    count = group_total(scored.to(dt))
    centred = torch.where(scored, x - group_total(x) / count.clamp(min=1), torch.zeros_like(x))
    std = (group_total(centred * centred) / (count - 1).clamp(min=1)).sqrt()
    if mode == "gdpo":  # verl's GRPO: a lone response has mean 0 and std 1
        lone = count == 1
        centred = torch.where(lone, x, centred)
        std = torch.where(lone, torch.ones_like(std), std)
        return centred / (std + eps) if scale == "group" else centred
    a = centred / (std + eps) if scale == "group" else centred
    return torch.where(scored & (count > 1), a, torch.zeros_like(a))


def _combine_rewards(per_reward, rewards, reward_weights, eps, mode, lengths, weights):
    """Weighted sum over the K columns and the batch normalisation of `multi_reward_advantages`."""
    s = (per_reward * reward_weights.to(per_reward.dtype)).sum(-1)
    if s.numel() == 0:
        return s
    if mode == "gdpo":
        counts = lengths.to(s.dtype) if lengths is not None else torch.ones_like(s)
        adv = whiten_rows(s, counts)
    else:
        scored = ~torch.isnan(rewards).all(-1)
        m = scored.sum().to(s.dtype)
        mu = torch.where(scored, s, torch.zeros_like(s)).sum() / m.clamp(min=1)
        d = torch.where(scored, s - mu, torch.zeros_like(s))
        std = ((d * d).sum() / (m - 1).clamp(min=1)).sqrt()
        adv = torch.where(scored & (m > 1), d / (std + eps), torch.zeros_like(s))
    return adv * weights.to(adv.dtype) if weights is not None else adv


# ----------------------------------------------------------------------------- token-level returns (reinforce++)
def validate_token_returns_inputs(token_rewards, mask, gamma, weights) -> None:
    check_tensor("token_rewards", token_rewards, ndim=2, dtypes=FLOAT_DTYPES)
    check_mask("mask", mask, token_rewards.shape, token_rewards.device)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (0.0 <= gamma <= 1.0):
        raise ValueError(f"gamma: expected a float in [0, 1], got {gamma!r}")
    if weights is not None:
        check_tensor("weights", weights, ndim=1, dtypes=FLOAT_DTYPES, device=token_rewards.device)
        check_shape("weights", weights, token_rewards.shape[:1])
    valid = mask != 0
    bad = ~torch.isfinite(token_rewards) & valid
    n_bad, total = torch.stack([bad.sum(), valid.sum()]).tolist()  # one host sync
    if n_bad:
        i, t = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"token_rewards: non-finite reward {token_rewards[i, t].item()} at unmasked [{i}, {t}]")
    check_whiten_count("mask", float(total))


def token_returns_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, *,
                             weights: torch.Tensor | None = None, return_returns: bool = False):
    """REINFORCE++ (verl 0.9.1 compute_reinforce_plus_plus_outcome_advantage, arXiv 2501.03262): discounted
    returns of token rewards, whitened over the batch's unmasked tokens; times `weights` per row at the end.

    Returns, right to left with a running G (0 past the end): at an unmasked token `G = r_t + gamma * G` and
    `R_t = G`; at a masked token G carries through unchanged (verl: observation spans) and `R_t = 0`, so
    masked rewards are ignored. Then verl's masked_whiten over the unmasked tokens (M of them):
    `mu = sum(R) / (M + 1e-8)`, `var = sum((R - mu)^2) / (M + 1e-8) * M / (M - 1)`,
    `A_t = (R_t - mu) / sqrt(var + 1e-8)` on unmasked tokens, 0 on masked ones. M <= 1 raises (verl too).
    The mask counts as 0/1 (nonzero = counted); verl multiplies by a float mask's values.

    Args:
        token_rewards:  [N, T] float (verl token_level_rewards).
        mask:           [N, T] bool/int/float (verl response_mask).
        gamma:          discount in [0, 1] (verl algorithm.gamma).
        weights:        [N] float or None; multiplies row i's advantages.
        return_returns: also return R ([N, T], verl's second output; not weighted).
    Returns:
        [N, T] advantages in the compute dtype, or (advantages, returns).
    """
    validate_token_returns_inputs(token_rewards, mask, gamma, weights)
    adv, returns = _token_returns_impl(token_rewards, mask, float(gamma), weights)
    return (adv, returns) if return_returns else adv


def _token_returns_impl(token_rewards, mask, gamma, weights):
    dt = compute_dtype(token_rewards.dtype)
    valid = mask != 0
    r = torch.where(valid, token_rewards.to(dt), torch.zeros((), dtype=dt, device=token_rewards.device))
    if gamma == 1.0:  # the running sum carries through masked tokens, whose rewards are 0 here
        returns = torch.where(valid, r.flip(-1).cumsum(-1).flip(-1), torch.zeros_like(r))
    else:
        returns = torch.zeros_like(r)
        running = torch.zeros_like(r[:, 0])
        for t in range(r.shape[1] - 1, -1, -1):
            running = torch.where(valid[:, t], r[:, t] + gamma * running, running)
            returns[:, t] = torch.where(valid[:, t], running, torch.zeros_like(running))
    m = valid.to(dt)
    total = m.sum()
    mu = (returns * m).sum() / (total + WHITEN_EPS)
    var = ((returns - mu) ** 2 * m).sum() / (total + WHITEN_EPS) * (total / (total - 1))
    adv = torch.where(valid, (returns - mu) * torch.rsqrt(var + WHITEN_EPS), torch.zeros_like(returns))
    if weights is not None:
        adv = adv * weights.to(dt)[:, None]
    return adv, returns


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
#: The loss-type knobs of `clipped_policy_loss` beyond the PPO ones, with their defaults (TRL 1.16 / verl 0.9.1).
LOSS_TYPE_DEFAULTS = dict(
    loss_type="ppo", kl_ratio_correction=False, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
    vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0, clip_ratio_c_tis=20.0,
    divergence_low=None, divergence_high=None, dro_beta=None, kl_cov_coef=1.0, selected=None,
    entropy=None, entropy_coef=0.0, entropy_mask=None, entropy_agg_mode="token-mean",
)


def _check_float(name, value, *, low=None, low_open=False, optional=False) -> None:
    if optional and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if not ok:
        bound = "" if low is None else f" {'>' if low_open else '>='} {low}"
        raise ValueError(f"{name}: expected {'None or ' if optional else ''}a finite float{bound}, got {value!r}")


def validate_loss_type_inputs(logp, *, loss_type="ppo", importance_sampling_level="token", dual_clip_c=None, beta=0.0,
                              kl_ratio_correction=False, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                              vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0,
                              clip_ratio_c_tis=20.0, divergence_low=None, divergence_high=None, dro_beta=None,
                              kl_cov_coef=1.0, selected=None, entropy=None, entropy_coef=0.0, entropy_mask=None,
                              entropy_agg_mode="token-mean", entropy_in_head=False) -> None:
    """The checks of the loss-type knobs (`LOSS_TYPE_DEFAULTS`); entropy_in_head: the caller (the fused
    head) computes the entropy itself, so `entropy` must be None and entropy_coef needs none."""
    n_t = tuple(logp.shape)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in LOSS_TYPE_LEVELS[loss_type]:
        raise ValueError(f"importance_sampling_level: loss_type {loss_type!r} takes {LOSS_TYPE_LEVELS[loss_type]}, "
                         f"got {importance_sampling_level!r}")
    if dual_clip_c is not None and loss_type not in ("ppo", "clip_cov"):
        raise ValueError(f"dual_clip_c: only loss_type 'ppo' / 'clip_cov' clip twice, got loss_type {loss_type!r}")
    if not isinstance(kl_ratio_correction, bool):
        raise ValueError(f"kl_ratio_correction: expected a bool, got {kl_ratio_correction!r}")
    for name, value in (("sapo_temperature_pos", sapo_temperature_pos), ("sapo_temperature_neg", sapo_temperature_neg),
                        ("clip_ratio_c_tis", clip_ratio_c_tis)):
        _check_float(name, value, low=0.0, low_open=True)
    for name, value in (("vespo_k_pos", vespo_k_pos), ("vespo_lambda_pos", vespo_lambda_pos),
                        ("vespo_k_neg", vespo_k_neg), ("vespo_lambda_neg", vespo_lambda_neg),
                        ("kl_cov_coef", kl_cov_coef)):
        _check_float(name, value, low=0.0)
    _check_float("divergence_low", divergence_low, low=0.0, optional=True)
    _check_float("divergence_high", divergence_high, low=0.0, optional=True)
    _check_float("dro_beta", dro_beta, low=0.0, low_open=True, optional=True)
    if loss_type == "dro" and dro_beta is None:
        raise ValueError("dro_beta: required (a float > 0) for loss_type 'dro'")
    if loss_type in COV_SELECTION_MODES:
        if selected is None:
            raise ValueError(f"selected: required for loss_type {loss_type!r} (see `cov_token_selection`)")
        check_tensor("selected", selected, ndim=2, dtypes=(torch.bool,), device=logp.device)
        check_shape("selected", selected, n_t)
    elif selected is not None:
        raise ValueError(f"selected: only loss_type 'clip_cov' / 'kl_cov' take it, got loss_type {loss_type!r}")
    _check_float("entropy_coef", entropy_coef)
    if entropy is not None:
        if entropy_in_head:
            raise ValueError("entropy: the fused head computes the entropy itself; pass entropy_coef only")
        check_tensor("entropy", entropy, ndim=2, dtypes=FLOAT_DTYPES, device=logp.device)
        check_shape("entropy", entropy, n_t)
    elif entropy_coef != 0 and not entropy_in_head:
        raise ValueError("entropy: required when entropy_coef != 0 (the entropy bonus needs each token's entropy)")
    if entropy_mask is not None:
        check_mask("entropy_mask", entropy_mask, n_t, logp.device)
    if entropy_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"entropy_agg_mode: expected one of {LOSS_AGG_MODES}, got {entropy_agg_mode!r}")


def validate_policy_loss_inputs(logp, old_logp, advantages, mask, *, ref_logp, epsilon_low, epsilon_high,
                                dual_clip_c, beta, kl_estimator, loss_agg_mode,
                                importance_sampling_level, **loss_type_knobs) -> None:
    """Shared by every implementation of the clipped policy loss (reference, Triton, fused linear);
    loss_type_knobs: those of `LOSS_TYPE_DEFAULTS` (and entropy_in_head), checked by `validate_loss_type_inputs`."""
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
    validate_loss_type_inputs(logp, importance_sampling_level=importance_sampling_level, dual_clip_c=dual_clip_c,
                              beta=beta, **loss_type_knobs)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate. k1 = logp - ref, k2 = (logp - ref)^2 / 2,
    k3 = exp(d) - d - 1 with d = clamp(ref - logp, -20, 20) (Schulman's unbiased, >= 0)."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    d = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(d) - d - 1.0


def _masked_operands(logp, old_logp, advantages, mask):
    """(dt, valid, zero, logp, old_logp, advantages [N, T], mask as dt) in the compute dtype dt. Masked entries are
    replaced by 0 before any arithmetic so garbage there cannot leak (not even as NaN gradients)."""
    dt = compute_dtype(logp.dtype)
    valid = mask != 0
    zero = torch.zeros((), dtype=dt, device=logp.device)
    lp = torch.where(valid, logp.to(dt), zero)
    old = torch.where(valid, old_logp.to(dt), zero)
    adv = advantages.to(dt)
    adv = torch.where(valid, adv[:, None] if adv.dim() == 1 else adv, zero)
    return dt, valid, zero, lp, old, adv, valid.to(dt)


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, *, ref_logp: torch.Tensor | None = None,
                        epsilon_low: float = 0.2, epsilon_high: float = 0.2, dual_clip_c: float | None = None,
                        beta: float = 0.0, kl_estimator: str = "k3", loss_agg_mode: str = "token-mean",
                        importance_sampling_level: str = "token", loss_type: str = "ppo",
                        kl_ratio_correction: bool = False, sapo_temperature_pos: float = 1.0,
                        sapo_temperature_neg: float = 1.05, vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0,
                        vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0, clip_ratio_c_tis: float = 20.0,
                        divergence_low: float | None = None, divergence_high: float | None = None,
                        dro_beta: float | None = None, kl_cov_coef: float = 1.0,
                        selected: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
                        entropy_coef: float = 0.0, entropy_mask: torch.Tensor | None = None,
                        entropy_agg_mode: str = "token-mean") -> PolicyLossOutput:
    """GRPO-family policy losses over [N, T] token log-probs (the spec of the fused kernels).

    With r = exp(lr), lr = clamp(logp - old_logp, -20, 20) at the importance-sampling level, sg = stop-gradient
    and A the advantage, the per-token policy term of each `loss_type` is (clip_fraction counts the tokens marked *):
      ppo        max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), for A < 0 with dual clip at most -A c
                 (TRL grpo/bnpo/dr_grpo/dapo/luspo, verl compute_policy_loss_vanilla / gspo)  *a clip is active
      cispo      -sg(min(r, eps_high)) A logp   (TRL "cispo": epsilon_high is the cap, e.g. 5)  *r > eps_high
      cispo_clip -sg(clip(r, 1 - eps_low, 1 + eps_high)) A logp   (verl compute_policy_loss_cispo)  *r clipped
      sapo       -sigmoid(tau (r - 1)) 4 / tau A, tau = sapo_temperature_pos if A > 0 else _neg (TRL, verl
                 compute_policy_loss_sapo)
      vespo      -sg(phi(w)) A logp, log w = clamp(sum_row(m lr), log 1e-8, 20), phi(w) = exp(lam + k log w - lam w)
                 (k, lam = vespo_k/lambda_pos if A >= 0 else _neg; lam >= 1e-4; NaN/inf phi -> 0) (TRL
                 get_gamma_weights, without vLLM's importance ratio)
      gpg        -A logp   (verl compute_policy_loss_gpg)
      geo_mean   -Abar_row exp(sum_row(m lr*) / (count + 1e-8)), Abar_row = sum_row(m A) / (count + 1e-8),
                 lr* = sgn(A) min(sgn(A) lr, sgn(A) clip(lr, -eps_low, eps_high)) (verl compute_policy_loss_geo_mean,
                 GMPO; every token of a row carries the row's loss, so "seq-mean-token-mean" gives verl's row mean)
                 *(A > 0 and lr > eps_high) or (A < 0 and lr < -eps_low)
      clip_cov   ppo's term, 0 at `selected` tokens (verl compute_policy_loss_clip_cov)  *ppo's clip or selected
      kl_cov     -A r, + kl_cov_coef |lr| at `selected` tokens (verl compute_policy_loss_kl_cov)  *selected
      dppo_tv    -A sg(min(r, clip_ratio_c_tis)) logp v, v = [p - p_old <= div_high] if A > 0 else
                 [p - p_old >= -div_low], p = exp(logp) (verl compute_policy_loss_dppo_tv)  *not v, or r truncated
      dppo_kl    as dppo_tv with v = [bkl <= div_high or p <= p_old] if A > 0 else [bkl <= div_low or p >= p_old],
                 bkl = p_old (old - logp) + (1 - p_old) log((1 - p_old + 1e-8) / (1 - p + 1e-8))
                 (verl compute_policy_loss_dppo_kl)  *not v, or r truncated
      dro        -(A logp - dro_beta / 2 (logp - old_logp)^2)  (verl compute_policy_loss_dro; lr not clamped)
    div_low / div_high default to epsilon_low / epsilon_high (verl reads both from clip_ratio_low/high).
    The per-token loss is term + beta * kl (kl * r with kl_ratio_correction: TRL use_bias_correction_kl, r the
    differentiable, un-dual-clipped ratio at the level; the token ratio for types without levels), aggregated by
    `loss_agg_mode`; then `- entropy_coef * agg(entropy)` over mask & entropy_mask by `entropy_agg_mode` (TRL
    "token-mean" entropy bonus; verl's entropy_coeff with its loss_agg_mode).

    Args:
        logp:       [N, T] float, log pi_theta of the sampled tokens; the loss is differentiable in it.
        old_logp:   [N, T] float, log pi_theta_old (rollout policy).
        advantages: [N] (one per trajectory) or [N, T] float.
        mask:       [N, T] bool/int/float; nonzero marks a counted token. Masked entries of every
                    input are ignored, even if they hold inf or NaN.
        ref_logp:   [N, T] float or None; reference policy for the KL term.
        epsilon_low, epsilon_high: ratio clipped to [1 - epsilon_low, 1 + epsilon_high].
        dual_clip_c: None, or c > 1: for A < 0 the loss is at most -A * c (dual-clip PPO; ppo / clip_cov).
        beta:       KL coefficient; beta > 0 needs ref_logp.
        kl_estimator: "k1" | "k2" | "k3".
        loss_agg_mode: "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum" | "seq-mean-token-sum-norm".
        importance_sampling_level: "token"; "sequence": every token of a row uses the row's masked mean
                    log-ratio (GSPO; the gradient flows to every token); "sequence_token": the same value with
                    the gradient of each token's own log-prob, lr_t = sg(seq_lr) + logp_t - sg(logp_t) (verl
                    gspo; its extra clamp of lr at 10 is not applied). `LOSS_TYPE_LEVELS` says which type takes which.
        loss_type:  one of LOSS_TYPES (above); the remaining knobs are its parameters (TRL / verl defaults).
        selected:   [N, T] bool from `cov_token_selection` (required for clip_cov / kl_cov, refused otherwise).
        entropy:    [N, T] float or None, each token's entropy (differentiable); required when entropy_coef != 0.
        entropy_coef: float; loss -= entropy_coef * the aggregated entropy.
        entropy_mask: [N, T] bool/int/float or None; the tokens (with mask) the entropy bonus averages over.
        entropy_agg_mode: one of LOSS_AGG_MODES, the bonus's aggregation.
    Returns:
        PolicyLossOutput(loss, clip_fraction, kl, ratio_mean, entropy), all 0-d tensors.
    """
    validate_policy_loss_inputs(
        logp, old_logp, advantages, mask, ref_logp=ref_logp, epsilon_low=epsilon_low,
        epsilon_high=epsilon_high, dual_clip_c=dual_clip_c, beta=beta, kl_estimator=kl_estimator,
        loss_agg_mode=loss_agg_mode, importance_sampling_level=importance_sampling_level, loss_type=loss_type,
        kl_ratio_correction=kl_ratio_correction, sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg, vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos,
        vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg, clip_ratio_c_tis=clip_ratio_c_tis,
        divergence_low=divergence_low, divergence_high=divergence_high, dro_beta=dro_beta, kl_cov_coef=kl_cov_coef,
        selected=selected, entropy=entropy, entropy_coef=entropy_coef, entropy_mask=entropy_mask,
        entropy_agg_mode=entropy_agg_mode,
    )
    dt, valid, zero, lp, old, adv, m = _masked_operands(logp, old_logp, advantages, mask)
    n, t = lp.shape

    log_ratio = (lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    count = m.sum(-1)
    if importance_sampling_level == "sequence":
        seq_log_ratio = (log_ratio * m).sum(-1) / count.clamp(min=1)
        log_ratio = seq_log_ratio[:, None].expand(n, t)
    elif importance_sampling_level == "sequence_token":
        seq_log_ratio = (log_ratio * m).sum(-1) / count.clamp(min=1)
        log_ratio = seq_log_ratio.detach()[:, None] + (lp - lp.detach())
    ratio = torch.exp(log_ratio)
    ratio_metric = ratio
    eps_l, eps_h = float(epsilon_low), float(epsilon_high)
    if loss_type in ("ppo", "clip_cov"):
        pg_unclipped = -adv * ratio
        pg_clipped = -adv * ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
        pg = torch.maximum(pg_unclipped, pg_clipped)
        clipped = pg_clipped > pg_unclipped
        if dual_clip_c is not None:
            bound = -adv * dual_clip_c
            dual = (adv < 0) & (pg > bound)
            pg = torch.where(dual, bound, pg)
            clipped = clipped | dual
        if loss_type == "clip_cov":
            pg = torch.where(selected, zero, pg)
            clipped = clipped | selected
    else:
        pg, clipped, ratio_metric = _loss_type_terms(
            loss_type, lp, old, adv, m, count, log_ratio, ratio, eps_l, eps_h, float(sapo_temperature_pos),
            float(sapo_temperature_neg), (float(vespo_k_pos), float(vespo_lambda_pos), float(vespo_k_neg),
                                          float(vespo_lambda_neg)), float(clip_ratio_c_tis),
            eps_l if divergence_low is None else float(divergence_low),
            eps_h if divergence_high is None else float(divergence_high), dro_beta, float(kl_cov_coef), selected)

    per_token = pg
    kl_tok = None
    if ref_logp is not None:
        ref = torch.where(valid, ref_logp.to(dt), zero)
        kl_tok = kl_penalty(lp, ref, kl_estimator)
        if beta > 0:
            per_token = per_token + beta * (kl_tok * ratio if kl_ratio_correction else kl_tok)

    loss = _aggregate(per_token, m, count, loss_agg_mode)
    ent_valid = None
    if entropy is not None:
        ent_valid = valid if entropy_mask is None else valid & (entropy_mask != 0)
        if entropy_coef != 0:
            em = ent_valid.to(dt)
            h = torch.where(ent_valid, entropy.to(dt), zero)
            loss = loss - entropy_coef * _aggregate(h, em, em.sum(-1), entropy_agg_mode)

    with torch.no_grad():
        total = count.sum().clamp(min=1)
        clip_fraction = (clipped & valid).to(dt).sum() / total
        kl = (kl_tok * m).sum() / total if kl_tok is not None else zero.clone()
        ratio_mean = (ratio_metric * m).sum() / total
        ent = (torch.where(valid, entropy.to(dt), zero).sum() / total) if entropy is not None else zero.clone()
    return PolicyLossOutput(loss, clip_fraction, kl, ratio_mean, ent)


def _aggregate(per_token, m, count, loss_agg_mode):
    """[N, T] per-token values, [N, T] 0/1 weights and their [N] row counts -> the `loss_agg_mode` aggregate."""
    n, t = per_token.shape
    row_sum = (per_token * m).sum(-1)
    if loss_agg_mode == "token-mean":
        return row_sum.sum() / count.sum().clamp(min=1)
    if loss_agg_mode == "seq-mean-token-mean":
        return (row_sum / count.clamp(min=1)).sum() / (count > 0).sum().clamp(min=1)
    if loss_agg_mode == "seq-mean-token-sum":
        return row_sum.sum() / n
    return row_sum.sum() / t  # "seq-mean-token-sum-norm"


def _loss_type_terms(loss_type, lp, old, adv, m, count, log_ratio, ratio, eps_l, eps_h, tau_pos, tau_neg, vespo,
                     c_tis, div_l, div_h, dro_beta, kl_cov_coef, selected):
    """(per-token policy term, clipped flag, ratio for the metric) of every loss type but ppo / clip_cov;
    the formulas are those of `clipped_policy_loss`'s docstring."""
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    none = torch.zeros_like(lp, dtype=torch.bool)
    if loss_type == "cispo":
        return -ratio.clamp(max=eps_h).detach() * adv * lp, ratio > eps_h, ratio
    if loss_type == "cispo_clip":
        w = ratio.clamp(1.0 - eps_l, 1.0 + eps_h).detach()
        return -w * adv * lp, w != ratio, ratio
    if loss_type == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
        return -torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * adv, none, ratio
    if loss_type == "vespo":
        k_pos, lam_pos, k_neg, lam_neg = vespo
        with torch.no_grad():
            log_w = (log_ratio * m).sum(-1, keepdim=True).clamp(VESPO_LOG_W_MIN, LOG_RATIO_CLAMP)
            nonneg = adv >= 0
            k = torch.where(nonneg, torch.full_like(adv, k_pos), torch.full_like(adv, k_neg))
            lam = torch.where(nonneg, torch.full_like(adv, lam_pos), torch.full_like(adv, lam_neg)).clamp(min=1e-4)
            phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        return -phi * adv * lp, none, ratio
    if loss_type == "gpg":
        return -adv * lp, none, ratio
    if loss_type == "geo_mean":
        sgn = torch.sign(adv)
        lr_min = sgn * torch.minimum(sgn * log_ratio, sgn * log_ratio.clamp(-eps_l, eps_h))
        den = count + 1e-8
        row_ratio = torch.exp((lr_min * m).sum(-1) / den)
        row_adv = (adv * m).sum(-1) / den
        clipped = ((adv > 0) & (log_ratio > eps_h)) | ((adv < 0) & (log_ratio < -eps_l))
        return (-row_adv * row_ratio)[:, None].expand_as(lp), clipped, row_ratio.detach()[:, None].expand_as(lp)
    if loss_type == "kl_cov":
        return torch.where(selected, -adv * ratio + kl_cov_coef * log_ratio.abs(), -adv * ratio), selected, ratio
    if loss_type in ("dppo_tv", "dppo_kl"):
        with torch.no_grad():
            p, p_old = torch.exp(lp), torch.exp(old)
            if loss_type == "dppo_tv":
                ok_pos, ok_neg = (p - p_old) <= div_h, (p - p_old) >= -div_l
            else:
                bkl = p_old * (old - lp) + (1.0 - p_old) * torch.log((1.0 - p_old + 1e-8) / (1.0 - p + 1e-8))
                ok_pos, ok_neg = (bkl <= div_h) | (p <= p_old), (bkl <= div_l) | (p >= p_old)
            ok = torch.where(adv > 0, ok_pos, ok_neg)
            w = ratio.clamp(max=c_tis)
        pg = torch.where(ok, -adv * w * lp, zero)
        return pg, ~ok | (ratio > c_tis), ratio
    # "dro"
    return -(lp * adv - 0.5 * dro_beta * (lp - old) ** 2), none, ratio


def cov_token_selection(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                        mode: str, ratio: float = 2e-4, lb: float = 1.0, ub: float = 5.0, epsilon_low: float = 0.2,
                        epsilon_high: float = 0.2, generator: torch.Generator | None = None) -> torch.Tensor:
    """[N, T] bool, detached: the tokens the covariance methods treat (verl compute_policy_loss_clip_cov / kl_cov).

    With cov = (A - mean_m(A)) (logp - mean_m(logp)) (means over the masked tokens):
      clip_cov: of the tokens with lb < cov < ub that PPO's clip leaves alone (-A clip(r) <= -A r, r = exp(logp -
                old)), max(int(ratio * count), 1) chosen at random: the first ones of `torch.randperm(candidates,
                generator=generator)` over the candidates in row-major order (verl's draw; CPU generator).
      kl_cov:   the max(1, int(count * ratio)) tokens of largest cov (torch.topk; none when count is 0).
    Args:
        logp, old_logp: [N, T] float; advantages: [N] or [N, T] float; mask: [N, T] bool/int/float.
        mode: "clip_cov" | "kl_cov"; ratio: verl clip_cov_ratio / kl_cov_ratio; lb, ub: verl clip_cov_lb / _ub.
    """
    if mode not in COV_SELECTION_MODES:
        raise ValueError(f"mode: expected one of {COV_SELECTION_MODES}, got {mode!r}")
    validate_policy_loss_inputs(logp, old_logp, advantages, mask, ref_logp=None, epsilon_low=epsilon_low,
                                epsilon_high=epsilon_high, dual_clip_c=None, beta=0.0, kl_estimator="k3",
                                loss_agg_mode="token-mean", importance_sampling_level="token")
    _check_float("ratio", ratio, low=0.0, low_open=True)
    _check_float("lb", lb)
    _check_float("ub", ub)
    with torch.no_grad():
        _, valid, _, lp, old, adv, m = _masked_operands(logp, old_logp, advantages, mask)
        count = m.sum()
        # verl: clip_cov centres with masked_mean (sum / (count + 1e-8)), kl_cov with the plain mean of the valid ones
        den = count + 1e-8 if mode == "clip_cov" else count.clamp(min=1)
        cov = (adv - (adv * m).sum() / den) * (lp - (lp * m).sum() / den)
        flat_valid = valid.reshape(-1)
        selected = torch.zeros_like(flat_valid)
        n_valid = int(flat_valid.sum())
        if mode == "clip_cov":
            r = torch.exp(lp - old)
            by_clip = -adv * r.clamp(1.0 - epsilon_low, 1.0 + epsilon_high) > -adv * r
            cand = (valid & ~by_clip & (cov > lb) & (cov < ub)).reshape(-1).nonzero()[:, 0]
            if cand.numel() > 0:
                num = max(int(ratio * n_valid), 1)
                perm = torch.randperm(cand.numel(), generator=generator)
                selected[cand[perm[:num].to(cand.device)]] = True
        elif n_valid > 0:
            idx = flat_valid.nonzero()[:, 0]
            k = max(1, int(n_valid * ratio))
            selected[idx[torch.topk(cov.reshape(-1)[idx], k, largest=True).indices]] = True
        return selected.view(valid.shape)


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
                             compute_entropy: bool = False, **loss_kwargs) -> PolicyLossOutput:
    """`clipped_policy_loss(linear_logprobs(hidden.flatten(0, 1), ...).view(N, T), ...)` (the spec).

    Masked tokens are ignored like every other masked input: only the rows where `mask` is set are
    fed to the head (their targets may be padding ids, their hidden rows garbage); logp is 0 elsewhere.
    The entropy of each token's distribution comes from the same logits when entropy_coef != 0 or
    compute_entropy (then the output's `entropy` metric is set); `entropy` itself is not an argument here.
    """
    if loss_kwargs.get("entropy") is not None:
        raise ValueError("entropy: the fused head computes the entropy itself; pass entropy_coef only")
    n, t, h = hidden.shape
    valid = (mask != 0).reshape(n * t)
    with_entropy = compute_entropy or loss_kwargs.get("entropy_coef", 0.0) != 0
    out = linear_logprobs(hidden.reshape(n * t, h)[valid], weight, targets.reshape(n * t)[valid],
                          bias=bias, temperature=temperature, return_entropy=with_entropy)
    logp_valid = out[0] if with_entropy else out
    logp = torch.zeros(n * t, dtype=logp_valid.dtype, device=hidden.device).masked_scatter(valid, logp_valid)
    if with_entropy:
        ent = torch.zeros(n * t, dtype=out[1].dtype, device=hidden.device).masked_scatter(valid, out[1])
        loss_kwargs["entropy"] = ent.view(n, t)
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
