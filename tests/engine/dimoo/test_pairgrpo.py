"""PairGRPO on the tiny DiMOO (engine/dimoo/pairgrpo.py, engine/dimoo/toyworld.py): the step's loss and gradients
against a plain float64 re-computation, grouped backward = one-shot backward with bounded live activations,
batch-invariant rollouts inside the step, and (slow) both toy-world rewards rising."""

import gc
import math

import pytest
import torch

from engine.algo import AlgoConfig
from engine.data import default_pairs_path
from engine.data.io import data_root_of, read_pairs
from engine.dimoo import pairgrpo as pg
from engine.dimoo.scoring import score_plan
from engine.dimoo.toyworld import ToyDimooWorld


@pytest.fixture(scope="module")
def pairs():
    return read_pairs(default_pairs_path())


@pytest.fixture(scope="module")
def world(pairs):
    return ToyDimooWorld.build(pairs, data_root_of(default_pairs_path()))


def _two_pairs(pairs):
    """One aligned and one retrieved pair (so the pair weight is 1 for one, sqrt(s) < 1 for the other)."""
    aligned = next(p for p in pairs if p.aligned)
    retrieved = next(p for p in pairs if not p.aligned)
    return [aligned, retrieved]


def _perturb(model, gen, scale=0.05):
    """Move every weight so the policy differs from the one that sampled (ratios != 1, some clipped)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- world
def test_world_layout_and_image_codes_round_trip(world, pairs, gen):
    ids = world.ids
    assert ids == ids.compact(len(world.tokenizer), 64) and world.tiny_model().ids == ids
    s = pairs[0].understand
    codes = torch.randint(0, 7, (3, world.grid, world.grid), generator=gen)
    assert torch.equal(world.image_codes(world.decode_images(codes)), codes)  # painter VQ, then its inverse
    start, positions = world.understanding_rows(s.question, world.load_image(s))
    assert (start[positions] == ids.mask).all() and start[positions[0] - 1] == ids.boa
    assert start[0] == ids.boi and int(ids.is_image(start).sum()) == world.grid ** 2
    start, uncond, positions = world.generation_rows(pairs[0].generate.prompt)
    assert positions.numel() == world.grid ** 2 and uncond[0] == ids.uncondition
    with pytest.raises(ValueError, match="images"):
        world.image_codes(torch.rand(1, 3, 30, 30, generator=gen))


def test_config_rejects_bad_values():
    for bad, match in (({"group_size": 0}, "group_size"), ({"score_groups": 0}, "score_groups"),
                       ({"order": "left"}, "order"), ({"text_temperature": 0.0}, "text_temperature"),
                       ({"algo": {"mu": 1}}, "algo: expected")):
        with pytest.raises(ValueError, match=match):
            pg.DimooGRPOConfig(**bad)
    for knobs, match in (({"loss_agg_mode": "seq-mean-token-mean"}, "algo.loss_agg_mode"),
                         ({"generation_weight": -1.0}, "algo.generation_weight"),
                         ({"importance_sampling_level": "sequence"}, "algo.importance_sampling_level"),
                         ({"loss_type": "geo_mean"}, "algo.loss_type"), ({"loss_type": "clip_cov"}, "algo.loss_type"),
                         ({"top_entropy_quantile": 0.5}, "algo.top_entropy_quantile"),
                         ({"advantage_estimator": "reinforce_plus_plus"}, "algo.advantage_estimator"),
                         ({"entropy_coef": 0.01, "loss_agg_mode": "seq-mean-token-sum"}, "algo.entropy_agg_mode")):
        with pytest.raises(ValueError, match=match):
            pg.DimooGRPOConfig(algo=AlgoConfig(**knobs))
    with pytest.raises(ValueError, match="changes"):
        pg.DimooGRPOConfig().replace(nope=1)
    cfg = pg.DimooGRPOConfig(group_size=3, algo=AlgoConfig(loss_type="sapo", mu=3))
    assert pg.DimooGRPOConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="cfg.algo: unknown"):
        pg.DimooGRPOConfig.from_dict({**cfg.to_dict(), "algo": {"nope": 1}})


# ----------------------------------------------------------------------------- advantages
def test_pair_advantages_are_group_advantages_times_pair_weights(pairs, gen):
    two = _two_pairs(pairs)
    cfg = pg.DimooGRPOConfig(group_size=4)
    r = torch.rand(8, generator=gen)
    got = pg.pair_advantages(r, two, cfg).double()
    r64 = r.double().view(2, 4)
    want = (r64 - r64.mean(1, keepdim=True)) / (r64.std(1, keepdim=True) + cfg.algo.advantage_eps)
    want = want * torch.tensor([1.0, math.sqrt(two[1].similarity)], dtype=torch.float64)[:, None]
    torch.testing.assert_close(got, want.flatten(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="rewards"):
        pg.pair_advantages(r[:5], two, cfg)


# ----------------------------------------------------------------------------- float64 re-computation
def _run_log_softmax(model, ro, run, vocab):
    """(mask [G, T] of the tokens revealed in `run`, [G, T, |vocab|] log-softmax at the sampler's temperature of
    the full-vocabulary guided logits (1 + w) c - w u at the run's first state, sliced to `vocab`)."""
    member = torch.zeros_like(ro.step_map, dtype=torch.bool)
    for t in run:
        member |= ro.step_map == t
    cond = model(ro.state(run[0])).logits[:, ro.positions][..., vocab]
    if ro.uncond_start is not None:
        unc = model(ro.uncond_state(run[0])).logits[:, ro.uncond_columns][..., vocab]
        cond = (1 + ro.cfg_scale) * cond - ro.cfg_scale * unc
    return member, torch.log_softmax(cond / ro.scoring_temperature, -1)


def _plain_objective(model, world, batch, cfg):
    """The step's objective written out in float64 from full-vocabulary logits: per task, every revealed token,
    its run's first-step state, guided logits (1 + w) c - w u sliced to the task's head, log-softmax at the
    sampler's temperature, PPO clip, token-mean over the task's tokens; sum of weight * task loss."""
    total = 0.0
    for task, w in pg.task_weights(cfg):
        tb = batch.task(task)
        terms, count = [], 0
        for i, ro in enumerate(tb.rollouts):
            adv = tb.advantages[i * cfg.group_size:(i + 1) * cfg.group_size].double()
            vocab = pg.task_head(model, world, task)
            for run in score_plan(ro, cfg.score_groups):
                member, full = _run_log_softmax(model, ro, run, vocab)
                logp = full.gather(-1, ro.targets()[..., None])[..., 0]
                ratio = torch.exp(logp - ro.old_logp.double())
                a = adv[:, None].expand_as(ratio)
                loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - cfg.algo.epsilon_low,
                                                                  1 + cfg.algo.epsilon_high))
                terms.append(loss[member].sum())
                count += int(member.sum())
        total = total + w * torch.stack(terms).sum() / count
    return total


def _assert_grouped_backward_equals(model, world, batch, cfg, gen, objective) -> dict:
    """Perturb the float64 model (ratios != 1), then the grouped backward's loss and every gradient must equal
    those of `objective(model, world, batch, cfg)` (a float64 re-computation); returns backward's sums."""
    _perturb(model, gen)
    model.zero_grad()
    sums = pg.backward(model, world, batch, cfg)
    got_loss = sum(w * sums[t][0] for t, w in pg.task_weights(cfg))
    got = _grads(model)
    model.zero_grad()
    want_loss = objective(model, world, batch, cfg)
    want_loss.backward()
    want = _grads(model)
    assert math.isclose(got_loss, float(want_loss.detach()), rel_tol=1e-9, abs_tol=1e-12)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-8, atol=1e-11, msg=name)
    return sums


@pytest.mark.parametrize("score_groups", [None, 2])
def test_step_loss_and_gradients_match_float64_recomputation(world, pairs, gen, score_groups):
    model = world.tiny_model(seed=3).double()
    cfg = pg.DimooGRPOConfig(group_size=3, score_groups=score_groups, image_steps=4,
                             algo=AlgoConfig(mu=1, epsilon_low=0.1, epsilon_high=0.15, generation_weight=0.7))
    batch = pg.make_batch(model, world, _two_pairs(pairs), cfg, seed=11, step=2)
    assert batch.und.advantages.abs().sum() + batch.gen.advantages.abs().sum() > 0
    sums = _assert_grouped_backward_equals(model, world, batch, cfg, gen, _plain_objective)
    assert sums["generation"][1] > 0  # some tokens clipped: the clip branch is exercised


def _spec_objective(model, world, batch, cfg, ref_model=None):
    """The step's objective through the float64 spec (`reference.clipped_policy_loss` with the config's loss
    type and knobs): each revealed token's log-prob at its run's state from full-vocabulary guided logits,
    assembled into the task's [P * G, T] tensor, then ONE spec call per task over all of its tokens."""
    from engine import algo as algo_ops
    from pairuni_kernels import reference as spec

    a, total = cfg.algo, 0.0
    for task, w in pg.task_weights(cfg):
        tb = batch.task(task)
        logps, olds, masks, ents, refs = [], [], [], [], []
        for ro in tb.rollouts:
            vocab = pg.task_head(model, world, task)
            logp = torch.zeros(ro.step_map.shape, dtype=torch.float64)
            ent = torch.zeros(ro.step_map.shape, dtype=torch.float64)
            ref = torch.zeros(ro.step_map.shape, dtype=torch.float64)
            for run in score_plan(ro, cfg.score_groups):
                member, full = _run_log_softmax(model, ro, run, vocab)
                logp = torch.where(member, full.gather(-1, ro.targets()[..., None])[..., 0], logp)
                ent = torch.where(member, -(full.exp() * full).sum(-1), ent)
                if ref_model is not None:
                    with torch.no_grad():
                        _, ref_full = _run_log_softmax(ref_model, ro, run, vocab)
                    ref = torch.where(member, ref_full.gather(-1, ro.targets()[..., None])[..., 0], ref)
            logps.append(logp)
            ents.append(ent)
            refs.append(ref)
            olds.append(ro.old_logp.double())
            masks.append(ro.step_map >= 0)
        out = spec.clipped_policy_loss(torch.cat(logps), torch.cat(olds), tb.advantages.double(), torch.cat(masks),
                                       epsilon_low=a.epsilon_low, epsilon_high=a.epsilon_high,
                                       loss_agg_mode=a.loss_agg_mode, **algo_ops.loss_kwargs(a),
                                       **({"entropy": torch.cat(ents)} if a.entropy_coef != 0 else {}),
                                       **({"ref_logp": torch.cat(refs), "beta": a.beta, "kl_estimator": a.kl_estimator}
                                          if a.beta > 0 else {}))
        total = total + w * out.loss
    return total


@pytest.mark.parametrize("knobs", [{"loss_type": "cispo", "epsilon_high": 2.0},
                                   {"loss_type": "sapo", "loss_agg_mode": "seq-mean-token-sum"},
                                   {"loss_type": "dppo_tv", "advantage_estimator": "rloo"},
                                   {"entropy_coef": 0.05, "dual_clip_c": 3.0},
                                   {"beta": 0.2, "kl_estimator": "k3"},
                                   {"beta": 0.1, "kl_estimator": "k1", "kl_ratio_correction": True}])
def test_every_runnable_loss_type_reaches_the_step_equal_to_the_float64_spec(world, pairs, gen, knobs):
    """The `algo.` knobs (engine.algo.AlgoConfig, as the Janus engine reads them) reach the DiMOO step: loss and
    gradients of the grouped backward equal the float64 spec over the task's whole token tensor."""
    model = world.tiny_model(seed=5).double()
    cfg = pg.DimooGRPOConfig(group_size=3, score_groups=2, image_steps=4, algo=AlgoConfig(mu=1, **knobs))
    ref = world.tiny_model(seed=9).double() if cfg.algo.beta > 0 else None  # a reference unlike the policy
    batch = pg.make_batch(model, world, _two_pairs(pairs), cfg, seed=7, step=1, ref_model=ref)
    sums = _assert_grouped_backward_equals(model, world, batch, cfg, gen,
                                           lambda *args: _spec_objective(*args, ref_model=ref))
    if ref is not None:
        assert all(abs(sums[t][3]) > 1e-3 for t in pg.TASKS)  # the KL term is there, and not ~0
        with pytest.raises(ValueError, match="ref_model"):
            pg.make_batch(model, world, _two_pairs(pairs), cfg, seed=7, step=1)


# ----------------------------------------------------------------------------- grouped backward
class _LiveSaved:
    """Bytes of activations saved for backward that are alive (parameters excluded), and the peak."""

    def __init__(self, model):
        self.params = {p.data_ptr() for p in model.parameters()}
        self.current = self.peak = 0

    def hooks(self):
        live = self

        class Packed:
            def __init__(self, t):
                self.t = t.detach()  # no grad_fn: a saved output would otherwise keep its own graph alive
                self.n = 0 if t.data_ptr() in live.params else t.numel() * t.element_size()
                live.current += self.n
                live.peak = max(live.peak, live.current)

            def __del__(self):
                live.current -= self.n

        return torch.autograd.graph.saved_tensors_hooks(Packed, lambda p: p.t)


def test_grouped_backward_equals_one_shot_and_holds_one_run(world, pairs):
    model = world.tiny_model(seed=5).double()
    cfg = pg.DimooGRPOConfig(group_size=3, score_groups=3, image_steps=5, text_steps=2)
    batch = pg.make_batch(model, world, _two_pairs(pairs), cfg, seed=4, step=1)
    _perturb(model, torch.Generator().manual_seed(9))
    assert len(score_plan(batch.gen.rollouts[0], cfg.score_groups)) == 3
    # one run alone: its saved activations
    live = _LiveSaved(model)
    single = []
    for task, _ in pg.task_weights(cfg):
        tb = batch.task(task)
        for i, ro in enumerate(tb.rollouts):
            for run in score_plan(ro, cfg.score_groups):
                with live.hooks():
                    out, _ = pg.run_loss(model, world, task, ro, tb.advantages[i * 3:(i + 1) * 3], run, cfg)
                single.append(live.current)
                del out
                gc.collect()
                assert live.current == 0
    runs = len(single)
    assert runs == 2 * (2 + 3)  # 2 pairs x (2 text runs + 3 image runs)
    # grouped: never more than one run's activations alive; freed after each run
    live = _LiveSaved(model)
    after = []
    model.zero_grad()
    with live.hooks():
        pg.backward(model, world, batch, cfg, on_run=lambda: after.append(live.current))
    grouped = _grads(model)
    assert after == [0] * runs and live.peak <= max(single) + 64  # + the loss scaling's saved scalars
    # one shot: all runs alive together (what the grouped step avoids), same gradient
    live = _LiveSaved(model)
    model.zero_grad()
    with live.hooks():
        loss = pg.one_shot_loss(model, world, batch, cfg)
        held = live.current
        loss.backward()
    assert held >= sum(single) and held > 3 * max(single)
    one_shot = _grads(model)
    for name in one_shot:
        torch.testing.assert_close(grouped[name], one_shot[name], rtol=1e-10, atol=1e-13, msg=name)


# ----------------------------------------------------------------------------- batch invariance
def test_rollouts_of_a_group_are_batch_invariant_inside_the_step(world, pairs):
    model = world.tiny_model(seed=1)
    cfg = pg.DimooGRPOConfig(group_size=4, image_steps=4)
    two = _two_pairs(pairs)
    batch = pg.make_batch(model, world, two, cfg, seed=7, step=3)
    from engine.rollout import rollout_seeds

    for task, fn in (("understanding", pg.rollout_understanding), ("generation", pg.rollout_generation)):
        seeds = rollout_seeds(7, 3, task, 8)
        for i, p in enumerate(two):
            ro = batch.task(task).rollouts[i]
            half = p.understand if task == "understanding" else p.generate
            for g in range(4):
                alone = fn(model, world, half, seeds[i * 4 + g: i * 4 + g + 1], cfg)
                assert torch.equal(alone.tokens[0], ro.tokens[g]) and torch.equal(alone.step_map[0], ro.step_map[g])
                torch.testing.assert_close(alone.old_logp[0], ro.old_logp[g], rtol=0, atol=1e-5)
    # the rewards are those of the decoded rows
    assert batch.und.rewards.shape == (8,) and batch.gen.outputs.shape == (8, 3, 64, 64)


def test_update_with_exact_scoring_starts_at_ratio_one(world, pairs):
    model = world.tiny_model(seed=2)
    cfg = pg.DimooGRPOConfig(group_size=4, algo=AlgoConfig(mu=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    batch = pg.make_batch(model, world, _two_pairs(pairs), cfg, seed=0, step=1)
    m = pg.update(model, opt, world, batch, cfg)
    for task in pg.TASKS:
        assert abs(m[f"ratio_mean.{task}"] - 1) < 1e-5 and m[f"clip_fraction.{task}"] == 0


def test_mu_inner_epochs_reuse_the_rollout_log_probs_and_skip_non_finite_updates(world, pairs):
    cfg = pg.DimooGRPOConfig(group_size=4, algo=AlgoConfig(mu=3))
    model = world.tiny_model(seed=4)
    batch = pg.make_batch(model, world, _two_pairs(pairs), cfg, seed=1, step=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps = []
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.register_step_post_hook(lambda *_: steps.append(1))
    m = pg.update(model, opt, world, batch, cfg)
    assert len(steps) == 3 and "skipped_updates" not in m
    assert abs(m["ratio_mean.generation"] - 1) > 1e-4  # the third epoch scores a moved policy against old_logp
    moved = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert any(not torch.equal(before[n], moved[n]) for n in before)
    batch.gen.advantages[0] = float("nan")
    m = pg.update(model, opt, world, batch, cfg)
    assert m["skipped_updates"] == 3 and len(steps) == 3
    assert all(torch.equal(moved[n], p) for n, p in model.named_parameters())


# ----------------------------------------------------------------------------- learning
#: RL from the random tiny DiMOO (no warm start): 40 steps of 4 pairs x G = 8 drawn from the first 8 toy-world
#: pairs; both mean rewards of the last 10 steps must beat the first 10 by > 0.1 (seen: understanding 0.07 ->
#: 0.55, generation 0.26 -> 0.50; about a minute on 2 idle cores).
LEARN = {"steps": 40, "train_pairs": 8, "pairs_per_step": 4, "k": 10, "lr": 1e-2, "seed": 0, "margin": 0.1}


def learn(world, pairs, *, steps, train_pairs, pairs_per_step, lr, seed, cfg=None, **_):
    """Metrics rows of PairGRPO from the random tiny DiMOO of `seed` on pairs[:train_pairs] (a seeded draw of
    `pairs_per_step` per step), AdamW(lr)."""
    model = world.tiny_model(seed=seed)
    cfg = cfg or pg.DimooGRPOConfig(group_size=8)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    pick = torch.Generator().manual_seed(seed)
    pool = pairs[:train_pairs]
    rows = []
    for step in range(1, steps + 1):
        idx = torch.randint(len(pool), (pairs_per_step,), generator=pick).tolist()
        rows.append(pg.train_step(model, opt, world, [pool[i] for i in idx], cfg, seed=seed, step=step))
    return rows


@pytest.mark.slow
def test_tiny_dimoo_learns_both_toy_world_rewards(world, pairs):
    rows = learn(world, pairs, **LEARN)
    k = LEARN["k"]
    for task in pg.TASKS:
        r = [row[f"reward.{task}"] for row in rows]
        first, last = sum(r[:k]) / k, sum(r[-k:]) / k
        print(f"{task}: mean reward of the first {k} steps {first:.3f}, of the last {k} steps {last:.3f}")
        assert last > first + LEARN["margin"], (task, first, last)
