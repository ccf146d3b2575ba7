"""clipped_policy_loss: the reference against the formula, the Triton kernels (interpreted on
CPU) against the float64 reference for every knob, low precision, edges and bad inputs."""

import itertools

import pytest
import torch

from pairuni_kernels import clipped_policy_loss, reference
from pairuni_kernels.policy_loss import clipped_policy_loss_and_grad
from pairuni_kernels.reference import IMPORTANCE_SAMPLING_LEVELS, KL_ESTIMATORS, LOSS_AGG_MODES


def make_inputs(gen, n, t, *, adv_per_token=False, with_ref=True, dtype=torch.float32, empty_row=True, device="cpu"):
    """Drawn on the CPU generator (same values on every machine), then moved to `device`."""
    lp = -torch.rand(n, t, generator=gen) * 3
    old = lp + torch.randn(n, t, generator=gen) * 0.4  # ratios on both sides of the clip range
    adv = torch.randn(n, t, generator=gen) if adv_per_token else torch.randn(n, generator=gen)
    mask = torch.rand(n, t, generator=gen) > 0.3
    if empty_row and n > 2:
        mask[1] = False
    ref_lp = lp + torch.randn(n, t, generator=gen) * 0.3 if with_ref else None
    cast = lambda x: None if x is None else x.to(device=device, dtype=dtype)  # noqa: E731
    return cast(lp), cast(old), cast(adv), mask.to(device), cast(ref_lp)


def run(fn, lp, old, adv, mask, ref_lp, **kw):
    x = lp.detach().clone().requires_grad_()
    out = fn(x, old, adv, mask, ref_logp=ref_lp, **kw)
    out.loss.backward()
    return out, x.grad


def run_ref64(lp, old, adv, mask, ref_lp, **kw):
    up = lambda x: None if x is None else x.double()  # noqa: E731
    return run(reference.clipped_policy_loss, up(lp), up(old), up(adv), mask, up(ref_lp), **kw)


def assert_outputs_close(out, grad, out64, grad64, tol):
    for name in out._fields:
        got, want = getattr(out, name).double(), getattr(out64, name)
        assert torch.allclose(got, want, rtol=tol, atol=tol), (name, got.item(), want.item())
    assert grad.shape == grad64.shape
    rel = (grad.double() - grad64).norm() / grad64.norm().clamp(min=1e-12)
    assert rel < tol, f"grad rel err {rel:.3g}"


# ----------------------------------------------------------------------------- reference = formula
def test_reference_hand_computed():
    lp = torch.tensor([[0.0, -1.0], [-2.0, 0.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.0, -1.0 - 0.5], [-2.0 + 0.5, 0.0]], dtype=torch.float64)  # ratios 1, e^.5, e^-.5, 1
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False]])
    out = reference.clipped_policy_loss(lp, old, adv, mask)
    e = torch.exp(torch.tensor(0.5, dtype=torch.float64))
    # token 1: A=1, r=1 -> -1. token 2: A=1, r=e^.5 > 1.2 -> clipped: -1.2. token 3: A=-2, r=e^-.5 < 0.8 -> max(2/e^.5, 1.6) = 1.6
    expect = (-1.0 - 1.2 + 1.6) / 3
    torch.testing.assert_close(out.loss, torch.tensor(expect, dtype=torch.float64))
    torch.testing.assert_close(out.clip_fraction, torch.tensor(2 / 3, dtype=torch.float64))
    torch.testing.assert_close(out.ratio_mean, (1 + e + 1 / e) / 3)
    out.loss.backward()
    # only the unclipped token has a gradient: d(-A r)/dlogp = -A r = -1, over 3 tokens
    torch.testing.assert_close(lp.grad, torch.tensor([[-1 / 3, 0.0], [0.0, 0.0]], dtype=torch.float64))


def test_reference_aggregation_modes_by_hand():
    lp = torch.zeros(2, 4, dtype=torch.float64)
    adv = torch.tensor([1.0, 3.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    losses = {m: reference.clipped_policy_loss(lp, lp, adv, mask, loss_agg_mode=m).loss.item() for m in LOSS_AGG_MODES}
    assert losses["token-mean"] == pytest.approx((-1 - 1 - 3) / 3)
    assert losses["seq-mean-token-mean"] == pytest.approx((-1 + -3) / 2)
    assert losses["seq-mean-token-sum"] == pytest.approx((-2 + -3) / 2)
    assert losses["seq-mean-token-sum-norm"] == pytest.approx((-2 + -3) / 4)


def test_reference_dual_clip_and_kl_by_hand():
    lp = torch.tensor([[1.0]], dtype=torch.float64)
    old = torch.tensor([[0.0]], dtype=torch.float64)  # ratio e
    neg = torch.tensor([-1.0], dtype=torch.float64)
    assert reference.clipped_policy_loss(lp, old, neg, torch.ones(1, 1)).loss.item() == pytest.approx(torch.e)
    dual = reference.clipped_policy_loss(lp, old, neg, torch.ones(1, 1), dual_clip_c=2.0)
    assert dual.loss.item() == pytest.approx(2.0) and dual.clip_fraction.item() == 1.0
    ref_lp = torch.tensor([[0.5]], dtype=torch.float64)
    for est, kl in (("k1", 0.5), ("k2", 0.125), ("k3", torch.exp(torch.tensor(-0.5)).item() + 0.5 - 1)):
        out = reference.clipped_policy_loss(lp, lp, torch.zeros(1, dtype=torch.float64), torch.ones(1, 1),
                                            ref_logp=ref_lp, beta=0.1, kl_estimator=est)
        assert out.kl.item() == pytest.approx(kl) and out.loss.item() == pytest.approx(0.1 * kl)


@pytest.mark.parametrize("agg,level,kl", list(itertools.product(LOSS_AGG_MODES, IMPORTANCE_SAMPLING_LEVELS, KL_ESTIMATORS)))
def test_reference_gradcheck(gen, agg, level, kl):
    lp, old, adv, mask, ref_lp = (None if x is None else (x.double() if x.is_floating_point() else x)
                                  for x in make_inputs(gen, 3, 5))
    kw = dict(loss_agg_mode=agg, importance_sampling_level=level, kl_estimator=kl, beta=0.05,
              dual_clip_c=3.0, epsilon_low=0.15, epsilon_high=0.25)
    f = lambda x: reference.clipped_policy_loss(x, old, adv, mask, ref_logp=ref_lp, **kw).loss  # noqa: E731
    # gradcheck is not valid exactly at clip boundaries; random inputs stay away from them
    assert torch.autograd.gradcheck(f, (lp.requires_grad_(),), eps=1e-7, atol=1e-6)


# ----------------------------------------------------------------------------- Triton vs reference
KNOBS = list(itertools.product(LOSS_AGG_MODES, IMPORTANCE_SAMPLING_LEVELS, [None, 2.5], [0.0, 0.1], KL_ESTIMATORS))


@pytest.mark.parametrize("agg,level,dual,beta,kl", KNOBS)
@pytest.mark.parametrize("adv_per_token", [False, True])
def test_triton_every_knob_small(triton_backend, gen, agg, level, dual, beta, kl, adv_per_token, device):
    inputs = make_inputs(gen, 5, 37, adv_per_token=adv_per_token, device=device)
    kw = dict(loss_agg_mode=agg, importance_sampling_level=level, dual_clip_c=dual, beta=beta, kl_estimator=kl,
              epsilon_low=0.1, epsilon_high=0.28)
    out, grad = run(clipped_policy_loss, *inputs, **kw)
    out64, grad64 = run_ref64(*inputs, **kw)
    assert_outputs_close(out, grad, out64, grad64, 1e-5)


@pytest.mark.parametrize("n,t", [(3, 1), (1, 7), (37, 1029)])
@pytest.mark.parametrize("agg,level", list(itertools.product(LOSS_AGG_MODES, IMPORTANCE_SAMPLING_LEVELS)))
def test_triton_odd_shapes(triton_backend, gen, n, t, agg, level, device):
    inputs = make_inputs(gen, n, t, adv_per_token=(t % 2 == 1), device=device)
    kw = dict(loss_agg_mode=agg, importance_sampling_level=level, beta=0.02, dual_clip_c=3.0)
    out, grad = run(clipped_policy_loss, *inputs, **kw)
    out64, grad64 = run_ref64(*inputs, **kw)
    assert_outputs_close(out, grad, out64, grad64, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("agg,level", [("token-mean", "token"), ("seq-mean-token-mean", "sequence")])
def test_triton_low_precision(triton_backend, gen, dtype, agg, level, device):
    """The flash-attention rule: the kernel's error against float64 is at most twice the error of the
    same computation done by plain PyTorch at the input precision (plus a floor for exact zeros)."""
    inputs = make_inputs(gen, 8, 300, dtype=dtype, device=device)
    kw = dict(loss_agg_mode=agg, importance_sampling_level=level, beta=0.05)
    out, grad = run(clipped_policy_loss, *inputs, **kw)
    out_t, grad_t = run(reference.clipped_policy_loss, *inputs, **kw)  # torch, leaf in `dtype`
    out64, grad64 = run_ref64(*inputs, **kw)
    assert grad.dtype == dtype
    assert (out.loss.double() - out64.loss).abs() <= 2 * (out_t.loss.double() - out64.loss).abs() + 1e-6
    err = (grad.double() - grad64).abs().max()
    err_torch = (grad_t.double() - grad64).abs().max()
    assert err <= 2 * err_torch + 1e-7, (err.item(), err_torch.item())


def test_triton_strided_inputs(triton_backend, gen, device):
    lp, old, adv, mask, ref_lp = make_inputs(gen, 6, 40, device=device)
    wide = torch.randn(6, 80, generator=gen).to(device)
    wide[:, :40] = lp  # a non-contiguous view with a row stride of 80
    out, grad = run(clipped_policy_loss, wide[:, :40], old, adv, mask, ref_lp, beta=0.1)
    out64, grad64 = run_ref64(lp, old, adv, mask, ref_lp, beta=0.1)
    assert_outputs_close(out, grad, out64, grad64, 1e-5)


# ----------------------------------------------------------------------------- edges
@pytest.mark.parametrize("backend", ["reference_backend", "triton_backend"])
@pytest.mark.parametrize("agg,level", [("token-mean", "token"), ("seq-mean-token-mean", "sequence"),
                                       ("seq-mean-token-sum-norm", "token")])
def test_loss_and_grad_equal_the_op_and_its_autograd(request, gen, backend, agg, level, device):
    """`clipped_policy_loss_and_grad` (what the fused linear loss calls inside its op) gives the op's
    outputs and grad_scale times the gradient autograd gives, on both backends; with grad_scale None
    the same outputs and no gradient."""
    request.getfixturevalue(backend)
    lp, old, adv, mask, ref_lp = make_inputs(gen, 4, 9, device=device)
    knobs = dict(ref_logp=ref_lp, beta=0.1, kl_estimator="k2", dual_clip_c=2.5, loss_agg_mode=agg,
                 importance_sampling_level=level)
    want, want_grad = run(clipped_policy_loss, lp, old, adv, mask, ref_lp, **{k: v for k, v in knobs.items()
                                                                             if k != "ref_logp"})
    scale = torch.tensor(0.37, device=device)
    got, grad = clipped_policy_loss_and_grad(lp, old, adv, mask, grad_scale=scale, **knobs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, 0.37 * want_grad, rtol=1e-5, atol=1e-8)
    assert (grad[~mask] == 0).all() and grad.abs().max() > 0
    no_grad, none = clipped_policy_loss_and_grad(lp, old, adv, mask, grad_scale=None, **knobs)
    assert none is None
    for a, b in zip(no_grad, want):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["reference_backend", "triton_backend"])
@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
def test_all_masked_batch_is_zero_not_nan(request, gen, backend, agg, device):
    request.getfixturevalue(backend)
    lp, old, adv, _, ref_lp = make_inputs(gen, 4, 9, device=device)
    out, grad = run(clipped_policy_loss, lp, old, adv, torch.zeros(4, 9, dtype=torch.bool, device=device), ref_lp, beta=0.1,
                    loss_agg_mode=agg, importance_sampling_level="sequence")
    assert out.loss.item() == 0.0 and torch.isfinite(torch.stack(list(out))).all()
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", ["reference_backend", "triton_backend"])
def test_masked_garbage_is_ignored(request, gen, backend, device):
    request.getfixturevalue(backend)
    lp, old, adv, mask, ref_lp = make_inputs(gen, 4, 11, adv_per_token=True, device=device)
    dirty = [x.clone() for x in (lp, old, adv, ref_lp)]
    for x, bad in zip(dirty, (float("nan"), float("inf"), float("nan"), -float("inf"))):
        x[~mask] = bad
    kw = dict(beta=0.1, importance_sampling_level="sequence", loss_agg_mode="seq-mean-token-mean")
    clean_out, clean_grad = run(clipped_policy_loss, lp, old, adv, mask, ref_lp, **kw)
    out, grad = run(clipped_policy_loss, dirty[0], dirty[1], dirty[2], mask, dirty[3], **kw)
    assert torch.equal(torch.stack(list(out)), torch.stack(list(clean_out)))
    assert torch.equal(grad, clean_grad)


def test_triton_float_and_int_masks(triton_backend, gen, device):
    lp, old, adv, mask, _ = make_inputs(gen, 5, 20, device=device)
    base, g0 = run(clipped_policy_loss, lp, old, adv, mask, None)
    for m in (mask.float(), mask.to(torch.int32)):
        out, g = run(clipped_policy_loss, lp, old, adv, m, None)
        assert torch.equal(out.loss, base.loss) and torch.equal(g, g0)


def test_ratio_one_gives_minus_mean_advantage(gen):
    """At the first inner step pi_theta == pi_old: the loss is -mean(A) and the gradient -A/count."""
    lp, _, adv, mask, _ = make_inputs(gen, 5, 13)
    out, grad = run(clipped_policy_loss, lp, lp, adv, mask, None)
    count = mask.sum()
    expect = -(adv[:, None] * mask).sum() / count
    torch.testing.assert_close(out.loss, expect)
    torch.testing.assert_close(grad, -(adv[:, None] * mask) / count)
    assert out.clip_fraction.item() == 0.0 and out.ratio_mean.item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------- bad inputs
def _good(gen, device):
    lp, old, adv, mask, ref_lp = make_inputs(gen, 3, 4, device=device)
    return dict(logp=lp, old_logp=old, advantages=adv, mask=mask, ref_logp=ref_lp)


@pytest.mark.parametrize("backend", ["reference_backend", "triton_backend"])
@pytest.mark.parametrize("change,match", [
    (dict(logp=torch.zeros(3)), "logp"),
    (dict(logp=torch.zeros(3, 4, dtype=torch.long)), "logp"),
    (dict(old_logp=torch.zeros(3, 5)), "old_logp"),
    (dict(old_logp=torch.zeros(3, 4, device="meta")), "old_logp"),
    (dict(advantages=torch.zeros(4)), "advantages"),
    (dict(advantages=torch.zeros(3, 5)), "advantages"),
    (dict(mask=torch.ones(3, 5, dtype=torch.bool)), "mask"),
    (dict(ref_logp=torch.zeros(2, 4)), "ref_logp"),
    (dict(dual_clip_c=1.0), "dual_clip_c"),
    (dict(dual_clip_c=0.5), "dual_clip_c"),
    (dict(beta=0.1, ref_logp=None), "ref_logp"),
    (dict(beta=-1.0), "beta"),
    (dict(epsilon_low=-0.1), "epsilon_low"),
    (dict(kl_estimator="k4"), "kl_estimator"),
    (dict(loss_agg_mode="mean"), "loss_agg_mode"),
    (dict(importance_sampling_level="row"), "importance_sampling_level"),
])
def test_bad_inputs_name_the_argument(request, gen, backend, change, match, device):
    request.getfixturevalue(backend)
    kw = {**_good(gen, device), **change}
    with pytest.raises(ValueError, match=match):
        clipped_policy_loss(kw.pop("logp"), kw.pop("old_logp"), kw.pop("advantages"), kw.pop("mask"), **kw)


# ----------------------------------------------------------------------------- torch.library
def test_opcheck(triton_backend, gen, device):
    lp, old, adv, mask, ref_lp = make_inputs(gen, 4, 9, device=device)
    knobs = [1.0, 1.05, 2.0, 3.0, 3.0, 2.0, 20.0, 0.2, 0.2, 0.0, 1.0]
    sel = torch.rand(4, 9, generator=gen).to(device) > 0.7
    ent = torch.rand(4, 9, generator=gen).to(device).requires_grad_()
    for args in [(lp.requires_grad_(), old, adv, mask, None, None, None, None, 0.2, 0.2, 0.0, 0.0, 2, 0, 0, 0, False,
                  knobs, 0.0, 0),
                 (lp, old, torch.randn(4, 9, generator=gen).to(device), mask.float(), ref_lp, None, None, None, 0.1,
                  0.3, 3.0, 0.1, 2, 1, 1, 0, False, knobs, 0.0, 0),
                 (lp, old, adv, mask, ref_lp, sel, ent, mask, 0.2, 0.2, 0.0, 0.1, 2, 1, 0, 7, True, knobs, 0.05, 1)]:
        torch.library.opcheck(torch.ops.pairuni.clipped_policy_loss_fwd.default, args)


@pytest.mark.parametrize("backend", ["reference_backend", "triton_backend"])
def test_torch_compile_fullgraph(request, gen, backend, device):
    request.getfixturevalue(backend)
    lp, old, adv, mask, ref_lp = make_inputs(gen, 4, 9, device=device)

    def step(x):
        out = clipped_policy_loss(x, old, adv, mask, ref_logp=ref_lp, beta=0.1, loss_agg_mode="seq-mean-token-mean")
        return out.loss

    torch._dynamo.reset()
    x = lp.clone().requires_grad_()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    compiled.backward()
    y = lp.clone().requires_grad_()
    eager = step(y)
    eager.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(x.grad, y.grad)


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_int64_offsets_beyond_2_pow_31():
    n, t = 2**16 + 3, 2**15 + 1  # N*T > 2^31: row offsets overflow int32
    lp = torch.randn(n, t, device="cuda", dtype=torch.bfloat16).requires_grad_()
    old = lp.detach() + 0.01
    adv = torch.randn(n, device="cuda")
    mask = torch.ones(n, t, device="cuda", dtype=torch.bool)
    out = clipped_policy_loss(lp, old, adv, mask)
    out.loss.backward()
    last = slice(n - 2, n)  # rows past the int32 boundary, checked against the reference
    sub = reference.clipped_policy_loss(lp.detach()[last].double(), old[last].double(), adv[last].double(),
                                        mask[last], loss_agg_mode="seq-mean-token-sum")
    sub_fused = clipped_policy_loss(lp.detach()[last], old[last], adv[last], mask[last],
                                    loss_agg_mode="seq-mean-token-sum")
    torch.testing.assert_close(sub_fused.loss.double(), sub.loss, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(lp.grad[-1]).all() and lp.grad[-1].abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("agg,level", list(itertools.product(LOSS_AGG_MODES, IMPORTANCE_SAMPLING_LEVELS)))
def test_cuda_matches_reference(agg, level):
    gen = torch.Generator().manual_seed(0)
    inputs = [None if x is None else x.cuda() for x in make_inputs(gen, 64, 577)]
    kw = dict(loss_agg_mode=agg, importance_sampling_level=level, beta=0.05, dual_clip_c=3.0)
    out, grad = run(clipped_policy_loss, *inputs, **kw)
    out64, grad64 = run_ref64(*inputs, **kw)
    assert_outputs_close(out, grad, out64, grad64, 1e-5)


# ----------------------------------------------------------------------------- splitting a batch
@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
def test_loss_denominator_splits_batch_exactly(gen, agg):
    """Micro-batches / ranks re-weighted by their denominators give the whole batch's loss and gradient."""
    from pairuni_kernels.policy_loss import loss_denominator

    lp, old, adv, mask, _ = make_inputs(gen, 7, 12)
    mask[4] = False
    whole, g_whole = run(clipped_policy_loss, lp, old, adv, mask, None, loss_agg_mode=agg)
    parts = [slice(0, 2), slice(2, 5), slice(5, 7)]
    dens = [loss_denominator(mask[p], agg) for p in parts]
    total = sum(dens) if agg != "seq-mean-token-sum-norm" else torch.tensor(1.0)
    x = lp.clone().requires_grad_()
    loss = sum(clipped_policy_loss(x[p], old[p], adv[p], mask[p], loss_agg_mode=agg).loss * d.clamp(min=1)
               / total.clamp(min=1) for p, d in zip(parts, dens))
    loss.backward()
    torch.testing.assert_close(loss, whole.loss)
    torch.testing.assert_close(x.grad, g_whole)
