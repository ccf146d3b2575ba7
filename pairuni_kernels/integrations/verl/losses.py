"""verl 0.9.1's registered policy losses (`core_algos.compute_policy_loss_*`) on `clipped_policy_loss`.

Every loss has verl's signature `(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
rollout_is_weights) -> (pg_loss, metrics)`: inputs [bs, T], `config` verl's ActorConfig (a DictConfig or a
dict works too), `metrics` a dict of Python floats under verl's keys. The loss comes from one
`clipped_policy_loss(loss_type=...)` call (Triton on CUDA, the float64-capable reference on CPU), aggregated
by verl's `agg_loss` rules (`agg_rescale`); the metrics from one elementwise pass under `no_grad`.

`rollout_is_weights` ([bs, T], >= 0, detached as verl makes them) multiply the per-token loss. Each kernel
loss here except KL-Cov's penalty and DRO's is positively homogeneous in the advantage, so the weights fold
into the advantage (`A * w`); KL-Cov and DRO with weights, and bypass mode, use plain-torch per-token losses
(documented at each function).

Split into `_<mode>_terms` (tensors only: what `torch.compile(fullgraph=True)` can trace) and the public
function (host syncs: input checks, `.item()` of the metrics, clip_cov / kl_cov token choice).
"""

from __future__ import annotations

from typing import Any

import torch

from ... import reference
from ...policy_loss import clipped_policy_loss
from ...reference import LOG_RATIO_CLAMP
from ._common import agg_loss, agg_rescale, check_agg_mode, clip_range, config_value, masked_mean, metric_items, require_config

# The loss_type names of `reference.LOSS_TYPES` each verl mode runs on.
CISPO_VERL_LOSS_TYPE = "cispo_clip"  # verl clips the ratio to [1 - low, 1 + high] (TRL's "cispo" caps it only)


def _kernel_loss(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode, info, **knobs):
    """verl's `agg_loss` of the per-token loss `clipped_policy_loss` computes with `knobs`."""
    mode = check_agg_mode(loss_agg_mode)
    out = clipped_policy_loss(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode=mode, **knobs)
    return out.loss * agg_rescale(response_mask, loss_agg_mode, info or {})


def _weighted(advantages: torch.Tensor, rollout_is_weights: torch.Tensor | None) -> torch.Tensor:
    """`A * w`: weighting the per-token loss equals weighting the advantage for a loss positively homogeneous
    in A (every branch of the clipped surrogate, the dual clip included, scales by w >= 0)."""
    return advantages if rollout_is_weights is None else advantages * rollout_is_weights.detach()


def _check_weights(rollout_is_weights: torch.Tensor | None, shape) -> None:
    if rollout_is_weights is None:
        return
    if tuple(rollout_is_weights.shape) != tuple(shape):
        raise ValueError(f"rollout_is_weights: expected shape {tuple(shape)}, got {tuple(rollout_is_weights.shape)}")
    if bool((rollout_is_weights < 0).any()):
        raise ValueError("rollout_is_weights: expected weights >= 0 (importance-sampling ratios)")


def _info(config: Any) -> dict:
    return dict(config_value(config, "global_batch_info", {}) or {})


def _policy_loss_config(config: Any, name: str, default: Any) -> Any:
    """`config.policy_loss.<name>` (verl's PolicyLossConfig), `default` where missing or None."""
    return config_value(config_value(config, "policy_loss", None), name, default)


def _log_ratio(log_prob, old_log_prob, clamp: bool):
    lr = (log_prob - old_log_prob).detach()
    return lr.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP) if clamp else lr


# ----------------------------------------------------------------------------- vanilla (PPO + dual clip)
def _vanilla_metrics(old_log_prob, log_prob, advantages, response_mask, low, high, clip_ratio_c):
    """pg_clipfrac: share where the clipped branch is larger; ppo_kl: mean of `old - logp` (log ratio clamped
    to +-20); pg_clipfrac_lower: share with A < 0 where the dual clip binds (clipped loss > -A c)."""
    with torch.no_grad():
        lr = _log_ratio(log_prob, old_log_prob, clamp=True)
        ratio = torch.exp(lr)
        adv = advantages.detach()
        loss1, loss2 = -adv * ratio, -adv * ratio.clamp(1 - low, 1 + high)
        clipped = torch.maximum(loss1, loss2)
        return {
            "actor/pg_clipfrac": masked_mean((loss2 > loss1).to(lr.dtype), response_mask),
            "actor/ppo_kl": masked_mean(-lr, response_mask),
            "actor/pg_clipfrac_lower": masked_mean(((clipped > -adv * clip_ratio_c) & (adv < 0)).to(lr.dtype),
                                                   response_mask),
        }


def _vanilla_terms(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, low, high, clip_ratio_c,
                   info, rollout_is_weights=None):
    loss = _kernel_loss(log_prob, old_log_prob, _weighted(advantages, rollout_is_weights), response_mask,
                        loss_agg_mode, info, loss_type="ppo", epsilon_low=low, epsilon_high=high,
                        dual_clip_c=float(clip_ratio_c))
    return loss, _vanilla_metrics(old_log_prob, log_prob, advantages, response_mask, low, high, clip_ratio_c)


def _check_dual_clip(clip_ratio_c) -> float:
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c: expected a float > 1 (dual-clip PPO lower bound), got {clip_ratio_c!r}")
    return float(clip_ratio_c)


def compute_policy_loss_vanilla(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config: Any = None,
                                rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """verl "vanilla": PPO clipped surrogate with dual clip, `loss_type="ppo"`.

    Reads `clip_ratio`, `clip_ratio_low`, `clip_ratio_high`, `clip_ratio_c` (default 3.0) and
    `global_batch_info` from `config`. Metrics: actor/pg_clipfrac, actor/ppo_kl, actor/pg_clipfrac_lower.
    """
    require_config(config)
    low, high = clip_range(config)
    clip_ratio_c = _check_dual_clip(config_value(config, "clip_ratio_c", 3.0))
    _check_weights(rollout_is_weights, log_prob.shape)
    loss, metrics = _vanilla_terms(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, low, high,
                                   clip_ratio_c, _info(config), rollout_is_weights)
    return loss, metric_items(metrics)


def compute_policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                        response_mask: torch.Tensor, cliprange: float | None = None,
                        cliprange_low: float | None = None, cliprange_high: float | None = None,
                        clip_ratio_c: float = 3.0, loss_agg_mode: str = "token-mean"):
    """verl's (deprecated, functional) PPO clipped policy loss with dual clip.

    Args:
        old_log_prob, log_prob: [bs, T] float; the loss is differentiable in `log_prob`.
        advantages: [bs, T] float (verl's token-level advantages; [bs] also accepted).
        response_mask: [bs, T] 0/1 or bool.
        cliprange: PPO epsilon; `cliprange_low` / `cliprange_high` default to it.
        clip_ratio_c: dual-clip bound c > 1: for A < 0 the per-token loss is at most `-A * c`.
        loss_agg_mode: "token-mean" | "token-sum" | "seq-mean-token-sum" | "seq-mean-token-mean" |
            "seq-mean-token-sum-norm", with verl's `agg_loss` semantics.
    Returns:
        (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower), 0-d tensors, as verl returns them.
    """
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    if low is None or high is None:
        raise ValueError("cliprange: expected a float (or both cliprange_low and cliprange_high), got None")
    loss, m = _vanilla_terms(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, float(low),
                             float(high), _check_dual_clip(clip_ratio_c), {})
    return loss, m["actor/pg_clipfrac"], m["actor/ppo_kl"], m["actor/pg_clipfrac_lower"]


# ----------------------------------------------------------------------------- DPPO (binary TV / binary KL)
def _dppo_valid(old_log_prob, log_prob, advantages, low, high, kind):
    """verl's DPPO trust-region mask: a token counts unless its move exceeds the divergence bound in the
    direction its advantage pushes (TV: `p - p_old` vs +high / -low; KL: binary KL vs high / low)."""
    prob, old_prob = torch.exp(log_prob), torch.exp(old_log_prob)
    if kind == "dppo_tv":
        pos_ok, neg_ok = (prob - old_prob) <= high, (prob - old_prob) >= -low
    else:
        binary_kl = old_prob * (old_log_prob - log_prob) + (1 - old_prob) * torch.log(
            (1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
        pos_ok, neg_ok = (binary_kl <= high) | (prob <= old_prob), (binary_kl <= low) | (prob >= old_prob)
    return torch.where(advantages > 0, pos_ok, neg_ok)


def _dppo_terms(kind, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, low, high, clip_ratio_c,
                info, rollout_is_weights=None):
    loss = _kernel_loss(log_prob, old_log_prob, _weighted(advantages, rollout_is_weights), response_mask,
                        loss_agg_mode, info, loss_type=kind, clip_ratio_c_tis=clip_ratio_c,
                        divergence_low=low, divergence_high=high)
    with torch.no_grad():
        lr = _log_ratio(log_prob, old_log_prob, clamp=True)
        valid = _dppo_valid(old_log_prob.detach(), log_prob.detach(), advantages.detach(), low, high, kind)
        valid = valid.to(lr.dtype)
        metrics = {
            "actor/pg_clipfrac": masked_mean(1.0 - valid, response_mask),
            "actor/ppo_kl": masked_mean(-lr, response_mask),
            "actor/pg_clipfrac_lower": masked_mean((torch.exp(lr) > clip_ratio_c).to(lr.dtype) * valid, response_mask),
        }
    return loss, metrics


def _dppo(kind, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights):
    require_config(config)
    low, high = clip_range(config)  # verl: here clip_ratio* are divergence thresholds
    _check_weights(rollout_is_weights, log_prob.shape)
    loss, metrics = _dppo_terms(kind, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, low, high,
                                float(config_value(config, "clip_ratio_c", 20.0)), _info(config), rollout_is_weights)
    return loss, metric_items(metrics)


def compute_policy_loss_dppo_tv(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                config=None, rollout_is_weights=None):
    """verl "dppo_tv" (DPPO-Binary-TV): `-A * sg(min(r, c)) * logp * valid`, `loss_type="dppo_tv"`.

    valid: A > 0 needs `p - p_old <= clip_ratio_high`, else `p - p_old >= -clip_ratio_low` (probabilities);
    c = `clip_ratio_c` (default 20 here). Metrics: pg_clipfrac = share not valid, ppo_kl,
    pg_clipfrac_lower = share valid with r > c.
    """
    return _dppo("dppo_tv", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                 rollout_is_weights)


def compute_policy_loss_dppo_kl(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                config=None, rollout_is_weights=None):
    """verl "dppo_kl" (DPPO-Binary-KL): as dppo_tv with the binary KL
    `p_old log(p_old/p) + (1-p_old) log((1-p_old+1e-8)/(1-p+1e-8))` bounded by clip_ratio_high (A > 0,
    only when p rises) / clip_ratio_low (A <= 0, only when p falls), `loss_type="dppo_kl"`."""
    return _dppo("dppo_kl", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                 rollout_is_weights)


# ----------------------------------------------------------------------------- GSPO
def _gspo_terms(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, low, high, info,
                rollout_is_weights=None):
    loss = _kernel_loss(log_prob, old_log_prob, _weighted(advantages, rollout_is_weights), response_mask,
                        loss_agg_mode, info, loss_type="ppo", importance_sampling_level="sequence_token",
                        epsilon_low=low, epsilon_high=high)
    with torch.no_grad():
        lr = _log_ratio(log_prob, old_log_prob, clamp=False)
        m = response_mask.to(lr.dtype)
        seq = (lr * m).sum(-1) / m.sum(-1).clamp(min=1)
        ratio = torch.exp(seq.clamp(max=10.0))[:, None].expand_as(lr)
        adv = advantages.detach()
        loss1, loss2 = -adv * ratio, -adv * ratio.clamp(1 - low, 1 + high)
        metrics = {
            "actor/pg_clipfrac": masked_mean((loss2 > loss1).to(lr.dtype), response_mask),
            "actor/ppo_kl": masked_mean(-lr, response_mask),
            "actor/pg_clipfrac_lower": torch.zeros((), dtype=lr.dtype, device=lr.device),
        }
    return loss, metrics


def compute_policy_loss_gspo(old_log_prob, log_prob, advantages, response_mask,
                             loss_agg_mode="seq-mean-token-mean", config=None, rollout_is_weights=None):
    """verl "gspo" (GSPO-token): clipped surrogate on `s_t = sg(exp(mean_row log r)) * pi_t / sg(pi_t)`, no
    dual clip; `loss_type="ppo", importance_sampling_level="sequence_token"`. pg_clipfrac_lower is 0 as in verl.
    """
    require_config(config)
    low, high = clip_range(config)
    _check_weights(rollout_is_weights, log_prob.shape)
    loss, metrics = _gspo_terms(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, low, high,
                                _info(config), rollout_is_weights)
    return loss, metric_items(metrics)


# ----------------------------------------------------------------------------- SAPO
def _sapo_terms(old_log_prob, log_prob, advantages, response_mask, tau_pos, tau_neg, info, rollout_is_weights=None):
    # verl aggregates SAPO with "seq-mean-token-mean" whatever loss_agg_mode says
    loss = _kernel_loss(log_prob, old_log_prob, _weighted(advantages, rollout_is_weights), response_mask,
                        "seq-mean-token-mean", info, loss_type="sapo", sapo_temperature_pos=tau_pos,
                        sapo_temperature_neg=tau_neg)
    with torch.no_grad():
        lr = _log_ratio(log_prob, old_log_prob, clamp=True)
        zero = torch.zeros((), dtype=lr.dtype, device=lr.device)
        metrics = {"actor/pg_clipfrac": zero, "actor/ppo_kl": masked_mean(-lr, response_mask),
                   "actor/pg_clipfrac_lower": zero}
    return loss, metrics


def compute_policy_loss_sapo(old_log_prob, log_prob, advantages, response_mask,
                             loss_agg_mode="seq-mean-token-mean", config=None, rollout_is_weights=None):
    """verl "sapo": `-sigmoid(tau (r - 1)) * 4 / tau * A`, tau = config.tau_pos (A > 0, default 1.0) or
    config.tau_neg (default 1.05), `loss_type="sapo"`; always aggregated "seq-mean-token-mean" (verl ignores
    loss_agg_mode here). pg_clipfrac and pg_clipfrac_lower are 0 as in verl."""
    require_config(config)
    _check_weights(rollout_is_weights, log_prob.shape)
    loss, metrics = _sapo_terms(old_log_prob, log_prob, advantages, response_mask,
                                float(config_value(config, "tau_pos", 1.0)),
                                float(config_value(config, "tau_neg", 1.05)),
                                _info(config), rollout_is_weights)
    return loss, metric_items(metrics)


# ----------------------------------------------------------------------------- GPG
def _gpg_terms(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, info, rollout_is_weights=None):
    return _kernel_loss(log_prob, old_log_prob, _weighted(advantages, rollout_is_weights), response_mask,
                        loss_agg_mode, info, loss_type="gpg")


def compute_policy_loss_gpg(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                            config=None, rollout_is_weights=None):
    """verl "gpg": `-A * logp` (`loss_type="gpg"`); no metrics (`{}`), as in verl."""
    require_config(config)
    _check_weights(rollout_is_weights, log_prob.shape)
    return _gpg_terms(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, _info(config),
                      rollout_is_weights), {}


# ----------------------------------------------------------------------------- Clip-Cov / KL-Cov
def compute_policy_loss_clip_cov(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                 config=None, rollout_is_weights=None):
    """verl "clip_cov": PPO clipped surrogate (no dual clip, no +-20 clamp) whose loss is zeroed on up to
    `max(int(clip_cov_ratio * n_tokens), 1)` tokens drawn at random (torch.randperm on the global RNG, as verl
    draws) among the unclipped ones with `clip_cov_lb < (A - mean A)(logp - mean logp) < clip_cov_ub`
    (`reference.cov_token_selection`), `loss_type="clip_cov"`. Reads config.policy_loss.clip_cov_ratio
    (0.0002), clip_cov_lb (1.0), clip_cov_ub (5.0). Metrics: pg_clipfrac = share of zeroed tokens, ppo_kl."""
    require_config(config)
    low, high = clip_range(config)
    ratio = float(_policy_loss_config(config, "clip_cov_ratio", 0.0002))
    if not ratio > 0:
        raise ValueError(f"config.policy_loss.clip_cov_ratio: expected a float > 0, got {ratio!r}")
    lb = float(_policy_loss_config(config, "clip_cov_lb", 1.0))
    ub = float(_policy_loss_config(config, "clip_cov_ub", 5.0))
    _check_weights(rollout_is_weights, log_prob.shape)
    selected = reference.cov_token_selection(log_prob.detach(), old_log_prob, advantages, response_mask,
                                             mode="clip_cov", ratio=ratio, lb=lb, ub=ub, epsilon_low=low,
                                             epsilon_high=high)
    loss, metrics = _clip_cov_terms(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, low, high,
                                    selected, _info(config), rollout_is_weights)
    return loss, metric_items(metrics)


def _clip_cov_terms(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, low, high, selected, info,
                    rollout_is_weights=None):
    loss = _kernel_loss(log_prob, old_log_prob, _weighted(advantages, rollout_is_weights), response_mask,
                        loss_agg_mode, info, loss_type="clip_cov", epsilon_low=low, epsilon_high=high,
                        selected=selected)
    with torch.no_grad():
        lr = _log_ratio(log_prob, old_log_prob, clamp=False)
        metrics = {"actor/pg_clipfrac": masked_mean(selected.to(lr.dtype), response_mask),
                   "actor/ppo_kl": masked_mean(-lr, response_mask)}
    return loss, metrics


def compute_policy_loss_kl_cov(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                               config=None, rollout_is_weights=None):
    """verl "kl_cov": per-token `-A * r` (no clip, no clamp), plus `ppo_kl_coef * |log r|` on the
    `max(1, int(n_tokens * kl_cov_ratio))` tokens of largest `(A - mean A)(logp - mean logp)`
    (`reference.cov_token_selection`), `loss_type="kl_cov"`. Reads config.policy_loss.kl_cov_ratio (0.0002) and
    ppo_kl_coef (1.0 when None, as verl's function falls back). Metric: actor/ppo_kl = mean |log r|.
    With rollout_is_weights the penalty is not homogeneous in A: the weighted loss is then computed in plain
    torch from the same selection."""
    require_config(config)
    ratio = float(_policy_loss_config(config, "kl_cov_ratio", 0.0002))
    if not ratio > 0:
        raise ValueError(f"config.policy_loss.kl_cov_ratio: expected a float > 0, got {ratio!r}")
    coef = float(_policy_loss_config(config, "ppo_kl_coef", 1.0))
    _check_weights(rollout_is_weights, log_prob.shape)
    selected = reference.cov_token_selection(log_prob.detach(), old_log_prob, advantages, response_mask,
                                             mode="kl_cov", ratio=ratio)
    loss, metrics = _kl_cov_terms(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, coef, selected,
                                  _info(config), rollout_is_weights)
    return loss, metric_items(metrics)


def _kl_cov_terms(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, coef, selected, info,
                  rollout_is_weights=None):
    if rollout_is_weights is None:
        loss = _kernel_loss(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode, info,
                            loss_type="kl_cov", kl_cov_coef=coef, selected=selected)
    else:  # plain torch: w * (-A r + coef |log r| [selected])
        lr = log_prob - old_log_prob
        per_token = -advantages * torch.exp(lr) + torch.where(selected, coef * lr.abs(), 0.0)
        loss = agg_loss(per_token * rollout_is_weights.detach(), response_mask, loss_agg_mode, info)
    with torch.no_grad():
        lr = _log_ratio(log_prob, old_log_prob, clamp=False)
        metrics = {"actor/ppo_kl": masked_mean(lr.abs(), response_mask)}
    return loss, metrics


# ----------------------------------------------------------------------------- GMPO (geo_mean)
def _geo_mean_terms(old_log_prob, log_prob, advantages, response_mask, low, high, rollout_is_weights=None):
    mask = response_mask
    adv = advantages
    if rollout_is_weights is not None:
        # verl: the row loss times the geometric mean of the row's weights; the row loss is linear in the
        # row's mean advantage, so scaling every token's A by that row factor is the same
        m = mask.to(rollout_is_weights.dtype)
        seq_w = torch.exp((torch.log(rollout_is_weights.detach() + 1e-10) * m).sum(-1) / (m.sum(-1) + 1e-8))
        adv = advantages * seq_w[:, None]
    # The kernel puts the row loss on each of the row's tokens; "seq-mean-token-mean" then averages the non-empty
    # rows; verl's torch.mean runs over all bs rows (an empty row's loss is 0): rescale by n_nonempty / bs.
    out = clipped_policy_loss(log_prob, old_log_prob, adv, mask, loss_type="geo_mean", epsilon_low=low,
                              epsilon_high=high, loss_agg_mode="seq-mean-token-mean")
    nonempty = (mask != 0).any(dim=-1).sum().clamp(min=1)
    with torch.no_grad():
        lr = _log_ratio(log_prob, old_log_prob, clamp=False)
        clipped = lr != lr.clamp(-low, high)
        a = advantages.detach()
        metrics = {
            "actor/pg_clipfrac": masked_mean((clipped & (a > 0)).to(lr.dtype), mask),
            "actor/ppo_kl": masked_mean(-lr, mask),
            "actor/pg_clipfrac_lower": masked_mean((clipped & (a < 0)).to(lr.dtype), mask),
        }
    return out.loss * nonempty / mask.shape[0], metrics


def compute_policy_loss_geo_mean(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                 config=None, rollout_is_weights=None):
    """verl "geo_mean" (GMPO): per row `-mean_t(A) * exp(mean_t(sgn(A) min(sgn(A) log r, sgn(A) clip(log r,
    -low, high))))`, averaged over all bs rows (loss_agg_mode unused, as in verl), `loss_type="geo_mean"`.
    rollout_is_weights enter as the row's geometric mean weight. Metrics: pg_clipfrac (clipped, A > 0),
    ppo_kl, pg_clipfrac_lower (clipped, A < 0)."""
    require_config(config)
    low, high = clip_range(config)
    _check_weights(rollout_is_weights, log_prob.shape)
    loss, metrics = _geo_mean_terms(old_log_prob, log_prob, advantages, response_mask, low, high, rollout_is_weights)
    return loss, metric_items(metrics)


# ----------------------------------------------------------------------------- DRO
def _dro_terms(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, beta, info,
               rollout_is_weights=None):
    if rollout_is_weights is None:
        loss = _kernel_loss(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode, info,
                            loss_type="dro", dro_beta=beta)
    else:  # plain torch: the quadratic penalty is not homogeneous in A
        lr = log_prob - old_log_prob
        per_token = -(log_prob * advantages - 0.5 * beta * lr.square())
        loss = agg_loss(per_token * rollout_is_weights.detach(), response_mask, loss_agg_mode, info)
    with torch.no_grad():
        metrics = {"actor/ppo_kl": masked_mean(-_log_ratio(log_prob, old_log_prob, clamp=False), response_mask)}
    return loss, metrics


def compute_policy_loss_dro(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                            config=None, rollout_is_weights=None):
    """verl "dro": `-(logp * A - beta / 2 * (logp - old)^2)` with beta = config.policy_loss.dro_beta (> 0,
    required), `loss_type="dro"`. Metric: actor/ppo_kl (unclamped log ratio)."""
    require_config(config)
    beta = _policy_loss_config(config, "dro_beta", None)
    if beta is None or not beta > 0:
        raise ValueError(f"config.policy_loss.dro_beta: expected a float > 0 for DRO, got {beta!r}")
    _check_weights(rollout_is_weights, log_prob.shape)
    loss, metrics = _dro_terms(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, float(beta),
                               _info(config), rollout_is_weights)
    return loss, metric_items(metrics)


# ----------------------------------------------------------------------------- CISPO
def _cispo_terms(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, low, high, info,
                 rollout_is_weights=None):
    loss = _kernel_loss(log_prob, old_log_prob, _weighted(advantages, rollout_is_weights), response_mask,
                        loss_agg_mode, info, loss_type=CISPO_VERL_LOSS_TYPE, epsilon_low=low, epsilon_high=high)
    with torch.no_grad():
        lr = _log_ratio(log_prob, old_log_prob, clamp=True)
        ratio = torch.exp(lr)
        metrics = {
            "actor/pg_clipfrac": masked_mean((ratio != ratio.clamp(1 - low, 1 + high)).to(lr.dtype), response_mask),
            "actor/ppo_kl": masked_mean(-lr, response_mask),
            "actor/pg_clipfrac_lower": torch.zeros((), dtype=lr.dtype, device=lr.device),
        }
    return loss, metrics


def compute_policy_loss_cispo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                              config=None, rollout_is_weights=None):
    """verl "cispo": `-sg(clip(r, 1 - low, 1 + high)) * A * logp` (`loss_type="cispo_clip"`). Metrics:
    pg_clipfrac (ratio changed by the clip), ppo_kl, pg_clipfrac_lower = 0."""
    require_config(config)
    low, high = clip_range(config)
    _check_weights(rollout_is_weights, log_prob.shape)
    loss, metrics = _cispo_terms(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, low, high,
                                 _info(config), rollout_is_weights)
    return loss, metric_items(metrics)


# ----------------------------------------------------------------------------- bypass mode
def compute_policy_loss_bypass_mode(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                    config=None, rollout_is_weights=None):
    """verl "bypass_mode" (old_log_prob is the rollout's): IS weights, rejection mask and metrics of
    `config.policy_loss.rollout_correction` (re-implemented in plain torch, `rollout_correction.py`), then
    loss_type "ppo_clip" (default): vanilla on the rejected-out mask, no IS weights; "reinforce":
    `-A * logp * w` (`loss_type="gpg"` on `A * w`) with actor/ppo_kl = mean(old - logp). The passed
    rollout_is_weights are ignored, as in verl. Metrics: the loss's plus "rollout_corr/..."."""
    from .rollout_correction import compute_rollout_correction_and_rejection_mask

    require_config(config)
    policy_loss = config_value(config, "policy_loss", None)
    rc = config_value(policy_loss, "rollout_correction", None)
    if rc is None:
        raise ValueError("config.policy_loss.rollout_correction: required for loss_mode 'bypass_mode'")
    loss_type = config_value(rc, "loss_type", "ppo_clip")
    if loss_type not in ("ppo_clip", "reinforce"):
        raise ValueError(f"config.policy_loss.rollout_correction.loss_type: expected 'reinforce' or 'ppo_clip', "
                         f"got {loss_type!r}")
    with torch.no_grad():
        weights, mask, rc_metrics = compute_rollout_correction_and_rejection_mask(
            log_prob.detach(), old_log_prob, response_mask, rollout_is=config_value(rc, "rollout_is", None),
            rollout_is_threshold=config_value(rc, "rollout_is_threshold", 2.0),
            rollout_is_batch_normalize=config_value(rc, "rollout_is_batch_normalize", False),
            rollout_rs=config_value(rc, "rollout_rs", None),
            rollout_rs_threshold=config_value(rc, "rollout_rs_threshold", None))
    if loss_type == "reinforce":
        info = _info(config)
        loss = _kernel_loss(log_prob, old_log_prob, _weighted(advantages, weights), mask, loss_agg_mode, info,
                            loss_type="gpg")
        with torch.no_grad():
            metrics = metric_items({"actor/ppo_kl": masked_mean(old_log_prob - log_prob.detach(), mask)})
    else:
        loss, metrics = compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, mask, loss_agg_mode, config)
    metrics.update(rc_metrics)
    return loss, metrics


#: verl's loss_mode names -> the drop-ins (verl's POLICY_LOSS_REGISTRY keys, 0.9.1).
POLICY_LOSSES = {
    "vanilla": compute_policy_loss_vanilla,
    "dppo_tv": compute_policy_loss_dppo_tv,
    "dppo_kl": compute_policy_loss_dppo_kl,
    "gspo": compute_policy_loss_gspo,
    "sapo": compute_policy_loss_sapo,
    "gpg": compute_policy_loss_gpg,
    "clip_cov": compute_policy_loss_clip_cov,
    "kl_cov": compute_policy_loss_kl_cov,
    "geo_mean": compute_policy_loss_geo_mean,
    "dro": compute_policy_loss_dro,
    "cispo": compute_policy_loss_cispo,
    "bypass_mode": compute_policy_loss_bypass_mode,
}
