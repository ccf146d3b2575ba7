"""Every verl 0.9.1 advantage estimator of pairuni_kernels.integrations.verl against verl's formulas.

Targets: loop-by-loop re-statements of verl's `compute_*_advantage*` written here (per-uid Python dicts, verl's
masked_whiten with its + 1e-8 and unbiased variance), and verl's own functions when PAIRUNI_VERL_SOURCE (or an
installed verl) provides them (`verl_real`). Inputs: uuid-like uids in shuffled order with groups of 3, 2, 4
and a lone response; response masks with holes (multi-turn observation tokens); float64.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch

from pairuni_kernels.integrations import verl as pv


# ----------------------------------------------------------------------------- verl 0.9.1, re-stated
def mmean(values, mask):
    return (torch.where(mask.bool(), values, 0.0) * mask).sum() / (mask.sum() + 1e-8)


def whiten(values, mask):
    mean = mmean(values, mask)
    n = mask.sum()
    var = mmean((values - mean) ** 2, mask) * n / (n - 1)
    return (values - mean) * torch.rsqrt(var + 1e-8)


def _groups(index):
    groups = defaultdict(list)
    for i, uid in enumerate(index):
        groups[uid].append(i)
    return groups


def r_grpo(token_level_rewards, response_mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True, config=None,
           **_):
    s = token_level_rewards.sum(-1)
    out = s.clone()
    for members in _groups(index).values():
        vals = s[members]
        mean, std = (vals.mean(), vals.std()) if len(members) > 1 else (0.0, 1.0)
        for i in members:
            out[i] = (s[i] - mean) / (std + epsilon) if norm_adv_by_std_in_grpo else s[i] - mean
    out = out[:, None] * response_mask
    return out, out


def r_gdpo(token_level_rewards, response_mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True, config=None,
           non_tensor_batch=None, batch=None, **_):
    if config is not None and non_tensor_batch is not None and batch is not None:
        comps = [torch.tensor(np.asarray(non_tensor_batch[k], dtype=np.float32))[:, None]
                 for k in config.gdpo_reward_keys]
        weights = list(config.get("gdpo_reward_weights") or [1.0] * len(comps))
    else:
        comps, weights = [token_level_rewards], [1.0]
    total = 0
    for w, comp in zip(weights, comps):
        total = total + torch.tensor(w, dtype=torch.float32) * r_grpo(
            comp, torch.ones_like(comp), index, epsilon, norm_adv_by_std_in_grpo)[0] * response_mask
    out = whiten(total, response_mask) * response_mask
    return out, out


def r_passk(token_level_rewards, response_mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True, config=None,
            **_):
    norm = config.get("norm_adv_by_std_in_grpo", True)
    s = token_level_rewards.sum(-1)
    out = torch.zeros_like(s)
    for members in _groups(index).values():
        vals = s[members]
        best = max(range(len(members)), key=lambda j: (vals[j].item(), -j))
        second = sorted(vals.tolist())[-2]
        adv = vals[best] - second
        out[members[best]] = adv / (vals.std() + epsilon) if norm else adv
    out = out[:, None] * response_mask
    return out, out


def r_rfpp_baseline(token_level_rewards, response_mask, index, epsilon=1e-6, config=None, **_):
    s = token_level_rewards.sum(-1)
    out = s.clone()
    for members in _groups(index).values():
        mean = s[members].mean() if len(members) > 1 else 0.0
        for i in members:
            out[i] = s[i] - mean
    tiled = out[:, None].expand_as(response_mask) * response_mask
    out = whiten(tiled, response_mask) * response_mask
    return out, out


def _r_rloo(token_level_rewards, response_mask, index, lone_keeps):
    s = token_level_rewards.sum(-1)
    out = s.clone()
    for members in _groups(index).values():
        n = len(members)
        for i in members:
            if n > 1:
                out[i] = s[i] - (s[members].sum() - s[i]) / (n - 1)  # the mean of the others
            elif not lone_keeps:
                out[i] = 0.0
    out = out[:, None] * response_mask
    return out, out


def r_rloo(token_level_rewards, response_mask, index, epsilon=1e-6, config=None, **_):
    return _r_rloo(token_level_rewards, response_mask, index, lone_keeps=True)


def r_rloo_vectorized(token_level_rewards, response_mask, index, epsilon=1e-6, config=None, **_):
    return _r_rloo(token_level_rewards, response_mask, index, lone_keeps=False)


def r_opo(token_level_rewards, response_mask, index, epsilon=1e-6, config=None, **_):
    s = token_level_rewards.sum(-1)
    length = response_mask.sum(-1)
    out = s.clone()
    for members in _groups(index).values():
        base = (length[members] * s[members]).sum() / length[members].sum() if len(members) > 1 else 0.0
        for i in members:
            out[i] = s[i] - base
    out = out[:, None] * response_mask
    return out, out


def r_rfpp(token_level_rewards, response_mask, config=None, **_):
    returns = torch.zeros_like(token_level_rewards)
    for i in range(returns.shape[0]):
        running = 0.0
        for t in reversed(range(returns.shape[1])):
            if response_mask[i, t]:
                running = token_level_rewards[i, t] + config.gamma * running
                returns[i, t] = running
    return whiten(returns, response_mask) * response_mask, returns


def r_remax(token_level_rewards, reward_baselines, response_mask, config=None, **_):
    returns = torch.zeros_like(token_level_rewards)
    for i in range(returns.shape[0]):
        acc = 0.0
        for t in reversed(range(returns.shape[1])):
            acc = acc + token_level_rewards[i, t] * response_mask[i, t]
            returns[i, t] = acc
    return returns - reward_baselines[:, None] * response_mask, returns


def r_gpg(token_level_rewards, response_mask, index, epsilon=1e-6, f_norm=1.0, alpha=1.0, config=None, **_):
    s = token_level_rewards.sum(-1)
    alpha = s.shape[0] / max(int((s != 0).sum()), 1)
    out = s.clone()
    for members in _groups(index).values():
        mean = s[members].mean() if len(members) > 1 else 0.0
        for i in members:
            out[i] = alpha * (s[i] - mean) / f_norm
    out = out[:, None] * response_mask
    return out, out


def r_gae(token_level_rewards, values, response_mask, gamma, lam, **_):
    bs, t_len = values.shape
    adv = torch.zeros_like(values)
    for i in range(bs):
        next_v, next_a = 0.0, 0.0
        for t in reversed(range(t_len)):
            if response_mask[i, t]:
                next_a = token_level_rewards[i, t] + gamma * next_v - values[i, t] + gamma * lam * next_a
                next_v = values[i, t]
            adv[i, t] = next_a
    return whiten(adv, response_mask), adv + values


def r_otb(token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared, rollout_is_weights=None,
          handle_zero_tail=True, epsilon=1e-8, **_):
    """Raw-position variant: position k of the packed loop is the raw index t itself."""
    bs, t_len = response_mask.shape
    w_tok = 1 - 2 * old_log_probs.exp() + sum_pi_squared
    if rollout_is_weights is not None:
        w_tok = w_tok * rollout_is_weights**2
    G = (token_level_rewards * response_mask).flip(-1).cumsum(-1).flip(-1)
    W = (w_tok * response_mask).cumsum(-1)
    lengths = [int(response_mask[i].sum()) for i in range(bs)]
    base = torch.zeros_like(G)
    for members in _groups(index).values():
        if len(members) == 1:
            continue
        for t in range(t_len):
            num = sum(G[j, t] * W[j, t] * response_mask[j, t] for j in members)
            den = sum(W[j, t] * response_mask[j, t] for j in members) + epsilon
            for i in members:
                base[i, t] = num / den
        ordered = sorted(lengths[j] for j in members)
        longest = [j for j in members if lengths[j] == ordered[-1]]
        if handle_zero_tail and len(longest) == 1 and ordered[-1] > ordered[-2]:
            base[longest[0], ordered[-2]:] = 0.0
    return (G - base) * response_mask, G


def r_tir_otb(token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared, rollout_is_weights=None,
              handle_zero_tail=True, epsilon=1e-8, **_):
    """Multi-turn variant: position k is a row's k-th response token; empty rows join no group."""
    bs, t_len = response_mask.shape
    w_tok = 1 - 2 * old_log_probs.exp() + sum_pi_squared
    if rollout_is_weights is not None:
        w_tok = w_tok * rollout_is_weights**2
    G = (token_level_rewards * response_mask).flip(-1).cumsum(-1).flip(-1)
    W = (w_tok * response_mask).cumsum(-1)
    tokens = [[t for t in range(t_len) if response_mask[i, t]] for i in range(bs)]
    adv = torch.zeros_like(G)
    for members in _groups(index).values():
        members = [i for i in members if tokens[i]]
        ordered = sorted(len(tokens[j]) for j in members)
        longest = [j for j in members if len(tokens[j]) == ordered[-1]]
        for i in members:
            for k, t in enumerate(tokens[i]):
                base = 0.0
                if len(members) > 1:
                    num = sum(G[j, tokens[j][k]] * W[j, tokens[j][k]] for j in members if k < len(tokens[j]))
                    den = sum(W[j, tokens[j][k]] for j in members if k < len(tokens[j]))
                    base = num / (den + epsilon)
                    if handle_zero_tail and longest == [i] and ordered[-1] > ordered[-2] and k >= ordered[-2]:
                        base = 0.0
                adv[i, t] = (G[i, t] - base) * response_mask[i, t]
    return adv, G


RESTATED = {"gae": r_gae, "grpo": r_grpo, "grpo_vectorized": r_grpo, "gdpo": r_gdpo, "grpo_passk": r_passk,
            "reinforce_plus_plus_baseline": r_rfpp_baseline, "rloo": r_rloo, "opo": r_opo,
            "reinforce_plus_plus": r_rfpp,
            "remax": r_remax, "gpg": r_gpg, "rloo_vectorized": r_rloo_vectorized, "optimal_token_baseline": r_otb,
            "tir_optimal_token_baseline": r_tir_otb}
ESTIMATORS = sorted(RESTATED)


# ----------------------------------------------------------------------------- inputs
LABELS = ["9f1c-a"] * 3 + ["07bd-b"] * 2 + ["e4e2-c"] * 4 + ["55aa-d"]


def _kwargs(gen, name, cls, bs=10, t=9, lone=True, **extra):
    """The keyword arguments verl's trainer (compute_advantage) hands this estimator."""
    labels = LABELS if lone else LABELS[:-1] + ["07bd-b"]
    index = np.array([labels[i] for i in torch.randperm(bs, generator=gen).tolist()], dtype=object)
    mask = (torch.rand(bs, t, generator=gen) > 0.25).double()
    mask[:, 0] = 1
    rewards = torch.zeros(bs, t, dtype=torch.float64)
    rewards[:, -1] = torch.randn(bs, generator=gen, dtype=torch.float64) * 2 + 0.5
    rewards[:, 2] += torch.rand(bs, generator=gen, dtype=torch.float64)  # some reward elsewhere (verl sums over T)
    rewards[3] = 0.0  # a zero score (GPG counts the nonzero ones)
    config = cls(gamma=0.9, norm_adv_by_std_in_grpo=True, gdpo_reward_keys=["fmt", "acc"],
                 gdpo_reward_weights=[0.7, 1.3])
    kw = {"token_level_rewards": rewards, "response_mask": mask, "config": config, "index": index}
    if name == "gae":
        kw = {"token_level_rewards": rewards, "values": torch.randn(bs, t, generator=gen, dtype=torch.float64),
              "response_mask": mask, "gamma": 0.95, "lam": 0.9}
    elif name == "remax":
        kw["reward_baselines"] = torch.randn(bs, generator=gen, dtype=torch.float64)
    elif name in ("optimal_token_baseline", "tir_optimal_token_baseline"):
        kw["old_log_probs"] = -torch.rand(bs, t, generator=gen, dtype=torch.float64) * 3
        kw["sum_pi_squared"] = torch.rand(bs, t, generator=gen, dtype=torch.float64) * 0.5
        kw["rollout_is_weights"] = torch.rand(bs, t, generator=gen, dtype=torch.float64) + 0.5
        mask[index == "e4e2-c"] = 1  # the zero tail: one strictly longest response in that group
        mask[np.nonzero(index == "e4e2-c")[0][:3], 6:] = 0
        if name == "tir_optimal_token_baseline":  # an empty response: it leaves its group (here: one left)
            mask[np.nonzero(index == "07bd-b")[0][0]] = 0
    elif name == "gdpo":
        kw["non_tensor_batch"] = {"fmt": np.round(np.random.default_rng(0).random(bs), 1),
                                  "acc": np.arange(bs) % 3 * 0.5, "uid": index}
        kw["batch"] = {"prompts": torch.zeros(bs, 4), "attention_mask": torch.ones(bs, 4 + t, dtype=torch.int64)}
    return kw | extra


@pytest.fixture(params=["restated", "real"])
def verl_estimators(request):
    if request.param == "restated":
        return RESTATED
    return request.getfixturevalue("verl_real").ADV_ESTIMATOR_REGISTRY


def _compare(got, want, rtol=1e-6):
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=rtol, atol=1e-7)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", ESTIMATORS)
def test_every_estimator_matches_verl(verl_estimators, verl_config, gen, name):
    kw = _kwargs(gen, name, verl_config, lone=name != "grpo_passk")
    want = verl_estimators[name](**kw)
    got = pv.ADVANTAGE_ESTIMATORS[name](**kw)
    # grpo_vectorized: verl computes its group statistics in float32
    _compare(got, want, rtol=1e-5 if name in ("grpo_vectorized", "gdpo") else 1e-6)
    assert got[0].abs().sum() > 0


@pytest.mark.parametrize("name", ["grpo", "gdpo", "grpo_passk"])
def test_without_std_normalisation(verl_estimators, verl_config, gen, name):
    kw = _kwargs(gen, name, verl_config, lone=name != "grpo_passk", norm_adv_by_std_in_grpo=False)
    kw["config"].norm_adv_by_std_in_grpo = False
    _compare(pv.ADVANTAGE_ESTIMATORS[name](**kw), verl_estimators[name](**kw), rtol=1e-5)


def test_gdpo_falls_back_to_token_level_rewards(verl_estimators, gen):
    kw = _kwargs(gen, "gdpo", dict)
    del kw["non_tensor_batch"], kw["batch"]
    kw["config"] = None
    _compare(pv.compute_gdpo_outcome_advantage(**kw), verl_estimators["gdpo"](**kw), rtol=1e-5)


@pytest.mark.parametrize("name", ["optimal_token_baseline", "tir_optimal_token_baseline"])
def test_optimal_token_baseline_options(verl_estimators, verl_config, gen, name):
    """Without IS weights and without the zero-tail rule (which the inputs make bind, so both settings differ)."""
    kw = _kwargs(gen, name, verl_config, rollout_is_weights=None, handle_zero_tail=False)
    got = pv.ADVANTAGE_ESTIMATORS[name](**kw)
    _compare(got, verl_estimators[name](**kw))
    tail = pv.ADVANTAGE_ESTIMATORS[name](**(kw | {"handle_zero_tail": True}))
    assert not torch.equal(tail[0], got[0])


def test_lone_responses_follow_verl(gen, verl_config):
    """verl's lone-response rules differ per estimator: grpo r/(1+eps), rloo r, rloo_vectorized 0, opo r."""
    kw = _kwargs(gen, "rloo", verl_config)
    lone = int(np.nonzero(kw["index"] == "55aa-d")[0][0])
    score = kw["token_level_rewards"][lone].sum()
    first = int(kw["response_mask"][lone].nonzero()[0, 0])
    assert pv.compute_rloo_outcome_advantage(**kw)[0][lone, first] == pytest.approx(score.item())
    assert pv.compute_rloo_vectorized_outcome_advantage(**kw)[0][lone].abs().max() == 0
    assert pv.compute_opo_outcome_advantage(**kw)[0][lone, first] == pytest.approx(score.item())
    assert pv.compute_grpo_outcome_advantage(**kw)[0][lone, first] == pytest.approx(score.item() / (1 + 1e-6))


def test_rejects_what_verl_rejects(gen, verl_config):
    kw = _kwargs(gen, "grpo_passk", verl_config)
    with pytest.raises(ValueError, match="at least 2"):
        pv.compute_grpo_passk_outcome_advantage(**kw)
    with pytest.raises(ValueError, match="config"):
        pv.compute_reinforce_plus_plus_outcome_advantage(kw["token_level_rewards"], kw["response_mask"])
    with pytest.raises(ValueError, match="index"):
        pv.compute_rloo_outcome_advantage(kw["token_level_rewards"], kw["response_mask"], kw["index"][:3])
    with pytest.raises(ValueError, match="reward_baselines"):
        pv.compute_remax_outcome_advantage(kw["token_level_rewards"], torch.zeros(3), kw["response_mask"])
    kw = _kwargs(gen, "gdpo", verl_config)
    kw["config"].gdpo_reward_keys = ["fmt", "missing"]
    with pytest.raises(ValueError, match="missing"):
        pv.compute_gdpo_outcome_advantage(**kw)


KERNEL_ESTIMATORS = ["gdpo", "gpg", "grpo", "grpo_passk", "opo", "reinforce_plus_plus", "reinforce_plus_plus_baseline",
                     "rloo", "rloo_vectorized"]


@pytest.mark.parametrize("name", KERNEL_ESTIMATORS)
def test_float32_triton_path(triton_backend, verl_config, gen, name):
    """The estimators on the Triton kernels (interpreted on CPU; compiled on a GPU), float32 rewards, against the
    float64 re-statement."""
    kw = _kwargs(gen, name, verl_config, lone=name != "grpo_passk")
    want = RESTATED[name](**kw)
    kw32 = {k: (v.float().to(triton_backend) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    got = pv.ADVANTAGE_ESTIMATORS[name](**kw32)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.cpu().double(), w.double(), rtol=1e-4, atol=1e-5)
