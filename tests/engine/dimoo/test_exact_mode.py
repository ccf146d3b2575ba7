"""The exact mode, proved by enumeration (issue 26 item 5): with the `random` reveal order, a trajectory's
probability under the sampler is P(order) * exp(sum of the scored token log-probs), P(order) free of the model.

On tiny vocabularies and grids, with a fixed random model whose logits depend on the whole current state (cond
and uncond rows have their own tables), every trajectory (reveal sets per step + values) is enumerated and scored
by `score_rollout`; N seeded samples from the sampler are counted per trajectory and compared with the scored
probabilities by Pearson's chi-square test (cells with expected count < 5 pooled into one). False-alarm rate:
ALPHA = 1e-4 per test (the seeds are fixed, so each test is deterministic; with a correct sampler and scorer a
seed set fails with probability 1e-4). Negative controls: the same test rejects (p < ALPHA) when the scoring uses
a wrong temperature or drops CFG, and for the `confidence` order, whose scored product omits the position choice
(the products sum to the number of reveal-set sequences, not 1, and P(uniform sets) * product is rejected).
"""

import dataclasses
import itertools
import math

import pytest
import torch
from scipy.stats import chi2

from engine.dimoo.ids import DimooIds
from engine.dimoo.sampler import image_rows, sample_image, sample_text, text_rows
from engine.dimoo.scoring import log_order_probability, score_rollout, trajectory_logprob

ALPHA = 1e-4
N = 20_000


class StateTable:
    """logits_fn: at each generated column, logits = table[state][position], the state being the tuple of the
    generated columns' contents (MASK or one of the V tokens), read relative to the row's end (the tail is shared
    by cond and uncond rows); uncond rows (first token `uncond_first`) read their own table."""

    def __init__(self, gen, cols_from_end, vocab, mask, offset, uncond_first, scale=1.5):
        self.cols, self.vocab, self.mask, self.offset, self.uncond_first = cols_from_end, vocab, mask, offset, \
            uncond_first
        states = (vocab + 1) ** len(cols_from_end)
        self.cond = torch.randn(states, len(cols_from_end), vocab, generator=gen, dtype=torch.float64) * scale
        self.uncond = torch.randn(states, len(cols_from_end), vocab, generator=gen, dtype=torch.float64) * scale

    def __call__(self, ids):
        b, length = ids.shape
        cols = length - self.cols
        vals = ids[:, cols]
        digit = torch.where(vals == self.mask, 0, vals - self.offset + 1)
        idx = (digit * (self.vocab + 1) ** torch.arange(len(self.cols))).sum(1)
        table = torch.where((ids[:, 0] == self.uncond_first)[:, None, None], self.uncond[idx], self.cond[idx])
        out = torch.zeros(b, length, self.vocab, dtype=torch.float64)
        out[:, cols] = table
        return out


def enumerate_trajectories(ro, vocab):
    """A DiffusionRollout holding every trajectory of ro's schedule (reveal-set sequences x values) as a row.
    Set sequences: every order of the positions (within blocks for the text sampler) cut by the schedule."""
    p = ro.positions.numel()
    blocks = ro.block_length or p
    step_maps = set()
    for perm in itertools.product(*[itertools.permutations(range(i, i + blocks)) for i in range(0, p, blocks)]):
        order = [i for block in perm for i in block]
        sm = [0] * p
        done = 0
        for t, k in enumerate(ro.schedule):
            for i in order[done:done + k]:
                sm[i] = t
            done += k
        step_maps.add(tuple(sm))
    rows = [(sm, vals) for sm in sorted(step_maps) for vals in itertools.product(range(vocab), repeat=p)]
    step_map = torch.tensor([r[0] for r in rows])
    tokens = ro.tokens[:1].expand(len(rows), -1).clone()
    tokens[:, ro.positions] = torch.tensor([r[1] for r in rows]) + ro.vocab_offset
    return dataclasses.replace(ro, tokens=tokens, step_map=step_map, old_logp=torch.zeros(len(rows), p),
                               seeds=torch.zeros(len(rows), dtype=torch.int64)), len(step_maps)


def keys(ro):
    return [tuple(r) for r in torch.cat([ro.step_map, ro.targets()], 1).tolist()]


def chi_square_pvalue(samples, table, log_probs):
    """Pearson chi-square p-value of the sampled trajectories against exp(log_probs) over the enumerated ones."""
    probs = torch.exp(log_probs).double()
    counts = dict.fromkeys(keys(table), 0)
    for k in keys(samples):
        assert k in counts, f"sampled trajectory {k} not in the enumeration"
        counts[k] += 1
    observed = torch.tensor(list(counts.values()), dtype=torch.float64)
    expected = probs / probs.sum() * observed.sum()
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]]) if small.any() else observed
    exp = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    stat = float(((obs - exp) ** 2 / exp).sum())
    return float(chi2.sf(stat, obs.numel() - 1))


def image_case(gen, height, width, vocab, steps, cfg_scale, temperature, order):
    ids = DimooIds.compact(4, vocab)
    start, uncond, pos = image_rows(ids, torch.tensor([0, 2, 1]), torch.tensor([ids.uncondition]), height, width)
    fn = StateTable(gen, start.numel() - pos, vocab, ids.mask, ids.image_offset, ids.uncondition)
    ro = sample_image(fn, start, pos, uncond_start=uncond, seeds=torch.arange(N, dtype=torch.int64) + 10**6,
                      steps=steps, cfg_scale=cfg_scale, temperature=temperature, mask_id=ids.mask,
                      vocab_offset=ids.image_offset, order=order)
    return fn, ro


IMAGE_CASES = {  # grid, codes, steps, w, temperature: 3 positions x 3 codes x 2 steps; 4 x 2 codes x 3 steps
    "1x3-V3-T2": (1, 3, 3, 2, 1.5, 0.8),
    "2x2-V2-T3": (2, 2, 2, 3, 3.0, 1.2),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_random_order_image_trajectories_match_scored_probabilities(gen, case):
    fn, ro = image_case(gen, *IMAGE_CASES[case], order="random")
    table, _ = enumerate_trajectories(ro, fn.vocab)
    with torch.no_grad():
        logp = trajectory_logprob(score_rollout(fn, table)) + log_order_probability(ro)
    torch.testing.assert_close(float(torch.exp(logp).sum()), 1.0, rtol=0, atol=1e-10)  # a distribution
    assert chi_square_pvalue(ro, table, logp) > ALPHA
    # negative controls: scored at another temperature, or without CFG -> rejected
    with torch.no_grad():
        hot = trajectory_logprob(score_rollout(fn, dataclasses.replace(table, temperature=ro.temperature * 1.5)))
        no_cfg = trajectory_logprob(score_rollout(fn, dataclasses.replace(table, cfg_scale=0.0, uncond_start=None)))
    assert chi_square_pvalue(ro, table, hot) < ALPHA
    assert chi_square_pvalue(ro, table, no_cfg) < ALPHA


def test_random_order_text_trajectories_match_scored_probabilities(gen):
    """LLaDA's block sampler with the random order (2 blocks of 2, one token per step) and text CFG."""
    ids = DimooIds.compact(4, 2)
    start, pos = text_rows(ids, torch.tensor([3, 1]), 4)
    fn = StateTable(gen, start.numel() - pos, 3, ids.mask, 0, ids.mask)  # uncond rows start with MASK
    ro = sample_text(fn, start, pos, seeds=torch.arange(N, dtype=torch.int64) + 7, steps=4, block_length=2,
                     cfg_scale=1.0, temperature=0.9, mask_id=ids.mask, vocab_offset=0, order="random")
    table, n_sets = enumerate_trajectories(ro, 3)
    assert n_sets == 4
    with torch.no_grad():
        logp = trajectory_logprob(score_rollout(fn, table)) + log_order_probability(ro)
    torch.testing.assert_close(float(torch.exp(logp).sum()), 1.0, rtol=0, atol=1e-10)
    assert chi_square_pvalue(ro, table, logp) > ALPHA
    with torch.no_grad():
        cold = trajectory_logprob(score_rollout(fn, dataclasses.replace(table, temperature=0.6)))
    assert chi_square_pvalue(ro, table, cold) < ALPHA


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_confidence_order_score_omits_the_position_choice(gen, case):
    """DiMOO's order: the scored product is a distribution over values for each fixed sequence of reveal sets
    (summed over all trajectories it gives the number of set sequences, not 1): the position choice is not in
    it. Its model-free completion (uniform sets) does not describe the sampler: rejected."""
    fn, ro = image_case(gen, *IMAGE_CASES[case], order="confidence")
    table, n_sets = enumerate_trajectories(ro, fn.vocab)
    with torch.no_grad():
        logp = trajectory_logprob(score_rollout(fn, table))
    torch.testing.assert_close(float(torch.exp(logp).sum()), float(n_sets), rtol=1e-10, atol=0)
    assert chi_square_pvalue(ro, table, logp - math.log(n_sets)) < ALPHA
    with pytest.raises(ValueError, match="random order"):
        log_order_probability(ro)
