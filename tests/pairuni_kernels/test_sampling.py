"""cfg_sample: the random stream (Philox known answers, the noise's log), the reference against
formulas computed here in float64, the C++ CPU kernel against the reference token for token,
batch invariance, frequencies over >= 200k draws (and that wrong formulas would fail), top-k /
top-p support, both layouts, bad inputs, opcheck, torch.compile and the no-extension fallback.

The CUDA kernel runs the same tests when a GPU is present (DEVICE == "cuda")."""

import math
import subprocess
import sys

import pytest
import torch

from pairuni_kernels import cfg_sample, reference, sampling
from pairuni_kernels._ext import has_extension

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_op = pytest.mark.skipif(not has_extension(), reason="pairuni_kernels._C not built")

# chi2.ppf(1 - 1e-6, dof) for dof = 1..15 (scipy.stats): a correct sampler fails once in a million runs.
CHI2_CRIT = {1: 23.93, 2: 27.63, 3: 30.66, 4: 33.38, 5: 35.89, 6: 38.26, 7: 40.52, 8: 42.70, 9: 44.81,
             10: 46.86, 11: 48.87, 12: 50.83, 13: 52.75, 14: 54.64, 15: 56.49}
FILTERS = [(0, 1.0, 1.0), (50, 1.0, 0.7), (0, 0.9, 1.0), (20, 0.8, 1.3)]  # (top_k, top_p, temperature)


def make_logits(gen, batch, vocab, dtype=torch.float32, scale=2.0):
    return (torch.randn(2 * batch, vocab, generator=gen) * scale).to(dtype).to(DEVICE)


def make_seeds(gen, batch):
    return torch.randint(-2**62, 2**62, (batch,), generator=gen).to(DEVICE)


def op(logits, seeds, step, *, guidance_scale=5.0, temperature=1.0, top_k=0, top_p=1.0, layout="blocked"):
    """The compiled op directly (no Python validation)."""
    steps = step if isinstance(step, torch.Tensor) else None
    return torch.ops.pairuni.cfg_sample(logits, seeds, steps, 0 if steps is not None else step, guidance_scale,
                                        temperature, top_k, top_p, layout == "interleaved")


def guided64(logits, guidance_scale, temperature, layout="blocked"):
    """The guided, tempered logits computed here, independently of the reference, in float64."""
    x = logits.double()
    c, u = (x[0::2], x[1::2]) if layout == "interleaved" else x.chunk(2)
    z = u + guidance_scale * (c - u)
    return z / temperature if temperature > 0 else z


def chi_square(counts, probs, n):
    expected = probs * n
    return float(((counts - expected) ** 2 / expected).sum())


# ----------------------------------------------------------------------------- random stream
def test_philox_matches_random123_known_answers():
    kat = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
           ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
           ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in kat:
        got = reference.philox4x32_10(tuple(torch.tensor([c]) for c in ctr), tuple(torch.tensor([k]) for k in key))
        assert tuple(int(w) for w in got) == want


def test_noise_log_is_accurate_and_gumbel_bounded():
    x = torch.cat([torch.logspace(-7.3, 1.3, 100_000), torch.rand(100_000) * 2 + 1e-3]).float()
    rel = (reference._log_positive(x).double() - x.double().log()).abs() / x.double().log().abs().clamp(min=1e-30)
    assert float(rel.max()) < 1e-6
    bits = torch.randint(0, 2**32, (200_000,), dtype=torch.int64)
    bits[:2] = torch.tensor([0, 2**32 - 1])
    g = reference.gumbel_from_bits(bits)
    assert torch.isfinite(g).all() and float(g.min()) > -2.82 and float(g.max()) < 16.65
    # The mean of a standard Gumbel is the Euler-Mascheroni constant, its variance pi^2/6.
    assert abs(float(g.double().mean()) - 0.5772156649) < 0.01
    assert abs(float(g.double().var()) - math.pi**2 / 6) < 0.03


def test_random_bits_are_keyed_by_seed_step_and_token():
    seeds = torch.tensor([1, 1, 2], dtype=torch.int64)
    steps = torch.tensor([0, 1, 0], dtype=torch.int64)
    bits = reference.cfg_random_bits(seeds, steps, 10)
    assert bits.shape == (3, 10) and int(bits.min()) >= 0 and int(bits.max()) < 2**32
    assert not torch.equal(bits[0], bits[1]) and not torch.equal(bits[0], bits[2])
    assert len(set(bits[0].tolist())) == 10  # every token its own word
    assert torch.equal(reference.cfg_random_bits(seeds[:1], steps[:1], 10), bits[:1])


# ----------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["blocked", "interleaved"])
def test_greedy_is_argmax_of_guided_logits(gen, dtype, layout):
    logits = make_logits(gen, 16, 777, dtype)
    seeds = make_seeds(gen, 16)
    want = guided64(logits.float(), 5.0, 0.0, layout).argmax(-1)
    for fn in (cfg_sample, reference.cfg_sample):
        tokens, logprobs = fn(logits, guidance_scale=5.0, temperature=0.0, seeds=seeds, step=3, layout=layout)
        assert torch.equal(tokens.cpu(), want.cpu())
        assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
        assert torch.equal(logprobs, torch.zeros_like(logprobs))


@pytest.mark.parametrize("top_k,top_p,temperature", FILTERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_match_float64_log_softmax(gen, top_k, top_p, temperature, dtype):
    logits = make_logits(gen, 32, 1000, dtype)
    seeds = make_seeds(gen, 32)
    z64 = guided64(logits.float(), 5.0, temperature)
    keep = reference.cfg_keep_mask(reference.cfg_guided_logits(logits, 5.0, temperature), top_k, top_p)
    log_softmax = torch.where(keep, z64, -math.inf).log_softmax(-1)
    for fn in (cfg_sample, reference.cfg_sample):
        tokens, logprobs = fn(logits, guidance_scale=5.0, temperature=temperature, top_k=top_k, top_p=top_p,
                              seeds=seeds, step=11)
        assert keep.gather(1, tokens[:, None]).all()
        want = log_softmax.gather(1, tokens[:, None])[:, 0]
        torch.testing.assert_close(logprobs.double(), want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("backend", ["kernel", "reference"])
@pytest.mark.parametrize("top_k,top_p,temperature", FILTERS + [(0, 1.0, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["blocked", "interleaved"])
def test_cond_logprobs_match_float64_conditional_log_softmax(gen, backend, top_k, top_p, temperature, dtype, layout):
    if backend == "kernel" and not has_extension():
        pytest.skip("pairuni_kernels._C not built")
    fn = cfg_sample if backend == "kernel" else reference.cfg_sample
    logits = make_logits(gen, 16, 1001, dtype, scale=4.0)
    seeds = make_seeds(gen, 16)
    kw = {"guidance_scale": 5.0, "temperature": temperature, "top_k": top_k, "top_p": top_p, "seeds": seeds,
          "step": 7, "layout": layout}
    tokens, logprobs, cond = fn(logits, cond_logprobs=True, **kw)
    plain_tokens, plain_logprobs = fn(logits, **kw)
    assert torch.equal(tokens, plain_tokens)  # asking for it changes nothing else
    assert torch.equal(logprobs, plain_logprobs)
    assert cond.dtype == torch.float32 and cond.shape == (16,)
    c64 = logits.double()[0::2] if layout == "interleaved" else logits.double()[:16]
    # the softmax of the conditional rows at the sampling temperature (1 when greedy), not the guided one
    want = (c64 / (temperature or 1.0)).log_softmax(-1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(cond.double(), want, rtol=1e-5, atol=2e-5)
    guided = guided64(logits, 5.0, temperature or 1.0, layout).log_softmax(-1).gather(1, tokens[:, None])[:, 0]
    assert (cond.double() - guided).abs().max() > 1e-2  # a kernel that returned the guided log-prob fails


@needs_op
@pytest.mark.parametrize("top_k,top_p,temperature", FILTERS + [(0, 1.0, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["blocked", "interleaved"])
def test_kernel_draws_the_reference_tokens(gen, top_k, top_p, temperature, dtype, layout):
    logits = make_logits(gen, 32, 521, dtype)  # odd V: a partial Philox group at the end
    seeds = make_seeds(gen, 32)
    kw = {"guidance_scale": 5.0, "temperature": temperature, "top_k": top_k, "top_p": top_p, "seeds": seeds, "step": 2**33 + 5,
              "layout": layout}
    tokens, logprobs, cond = cfg_sample(logits, cond_logprobs=True, **kw)
    ref_tokens, ref_logprobs, ref_cond = reference.cfg_sample(logits, cond_logprobs=True, **kw)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logprobs, ref_logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond, ref_cond, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (30, 0.9)])
def test_batch_invariance(gen, top_k, top_p):
    batch = 64
    logits = make_logits(gen, batch, 2048)
    seeds = make_seeds(gen, batch)
    for fn in (cfg_sample, reference.cfg_sample):
        kw = {"guidance_scale": 5.0, "top_k": top_k, "top_p": top_p, "step": 7}
        tokens, logprobs = fn(logits, seeds=seeds, **kw)
        for j in (0, 13, batch - 1):
            alone = torch.stack([logits[j], logits[batch + j]])
            t1, l1 = fn(alone, seeds=seeds[j:j + 1], **kw)
            assert int(t1) == int(tokens[j])
            if DEVICE == "cpu":
                assert torch.equal(l1[0], logprobs[j])
            else:  # the CUDA kernel splits the vocabulary differently for B = 1 and B = 64
                torch.testing.assert_close(l1[0], logprobs[j], rtol=1e-5, atol=1e-5)


def test_step_and_seed_select_independent_draws(gen):
    logits = make_logits(gen, 1, 4096, scale=0.5)
    seeds = make_seeds(gen, 1)
    draws = {int(cfg_sample(logits, guidance_scale=2.0, seeds=seeds, step=s)[0]) for s in range(20)}
    assert len(draws) > 10  # a flat-ish distribution over 4096 tokens: repeated steps would collide
    # a [B] step tensor gives every row its own step, like separate calls
    batch = 8
    logits = make_logits(gen, batch, 500)
    seeds = make_seeds(gen, batch)
    steps = torch.arange(batch, dtype=torch.int64, device=DEVICE) * 3
    tokens, _ = cfg_sample(logits, guidance_scale=3.0, seeds=seeds, step=steps)
    for b in range(batch):
        one = torch.stack([logits[b], logits[batch + b]])
        assert int(cfg_sample(one, guidance_scale=3.0, seeds=seeds[b:b + 1], step=int(steps[b]))[0]) == int(tokens[b])
    same = cfg_sample(logits, guidance_scale=3.0, seeds=seeds, step=torch.tensor(6, device=DEVICE))[0]
    assert torch.equal(same, cfg_sample(logits, guidance_scale=3.0, seeds=seeds, step=6)[0])


def test_layouts_are_permutations_of_each_other(gen):
    batch = 12
    blocked = make_logits(gen, batch, 300)
    interleaved = torch.stack([blocked[:batch], blocked[batch:]], dim=1).reshape(2 * batch, -1)
    seeds = make_seeds(gen, batch)
    for fn in (cfg_sample, reference.cfg_sample):
        a = fn(blocked, guidance_scale=4.0, seeds=seeds, step=1, layout="blocked")
        b = fn(interleaved, guidance_scale=4.0, seeds=seeds, step=1, layout="interleaved")
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        c = fn(blocked, guidance_scale=4.0, seeds=seeds, step=1, layout="interleaved")
        assert not torch.equal(a[0], c[0])  # the layout is not ignored


def test_top_k_of_vocab_size_or_more_is_off(gen):
    logits = make_logits(gen, 4, 100)
    seeds = make_seeds(gen, 4)
    base = cfg_sample(logits, guidance_scale=3.0, seeds=seeds, step=0)
    for k in (100, 1000):
        out = cfg_sample(logits, guidance_scale=3.0, top_k=k, seeds=seeds, step=0)
        assert torch.equal(out[0], base[0])
        torch.testing.assert_close(out[1], base[1])


# ----------------------------------------------------------------------------- statistics
def draw_many(row_logits, n, **kw):
    """n draws from one [cond; uncond] pair: one row per draw, a [n] step tensor, one seed."""
    logits = torch.cat([row_logits[:1].expand(n, -1), row_logits[1:].expand(n, -1)]).contiguous()
    seeds = torch.full((n,), 20251121, dtype=torch.int64, device=DEVICE)
    steps = torch.arange(n, dtype=torch.int64, device=DEVICE)
    tokens, _ = cfg_sample(logits, seeds=seeds, step=steps, **kw)
    return torch.bincount(tokens.cpu(), minlength=row_logits.shape[1]).double()


@pytest.mark.slow
def test_frequencies_match_the_guided_softmax_and_wrong_formulas_fail(gen):
    n, g, t = 200_000, 3.0, 1.5
    c = torch.tensor([1.0, 0.2, -0.5, 0.8, 0.0, -1.0, 0.5, 1.2])
    u = torch.tensor([0.9, -0.3, 0.4, 0.1, 0.2, -0.6, 0.9, 0.3])
    counts = draw_many(torch.stack([c, u]).to(DEVICE), n, guidance_scale=g, temperature=t)
    right = torch.softmax((u.double() + g * (c.double() - u.double())) / t, -1)
    crit = CHI2_CRIT[c.numel() - 1]
    assert chi_square(counts, right, n) < crit
    wrong = {"no guidance": torch.softmax(c.double() / t, -1),
             "guidance around cond": torch.softmax((c.double() + g * (c.double() - u.double())) / t, -1),
             "no temperature": torch.softmax(u.double() + g * (c.double() - u.double()), -1),
             "temperature on cond only": torch.softmax(u.double() + g * (c.double() / t - u.double()), -1)}
    for name, probs in wrong.items():
        assert chi_square(counts, probs, n) > 10 * crit, name


@pytest.mark.slow
@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.7), (6, 0.8)])
def test_frequencies_inside_top_k_top_p_support(top_k, top_p):
    n, g = 200_000, 2.0
    c = torch.tensor([1.0, 0.2, -0.5, 0.8, 0.0, -1.0, 0.5, 1.2])
    u = torch.tensor([0.9, -0.3, 0.4, 0.1, 0.2, -0.6, 0.9, 0.3])
    counts = draw_many(torch.stack([c, u]).to(DEVICE), n, guidance_scale=g, top_k=top_k, top_p=top_p)
    z = u.double() + g * (c.double() - u.double())
    order = z.argsort(descending=True)
    keep = torch.zeros(8, dtype=torch.bool)
    keep[order[:top_k or 8]] = True  # no ties in this z
    p = torch.where(keep, z, -math.inf).softmax(-1)
    mass_above = torch.cat([torch.zeros(1, dtype=torch.float64), p[order].cumsum(0)[:-1]])
    keep[order[mass_above >= top_p]] = False
    probs = torch.where(keep, z, -math.inf).softmax(-1)
    assert 1 < int(keep.sum()) < 8
    assert counts[~keep].sum() == 0
    assert chi_square(counts[keep], probs[keep], n) < CHI2_CRIT[int(keep.sum()) - 1]
    kept = int(keep.sum())
    uniform = torch.full((kept,), 1.0 / kept, dtype=torch.float64)
    assert chi_square(counts[keep], uniform, n) > 10 * CHI2_CRIT[kept - 1]  # the test has power


@pytest.mark.parametrize("top_k,top_p", [(7, 1.0), (0, 0.5), (40, 0.95)])
def test_draws_stay_inside_top_k_top_p_support(gen, top_k, top_p):
    batch, vocab = 256, 500
    logits = make_logits(gen, batch, vocab, scale=1.0)
    seeds = make_seeds(gen, batch)
    tokens, _ = cfg_sample(logits, guidance_scale=2.0, top_k=top_k, top_p=top_p, seeds=seeds, step=4)
    z = guided64(logits.float(), 2.0, 1.0)
    z_tok = z.gather(1, tokens[:, None])
    if top_k:
        assert ((z > z_tok).sum(-1) < top_k).all()  # fewer than k tokens beat the drawn one
    if top_p < 1:
        top = z >= torch.topk(z, top_k, -1).values[:, -1:] if top_k else torch.ones_like(z, dtype=torch.bool)
        p = torch.where(top, z, -math.inf).softmax(-1)
        mass_above = torch.where(z > z_tok, p, 0.0).sum(-1)
        assert (mass_above < top_p + 1e-6).all()
    assert len(set(tokens.tolist())) > 1


# ----------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("change,match", [
    ({"logits": torch.randn(5, 10)}, "logits"),
    ({"logits": torch.randn(4, 10, dtype=torch.float64)}, "logits"),
    ({"logits": torch.randn(4, 0)}, "logits"),
    ({"logits": torch.randn(40)}, "logits"),
    ({"seeds": torch.arange(3)}, "seeds"),
    ({"seeds": torch.arange(2, dtype=torch.int32)}, "seeds"),
    ({"step": -1}, "step"),
    ({"step": 1.5}, "step"),
    ({"step": torch.arange(3)}, "step"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"temperature": -0.1}, "temperature"),
    ({"guidance_scale": float("nan")}, "guidance_scale"),
    ({"layout": "cond-first"}, "layout"),
])
def test_bad_inputs_raise_value_error_naming_the_argument(change, match):
    kw = {"logits": torch.randn(4, 10), "guidance_scale": 5.0, "seeds": torch.arange(2), "step": 0}
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        cfg_sample(kw.pop("logits"), **kw)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits_raise(bad):
    logits = torch.randn(4, 10)
    logits[3, 2] = bad
    with pytest.raises(ValueError, match="logits"):
        cfg_sample(logits, guidance_scale=5.0, seeds=torch.arange(2), step=0)


# ----------------------------------------------------------------------------- torch.library
@needs_op
@pytest.mark.parametrize("with_cond", [False, True])
@pytest.mark.parametrize("steps,top_k,top_p,temperature", [(None, 0, 1.0, 1.0), ("tensor", 5, 0.9, 0.8),
                                                            (None, 0, 1.0, 0.0)])
def test_opcheck(gen, steps, top_k, top_p, temperature, with_cond):
    logits = make_logits(gen, 3, 64)
    seeds = make_seeds(gen, 3)
    steps = torch.tensor([4, 5, 6], device=DEVICE) if steps else None
    torch.library.opcheck(torch.ops.pairuni.cfg_sample.default,
                          (logits, seeds, steps, 2, 5.0, temperature, top_k, top_p, False, with_cond))
    cond = torch.ops.pairuni.cfg_sample(logits, seeds, steps, 2, 5.0, temperature, top_k, top_p, False, with_cond)[2]
    assert cond.shape == ((3,) if with_cond else (0,))


@needs_op
@pytest.mark.parametrize("backend,step_kind", [("aot_eager", "tensor"), ("aot_eager", "int"), ("inductor", "tensor")])
def test_compiled_decode_step_matches_eager(gen, backend, step_kind):
    vocab, hidden, batch = 256, 32, 4
    weight = torch.randn(vocab, hidden, generator=gen).to(DEVICE)
    seeds = make_seeds(gen, batch)

    def decode_step(h, step):
        logits = h @ weight.T  # [2B, V] for [cond; uncond] hidden states
        tokens, logprobs = cfg_sample(logits, guidance_scale=5.0, temperature=1.0, top_k=64, seeds=seeds, step=step)
        return tokens, logprobs.sum()

    compiled = torch.compile(decode_step, fullgraph=True, backend=backend)
    for step in range(3):
        h = torch.randn(2 * batch, hidden, generator=gen).to(DEVICE)
        step_arg = torch.tensor(step, device=DEVICE) if step_kind == "tensor" else step
        want = decode_step(h, step_arg)
        got = compiled(h, step_arg)
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])


@needs_op
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("top_k", [0, 32])
def test_cuda_graph_replay_advances_the_step(gen, top_k):
    batch = 4
    logits = make_logits(gen, batch, 4096)
    seeds = make_seeds(gen, batch)
    step = torch.zeros((), dtype=torch.int64, device=DEVICE)
    kw = {"guidance_scale": 5.0, "top_k": top_k, "seeds": seeds}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cfg_sample(logits, step=step, **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens, logprobs = cfg_sample(logits, step=step, **kw)
    for s in (3, 4, 5):
        step.fill_(s)
        graph.replay()
        want = cfg_sample(logits, step=s, **kw)
        assert torch.equal(tokens, want[0])
        torch.testing.assert_close(logprobs, want[1])


@needs_op
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernel_matches_cpu_kernel(gen):
    logits = make_logits(gen, 64, 16384)
    seeds = make_seeds(gen, 64)
    for kw in ({}, {"top_k": 50}, {"temperature": 0.0}):
        gpu = cfg_sample(logits, guidance_scale=5.0, seeds=seeds, step=17, cond_logprobs=True, **kw)
        cpu = cfg_sample(logits.cpu(), guidance_scale=5.0, seeds=seeds.cpu(), step=17, cond_logprobs=True, **kw)
        assert torch.equal(gpu[0].cpu(), cpu[0])
        torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gpu[2].cpu(), cpu[2], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- fallback
def test_reference_fallback_draws_the_same_tokens(gen, monkeypatch):
    logits = make_logits(gen, 8, 300)
    seeds = make_seeds(gen, 8)
    kw = {"guidance_scale": 5.0, "top_k": 20, "top_p": 0.9, "seeds": seeds, "step": 9}
    fast = cfg_sample(logits, **kw)
    monkeypatch.setattr(sampling, "_HAS_OP", False)
    slow = cfg_sample(logits, **kw)
    assert torch.equal(fast[0], slow[0])
    torch.testing.assert_close(fast[1], slow[1], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_missing_extension_warns_once_and_falls_back():
    code = (
        "import sys, warnings\n"
        "sys.modules['pairuni_kernels._C'] = None  # makes `from . import _C` raise ImportError\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch\n"
        "    from pairuni_kernels import cfg_sample, reference\n"
        "    x = torch.randn(6, 50); s = torch.arange(3)\n"
        "    a = cfg_sample(x, guidance_scale=5.0, seeds=s, step=1)\n"
        "    b = cfg_sample(x, guidance_scale=5.0, seeds=s, step=2)\n"
        "ours = [w for w in caught if '_C' in str(w.message)]\n"
        "assert len(ours) == 1, [str(w.message) for w in caught]\n"
        "assert torch.equal(a[0], reference.cfg_sample(x, guidance_scale=5.0, seeds=s, step=1)[0])\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_reference_backend_forces_the_reference(gen, reference_backend, monkeypatch):
    calls = []
    real = reference.cfg_sample

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(reference, "cfg_sample", spy)
    logits, seeds = make_logits(gen, 2, 50), make_seeds(gen, 2)
    cfg_sample(logits, guidance_scale=5.0, seeds=seeds, step=0)
    assert calls == [1]


@pytest.mark.parametrize("vocab", [1, 2, 3, 5])
@pytest.mark.parametrize("knobs", [{}, {"top_k": 1}, {"top_p": 0.3}, {"temperature": 0.0}])
def test_tiny_vocabularies(gen, vocab, knobs):
    logits, seeds = make_logits(gen, 3, vocab), make_seeds(gen, 3)
    got = cfg_sample(logits, guidance_scale=3.0, seeds=seeds, step=2, **knobs)
    want = reference.cfg_sample(logits, guidance_scale=3.0, seeds=seeds, step=2, **knobs)
    assert torch.equal(got[0], want[0]) and int(got[0].max()) < vocab
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
