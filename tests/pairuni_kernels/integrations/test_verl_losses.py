"""Every verl 0.9.1 policy loss of pairuni_kernels.integrations.verl against verl's formulas.

The targets are re-statements of verl's `compute_policy_loss_<mode>` written here from verl's source (per-token
formulas, verl's `masked_mean` with its + 1e-8, its `agg_loss`, its clip_cov draw from the global RNG), and,
when PAIRUNI_VERL_SOURCE (or an installed verl) provides it, verl's own functions (`verl_real`). Each case
compares the loss, its gradient in log_prob and the metric dict (keys and values) on random float64 inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

from pairuni_kernels.integrations import verl as pv


# ----------------------------------------------------------------------------- verl 0.9.1, re-stated
def mmean(values, mask, dim=None):
    return (torch.where(mask.bool(), values, 0.0) * mask).sum(dim=dim) / (mask.sum(dim=dim) + 1e-8)


def agg(loss_mat, mask, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    """verl agg_loss, row by row."""
    rows = []
    for i in range(loss_mat.shape[0]):
        tokens = [loss_mat[i, t] * mask[i, t] for t in range(loss_mat.shape[1]) if mask[i, t] != 0]
        rows.append((torch.stack(tokens).sum(), len(tokens)) if tokens else (loss_mat.new_zeros(()), 0))
    total = sum(s for s, _ in rows)
    n_tok = sum(c for _, c in rows)
    n_seq = sum(1 for _, c in rows if c > 0)
    if mode == "token-mean":
        return total / (n_tok if batch_num_tokens is None else batch_num_tokens) * dp_size
    if mode == "token-sum":
        return total * dp_size
    size = n_seq if global_batch_size is None else global_batch_size
    if mode == "seq-mean-token-mean":
        return sum(s / (c + 1e-8) for s, c in rows if c > 0) / size * dp_size
    loss = total / size * dp_size
    if mode == "seq-mean-token-sum-norm":
        loss = loss / (loss_mat.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss


def _clips(cfg):
    low = cfg.clip_ratio_low if cfg.clip_ratio_low is not None else cfg.clip_ratio
    high = cfg.clip_ratio_high if cfg.clip_ratio_high is not None else cfg.clip_ratio
    return low, high


def _items(d):
    return {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in d.items()}


def _weighted(per_token, w):
    return per_token if w is None else per_token * w


def r_vanilla(old, lp, adv, mask, mode, cfg, rollout_is_weights=None):
    w = rollout_is_weights
    low, high = _clips(cfg)
    c = cfg.get("clip_ratio_c", 3.0)
    lr = (lp - old).clamp(-20, 20)
    r = lr.exp()
    l1, l2 = -adv * r, -adv * r.clamp(1 - low, 1 + high)
    clipped = torch.maximum(l1, l2)
    per_token = torch.where(adv < 0, torch.minimum(clipped, -adv * c), clipped)
    loss = agg(_weighted(per_token, w), mask, mode, **cfg.global_batch_info)
    return loss, _items({"actor/pg_clipfrac": mmean((l2 > l1).double(), mask), "actor/ppo_kl": mmean(-lr, mask),
                         "actor/pg_clipfrac_lower": mmean(((clipped > -adv * c) & (adv < 0)).double(), mask)})


def _r_dppo(kind, old, lp, adv, mask, mode, cfg, rollout_is_weights=None):
    w = rollout_is_weights
    low, high = _clips(cfg)
    c = cfg.get("clip_ratio_c", 20.0)
    lr = (lp - old).clamp(-20, 20)
    r = lr.exp()
    p, p_old = lp.exp(), old.exp()
    if kind == "tv":
        ok_pos, ok_neg = p - p_old <= high, p - p_old >= -low
    else:
        bkl = p_old * (old - lp) + (1 - p_old) * torch.log((1 - p_old + 1e-8) / (1 - p + 1e-8))
        ok_pos, ok_neg = (bkl <= high) | (p <= p_old), (bkl <= low) | (p >= p_old)
    valid = torch.where(adv > 0, ok_pos, ok_neg).detach().double()
    per_token = -adv * r.clamp(max=c).detach() * lp * valid
    loss = agg(_weighted(per_token, w), mask, mode, **cfg.global_batch_info)
    return loss, _items({"actor/pg_clipfrac": mmean(1 - valid, mask), "actor/ppo_kl": mmean(-lr, mask),
                         "actor/pg_clipfrac_lower": mmean((r > c).double() * valid, mask)})


def r_dppo_tv(*args, **kwargs):
    return _r_dppo("tv", *args, **kwargs)


def r_dppo_kl(*args, **kwargs):
    return _r_dppo("kl", *args, **kwargs)


def r_gspo(old, lp, adv, mask, mode, cfg, rollout_is_weights=None):
    w = rollout_is_weights
    low, high = _clips(cfg)
    lr = lp - old
    seq = torch.stack([(lr[i] * mask[i]).sum() / mask[i].sum().clamp(min=1) for i in range(lp.shape[0])])
    s = torch.exp((lp - lp.detach() + seq.detach()[:, None]).clamp(max=10.0))
    l1, l2 = -adv * s, -adv * s.clamp(1 - low, 1 + high)
    loss = agg(_weighted(torch.maximum(l1, l2), w), mask, mode, **cfg.global_batch_info)
    return loss, _items({"actor/pg_clipfrac": mmean((l2 > l1).double(), mask), "actor/ppo_kl": mmean(-lr, mask),
                         "actor/pg_clipfrac_lower": 0.0})


def r_sapo(old, lp, adv, mask, mode, cfg, rollout_is_weights=None):
    w = rollout_is_weights
    lr = (lp - old).clamp(-20, 20)
    tau = torch.where(adv > 0, torch.full_like(adv, cfg.tau_pos), torch.full_like(adv, cfg.tau_neg))
    per_token = -torch.sigmoid(tau * (lr.exp() - 1)) * 4 / tau * adv
    loss = agg(_weighted(per_token, w), mask, "seq-mean-token-mean", **cfg.global_batch_info)
    return loss, _items({"actor/pg_clipfrac": 0.0, "actor/ppo_kl": mmean(-lr, mask), "actor/pg_clipfrac_lower": 0.0})


def r_gpg(old, lp, adv, mask, mode, cfg, rollout_is_weights=None):
    w = rollout_is_weights
    return agg(_weighted(-lp * adv, w), mask, mode, **cfg.global_batch_info), {}


def r_clip_cov(old, lp, adv, mask, mode, cfg, rollout_is_weights=None):
    w = rollout_is_weights
    """verl's clip_cov: candidates in row-major order, `torch.randperm` on the global RNG picks the first ones."""
    low, high = _clips(cfg)
    pl = cfg.policy_loss
    lr = lp - old
    r = lr.exp()
    l1, l2 = -adv * r, -adv * r.clamp(1 - low, 1 + high)
    cov = (adv - mmean(adv, mask)) * (lp - mmean(lp.detach(), mask))
    cand = [(i, t) for i in range(lp.shape[0]) for t in range(lp.shape[1])
            if mask[i, t] > 0 and not l2[i, t] > l1[i, t] and pl.clip_cov_lb < cov[i, t] < pl.clip_cov_ub]
    keep = torch.ones_like(adv)
    if cand:
        num = max(int(pl.clip_cov_ratio * mask.sum().item()), 1)
        for j in torch.randperm(len(cand))[:num].tolist():
            keep[cand[j]] = 0
    loss = agg(_weighted(torch.maximum(l1, l2) * keep, w), mask, mode, **cfg.global_batch_info)
    return loss, _items({"actor/pg_clipfrac": mmean((keep == 0).double(), mask), "actor/ppo_kl": mmean(-lr, mask)})


def r_kl_cov(old, lp, adv, mask, mode, cfg, rollout_is_weights=None):
    w = rollout_is_weights
    pl = cfg.policy_loss
    lr = lp - old
    valid = [(i, t) for i in range(lp.shape[0]) for t in range(lp.shape[1]) if mask[i, t] > 0]
    a = torch.stack([adv[p] for p in valid]).detach()
    g = torch.stack([lp[p] for p in valid]).detach()
    cov = (a - a.mean()) * (g - g.mean())
    chosen = {valid[j] for j in torch.topk(cov, max(1, int(len(valid) * pl.kl_cov_ratio))).indices.tolist()}
    pick = torch.tensor([[(i, t) in chosen for t in range(lp.shape[1])] for i in range(lp.shape[0])])
    per_token = -adv * lr.exp() + torch.where(pick, pl.ppo_kl_coef * lr.abs(), 0.0)
    return (agg(_weighted(per_token, w), mask, mode, **cfg.global_batch_info),
            _items({"actor/ppo_kl": mmean(lr.abs(), mask)}))


def r_geo_mean(old, lp, adv, mask, mode, cfg, rollout_is_weights=None):
    w = rollout_is_weights
    low, high = _clips(cfg)
    lr = lp - old
    rows = []
    for i in range(lp.shape[0]):
        n = mask[i].sum()
        s = torch.sign(adv[i])
        lr_min = s * torch.minimum(s * lr[i], s * lr[i].clamp(-low, high))
        loss_i = -(adv[i] * mask[i]).sum() / (n + 1e-8) * torch.exp((lr_min * mask[i]).sum() / (n + 1e-8))
        if w is not None:
            loss_i = loss_i * torch.exp((torch.log(w[i] + 1e-10) * mask[i]).sum() / (n + 1e-8))
        rows.append(loss_i)
    clipped = lr != lr.clamp(-low, high)
    return torch.stack(rows).mean(), _items({
        "actor/pg_clipfrac": mmean((clipped & (adv > 0)).double(), mask), "actor/ppo_kl": mmean(-lr, mask),
        "actor/pg_clipfrac_lower": mmean((clipped & (adv < 0)).double(), mask)})


def r_dro(old, lp, adv, mask, mode, cfg, rollout_is_weights=None):
    w = rollout_is_weights
    lr = lp - old
    per_token = -(lp * adv - 0.5 * cfg.policy_loss.dro_beta * lr**2)
    return (agg(_weighted(per_token, w), mask, mode, **cfg.global_batch_info),
            _items({"actor/ppo_kl": mmean(-lr, mask)}))


def r_cispo(old, lp, adv, mask, mode, cfg, rollout_is_weights=None):
    w = rollout_is_weights
    low, high = _clips(cfg)
    lr = (lp - old).clamp(-20, 20)
    r = lr.exp()
    rc = r.clamp(1 - low, 1 + high)
    per_token = -rc.detach() * adv * lp
    return agg(_weighted(per_token, w), mask, mode, **cfg.global_batch_info), _items({
        "actor/pg_clipfrac": mmean((r != rc).double(), mask), "actor/ppo_kl": mmean(-lr, mask),
        "actor/pg_clipfrac_lower": 0.0})


RESTATED = {"vanilla": r_vanilla, "dppo_tv": r_dppo_tv, "dppo_kl": r_dppo_kl, "gspo": r_gspo, "sapo": r_sapo,
            "gpg": r_gpg, "clip_cov": r_clip_cov, "kl_cov": r_kl_cov, "geo_mean": r_geo_mean, "dro": r_dro,
            "cispo": r_cispo}
MODES = sorted(RESTATED)
AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


# ----------------------------------------------------------------------------- inputs
def _inputs(gen, bs=6, t=11):
    """Token probabilities in (0, 1) (DPPO's binary KL needs p < 1) moved far enough that clips bind."""
    p_old = torch.rand(bs, t, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    shift = torch.randn(bs, t, generator=gen, dtype=torch.float64) * 1.5
    p_old[3] *= 0.3  # a row whose sequence ratio leaves GSPO's clip range upwards (its A is made > 0 below)
    shift[3] += 2.0
    p = torch.sigmoid(torch.logit(p_old) + shift)
    mask = (torch.rand(bs, t, generator=gen) > 0.2).double()
    mask[2] = 0  # an empty response
    mask[0, :4] = 1
    mask[1, 1] = 1
    scores = torch.randn(bs, 1, generator=gen, dtype=torch.float64) * 1.5
    scores[0], scores[1] = scores[0].abs() + 0.1, -scores[1].abs() - 0.1  # both signs, whatever the seed
    scores[3] = scores[3].abs() + 0.1
    p_old[1, 1], p[1, 1] = 0.08, 0.4  # ratio 5 on an A < 0 token: the dual clip binds
    adv = scores.expand(bs, t) * mask
    return p_old.log(), p.log(), adv.contiguous(), mask


def _config(cls, info=None, **policy_loss):
    pl = {"clip_cov_ratio": 0.1, "clip_cov_lb": 0.05, "clip_cov_ub": 3.0, "kl_cov_ratio": 0.1, "ppo_kl_coef": 0.7,
          "dro_beta": 0.4} | policy_loss
    return cls(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=0.28, clip_ratio_c=2.5, tau_pos=1.0, tau_neg=1.05,
               global_batch_info=info or {}, policy_loss=cls(**pl))


def _run(fn, old, logp, adv, mask, mode, cfg, weights=None, seed=None):
    lp = logp.clone().requires_grad_(True)
    if seed is not None:
        torch.manual_seed(seed)
    loss, metrics = fn(old, lp, adv, mask, mode, cfg, rollout_is_weights=weights) if weights is not None else \
        fn(old, lp, adv, mask, mode, cfg)
    loss.backward()
    return loss.detach(), metrics, lp.grad


def _compare(got, want):
    (g_loss, g_metrics, g_grad), (w_loss, w_metrics, w_grad) = got, want
    torch.testing.assert_close(g_loss.double(), w_loss.double(), rtol=1e-6, atol=1e-9)
    assert g_metrics.keys() == w_metrics.keys()
    for key, value in w_metrics.items():
        assert g_metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-8), key
    torch.testing.assert_close(g_grad, w_grad, rtol=1e-6, atol=1e-9)


@pytest.fixture(params=["restated", "real"])
def verl_losses(request):
    """{mode: verl's policy loss}: re-stated here, or verl's own (skipped without verl's source)."""
    if request.param == "restated":
        return RESTATED
    return request.getfixturevalue("verl_real").POLICY_LOSS_REGISTRY


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_matches_verl(verl_losses, verl_config, gen, mode):
    """Loss, gradient and metrics of every loss mode, default aggregation, no rollout weights."""
    old, logp, adv, mask = _inputs(gen)
    cfg = _config(verl_config)
    want = _run(verl_losses[mode], old, logp, adv, mask, "token-mean", cfg, seed=7)
    got = _run(pv.POLICY_LOSSES[mode], old, logp, adv, mask, "token-mean", cfg, seed=7)
    _compare(got, want)
    assert got[2].abs().sum() > 0


@pytest.mark.parametrize("loss_agg_mode", AGG_MODES)
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_every_aggregation_with_rollout_weights(verl_losses, verl_config, gen, mode, loss_agg_mode):
    """verl's agg_loss with a global batch (dp_size 2) and rollout IS weights, some 0."""
    old, logp, adv, mask = _inputs(gen)
    weights = torch.rand(mask.shape, generator=gen, dtype=torch.float64) * 2
    weights[:, ::4] = 0
    info = {"dp_size": 2, "batch_num_tokens": 97, "global_batch_size": 13, "loss_scale_factor": 16}
    cfg = _config(verl_config, info)
    want = _run(verl_losses[mode], old, logp, adv, mask, loss_agg_mode, cfg, weights, seed=3)
    got = _run(pv.POLICY_LOSSES[mode], old, logp, adv, mask, loss_agg_mode, cfg, weights, seed=3)
    _compare(got, want)


def test_metrics_fire(verl_config, gen):
    """The inputs make each mode's clip / truncation / selection metrics non-zero, so the comparisons above see
    them (a drop-in that skipped a clip would fail there)."""
    old, logp, adv, mask = _inputs(gen)
    cfg = _config(verl_config)
    fired = {}
    for mode in ("vanilla", "dppo_tv", "dppo_kl", "gspo", "clip_cov", "geo_mean", "cispo"):
        torch.manual_seed(0)
        _, metrics = pv.POLICY_LOSSES[mode](old, logp, adv, mask, "token-mean", cfg)
        fired[mode] = metrics["actor/pg_clipfrac"]
    assert all(v > 0 for v in fired.values()), fired
    _, m = pv.compute_policy_loss_vanilla(old, logp, adv, mask, "token-mean", cfg)
    assert m["actor/pg_clipfrac_lower"] > 0


def test_clip_cov_draws_like_verl(verl_config, gen):
    """Same torch seed, same zeroed tokens: the pick comes from torch.randperm on the global RNG, as verl's does;
    another seed picks other tokens (so the comparison above can fail)."""
    old, logp, adv, mask = _inputs(gen, bs=8, t=16)
    cfg = _config(verl_config, clip_cov_ratio=0.02)
    losses = {}
    for seed in range(6):
        got = _run(pv.compute_policy_loss_clip_cov, old, logp, adv, mask, "token-mean", cfg, seed=seed)
        want = _run(RESTATED["clip_cov"], old, logp, adv, mask, "token-mean", cfg, seed=seed)
        _compare(got, want)
        losses[seed] = got[0].item()
    assert len(set(losses.values())) > 1, "every seed zeroed the same tokens: the draw is not exercised"


@pytest.mark.parametrize("mode", MODES)
def test_float32_triton_path(triton_backend, verl_config, gen, mode):
    """The Triton kernel (interpreted on CPU; compiled on a GPU) under the drop-in, float32, with rollout weights,
    against the float64 re-statement."""
    old, logp, adv, mask = (x.float() for x in _inputs(gen, bs=4, t=9))
    weights = torch.rand(mask.shape, generator=gen) * 2
    cfg = _config(verl_config, clip_cov_ratio=0.2)
    dev = triton_backend
    got = _run(pv.POLICY_LOSSES[mode], old.to(dev), logp.to(dev), adv.to(dev), mask.to(dev), "seq-mean-token-mean",
               cfg, weights.to(dev), seed=5)
    want = _run(RESTATED[mode], old.double(), logp.double(), adv.double(), mask.double(), "seq-mean-token-mean", cfg,
                weights.double(), seed=5)
    torch.testing.assert_close(got[0].cpu().double(), want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2].cpu().double(), want[2], rtol=1e-5, atol=1e-6)
    for key, value in want[1].items():
        assert got[1][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


# ----------------------------------------------------------------------------- bypass mode
def _bypass_config(cls, **rc):
    return _config(cls, rollout_correction=cls(**rc))


def _median_row(stat, mask, how):
    """The median over the non-empty rows of a row statistic of a per-token one (sum, mean or max)."""
    keep = mask.sum(-1) > 0
    if how == "sum":
        rows = (stat * mask).sum(-1)
    elif how == "mean":
        rows = (stat * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    else:
        rows = stat.masked_fill(mask == 0, float("-inf")).max(-1).values
    return rows[keep].median().item()


def _bypass_case(case, old, logp, mask):
    """Rollout-correction settings with thresholds set from the inputs so that they reject some tokens and rows
    but not all, whatever the seed (bounds of rejection sampling at medians, IcePop's band around them)."""
    lr = logp - old
    k1, k2, k3 = -lr, 0.5 * lr**2, lr.exp() - 1 - lr
    valid = k1[mask != 0]
    q25, q75 = valid.quantile(0.25).item(), valid.quantile(0.75).item()
    rows = mask.sum(-1) > 0
    seq_lr = (lr * mask).sum(-1)[rows].min().item()  # IcePop zeroes the row of lowest sequence ratio only
    return [
        {"loss_type": "ppo_clip", "rollout_is": "token", "rollout_is_threshold": 2.0, "rollout_rs": "token_k1",
         "rollout_rs_threshold": f"{math.exp(q25)}_{math.exp(q75)}"},
        {"loss_type": "reinforce", "rollout_is": "token", "rollout_is_threshold": 1.5},
        {"loss_type": "reinforce", "rollout_is": "sequence", "rollout_is_threshold": f"{math.exp(seq_lr) * (1 + 1e-6)}_1e6",
         "rollout_is_batch_normalize": True, "rollout_rs": "seq_mean_k3,seq_max_k2",
         "rollout_rs_threshold": f"{1e6},{_median_row(k2, mask, 'max') + 1e-9}"},
        {"loss_type": "ppo_clip", "rollout_is": None, "rollout_rs": "seq_sum_k1,token_k3,seq_sum_k2",
         "rollout_rs_threshold": f"1e-9_{math.exp(_median_row(k1, mask, 'sum')) * (1 + 1e-9)},"
                                 f"{k3[mask != 0].quantile(0.9).item()},1e6"},
        {"loss_type": "reinforce", "rollout_is": "token", "rollout_is_threshold": f"{math.exp(q25)}_{math.exp(q75)}",
         "rollout_is_batch_normalize": True, "rollout_rs": "seq_mean_k1,seq_max_k3,seq_sum_k3",
         "rollout_rs_threshold": f"1e-9_1e9,1e6,{_median_row(k3, mask, 'sum') + 1e-9}"},
    ][case]


@pytest.mark.parametrize("case", range(5))
def test_bypass_mode_matches_verl(verl_real, verl_config, gen, case):
    """bypass_mode's loss, gradient and its ~60 rollout_corr/ metrics against verl's own code."""
    old, logp, adv, mask = _inputs(gen)
    settings = _bypass_case(case, old, logp, mask)
    cfg = _bypass_config(verl_config, **settings)
    want = _run(verl_real.POLICY_LOSS_REGISTRY["bypass_mode"], old, logp, adv, mask, "seq-mean-token-mean", cfg)
    got = _run(pv.compute_policy_loss_bypass_mode, old, logp, adv, mask, "seq-mean-token-mean", cfg)
    _compare(got, want)
    assert got[2].abs().sum() > 0 and len(got[1]) > 20
    if settings.get("rollout_rs"):  # the thresholds reject some tokens, not all
        assert 0 < got[1]["rollout_corr/rollout_rs_masked_fraction"] < 1


def test_bypass_mode_restated(verl_config, gen):
    """bypass_mode against a re-statement of its token-level TIS + token_k1 rejection path (both loss types)."""
    old, logp, adv, mask = _inputs(gen)
    lr = logp - old
    w = torch.exp(lr.clamp(-20, 20)) * mask
    w = w.clamp(max=1.5)
    keep = ((-lr >= torch.log(torch.tensor(0.5, dtype=torch.float64))) & (-lr <= torch.log(
        torch.tensor(1.8, dtype=torch.float64)))).double()
    kept = mask * keep
    for loss_type in ("ppo_clip", "reinforce"):
        cfg = _bypass_config(verl_config, loss_type=loss_type, rollout_is="token", rollout_is_threshold=1.5,
                             rollout_rs="token_k1", rollout_rs_threshold="0.5_1.8")
        lp = logp.clone().requires_grad_(True)
        got, metrics = pv.compute_policy_loss_bypass_mode(old, lp, adv, mask, "token-mean", cfg)
        lp2 = logp.clone().requires_grad_(True)
        if loss_type == "ppo_clip":
            want, want_m = r_vanilla(old, lp2, adv, kept, "token-mean", cfg)
        else:
            want = agg(-adv * lp2 * w, kept, "token-mean")
            want_m = {"actor/ppo_kl": mmean(old - logp, kept).item()}
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-9)
        got.backward()
        want.backward()
        torch.testing.assert_close(lp.grad, lp2.grad, rtol=1e-6, atol=1e-9)
        for key, value in want_m.items():
            assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9)
        assert metrics["rollout_corr/rollout_is_mean"] == pytest.approx(mmean(w, mask).item(), rel=1e-9)
        assert metrics["rollout_corr/rollout_rs_masked_fraction"] == pytest.approx(mmean(1 - keep, mask).item())
        assert metrics["rollout_corr/kl"] == pytest.approx(mmean(old - logp, mask).item(), rel=1e-9)
        assert 0 < metrics["rollout_corr/rollout_rs_masked_fraction"] < 1


# ----------------------------------------------------------------------------- registry, errors, compile
def test_registered_names_are_verls(verl_real):
    assert set(pv.POLICY_LOSSES) == set(verl_real.POLICY_LOSS_REGISTRY)
    assert set(pv.ADVANTAGE_ESTIMATORS) == {e.value for e in verl_real.AdvantageEstimator}
    assert set(pv.ADVANTAGE_ESTIMATORS) == set(verl_real.ADV_ESTIMATOR_REGISTRY)


def test_register_all_into_verls_registries(verl_real, monkeypatch):
    """With verl's own decorator-style register functions (a prefix avoids register_adv_est's refusal) and with
    plain dicts; verl's get_policy_loss_fn / get_adv_estimator_fn then hand out our functions."""
    monkeypatch.setattr(verl_real, "POLICY_LOSS_REGISTRY", dict(verl_real.POLICY_LOSS_REGISTRY))
    monkeypatch.setattr(verl_real, "ADV_ESTIMATOR_REGISTRY", dict(verl_real.ADV_ESTIMATOR_REGISTRY))
    names = pv.register_all((verl_real.register_policy_loss, verl_real.register_adv_est), prefix="pairuni_")
    assert len(names["policy_losses"]) == 12 and len(names["advantage_estimators"]) == 14
    assert verl_real.get_policy_loss_fn("pairuni_gspo") is pv.compute_policy_loss_gspo
    assert verl_real.get_adv_estimator_fn("pairuni_rloo") is pv.compute_rloo_outcome_advantage
    assert verl_real.get_policy_loss_fn("gspo") is not pv.compute_policy_loss_gspo


def test_register_all_with_plain_registries():
    losses, estimators = {}, {}

    def into(d):
        return lambda name: (lambda fn: d.__setitem__(name, fn))

    names = pv.register_all((into(losses), into(estimators)))
    assert losses == pv.POLICY_LOSSES and estimators == pv.ADVANTAGE_ESTIMATORS
    assert names["policy_losses"] == list(pv.POLICY_LOSSES)
    with pytest.raises(ImportError, match="registry_fns"):
        pv.register_all()


def test_rejects_what_verl_rejects(verl_config, gen):
    old, logp, adv, mask = _inputs(gen)
    cfg = _config(verl_config, dro_beta=None)
    with pytest.raises(ValueError, match="dro_beta"):
        pv.compute_policy_loss_dro(old, logp, adv, mask, "token-mean", cfg)
    with pytest.raises(ValueError, match="config"):
        pv.compute_policy_loss_gspo(old, logp, adv, mask)
    with pytest.raises(ValueError, match="clip_cov_ratio"):
        pv.compute_policy_loss_clip_cov(old, logp, adv, mask, "token-mean", _config(verl_config, clip_cov_ratio=0.0))
    with pytest.raises(ValueError, match="rollout_correction"):
        pv.compute_policy_loss_bypass_mode(old, logp, adv, mask, "token-mean", _config(verl_config))
    with pytest.raises(ValueError, match="rollout_rs"):
        pv.compute_policy_loss_bypass_mode(old, logp, adv, mask, "token-mean",
                                           _bypass_config(verl_config, rollout_rs="token_k9", rollout_rs_threshold=2.0))
    with pytest.raises(ValueError, match="rollout_is_weights"):
        pv.compute_policy_loss_sapo(old, logp, adv, mask, "token-mean", _config(verl_config), -torch.ones_like(adv))


def test_compile_fullgraph_loss_terms(verl_config, gen):
    """The tensor part of two modes (loss and metric tensors, before verl's `.item()`) traces with
    torch.compile(fullgraph=True); the `.item()` metric dict and input checks stay outside the graph."""
    from pairuni_kernels.integrations.verl import losses

    old, logp, adv, mask = _inputs(gen)

    def vanilla(o, lp, a, m):
        return losses._vanilla_terms(o, lp, a, m, "seq-mean-token-mean", 0.2, 0.28, 2.5, {})

    def sapo(o, lp, a, m):
        return losses._sapo_terms(o, lp, a, m, 1.0, 1.05, {})

    for fn in (vanilla, sapo):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        lp1, lp2 = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
        (loss_c, m_c), (loss_e, m_e) = compiled(old, lp1, adv, mask), fn(old, lp2, adv, mask)
        torch.testing.assert_close(loss_c, loss_e)
        for key in m_e:
            torch.testing.assert_close(m_c[key], m_e[key])
        loss_c.backward()
        loss_e.backward()
        torch.testing.assert_close(lp1.grad, lp2.grad)
