"""pairuni_kernels.integrations.verl against verl's own formulas.

verl does not install here without replacing the environment's transformers (verl 0.9.1 pins
transformers 5.10 and pulls ray, wandb, ...), so the comparison targets are re-statements of
verl 0.9.1's `compute_grpo_outcome_advantage`, `agg_loss` and `compute_policy_loss`
(`verl/trainer/ppo/core_algos.py`, read from the PyPI wheel), written below loop by loop as verl
writes them: per-uid Python dicts of scores, verl's `masked_mean` (divides by `mask.sum() + 1e-8`),
dual clip applied with `torch.where(A < 0, ...)`.

The "real" cases run the same comparisons against verl's own functions: when `verl` imports, or
when PAIRUNI_VERL_SOURCE names a directory made by `pip install --no-deps --target DIR
verl==0.9.1` (verl's `core_algos.py` is then executed with its heavy imports stubbed, see
`load_verl_from_source` in conftest.py). Otherwise they are skipped. Every other loss mode and
estimator: test_verl_losses.py, test_verl_advantages.py.
"""

from __future__ import annotations

from collections import defaultdict
from typing import ClassVar

import numpy as np
import pytest
import torch

from pairuni_kernels.integrations import verl as pv


# ----------------------------------------------------------------------------- verl 0.9.1, re-stated
def _masked_mean(values, mask):
    return torch.where(mask.bool(), values, 0.0).mul(mask).sum() / (mask.sum() + 1e-8)


def restated_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                    norm_adv_by_std_in_grpo=True, config=None):
    scores = token_level_rewards.sum(dim=-1)
    by_uid = defaultdict(list)
    for i in range(scores.shape[0]):
        by_uid[index[i]].append(scores[i])
    mean, std = {}, {}
    for uid, values in by_uid.items():
        if len(values) == 1:  # verl: a lone response keeps its score (mean 0, std 1)
            mean[uid], std[uid] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            stacked = torch.stack(values)
            mean[uid], std[uid] = stacked.mean(), stacked.std()
    out = scores.clone()
    for i in range(scores.shape[0]):
        centred = scores[i] - mean[index[i]]
        out[i] = centred / (std[index[i]] + epsilon) if norm_adv_by_std_in_grpo else centred
    out = out.unsqueeze(-1) * response_mask
    return out, out


def restated_agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None,
                      global_batch_size=None, loss_scale_factor=None):
    row_sum = (loss_mat * loss_mask).sum(-1)
    row_count = loss_mask.sum(-1)
    row_nonempty = (row_count > 0).to(loss_mat.dtype)
    if loss_agg_mode == "token-mean":
        tokens = loss_mask.sum() if batch_num_tokens is None else batch_num_tokens
        return (loss_mat * loss_mask).sum() / tokens * dp_size
    if loss_agg_mode == "token-sum":
        return (loss_mat * loss_mask).sum() * dp_size
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        rows = row_nonempty.sum() if global_batch_size is None else global_batch_size
        loss = (row_sum * row_nonempty).sum() / rows * dp_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        return loss
    if loss_agg_mode == "seq-mean-token-mean":
        row_mean = row_sum / (row_count + 1e-8)
        rows = row_nonempty.sum() if global_batch_size is None else global_batch_size
        return (row_mean * row_nonempty).sum() / rows * dp_size
    raise ValueError(loss_agg_mode)


def restated_policy_loss_terms(old_log_prob, log_prob, advantages, response_mask, cliprange_low, cliprange_high,
                               clip_ratio_c):
    """Per-token loss and the three metrics of verl's compute_policy_loss / compute_policy_loss_vanilla."""
    log_ratio = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio)
    ppo_kl = _masked_mean(-log_ratio, response_mask)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clipped = torch.maximum(loss1, loss2)
    pg_clipfrac = _masked_mean(torch.gt(loss2, loss1).float(), response_mask)
    loss3 = -advantages * clip_ratio_c
    dual = torch.min(loss3, clipped)
    pg_clipfrac_lower = _masked_mean(torch.gt(clipped, loss3) * (advantages < 0).float(), response_mask)
    per_token = torch.where(advantages < 0, dual, clipped)
    return per_token, pg_clipfrac, ppo_kl, pg_clipfrac_lower


def restated_compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange=None,
                                 cliprange_low=None, cliprange_high=None, clip_ratio_c=3.0,
                                 loss_agg_mode="token-mean"):
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    per_token, clipfrac, kl, lower = restated_policy_loss_terms(old_log_prob, log_prob, advantages, response_mask,
                                                                low, high, clip_ratio_c)
    return restated_agg_loss(per_token, response_mask, loss_agg_mode), clipfrac, kl, lower


def restated_compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                                         config, rollout_is_weights=None):
    low = config["clip_ratio_low"] if config.get("clip_ratio_low") is not None else config["clip_ratio"]
    high = config["clip_ratio_high"] if config.get("clip_ratio_high") is not None else config["clip_ratio"]
    per_token, clipfrac, kl, lower = restated_policy_loss_terms(old_log_prob, log_prob, advantages, response_mask,
                                                                low, high, config.get("clip_ratio_c", 3.0))
    if rollout_is_weights is not None:
        per_token = per_token * rollout_is_weights
    loss = restated_agg_loss(per_token, response_mask, loss_agg_mode, **config.get("global_batch_info", {}))
    return loss, {"actor/pg_clipfrac": clipfrac.item(), "actor/ppo_kl": kl.item(),
                  "actor/pg_clipfrac_lower": lower.item()}


@pytest.fixture(params=["restated", "real"])
def verl_impl(request):
    """(advantage fn, policy loss fn, agg_loss fn) of verl: re-stated here, or verl's own when installed."""
    if request.param == "restated":
        return restated_grpo_outcome_advantage, restated_compute_policy_loss, restated_agg_loss
    core = request.getfixturevalue("verl_real")
    return core.compute_grpo_outcome_advantage, core.compute_policy_loss, core.agg_loss


# ----------------------------------------------------------------------------- inputs
AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def _policy_inputs(gen, bs=7, t=13, dtype=torch.float64):
    """Log-probs far enough from the old ones that PPO clipping and the dual clip both fire."""
    old = -torch.rand(bs, t, generator=gen, dtype=dtype) * 3
    logp = old + torch.randn(bs, t, generator=gen, dtype=dtype) * 1.2
    mask = (torch.rand(bs, t, generator=gen) > 0.25).to(dtype)
    mask[2] = 0  # a fully masked response
    mask[0, :3] = 1
    scores = torch.randn(bs, 1, generator=gen, dtype=dtype)
    scores[0], scores[1] = scores[0].abs() + 0.1, -scores[1].abs() - 0.1  # both signs, whatever the seed
    mask[1, 1] = 1
    logp[1, 1] = old[1, 1] + 1.5  # ratio 4.5 with A < 0: the dual clip binds (c = 3 or 1.5 below)
    adv = scores.expand(bs, t) * mask  # verl: scores * response_mask
    return old, logp, adv.contiguous(), mask


def _uids(gen, bs):
    """uuid-like strings in a shuffled order, groups of 3, 2, 4 and one singleton."""
    labels = ["9f1c-a", "9f1c-a", "9f1c-a", "07bd-b", "07bd-b", "e4e2-c", "e4e2-c", "e4e2-c", "e4e2-c", "55aa-d"]
    assert bs == len(labels)
    perm = torch.randperm(bs, generator=gen).tolist()
    return np.array([labels[i] for i in perm], dtype=object)


# ----------------------------------------------------------------------------- advantages
@pytest.mark.parametrize("norm", [True, False])
def test_grpo_advantage_matches_verl(verl_impl, gen, norm):
    verl_adv, _, _ = verl_impl
    bs, t = 10, 6
    mask = (torch.rand(bs, t, generator=gen) > 0.3).float()
    mask[:, 0] = 1
    rewards = torch.zeros(bs, t)
    rewards[:, -1] = torch.randn(bs, generator=gen) * 2 + 0.5  # outcome reward on the last token
    rewards[:, 0] += torch.rand(bs, generator=gen)  # and some elsewhere: verl sums over T
    index = _uids(gen, bs)
    want_adv, want_ret = verl_adv(rewards, mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=norm)
    got_adv, got_ret = pv.compute_grpo_outcome_advantage(rewards, mask, index, epsilon=1e-6,
                                                         norm_adv_by_std_in_grpo=norm)
    assert got_adv.shape == (bs, t) and got_adv.dtype == rewards.dtype
    torch.testing.assert_close(got_adv, want_adv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_ret, want_ret, rtol=1e-5, atol=1e-6)
    singleton = int(np.nonzero(index == "55aa-d")[0][0])
    assert got_adv[singleton].abs().max() > 0  # verl keeps a lone response's score; ours must too
    assert (got_adv[mask == 0] == 0).all()


def test_uids_to_group_ids_order_of_first_appearance():
    ids = pv.uids_to_group_ids(np.array(["b", "a", "b", "c", "a"], dtype=object))
    assert ids.tolist() == [0, 1, 0, 2, 1]
    assert pv.uids_to_group_ids([7, 7, 3]).tolist() == [0, 0, 1]


# ----------------------------------------------------------------------------- policy loss
@pytest.mark.parametrize("loss_agg_mode", AGG_MODES)
@pytest.mark.parametrize("clips", [{"cliprange": 0.2}, {"cliprange": 0.2, "cliprange_low": 0.1, "cliprange_high": 0.28},
                                   {"cliprange": 0.3, "clip_ratio_c": 1.5}])
def test_compute_policy_loss_matches_verl(verl_impl, gen, loss_agg_mode, clips):
    _, verl_loss, _ = verl_impl
    old, logp, adv, mask = _policy_inputs(gen)
    logp_ours = logp.clone().requires_grad_(True)
    logp_verl = logp.clone().requires_grad_(True)
    got = pv.compute_policy_loss(old, logp_ours, adv, mask, loss_agg_mode=loss_agg_mode, **clips)
    want = verl_loss(old, logp_verl, adv, mask, loss_agg_mode=loss_agg_mode, **clips)
    assert len(got) == 4
    for name, g, w in zip(("pg_loss", "pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"), got, want):
        torch.testing.assert_close(g.to(w.dtype), w, rtol=1e-6, atol=1e-7, msg=name)
    # the inputs exercise both clips, so a kernel that skipped either would fail above
    assert got[1] > 0.05 and got[3] > 0.01
    got[0].backward()
    want[0].backward()
    torch.testing.assert_close(logp_ours.grad, logp_verl.grad, rtol=1e-6, atol=1e-9)
    assert logp_ours.grad.abs().sum() > 0


def test_compute_policy_loss_float32_triton_path(triton_backend, gen):
    """The adapter on the Triton kernel (interpreted on CPU), float32, against the re-statement."""
    old, logp, adv, mask = (x.float() for x in _policy_inputs(gen, bs=4, t=9))
    logp_ours = logp.clone().to(triton_backend).requires_grad_(True)
    got = pv.compute_policy_loss(old.to(triton_backend), logp_ours, adv.to(triton_backend), mask.to(triton_backend),
                                 cliprange=0.2, loss_agg_mode="seq-mean-token-mean")
    logp_ref = logp.clone().requires_grad_(True)
    want = restated_compute_policy_loss(old, logp_ref, adv, mask, cliprange=0.2, loss_agg_mode="seq-mean-token-mean")
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-6)
    got[0].backward()
    want[0].backward()
    torch.testing.assert_close(logp_ours.grad.cpu(), logp_ref.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_agg_mode", AGG_MODES)
def test_vanilla_with_global_batch_info_and_rollout_weights(gen, loss_agg_mode):
    old, logp, adv, mask = _policy_inputs(gen)
    weights = torch.rand(mask.shape, generator=gen, dtype=mask.dtype) * 2
    weights[:, ::3] = 0  # truncated-away tokens: verl's metrics still count them
    config = {"clip_ratio": 0.2, "clip_ratio_low": None, "clip_ratio_high": 0.28, "clip_ratio_c": 2.5,
              "global_batch_info": {"dp_size": 2, "batch_num_tokens": 71, "global_batch_size": 11,
                                    "loss_scale_factor": 16}}
    logp_ours = logp.clone().requires_grad_(True)
    logp_verl = logp.clone().requires_grad_(True)
    got_loss, got_metrics = pv.compute_policy_loss_vanilla(old, logp_ours, adv, mask, loss_agg_mode, config,
                                                           rollout_is_weights=weights)
    want_loss, want_metrics = restated_compute_policy_loss_vanilla(old, logp_verl, adv, mask, loss_agg_mode, config,
                                                                   rollout_is_weights=weights)
    torch.testing.assert_close(got_loss.to(want_loss.dtype), want_loss, rtol=1e-6, atol=1e-9)
    assert got_metrics.keys() == want_metrics.keys()
    for key in want_metrics:
        assert got_metrics[key] == pytest.approx(want_metrics[key], rel=1e-6, abs=1e-7), key
    got_loss.backward()
    want_loss.backward()
    torch.testing.assert_close(logp_ours.grad, logp_verl.grad, rtol=1e-6, atol=1e-9)


def test_vanilla_reads_attribute_configs(gen):
    """verl passes an ActorConfig object (attributes), not a dict."""

    class ActorConfigLike:
        clip_ratio, clip_ratio_low, clip_ratio_high, clip_ratio_c = 0.2, None, None, 3.0
        global_batch_info: ClassVar[dict] = {}

    old, logp, adv, mask = _policy_inputs(gen)
    loss, metrics = pv.compute_policy_loss_vanilla(old, logp, adv, mask, "token-mean", ActorConfigLike())
    want = restated_compute_policy_loss(old, logp, adv, mask, cliprange=0.2)
    torch.testing.assert_close(loss.to(want[0].dtype), want[0], rtol=1e-6, atol=1e-9)
    assert metrics["actor/ppo_kl"] == pytest.approx(want[2].item(), rel=1e-6)


def test_rejects_what_verl_rejects(gen):
    old, logp, adv, mask = _policy_inputs(gen)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        pv.compute_policy_loss(old, logp, adv, mask, cliprange=0.2, clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        pv.compute_policy_loss(old, logp, adv, mask, cliprange=0.2, loss_agg_mode="mean")
    with pytest.raises(ValueError, match="batch_num_tokens"):
        pv.compute_policy_loss_vanilla(old, logp, adv, mask, "token-mean",
                                       {"clip_ratio": 0.2, "global_batch_info": {"dp_size": 2}})
    with pytest.raises(ValueError, match="index"):
        pv.compute_grpo_outcome_advantage(torch.ones(3, 2), torch.ones(3, 2), np.array(["a", "b"]))


def test_all_masked_batch_gives_zero_loss_and_gradient(gen):
    old, logp, adv, _ = _policy_inputs(gen)
    logp.requires_grad_(True)
    loss, *_ = pv.compute_policy_loss(old, logp, adv, torch.zeros_like(old), cliprange=0.2)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logp.grad).all() and (logp.grad == 0).all()
