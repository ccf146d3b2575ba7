"""DiMOO's samplers (engine/dimoo/sampler.py): schedules, batch invariance (with a negative control), each step
replayed against the float64 reference and DiMOO's own CFG form, the recorded states, and a tiny DiMOO end to end."""

import math

import pytest
import torch

from engine.dimoo.ids import DimooIds
from engine.dimoo.model import tiny_dimoo
from engine.dimoo.sampler import (
    REVEAL_ORDERS,
    block_schedule,
    confidence_noise,
    cosine_schedule,
    image_rows,
    model_logits_fn,
    reveal_order,
    row_seeds,
    sample_image,
    sample_text,
    text_rows,
)
from pairuni_kernels import reference

IDS = DimooIds.compact(6, 11)  # 6 text ids, 9 specials, 11 codes: vocab 26


class RowLogits:
    """A deterministic logits_fn of each row's own tokens only: an exact integer hash of the row picks entries of
    a fixed random table (no float reduction across the row or the batch). `leak` adds the batch mean of the row
    hashes (a function that depends on batch partners: the negative control). Records every input."""

    def __init__(self, gen, vocab, scale=2.0, leak=0.0):
        self.table = torch.randn(4099, generator=gen) * scale
        self.coef = torch.randint(1, 4099, (256,), generator=gen)
        self.vocab, self.leak, self.calls = vocab, leak, []

    def __call__(self, ids):
        self.calls.append(ids.clone())
        b, length = ids.shape
        h = (ids * self.coef[:length]).sum(1) % 4099  # exact int64
        idx = (h[:, None, None] * 31 + torch.arange(length)[None, :, None] * self.vocab
               + torch.arange(self.vocab)[None, None, :]) % 4099
        out = self.table[idx]
        if self.leak:
            out = out + self.leak * h.double().mean().float() / 4099
        return out


def image_setup(height=2, width=3):
    return image_rows(IDS, torch.tensor([0, 3, 5, 2]), torch.tensor([IDS.uncondition]), height, width)


def run_image(fn, seeds, order, cfg_scale=1.5, temperature=0.9, steps=4):
    start, uncond, pos = image_setup()
    return sample_image(fn, start, pos, uncond_start=uncond if cfg_scale else None, seeds=seeds, steps=steps,
                        cfg_scale=cfg_scale, temperature=temperature, mask_id=IDS.mask,
                        vocab_offset=IDS.image_offset, order=order)


def run_text(fn, seeds, order, cfg_scale=0.0, temperature=0.0):
    start, pos = text_rows(IDS, torch.tensor([1, 4, 2]), 8)
    return sample_text(fn, start, pos, seeds=seeds, steps=6, block_length=4, cfg_scale=cfg_scale,
                       temperature=temperature, mask_id=IDS.mask, vocab_offset=0, order=order)


def batch_invariant(run, seeds) -> bool:
    """Every sample's record at batch size len(seeds) equals its record run alone and with other partners."""
    full = run(seeds)
    rev = run(seeds.flip(0))
    for i in range(len(seeds)):
        one = run(seeds[i:i + 1])
        j = len(seeds) - 1 - i
        for ro, r in ((full, i), (rev, j)):
            if not (torch.equal(one.tokens[0], ro.tokens[r]) and torch.equal(one.step_map[0], ro.step_map[r])
                    and torch.equal(one.old_logp[0], ro.old_logp[r])):
                return False
    return True


SEEDS = torch.tensor([11, 2**40 + 3, 7, 123456789], dtype=torch.int64)


# ----------------------------------------------------------------------------- schedules
def test_cosine_schedule_matches_dimoo_table():
    """DIMOO.md 2.1's table of per-step reveals (computed there from image_generation_generator.py:L92-96)."""
    table = {(1024, 64): ([1, 1, 1, 2, 3, 4], [25, 25, 25, 25], 25),
             (1024, 35): ([2, 3, 5, 7, 9, 11], [45, 46, 46, 45], 46),
             (4096, 64): ([2, 3, 7, 8, 11, 14], [100, 101, 100, 100], 101),
             (4096, 35): ([5, 12, 21, 28, 37, 45], [182, 182, 184, 183], 184)}
    for (n, steps), (first, last, most) in table.items():
        s = cosine_schedule(n, steps)
        assert len(s) == steps and sum(s) == n and s[:6] == first and s[-4:] == last and max(s) == most
    for n in (1, 3, 4, 17):
        for steps in (1, 2, 3, 8):
            s = cosine_schedule(n, steps)
            keep = [n - sum(s[:t + 1]) for t in range(steps)]
            want = [max(1, math.floor(n * math.cos(math.pi / 2 * (t + 1) / steps))) for t in range(steps - 1)]
            assert keep == want + [0] and min(s) >= 0
    for bad in ({"n": 0, "steps": 3}, {"n": 4, "steps": 0}, {"n": 2.0, "steps": 3}):
        with pytest.raises(ValueError, match=next(iter(k for k, v in bad.items() if v in (0, 2.0)))):
            cosine_schedule(**bad)


def test_block_schedule_is_llada_get_num_transfer_tokens():
    def llada(block_length, per):  # get_num_transfer_tokens for a fully masked block, written out
        base, rem = block_length // per, block_length % per
        counts = torch.zeros(per, dtype=torch.int64) + base
        counts[:rem] += 1
        return counts.tolist()

    for gen_length, block_length, steps in ((8, 4, 6), (12, 4, 3), (10, 5, 8), (7, 7, 3), (32, 8, 32)):
        want = llada(block_length, steps // (gen_length // block_length)) * (gen_length // block_length)
        assert block_schedule(gen_length, block_length, steps) == want
    with pytest.raises(ValueError, match="block_length"):
        block_schedule(8, 3, 4)
    with pytest.raises(ValueError, match="steps"):
        block_schedule(8, 4, 3)


# ----------------------------------------------------------------------------- streams
def test_streams_depend_on_their_keys_only():
    seeds = torch.tensor([5, 6, 2**50], dtype=torch.int64)
    pos = torch.tensor([4, 9, 2, 7])
    rs = row_seeds(seeds, pos)
    # the streams are cfg_random_bits' Philox stream with the stream id in the step's high word, read at 4p..4p+3
    bits = reference.cfg_random_bits(seeds, torch.full((3,), (1 << 32) + 0), 40)
    assert torch.equal(rs, ((bits[:, 4 * pos] & 0x7FFFFFFF) << 32) | bits[:, 4 * pos + 1])
    bits = reference.cfg_random_bits(seeds, torch.full((3,), (2 << 32) + 3), 40)
    assert torch.equal(confidence_noise(seeds, 3, pos), reference.gumbel_from_bits(bits[:, 4 * pos]))
    assert rs.shape == (3, 4) and bool((rs >= 0).all()) and rs.unique().numel() == 12
    assert torch.equal(rs[1:2], row_seeds(seeds[1:2], pos)) and torch.equal(rs[:, 1:3], row_seeds(seeds, pos[1:3]))
    g = confidence_noise(seeds, 3, pos)
    assert g.dtype == torch.float32 and torch.equal(g[2:], confidence_noise(seeds[2:], 3, pos))
    assert not torch.equal(g, confidence_noise(seeds, 4, pos))
    order = reveal_order(seeds, pos)
    assert torch.equal(order.sort(1).values, torch.arange(4).expand(3, 4))
    assert torch.equal(order[:1], reveal_order(seeds[:1], pos))
    blocked = reveal_order(seeds, torch.arange(8), block_length=4)
    assert bool((blocked[:, :4] < 4).all()) and bool((blocked[:, 4:] >= 4).all())
    # the order is close to uniform: each of the 6 orders of 3 positions about 1/6 of 6000 seeds
    many = reveal_order(torch.arange(6000, dtype=torch.int64), torch.arange(3))
    counts = torch.unique(many, dim=0, return_counts=True)[1]
    assert counts.numel() == 6 and int(counts.min()) > 850 and int(counts.max()) < 1150


# ----------------------------------------------------------------------------- batch invariance
@pytest.mark.parametrize("order", REVEAL_ORDERS)
@pytest.mark.parametrize("temperature", [0.9, 0.0])
def test_image_rows_are_batch_invariant(gen, order, temperature):
    fn = RowLogits(gen, IDS.codebook_size)
    assert batch_invariant(lambda s: run_image(fn, s, order, temperature=temperature), SEEDS)


@pytest.mark.parametrize("order", REVEAL_ORDERS)
@pytest.mark.parametrize("cfg_scale,temperature", [(0.0, 0.0), (1.5, 0.7)])
def test_text_rows_are_batch_invariant(gen, order, cfg_scale, temperature):
    fn = RowLogits(gen, IDS.vocab_size)
    assert batch_invariant(lambda s: run_text(fn, s, order, cfg_scale, temperature), SEEDS)


@pytest.mark.parametrize("order", REVEAL_ORDERS)
def test_batch_invariance_check_catches_a_leaky_model(gen, order):
    """Negative control: a logits_fn that reads its batch partners makes the same check fail."""
    fn = RowLogits(gen, IDS.codebook_size, leak=3.0)
    assert not batch_invariant(lambda s: run_image(fn, s, order), SEEDS)
    fn = RowLogits(gen, IDS.vocab_size, leak=3.0)
    assert not batch_invariant(lambda s: run_text(fn, s, order, 1.5, 0.7), SEEDS)


# ----------------------------------------------------------------------------- each step, replayed
def dimoo_guided64(cond, uncond, w):
    """DiMOO's own form (image_generation_generator.py:L118) in float64: (1 + w) * c - w * u."""
    return (1 + w) * cond.double() - w * uncond.double()


@pytest.mark.parametrize("order", REVEAL_ORDERS)
@pytest.mark.parametrize("cfg_scale,temperature", [(1.5, 0.9), (0.0, 1.3), (2.0, 0.0)])
def test_image_steps_replayed(gen, order, cfg_scale, temperature):
    """Each step, from the recorded state: the conditional and unconditional rows the sampler fed the model
    (the `<uncondition>` prompt + the current tail), the drawn values (reference cfg_sample with the row seeds),
    the revealed set (scheduled count; confidence: top `log conf + T * Gumbel`, conf from DiMOO's float64 CFG form;
    random: the seed's order), the recorded log-probs (float64)."""
    fn = RowLogits(gen, IDS.codebook_size)
    ro = run_image(fn, SEEDS, order, cfg_scale, temperature)
    start, uncond_start, pos = image_setup()
    calls = iter(list(fn.calls))
    rseeds = row_seeds(SEEDS, pos)
    order_idx = reveal_order(SEEDS, pos)
    done = 0
    for t, k in enumerate(ro.schedule):
        state = ro.state(t)
        revealed = ro.step_map == t
        assert revealed.sum(1).tolist() == [k] * len(SEEDS)
        assert torch.equal(state[:, pos] == IDS.mask, ro.step_map >= t)
        if k == 0:
            continue
        assert torch.equal(next(calls), state)
        c = fn(state)[:, pos]
        if cfg_scale:
            urows = next(calls)
            assert torch.equal(urows, torch.cat([uncond_start[:-(state.shape[1] - int(pos.min()))].expand(4, -1),
                                                 state[:, int(pos.min()):]], 1))
            u = fn(urows)[:, uncond_start.numel() - state.shape[1] + pos]
        else:
            u = c
        drawn = state[:, pos] == IDS.mask if order == "confidence" else \
            torch.zeros_like(revealed).scatter_(1, order_idx[:, done:done + k], True)
        assert bool(drawn[revealed].all())
        b_idx, p_idx = drawn.nonzero(as_tuple=True)
        tok, _ = reference.cfg_sample(torch.cat([c[b_idx, p_idx], u[b_idx, p_idx]]), guidance_scale=1 + cfg_scale,
                                      temperature=temperature, seeds=rseeds[b_idx, p_idx], step=t)
        grid = torch.full_like(ro.step_map, -1)
        grid[b_idx, p_idx] = tok
        assert torch.equal((ro.tokens[:, pos] - IDS.image_offset)[revealed], grid[revealed])
        guided = dimoo_guided64(c, u, cfg_scale)
        logp64 = torch.log_softmax(guided / (temperature or 1.0), -1)
        lp = logp64.gather(2, grid.clamp(min=0)[..., None])[..., 0]
        torch.testing.assert_close(ro.old_logp[revealed], lp[revealed].float(), rtol=1e-5, atol=1e-5)
        if order == "confidence":
            conf = torch.log_softmax(guided, -1).gather(2, grid.clamp(min=0)[..., None])[..., 0]
            score = torch.where(drawn, conf + temperature * confidence_noise(SEEDS, t, pos).double(), -math.inf)
            top = score.topk(k, dim=1).indices
            assert torch.equal(torch.zeros_like(revealed).scatter_(1, top, True), revealed)
        done += k
    assert next(calls, None) is None


@pytest.mark.parametrize("order", REVEAL_ORDERS)
def test_text_steps_replayed(gen, order):
    """LLaDA's sampler: the block's steps reveal only that block; the unconditional row is the current row with
    every column outside the answer set to MASK; confidence order = top-k of softmax(guided)[drawn]."""
    fn = RowLogits(gen, IDS.vocab_size)
    w, temperature = 1.5, 0.7
    ro = run_text(fn, SEEDS, order, w, temperature)
    start, pos = text_rows(IDS, torch.tensor([1, 4, 2]), 8)
    per = 6 // 2
    assert bool(((ro.step_map // per) == (torch.arange(8) // 4)[None]).all())
    calls = iter(list(fn.calls))
    rseeds = row_seeds(SEEDS, pos)
    for t, k in enumerate(ro.schedule):
        state = ro.state(t)
        revealed = ro.step_map == t
        assert torch.equal(next(calls), state)
        urows = next(calls)
        want = torch.full_like(state, IDS.mask)
        want[:, pos] = state[:, pos]
        assert torch.equal(urows, want)
        c, u = fn(state)[:, pos], fn(urows)[:, pos]
        in_block = (torch.arange(8) // 4 == t // per)[None] & (state[:, pos] == IDS.mask)
        b_idx, p_idx = in_block.nonzero(as_tuple=True)
        tok, _ = reference.cfg_sample(torch.cat([c[b_idx, p_idx], u[b_idx, p_idx]]), guidance_scale=1 + w,
                                      temperature=temperature, seeds=rseeds[b_idx, p_idx], step=t)
        grid = torch.full_like(ro.step_map, -1)
        grid[b_idx, p_idx] = tok
        assert torch.equal(ro.tokens[:, pos][revealed], grid[revealed])
        guided = u.double() + (w + 1) * (c.double() - u.double())  # LLaDA's form
        if order == "confidence":
            conf = torch.softmax(guided, -1).gather(2, grid.clamp(min=0)[..., None])[..., 0]
            top = torch.where(in_block, conf, -math.inf).topk(k, dim=1).indices
            assert torch.equal(torch.zeros_like(revealed).scatter_(1, top, True), revealed)


def test_random_order_does_not_depend_on_the_model(gen):
    """The random order's reveal sets come from the seeds alone: two different models, one step_map."""
    a = run_image(RowLogits(gen, IDS.codebook_size), SEEDS, "random")
    b = run_image(RowLogits(gen, IDS.codebook_size, scale=5.0), SEEDS, "random")
    assert torch.equal(a.step_map, b.step_map) and not torch.equal(a.tokens, b.tokens)
    c = run_image(RowLogits(gen, IDS.codebook_size), SEEDS, "confidence")
    d = run_image(RowLogits(gen, IDS.codebook_size, scale=5.0), SEEDS, "confidence")
    assert not torch.equal(c.step_map, d.step_map)  # the confidence order reads the model


def test_bad_inputs_are_one_line_errors(gen):
    fn = RowLogits(gen, IDS.codebook_size)
    start, uncond, pos = image_setup()
    kw = dict(seeds=SEEDS, steps=3, mask_id=IDS.mask, vocab_offset=IDS.image_offset)
    with pytest.raises(ValueError, match="order"):
        sample_image(fn, start, pos, uncond_start=uncond, order="left", **kw)
    with pytest.raises(ValueError, match="uncond_start"):
        sample_image(fn, start, pos, **kw)
    with pytest.raises(ValueError, match="uncond_start"):
        sample_image(fn, start, pos, uncond_start=torch.tensor([IDS.uncondition, 1, 2]), **kw)
    with pytest.raises(ValueError, match="start"):
        sample_image(fn, start, pos - 1, uncond_start=uncond, **kw)
    with pytest.raises(ValueError, match="seeds"):
        sample_image(fn, start, pos, uncond_start=uncond, **{**kw, "seeds": SEEDS.int()})
    with pytest.raises(ValueError, match="temperature"):
        sample_image(fn, start, pos, uncond_start=uncond, temperature=-1.0, **kw)
    with pytest.raises(ValueError, match="logits_fn"):
        sample_image(lambda ids: fn(ids)[:, :-1], start, pos, uncond_start=uncond, **kw)


# ----------------------------------------------------------------------------- a tiny DiMOO end to end
@pytest.mark.parametrize("order", REVEAL_ORDERS)
def test_tiny_dimoo_image_and_text(order):
    """The network of engine/dimoo/model.py behind both samplers: codes land in the image slice, newlines and the
    prompt stay, every position is revealed once, a sample's record is the same alone and in a batch of 3 (this
    CPU fp32 forward is row-independent), and its recorded log-probs are what scoring computes."""
    from engine.dimoo.scoring import score_rollout

    model = tiny_dimoo(24, seed=3, codebook_size=16)
    ids = model.ids
    start, uncond, pos = image_rows(ids, torch.tensor([3, 9, 14, 2]), torch.tensor([ids.uncondition]), 3, 3)
    fn = model_logits_fn(model, ids.image_slice)
    seeds = torch.tensor([4, 5, 6], dtype=torch.int64)

    def run(s):
        return sample_image(fn, start, pos, uncond_start=uncond, seeds=s, steps=4, cfg_scale=2.0, temperature=1.0,
                            mask_id=ids.mask, vocab_offset=ids.image_offset, order=order)

    ro = run(seeds)
    assert bool(ids.is_image(ro.tokens[:, pos]).all())
    others = torch.ones(start.numel(), dtype=torch.bool)
    others[pos] = False
    assert torch.equal(ro.tokens[:, others], start[others].expand(3, -1))
    assert sorted(ro.step_map.flatten().tolist()) == sorted(t for t, k in enumerate(ro.schedule) for _ in
                                                           range(k * 3))
    assert batch_invariant(run, seeds)
    with torch.no_grad():
        sc = score_rollout(fn, ro)
    assert sc.exact
    torch.testing.assert_close(sc.logp, ro.old_logp, rtol=1e-5, atol=1e-5)
    tstart, tpos = text_rows(ids, torch.tensor([3, 9, 14]), 6)
    text_fn = model_logits_fn(model, slice(0, ids.mask))  # the text ids of the compact layout (no MASK, no codes)
    tro = sample_text(text_fn, tstart, tpos, seeds=seeds, steps=4, block_length=3, cfg_scale=0.5, temperature=0.8,
                      mask_id=ids.mask, order=order)
    assert bool((tro.tokens[:, tpos] < ids.mask).all())
    with torch.no_grad():
        torch.testing.assert_close(score_rollout(text_fn, tro).logp, tro.old_logp, rtol=1e-5, atol=1e-5)
