"""Group-normalised, pair-weighted advantages: Triton kernels, launchers and the public front.

Algorithm (no host synchronisation besides the NaN check of the contract):
  1. segment the rewards by group id with one stable sort on the device:
     `perm` orders the rewards by group, `seg_start[k]` is where group k starts in that
     order (unused slots hold N, so group k ends at `seg_start[k + 1]`);
  2. one kernel launch: each program owns SEGS consecutive groups and walks them as a
     [SEGS, BLOCK] tile, gathering rewards through `perm`. Three passes over the group
     (sum -> mean, squared deviations -> unbiased std, write) keep the variance exact in
     fp32 whatever the reward offset; any group size works, the loop just runs longer.
Bytes: rewards (4 B), perm (8 B), weights (4 B) and the output (4 B) per element, plus
the sort. Reward tensors are small in RL (N = pairs x group size); this op is about
exactness and no host sync, not bandwidth.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from . import reference as ref
from ._backend import use_triton
from ._checks import FLOAT_DTYPES
from ._launch import KernelLaunch, unique

_SCALE_CODE = {"group": 0, "batch": 1, "none": 2}


@triton.jit
def _group_advantages_kernel(
    rewards_ptr, weights_ptr, perm_ptr, seg_start_ptr, batch_std_ptr, out_ptr,
    n_slots, eps,
    SCALE: tl.constexpr, HAS_WEIGHTS: tl.constexpr, SEGS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    seg = pid * SEGS + tl.arange(0, SEGS).to(tl.int64)
    in_range = seg < n_slots
    start = tl.load(seg_start_ptr + seg, mask=in_range, other=0)
    end = tl.load(seg_start_ptr + seg + 1, mask=in_range, other=0)
    length = end - start
    max_len = tl.max(length, axis=0)
    cols = tl.arange(0, BLOCK).to(tl.int64)

    # pass 1: group means
    total = tl.zeros([SEGS], dtype=tl.float32)
    for off in range(0, max_len, BLOCK):
        valid = (off + cols)[None, :] < length[:, None]
        idx = tl.load(perm_ptr + start[:, None] + off + cols[None, :], mask=valid, other=0)
        r = tl.load(rewards_ptr + idx, mask=valid, other=0.0).to(tl.float32)
        total += tl.sum(r, axis=1)
    count = length.to(tl.float32)
    mean = total / tl.maximum(count, 1.0)

    # pass 2: unbiased std (group scale only); batch scale reads the precomputed batch std
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

    # pass 3: write (r - mean) * inv * w back in the caller's order
    for off in range(0, max_len, BLOCK):
        valid = (off + cols)[None, :] < length[:, None]
        idx = tl.load(perm_ptr + start[:, None] + off + cols[None, :], mask=valid, other=0)
        r = tl.load(rewards_ptr + idx, mask=valid, other=0.0).to(tl.float32)
        adv = (r - mean[:, None]) * inv[:, None]
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


def _advantages_launch(rewards, group_ids, weights, eps, scale) -> tuple[KernelLaunch, torch.Tensor]:
    """Reward tensors are [N]-sized, so they are read as float32 whatever the caller's dtype: one
    compiled variant per knob instead of one per dtype pair."""
    n = rewards.numel()
    out = torch.empty(n, dtype=torch.float32, device=rewards.device)
    rewards = rewards.to(torch.float32).contiguous()
    perm, seg_start = segment_groups(group_ids)
    batch_std = (rewards.std() if n > 1 else rewards.new_zeros(())).reshape(1)
    w = weights.to(torch.float32).contiguous() if weights is not None else rewards
    launch = KernelLaunch.build(
        _group_advantages_kernel, (triton.cdiv(n, SEGS),),
        (rewards, w, perm, seg_start, batch_std, out, n, float(eps)),
        {"SCALE": _SCALE_CODE[scale], "HAS_WEIGHTS": weights is not None, "SEGS": SEGS, "BLOCK": BLOCK})
    return launch, out


def group_advantages_triton(rewards, group_ids, weights=None, eps=1e-6, scale="group") -> torch.Tensor:
    """Launcher: one kernel launch after the device-side segmentation. Returns [N] float32."""
    launch, out = _advantages_launch(rewards, group_ids, weights, eps, scale)
    if rewards.numel():
        launch()
    return out


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
    """Every distinct launch of the two kernels: each accepted dtype of rewards, weights and
    similarity, every scale, with and without weights (built on meta tensors)."""
    launches = []
    n = 8
    for r_dt, w_dt, scale, weighted in itertools.product(FLOAT_DTYPES, FLOAT_DTYPES, _SCALE_CODE, (False, True)):
        rewards = torch.empty(n, dtype=r_dt, device="meta")
        weights = torch.empty(n, dtype=w_dt, device="meta") if weighted else None
        launches.append(_advantages_launch(rewards, torch.empty(n, dtype=torch.int64, device="meta"), weights,
                                           1e-6, scale)[0])
    for s_dt, weighting in itertools.product(FLOAT_DTYPES, ref.PAIR_WEIGHTINGS):
        launches.append(_pair_weights_launch(torch.empty(n, dtype=s_dt, device="meta"),
                                             torch.empty(n, dtype=torch.bool, device="meta"), weighting)[0])
    return unique(launches)


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, weights: torch.Tensor | None = None,
                     eps: float = 1e-6, scale: str = "group") -> torch.Tensor:
    """Group-normalised (GRPO) advantages, optionally multiplied by per-sample (pair) weights.

    `A_i = (r_i - mean_g) / (std_g + eps) * w_i` with the unbiased std; 0 for a group of one.

    Args:
        rewards:   [N] float32/bf16/fp16. One scalar reward per trajectory.
        group_ids: [N] int. Same id = same group (one task of one pair); any order, any group sizes.
        weights:   [N] float or None, e.g. `pair_weights(...)[pair_of_sample]`.
        eps:       added to the std.
        scale:     "group" (GRPO), "batch" (divide by the std of all N rewards), "none" (Dr.GRPO).
    Returns:
        [N] float32 advantages (float64 on the reference path for float64 rewards).
    Raises:
        ValueError for a NaN/inf reward (naming its group) or a bad argument.

    Example:
        >>> r = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.5])
        >>> group_advantages(r, torch.tensor([0, 0, 0, 1, 1]))
        tensor([ 0.5774, -1.1547,  0.5774,  0.0000,  0.0000])
    """
    ref.validate_advantage_inputs(rewards, group_ids, weights, eps, scale)
    if use_triton(rewards):
        return group_advantages_triton(rewards, group_ids, weights, float(eps), scale)
    return ref._group_advantages_impl(rewards, group_ids, weights, float(eps), scale)


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
