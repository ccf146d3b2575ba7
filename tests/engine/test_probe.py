"""`pairuni probe-gradients`: cosines between the understanding and generation gradients on the shared weights.

Everything runs on the tiny random Janus and the bundled toy world, on CPU. The gradients are
checked three ways: against `PairGRPOTrainer.backward` (the trainer's own accumulation), against
the textbook first-step policy gradient `-A * grad log pi`, and the cosines against a direct
`torch.autograd.grad` + `cosine_similarity` per layer and overall.
"""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from engine import cli
from engine.config import load_config
from engine.model import image_head, text_head
from engine.policy import generation_head_input, understanding_hidden
from engine.probe import (
    OVERALL,
    derangement,
    gradient_cosines,
    probe_config,
    probe_gradients,
    repair,
    shared_parameter_groups,
    task_gradient,
)
from engine.trainer import PairGRPOTrainer
from pairuni_kernels import linear_logprobs

SMALL = ["rollout.group_size=4", "rollout.max_new_tokens=3", "train.progress=false"]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """Probe settings, 2 pairs per batch, micro-batches of 3 rows (8 rows: chunks 3, 3, 2). Its run_dir is a
    temp folder: the default (runs/tiny) is the user's demo run, which tests never read."""
    run = tmp_path_factory.mktemp("probe") / "run"
    cfg = probe_config(load_config(None, [*SMALL, "optim.micro_batch_size=3", f"train.run_dir={run}"]),
                       pairs_per_batch=2, seed=0)
    return PairGRPOTrainer.from_config(cfg)


@pytest.fixture(scope="module")
def batch(trainer):
    """The first batch with non-zero advantages in both tasks (rewards vary within some group of each)."""
    for step in range(1, 40):
        b = trainer.make_batch(step, trainer.pairs[2 * step: 2 * step + 2])
        if b.adv_und.abs().sum() > 0 and b.adv_gen.abs().sum() > 0:
            return b
    pytest.fail("no batch with non-zero advantages in both tasks")


def _shared(trainer):
    groups = shared_parameter_groups(trainer.model)
    return groups, [p for ps in groups.values() for p in ps], {k: len(v) for k, v in groups.items()}


def test_cli_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["probe-gradients", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--pairs", "--model", "--config", "--num-batches", "--seed", "--out"):
        assert opt in out


def test_gradient_cosines_on_a_hand_computed_case():
    a = [torch.tensor([3.0, 4.0]), torch.tensor([[1.0, 0.0]]), torch.tensor([0.0])]
    b = [torch.tensor([4.0, 3.0]), torch.tensor([[0.0, 2.0]]), torch.tensor([5.0])]
    cos = gradient_cosines(a, b, {"first": 1, "second": 2})
    assert cos["first"] == pytest.approx(24 / 25)
    assert cos["second"] == pytest.approx(0.0)  # [1, 0, 0] . [0, 2, 5] = 0
    assert cos[OVERALL] == pytest.approx(24 / math.sqrt(26 * 54))
    self_cos = gradient_cosines(a, a, {"first": 1, "second": 2})
    assert all(v == pytest.approx(1.0) for v in self_cos.values())
    zero = gradient_cosines([torch.zeros(2)], [torch.ones(2)], {"only": 1})
    assert zero == {"only": None, OVERALL: None}  # a zero gradient has no direction: skipped, not 0
    with pytest.raises(ValueError, match="grads_a"):
        gradient_cosines(a, b[:2], {"first": 1, "second": 2})


def test_shared_weights_are_the_decoder_layers_and_final_norm(trainer):
    groups, params, _ = _shared(trainer)
    lm = trainer.model.model.language_model
    assert list(groups) == [f"layers.{i}" for i in range(len(lm.layers))] + ["norm"]
    ids = {id(p) for p in params}
    assert ids == {id(p) for p in lm.layers.parameters()} | {id(p) for p in lm.norm.parameters()}
    assert id(lm.embed_tokens.weight) not in ids and id(trainer.model.lm_head.weight) not in ids


def test_task_gradient_equals_the_trainers_backward(trainer, batch):
    """Micro-batch shares as in `PairGRPOTrainer.backward`: its accumulated .grad with one task weighted 1."""
    _, params, _ = _shared(trainer)
    a = trainer.cfg.algo
    for task, weights in (("understanding", (1.0, 0.0)), ("generation", (0.0, 1.0))):
        mine, stats = task_gradient(trainer, task, batch, params)
        saved = a.understanding_weight, a.generation_weight
        a.understanding_weight, a.generation_weight = weights
        trainer.model.zero_grad(set_to_none=True)
        try:
            trainer.backward(batch)
        finally:
            a.understanding_weight, a.generation_weight = saved
        theirs = [p.grad for p in params]
        trainer.model.zero_grad(set_to_none=True)
        assert sum(float(g.abs().sum()) for g in mine) > 0
        for m, t in zip(mine, theirs):
            torch.testing.assert_close(m, t, atol=1e-7, rtol=1e-5)
        assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # first inner step: the rollout policy


def test_task_gradient_is_minus_advantage_times_grad_logp(trainer, batch):
    """At ratio 1 the token-mean PairGRPO loss has the gradient of -sum(A * logp * mask) / sum(mask)."""
    _, params, _ = _shared(trainer)
    model = trainer.model
    und, gen = batch.und, batch.gen
    cases = {
        "understanding": (understanding_hidden(model, und), text_head(model), und.response_ids,
                          und.response_mask, batch.adv_und, und.temperature),
        "generation": (generation_head_input(model, gen), image_head(model), gen.image_tokens,
                       torch.ones_like(gen.image_tokens, dtype=torch.bool), batch.adv_gen, gen.temperature),
    }
    for task, (hidden, (w, bias), targets, mask, adv, temp) in cases.items():
        n, t, h = hidden.shape
        logp = linear_logprobs(hidden.reshape(n * t, h), w, targets.reshape(-1), bias=bias, temperature=temp)
        surrogate = -(adv[:, None] * logp.view(n, t) * mask).sum() / mask.sum()
        expected = torch.autograd.grad(surrogate, params, allow_unused=True)
        mine, _ = task_gradient(trainer, task, batch, params)
        for m, e in zip(mine, expected):
            torch.testing.assert_close(m, torch.zeros_like(m) if e is None else e, atol=1e-6, rtol=1e-4)


def test_cosines_match_direct_autograd_per_layer_and_overall(trainer, batch):
    groups, params, sizes = _shared(trainer)
    g_und, _ = task_gradient(trainer, "understanding", batch, params)
    g_gen, _ = task_gradient(trainer, "generation", batch, params)
    cos = gradient_cosines(g_und, g_gen, sizes)
    # direct: one full-batch loss per task, one autograd.grad per group
    full = slice(None)
    trainer.model.train()
    direct = {}
    for name, ps in [*groups.items(), (OVERALL, params)]:
        lu = trainer.task_loss("understanding", batch, full).loss
        lg = trainer.task_loss("generation", batch, full).loss
        gu = torch.cat([g.flatten() for g in torch.autograd.grad(lu, ps)])
        gg = torch.cat([g.flatten() for g in torch.autograd.grad(lg, ps)])
        direct[name] = float(torch.nn.functional.cosine_similarity(gu, gg, dim=0))
    trainer.model.eval()
    assert set(cos) == set(direct)
    for name in direct:
        assert cos[name] == pytest.approx(direct[name], abs=1e-4), name
    assert len({round(v, 3) for v in cos.values()}) > 1  # layers really differ: not one number copied around
    # self-pair: the same loss computed twice has cosine 1 in every group
    again, _ = task_gradient(trainer, "understanding", batch, params)
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in gradient_cosines(g_und, again, sizes).values())


def test_random_repairing_moves_every_understanding_half(trainer):
    pairs = trainer.pairs[:12]
    perm = derangement(len(pairs), torch.Generator().manual_seed(3))
    assert perm == derangement(len(pairs), torch.Generator().manual_seed(3))
    assert perm != derangement(len(pairs), torch.Generator().manual_seed(4))
    assert sorted(perm) == list(range(12)) and all(p != i for i, p in enumerate(perm))
    mixed = repair(pairs, perm)
    for i, (orig, new) in enumerate(zip(pairs, mixed)):
        assert new.generate is orig.generate and (new.kind, new.similarity) == (orig.kind, orig.similarity)
        assert new.understand is pairs[perm[i]].understand
        assert new.understand.source_id != orig.understand.source_id
    with pytest.raises(ValueError, match="n:"):
        derangement(1, torch.Generator())


def test_probe_reuses_a_trainer_and_leaves_it_as_it_was(trainer):
    pairs, cfg = trainer.pairs, trainer.cfg
    before = [p.detach().clone() for p in trainer.model.parameters()]
    result = probe_gradients(trainer.cfg, num_batches=2, pairs_per_batch=2, seed=1, trainer=trainer)
    assert trainer.pairs is pairs and trainer.cfg is cfg
    assert all(p.grad is None for p in trainer.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert len(result.records) == 4


def test_cli_run_prints_the_table_and_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "probe"
    # 4 pairs per batch: the untrained tiny model rarely gets a group's answers partly right, and a
    # batch needs one such group for a non-zero understanding gradient
    k = 6
    assert cli.main(["probe-gradients", "--num-batches", str(k), "--pairs-per-batch", "4", "--seed", "0",
                     "--out", str(out), *SMALL, f"train.run_dir={tmp_path / 'run'}"]) == 0
    text = capsys.readouterr().out
    assert "median" in text and "\npaired " in text and "\nrandom " in text and "layers.1" in text
    data = json.loads((out / "gradient_probe.json").read_text())
    assert (out / "gradient_probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recs = data["records"]
    assert len(recs) == 2 * k and data["groups"] == ["layers.0", "layers.1", "norm"]
    by = {(r["condition"], r["batch"]): r for r in recs}
    seen_und = {c: sorted(i for r in recs if r["condition"] == c for i in r["understanding_ids"])
                for c in ("paired", "random")}
    assert seen_und["paired"] == seen_und["random"]  # the same samples, only re-paired
    for i in range(k):
        p, r = by["paired", i], by["random", i]
        assert p["generation_ids"] == r["generation_ids"] and p["understanding_ids"] != r["understanding_ids"]
        assert r["generation_gradient_reused"]  # same seeds per slot: the same images
        assert r["grad_norm"]["generation"] == p["grad_norm"]["generation"] > 0
        for rec in (p, r):
            assert rec["ratio_mean"]["understanding"] == pytest.approx(1.0, abs=1e-5)
            assert rec["clip_fraction"] == {"understanding": 0.0, "generation": 0.0}
            assert all(v is None or -1.0 <= v <= 1.0 for v in rec["cosine"].values())
            assert (rec["cosine"][OVERALL] is None) == (rec["grad_norm"]["understanding"] == 0)
    for cond in ("paired", "random"):
        vals = [r["cosine"][OVERALL] for r in recs if r["condition"] == cond and r["cosine"][OVERALL] is not None]
        s = data["summary"][cond]
        assert vals and s["n"] == len(vals) and s["skipped"] == k - len(vals)
        assert s["median"] == pytest.approx(statistics.median(vals))
        assert s["q25"] <= s["median"] <= s["q75"] and s["iqr"] == pytest.approx(s["q75"] - s["q25"])
        assert f"{s['median']:+.3f}" in text
    both = [(by["paired", i]["cosine"][OVERALL], by["random", i]["cosine"][OVERALL]) for i in range(k)]
    both = [(p, r) for p, r in both if p is not None and r is not None]
    m = data["summary"]["matched"]
    assert m["n"] == len(both)
    if both:
        assert m["median_difference"] == pytest.approx(statistics.median(p - r for p, r in both))


def test_probe_reads_a_run_dir_that_holds_a_run_and_leaves_it_as_it_was(tmp_path):
    """Probing what was trained is the usual case: the run's config names a run_dir with the run in it."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "config.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    cfg = load_config(None, [*SMALL, f"train.run_dir={run}"])
    result = probe_gradients(cfg, num_batches=1, pairs_per_batch=2, seed=0)
    assert len(result.records) == 2
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
