"""Group-normalised, pair-weighted advantages: Triton kernels, launchers and the public front.

Algorithm (no host synchronisation besides the NaN check of the contract):
  1. segment the rewards by group id with one stable sort on the device:
     `perm` orders the rewards by group, `seg_start[k]` is where group k starts in that
     order (unused slots hold N, so group k ends at `seg_start[k + 1]`);
  2. one kernel launch: each program owns SEGS consecutive groups and walks them as a
     [SEGS, BLOCK] tile, gathering rewards through `perm`. Three passes over the group
     (sum -> mean, squared deviations -> unbiased std, write) keep the variance exact in
     fp32 whatever the reward offset; any group size works, the loop just runs longer.
     The estimator (grpo, rloo, opo, grpo_passk, the centring of reinforce_plus_plus_baseline) is
     a constexpr of that kernel: all are group-local. grpo_passk finds each group's first maximum
     and the largest other reward in the same passes; reinforce_plus_plus_baseline's batch-wide
     token whitening follows on [N] (the advantage is constant along a row: token counts weight it).
Bytes: rewards (4 B), perm (8 B), weights (4 B) and the output (4 B) per element, plus
the sort. Reward tensors are small in RL (N = pairs x group size); this op is about
exactness and no host sync, not bandwidth.

Multi-reward (`multi_reward_advantages`): the same segmentation, one launch normalising each of
the K reward columns in its groups ([N, K] out), then the weighted sum and the batch step on [N].
REINFORCE++ (`token_returns_advantages`): one program per row scans its tokens right to left in
tiles (an associative scan of the affine maps G -> r + gamma G, the running return carried between
tiles) and writes the returns with the row's count / mean / M2; the rows' stats merge on [N]
(Chan et al.) into verl's masked_whiten mean and scale; a second launch writes the advantages.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from . import reference as ref
from ._backend import use_triton
from ._checks import FLOAT_DTYPES
from ._launch import KERNEL_FLOAT_DTYPES, KernelLaunch, unique

_SCALE_CODE = {"group": 0, "batch": 1, "none": 2}


@triton.jit
def _group_advantages_kernel(
    rewards_ptr, weights_ptr, lengths_ptr, perm_ptr, seg_start_ptr, batch_std_ptr, out_ptr,
    n_slots, eps,
    SCALE: tl.constexpr, HAS_WEIGHTS: tl.constexpr, ESTIMATOR: tl.constexpr, SEGS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    seg = pid * SEGS + tl.arange(0, SEGS).to(tl.int64)
    in_range = seg < n_slots
    start = tl.load(seg_start_ptr + seg, mask=in_range, other=0)
    end = tl.load(seg_start_ptr + seg + 1, mask=in_range, other=0)
    length = end - start
    max_len = tl.max(length, axis=0)
    cols = tl.arange(0, BLOCK).to(tl.int64)

    # pass 1: group means (grpo_passk: also the group's maximum and the first position holding it)
    total = tl.zeros([SEGS], dtype=tl.float32)
    if ESTIMATOR == 3:
        r_max = tl.full([SEGS], float("-inf"), dtype=tl.float32)
        best = tl.zeros([SEGS], dtype=tl.int64)
    for off in range(0, max_len, BLOCK):
        valid = (off + cols)[None, :] < length[:, None]
        idx = tl.load(perm_ptr + start[:, None] + off + cols[None, :], mask=valid, other=0)
        r = tl.load(rewards_ptr + idx, mask=valid, other=0.0).to(tl.float32)
        total += tl.sum(r, axis=1)
        if ESTIMATOR == 3:
            r_in = tl.where(valid, r, float("-inf"))
            chunk_max = tl.max(r_in, axis=1)
            at = tl.min(tl.where(r_in == chunk_max[:, None], off + cols[None, :], 2**62), axis=1)
            later = chunk_max > r_max  # strict: an earlier chunk keeps a tie (first position)
            best = tl.where(later, at, best)
            r_max = tl.where(later, chunk_max, r_max)
    count = length.to(tl.float32)
    mean = total / tl.maximum(count, 1.0)

    # pass 2: unbiased std (group scale of grpo / grpo_passk), opo's length-weighted shift, passk's runner-up
    if ESTIMATOR == 0 or ESTIMATOR == 3:
        if SCALE == 0:
            sq = tl.zeros([SEGS], dtype=tl.float32)
            for off in range(0, max_len, BLOCK):
                valid = (off + cols)[None, :] < length[:, None]
                idx = tl.load(perm_ptr + start[:, None] + off + cols[None, :], mask=valid, other=0)
                r = tl.load(rewards_ptr + idx, mask=valid, other=0.0).to(tl.float32)
                d = tl.where(valid, r - mean[:, None], 0.0)
                sq += tl.sum(d * d, axis=1)
            inv = 1.0 / (tl.sqrt(sq / tl.maximum(count - 1.0, 1.0)) + eps)
            inv = tl.where(count > 1.0, inv, 0.0)  # a group of one has no spread: advantage 0
        elif SCALE == 1:
            inv = tl.zeros([SEGS], dtype=tl.float32) + 1.0 / (tl.load(batch_std_ptr) + eps)
        else:
            inv = tl.zeros([SEGS], dtype=tl.float32) + 1.0
    if ESTIMATOR == 2:
        # [SEGS, BLOCK] accumulators reduced after the loop: Triton 3.6's thread-locality pass asserts on a
        # per-iteration tl.sum whose loop result is used more than once (len_total is)
        len_acc = tl.zeros([SEGS, BLOCK], dtype=tl.float32)
        dev_acc = tl.zeros([SEGS, BLOCK], dtype=tl.float32)
        for off in range(0, max_len, BLOCK):
            valid = (off + cols)[None, :] < length[:, None]
            idx = tl.load(perm_ptr + start[:, None] + off + cols[None, :], mask=valid, other=0)
            r = tl.load(rewards_ptr + idx, mask=valid, other=0.0).to(tl.float32)
            ln = tl.load(lengths_ptr + idx, mask=valid, other=0.0).to(tl.float32)
            len_acc += ln
            dev_acc += tl.where(valid, ln * (r - mean[:, None]), 0.0)
        len_total = tl.sum(len_acc, axis=1)
        len_dev = tl.sum(dev_acc, axis=1)
        # baseline 0 for a group of one or one without tokens (verl's lone-response rule)
        keep_r = (count < 2.0) | (len_total == 0.0)
        shift = len_dev / tl.where(len_total > 0.0, len_total, 1.0)
    if ESTIMATOR == 3:
        r_2nd = tl.full([SEGS], float("-inf"), dtype=tl.float32)
        for off in range(0, max_len, BLOCK):
            valid = (off + cols)[None, :] < length[:, None]
            idx = tl.load(perm_ptr + start[:, None] + off + cols[None, :], mask=valid, other=0)
            r = tl.load(rewards_ptr + idx, mask=valid, other=0.0).to(tl.float32)
            others = valid & ((off + cols)[None, :] != best[:, None])
            r_2nd = tl.maximum(r_2nd, tl.max(tl.where(others, r, float("-inf")), axis=1))
        r_max = tl.where(count > 0.0, r_max, 0.0)  # empty slots: no -inf - -inf
        gap = (r_max - tl.where(count > 1.0, r_2nd, r_max)) * inv

    # pass 3: write the advantage (times w) back in the caller's order
    for off in range(0, max_len, BLOCK):
        valid = (off + cols)[None, :] < length[:, None]
        idx = tl.load(perm_ptr + start[:, None] + off + cols[None, :], mask=valid, other=0)
        r = tl.load(rewards_ptr + idx, mask=valid, other=0.0).to(tl.float32)
        if ESTIMATOR == 0:  # grpo: (r - mean) * inv
            adv = (r - mean[:, None]) * inv[:, None]
        elif ESTIMATOR == 1:  # rloo: n / (n - 1) * (r - mean), 0 for a group of one
            adv = (r - mean[:, None]) * tl.where(count > 1.0, count / tl.maximum(count - 1.0, 1.0), 0.0)[:, None]
        elif ESTIMATOR == 2:  # opo: (r - mean) - sum l (r - mean) / sum l  (= r - sum l r / sum l)
            adv = tl.where(keep_r[:, None], r, (r - mean[:, None]) - shift[:, None])
        elif ESTIMATOR == 3:  # grpo_passk: the gap at the group's first maximum, 0 elsewhere
            adv = tl.where((off + cols)[None, :] == best[:, None], gap[:, None], 0.0)
        else:  # reinforce_plus_plus_baseline before the whitening: r - mean, r for a group of one
            adv = r - tl.where(count > 1.0, mean, 0.0)[:, None]
        if HAS_WEIGHTS:
            adv *= tl.load(weights_ptr + idx, mask=valid, other=0.0).to(tl.float32)
        tl.store(out_ptr + idx, adv, mask=valid)


@triton.jit
def _pair_weights_kernel(sim_ptr, aligned_ptr, out_ptr, n, BLOCK: tl.constexpr, SQRT: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    s = tl.load(sim_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    aligned = tl.load(aligned_ptr + offs, mask=inb, other=0) != 0
    s = tl.where(s == s, s, 0.0)  # NaN similarity of an aligned pair is irrelevant; keep it out of sqrt
    s = tl.minimum(tl.maximum(s, 0.0), 1.0)
    if SQRT:
        s = tl.sqrt(s)
    w = tl.where(aligned, 1.0, s)
    tl.store(out_ptr + offs, w, mask=inb)


@triton.jit
def _multi_reward_kernel(
    rewards_ptr, perm_ptr, seg_start_ptr, out_ptr,
    n_slots, n_cols, eps,
    GDPO: tl.constexpr, DIVIDE: tl.constexpr, SEGS: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[i, k] = a_k of `reference.multi_reward_advantages` for every column k of rewards [N, K] (row-major)."""
    pid = tl.program_id(0).to(tl.int64)
    seg = pid * SEGS + tl.arange(0, SEGS).to(tl.int64)
    in_range = seg < n_slots
    start = tl.load(seg_start_ptr + seg, mask=in_range, other=0)
    end = tl.load(seg_start_ptr + seg + 1, mask=in_range, other=0)
    length = end - start
    max_len = tl.max(length, axis=0)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    for k in range(0, n_cols):
        # pass 1: scored (non-NaN) count and sum of column k per group
        total = tl.zeros([SEGS], dtype=tl.float32)
        count = tl.zeros([SEGS], dtype=tl.float32)
        for off in range(0, max_len, BLOCK):
            valid = (off + cols)[None, :] < length[:, None]
            idx = tl.load(perm_ptr + start[:, None] + off + cols[None, :], mask=valid, other=0)
            x = tl.load(rewards_ptr + idx * n_cols + k, mask=valid, other=0.0)
            scored = valid & (x == x)
            total += tl.sum(tl.where(scored, x, 0.0), axis=1)
            count += tl.sum(scored.to(tl.float32), axis=1)
        mean = total / tl.maximum(count, 1.0)
        # pass 2: unbiased std over the scored entries
        sq = tl.zeros([SEGS], dtype=tl.float32)
        for off in range(0, max_len, BLOCK):
            valid = (off + cols)[None, :] < length[:, None]
            idx = tl.load(perm_ptr + start[:, None] + off + cols[None, :], mask=valid, other=0)
            x = tl.load(rewards_ptr + idx * n_cols + k, mask=valid, other=0.0)
            d = tl.where(valid & (x == x), x - mean[:, None], 0.0)
            sq += tl.sum(d * d, axis=1)
        std = tl.sqrt(sq / tl.maximum(count - 1.0, 1.0))
        if GDPO:  # verl's GRPO: a group of one has mean 0 and std 1
            mean = tl.where(count == 1.0, 0.0, mean)
            std = tl.where(count == 1.0, 1.0, std)
        if DIVIDE:
            inv = 1.0 / (std + eps)
        else:
            inv = tl.zeros([SEGS], dtype=tl.float32) + 1.0
        if not GDPO:  # TRL: a column-group with fewer than 2 scored entries contributes 0
            inv = tl.where(count > 1.0, inv, 0.0)
        # pass 3: write a_k (0 where the entry is NaN)
        for off in range(0, max_len, BLOCK):
            valid = (off + cols)[None, :] < length[:, None]
            idx = tl.load(perm_ptr + start[:, None] + off + cols[None, :], mask=valid, other=0)
            x = tl.load(rewards_ptr + idx * n_cols + k, mask=valid, other=0.0)
            a = tl.where(x == x, (x - mean[:, None]) * inv[:, None], 0.0)
            tl.store(out_ptr + idx * n_cols + k, a, mask=valid)


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # maps x -> a x + b; (a1, b1) acts first, (a2, b2) second: their composition
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _token_returns_kernel(
    rewards_ptr, mask_ptr, returns_ptr, stats_ptr,
    n_tokens, gamma,
    BLOCK_T: tl.constexpr,
):
    """One row per program, right to left in tiles of BLOCK_T: G = r_t + gamma G at unmasked tokens, carried
    through masked ones (a scan of affine maps within a tile, the running G between tiles); writes R and the
    row's (token count, mean of R, sum of squared deviations) merged tile by tile (Chan et al.)."""
    row = tl.program_id(0).to(tl.int64)
    base = row * n_tokens
    steps = tl.arange(0, BLOCK_T)
    carry = 0.0
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for first in range(0, n_tokens, BLOCK_T):
        j = first + steps  # steps back from the row's last token
        t = n_tokens - 1 - j
        inb = j < n_tokens
        m = tl.load(mask_ptr + base + t, mask=inb, other=0) != 0
        r = tl.load(rewards_ptr + base + t, mask=m, other=0.0).to(tl.float32)
        a_scan, b_scan = tl.associative_scan((tl.where(m, gamma, 1.0), r), 0, _affine_combine)
        g = a_scan * carry + b_scan
        ret = tl.where(m, g, 0.0)
        tl.store(returns_ptr + base + t, ret, mask=inb)
        carry = tl.sum(tl.where(steps == BLOCK_T - 1, g, 0.0), axis=0)
        c_tile = tl.sum(m.to(tl.float32), axis=0)
        mean_tile = tl.sum(ret, axis=0) / tl.maximum(c_tile, 1.0)
        d = tl.where(m, ret - mean_tile, 0.0)
        c_new = count + c_tile
        delta = mean_tile - mean
        frac = c_tile / tl.maximum(c_new, 1.0)
        m2 += tl.sum(d * d, axis=0) + delta * delta * count * frac
        mean += delta * frac
        count = c_new
    tl.store(stats_ptr + row * 3, count)
    tl.store(stats_ptr + row * 3 + 1, mean)
    tl.store(stats_ptr + row * 3 + 2, m2)


@triton.jit
def _whiten_apply_kernel(
    returns_ptr, mask_ptr, mu_rstd_ptr, weights_ptr, out_ptr,
    n_tokens,
    HAS_WEIGHTS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """out = (R - mu) * rstd on unmasked tokens, 0 elsewhere, times the row's weight."""
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    inb = t < n_tokens
    offs = row * n_tokens + t
    m = tl.load(mask_ptr + offs, mask=inb, other=0) != 0
    ret = tl.load(returns_ptr + offs, mask=inb, other=0.0)
    adv = tl.where(m, (ret - tl.load(mu_rstd_ptr)) * tl.load(mu_rstd_ptr + 1), 0.0)
    if HAS_WEIGHTS:
        adv *= tl.load(weights_ptr + row).to(tl.float32)
    tl.store(out_ptr + offs, adv, mask=inb)


def segment_groups(group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort-based segmentation without host sync.

    Returns:
        perm:      [N] int64, indices of the rewards ordered by group id (stable).
        seg_start: [N + 1] int64, seg_start[k] = first position of group k in that order;
                   slots past the last group hold N, so group k spans [seg_start[k], seg_start[k+1]).
    """
    n = group_ids.numel()
    sorted_ids, perm = torch.sort(group_ids.to(torch.int64), stable=True)
    is_start = torch.ones(n, dtype=torch.bool, device=group_ids.device)
    is_start[1:] = sorted_ids[1:] != sorted_ids[:-1]
    seg_of_pos = torch.cumsum(is_start, 0) - 1
    seg_start = torch.full((n + 1,), n, dtype=torch.int64, device=group_ids.device)
    seg_start.scatter_reduce_(0, seg_of_pos, torch.arange(n, device=group_ids.device), reduce="amin")
    return perm, seg_start


#: Groups per program and rewards per group tile of `_group_advantages_kernel`.
SEGS, BLOCK = 32, 16
PAIR_BLOCK = 1024


_ESTIMATOR_CODE = {"grpo": 0, "rloo": 1, "opo": 2, "grpo_passk": 3, "reinforce_plus_plus_baseline": 4}
#: Estimators without a std scale (they ignore `scale`; launched with SCALE=none, one variant each).
_UNSCALED = ("rloo", "opo", "reinforce_plus_plus_baseline")
#: Tokens per tile of the reinforce++ kernels.
RETURNS_BLOCK = 1024


def _advantages_launch(rewards, group_ids, weights, eps, scale, estimator="grpo",
                       lengths=None) -> tuple[KernelLaunch, torch.Tensor]:
    """Reward tensors are [N]-sized, so they are read as float32 whatever the caller's dtype: one
    compiled variant per knob instead of one per dtype pair. reinforce_plus_plus_baseline's kernel writes the
    group-centred rewards; its whitening and weights follow on [N] (`group_advantages_triton`)."""
    n = rewards.numel()
    out = torch.empty(n, dtype=torch.float32, device=rewards.device)
    rewards = rewards.to(torch.float32).contiguous()
    perm, seg_start = segment_groups(group_ids)
    if estimator in _UNSCALED:
        scale = "none"
    if estimator == "reinforce_plus_plus_baseline":
        weights = None
    batch_std = (rewards.std() if n > 1 else rewards.new_zeros(())).reshape(1)
    w = weights.to(torch.float32).contiguous() if weights is not None else rewards
    ln = lengths.to(torch.float32).contiguous() if estimator == "opo" else rewards
    launch = KernelLaunch.build(
        _group_advantages_kernel, (triton.cdiv(n, SEGS),),
        (rewards, w, ln, perm, seg_start, batch_std, out, n, float(eps)),
        {"SCALE": _SCALE_CODE[scale], "HAS_WEIGHTS": weights is not None, "ESTIMATOR": _ESTIMATOR_CODE[estimator],
         "SEGS": SEGS, "BLOCK": BLOCK})
    return launch, out


def group_advantages_triton(rewards, group_ids, weights=None, eps=1e-6, scale="group", estimator="grpo",
                            lengths=None) -> torch.Tensor:
    """Launcher: one kernel launch after the device-side segmentation. Returns [N] float32."""
    launch, out = _advantages_launch(rewards, group_ids, weights, eps, scale, estimator, lengths)
    if rewards.numel():
        launch()
        if estimator == "reinforce_plus_plus_baseline":  # batch-wide token whitening on [N], in float64
            out = ref.whiten_rows(out.double(), lengths.double()).float()
            if weights is not None:
                out = out * weights.to(torch.float32)
    return out


def _multi_reward_launch(rewards, group_ids, eps, scale, mode) -> tuple[KernelLaunch, torch.Tensor]:
    """rewards [N, K] read as float32 (NaN kept: TRL's unscored entries)."""
    n, k = rewards.shape
    out = torch.empty((n, k), dtype=torch.float32, device=rewards.device)
    rewards = rewards.to(torch.float32).contiguous()
    perm, seg_start = segment_groups(group_ids)
    launch = KernelLaunch.build(
        _multi_reward_kernel, (triton.cdiv(n, SEGS),), (rewards, perm, seg_start, out, n, k, float(eps)),
        {"GDPO": mode == "gdpo", "DIVIDE": scale == "group", "SEGS": SEGS, "BLOCK": BLOCK})
    return launch, out


def multi_reward_advantages_triton(rewards, group_ids, reward_weights, mode="normalize_then_sum", eps=1e-4,
                                   scale="group", lengths=None, weights=None) -> torch.Tensor:
    """One launch for the K per-group normalisations, then the weighted sum and the batch step on [N] (float64)."""
    launch, per_reward = _multi_reward_launch(rewards, group_ids, eps, scale, mode)
    if rewards.numel():
        launch()
    return ref._combine_rewards(per_reward.double(), rewards, reward_weights, float(eps), mode,
                                lengths, weights).float()


def _mask_bytes(mask: torch.Tensor) -> torch.Tensor:
    return (mask if mask.dtype == torch.bool else mask != 0).contiguous().view(torch.uint8)


def _token_returns_launch(token_rewards, mask_u8, gamma) -> tuple[KernelLaunch, torch.Tensor, torch.Tensor]:
    n, t = token_rewards.shape
    if token_rewards.dtype not in KERNEL_FLOAT_DTYPES:
        token_rewards = token_rewards.to(torch.float32)
    returns = torch.empty((n, t), dtype=torch.float32, device=token_rewards.device)
    stats = torch.empty((n, 3), dtype=torch.float32, device=token_rewards.device)
    launch = KernelLaunch.build(_token_returns_kernel, (n,),
                                (token_rewards.contiguous(), mask_u8, returns, stats, t, float(gamma)),
                                {"BLOCK_T": RETURNS_BLOCK}, num_warps=4)
    return launch, returns, stats


def _whiten_apply_launch(returns, mask_u8, mu_rstd, weights) -> tuple[KernelLaunch, torch.Tensor]:
    n, t = returns.shape
    out = torch.empty_like(returns)
    w = weights.contiguous() if weights is not None else mu_rstd
    launch = KernelLaunch.build(_whiten_apply_kernel, (n, triton.cdiv(t, RETURNS_BLOCK)),
                                (returns, mask_u8, mu_rstd, w, out, t),
                                {"HAS_WEIGHTS": weights is not None, "BLOCK_T": RETURNS_BLOCK}, num_warps=4)
    return launch, out


def whiten_stats(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    """[2] (mu, rstd) of verl's masked_whiten over all tokens from per-row token counts, means of R and sums of
    squared deviations from the row mean ([N] each), merged in float64 (Chan et al.; exact: a row's sum of
    (R - a)^2 is `m2 + count * (mean - a)^2` for any a)."""
    count, mean, m2 = count.double(), mean.double(), m2.double()
    total = count.sum()
    mu = (count * mean).sum() / (total + ref.WHITEN_EPS)
    var = (m2 + count * (mean - mu) ** 2).sum() / (total + ref.WHITEN_EPS) * (total / (total - 1))
    return torch.stack([mu, torch.rsqrt(var + ref.WHITEN_EPS)])


def token_returns_advantages_triton(token_rewards, mask, gamma=1.0, weights=None):
    """Two launches: returns + per-row stats, then the whitening; (advantages, returns), [N, T] float32 each."""
    mask_u8 = _mask_bytes(mask)
    launch, returns, stats = _token_returns_launch(token_rewards, mask_u8, gamma)
    if token_rewards.numel():
        launch()
    mu_rstd = whiten_stats(stats[:, 0], stats[:, 1], stats[:, 2]).to(torch.float32)
    w = weights.to(torch.float32) if weights is not None else None
    apply, out = _whiten_apply_launch(returns, mask_u8, mu_rstd, w)
    if token_rewards.numel():
        apply()
    return out, returns


def _pair_weights_launch(similarity, aligned, weighting: str = "sqrt") -> tuple[KernelLaunch, torch.Tensor]:
    n = similarity.numel()
    out = torch.empty(n, dtype=torch.float32, device=similarity.device)
    launch = KernelLaunch.build(
        _pair_weights_kernel, (triton.cdiv(n, PAIR_BLOCK),),
        (similarity.to(torch.float32).contiguous(), aligned.contiguous().view(torch.uint8), out, n),
        {"BLOCK": PAIR_BLOCK, "SQRT": weighting == "sqrt"})
    return launch, out


def pair_weights_triton(similarity, aligned, weighting: str = "sqrt") -> torch.Tensor:
    launch, out = _pair_weights_launch(similarity, aligned, weighting)
    if similarity.numel():
        launch()
    return out


def kernel_variants() -> list[KernelLaunch]:
    """Every distinct launch of the kernels: each accepted dtype of rewards, weights and similarity, every
    estimator and scale, with and without weights, both multi-reward modes with and without the std division,
    the reinforce++ kernels for each token-reward dtype, with and without weights (built on meta tensors)."""
    launches = []
    n = 8
    ids = torch.empty(n, dtype=torch.int64, device="meta")
    for estimator, r_dt, w_dt, scale, weighted in itertools.product(
            _ESTIMATOR_CODE, FLOAT_DTYPES, FLOAT_DTYPES, _SCALE_CODE, (False, True)):
        rewards = torch.empty(n, dtype=r_dt, device="meta")
        weights = torch.empty(n, dtype=w_dt, device="meta") if weighted else None
        lengths = torch.empty(n, dtype=torch.int64, device="meta")
        launches.append(_advantages_launch(rewards, ids, weights, 1e-6, scale, estimator, lengths)[0])
    for r_dt, mode, scale in itertools.product(FLOAT_DTYPES, ref.MULTI_REWARD_MODES, ("group", "none")):
        launches.append(_multi_reward_launch(torch.empty(n, 3, dtype=r_dt, device="meta"), ids, 1e-4, scale,
                                             mode)[0])
    mask_u8 = torch.empty(n, 40, dtype=torch.uint8, device="meta")
    for r_dt in FLOAT_DTYPES:
        launches.append(_token_returns_launch(torch.empty(n, 40, dtype=r_dt, device="meta"), mask_u8, 0.99)[0])
    returns = torch.empty(n, 40, dtype=torch.float32, device="meta")
    mu_rstd = torch.empty(2, dtype=torch.float32, device="meta")
    for weighted in (False, True):
        weights = torch.empty(n, dtype=torch.float32, device="meta") if weighted else None
        launches.append(_whiten_apply_launch(returns, mask_u8, mu_rstd, weights)[0])
    for s_dt, weighting in itertools.product(FLOAT_DTYPES, ref.PAIR_WEIGHTINGS):
        launches.append(_pair_weights_launch(torch.empty(n, dtype=s_dt, device="meta"),
                                             torch.empty(n, dtype=torch.bool, device="meta"), weighting)[0])
    return unique(launches)


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, weights: torch.Tensor | None = None,
                     eps: float = 1e-6, scale: str = "group", estimator: str = "grpo",
                     lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Group-baselined advantages (GRPO by default; rloo, opo, grpo_passk, reinforce_plus_plus_baseline as in
    verl 0.9.1), optionally multiplied by per-sample (pair) weights at the end.

    Default `A_i = (r_i - mean_g) / (std_g + eps) * w_i` with the unbiased std; 0 for a group of one. The other
    estimators, their sources and corner cases: `reference.group_advantages`.

    Args:
        rewards:   [N] float32/bf16/fp16. One scalar reward per trajectory.
        group_ids: [N] int. Same id = same group (one task of one pair); any order, any group sizes.
        weights:   [N] float or None, e.g. `pair_weights(...)[pair_of_sample]`.
        eps:       added to the std.
        scale:     "group" (GRPO), "batch" (divide by the std of all N rewards), "none" (Dr.GRPO); used by grpo
                   and grpo_passk (the others have no std scale and ignore it, as verl and TRL do).
        estimator: one of `reference.ADVANTAGE_ESTIMATORS` but "reinforce_plus_plus" (`token_returns_advantages`).
        lengths:   [N] int/float response lengths in tokens: required by opo and reinforce_plus_plus_baseline.
    Returns:
        [N] float32 advantages (float64 on the reference path for float64 rewards).
    Raises:
        ValueError for a NaN/inf reward (naming its group) or a bad argument.

    Example:
        >>> r = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.5])
        >>> group_advantages(r, torch.tensor([0, 0, 0, 1, 1]))
        tensor([ 0.5774, -1.1547,  0.5774,  0.0000,  0.0000])
    """
    ref.validate_advantage_inputs(rewards, group_ids, weights, eps, scale, estimator, lengths)
    if use_triton(rewards):
        return group_advantages_triton(rewards, group_ids, weights, float(eps), scale, estimator, lengths)
    return ref._group_advantages_impl(rewards, group_ids, weights, float(eps), scale, estimator, lengths)


def multi_reward_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, reward_weights, *,
                            mode: str = "normalize_then_sum", eps: float = 1e-4, scale: str = "group",
                            lengths: torch.Tensor | None = None,
                            weights: torch.Tensor | None = None) -> torch.Tensor:
    """Decoupled multi-reward advantages: each reward column normalised in its group, the weighted sum
    normalised over the batch (TRL 1.16 multi_objective_aggregation="normalize_then_sum", or verl 0.9.1 gdpo).

    Formulas, NaN handling and corner cases: `reference.multi_reward_advantages`.

    Args:
        rewards:        [N, K] float, one column per reward function (NaN = not scored, normalize_then_sum only).
        group_ids:      [N] int, any order.
        reward_weights: [K] float tensor or a list of K numbers.
        mode:           "normalize_then_sum" (TRL) | "gdpo" (verl).
        eps:            added to each std (TRL 1e-4; pass verl's epsilon, 1e-6, for gdpo parity).
        scale:          "group" | "none": divide each column's centred reward by its group std or not.
        lengths:        [N] token counts for gdpo's token-weighted whitening (None: one per sample).
        weights:        [N] float or None: multiplies the result (PairGRPO).
    Returns:
        [N] float32 (float64 on the reference path for float64 rewards).
    """
    reward_weights = ref.as_reward_weights(reward_weights, rewards)
    ref.validate_multi_reward_inputs(rewards, group_ids, reward_weights, mode, eps, scale, lengths, weights)
    if use_triton(rewards):
        return multi_reward_advantages_triton(rewards, group_ids, reward_weights, mode, float(eps), scale, lengths,
                                              weights)
    return ref._multi_reward_impl(rewards, group_ids, reward_weights, mode, float(eps), scale, lengths, weights)


def token_returns_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, *,
                             weights: torch.Tensor | None = None, return_returns: bool = False):
    """REINFORCE++ (verl 0.9.1 reinforce_plus_plus): discounted returns of token rewards, whitened over the
    batch's unmasked tokens (verl masked_whiten), times a per-row weight. Formulas: `reference.
    token_returns_advantages`.

    Args:
        token_rewards:  [N, T] float.
        mask:           [N, T] bool/int/float, nonzero = a response token.
        gamma:          discount in [0, 1].
        weights:        [N] float or None.
        return_returns: also return the returns R [N, T] (verl's second output).
    Returns:
        [N, T] float32 advantages (float64 on the reference path for float64 input), or (advantages, returns).
    """
    ref.validate_token_returns_inputs(token_rewards, mask, gamma, weights)
    if use_triton(token_rewards):
        adv, returns = token_returns_advantages_triton(token_rewards, mask, float(gamma), weights)
    else:
        adv, returns = ref._token_returns_impl(token_rewards, mask, float(gamma), weights)
    return (adv, returns) if return_returns else adv


def pair_weights(similarity: torch.Tensor, aligned: torch.Tensor, weighting: str = "sqrt") -> torch.Tensor:
    """PairGRPO pair weights: 1 for aligned pairs, `sqrt(clamp(s, 0, 1))` for retrieved ones (PairUni), or
    `clamp(s, 0, 1)` with weighting="linear" (the paper's weighting ablation).

    Args:
        similarity: [P] float, similarity of the pair's two halves (ignored where aligned).
        aligned:    [P] bool.
        weighting:  "sqrt" | "linear" (`reference.PAIR_WEIGHTINGS`).
    Returns:
        [P] float32 weights.
    """
    ref.validate_pair_weight_inputs(similarity, aligned, weighting)
    if use_triton(similarity):
        return pair_weights_triton(similarity, aligned, weighting)
    return ref._pair_weights_impl(similarity, aligned, weighting)
