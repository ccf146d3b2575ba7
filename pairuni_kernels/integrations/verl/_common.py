"""Shared pieces of the verl drop-in: config reading, verl's masked statistics and loss aggregation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch


def uids_to_group_ids(index: np.ndarray | Sequence[Any], device: torch.device | str | None = None) -> torch.Tensor:
    """Map verl's per-sample uid array (usually uuid strings, any hashable values) to int64 group ids.

    Ids are numbered in order of first appearance, so equal uids share an id wherever they sit.
    Returns a [bs] int64 tensor on `device`.
    """
    values = index.tolist() if isinstance(index, (np.ndarray, torch.Tensor)) else list(index)
    first_seen: dict[Any, int] = {}
    ids = [first_seen.setdefault(v, len(first_seen)) for v in values]
    return torch.tensor(ids, dtype=torch.int64, device=device)


def config_value(config: Any, name: str, default: Any) -> Any:
    """Read `name` from verl's ActorConfig/AlgoConfig (attributes), an OmegaConf DictConfig or a plain dict;
    `default` when the config is None, lacks the name or holds None there."""
    if config is None:
        return default
    if isinstance(config, Mapping):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    return default if value is None else value


def clip_range(config: Any) -> tuple[float, float]:
    """(low, high) of verl's actor config: clip_ratio_low / clip_ratio_high, each defaulting to clip_ratio."""
    clip_ratio = config_value(config, "clip_ratio", None)
    low = config_value(config, "clip_ratio_low", clip_ratio)
    high = config_value(config, "clip_ratio_high", clip_ratio)
    if low is None or high is None:
        raise ValueError("config: expected clip_ratio (or both clip_ratio_low and clip_ratio_high), got None")
    return float(low), float(high)


def require_config(config: Any) -> Any:
    if config is None:
        raise ValueError("config: required (verl's ActorConfig or a mapping with clip_ratio, clip_ratio_c, ...)")
    return config


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """verl_F.masked_mean: `sum(where(mask, v, 0) * mask) / (sum(mask) + 1e-8)` (masked NaNs cannot leak)."""
    total = (torch.where(mask.bool(), values, 0.0) * mask).sum(dim=dim)
    return total / (mask.sum(dim=dim) + 1e-8)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl_F.masked_whiten: `(v - mean) * rsqrt(var + 1e-8)`, mean and unbiased var over the masked entries.

    values, mask: [bs, T]. Every entry is shifted and scaled, masked ones too (callers multiply by the mask).
    Raises ValueError for fewer than two masked entries (verl's unbiased variance is undefined there).
    """
    count = mask.sum()
    if count <= 1:
        raise ValueError(f"response_mask: whitening needs at least 2 response tokens, got {int(count)}")
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask) * (count / (count - 1))
    return (values - mean) * torch.rsqrt(var + 1e-8)


def metric_items(metrics: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    """verl's metric dicts hold Python floats: one `.item()` per 0-d tensor."""
    return {k: (v.detach().item() if isinstance(v, torch.Tensor) else float(v)) for k, v in metrics.items()}


#: verl loss_agg_mode -> the pairuni mode its aggregate is rescaled from (see `agg_rescale`).
VERL_TO_PAIRUNI_AGG = {
    "token-mean": "token-mean",
    "token-sum": "seq-mean-token-sum",
    "seq-mean-token-sum": "seq-mean-token-sum",
    "seq-mean-token-sum-norm": "seq-mean-token-sum",
    "seq-mean-token-mean": "seq-mean-token-mean",
}


def check_agg_mode(loss_agg_mode: str) -> str:
    if loss_agg_mode not in VERL_TO_PAIRUNI_AGG:
        raise ValueError(f"loss_agg_mode: expected one of {sorted(VERL_TO_PAIRUNI_AGG)}, got {loss_agg_mode!r}")
    return VERL_TO_PAIRUNI_AGG[loss_agg_mode]


def agg_rescale(response_mask: torch.Tensor, loss_agg_mode: str, info: Mapping[str, Any]):
    """Factor turning our aggregate into verl 0.9's `agg_loss(..., **global_batch_info)`.

    With S the masked sum of per-token losses, R the sum of row means, n_tok the unmasked tokens,
    bs the rows and n_seq the non-empty rows, ours gives token-mean S / n_tok, seq-mean-token-sum
    S / bs, seq-mean-token-mean R / n_seq. verl gives
        token-mean               S / batch_num_tokens * dp          (batch_num_tokens defaults to n_tok)
        token-sum                S * dp
        seq-mean-token-sum       S / global_batch_size * dp         (global_batch_size defaults to n_seq)
        seq-mean-token-sum-norm  S / global_batch_size * dp / loss_scale_factor   (default T)
        seq-mean-token-mean      R / global_batch_size * dp
    and, like verl, a missing global count with dp_size > 1 is an error.
    """
    check_agg_mode(loss_agg_mode)
    dp_size = info.get("dp_size") or 1
    valid = response_mask != 0
    rows = response_mask.shape[0]
    if loss_agg_mode == "token-mean":
        num_tokens = info.get("batch_num_tokens")
        if num_tokens is None:
            _require_single_rank(dp_size, "batch_num_tokens")
            return float(dp_size)
        return valid.sum().clamp(min=1) / num_tokens * dp_size
    if loss_agg_mode == "token-sum":
        return float(rows * dp_size)
    nonempty = valid.any(dim=-1).sum()
    batch_size = info.get("global_batch_size")
    if batch_size is None:
        _require_single_rank(dp_size, "global_batch_size")
        batch_size = nonempty.clamp(min=1)
    ours = nonempty.clamp(min=1) if loss_agg_mode == "seq-mean-token-mean" else rows
    factor = ours / batch_size * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        scale_factor = info.get("loss_scale_factor")
        factor = factor / (response_mask.shape[-1] if scale_factor is None else scale_factor)
    return factor


def _require_single_rank(dp_size, name: str) -> None:
    if dp_size > 1:
        raise ValueError(f"global_batch_info: {name} is required when dp_size > 1")


def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str, info: Mapping[str, Any]):
    """verl's `agg_loss` in plain torch, for the per-token losses no kernel computes (bypass REINFORCE weights,
    DRO / KL-Cov with rollout weights): our aggregate of `loss_mat` times `agg_rescale`."""
    m = (loss_mask != 0).to(loss_mat.dtype)
    row_sum = (torch.where(loss_mask != 0, loss_mat, 0.0) * m).sum(-1)
    count = m.sum(-1)
    mode = check_agg_mode(loss_agg_mode)
    if mode == "token-mean":
        ours = row_sum.sum() / count.sum().clamp(min=1)
    elif mode == "seq-mean-token-mean":
        ours = (row_sum / count.clamp(min=1)).sum() / (count > 0).sum().clamp(min=1)
    else:
        ours = row_sum.sum() / loss_mat.shape[0]
    return ours * agg_rescale(loss_mask, loss_agg_mode, info)
