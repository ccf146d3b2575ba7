"""verl 0.9.1's rollout correction for bypass mode (`trainer/ppo/rollout_corr_helper.py`), in plain torch.

`compute_rollout_correction_and_rejection_mask(log_prob, rollout_log_prob, response_mask, ...)` returns
`(is_weights or None, rejection-masked response_mask, {"rollout_corr/<name>": float})` with verl's options,
thresholds and metric names: truncated (TIS, one float) or IcePop ("low_high") importance weights at token or
sequence level, optional batch normalisation to mean 1, and rejection sampling by token_k1/k2/k3,
seq_{sum,mean}_k1/k2/k3, seq_max_k2/k3 (comma-separated options, all must pass). No pairuni kernel computes
these diagnostics: this is a re-implementation (no torch.distributed reduction of the batch-normalisation
mean: single process only).
"""

from __future__ import annotations

import math

import torch

from ._common import masked_mean

SAFETY_BOUND = 20.0
RS_OPTIONS = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3", "seq_mean_k1",
              "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")


def _is_threshold(spec) -> tuple[float, float | None]:
    """(upper, lower or None): a float is TIS's upper bound, "low_high" IcePop's band."""
    if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
        raise ValueError(f"rollout_is_threshold: expected a float or a 'low_high' string, got {spec!r}")
    lower = None
    try:
        if isinstance(spec, str) and "_" in spec.strip():
            lo, hi = spec.strip().split("_", 1)
            lower, upper = float(lo), float(hi)
        else:
            upper = float(spec)
    except ValueError:
        raise ValueError(f"rollout_is_threshold: expected a float or a 'low_high' string, got {spec!r}") from None
    if not upper > 0 or (lower is not None and not 0 < lower <= upper):
        raise ValueError(f"rollout_is_threshold: expected 0 < low <= high, got {spec!r}")
    return upper, lower


def _rs_thresholds(options: list[str], spec) -> dict[str, tuple[float | None, float]]:
    """option -> (lower, upper): k1 options take "low_high" (a lone x means 1/x_x), the others one upper bound."""
    if spec is None:
        raise ValueError("rollout_rs_threshold: required when rollout_rs is set")
    parts = [str(spec)] if isinstance(spec, (int, float)) else [p.strip() for p in str(spec).split(",") if p.strip()]
    if len(parts) not in (1, len(options)):
        raise ValueError(f"rollout_rs_threshold: expected 1 or {len(options)} thresholds, got {len(parts)}")
    parts = parts * len(options) if len(parts) == 1 else parts
    out = {}
    for option, part in zip(options, parts):
        try:
            if option.endswith("k1"):
                lo, hi = part.split("_", 1) if "_" in part else (str(1.0 / float(part)), part)
                lower, upper = float(lo), float(hi)
                if not (lower > 0 and upper > 0 and lower <= upper):
                    raise ValueError
            else:
                if "_" in part:
                    raise ValueError
                lower, upper = None, float(part)
                if not upper > 0:
                    raise ValueError
        except ValueError:
            raise ValueError(f"rollout_rs_threshold: bad threshold {part!r} for option {option!r}") from None
        out[option] = (lower, upper)
    return out


def _stats(values: torch.Tensor, prefix: str) -> dict[str, torch.Tensor | float]:
    """mean/std/max/min of a 1-D tensor of sequence statistics (std 0 for one value), as verl names them."""
    return {f"{prefix}_seq_mean": values.mean(), f"{prefix}_seq_std": values.std() if values.numel() > 1 else 0.0,
            f"{prefix}_seq_max": values.max(), f"{prefix}_seq_min": values.min()}


def _clamped_std(stat, mask, lo, hi):
    clamped = stat.clamp(min=lo, max=hi)
    var = masked_mean(clamped.square(), mask) - masked_mean(clamped, mask).square()
    return torch.sqrt(var.clamp(min=0.0)) if mask.sum() > 1 else 0.0


def is_weights(log_ratio, mask, rollout_is="token", rollout_is_threshold=2.0, rollout_is_batch_normalize=False):
    """Truncated / IcePop importance weights `pi_train / pi_rollout` ([bs, T], 0 on masked tokens) and their
    metrics (verl's compute_rollout_correction_weights + compute_is_metrics)."""
    if rollout_is not in ("token", "sequence"):
        raise ValueError(f"rollout_is: expected 'token' or 'sequence', got {rollout_is!r}")
    upper, lower = _is_threshold(rollout_is_threshold)
    if rollout_is == "token":
        log_for_metrics = log_ratio
        raw = torch.exp(log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND))
    else:
        log_for_metrics = (torch.where(mask.bool(), log_ratio, 0.0) * mask).sum(-1, keepdim=True)
        raw = torch.exp(log_for_metrics.clamp(-SAFETY_BOUND, SAFETY_BOUND)).expand_as(log_ratio)
    raw = raw * mask
    if lower is None:
        weights = raw.clamp(max=upper)
    else:
        weights = torch.where((raw >= lower) & (raw <= upper), raw, torch.zeros_like(raw))
    if not mask.any():
        raise ValueError("response_mask: expected at least one response token")
    m = {}
    low_t = 1.0 / upper if lower is None else lower
    if rollout_is == "sequence":
        m["rollout_is_max"] = torch.exp(log_for_metrics.max().clamp(max=SAFETY_BOUND))
        m["rollout_is_min"] = torch.exp(log_for_metrics.min())
        m["rollout_is_mean"] = masked_mean(weights, mask)
        # verl takes these logs of float32 tensors: so do we, for the same counts at the bounds
        log_hi, log_lo = torch.log(torch.tensor(upper)), torch.log(torch.tensor(low_t))
        m["rollout_is_ratio_fraction_high"] = (log_for_metrics > log_hi.to(log_for_metrics.device)).float().mean()
        m["rollout_is_ratio_fraction_low"] = (log_for_metrics < log_lo.to(log_for_metrics.device)).float().mean()
    else:
        m["rollout_is_mean"] = masked_mean(weights, mask)
        m["rollout_is_ratio_fraction_high"] = masked_mean((raw > upper).float(), mask)
        m["rollout_is_ratio_fraction_low"] = masked_mean((raw < low_t).float(), mask)
        m["rollout_is_max"] = weights.masked_fill(~mask.bool(), float("-inf")).max()
        m["rollout_is_min"] = weights.masked_fill(~mask.bool(), float("inf")).min()
    m["rollout_is_std"] = _clamped_std(weights, mask, 0.0, upper)
    ess_w = weights.clamp(min=0.0, max=upper)
    normalised = ess_w / (masked_mean(ess_w, mask) + 1e-8)
    m["rollout_is_eff_sample_size"] = 1.0 / masked_mean(normalised.square(), mask).item()
    seq_w = masked_mean(weights, mask, dim=-1)
    m.update(_stats(seq_w, "rollout_is"))
    m["rollout_is_seq_max_deviation"] = (seq_w - 1.0).abs().max()
    raw_seq = masked_mean(raw, mask, dim=-1)
    m["rollout_is_seq_fraction_high"] = (raw_seq > upper).float().mean()
    m["rollout_is_seq_fraction_low"] = (raw_seq < low_t).float().mean()
    if lower is not None:
        m["rollout_is_oob_ratio"] = masked_mean(((raw < lower) | (raw > upper)).float(), mask)
    if rollout_is_batch_normalize:
        if rollout_is == "token":
            mean = masked_mean(weights, mask)
        else:
            seq_mask = (mask.sum(-1) > 0).to(weights.dtype)
            mean = (seq_w * seq_mask).sum() / seq_mask.sum().clamp_min(1e-8)
        if mean > 1e-8:
            weights = weights / mean
            m["rollout_is_batch_norm_factor"] = mean
        else:
            m["rollout_is_batch_norm_factor"] = 1.0
    return weights, m


def rejection_mask(log_ratio, mask, rollout_rs, rollout_rs_threshold):
    """verl's compute_rollout_rejection_mask: the response mask with rejected tokens (or whole sequences) set to
    0, and per-option metrics. log_ratio = log pi_train - log pi_rollout, [bs, T]."""
    if not isinstance(rollout_rs, str) or not rollout_rs.strip():
        raise ValueError(f"rollout_rs: expected a comma-separated string of {RS_OPTIONS}, got {rollout_rs!r}")
    if log_ratio.shape[0] == 0:
        return mask, {}
    options = list(dict.fromkeys(o.strip() for o in rollout_rs.split(",") if o.strip()))
    bad = [o for o in options if o not in RS_OPTIONS]
    if bad:
        raise ValueError(f"rollout_rs: unknown option {bad[0]!r}, expected one of {RS_OPTIONS}")
    thresholds = _rs_thresholds(options, rollout_rs_threshold)
    safe = log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND)
    per_token = {"k1": -safe, "k2": 0.5 * safe**2, "k3": torch.exp(safe) - 1.0 - safe}
    mb = mask.bool()
    seq_valid = mask.sum(-1) > 0
    keep_all = torch.ones_like(mask, dtype=log_ratio.dtype)
    m: dict = {}
    for option in options:
        lower, upper = thresholds[option]
        k1 = option.endswith("k1")
        stat_tok = per_token[option[-2:]]
        if option.startswith("token"):
            stat, seq_stat = stat_tok, None
        else:
            if option.startswith("seq_sum"):
                seq_stat = (torch.where(mb, stat_tok, 0.0) * mask).sum(-1)
            elif option.startswith("seq_mean"):
                seq_stat = masked_mean(stat_tok, mask, dim=-1)
            else:
                seq_max = stat_tok.masked_fill(~mb, float("-inf")).max(-1).values
                seq_stat = torch.where(seq_max == float("-inf"), torch.zeros_like(seq_max), seq_max)
            stat = seq_stat[:, None].expand_as(mask)
        hi = math.log(upper) if k1 else upper
        lo = math.log(lower) if k1 else 0.0
        keep = ((stat >= lo) & (stat <= hi)) if k1 else (stat <= hi)
        keep_f = keep.to(log_ratio.dtype)
        keep_all = keep_all * keep_f
        # metrics of this option (verl compute_rs_metrics)
        p = f"rollout_rs_{option}"
        seq_values = seq_stat if seq_stat is not None else masked_mean(stat, mask, dim=-1)
        seq_values = seq_values[seq_valid]
        m[f"{p}_mean"] = masked_mean(stat, mask)
        if seq_stat is not None and seq_values.numel() > 0:
            m[f"{p}_max"], m[f"{p}_min"] = seq_values.max(), seq_values.min()
            m[f"{p}_fraction_high"] = (seq_values > hi).float().mean()
            m[f"{p}_fraction_low"] = (seq_values < lo).float().mean() if k1 else 0.0
        else:
            m[f"{p}_max"] = stat.masked_fill(~mb, float("-inf")).max()
            m[f"{p}_min"] = stat.masked_fill(~mb, float("inf")).min()
            m[f"{p}_fraction_high"] = masked_mean((stat > hi).float(), mask)
            m[f"{p}_fraction_low"] = masked_mean((stat < lo).float(), mask) if k1 else 0.0
        m[f"{p}_std"] = _clamped_std(stat, mask, lo if k1 else 0.0, hi)
        if seq_values.numel() > 0:
            m.update(_stats(seq_values, p))
            m[f"{p}_seq_max_deviation"] = seq_values.abs().max()
            m[f"{p}_seq_fraction_high"] = (seq_values > hi).float().mean()
            if k1:
                m[f"{p}_seq_fraction_low"] = (seq_values < lo).float().mean()
        else:
            for name in ("seq_mean", "seq_std", "seq_max", "seq_min", "seq_max_deviation", "seq_fraction_high",
                         "seq_fraction_low"):
                m[f"{p}_{name}"] = 0.0
        m[f"{p}_masked_fraction"] = masked_mean(1 - keep_f, mask)
        seq_kept = ~((~keep) & mb).any(-1)
        n_valid = seq_valid.float().sum()
        m[f"{p}_seq_masked_fraction"] = (((~seq_kept).float() * seq_valid.float()).sum() / n_valid
                                         if n_valid > 0 else 0.0)
    m["rollout_rs_masked_fraction"] = masked_mean(1 - keep_all, mask)
    m["rollout_rs_seq_masked_fraction"] = (~((keep_all > 0.5) & mb) & mb).any(-1).float().mean()
    return (mask * keep_all).to(mask.dtype), m


def offpolicy_metrics(log_prob, rollout_log_prob, mask) -> dict:
    """verl's compute_offpolicy_metrics: perplexities, KL (direct and k3), log-PPL differences, chi^2."""
    mean_train = masked_mean(log_prob, mask, dim=-1)
    mean_roll = masked_mean(rollout_log_prob, mask, dim=-1)
    lr = log_prob - rollout_log_prob
    diff = mean_roll - mean_train
    seq_sum = (torch.where(mask.bool(), lr, 0.0) * mask).sum(-1)
    return {
        "training_ppl": torch.exp(-mean_train).mean(), "training_log_ppl": (-mean_train).mean(),
        "kl": masked_mean(rollout_log_prob - log_prob, mask), "k3_kl": masked_mean(torch.exp(lr) - lr - 1, mask),
        "rollout_ppl": torch.exp(-mean_roll).mean(), "rollout_log_ppl": (-mean_roll).mean(),
        "log_ppl_diff": diff.mean(), "log_ppl_abs_diff": diff.abs().mean(), "log_ppl_diff_max": diff.max(),
        "log_ppl_diff_min": diff.min(), "ppl_ratio": torch.exp(diff).mean(),
        "chi2_token": masked_mean(torch.exp(lr.clamp(-SAFETY_BOUND, SAFETY_BOUND)).square(), mask) - 1.0,
        "chi2_seq": torch.exp(2.0 * seq_sum.clamp(-SAFETY_BOUND, SAFETY_BOUND)).mean() - 1.0,
    }


def compute_rollout_correction_and_rejection_mask(log_prob, rollout_log_prob, response_mask, rollout_is=None,
                                                  rollout_is_threshold=2.0, rollout_is_batch_normalize=False,
                                                  rollout_rs=None, rollout_rs_threshold=None):
    """(IS weights [bs, T] or None, response mask after rejection [bs, T], {"rollout_corr/<name>": float}).

    log_prob: the training policy's log-probs (verl's `old_log_prob` argument here), rollout_log_prob the
    rollout's, response_mask [bs, T] with at least one response token."""
    if not response_mask.any():
        raise ValueError("response_mask: expected at least one response token")
    for name, x in (("rollout_log_prob", rollout_log_prob), ("response_mask", response_mask)):
        if x.shape != log_prob.shape:
            raise ValueError(f"{name}: expected shape {tuple(log_prob.shape)}, got {tuple(x.shape)}")
    log_ratio = log_prob - rollout_log_prob
    metrics: dict = {}
    weights = None
    if rollout_is is not None and rollout_is_threshold is not None:
        weights, is_m = is_weights(log_ratio, response_mask, rollout_is, rollout_is_threshold,
                                   rollout_is_batch_normalize)
        metrics.update(is_m)
    mask = response_mask.clone()
    if rollout_rs is not None:
        mask, rs_m = rejection_mask(log_ratio, response_mask, rollout_rs, rollout_rs_threshold)
        metrics.update(rs_m)
    metrics.update(offpolicy_metrics(log_prob, rollout_log_prob, response_mask))
    out = {f"rollout_corr/{k}": (v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
    return weights, mask, out
