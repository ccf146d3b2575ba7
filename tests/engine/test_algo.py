"""The `algo.` knobs (engine/algo.py): every loss type, importance-sampling level, entropy option and advantage
estimator parses, is refused in one line naming the key where it makes no sense, and trains: the trainer's loss
on a micro-batch equals the float64 reference formula and an update finishes with finite numbers."""

from __future__ import annotations

import math
import types

import pytest
import torch

from engine import algo, cli
from engine.checks import check
from engine.config import Config, ConfigError, load_config
from engine.policy import TASKS, task_view
from engine.trainer import PairGRPOTrainer
from pairuni_kernels import linear_logprobs
from pairuni_kernels import reference as spec


# ----------------------------------------------------------------------------- config
def test_defaults_call_the_kernels_as_before():
    """With every default the loss gets no new keyword and group_advantages its old call (the golden run)."""
    a = Config().algo
    assert (a.loss_type, a.importance_sampling_level, a.advantage_estimator, a.scale_rewards) == (
        "ppo", "token", "grpo", "group")
    assert algo.loss_kwargs(a) == {}
    assert algo.advantage_kwargs(a, torch.tensor([1, 2])) == {"eps": a.advantage_eps}
    assert not algo.computes_entropy(a)


@pytest.mark.parametrize("key, choices", [
    ("loss_type", spec.LOSS_TYPES), ("importance_sampling_level", spec.IMPORTANCE_SAMPLING_LEVELS),
    ("advantage_estimator", spec.ADVANTAGE_ESTIMATORS), ("scale_rewards", spec.ADVANTAGE_SCALES),
    ("entropy_agg_mode", spec.LOSS_AGG_MODES),
])
def test_unknown_names_list_the_choices(key, choices):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [f"algo.{key}=nonsense"])
    assert str(exc.value) == f"algo.{key}: expected one of {' | '.join(choices)}, got 'nonsense'"


#: What each loss type / estimator needs besides its name to make sense.
NEEDS = {"cispo": ["algo.epsilon_high=5"], "dro": ["algo.dro_beta=0.1"]}


@pytest.mark.parametrize("loss_type", spec.LOSS_TYPES)
def test_every_loss_type_and_its_levels_load(loss_type):
    for level in spec.LOSS_TYPE_LEVELS[loss_type]:
        cfg = load_config(None, [f"algo.loss_type={loss_type}", f"algo.importance_sampling_level={level}",
                                 *NEEDS.get(loss_type, [])])
        assert (cfg.algo.loss_type, cfg.algo.importance_sampling_level) == (loss_type, level)


@pytest.mark.parametrize("estimator", spec.ADVANTAGE_ESTIMATORS)
def test_every_estimator_loads(estimator):
    assert load_config(None, [f"algo.advantage_estimator={estimator}"]).algo.advantage_estimator == estimator


@pytest.mark.parametrize("overrides, message", [
    (["algo.loss_type=vespo", "algo.importance_sampling_level=sequence"],
     "algo.importance_sampling_level: loss_type 'vespo' takes ('token',), got 'sequence'"),
    (["algo.loss_type=clip_cov", "algo.importance_sampling_level=sequence_token"], "algo.importance_sampling_level:"),
    (["algo.loss_type=dro"], "algo.dro_beta: required"),
    (["algo.loss_type=cispo"], "algo.epsilon_high: expected a number >= 1 with loss_type cispo"),
    (["algo.dual_clip_c=3", "algo.loss_type=sapo"], "algo.dual_clip_c: expected its default None: only loss_type "
                                                    "ppo / clip_cov reads it"),
    (["algo.dual_clip_c=0.5"], "algo.dual_clip_c: expected None or a"),
    (["algo.sapo_temperature_neg=2"], "algo.sapo_temperature_neg: expected its default 1.05: only loss_type sapo"),
    (["algo.loss_type=sapo", "algo.sapo_temperature_neg=0"], "algo.sapo_temperature_neg: expected"),
    (["algo.kl_cov_ratio=0.1"], "algo.kl_cov_ratio: expected its default 0.0002: only loss_type kl_cov"),
    (["algo.loss_type=clip_cov", "algo.clip_cov_lb=6"], "algo.clip_cov_lb: expected < algo.clip_cov_ub"),
    (["algo.loss_type=dppo_tv", "algo.clip_ratio_c_tis=-1"], "algo.clip_ratio_c_tis: expected"),
    (["algo.kl_ratio_correction=true"], "algo.kl_ratio_correction: expected false while algo.beta is 0"),
    (["algo.entropy_agg_mode=seq-mean-token-sum"], "algo.entropy_agg_mode: expected token-mean while"),
    (["algo.top_entropy_quantile=1.5"], "algo.top_entropy_quantile: expected a number in [0, 1]"),
    (["algo.top_entropy_quantile=0.2", "algo.loss_type=geo_mean"], "algo.top_entropy_quantile: expected 1 with "
                                                                   "loss_type geo_mean"),
    (["algo.top_entropy_quantile=0.2", "algo.loss_type=dro", "algo.dro_beta=1"], "algo.top_entropy_quantile:"),
    (["algo.advantage_estimator=rloo", "algo.scale_rewards=batch"], "algo.scale_rewards: expected its default "
                                                                    "'group' with advantage_estimator rloo"),
    (["algo.advantage_estimator=opo", "algo.advantage_eps=0.1"], "algo.advantage_eps: expected its default"),
    (["algo.gamma=0.9"], "algo.gamma: expected 1 with advantage_estimator grpo"),
    (["algo.advantage_estimator=reinforce_plus_plus", "algo.gamma=0"], "algo.gamma: expected a number in (0, 1]"),
])
def test_combinations_that_make_no_sense_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    assert str(exc.value).startswith(message), str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("overrides, key", [
    (["algo.scale_rewards=batch"], "algo.scale_rewards"),
    (["algo.advantage_estimator=reinforce_plus_plus_baseline"], "algo.advantage_estimator"),
    (["algo.advantage_estimator=reinforce_plus_plus"], "algo.advantage_estimator"),
])
def test_batch_statistics_are_refused_under_torchrun(overrides, key):
    cfg = load_config(None, overrides)  # one process: fine
    with pytest.raises(ConfigError, match=rf"^{key}: expected no batch-wide statistics under torchrun \(2 processes"):
        check(cfg, world=2, environment=False)


def test_a_bad_combination_fails_before_the_model_loads(tmp_path, capsys, no_model_loads):
    rc = cli.main(["train", "algo.loss_type=vespo", "algo.importance_sampling_level=sequence_token",
                   f"train.run_dir={tmp_path}"])
    assert rc == 2
    assert "algo.importance_sampling_level: loss_type 'vespo' takes" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the pieces the trainer uses
def test_high_entropy_mask_is_trls(gen):
    """TRL 1.16's own GRPOTrainer.get_high_entropy_mask (one process) on random entropies with padding."""
    trl = pytest.importorskip("trl.trainer.grpo_trainer")
    one_process = types.SimpleNamespace(accelerator=types.SimpleNamespace(
        pad_across_processes=lambda x, dim, pad_index: x, gather=lambda x: x))
    entropy = torch.rand(5, 9, generator=gen) * 3
    mask = torch.rand(5, 9, generator=gen) > 0.3
    for q in (0.0, 0.2, 0.5, 1.0):
        want = trl.GRPOTrainer.get_high_entropy_mask(one_process, entropy, mask.long(), 1 - q)
        got = algo.high_entropy_mask(entropy, mask, q)
        assert torch.equal(got, want), q
        assert got.sum() >= max(1, math.floor(q * mask.sum())) and not (got & ~mask).any()


def test_advantages_follow_the_estimator_and_the_pair_weights(gen):
    """rloo, opo and reinforce_plus_plus against their formulas written out; lengths come from the task mask."""
    n, g, t = 8, 4, 5
    group_ids = torch.arange(n // g).repeat_interleave(g)
    rewards = torch.rand(n, generator=gen)
    weights = torch.rand(n, generator=gen) + 0.5
    mask = torch.arange(t)[None, :] < torch.randint(1, t + 1, (n, 1), generator=gen)
    lengths = mask.sum(-1).float()
    cfg = lambda *o: load_config(None, list(o)).algo
    others = (rewards.view(-1, g).sum(-1, keepdim=True) - rewards.view(-1, g)) / (g - 1)
    rloo = (rewards.view(-1, g) - others).flatten()
    torch.testing.assert_close(algo.advantages(cfg("algo.advantage_estimator=rloo"), rewards, group_ids,
                                               weights=weights, mask=mask), rloo * weights)
    baseline = (rewards * lengths).view(-1, g).sum(-1) / lengths.view(-1, g).sum(-1)
    torch.testing.assert_close(algo.advantages(cfg("algo.advantage_estimator=opo"), rewards, group_ids,
                                               weights=None, mask=mask), rewards - baseline.repeat_interleave(g))
    # reinforce++: the outcome reward on the last token, discounted back, whitened over all loss tokens
    gamma = 0.9
    steps_to_end = (lengths[:, None] - 1 - torch.arange(t)[None, :]).clamp(min=0)
    returns = torch.where(mask, rewards[:, None] * gamma ** steps_to_end, torch.zeros(()))
    values = returns[mask]
    whitened = (returns - values.mean()) / torch.sqrt(values.var() + 1e-8)
    got = algo.advantages(cfg("algo.advantage_estimator=reinforce_plus_plus", f"algo.gamma={gamma}"), rewards,
                          group_ids, weights=weights, mask=mask)
    torch.testing.assert_close(got, torch.where(mask, whitened, torch.zeros(())) * weights[:, None],
                               atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the trainer
#: One case per non-default loss type, level and entropy option (with what each needs to make sense).
LOSS_CASES = {
    "cispo": {"algo.loss_type": "cispo", "algo.epsilon_high": 5},
    "cispo_clip": {"algo.loss_type": "cispo_clip"},
    "sapo": {"algo.loss_type": "sapo", "algo.sapo_temperature_neg": 2.0},
    "vespo": {"algo.loss_type": "vespo"},
    "gpg": {"algo.loss_type": "gpg"},
    "geo_mean": {"algo.loss_type": "geo_mean", "algo.loss_agg_mode": "seq-mean-token-mean"},
    "clip_cov": {"algo.loss_type": "clip_cov", "algo.clip_cov_ratio": 0.3, "algo.clip_cov_lb": -5.0},
    "kl_cov": {"algo.loss_type": "kl_cov", "algo.kl_cov_ratio": 0.3},
    "dppo_tv": {"algo.loss_type": "dppo_tv", "algo.clip_ratio_c_tis": 1.05},
    "dppo_kl": {"algo.loss_type": "dppo_kl", "algo.divergence_high": 0.01},
    "dro": {"algo.loss_type": "dro", "algo.dro_beta": 0.5},
    "dual_clip": {"algo.dual_clip_c": 1.01},
    "gspo": {"algo.importance_sampling_level": "sequence"},
    "gspo_token_sapo": {"algo.loss_type": "sapo", "algo.importance_sampling_level": "sequence_token"},
    "kl_ratio_correction": {"algo.kl_ratio_correction": "true"},
    "entropy_bonus": {"algo.entropy_coef": 0.05},
    "entropy_bonus_seq": {"algo.entropy_coef": 0.05, "algo.entropy_agg_mode": "seq-mean-token-sum",
                          "algo.loss_agg_mode": "seq-mean-token-mean"},
    "top_entropy": {"algo.top_entropy_quantile": 0.2},
    "top_entropy_bonus_kl_cov": {"algo.top_entropy_quantile": 0.5, "algo.entropy_coef": 0.05,
                                 "algo.loss_type": "kl_cov", "algo.kl_cov_ratio": 0.3},
}


#: The config keys that are keyword arguments of the loss kernels under the same name.
KERNEL_KNOBS = ("dual_clip_c", "importance_sampling_level", "loss_type", "kl_ratio_correction", "sapo_temperature_pos",
                "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg",
                "clip_ratio_c_tis", "divergence_low", "divergence_high", "dro_beta", "kl_cov_coef", "entropy_coef",
                "entropy_agg_mode")


@pytest.fixture(scope="module")
def moved(toy_world, tmp_path_factory, tiny_overrides):
    """(trainer, batch, its weights): tiny model with a reference model (beta 0.05), one default update on its
    first batch (random advantages) already done so that ratios differ from 1. A micro-batch (8 rows) holds
    the whole batch."""
    run = tmp_path_factory.mktemp("algo") / "run"
    tr = PairGRPOTrainer.from_config(load_config(None, tiny_overrides(toy_world, run, **{"algo.beta": 0.05,
                                                                                         "algo.mu": 1})))
    batch = tr.make_batch(1, tr.sampler.next())
    # the tiny model's answers often all get one reward (zero advantages): random ones make every term count
    g = torch.Generator().manual_seed(25)
    batch.adv_und, batch.adv_gen = (torch.randn(a.shape, generator=g) for a in (batch.adv_und, batch.adv_gen))
    tr.update(batch)
    return tr, batch, {k: v.clone() for k, v in tr.model.state_dict().items()}


def _configure(tr, weights, overrides: dict):
    tr.model.load_state_dict(weights)
    tr.cfg.algo = load_config(None, [f"{k}={v}" for k, v in {"algo.beta": 0.05, "algo.mu": 1, **overrides}.items()]).algo


def _reference_loss(tr, batch, task: str, rows: slice, ref_logp):
    """The micro-batch's loss by the float64 spec: the head's logits materialised, `clipped_policy_loss` with
    the config's knobs; the top-entropy mask and cov selection drawn from the fp32 head as the trainer does."""
    a, ro = tr.cfg.algo, batch.rollout(task)
    with torch.no_grad():
        v = task_view(tr.model, task, ro, rows)
    n, t, h = v.hidden.shape
    bias = None if v.bias is None else v.bias.double()
    logp, entropy = spec.linear_logprobs(v.hidden.double().reshape(n * t, h), v.weight.double(), v.targets.reshape(-1),
                                         bias=bias, temperature=v.temperature, return_entropy=True)
    logp, entropy = logp.view(n, t), entropy.view(n, t)
    # the fp32 head on the loss tokens, as the trainer's no-grad pass: the same mask and selection, bit for bit
    mask = v.mask
    lp32, ent32 = (torch.zeros(n, t).masked_scatter(mask, x) for x in linear_logprobs(
        v.hidden[mask], v.weight, v.targets[mask], bias=v.bias, temperature=v.temperature, return_entropy=True))
    old, adv = ro.old_logp[rows], batch.advantages(task)[rows]
    kw = {k: getattr(a, k) for k in KERNEL_KNOBS}  # every one, defaults too: what the kernels must have been given
    keep = algo.high_entropy_mask(ent32, mask, a.top_entropy_quantile) if a.top_entropy_quantile < 1 else None
    if a.loss_type in spec.COV_SELECTION_MODES:
        seed = algo.selection_seed(tr.cfg.train.seed, tr.step + 1, task, rows.start or 0, tr.inner_epoch)
        kw["selected"] = algo.cov_selection(a, lp32, old, adv, mask, torch.Generator().manual_seed(seed))
        if keep is not None:
            kw["selected"] &= keep
    old, adv = old.double(), adv.double()
    if keep is not None:
        adv = adv[:, None] * keep
        if a.entropy_coef:
            kw["entropy_mask"] = keep
    if a.entropy_coef:
        kw["entropy"] = entropy
    out = spec.clipped_policy_loss(logp, old, adv, mask, ref_logp=ref_logp.double(), epsilon_low=a.epsilon_low,
                                   epsilon_high=a.epsilon_high, beta=a.beta, kl_estimator=a.kl_estimator,
                                   loss_agg_mode=a.loss_agg_mode, **kw)
    return out, (entropy * mask).sum() / mask.sum(), kw


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_trainer_loss_is_the_reference_formula_and_an_update_is_finite(moved, case):
    tr, batch, weights = moved
    _configure(tr, weights, LOSS_CASES[case])
    rows = tr.micro_batches(batch)[0]
    for task in TASKS:
        ref_logp = tr.reference_logprobs(task, batch, rows)
        with torch.no_grad():
            out = tr.task_loss(task, batch, rows, ref_logp)
        want, mean_entropy, kw = _reference_loss(tr, batch, task, rows, ref_logp)
        assert 0 < float(want.ratio_mean) and abs(float(want.ratio_mean) - 1) > 1e-4, task  # the policy moved
        torch.testing.assert_close(out.loss.double(), want.loss, rtol=1e-4, atol=1e-6, msg=f"{case} {task}")
        torch.testing.assert_close(out.clip_fraction.double(), want.clip_fraction, rtol=0, atol=1e-6)
        if algo.computes_entropy(tr.cfg.algo):
            torch.testing.assert_close(out.entropy.double(), mean_entropy, rtol=1e-4, atol=1e-6)
        if "selected" in kw and tr.cfg.algo.top_entropy_quantile == 1:
            assert kw["selected"].any(), (case, task)  # the selection acts on this batch
    metrics = tr.update(batch)
    assert "skipped_updates" not in metrics
    assert all(math.isfinite(v) for v in metrics.values())
    assert {f"entropy.{t}" for t in TASKS} <= metrics.keys() if algo.computes_entropy(tr.cfg.algo) else \
        not any(k.startswith("entropy") for k in metrics)


@pytest.mark.parametrize("estimator", [e for e in spec.ADVANTAGE_ESTIMATORS if e != "grpo"] + ["scale_batch",
                                                                                               "scale_none"])
def test_each_estimator_gives_the_batch_its_advantages_and_trains(moved, estimator):
    tr, _, weights = moved
    over = {"algo.scale_rewards": estimator[6:]} if estimator.startswith("scale_") else \
        {"algo.advantage_estimator": estimator}
    _configure(tr, weights, over)
    batch = tr.make_batch(1, tr.sampler.next())
    a = tr.cfg.algo
    g = tr.cfg.rollout.group_size
    for task in TASKS:
        ro = batch.rollout(task)
        mask = ro.response_mask if task == "understanding" else torch.ones_like(ro.image_tokens, dtype=torch.bool)
        rewards = batch.rewards_und if task == "understanding" else batch.rewards_gen
        group_ids = torch.arange(rewards.numel() // g).repeat_interleave(g)
        w = spec.pair_weights(torch.tensor([p.similarity for p in batch.pairs]),
                              torch.tensor([p.aligned for p in batch.pairs]))[group_ids]
        if a.advantage_estimator == "reinforce_plus_plus":
            last = mask & (mask.long().cumsum(-1) == mask.sum(-1, keepdim=True))
            want = spec.token_returns_advantages(torch.where(last, rewards[:, None], 0.0), mask, weights=w)
        else:
            want = spec.group_advantages(rewards, group_ids, weights=w, eps=a.advantage_eps, scale=a.scale_rewards,
                                         estimator=a.advantage_estimator, lengths=mask.sum(-1))
        torch.testing.assert_close(batch.advantages(task), want.float())
    metrics = tr.update(batch)
    assert "skipped_updates" not in metrics and all(math.isfinite(v) for v in metrics.values())
