"""Scoring DiMOO rollouts (engine/dimoo/scoring.py): the float64 spec at the recorded states, groups (exact and
approximate), forwards per group, the hidden-state path into the fused linear loss, and the clipped loss."""

import pytest
import torch

from engine.dimoo.ids import DimooIds
from engine.dimoo.model import tiny_dimoo
from engine.dimoo.sampler import REVEAL_ORDERS, image_rows, model_logits_fn, sample_image, sample_text, text_rows
from engine.dimoo.scoring import head_inputs, model_hidden_fn, score_plan, score_rollout, trajectory_logprob
from pairuni_kernels import clipped_policy_loss, fused_linear_policy_loss, linear_logprobs

IDS = DimooIds.compact(6, 11)
SEEDS = torch.tensor([3, 2**33 + 1, 77], dtype=torch.int64)


class TableLogits:
    """logits_fn: a fixed random float64 function of each row's tokens (exact integer hash into a table).
    Counts its calls."""

    def __init__(self, gen, vocab):
        self.table = torch.randn(5003, generator=gen, dtype=torch.float64) * 2
        self.coef = torch.randint(1, 5003, (256,), generator=gen)
        self.vocab, self.calls = vocab, 0

    def __call__(self, ids):
        self.calls += 1
        b, length = ids.shape
        h = (ids * self.coef[:length]).sum(1) % 5003
        idx = (h[:, None, None] * 37 + torch.arange(length)[None, :, None] * self.vocab
               + torch.arange(self.vocab)[None, None, :]) % 5003
        return self.table[idx]


def image_rollout(fn, order, cfg_scale=1.5, temperature=0.8, steps=5):
    start, uncond, pos = image_rows(IDS, torch.tensor([1, 4, 0]), torch.tensor([IDS.uncondition]), 2, 4)
    return sample_image(fn, start, pos, uncond_start=uncond if cfg_scale else None, seeds=SEEDS, steps=steps,
                        cfg_scale=cfg_scale, temperature=temperature, mask_id=IDS.mask,
                        vocab_offset=IDS.image_offset, order=order)


def spec_logp(fn, ro, state_step_of):
    """float64 spec: for each (b, p), log softmax(((1 + w) c - w u) / T)[token] at ro.state(state_step_of(t))."""
    out = torch.zeros(ro.step_map.shape, dtype=torch.float64)
    w, temp = ro.cfg_scale, ro.temperature or 1.0
    tgt = ro.targets()
    for b in range(ro.step_map.shape[0]):
        for p in range(ro.step_map.shape[1]):
            s = state_step_of(int(ro.step_map[b, p]))
            c = fn(ro.state(s)[b:b + 1])[0, ro.positions[p]].double()
            if ro.uncond_start is not None:
                u = fn(ro.uncond_state(s)[b:b + 1])[0, ro.uncond_columns[p]].double()
                z = (1 + w) * c - w * u
            else:
                z = c
            out[b, p] = torch.log_softmax(z / temp, -1)[tgt[b, p]]
    return out


def test_score_plan():
    class R:  # only the schedule is read
        schedule = [2, 0, 3, 1, 0, 4, 5]

    assert score_plan(R()) == [[0], [2], [3], [5], [6]]
    assert score_plan(R(), 2) == [[0, 2, 3], [5, 6]]
    assert score_plan(R(), 3) == [[0, 2], [3, 5], [6]]
    assert score_plan(R(), 9) == [[0], [2], [3], [5], [6]]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="score_groups"):
            score_plan(R(), bad)


@pytest.mark.parametrize("order", REVEAL_ORDERS)
@pytest.mark.parametrize("cfg_scale,temperature", [(1.5, 0.8), (0.0, 1.2), (2.0, 0.0)])
def test_exact_scoring_is_the_spec_and_the_samplers_logp(gen, order, cfg_scale, temperature):
    fn = TableLogits(gen, IDS.codebook_size)
    ro = image_rollout(fn, order, cfg_scale, temperature)
    fn.calls = 0
    sc = score_rollout(fn, ro)
    nonempty = sum(k > 0 for k in ro.schedule)
    assert sc.exact and fn.calls == nonempty * (2 if cfg_scale else 1)
    assert sc.logp.dtype == torch.float64 and sc.temperature == (temperature or 1.0)
    torch.testing.assert_close(sc.logp, spec_logp(fn, ro, lambda t: t), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sc.logp.float(), ro.old_logp, rtol=1e-5, atol=1e-5)  # fp32 logits in the sampler
    assert torch.equal(sc.reveal_masks, ro.step_map[:, None] == torch.arange(ro.steps)[None, :, None])
    assert bool(sc.mask.all()) and torch.equal(sc.group_masks.sum(1), torch.ones_like(ro.step_map))


@pytest.mark.parametrize("order", REVEAL_ORDERS)
def test_grouped_scoring_uses_each_groups_first_state(gen, order):
    """score_groups < steps: one forward pair per group, tokens scored at the group's first state: the spec with
    that state, an approximation (it differs from the exact score)."""
    fn = TableLogits(gen, IDS.codebook_size)
    ro = image_rollout(fn, order, steps=5)
    runs = score_plan(ro, 2)
    first = {t: run[0] for run in runs for t in run}
    fn.calls = 0
    sc = score_rollout(fn, ro, score_groups=2)
    assert not sc.exact and fn.calls == 2 * 2 and sc.group_masks.shape[1] == 2
    torch.testing.assert_close(sc.logp, spec_logp(fn, ro, first.__getitem__), rtol=1e-12, atol=1e-12)
    late = torch.tensor([first[int(t)] != int(t) for t in ro.step_map.flatten()]).view_as(ro.step_map)
    assert bool(late.any())
    exact = score_rollout(fn, ro).logp
    assert bool(((sc.logp - exact).abs() > 1e-6)[late].all())
    torch.testing.assert_close(sc.logp[~late], exact[~late], rtol=0, atol=0)


def test_text_scoring(gen):
    fn = TableLogits(gen, IDS.vocab_size)
    start, pos = text_rows(IDS, torch.tensor([2, 5]), 6)
    ro = sample_text(fn, start, pos, seeds=SEEDS, steps=4, block_length=3, cfg_scale=1.0, temperature=0.9,
                     mask_id=IDS.mask, order="confidence")
    sc = score_rollout(fn, ro)
    torch.testing.assert_close(sc.logp, spec_logp(fn, ro, lambda t: t), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sc.logp.float(), ro.old_logp, rtol=1e-5, atol=1e-5)


def test_wrong_vocabulary_is_refused(gen):
    fn = TableLogits(gen, IDS.codebook_size)
    ro = image_rollout(fn, "random")
    with pytest.raises(ValueError, match="logits_fn"):
        score_rollout(TableLogits(gen, IDS.codebook_size + 1), ro)
    with pytest.raises(ValueError, match="logits_fn"):
        score_rollout(lambda ids: fn(ids)[0], ro)


@pytest.mark.parametrize("order", REVEAL_ORDERS)
def test_hidden_path_and_fused_loss_match_the_logits_path(order):
    """tiny DiMOO: guided hidden states through the image-slice head = guided logits (the head is linear);
    fused_linear_policy_loss on them = clipped_policy_loss on score_rollout's log-probs (loss and gradients)."""
    model = tiny_dimoo(16, seed=1, codebook_size=12).double()
    ids = model.ids
    start, uncond, pos = image_rows(ids, torch.tensor([2, 7, 1]), torch.tensor([ids.uncondition]), 2, 3)
    fn = model_logits_fn(model, ids.image_slice)
    ro = sample_image(fn, start, pos, uncond_start=uncond, seeds=SEEDS, steps=4, cfg_scale=3.0, temperature=0.9,
                      mask_id=ids.mask, vocab_offset=ids.image_offset, order=order)
    g = torch.Generator().manual_seed(5)
    adv = torch.randn(3, generator=g, dtype=torch.float64)
    old = ro.old_logp.double() + 0.05 * torch.randn(ro.old_logp.shape, generator=g, dtype=torch.float64)
    params = [p for p in model.parameters()]

    sc = score_rollout(fn, ro, score_groups=2)
    ref = clipped_policy_loss(sc.logp, old, adv, sc.mask)
    g_ref = torch.autograd.grad(ref.loss, params, allow_unused=True)

    hi = head_inputs(model_hidden_fn(model), ro, score_groups=2)
    assert hi.hidden.shape == (3, 6, model.config.d_model) and not hi.exact
    w = model.head_weight(ids.image_slice)
    lp = linear_logprobs(hi.hidden.flatten(0, 1), w, hi.targets.flatten(), temperature=hi.temperature)
    torch.testing.assert_close(lp.view(3, 6), sc.logp, rtol=1e-10, atol=1e-10)
    fused = fused_linear_policy_loss(hi.hidden, w, hi.targets, old, adv, hi.mask, temperature=hi.temperature)
    g_fused = torch.autograd.grad(fused.loss, params, allow_unused=True)
    torch.testing.assert_close(fused.loss, ref.loss, rtol=1e-10, atol=1e-12)
    nonzero = 0
    for a, b in zip(g_fused, g_ref):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
        nonzero += int(bool(b.abs().sum() > 0))
    assert nonzero >= 3


def test_exact_ratio_at_the_rollout_policy_is_one_and_loss_trains(gen):
    """Scored at the rollout's own policy, exp(sum(logp - old_logp)) = 1 per trajectory (fp32 sampler vs exact
    scoring); a clipped-loss step in fp32 gives gradients to the network."""
    model = tiny_dimoo(16, seed=2, codebook_size=12)
    ids = model.ids
    start, uncond, pos = image_rows(ids, torch.tensor([2, 7, 1]), torch.tensor([ids.uncondition]), 2, 2)
    fn = model_logits_fn(model, ids.image_slice)
    ro = sample_image(fn, start, pos, uncond_start=uncond, seeds=SEEDS, steps=3, cfg_scale=1.0, temperature=1.0,
                      mask_id=ids.mask, vocab_offset=ids.image_offset, order="random")
    sc = score_rollout(fn, ro)
    ratio = torch.exp(trajectory_logprob(sc) - ro.old_logp.sum(1))
    torch.testing.assert_close(ratio.detach(), torch.ones(3), rtol=1e-5, atol=1e-5)
    out = clipped_policy_loss(sc.logp, ro.old_logp, torch.tensor([1.0, -0.5, 0.25]), sc.mask)
    out.loss.backward()
    assert model.head_weight().grad is not None and float(model.head_weight().grad.abs().sum()) > 0
