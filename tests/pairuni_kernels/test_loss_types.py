"""Every GRPO-family loss type of `reference.clipped_policy_loss` against loop-style re-statements of the
TRL 1.16 (`GRPOTrainer._compute_loss`, `get_gamma_weights`) and verl 0.9.1 (`core_algos.compute_policy_loss_*`)
per-token formulas on random float64 inputs, values and autograd gradients; the Triton kernels (interpreted on
CPU) and the fused linear head against the float64 reference for every type."""

import math

import pytest
import torch

from pairuni_kernels import reference
from pairuni_kernels.reference import LOSS_AGG_MODES, LOSS_TYPE_LEVELS, LOSS_TYPES

CASES = [(lt, lev) for lt in LOSS_TYPES for lev in LOSS_TYPE_LEVELS[lt]]


def draw(gen, n=4, t=6, *, per_token=True, dtype=torch.float64):
    lp = -torch.rand(n, t, generator=gen, dtype=torch.float64) * 2 - 0.05
    old = lp + torch.randn(n, t, generator=gen, dtype=torch.float64) * 0.4
    adv = torch.randn(n, t, generator=gen, dtype=torch.float64) if per_token else \
        torch.randn(n, generator=gen, dtype=torch.float64)
    mask = torch.rand(n, t, generator=gen) > 0.25
    mask[0, 0] = True
    ref_lp = lp + torch.randn(n, t, generator=gen, dtype=torch.float64) * 0.3
    ent = torch.rand(n, t, generator=gen, dtype=torch.float64) * 2
    ent_mask = torch.rand(n, t, generator=gen) > 0.4
    return [x.to(dtype) if x.is_floating_point() else x for x in (lp, old, adv, mask, ref_lp, ent, ent_mask)]


def type_knobs(loss_type, lp, old, adv, mask, gen):
    kw = {}
    if loss_type == "cispo":
        kw.update(epsilon_high=1.1)  # TRL's cap: some ratios above it, some below
    if loss_type == "dro":
        kw["dro_beta"] = 0.7
    if loss_type in ("dppo_tv", "dppo_kl"):
        kw.update(divergence_low=0.05, divergence_high=0.08, clip_ratio_c_tis=1.3)
    if loss_type == "sapo":
        kw.update(sapo_temperature_pos=1.3, sapo_temperature_neg=0.9)
    if loss_type in ("clip_cov", "kl_cov"):
        kw["selected"] = reference.cov_token_selection(
            lp, old, adv, mask, mode=loss_type, ratio=0.3, lb=-1.0, ub=1.0,
            generator=torch.Generator().manual_seed(int(torch.randint(1 << 30, (1,), generator=gen))))
        kw["kl_cov_coef"] = 0.6
    return kw


# ----------------------------------------------------------------------------- loop-style re-statements
def restated_terms(loss_type, level, lp, old, adv, mask, kw, eps_low, eps_high, dual_c):
    """[[per-token policy term or None (masked)]] and [[ratio]], token by token as TRL / verl write them."""
    n, t = lp.shape
    terms, ratios = [], []
    for i in range(n):
        toks = [j for j in range(t) if mask[i, j]]
        lr = {j: torch.clamp(lp[i, j] - old[i, j], -20.0, 20.0) for j in toks}
        seq = sum(lr.values()) / max(len(toks), 1) if toks else None
        row_t, row_r = [None] * t, [None] * t
        if loss_type == "geo_mean":  # verl compute_policy_loss_geo_mean
            num = 0.0
            for j in toks:
                a = adv[i, j]
                sg = torch.sign(a)
                num = num + sg * torch.min(sg * lr[j], sg * torch.clamp(lr[j], -eps_low, eps_high))
            r_row = torch.exp(num / (len(toks) + 1e-8))
            a_row = sum(adv[i, j] for j in toks) / (len(toks) + 1e-8)
            for j in toks:
                row_t[j], row_r[j] = -a_row * r_row, torch.exp(lr[j])
        if loss_type == "vespo":  # TRL get_gamma_weights (no_grad)
            log_w = torch.clamp(sum(lr[j].detach() for j in toks), math.log(1e-8), 20.0)
        for j in toks:
            a, x = adv[i, j], lp[i, j]
            if level == "token":
                r = torch.exp(lr[j])
            elif level == "sequence":
                r = torch.exp(seq)
            else:  # verl compute_policy_loss_gspo: log_prob - sg(log_prob) + sg(seq)
                r = torch.exp(x - x.detach() + seq.detach())
            if loss_type in ("ppo", "clip_cov"):
                term = -torch.min(r * a, torch.clamp(r, 1 - eps_low, 1 + eps_high) * a)
                if dual_c is not None and a < 0:
                    term = torch.min(term, -a * dual_c)
                if loss_type == "clip_cov" and kw["selected"][i, j]:
                    term = term * 0.0
            elif loss_type == "cispo":  # TRL
                term = -torch.clamp(r, max=eps_high).detach() * a * x
            elif loss_type == "cispo_clip":  # verl
                term = -torch.clamp(r, 1 - eps_low, 1 + eps_high).detach() * a * x
            elif loss_type == "sapo":
                tau = kw["sapo_temperature_pos"] if a > 0 else kw["sapo_temperature_neg"]
                term = -torch.sigmoid(tau * (r - 1)) * 4 / tau * a
            elif loss_type == "vespo":
                k, lam = (2.0, 3.0) if a >= 0 else (3.0, 2.0)
                phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
                term = -phi * a * x
            elif loss_type == "gpg":
                term = -x * a
            elif loss_type == "geo_mean":
                term = row_t[j]
            elif loss_type == "kl_cov":
                term = -a * r + (kw["kl_cov_coef"] * (x - old[i, j]).abs() if kw["selected"][i, j] else 0.0)
            elif loss_type in ("dppo_tv", "dppo_kl"):
                p, p_old = torch.exp(x).detach(), torch.exp(old[i, j])
                if loss_type == "dppo_tv":
                    ok = (p - p_old <= kw["divergence_high"]) if a > 0 else (p - p_old >= -kw["divergence_low"])
                else:
                    bkl = p_old * (old[i, j] - x.detach()) + \
                        (1 - p_old) * torch.log((1 - p_old + 1e-8) / (1 - p + 1e-8))
                    ok = (bkl <= kw["divergence_high"]) | (p <= p_old) if a > 0 else \
                        (bkl <= kw["divergence_low"]) | (p >= p_old)
                term = -a * torch.clamp(r, max=kw["clip_ratio_c_tis"]).detach() * x * float(ok)
            else:  # dro
                term = -(x * a - 0.5 * kw["dro_beta"] * (x - old[i, j]) ** 2)
            row_t[j] = term
            row_r[j] = r
        terms.append(row_t)
        ratios.append(row_r)
    return terms, ratios


def restated_loss(terms, mask, mode):
    n, t = mask.shape
    rows = [[v for v in row if v is not None] for row in terms]
    if mode == "token-mean":
        return sum(sum(r) for r in rows if r) / max(sum(len(r) for r in rows), 1)
    if mode == "seq-mean-token-mean":
        nonempty = [sum(r) / len(r) for r in rows if r]
        return sum(nonempty) / max(len(nonempty), 1)
    total = sum(sum(r) for r in rows if r)
    return total / n if mode == "seq-mean-token-sum" else total / t


def restated(loss_type, level, lp, old, adv, mask, ref_lp, ent, ent_mask, *, mode, beta, correction, ent_coef,
             dual_c, epsilon_low=0.2, epsilon_high=0.2, **kw):
    adv2 = adv[:, None].expand_as(lp) if adv.dim() == 1 else adv
    terms, ratios = restated_terms(loss_type, level, lp, old, adv2, mask, kw, epsilon_low, epsilon_high, dual_c)
    if beta:
        for i, j in zip(*mask.nonzero(as_tuple=True)):
            d = ref_lp[i, j] - lp[i, j]  # TRL's k3
            kl = torch.exp(d) - d - 1
            if correction:
                kl = kl * (ratios[i][j] if loss_type not in ("geo_mean",) else torch.exp(
                    torch.clamp(lp[i, j] - old[i, j], -20.0, 20.0)))
            terms[i][j] = terms[i][j] + beta * kl
    loss = restated_loss(terms, mask, mode)
    if ent_coef:
        em = mask & ent_mask
        loss = loss - ent_coef * (ent * em).sum() / em.sum().clamp(min=1)  # TRL's entropy bonus
    return loss


@pytest.mark.parametrize("loss_type,level", CASES)
@pytest.mark.parametrize("per_token", [True, False])
def test_reference_matches_restated_trl_verl(gen, loss_type, level, per_token):
    lp, old, adv, mask, ref_lp, ent, ent_mask = draw(gen, per_token=per_token)
    kw = type_knobs(loss_type, lp, old, adv, mask, gen)
    for mode, beta, correction, ent_coef, dual_c in (("token-mean", 0.0, False, 0.0, None),
                                                     ("seq-mean-token-mean", 0.2, True, 0.03, 3.0),
                                                     ("seq-mean-token-sum", 0.1, False, -0.02, None),
                                                     ("seq-mean-token-sum-norm", 0.3, True, 0.0, 1.5)):
        dual_c = dual_c if loss_type in ("ppo", "clip_cov") else None
        x1, x2, h1, h2 = (v.clone().requires_grad_() for v in (lp, lp, ent, ent))
        eps = dict(epsilon_high=kw.pop("epsilon_high")) if "epsilon_high" in kw else {}
        got = reference.clipped_policy_loss(
            x1, old, adv, mask, ref_logp=ref_lp, beta=beta, kl_ratio_correction=correction, loss_agg_mode=mode,
            importance_sampling_level=level, loss_type=loss_type, dual_clip_c=dual_c, entropy=h1,
            entropy_coef=ent_coef, entropy_mask=ent_mask, **eps, **kw)
        want = restated(loss_type, level, x2, old, adv, mask, ref_lp, h2, ent_mask, mode=mode, beta=beta,
                        correction=correction, ent_coef=ent_coef, dual_c=dual_c if loss_type in ("ppo", "clip_cov")
                        else None, **eps, **kw)
        kw.update(eps)
        torch.testing.assert_close(got.loss, want, rtol=1e-12, atol=1e-12)
        g1 = torch.autograd.grad(got.loss, (x1, h1), allow_unused=True)
        g2 = torch.autograd.grad(want, (x2, h2), allow_unused=True)
        torch.testing.assert_close(g1[0], g2[0], rtol=1e-10, atol=1e-12)
        if ent_coef:
            torch.testing.assert_close(g1[1], g2[1], rtol=1e-12, atol=1e-14)
        assert g1[0].abs().sum() > 0  # the loss does depend on logp
        assert torch.isclose(got.entropy, (ent * mask).sum() / mask.sum())


def test_defaults_bit_for_bit_and_five_fields(gen):
    lp, old, adv, mask, ref_lp, _, _ = draw(gen, per_token=False, dtype=torch.float32)
    a = reference.clipped_policy_loss(lp, old, adv, mask, ref_logp=ref_lp, beta=0.1)
    b = reference.clipped_policy_loss(lp, old, adv, mask, ref_logp=ref_lp, beta=0.1, **{
        k: v for k, v in reference.LOSS_TYPE_DEFAULTS.items()})
    assert a._fields[-1] == "entropy" and len(a) == 5 and float(a.entropy) == 0.0
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_gspo_token_equals_gspo_for_row_advantages_not_per_token(gen):
    """GSPO-token has GSPO's value; its gradient equals GSPO's only when A is constant along the row."""
    lp, old, adv, mask, *_ = draw(gen, per_token=False)
    grads = {}
    for per_token in (False, True):
        a = adv[:, None] * (1 + torch.rand(lp.shape, generator=gen, dtype=torch.float64)) if per_token else adv
        for level in ("sequence", "sequence_token"):
            x = lp.clone().requires_grad_()
            out = reference.clipped_policy_loss(x, old, a, mask, importance_sampling_level=level, epsilon_low=1.0,
                                                epsilon_high=5.0)
            grads[per_token, level] = (out.loss.detach(), torch.autograd.grad(out.loss, x)[0])
        torch.testing.assert_close(grads[per_token, "sequence"][0], grads[per_token, "sequence_token"][0])
    torch.testing.assert_close(grads[False, "sequence"][1], grads[False, "sequence_token"][1])
    assert not torch.allclose(grads[True, "sequence"][1], grads[True, "sequence_token"][1])


def restated_verl_clip_cov_selection(lp, old, adv, mask, ratio, lb, ub, eps, generator):
    """verl compute_policy_loss_clip_cov's choice of tokens, statement for statement (its randperm on `generator`)."""
    m = mask.to(lp.dtype)
    r = torch.exp(lp - old)
    clip_by_origin = (-adv * torch.clamp(r, 1 - eps, 1 + eps) > -adv * r) & (m > 0)
    cov = (adv - (adv * m).sum() / (m.sum() + 1e-8)) * (lp - (lp * m).sum() / (m.sum() + 1e-8))
    cov[m == 0] = -torch.inf
    cov[clip_by_origin] = -torch.inf
    clip_num = max(int(ratio * m.sum().item()), 1)
    idx = torch.nonzero((cov < ub) & (cov > lb) & (m > 0))
    idx = idx[torch.randperm(len(idx), generator=generator)[:min(clip_num, len(idx))]]
    out = torch.zeros_like(mask)
    out[idx[:, 0], idx[:, 1]] = True
    return out


def restated_verl_kl_cov_selection(lp, adv, mask, ratio):
    flat = mask.reshape(-1).nonzero(as_tuple=True)[0]
    a, x = adv[mask].reshape(-1), lp[mask].reshape(-1)
    cov = (a - a.mean()) * (x - x.mean())
    top = torch.topk(cov, max(1, int(len(cov) * ratio)), largest=True).indices
    out = torch.zeros(mask.numel(), dtype=torch.bool)
    out[flat[top]] = True
    return out.view(mask.shape)


def test_cov_token_selection_is_verls(gen):
    lp, old, adv, mask, *_ = draw(gen, n=6, t=9)
    lp[~mask] = float("nan")  # garbage where masked never leaks
    for seed in range(3):
        got = reference.cov_token_selection(lp, old, adv, mask, mode="clip_cov", ratio=0.1, lb=-0.5, ub=0.5,
                                            generator=torch.Generator().manual_seed(seed))
        want = restated_verl_clip_cov_selection(lp.nan_to_num(0.0), old, adv * mask, mask, 0.1, -0.5, 0.5, 0.2,
                                                torch.Generator().manual_seed(seed))
        assert torch.equal(got, want) and got.sum() == max(int(0.1 * mask.sum()), 1)
    got = reference.cov_token_selection(lp, old, adv, mask, mode="kl_cov", ratio=0.2)
    assert torch.equal(got, restated_verl_kl_cov_selection(lp, adv, mask, 0.2))
    assert not (got & ~mask).any()


@pytest.mark.parametrize("bad,match", [
    (dict(loss_type="grpo"), "loss_type"), (dict(loss_type="vespo", importance_sampling_level="sequence"),
                                             "importance_sampling_level"),
    (dict(loss_type="dro"), "dro_beta"), (dict(loss_type="clip_cov"), "selected"),
    (dict(selected=True), "selected"), (dict(entropy_coef=0.1), "entropy"),
    (dict(sapo_temperature_pos=0.0), "sapo_temperature_pos"), (dict(entropy_agg_mode="mean"), "entropy_agg_mode"),
    (dict(vespo_k_pos=-1.0), "vespo_k_pos"), (dict(kl_ratio_correction=1), "kl_ratio_correction"),
    (dict(loss_type="sapo", dual_clip_c=3.0), "dual_clip_c"), (dict(divergence_low=-0.1), "divergence_low"),
    (dict(entropy_mask=True), "entropy_mask"),
])
def test_bad_loss_type_inputs(gen, bad, match):
    lp, old, adv, mask, *_ = draw(gen)
    if bad.get("selected") is True:
        bad = dict(selected=mask.clone())
    if bad.get("entropy_mask") is True:
        bad = dict(entropy_mask=mask[:, :-1])
    with pytest.raises(ValueError, match=match):
        reference.clipped_policy_loss(lp, old, adv, mask, **bad)


# ----------------------------------------------------------------------------- Triton kernels vs the reference
def _tolerance(dtype):
    """Both sides see the same (rounded) inputs; the kernels compute in fp32."""
    return 2e-4 if dtype == torch.float32 else 1e-3


def _knob_sets(loss_type, index):
    """Two runs per (type, level): the aggregation modes rotate with the case index so that each type meets
    every mode over the parametrisation; each run turns on the dual clip (where it applies), the KL term with
    and without the ratio correction, and the entropy bonus."""
    modes = LOSS_AGG_MODES[index % 4], LOSS_AGG_MODES[(index + 1) % 4]
    dual_c = 3.0 if loss_type in ("ppo", "clip_cov") else None
    return [dict(loss_agg_mode=modes[0], dual_clip_c=dual_c, beta=0.2, kl_ratio_correction=True, entropy_coef=0.05,
                 entropy_agg_mode=modes[1], kl_estimator="k3"),
            dict(loss_agg_mode=modes[1], dual_clip_c=None, beta=0.1, kl_ratio_correction=False, entropy_coef=-0.02,
                 entropy_agg_mode="token-mean", kl_estimator=("k1", "k2")[index % 2])]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{lt}-{lev}" for lt, lev in CASES])
def test_triton_matches_reference(triton_backend, gen, device, case):
    from pairuni_kernels import clipped_policy_loss

    loss_type, level = CASES[case]
    for (dtype, per_token), knobs in zip(((torch.float32, case % 2 == 0), (torch.bfloat16, case % 2 == 1)),
                                         _knob_sets(loss_type, case)):
        lp, old, adv, mask, ref_lp, ent, ent_mask = draw(gen, n=5, t=7, per_token=per_token)
        mask[2] = False  # an empty row
        lp, old, adv, ref_lp, ent = (x.to(dtype) for x in (lp, old, adv, ref_lp, ent))
        kw = {**type_knobs(loss_type, lp.double(), old.double(), adv.double(), mask, gen), **knobs}
        outs, grads = [], []
        for fn, cast, dev in ((clipped_policy_loss, lambda x: x, device), (reference.clipped_policy_loss,
                                                                            lambda x: x.double(), "cpu")):
            x, h = (cast(v).to(dev).detach().requires_grad_() for v in (lp, ent))
            args = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            out = fn(x, cast(old).to(dev), cast(adv).to(dev), mask.to(dev), ref_logp=cast(ref_lp).to(dev),
                     importance_sampling_level=level, loss_type=loss_type, entropy=h,
                     entropy_mask=ent_mask.to(dev), **args)
            outs.append(out)
            grads.append(torch.autograd.grad(out.loss, (x, h)))
        tol = _tolerance(dtype)
        for name, got, want in zip(outs[0]._fields, outs[0], outs[1]):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol, msg=f"{name} ({dtype})")
        for name, got, want in zip(("logp", "entropy"), *grads):
            assert got.dtype == dtype
            rel = (got.double().cpu() - want).norm() / want.norm().clamp(min=1e-12)
            assert rel < tol * 10, f"grad {name} rel err {rel:.3g} ({dtype})"
        assert grads[1][0].abs().sum() > 0


def test_triton_compile_fullgraph_new_types(triton_backend, gen, device):
    from pairuni_kernels import clipped_policy_loss

    lp, old, adv, mask, ref_lp, ent, ent_mask = (x.to(device) for x in draw(gen, per_token=True,
                                                                              dtype=torch.float32))

    def step(x, h):
        out = clipped_policy_loss(x, old, adv, mask, ref_logp=ref_lp, beta=0.1, kl_ratio_correction=True,
                                  loss_type="sapo", importance_sampling_level="sequence_token", entropy=h,
                                  entropy_coef=0.1, entropy_mask=ent_mask, loss_agg_mode="seq-mean-token-mean")
        return out.loss + out.entropy

    torch._dynamo.reset()
    results = []
    for fn in (torch.compile(step, fullgraph=True, backend="aot_eager"), step):
        x, h = lp.clone().requires_grad_(), ent.clone().requires_grad_()
        loss = fn(x, h)
        results.append((loss, *torch.autograd.grad(loss, (x, h))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- fused linear head + loss
@pytest.mark.parametrize("backend", ["reference_backend", "triton_backend"])
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{lt}-{lev}" for lt, lev in CASES])
def test_fused_linear_loss_matches_reference(request, gen, device, backend, case):
    """The fused head (torch chunk loop, or the Triton kernels interpreted) in fp32 against the float64 spec
    that materialises the logits, with the entropy bonus computed in the head and folded into d logits."""
    from pairuni_kernels import fused_linear_policy_loss

    request.getfixturevalue(backend)
    loss_type, level = CASES[case]
    n, t, h, v = 4, 6, 8, 16
    hidden = torch.randn(n, t, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * 0.5
    targets = torch.randint(0, v, (n, t), generator=gen)
    _, _, adv, mask, _, _, ent_mask = draw(gen, n=n, t=t, per_token=case % 2 == 0)
    mask[1] = False  # an empty row
    lp = reference.linear_logprobs(hidden.flatten(0, 1), weight, targets.flatten()).view(n, t)
    old = lp + torch.randn(n, t, generator=gen, dtype=torch.float64) * 0.3
    ref_lp = lp + torch.randn(n, t, generator=gen, dtype=torch.float64) * 0.3
    kw = {**type_knobs(loss_type, lp, old, adv, mask, gen), **_knob_sets(loss_type, case)[case % 2]}
    kw.update(ref_logp=ref_lp, importance_sampling_level=level, loss_type=loss_type, entropy_mask=ent_mask)
    results = []
    for fn, dt, extra in ((fused_linear_policy_loss, torch.float32, dict(chunk_size=7)),
                          (reference.fused_linear_policy_loss, torch.float64, {})):
        hd, w = (x.to(dt).to(device if dt == torch.float32 else "cpu").requires_grad_() for x in (hidden, weight))
        dev = hd.device
        args = {k: (x.to(dev, dtype=dt) if isinstance(x, torch.Tensor) and x.is_floating_point()
                    else x.to(dev) if isinstance(x, torch.Tensor) else x) for k, x in kw.items()}
        out = fn(hd, w, targets.to(dev), old.to(dev, dt), adv.to(dev, dt), mask.to(dev), **args, **extra)
        results.append((out, torch.autograd.grad(out.loss, (hd, w))))
    (got, g_got), (want, g_want) = results
    for name, a, b in zip(got._fields, got, want):
        torch.testing.assert_close(a.double().cpu(), b, rtol=2e-4, atol=2e-5, msg=name)
    assert float(want.entropy) > 0
    for name, a, b in zip(("hidden", "weight"), g_got, g_want):
        rel = (a.double().cpu() - b).norm() / b.norm()
        assert rel < 1e-4, f"grad {name} rel err {rel:.3g}"


@pytest.mark.parametrize("loss_type,level", [("geo_mean", "token"), ("sapo", "sequence"), ("kl_cov", "token")])
def test_fused_two_pass_fallback_and_entropy_metric(gen, reference_backend, loss_type, level):
    """A vocabulary split takes the two-pass path (logp and entropy from the head op, then the [N, T] loss): the
    same loss, gradients and entropy metric as the spec; compute_entropy reports the metric without a bonus."""
    from pairuni_kernels import fused_linear_policy_loss

    n, t, h, v = 3, 5, 6, 24
    hidden = torch.randn(n, t, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * 0.5
    targets = torch.randint(0, v, (n, t), generator=gen)
    _, _, adv, mask, _, _, ent_mask = draw(gen, n=n, t=t)
    lp = reference.linear_logprobs(hidden.flatten(0, 1), weight, targets.flatten()).view(n, t)
    old = lp + torch.randn(n, t, generator=gen, dtype=torch.float64) * 0.3
    kw = dict(type_knobs(loss_type, lp, old, adv, mask, gen), loss_type=loss_type, importance_sampling_level=level)
    for extra in (dict(entropy_coef=0.07, entropy_mask=ent_mask, entropy_agg_mode="seq-mean-token-sum"),
                  dict(compute_entropy=True)):
        outs = []
        for fn, split in ((fused_linear_policy_loss, dict(vocab_chunk_size=8)), (reference.fused_linear_policy_loss,
                                                                               {})):
            hd = hidden.clone().requires_grad_()
            out = fn(hd, weight, targets, old, adv, mask, **kw, **extra, **split)
            outs.append((out, torch.autograd.grad(out.loss, hd)[0]))
        (got, g_got), (want, g_want) = outs
        for name, a, b in zip(got._fields, got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)
        assert float(got.entropy) > 0
    with pytest.raises(ValueError, match="entropy"):
        fused_linear_policy_loss(hidden, weight, targets, old, adv, mask, entropy=lp, **kw)
