"""The advantage estimators beyond GRPO: rloo, opo, grpo_passk, reinforce_plus_plus_baseline
(`group_advantages(estimator=...)`), reinforce_plus_plus (`token_returns_advantages`) and the decoupled
multi-reward normalisation (`multi_reward_advantages`, TRL's normalize_then_sum and verl's gdpo).

1. The float64 reference against loop-by-loop re-statements of verl 0.9.1's estimators
   (`verl/trainer/ppo/core_algos.py`: per-uid dicts of scores as verl writes them, its `masked_whiten`) and of
   TRL 1.16's `GRPOTrainer._generate_and_score_completions` (normalize_then_sum, `nanstd`) and `RLOOTrainer`
   baseline, on random float64 inputs with groups in scrambled order, groups of one and ties. With
   PAIRUNI_VERL_SOURCE pointing at a verl 0.9.1 source tree (`.../verl/trainer/ppo/core_algos.py`), verl's own
   functions are compared too (skipped otherwise).
2. The Triton kernels (interpreted on CPU) against the reference in float32, tolerances from float32's eps.
3. Bad inputs: one-line ValueErrors naming the argument.
"""

from __future__ import annotations

import ast
import functools
import math
import os
import pathlib
import sys
import types
from collections import defaultdict

import numpy as np
import pytest
import torch

from pairuni_kernels import advantages as adv_mod
from pairuni_kernels import reference
from pairuni_kernels._launch import KernelLaunch
from pairuni_kernels.advantages import group_advantages, multi_reward_advantages, token_returns_advantages

EPS32 = torch.finfo(torch.float32).eps
#: float64 reference against float64 re-statements: only summation order differs.
F64 = {"rtol": 1e-10, "atol": 1e-12}


# ----------------------------------------------------------------------------- verl 0.9.1, re-stated loop by loop
def restated_masked_whiten(values, mask):
    total = mask.sum()
    mean = (values * mask).sum() / (total + 1e-8)
    var = ((values - mean) ** 2 * mask).sum() / (total + 1e-8)
    var = var * (total / (total - 1))
    return (values - mean) * torch.rsqrt(var + 1e-8)


def _by_uid(scores, index):
    groups = defaultdict(list)
    for i in range(scores.shape[0]):
        groups[index[i]].append(i)
    return groups


def restated_grpo(token_level_rewards, response_mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    scores = token_level_rewards.sum(dim=-1)
    groups = _by_uid(scores, index)
    out = scores.clone()
    for members in groups.values():
        vals = torch.stack([scores[i] for i in members])
        mean, std = (vals.mean(), vals.std()) if len(members) > 1 else (torch.tensor(0.0), torch.tensor(1.0))
        for i in members:
            out[i] = (scores[i] - mean) / (std + epsilon) if norm_adv_by_std_in_grpo else scores[i] - mean
    return out.unsqueeze(-1) * response_mask


def restated_rloo(token_level_rewards, response_mask, index):
    """verl compute_rloo_outcome_advantage: r * n / (n - 1) - mean * n / (n - 1); a lone response keeps r."""
    scores = token_level_rewards.sum(dim=-1)
    out = scores.clone()
    for members in _by_uid(scores, index).values():
        n = len(members)
        if n > 1:
            mean = torch.stack([scores[i] for i in members]).mean()
            for i in members:
                out[i] = scores[i] * n / (n - 1) - mean * n / (n - 1)
    return out.unsqueeze(-1) * response_mask


def restated_rloo_vectorized(token_level_rewards, response_mask, index):
    """verl compute_rloo_vectorized_outcome_advantage: (c r - sum) / (c - 1), 0 for a group of one."""
    scores = token_level_rewards.sum(dim=-1)
    inv = torch.from_numpy(np.unique(index, return_inverse=True)[1])
    c = torch.bincount(inv)[inv].to(scores.dtype)
    sums = torch.bincount(inv, weights=scores)[inv]
    return (((c * scores - sums) / (c - 1).clamp_min(1)) * (c > 1)).unsqueeze(-1) * response_mask


def restated_opo(token_level_rewards, response_mask, index):
    lengths = response_mask.sum(dim=-1)
    scores = token_level_rewards.sum(dim=-1)
    out = scores.clone()
    for members in _by_uid(scores, index).values():
        if len(members) == 1:
            baseline = torch.tensor(0.0)
        else:
            s = torch.stack([scores[i] for i in members])
            ln = torch.stack([lengths[i] for i in members])
            baseline = (ln * s).sum() / ln.sum()
        for i in members:
            out[i] = scores[i] - baseline
    return out.unsqueeze(-1) * response_mask


def restated_grpo_passk(token_level_rewards, response_mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    scores = token_level_rewards.sum(dim=-1)
    out = torch.zeros_like(scores)
    for members in _by_uid(scores, index).values():
        rewards = torch.stack([scores[i] for i in members])
        top, top_idx = torch.topk(rewards, 2)
        gap = top[0] - top[1]
        if norm_adv_by_std_in_grpo:
            gap = gap / (torch.std(rewards) + epsilon)
        out[members[int(top_idx[0])]] = gap
    return out.unsqueeze(-1) * response_mask


def restated_rf_baseline(token_level_rewards, response_mask, index):
    scores = token_level_rewards.sum(dim=-1)
    out = scores.clone()
    for members in _by_uid(scores, index).values():
        mean = torch.stack([scores[i] for i in members]).mean() if len(members) > 1 else torch.tensor(0.0)
        for i in members:
            out[i] = scores[i] - mean
    tiled = out.unsqueeze(-1).tile([1, token_level_rewards.shape[-1]]) * response_mask
    return restated_masked_whiten(tiled, response_mask) * response_mask


def restated_reinforce_plus_plus(token_level_rewards, response_mask, gamma):
    returns = torch.zeros_like(token_level_rewards)
    running = 0
    for t in reversed(range(token_level_rewards.shape[1])):
        new = token_level_rewards[:, t] + gamma * running
        returns[:, t] = new * response_mask[:, t]
        running = new * response_mask[:, t] + running * (1 - response_mask[:, t])
    return restated_masked_whiten(returns, response_mask) * response_mask, returns


def restated_gdpo(score_list, response_mask, index, weights, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    total = None
    for k, scores in enumerate(score_list):
        a = restated_grpo(scores, response_mask, index, epsilon, norm_adv_by_std_in_grpo)
        total = weights[k] * a if total is None else total + weights[k] * a
    return restated_masked_whiten(total, response_mask) * response_mask


# ----------------------------------------------------------------------------- TRL 1.16, re-stated
def restated_nanstd(x, dim=None, keepdim=False):
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(x), dim=dim, keepdim=True)
    var = var * torch.where(count > 1, count / (count - 1), torch.full_like(var, float("nan")))
    std = var.sqrt()
    return std if keepdim else std.squeeze(dim) if dim is not None else std.squeeze()


def restated_trl_normalize_then_sum(rewards_per_func, reward_weights, num_generations):
    """GRPOTrainer._generate_and_score_completions, multi_objective_aggregation="normalize_then_sum"."""
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    k = rewards_per_func.shape[1]
    grouped = rewards_per_func.view(-1, num_generations, k)
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    std_k = restated_nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean_k)
    reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, k)
    rewards = (reward_k * reward_weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = torch.nan
    std = restated_nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    return torch.nan_to_num((rewards - torch.nanmean(rewards)) / (std + 1e-4), nan=0.0)


def restated_trl_rloo(rewards, num_generations):
    """RLOOTrainer: leave-one-out baseline over consecutive groups; NaN (a group of one) -> 0."""
    grouped = rewards.view(-1, num_generations)
    if num_generations == 1:
        return torch.zeros_like(rewards)
    baselines = (grouped.sum(dim=1, keepdim=True) - grouped) / (num_generations - 1)
    return torch.nan_to_num(rewards - baselines.view(-1), nan=0.0)


# ----------------------------------------------------------------------------- verl's own code (optional)
@functools.lru_cache(maxsize=1)
def _verl_core_algos(root: str):
    """verl's `core_algos.py` executed with its heavy imports stubbed; `verl_F` holds verl's own masked_sum,
    masked_mean, masked_var and masked_whiten (from `utils/torch_functional.py`)."""
    pkg = pathlib.Path(root) / "verl"
    verl_f = types.ModuleType("verl.utils.torch_functional")
    verl_f.torch = torch
    tree = ast.parse((pkg / "utils" / "torch_functional.py").read_text())
    wanted = ("masked_sum", "masked_mean", "masked_var", "masked_whiten")
    helpers = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in wanted]
    exec(compile(ast.Module(body=helpers, type_ignores=[]), "torch_functional.py", "exec"),  # noqa: S102
         verl_f.__dict__)
    stubs = {
        "omegaconf": {"DictConfig": dict},
        "verl": {"__path__": []}, "verl.trainer": {"__path__": []}, "verl.trainer.ppo": {"__path__": []},
        "verl.workers": {"__path__": []},
        "verl.trainer.config": {"AlgoConfig": type("AlgoConfig", (), {})},
        "verl.workers.config": {"ActorConfig": type("ActorConfig", (), {})},
        "verl.utils": {"__path__": [], "as_torch_index": None, "group_mean_std": None, "torch_functional": verl_f},
        "verl.utils.import_utils": {"deprecated": lambda *a, **k: (lambda fn: fn)},
    }
    saved = {name: sys.modules.get(name) for name in [*stubs, "verl.utils.torch_functional"]}
    try:
        for name, attrs in stubs.items():
            sys.modules[name] = types.ModuleType(name)
            sys.modules[name].__dict__.update(attrs)
        sys.modules["verl.utils.torch_functional"] = verl_f
        path = pkg / "trainer" / "ppo" / "core_algos.py"
        core = types.ModuleType("verl_core_algos_estimators")
        core.__file__ = str(path)
        exec(compile(path.read_text(), str(path), "exec"), core.__dict__)  # noqa: S102 - verl's own source
        return core
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@pytest.fixture
def verl():
    root = os.environ.get("PAIRUNI_VERL_SOURCE")
    if not root:
        pytest.skip("set PAIRUNI_VERL_SOURCE to a verl 0.9.1 source tree to compare with verl's own code")
    return _verl_core_algos(root)


# ----------------------------------------------------------------------------- inputs
LABELS = ["9f1c", "9f1c", "9f1c", "07bd", "07bd", "e4e2", "e4e2", "e4e2", "e4e2", "55aa", "c0de", "c0de", "c0de",
          "c0de", "c0de", "77ff"]


def _batch(gen, t=7, ties=True, lone=True, dtype=torch.float64):
    """verl-style batch: token rewards [bs, T] (outcome on the last valid token plus noise elsewhere; verl sums
    all T), prefix response masks with varied lengths, uids in scrambled order (two lone ones), ties in a group."""
    labels = LABELS if lone else [x for x in LABELS if x not in ("55aa", "77ff")]
    bs = len(labels)
    perm = torch.randperm(bs, generator=gen).tolist()
    index = np.array([labels[i] for i in perm], dtype=object)
    lengths = torch.randint(1, t + 1, (bs,), generator=gen)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(dtype)
    token_rewards = torch.randn(bs, t, generator=gen, dtype=dtype) * 0.1
    token_rewards[torch.arange(bs), lengths - 1] += torch.randn(bs, generator=gen, dtype=dtype) * 2 + 3
    if ties:  # group "c0de": its two best responses tie; group "e4e2": all equal
        for uid, pattern in (("c0de", [4.0, 4.0, 1.0, 4.0 - 1e-3, 0.5]), ("e4e2", [2.5] * 4)):
            members = np.nonzero(index == uid)[0]
            token_rewards[members] = 0
            token_rewards[members, 0] = torch.tensor(pattern[:len(members)], dtype=dtype)
    group_ids = torch.tensor([sorted(set(labels)).index(u) * 7 - 20 for u in index])  # arbitrary ints
    return token_rewards, mask, index, group_ids


def _rows(x):
    """[bs, T] verl output (the row's advantage times the mask) -> the row's value (mask is a prefix)."""
    return x[:, 0]


# ----------------------------------------------------------------------------- reference = the sources' formulas
def test_rloo_matches_verl_and_trl(gen):
    token_rewards, mask, index, ids = _batch(gen)
    scores = token_rewards.sum(-1)
    ours = reference.group_advantages(scores, ids, estimator="rloo")
    torch.testing.assert_close(ours[:, None] * mask, restated_rloo_vectorized(token_rewards, mask, index), **F64)
    lone = torch.tensor([(index == u).sum() == 1 for u in index])
    loop = _rows(restated_rloo(token_rewards, mask, index))
    torch.testing.assert_close(ours[~lone], loop[~lone], **F64)
    assert (ours[lone] == 0).all() and (loop[lone] == scores[lone]).all()  # verl's loop rloo keeps a lone r
    # TRL's RLOO on consecutive groups of 4
    r = torch.randn(24, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(reference.group_advantages(r, torch.arange(24) // 4, estimator="rloo"),
                               restated_trl_rloo(r, 4), **F64)


def test_opo_matches_verl(gen):
    token_rewards, mask, index, ids = _batch(gen)
    ours = reference.group_advantages(token_rewards.sum(-1), ids, estimator="opo", lengths=mask.sum(-1).long())
    torch.testing.assert_close(ours[:, None] * mask, restated_opo(token_rewards, mask, index), **F64)
    # float lengths give the same; a group whose responses are all empty keeps r (baseline 0)
    r = torch.tensor([1.0, 3.0, 2.0, 5.0], dtype=torch.float64)
    out = reference.group_advantages(r, torch.tensor([0, 0, 1, 1]), estimator="opo",
                                     lengths=torch.tensor([1.0, 3.0, 0.0, 0.0]))
    torch.testing.assert_close(out, torch.tensor([1 - 10 / 4, 3 - 10 / 4, 2.0, 5.0], dtype=torch.float64))


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_passk_matches_verl(gen, norm):
    token_rewards, mask, index, ids = _batch(gen, lone=False)
    ours = reference.group_advantages(token_rewards.sum(-1), ids, estimator="grpo_passk",
                                      scale="group" if norm else "none")
    want = restated_grpo_passk(token_rewards, mask, index, norm_adv_by_std_in_grpo=norm)
    torch.testing.assert_close(ours[:, None] * mask, want, **F64)
    # tied best responses ("c0de") and an all-equal group ("e4e2") give 0 to every member
    for uid in ("c0de", "e4e2"):
        assert (ours[torch.from_numpy(index == uid)] == 0).all()
    # exactly one nonzero per group with a strict maximum
    assert int((ours != 0).sum()) == len(set(index)) - 2


def test_grpo_passk_hand_example():
    r = torch.tensor([0.0, 3.0, 1.0, 2.0, 5.0, 5.0], dtype=torch.float64)
    ids = torch.tensor([1, 1, 1, 1, 2, 2])
    std = torch.tensor([0.0, 3.0, 1.0, 2.0], dtype=torch.float64).std().item()
    expect = torch.tensor([0, 1 / (std + 1e-6), 0, 0, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(reference.group_advantages(r, ids, estimator="grpo_passk"), expect)
    batch = reference.group_advantages(r, ids, estimator="grpo_passk", scale="batch")
    torch.testing.assert_close(batch, torch.tensor([0, 1 / (r.std().item() + 1e-6), 0, 0, 0, 0], dtype=torch.float64))


def test_rf_baseline_matches_verl(gen):
    token_rewards, mask, index, ids = _batch(gen)
    w = torch.rand(len(index), generator=gen, dtype=torch.float64) + 0.5
    ours = reference.group_advantages(token_rewards.sum(-1), ids, estimator="reinforce_plus_plus_baseline",
                                      lengths=mask.sum(-1), weights=w)
    want = restated_rf_baseline(token_rewards, mask, index)
    torch.testing.assert_close(ours[:, None] * mask, want * w[:, None], **F64)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_plus_plus_matches_verl(gen, gamma):
    n, t = 6, 11
    token_rewards = torch.randn(n, t, generator=gen, dtype=torch.float64)
    mask = (torch.rand(n, t, generator=gen) > 0.3).to(torch.float64)  # holes: observation spans
    mask[2] = 0
    want_adv, want_ret = restated_reinforce_plus_plus(token_rewards, mask, gamma)
    garbage = token_rewards.masked_fill(mask == 0, float("nan"))  # masked rewards are ignored
    adv, ret = reference.token_returns_advantages(garbage, mask.bool(), gamma, return_returns=True)
    torch.testing.assert_close(adv, want_adv, **F64)
    torch.testing.assert_close(ret, want_ret, **F64)
    w = torch.rand(n, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(reference.token_returns_advantages(token_rewards, mask, gamma, weights=w),
                               want_adv * w[:, None], **F64)


@pytest.mark.parametrize("norm", [True, False])
def test_gdpo_matches_verl(gen, norm):
    token_rewards, mask, index, ids = _batch(gen, ties=False)
    k = 3
    scores = torch.randn(len(index), k, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.1]) + 2
    score_list = [torch.zeros_like(token_rewards).index_put_((torch.arange(len(index)), mask.sum(-1).long() - 1),
                                                             scores[:, j]) for j in range(k)]
    rw = [1.0, 0.3, 2.0]
    want = restated_gdpo(score_list, mask, index, rw, 1e-6, norm)
    ours = reference.multi_reward_advantages(scores, ids, rw, mode="gdpo", eps=1e-6,
                                             scale="group" if norm else "none", lengths=mask.sum(-1))
    # verl's lone-response std is torch.tensor(1.0), a float32: 1 + 1e-6 rounds there (6e-8 relative)
    torch.testing.assert_close(ours[:, None] * mask, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("gens", [4, 1])
def test_normalize_then_sum_matches_trl(gen, gens):
    n, k = 24, 3
    rewards = torch.randn(n, k, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.2]) + 1
    rewards[torch.rand(n, k, generator=gen) < 0.25] = float("nan")  # a function that did not score a sample
    rewards[5] = float("nan")  # unscorable
    rewards[8:12, 1] = float("nan")  # a whole group unscored by one function
    rewards[12:15, 2] = float("nan")  # one scored entry left in a group
    rw = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    want = restated_trl_normalize_then_sum(rewards, rw, gens)
    perm = torch.randperm(n, generator=gen)  # any group order
    ours = reference.multi_reward_advantages(rewards[perm], (torch.arange(n) // gens)[perm] * 3 + 1, rw)
    # TRL's nanstd computes its Bessel factor count / (count - 1) from int64 counts, in float32 (3e-8 relative)
    torch.testing.assert_close(ours, want[perm], rtol=1e-7, atol=1e-7)
    assert ours[(perm == 5).nonzero()[0, 0]] == 0


def test_normalize_then_sum_hand_example():
    r = torch.tensor([[1.0, 10.0], [3.0, float("nan")], [2.0, 20.0], [2.0, 40.0]], dtype=torch.float64)
    out = reference.multi_reward_advantages(r, torch.tensor([0, 0, 1, 1]), [1.0, 1.0])
    s2 = math.sqrt(2)  # unbiased std of two values d apart is d / sqrt(2)
    s = torch.tensor([-1 / (s2 + 1e-4), 1 / (s2 + 1e-4), -1 / (20 / s2 + 1e-4) * 10, 1 / (20 / s2 + 1e-4) * 10],
                     dtype=torch.float64)  # column 2 of group 0 has one scored entry: it contributes 0
    expect = (s - s.mean()) / (s.std() + 1e-4)
    torch.testing.assert_close(out, expect)


# ----------------------------------------------------------------------------- verl's own functions
def test_estimators_match_verls_own_code(verl, gen):
    token_rewards, mask, index, ids = _batch(gen)
    scores = token_rewards.sum(-1)
    lengths = mask.sum(-1)
    cases = {
        "rloo": verl.compute_rloo_vectorized_outcome_advantage(token_rewards, mask, index)[0],
        "opo": verl.compute_opo_outcome_advantage(token_rewards, mask, index)[0],
        "reinforce_plus_plus_baseline": verl.compute_reinforce_plus_plus_baseline_outcome_advantage(
            token_rewards, mask, index)[0],
    }
    for estimator, want in cases.items():
        ours = reference.group_advantages(scores, ids, estimator=estimator, lengths=lengths)
        torch.testing.assert_close(ours[:, None] * mask, want, **F64, msg=estimator)
    tr, m, idx, gids = _batch(gen, lone=False)
    for norm in (True, False):
        want = verl.compute_grpo_passk_outcome_advantage(tr, m, idx, config={"norm_adv_by_std_in_grpo": norm})[0]
        ours = reference.group_advantages(tr.sum(-1), gids, estimator="grpo_passk", scale="group" if norm else "none")
        torch.testing.assert_close(ours[:, None] * m, want, **F64)
    holes = (torch.rand(mask.shape, generator=gen) > 0.3).to(mask.dtype)
    for gamma in (1.0, 0.95):
        want_adv, want_ret = verl.compute_reinforce_plus_plus_outcome_advantage(
            token_rewards, holes, config=types.SimpleNamespace(gamma=gamma))
        got_adv, got_ret = reference.token_returns_advantages(token_rewards, holes, gamma, return_returns=True)
        torch.testing.assert_close(got_adv, want_adv, **F64)
        torch.testing.assert_close(got_ret, want_ret, **F64)


def test_gdpo_matches_verls_own_code(verl, gen):
    token_rewards, mask, index, ids = _batch(gen, ties=False)
    bs, t = mask.shape
    scores = torch.randn(bs, 2, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 4.0])
    prompts = torch.zeros(bs, 3, dtype=torch.long)
    batch = {"prompts": prompts, "attention_mask": torch.cat([torch.ones(bs, 3), mask], dim=1).long()}
    config = {"gdpo_reward_keys": ["fmt", "acc"], "gdpo_reward_weights": [0.7, 1.5]}
    non_tensor = {"fmt": scores[:, 0].numpy(), "acc": scores[:, 1].numpy()}
    want = verl.compute_gdpo_outcome_advantage(token_rewards.float(), mask.float(), index, epsilon=1e-6,
                                               config=config, non_tensor_batch=non_tensor, batch=batch)[0]
    # verl reads the component scores as float32
    ours = reference.multi_reward_advantages(scores.float(), ids, [0.7, 1.5], mode="gdpo", eps=1e-6,
                                             lengths=mask.sum(-1))
    torch.testing.assert_close(ours[:, None] * mask.float(), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- Triton vs reference (float32)
def _close32(out, expect, scale=1.0):
    """float32 kernel vs float64 reference: 16 float32 ulps of the output's magnitude (times `scale` for the
    log2(T) levels of a scan over T tokens)."""
    assert out.dtype == torch.float32
    atol = 16 * EPS32 * scale * max(float(expect.abs().max()), 1.0)
    torch.testing.assert_close(out.double().cpu(), expect.cpu(), rtol=0, atol=atol)


ESTIMATORS = ["rloo", "opo", "grpo_passk", "reinforce_plus_plus_baseline"]


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("n,n_groups", [(2, 1), (37, 5), (700, 150)])
def test_triton_estimators_match_reference(triton_backend, gen, device, estimator, scale, n, n_groups):
    r = torch.randn(n, generator=gen) * 2 + 5  # an offset: one-pass sums would lose digits
    values = torch.randperm(200, generator=gen)[:n_groups] - 100
    if estimator == "grpo_passk":  # groups of at least 2, scrambled; some tied maxima
        ids = values[(torch.arange(n) % n_groups)[torch.randperm(n, generator=gen)]]
        r[::3] = r.max()
    else:  # any sizes, groups of one included
        ids = values[torch.randint(0, n_groups, (n,), generator=gen)]
    w = torch.rand(n, generator=gen) + 0.1
    lengths = torch.randint(0, 50, (n,), generator=gen)
    lengths[0] = 7  # reinforce_plus_plus_baseline whitens over more than one token
    r, ids, w, lengths = (x.to(device) for x in (r, ids, w, lengths))
    out = group_advantages(r, ids, weights=w, scale=scale, estimator=estimator, lengths=lengths)
    expect = reference.group_advantages(r.double(), ids, weights=w.double(), scale=scale, estimator=estimator,
                                        lengths=lengths)
    _close32(out, expect)
    if estimator == "grpo_passk":
        assert ((out != 0) == (expect != 0)).all()  # the same response of each group is marked


def test_triton_passk_first_of_tied_maxima_across_tiles(triton_backend, device):
    """The maximum at positions 3 and 40 (> BLOCK apart): the kernel marks 3, the gap is 0 -> all 0; then with a
    unique maximum in the second tile the kernel finds it."""
    r = torch.zeros(50)
    r[3] = r[40] = 2.0
    r[10] = 1.0
    ids = torch.zeros(50, dtype=torch.long)
    assert (group_advantages(r.to(device), ids.to(device), estimator="grpo_passk") == 0).all()
    r[40] = 3.0
    out = group_advantages(r.to(device), ids.to(device), estimator="grpo_passk", scale="none").cpu()
    assert out[40].item() == 1.0 and int((out != 0).sum()) == 1


def test_triton_estimators_large_group_scrambled(triton_backend, gen, device):
    ids = torch.cat([torch.zeros(300, dtype=torch.long), torch.arange(1, 41).repeat_interleave(3)])
    perm = torch.randperm(ids.numel(), generator=gen)
    ids = ids[perm].to(device)
    r = (torch.rand(ids.numel(), generator=gen) * 3 + 10).to(device)
    lengths = torch.randint(1, 100, (ids.numel(),), generator=gen).to(device)
    for estimator in ESTIMATORS:
        out = group_advantages(r, ids, estimator=estimator, lengths=lengths)
        _close32(out, reference.group_advantages(r.double(), ids, estimator=estimator, lengths=lengths))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_triton_estimators_other_dtypes(triton_backend, gen, dtype, device):
    r = torch.rand(40, generator=gen).to(device=device, dtype=dtype)
    ids = torch.arange(40, device=device) // 5
    lengths = torch.randint(1, 9, (40,), generator=gen).to(device)
    for estimator in ESTIMATORS:
        out = group_advantages(r, ids, estimator=estimator, lengths=lengths)
        _close32(out, reference.group_advantages(r.double(), ids, estimator=estimator, lengths=lengths))


@pytest.mark.parametrize("mode", reference.MULTI_REWARD_MODES)
@pytest.mark.parametrize("scale", ["group", "none"])
@pytest.mark.parametrize("n,n_groups,k", [(3, 2, 1), (60, 9, 3)])
def test_triton_multi_reward_matches_reference(triton_backend, gen, device, mode, scale, n, n_groups, k):
    rewards = torch.randn(n, k, generator=gen) * torch.linspace(0.5, 4, k) + 3
    if mode == "normalize_then_sum" and n > 3:
        rewards[torch.rand(n, k, generator=gen) < 0.2] = float("nan")
        rewards[1] = float("nan")
    ids = torch.randint(0, n_groups, (n,), generator=gen) * 5 - 7
    ids[0] = 1000  # a group of one (gdpo: verl's mean 0 / std 1; normalize_then_sum: 0)
    rw = torch.rand(k, generator=gen) + 0.2
    w = torch.rand(n, generator=gen) + 0.5
    lengths = torch.randint(1, 30, (n,), generator=gen) if mode == "gdpo" else None
    args = [x.to(device) if x is not None else None for x in (rewards, ids, rw, lengths, w)]
    out = multi_reward_advantages(args[0], args[1], args[2], mode=mode, scale=scale, lengths=args[3], weights=args[4])
    expect = reference.multi_reward_advantages(rewards.double(), ids, rw.double(), mode=mode, scale=scale,
                                               lengths=lengths, weights=w.double())
    _close32(out, expect)


@pytest.mark.parametrize("gamma", [1.0, 0.93, 0.0])
@pytest.mark.parametrize("n,t", [(3, 5), (4, 1100)])
def test_triton_token_returns_match_reference(triton_backend, gen, device, gamma, n, t):
    token_rewards = torch.randn(n, t, generator=gen)
    mask = torch.rand(n, t, generator=gen) > 0.3
    mask[0, -1] = True
    token_rewards[~mask] = float("nan")  # ignored
    w = torch.rand(n, generator=gen) + 0.5
    adv, ret = token_returns_advantages(token_rewards.to(device), mask.to(device), gamma, weights=w.to(device),
                                        return_returns=True)
    want_adv, want_ret = reference.token_returns_advantages(token_rewards.double(), mask, gamma,
                                                            weights=w.double(), return_returns=True)
    _close32(ret, want_ret, scale=math.log2(t) + 1)  # a scan of up to t terms
    _close32(adv, want_adv, scale=math.log2(t) + 1)
    assert (adv.cpu()[~mask] == 0).all()


def test_triton_token_returns_float_mask_and_bf16(triton_backend, gen, device):
    token_rewards = torch.randn(5, 33, generator=gen).bfloat16()
    mask = (torch.rand(5, 33, generator=gen) > 0.5).float()
    out = token_returns_advantages(token_rewards.to(device), mask.to(device), 0.99)
    _close32(out, reference.token_returns_advantages(token_rewards.double(), mask, 0.99), scale=math.log2(33) + 1)


def test_launches_are_listed_variants(triton_backend, gen, device, monkeypatch):
    listed = {launch.key() for launch in adv_mod.kernel_variants()}
    made = []
    real_call = KernelLaunch.__call__
    monkeypatch.setattr(KernelLaunch, "__call__", lambda self: made.append(self.key()) or real_call(self))
    r = torch.rand(12, generator=gen).to(device)
    ids = torch.arange(12, device=device) // 4
    lengths = torch.randint(1, 9, (12,), generator=gen).to(device)
    for estimator in ESTIMATORS:
        for scale in ("group", "batch", "none"):
            group_advantages(r, ids, weights=r, scale=scale, estimator=estimator, lengths=lengths)
    for mode in reference.MULTI_REWARD_MODES:
        multi_reward_advantages(torch.stack([r, r * 2], 1), ids, [1.0, 2.0], mode=mode, weights=r)
    token_returns_advantages(torch.randn(3, 9, generator=gen).to(device), torch.ones(3, 9, device=device), 0.9,
                             weights=r[:3])
    assert len(made) >= 16
    missing = [key for key in made if key not in listed]
    assert not missing, f"launches not in kernel_variants(): {missing[:3]}"


# ----------------------------------------------------------------------------- bad inputs
_R = torch.ones(4)
_IDS = torch.tensor([0, 0, 1, 1])


@pytest.mark.parametrize("backend", ["reference_backend", "triton_backend"])
@pytest.mark.parametrize("kwargs,match", [
    (dict(estimator="ppo"), "estimator"),
    (dict(estimator="reinforce_plus_plus"), "token_returns_advantages"),
    (dict(estimator="opo"), "lengths: required"),
    (dict(estimator="reinforce_plus_plus_baseline"), "lengths: required"),
    (dict(estimator="opo", lengths=torch.ones(3)), "lengths"),
    (dict(estimator="opo", lengths=torch.tensor([1.0, -1.0, 2.0, 2.0])), "lengths"),
    (dict(estimator="opo", lengths=torch.tensor([1.0, float("nan"), 2.0, 2.0])), "lengths"),
    (dict(estimator="opo", lengths=torch.ones(4, 1)), "lengths"),
    (dict(estimator="reinforce_plus_plus_baseline", lengths=torch.tensor([1, 0, 0, 0])), "more than 1 token"),
    (dict(estimator="grpo_passk", group_ids=torch.tensor([0, 0, 1, 2])), "group 1 has 1"),
])
def test_bad_estimator_inputs(request, backend, kwargs, match):
    request.getfixturevalue(backend)
    args = {"rewards": _R, "group_ids": _IDS} | kwargs
    with pytest.raises(ValueError, match=match) as info:
        group_advantages(args.pop("rewards"), args.pop("group_ids"), **args)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs,match", [
    (dict(rewards=torch.ones(4)), "rewards"),
    (dict(rewards=torch.ones(4, 0)), "K >= 1"),
    (dict(reward_weights=[1.0]), "reward_weights: expected 2"),
    (dict(reward_weights=torch.ones(2, 1)), "reward_weights"),
    (dict(reward_weights=[1.0, float("inf")]), "reward_weights"),
    (dict(group_ids=torch.tensor([0, 0, 1])), "group_ids"),
    (dict(mode="sum"), "mode"),
    (dict(scale="batch"), "scale"),
    (dict(eps=-1.0), "eps"),
    (dict(lengths=torch.ones(4)), "only mode='gdpo'"),
    (dict(mode="gdpo", lengths=torch.ones(3)), "lengths"),
    (dict(mode="gdpo", rewards=torch.tensor([[1.0, float("nan")]] * 4)), "gdpo"),
    (dict(rewards=torch.tensor([[1.0, float("inf")]] * 4)), r"\[0, 1\]"),
    (dict(mode="gdpo", rewards=torch.ones(1, 2), group_ids=torch.zeros(1, dtype=torch.long)), "more than 1"),
    (dict(weights=torch.ones(5)), "weights"),
])
def test_bad_multi_reward_inputs(kwargs, match):
    args = {"rewards": torch.ones(4, 2), "group_ids": _IDS, "reward_weights": [1.0, 1.0]} | kwargs
    with pytest.raises(ValueError, match=match) as info:
        multi_reward_advantages(args.pop("rewards"), args.pop("group_ids"), args.pop("reward_weights"), **args)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs,match", [
    (dict(token_rewards=torch.ones(4)), "token_rewards"),
    (dict(mask=torch.ones(4, 6)), "mask"),
    (dict(gamma=1.5), "gamma"),
    (dict(gamma=True), "gamma"),
    (dict(weights=torch.ones(3)), "weights"),
    (dict(mask=(torch.arange(20) == 7).view(4, 5)), "more than 1 token"),
    (dict(token_rewards=torch.ones(4, 5).index_fill_(1, torch.tensor([2]), float("inf"))), r"\[0, 2\]"),
])
def test_bad_token_returns_inputs(kwargs, match):
    args = {"token_rewards": torch.ones(4, 5), "mask": torch.ones(4, 5, dtype=torch.bool)} | kwargs
    with pytest.raises(ValueError, match=match) as info:
        token_returns_advantages(args.pop("token_rewards"), args.pop("mask"), **args)
    assert "\n" not in str(info.value)


def test_estimator_ignores_scale_where_the_sources_do(gen):
    r = torch.randn(12, generator=gen, dtype=torch.float64)
    ids = torch.arange(12) // 3
    lengths = torch.randint(1, 9, (12,), generator=gen)
    for estimator in ("rloo", "opo", "reinforce_plus_plus_baseline"):
        outs = [reference.group_advantages(r, ids, estimator=estimator, lengths=lengths, scale=s, eps=e)
                for s, e in (("group", 1e-6), ("none", 0.0), ("batch", 0.5))]
        assert all(torch.equal(outs[0], o) for o in outs[1:])
