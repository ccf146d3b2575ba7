"""linear_logprobs / fused_linear_policy_loss against a reference that materialises the logits in fp64.

Both paths run here: the chunked torch path (CPU default) and the Triton kernels, interpreted on
CPU (`triton_backend` fixture, TRITON_INTERPRET=1 from conftest). Interpreted shapes stay small.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pairuni_kernels
from pairuni_kernels import fused_linear_policy_loss, linear_logprobs
from pairuni_kernels import reference as ref

# the package exports functions of the same names, so reach the modules through importlib: LL holds the
# chunked-head machinery (kernels, planners, chunk loops), LP and FL the two ops
LL = importlib.import_module("pairuni_kernels.chunked_head")
LP = importlib.import_module("pairuni_kernels.linear_logprobs")
FL = importlib.import_module("pairuni_kernels.fused_linear_loss")

# (M, H, V): M = 1, H = 24, V prime (not a multiple of any block), V > one BLOCK_V tile
SHAPES = [(1, 24, 37), (37, 24, 301), (70, 40, 4099)]
# chunk configurations: automatic, several row chunks, rows x vocabulary chunks (online lse)
CHUNKS = [{}, {"chunk_size": 5}, {"chunk_size": 7, "vocab_chunk_size": 50}]


def _head(gen, m, h, v, *, dtype=torch.float64, scale=1.0, device="cpu"):
    """Drawn on the CPU generator, then moved to `device`."""
    hidden = torch.randn(m, h, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, generator=gen, dtype=torch.float64) * scale / h ** 0.5 * 3).to(dtype)
    bias = torch.randn(v, generator=gen, dtype=torch.float64).to(dtype)
    targets = torch.randint(0, v, (m,), generator=gen)
    return hidden.to(device), weight.to(device), bias.to(device), targets.to(device)


def _value_and_grads(fn, tensors, cotangents):
    """Runs fn on fresh leaves, returns its outputs and d<outputs . cotangents>/d leaves."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    total = sum((o * c.to(o.dtype)).sum() for o, c in zip(outs, cotangents))
    grads = torch.autograd.grad(total, leaves)
    return [o.detach() for o in outs], list(grads)


def _assert_close(got, want, *, atol, rtol, what):
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g.double(), w.double(), atol=atol, rtol=rtol, msg=lambda m, i=i: f"{what}[{i}]: {m}")


def _check_logprobs(gen, shape, chunks, *, with_bias, temperature, entropy, dtype=torch.float32, atol=2e-5,
                    device="cpu"):
    m, h, v = shape
    hidden, weight, bias, targets = _head(gen, m, h, v, device=device)
    tensors = [hidden, weight] + ([bias] if with_bias else [])
    cot = [torch.randn(m, generator=gen, dtype=torch.float64).to(device) for _ in range(1 + entropy)]

    def run(module, dt, **kw):
        def fn(hd, w, b=None):
            return module.linear_logprobs(hd, w, targets, bias=b, temperature=temperature,
                                          return_entropy=entropy, **kw)
        return _value_and_grads(fn, [t.to(dt) for t in tensors], cot)

    want_out, want_grads = run(ref, torch.float64)
    got_out, got_grads = run(pairuni_kernels, dtype, **chunks)
    assert got_out[0].dtype == ref.compute_dtype(dtype)
    _assert_close(got_out, want_out, atol=atol, rtol=atol, what="outputs")
    _assert_close(got_grads, want_grads, atol=atol, rtol=atol, what="grads")


# ----------------------------------------------------------------------------- linear_logprobs values and grads
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunks", CHUNKS)
def test_torch_path_fp64_is_exact(gen, reference_backend, shape, chunks):
    """The chunked torch path in fp64 is the same math as the spec to rounding."""
    _check_logprobs(gen, shape, chunks, with_bias=True, temperature=0.7, entropy=True, dtype=torch.float64,
                    atol=1e-10)


@pytest.mark.parametrize("with_bias,temperature,entropy", [(False, 1.0, False), (True, 1.7, True), (True, 0.5, False)])
@pytest.mark.parametrize("chunks", CHUNKS)
def test_torch_path_fp32(gen, reference_backend, chunks, with_bias, temperature, entropy):
    _check_logprobs(gen, (37, 24, 301), chunks, with_bias=with_bias, temperature=temperature, entropy=entropy)


@pytest.mark.parametrize("shape,chunks", [((1, 24, 37), {}), ((37, 24, 301), CHUNKS[1]),
                                          ((37, 24, 301), CHUNKS[2]), ((9, 16, 4099), {})])
def test_triton_kernels_fp32(gen, triton_backend, shape, chunks, device):
    _check_logprobs(gen, shape, chunks, with_bias=True, temperature=0.7, entropy=True, device=device)


def test_triton_path_runs_the_kernels(gen, triton_backend, monkeypatch, device):
    calls = []
    for name in ("_stats_triton", "_dlogits_triton"):
        real = getattr(LL, name)
        monkeypatch.setattr(LL, name, lambda *a, _real=real, _n=name: calls.append(_n) or _real(*a))
    hidden, weight, _, targets = _head(gen, 5, 8, 40, dtype=torch.float32, device=device)
    w = weight.requires_grad_()
    torch.autograd.grad(linear_logprobs(hidden, w, targets, chunk_size=2).sum(), [w])
    assert calls.count("_stats_triton") == 3 and calls.count("_dlogits_triton") == 3


def test_triton_kernels_no_bias_no_entropy(gen, triton_backend, device):
    _check_logprobs(gen, (37, 24, 301), CHUNKS[2], with_bias=False, temperature=1.0, entropy=False, device=device)


def _lowp_unfused(targets, temperature):
    """What a user writes in plain torch at low precision: bf16 matmul, fp32 log_softmax."""
    def fn(hd, w, b):
        logits = (hd @ w.t()).float() + b.float()
        return torch.log_softmax(logits / temperature, -1).gather(1, targets[:, None])[:, 0]
    return fn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunks,accum", [({}, None), ({"chunk_size": 7}, torch.float32),
                                          ({"chunk_size": 16, "vocab_chunk_size": 300}, torch.float32)])
def test_low_precision_error_within_twice_torch(gen, reference_backend, monkeypatch, dtype, chunks, accum):
    """flash-attention rule: error vs fp64 at most 2x that of plain torch at the same precision."""
    monkeypatch.setattr(LL, "CPU_FP32_BLOCK_ELEMENTS", 3000)  # fp32 softmax work in blocks of 3 rows
    m, h, v = 96, 64, 1000
    hidden, weight, bias, targets = _head(gen, m, h, v, dtype=dtype)
    cot = [torch.randn(m, generator=gen, dtype=torch.float64)]
    low = [hidden, weight, bias]
    want_out, want_grads = _value_and_grads(
        lambda hd, w, b: ref.linear_logprobs(hd, w, targets, bias=b, temperature=0.8),
        [t.double() for t in low], cot)
    torch_out, torch_grads = _value_and_grads(_lowp_unfused(targets, 0.8), low, cot)
    got_out, got_grads = _value_and_grads(
        lambda hd, w, b: linear_logprobs(hd, w, targets, bias=b, temperature=0.8, accum_dtype=accum, **chunks),
        low, cot)
    assert [g.dtype for g in got_grads] == [dtype] * 3
    for name, got, base, want in zip(("logp", "grad_hidden", "grad_weight", "grad_bias"),
                                     got_out + got_grads, torch_out + torch_grads, want_out + want_grads):
        err = (got.double() - want).abs().max().item()
        base_err = (base.double() - want).abs().max().item()
        assert err <= 2 * base_err + 1e-6, f"{name}: error {err:.3g} vs plain torch {base_err:.3g}"


def test_low_precision_default_accumulation_is_bounded(gen, reference_backend):
    """bf16 grad_weight accumulated in bf16 over K row chunks: within 4x plain torch at K = 14."""
    m, h, v = 96, 64, 1000
    hidden, weight, _bias, targets = _head(gen, m, h, v, dtype=torch.bfloat16)
    cot = [torch.randn(m, generator=gen, dtype=torch.float64)]
    _, want = _value_and_grads(lambda hd, w: ref.linear_logprobs(hd, w, targets), [hidden.double(), weight.double()],
                               cot)
    _, base = _value_and_grads(lambda hd, w: _lowp_unfused(targets, 1.0)(hd, w, torch.zeros(v)), [hidden, weight],
                               cot)
    _, got = _value_and_grads(lambda hd, w: linear_logprobs(hd, w, targets, chunk_size=7), [hidden, weight], cot)
    err = (got[1].double() - want[1]).abs().max().item()
    base_err = (base[1].double() - want[1]).abs().max().item()
    assert err <= 4 * base_err, (err, base_err)


def test_triton_kernels_bf16(gen, triton_backend, device):
    m, h, v = 33, 32, 300
    hidden, weight, bias, targets = _head(gen, m, h, v, dtype=torch.bfloat16, device=device)
    cot = [torch.randn(m, generator=gen, dtype=torch.float64).to(device)]
    want_out, want_grads = _value_and_grads(
        lambda hd, w, b: ref.linear_logprobs(hd, w, targets, bias=b), [hidden.double(), weight.double(),
                                                                       bias.double()], cot)
    torch_out, torch_grads = _value_and_grads(_lowp_unfused(targets, 1.0), [hidden, weight, bias], cot)
    got_out, got_grads = _value_and_grads(lambda hd, w, b: linear_logprobs(hd, w, targets, bias=b),
                                          [hidden, weight, bias], cot)
    for got, base, want in zip(got_out + got_grads, torch_out + torch_grads, want_out + want_grads):
        assert (got.double() - want).abs().max() <= 2 * (base.double() - want).abs().max() + 1e-6


def test_entropy_only_gradient(gen, reference_backend):
    """A loss on the entropy alone (logp unused) still back-propagates, and matches the spec."""
    hidden, weight, _, targets = _head(gen, 13, 24, 101)
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    _, ent = linear_logprobs(*leaves, targets, return_entropy=True, chunk_size=4)
    got = torch.autograd.grad(ent.sum(), leaves)
    leaves_ref = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    _, ent_ref = ref.linear_logprobs(*leaves_ref, targets, return_entropy=True)
    want = torch.autograd.grad(ent_ref.sum(), leaves_ref)
    _assert_close(got, want, atol=1e-10, rtol=1e-10, what="entropy grads")


def test_grad_only_for_requested_inputs(gen, reference_backend):
    hidden, weight, bias, targets = _head(gen, 5, 8, 20)
    w = weight.clone().requires_grad_()
    logp = linear_logprobs(hidden, w, targets, bias=bias)
    (gw,) = torch.autograd.grad(logp.sum(), [w])
    logp_ref = ref.linear_logprobs(hidden, weight.clone().requires_grad_(), targets, bias=bias)
    assert gw.shape == weight.shape and torch.isfinite(gw).all()
    assert torch.allclose(logp, logp_ref.detach(), atol=1e-12)


def test_large_logits_are_stable(gen, reference_backend):
    """Logits in the thousands: the online max keeps exp finite, across vocabulary chunks too."""
    hidden, weight, _, targets = _head(gen, 6, 16, 300)
    hidden = hidden * 400
    want = ref.linear_logprobs(hidden, weight, targets)
    for kw in ({}, {"vocab_chunk_size": 64}):
        got = linear_logprobs(hidden.float(), weight.float(), targets, **kw)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=1e-4)


# ----------------------------------------------------------------------------- memory behaviour
class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op creates while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("vocab_chunk", [None, 128])
def test_never_builds_full_logits(gen, reference_backend, vocab_chunk):
    """No tensor of [M, V] elements (nor a tenth of it) is created in forward or backward."""
    m, h, v = 256, 16, 1000
    hidden, weight, bias, targets = _head(gen, m, h, v, dtype=torch.float32)
    grad = torch.randn(m, generator=gen)
    with _LargestTensor() as spy:
        logp, ent, lse = LL._forward_impl(hidden, weight, targets, bias, None, 1.3, True, 16, vocab_chunk or 0)
        LL._backward_impl(grad, grad, hidden, weight, targets, bias, None, lse, ent, 1.3, 16, vocab_chunk or 0,
                          False, True, True, True)
    # the gradients themselves ([V, H], [M, H]) are the largest tensors; logits chunks are 16 x V at most
    assert spy.largest <= max(v * h, m * h, 16 * v)
    assert spy.largest < m * v // 10
    want = ref.linear_logprobs(hidden.double(), weight.double(), targets, bias=bias.double(), temperature=1.3)
    torch.testing.assert_close(logp.double(), want, atol=2e-5, rtol=2e-5)


def test_chunk_shape_budget(monkeypatch):
    cpu = torch.device("cpu")
    rows, cols = LL.chunk_shape(36864, 16384, 4096, cpu)
    assert cols == 16384 and rows % LL.ROW_ALIGN == 0 and rows * (cols + 4096) <= LL.CHUNK_ELEMENTS
    rows, cols = LL.chunk_shape(4096, 102400, 4096, cpu)
    assert cols == 102400 and LL.MIN_CHUNK_ROWS <= rows < 4096
    # a vocabulary too large for MIN_CHUNK_ROWS full rows is split (online log-sum-exp)
    rows, cols = LL.chunk_shape(4096, 8_000_000, 64, cpu)
    assert cols < 8_000_000 and cols % LL.VOCAB_ALIGN == 0 and rows * cols <= LL.CHUNK_ELEMENTS
    assert LL.chunk_shape(3, 50, 8, cpu) == (3, 50)
    assert LL.chunk_shape(100, 50, 8, cpu, chunk_size=7, vocab_chunk_size=20) == (7, 20)
    # free memory bounds the chunk
    monkeypatch.setattr(LL, "_free_bytes", lambda device: 64 * 4 * 2000)
    rows, cols = LL.chunk_shape(10000, 1000, 8, cpu)
    assert rows * (cols + 8) <= 2000 * 64 * LL.FREE_MEMORY_SHARE * 16 and rows == LL.MIN_CHUNK_ROWS


def test_automatic_vocab_split_matches(gen, reference_backend, monkeypatch):
    monkeypatch.setattr(LL, "CHUNK_ELEMENTS", 16 * 300)  # forces cols < V through the public API
    hidden, weight, bias, targets = _head(gen, 40, 8, 1000)
    assert LL.chunk_shape(40, 1000, 8, torch.device("cpu"))[1] < 1000
    got, got_ent = linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True)
    want, want_ent = ref.linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got_ent, want_ent, atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------- fused_linear_policy_loss
def _loss_inputs(gen, n, t, h, v, *, per_token_adv=False, with_ref=False, empty_rows=(1,), device="cpu"):
    """Drawn on the CPU generator, then moved to `device`."""
    hidden = torch.randn(n, t, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * 3 / h ** 0.5
    bias = torch.randn(v, generator=gen, dtype=torch.float64) * 0.5
    targets = torch.randint(0, v, (n, t), generator=gen)
    mask = torch.rand(n, t, generator=gen) > 0.3
    for r in empty_rows:
        mask[r] = False
    mask[0, 0] = True
    with torch.no_grad():
        true_logp = ref.linear_logprobs(hidden.flatten(0, 1), weight, targets.flatten(), bias=bias).view(n, t)
    # old policy near the current one so that some ratios are clipped and some are not
    old_logp = true_logp + 0.3 * torch.randn(n, t, generator=gen, dtype=torch.float64)
    adv = torch.randn((n, t) if per_token_adv else (n,), generator=gen, dtype=torch.float64)
    ref_logp = true_logp + 0.2 * torch.randn(n, t, generator=gen, dtype=torch.float64) if with_ref else None
    tensors = {"hidden": hidden, "weight": weight, "bias": bias, "targets": targets, "old_logp": old_logp,
               "advantages": adv, "mask": mask, "ref_logp": ref_logp}
    return {k: None if x is None else x.to(device) for k, x in tensors.items()}


def _check_fused(inputs, knobs, *, dtype=torch.float32, atol=2e-5, chunks=None, module=pairuni_kernels):
    chunks = chunks or {}
    targets, mask = inputs["targets"], inputs["mask"]
    small = {"old_logp": inputs["old_logp"], "advantages": inputs["advantages"], "mask": mask}
    if inputs["ref_logp"] is not None:
        knobs = dict(knobs, ref_logp=inputs["ref_logp"])

    def fn(mod, dt, **kw):
        def f(hd, w, b):
            out = mod.fused_linear_policy_loss(hd, w, targets, small["old_logp"].to(dt), small["advantages"].to(dt),
                                               mask, bias=b, temperature=0.9, **knobs, **kw)
            return out.loss, out.clip_fraction, out.kl, out.ratio_mean
        leaves = [inputs[k].to(dt).detach().clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]
        out = f(*leaves)
        grads = torch.autograd.grad(out[0], leaves)
        return [o.detach() for o in out], list(grads)

    want_out, want_grads = fn(ref, torch.float64)
    got_out, got_grads = fn(module, dtype, **chunks)
    _assert_close(got_out, want_out, atol=atol, rtol=atol, what="loss outputs")
    _assert_close(got_grads, want_grads, atol=atol, rtol=atol, what="loss grads")
    # masked tokens get exactly zero gradient
    assert (got_grads[0][~mask] == 0).all()
    return got_out, got_grads


# single pass (chunks of tokens, logits once) and two passes (vocabulary split, logits twice)
FUSED_PATHS = {"one_pass": {"chunk_size": 5}, "two_pass": {"chunk_size": 5, "vocab_chunk_size": 64}}


@pytest.mark.parametrize("loss_agg_mode", ref.LOSS_AGG_MODES)
@pytest.mark.parametrize("level", ref.IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("path", FUSED_PATHS)
def test_fused_loss_all_modes(gen, reference_backend, loss_agg_mode, level, path):
    inputs = _loss_inputs(gen, 4, 9, 24, 301)
    out, _ = _check_fused(inputs, {"loss_agg_mode": loss_agg_mode, "importance_sampling_level": level},
                          chunks=FUSED_PATHS[path])
    assert 0 < out[1] < 1  # some tokens clipped, some not: both branches are exercised


@pytest.mark.parametrize("knobs", [
    {"beta": 0.1, "kl_estimator": "k3", "dual_clip_c": 3.0},
    {"beta": 0.05, "kl_estimator": "k1", "epsilon_low": 0.1, "epsilon_high": 0.28},
    {"beta": 0.2, "kl_estimator": "k2", "loss_agg_mode": "seq-mean-token-mean"},
])
@pytest.mark.parametrize("path", FUSED_PATHS)
def test_fused_loss_kl_dual_clip_per_token_adv(gen, reference_backend, knobs, path):
    inputs = _loss_inputs(gen, 3, 7, 24, 301, per_token_adv=True, with_ref=True)
    _check_fused(inputs, knobs, chunks=FUSED_PATHS[path])


@pytest.mark.parametrize("knobs", [{}, {"importance_sampling_level": "sequence", "loss_agg_mode": "seq-mean-token-sum"},
                                   {"beta": 0.3, "kl_estimator": "k3", "importance_sampling_level": "sequence"},
                                   {"beta": 0.1, "kl_estimator": "k2", "dual_clip_c": 1.5}])
def test_fused_loss_far_from_old_policy(gen, reference_backend, knobs):
    """Log-ratios beyond the +-20 clamp, dual clip and k3 clamp active: the closed-form gradient agrees."""
    inputs = _loss_inputs(gen, 4, 8, 16, 50, with_ref=True)
    inputs["advantages"] = torch.tensor([-1.0, 0.5, -2.0, 1.5], dtype=torch.float64)
    inputs["old_logp"] = inputs["old_logp"] + 25 * torch.randn(4, 8, generator=gen, dtype=torch.float64)
    inputs["ref_logp"] = inputs["ref_logp"] + 25 * torch.randn(4, 8, generator=gen, dtype=torch.float64)
    _check_fused(inputs, knobs, chunks={"chunk_size": 8})


@pytest.mark.parametrize("path", FUSED_PATHS)
def test_fused_loss_fp64_exact(gen, reference_backend, path):
    inputs = _loss_inputs(gen, 3, 5, 24, 37)
    _check_fused(inputs, {"loss_agg_mode": "seq-mean-token-sum", "importance_sampling_level": "sequence"},
                 dtype=torch.float64, atol=1e-10, chunks=FUSED_PATHS[path])


def test_fused_loss_no_grad_and_partial_grads(gen, reference_backend):
    inputs = _loss_inputs(gen, 3, 5, 16, 37)
    args = (inputs["targets"], inputs["old_logp"], inputs["advantages"], inputs["mask"])
    want = ref.fused_linear_policy_loss(inputs["hidden"], inputs["weight"], *args)
    with torch.no_grad():
        got = fused_linear_policy_loss(inputs["hidden"], inputs["weight"], *args, chunk_size=5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    hd = inputs["hidden"].clone().requires_grad_()
    out = fused_linear_policy_loss(hd, inputs["weight"], *args, chunk_size=5)
    (gh,) = torch.autograd.grad(out.loss * 3.0, [hd])  # the incoming gradient scales the stored one
    hd_ref = inputs["hidden"].clone().requires_grad_()
    (gh_ref,) = torch.autograd.grad(ref.fused_linear_policy_loss(hd_ref, inputs["weight"], *args).loss * 3.0,
                                    [hd_ref])
    torch.testing.assert_close(gh, gh_ref, atol=1e-12, rtol=1e-12)


def test_fused_loss_second_backward_fails_loudly(gen, reference_backend):
    """Backward scales the stored gradients in place: a retain_graph second backward must raise,
    never return gradients scaled twice."""
    inputs = _loss_inputs(gen, 2, 4, 8, 20)
    w = inputs["weight"].clone().requires_grad_()
    out = fused_linear_policy_loss(inputs["hidden"], w, inputs["targets"], inputs["old_logp"],
                                   inputs["advantages"], inputs["mask"])
    (2 * out.loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        (2 * out.loss).backward()


def test_fused_one_pass_computes_logits_once(gen, reference_backend):
    """Forward + backward of the one-pass loss builds each chunk's logits once and no [M, V] tensor."""
    n, t, h, v = 6, 16, 8, 500
    inputs = _loss_inputs(gen, n, t, h, v, empty_rows=())
    inputs["mask"][:] = True
    shapes = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                shapes.append((func, tuple(out.shape)))
            return out

    hd, w = inputs["hidden"].float().flatten(0, 1), inputs["weight"].float()
    with Spy():
        FL._fused_loss_impl(hd, w, inputs["targets"].flatten(), None, inputs["old_logp"].float(),
                            inputs["advantages"].float(), inputs["mask"], None, None, None, 1.0, 0.2, 0.2, None, 0.0,
                            "k3", "token-mean", "token", "ppo", False, TYPE_KNOBS, 0.0, "token-mean", False, 2 * t,
                            False, True, True, False)
    logits_mm = [s for f, s in shapes if f is torch.ops.aten.mm.out or f is torch.ops.aten.mm.default
                 if s[-1] == v]
    assert logits_mm == [(2 * t, v)] * (n // 2)
    assert max(math.prod(s) for _, s in shapes) <= 2 * t * v < n * t * v // 2


def test_fused_loss_equals_composition(gen, reference_backend):
    """With every token counted, the fused loss is literally clipped_policy_loss(linear_logprobs(...))."""
    inputs = _loss_inputs(gen, 2, 6, 16, 50, empty_rows=())
    inputs["mask"][:] = True
    n, t = inputs["mask"].shape
    hidden, weight = inputs["hidden"].float(), inputs["weight"].float()
    logp = linear_logprobs(hidden.flatten(0, 1), weight, inputs["targets"].flatten()).view(n, t)
    want = pairuni_kernels.clipped_policy_loss(logp, inputs["old_logp"].float(), inputs["advantages"].float(),
                                               inputs["mask"])
    got = fused_linear_policy_loss(hidden, weight, inputs["targets"], inputs["old_logp"].float(),
                                   inputs["advantages"].float(), inputs["mask"])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("path", FUSED_PATHS)
def test_fused_loss_ignores_garbage_in_masked_tokens(gen, reference_backend, path):
    """Padding ids (-100, >= V) and NaN hidden rows under the mask change nothing and stay out of grads."""
    inputs = _loss_inputs(gen, 3, 6, 16, 40)
    mask = inputs["mask"]
    chunks = dict(FUSED_PATHS[path], chunk_size=3)
    clean = _check_fused(inputs, {}, chunks=chunks)
    dirty = dict(inputs)
    dirty["targets"] = torch.where(mask, inputs["targets"], torch.full_like(inputs["targets"], -100))
    dirty["targets"][~mask & (torch.arange(6) % 2 == 0)] = 10_000
    dirty["hidden"] = inputs["hidden"].clone()
    dirty["hidden"][~mask] = float("nan")
    dirty["old_logp"] = torch.where(mask, inputs["old_logp"], float("inf"))
    hd = dirty["hidden"].float().requires_grad_()
    w = dirty["weight"].float().requires_grad_()
    out = fused_linear_policy_loss(hd, w, dirty["targets"], dirty["old_logp"].float(), dirty["advantages"].float(),
                                   mask, bias=dirty["bias"].float(), temperature=0.9, **chunks)
    gh, gw = torch.autograd.grad(out.loss, [hd, w])
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()
    torch.testing.assert_close(out.loss, clean[0][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gw, clean[1][1], atol=1e-6, rtol=1e-6)


def test_fused_loss_all_masked_gives_zero(gen, reference_backend):
    inputs = _loss_inputs(gen, 2, 4, 8, 30)
    hd = inputs["hidden"].float().requires_grad_()
    w = inputs["weight"].float().requires_grad_()
    out = fused_linear_policy_loss(hd, w, inputs["targets"], inputs["old_logp"].float(),
                                   inputs["advantages"].float(), torch.zeros(2, 4, dtype=torch.bool))
    gh, gw = torch.autograd.grad(out.loss, [hd, w])
    assert out.loss.item() == 0 and (gh == 0).all() and (gw == 0).all()


# ----------------------------------------------------------------------------- fused loss: chunks of tokens
def test_fused_chunks_cut_rows_by_tokens_or_keep_them_whole():
    rows = [3, 0, 5, 2, 4]  # computed tokens per row (an empty row among them): 14 in all
    assert LL.fused_chunks(rows, 4, whole_rows=False) == [(0, 4), (4, 8), (8, 12), (12, 14)]
    assert LL.fused_chunks(rows, 4, whole_rows=True) == [(0, 3), (3, 8), (8, 10), (10, 14)]  # a row over 4: alone
    assert LL.fused_chunks(rows, 7, whole_rows=True) == [(0, 3), (3, 10), (10, 14)]
    assert LL.fused_chunks(rows, 100, whole_rows=False) == LL.fused_chunks(rows, 100, whole_rows=True) == [(0, 14)]
    starts = [0, 3, 3, 8, 10, 14]
    # tokens 2..8: the end of row 0, rows 1-2 whole, the start of row 3
    assert LL.loss_pieces(starts, 2, 9, split_rows=False) == [(0, 4, 2, 9)]
    assert LL.loss_pieces(starts, 2, 9, split_rows=True) == [(0, 1, 2, 3), (1, 3, 3, 8), (3, 4, 8, 9)]
    assert LL.loss_pieces(starts, 3, 8, split_rows=True) == [(2, 3, 3, 8)]  # starts after the empty row
    assert LL.loss_pieces(starts, 4, 6, split_rows=True) == [(2, 3, 4, 6)]  # inside one row
    assert LL.loss_pieces([0, 3, 3, 8], 2, 4, split_rows=True) == [(0, 1, 2, 3), (2, 3, 3, 4)]  # no empty piece


@pytest.mark.parametrize("loss_agg_mode", ref.LOSS_AGG_MODES)
@pytest.mark.parametrize("level", ref.IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("kl", [None, "k1", "k2", "k3"])
def test_fused_loss_token_chunks_equal_one_chunk_and_reference(gen, reference_backend, loss_agg_mode, level, kl):
    """Chunks of any number of tokens, cutting sequences anywhere (with masked padding inside and
    between rows, and an empty row), give the loss, metrics and gradients of one chunk and of the
    fp64 reference; at sequence level chunks keep rows whole and agree too."""
    n, t = 5, 7
    inputs = _loss_inputs(gen, n, t, 16, 61, per_token_adv=kl == "k2", with_ref=kl is not None, empty_rows=(2,))
    inputs["mask"][3, :4] = False  # left padding
    inputs["mask"][3, 4:] = True
    knobs = {"loss_agg_mode": loss_agg_mode, "importance_sampling_level": level}
    if kl is not None:
        knobs.update(beta=0.1, kl_estimator=kl, dual_clip_c=2.0 if kl == "k3" else None)
    one_out, one_grads = _check_fused(inputs, knobs, dtype=torch.float64, atol=1e-10,
                                      chunks={"chunk_size": n * t})
    assert 0 < one_out[1] < 1  # clipped and unclipped tokens
    for chunk in (1, 2, 3, 5, t - 1, t + 1, 2 * t + 3):
        out, grads = _check_fused(inputs, knobs, dtype=torch.float64, atol=1e-10, chunks={"chunk_size": chunk})
        _assert_close(out, one_out, atol=1e-13, rtol=1e-12, what=f"chunk {chunk} vs one chunk: outputs")
        _assert_close(grads, one_grads, atol=1e-13, rtol=1e-12, what=f"chunk {chunk} vs one chunk: grads")


@pytest.mark.parametrize("level,loss_type,want_rows", [
    ("token", "ppo", [5, 5, 5, 5, 3]), ("sequence", "ppo", [5, 5, 4, 4, 5]),
    ("sequence_token", "sapo", [5, 5, 4, 4, 5]),
    ("token", "vespo", [5, 5, 4, 4, 5]), ("token", "geo_mean", [5, 5, 4, 4, 5]), ("token", "gpg", [5, 5, 5, 5, 3])])
def test_fused_loss_chunks_hold_tokens_not_sequences(gen, reference_backend, level, loss_type, want_rows):
    """Token-level chunks hold exactly chunk_size unmasked tokens whatever the rows (one logits matmul
    each); sequence-level ones (and row-coupled loss types) hold whole rows, as many as fit and at least one."""
    n, t, h, v = 6, 8, 8, 40
    inputs = _loss_inputs(gen, n, t, h, v, empty_rows=())
    inputs["mask"][:] = False
    for row, count in enumerate((5, 3, 2, 4, 4, 5)):  # 23 tokens, rows 3 to 8 wide apart from padding
        inputs["mask"][row, t - count:] = True
    shapes = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.mm.out, torch.ops.aten.mm.default) and out.shape[-1] == v:
                shapes.append(out.shape[0])
            return out

    hd, w = inputs["hidden"].float().flatten(0, 1), inputs["weight"].float()
    with Spy():
        FL._fused_loss_impl(hd, w, inputs["targets"].flatten(), None, inputs["old_logp"].float(),
                            inputs["advantages"].float(), inputs["mask"], None, None, None, 1.0, 0.2, 0.2, None, 0.0,
                            "k3", "token-mean", level, loss_type, False, TYPE_KNOBS, 0.0, "token-mean", False, 5,
                            False, True, True, False)
    assert shapes == want_rows


def test_fused_chunk_tokens_from_vocab_hidden_and_free_memory(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    per_token = (16384 + 2 * 4096) * 2 + LL.FUSED_TOKEN_OVERHEAD_BYTES  # Janus-Pro-7B image head, bf16
    assert LL.fused_chunk_tokens(16384, 4096, torch.bfloat16, cpu) == LL.CPU_FUSED_CHUNK_BYTES // per_token // 16 * 16
    fp32 = LL.fused_chunk_tokens(16384, 4096, torch.float32, cpu)
    assert fp32 == LL.CPU_FUSED_CHUNK_BYTES // (2 * per_token - LL.FUSED_TOKEN_OVERHEAD_BYTES) // 16 * 16
    monkeypatch.setattr(LL, "_free_bytes", lambda device: 60 * 10**9)
    assert LL.fused_chunk_tokens(16384, 4096, torch.bfloat16, cuda) == 21808  # the 1 GiB cap (docstring example)
    monkeypatch.setattr(LL, "_free_bytes", lambda device: 2 * 10**9)
    assert LL.fused_chunk_tokens(16384, 4096, torch.bfloat16, cuda) == 2 * 10**9 // 16 // per_token // 16 * 16
    monkeypatch.setattr(LL, "_free_bytes", lambda device: 200 * 10**6)  # 1/16 is < 512 tokens: 512 still fit
    assert LL.fused_chunk_tokens(16384, 4096, torch.bfloat16, cuda) == LL.CUDA_MIN_CHUNK_ROWS
    monkeypatch.setattr(LL, "_free_bytes", lambda device: 10 * 10**6)  # nearly full: what half the free memory holds
    assert LL.fused_chunk_tokens(16384, 4096, torch.bfloat16, cuda) == 10 * 10**6 // 2 // per_token // 16 * 16
    monkeypatch.setattr(LL, "_free_bytes", lambda device: 10**6)
    assert LL.fused_chunk_tokens(16384, 4096, torch.bfloat16, cuda) == LL.MIN_CHUNK_ROWS


@pytest.mark.parametrize("loss_agg_mode,level,chunks", [
    ("token-mean", "token", {"chunk_size": 4, "vocab_chunk_size": 128}),
    ("seq-mean-token-mean", "sequence", {"chunk_size": 4, "vocab_chunk_size": 128}),
    ("token-mean", "token", {"chunk_size": 6}),
    ("seq-mean-token-sum", "sequence", {"chunk_size": 12}),
    ("seq-mean-token-mean", "token", {"chunk_size": 4}),  # chunks cut rows: pieces of rows
    ("seq-mean-token-sum-norm", "token", {"chunk_size": 5}),
])
def test_fused_loss_triton(gen, triton_backend, loss_agg_mode, level, chunks, device):
    inputs = _loss_inputs(gen, 3, 6, 24, 301, with_ref=True, device=device)
    _check_fused(inputs, {"loss_agg_mode": loss_agg_mode, "importance_sampling_level": level, "beta": 0.1},
                 chunks=chunks)


def test_fused_loss_bf16(gen, reference_backend):
    """bf16 hidden/weight: within 2x (+ a small floor) of the plain-torch bf16 composition's error."""
    inputs = _loss_inputs(gen, 4, 12, 64, 500)
    mask, targets = inputs["mask"], inputs["targets"]
    small = (inputs["old_logp"].float(), inputs["advantages"].float(), mask)
    low = [inputs[k].bfloat16() for k in ("hidden", "weight", "bias")]

    def grads(f, tensors):
        leaves = [x.detach().clone().requires_grad_() for x in tensors]
        loss = f(*leaves)
        return [loss.detach()] + list(torch.autograd.grad(loss, leaves))

    want = grads(lambda hd, w, b: ref.fused_linear_policy_loss(hd, w, targets, *small, bias=b).loss,
                 [x.double() for x in low])
    base = grads(lambda hd, w, b: ref.clipped_policy_loss(
        torch.log_softmax((hd.flatten(0, 1) @ w.t()).float() + b.float(), -1).gather(
            1, targets.flatten()[:, None]).view(mask.shape), *small).loss, low)
    got = grads(lambda hd, w, b: fused_linear_policy_loss(hd, w, targets, *small, bias=b,
                                                          accum_dtype=torch.float32, chunk_size=16).loss, low)
    for name, g, b_, w_ in zip(("loss", "hidden", "weight", "bias"), got, base, want):
        err, base_err = (g.double() - w_).abs().max().item(), (b_.double() - w_).abs().max().item()
        assert err <= 2 * base_err + 1e-6, f"{name}: {err:.3g} vs plain torch {base_err:.3g}"


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("path", FUSED_PATHS)
def test_torch_compile_fullgraph(gen, reference_backend, path):
    inputs = _loss_inputs(gen, 2, 5, 16, 40)
    args = [inputs[k].float() for k in ("hidden", "weight")]
    rest = (inputs["targets"], inputs["old_logp"].float(), inputs["advantages"].float(), inputs["mask"])

    def step(hd, w, b):
        out = fused_linear_policy_loss(hd, w, *rest, bias=b, temperature=0.8, loss_agg_mode="seq-mean-token-mean",
                                       **FUSED_PATHS[path])
        logp, ent = linear_logprobs(hd[0], w, inputs["targets"][0], return_entropy=True)
        return out.loss + 0.1 * ent.sum() - 0.01 * logp.sum(), out.clip_fraction

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for f in (step, compiled):
        leaves = [a.clone().requires_grad_() for a in args] + [inputs["bias"].float().requires_grad_()]
        loss, clip = f(*leaves)
        results.append([loss.detach(), clip] + list(torch.autograd.grad(loss, leaves)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


#: the op's type_knobs at their defaults (policy_loss._TYPE_KNOB_NAMES; divergences = the epsilons, dro_beta 0 = None)
TYPE_KNOBS = [1.0, 1.05, 2.0, 3.0, 3.0, 2.0, 20.0, 0.2, 0.2, 0.0, 1.0]


def test_opcheck(gen, reference_backend):
    hidden, weight, bias, targets = _head(gen, 6, 8, 20, dtype=torch.float32)
    hidden.requires_grad_()
    weight.requires_grad_()
    mask = torch.tensor([True, False, True, True, False, True])
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(LP.linear_logprobs_fwd, (hidden, weight, targets, bias, mask, 0.9, True, 4, 8, False),
                          test_utils=utils)
    old, adv = torch.randn(2, 3, generator=gen) - 3, torch.randn(2, generator=gen)
    torch.library.opcheck(FL.fused_linear_policy_loss_fwd,
                          (hidden, weight, targets, bias, old, adv, mask.view(2, 3), None, None, None, 0.9, 0.2, 0.2,
                           None, 0.0, "k3", "token-mean", "token", "ppo", False, TYPE_KNOBS, 0.0, "token-mean", False,
                           3, False, True, True, False), test_utils=utils)
    sel = torch.tensor([[True, False, False], [False, False, True]])
    torch.library.opcheck(FL.fused_linear_policy_loss_fwd,
                          (hidden, weight, targets, bias, old, adv, mask.view(2, 3), None, sel, sel, 0.9, 0.2, 0.2,
                           None, 0.0, "k3", "seq-mean-token-mean", "token", "clip_cov", False, TYPE_KNOBS, 0.1,
                           "token-mean", True, 3, False, True, True, False), test_utils=utils)


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs_linear_logprobs(gen):
    hidden, weight, bias, targets = _head(gen, 4, 8, 20, dtype=torch.float32)
    cases = [
        ({"targets": torch.tensor([0, 1, 20, 3])}, "targets"),
        ({"targets": torch.tensor([0, -1, 2, 3])}, "targets"),
        ({"targets": targets.float()}, "targets"),
        ({"targets": targets[:3]}, "targets"),
        ({"hidden": hidden[None]}, "hidden"),
        ({"hidden": hidden.long()}, "hidden"),
        ({"weight": weight[:, :7]}, "weight"),
        ({"weight": weight.double()}, "weight"),
        ({"weight": weight.to("meta")}, "weight"),
        ({"bias": bias[:5]}, "bias"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"vocab_chunk_size": -3}, "vocab_chunk_size"),
        ({"accum_dtype": torch.float16}, "accum_dtype"),
    ]
    base = {"hidden": hidden, "weight": weight, "targets": targets, "bias": None}
    for change, name in cases:
        kw = dict(base, **change)
        with pytest.raises(ValueError, match=f"^{name}:"):
            linear_logprobs(kw.pop("hidden"), kw.pop("weight"), kw.pop("targets"), **kw)


def test_bad_inputs_fused_loss(gen):
    inputs = _loss_inputs(gen, 2, 4, 8, 30)
    base = {"hidden": inputs["hidden"].float(), "weight": inputs["weight"].float(), "targets": inputs["targets"],
                "old_logp": inputs["old_logp"].float(), "advantages": inputs["advantages"].float(), "mask": inputs["mask"]}
    bad_targets = inputs["targets"].clone()
    bad_targets[inputs["mask"]] = 30  # out of range where counted
    cases = [
        ({"targets": bad_targets}, "targets"),
        ({"targets": inputs["targets"][:, :3]}, "targets"),
        ({"hidden": base["hidden"][0]}, "hidden"),
        ({"old_logp": base["old_logp"][:1]}, "old_logp"),
        ({"advantages": base["advantages"][:1]}, "advantages"),
        ({"mask": base["mask"][:, :2]}, "mask"),
        ({"weight": base["weight"][:, :3]}, "weight"),
        ({"loss_agg_mode": "sum"}, "loss_agg_mode"),
        ({"beta": 0.1}, "ref_logp"),
        ({"importance_sampling_level": "token-ish"}, "importance_sampling_level"),
        ({"epsilon_low": 1.5}, "epsilon_low"),
        ({"temperature": -1.0}, "temperature"),
    ]
    for change, name in cases:
        kw = dict(base, **change)
        pos = [kw.pop(k) for k in ("hidden", "weight", "targets", "old_logp", "advantages", "mask")]
        with pytest.raises(ValueError, match=f"^{name}:"):
            fused_linear_policy_loss(*pos, **kw)
