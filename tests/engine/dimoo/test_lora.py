"""LoRA on the DiMOO network (engine/dimoo/lora.py), checked on tiny models against plain re-computations:
W + (alpha / r) B A written by hand into a copy of the base, the base itself at init, per-row runs for padding."""

import copy

import pytest
import torch
import torch.nn.functional as F

from engine.dimoo.lora import (
    adapter_state,
    apply_lora,
    has_adapters,
    load_adapter_state,
    merged_model,
    trainable_parameters,
)
from engine.dimoo.model import DimooModel, DimooOutput, released_parameter_names, tiny_dimoo

torch.set_num_threads(1)

ALL = ("attention", "mlp", "generation_head")
BLOCK = {"attention": ("q_proj", "k_proj", "v_proj", "attn_out"), "mlp": ("ff_proj", "up_proj", "ff_out")}


def base_model(dtype=torch.float32, seed=0):
    """Tiny DiMOO with grouped KV heads (k/v narrower than q), so every projection has its own shape."""
    return tiny_dimoo(seed=seed, n_kv_heads=2).to(dtype)


def expected_layers(model, targets):
    """Module names the targets must adapt, written out from the released names (not from TARGETS)."""
    names = set()
    for t in targets:
        if t in BLOCK:
            names |= {f"model.transformer.blocks.{i}.{p}" for i in range(model.config.n_layers) for p in BLOCK[t]}
        else:
            names.add("model.transformer.ff_out")
    return names


def batch(model, seed=0, b=3, length=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_rows, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    return ids, mask


@torch.no_grad()
def perturb(model, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    for _, p in trainable_parameters(model):
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)


def by_hand(base, adapted, rank, alpha):
    """A copy of `base` with W += (alpha / rank) * B @ A for every adapter in `adapted` (from its state)."""
    ref, state = copy.deepcopy(base), adapter_state(adapted)
    layers = {n.rsplit(".lora_", 1)[0] for n in state}
    with torch.no_grad():
        for name in layers:
            w = ref.get_submodule(name).weight
            w += (alpha / rank) * (state[f"{name}.lora_B.weight"] @ state[f"{name}.lora_A.weight"]).to(w.dtype)
    return ref, layers


def test_init_equals_base_exactly():
    base = base_model()
    model = apply_lora(copy.deepcopy(base), rank=4, alpha=8.0, targets=ALL + ("lm_head",))
    assert has_adapters(model) and not has_adapters(base) and isinstance(model, DimooModel)
    ids, mask = batch(base)
    with torch.no_grad():
        want, got = base(ids, mask, return_hidden=True), model(ids, mask, return_hidden=True)
    assert isinstance(got, DimooOutput)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.hidden, want.hidden)
    sl = model.ids.image_slice
    assert torch.equal(model.head_weight(sl), base.head_weight(sl))
    assert model.config == base.config and model.ids == base.ids
    # the released names of the base are all still there, holding the same tensors
    state = model.state_dict()
    for name in released_parameter_names(base.config.n_layers):
        assert torch.equal(state[name], base.state_dict()[name])


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("targets", [("attention",), ("mlp",), ("generation_head",), ("attention", "mlp", "lm_head")])
def test_adapted_equals_w_plus_sba(targets, dtype, tol):
    rank, alpha = 3, 5.0
    base = base_model(dtype)
    model = apply_lora(copy.deepcopy(base), rank=rank, alpha=alpha, targets=targets)
    perturb(model)
    ref, layers = by_hand(base, model, rank, alpha)
    assert layers == expected_layers(base, targets)
    ids, mask = batch(base)
    with torch.no_grad():
        got, want, plain = model(ids, mask).logits, ref(ids, mask).logits, base(ids, mask).logits
    scale = want.abs().max()
    assert (got - plain).abs().max() > 100 * tol * scale  # the adapters matter at this size
    torch.testing.assert_close(got, want, rtol=0, atol=tol * scale)
    sl = model.ids.image_slice
    with torch.no_grad():
        got_img = model(ids, mask, vocab=sl).logits
    torch.testing.assert_close(got_img, want[..., sl], rtol=0, atol=tol * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_head_weight_is_w_plus_sba_exactly(dtype):
    rank, alpha = 4, 16.0
    model = apply_lora(base_model(dtype), rank=rank, alpha=alpha, targets=("generation_head",))
    perturb(model)
    st = adapter_state(model)
    a, b = st["model.transformer.ff_out.lora_A.weight"], st["model.transformer.ff_out.lora_B.weight"]
    w = model.state_dict()["model.transformer.ff_out.weight"]
    for sl in (model.ids.image_slice, slice(3, 40), None):
        rows = slice(None) if sl is None else sl
        with torch.no_grad():
            got = model.head_weight(sl)
        assert got.dtype == dtype and torch.equal(got, w[rows] + (alpha / rank) * (b[rows] @ a))
    h = torch.randn(2, 5, model.config.d_model, dtype=dtype)
    with torch.no_grad():
        sl = model.ids.image_slice
        assert torch.equal(model.logits(h, sl), F.linear(h, model.head_weight(sl)))


def test_bf16_base_keeps_fp32_adapters():
    model = apply_lora(base_model(torch.bfloat16), rank=2, targets=ALL)
    assert {p.dtype for _, p in trainable_parameters(model)} == {torch.float32}
    perturb(model)
    ids, mask = batch(model)
    with torch.no_grad():
        out = model(ids, mask, vocab=model.ids.image_slice).logits
    assert out.dtype == torch.bfloat16 and model.head_weight().dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_merged_model_equals_adapted(tmp_path):
    rank, alpha = 4, 16.0
    model = apply_lora(base_model(), rank=rank, alpha=alpha, targets=ALL)
    perturb(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_model(model)
    assert type(merged) is DimooModel and not has_adapters(merged)
    assert sorted(merged.state_dict()) == released_parameter_names(model.config.n_layers)
    assert merged.config == model.config and next(merged.parameters()).dtype == torch.float32
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # model left unchanged
    ids, mask = batch(model)
    with torch.no_grad():
        got, want = merged(ids, mask).logits, model(ids, mask).logits
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * want.abs().max())
    merged.save_pretrained(tmp_path / "m")
    again = DimooModel.from_pretrained(tmp_path / "m", dtype="float32", attn_backend="sdpa",
                                      codebook_size=merged.config.codebook_size)
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in again.state_dict().items())
    inplace = merged_model(copy.deepcopy(model), inplace=True)
    assert type(inplace) is DimooModel and not has_adapters(inplace)
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in inplace.state_dict().items())


def test_only_adapters_train():
    model = apply_lora(base_model(), rank=4, targets=ALL)
    perturb(model)  # B != 0, so A gets a gradient too
    names = {n for n, _ in trainable_parameters(model)}
    assert names == set(adapter_state(model)) and all(".lora_" in n for n in names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == names
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for _, p in trainable_parameters(model)], lr=1e-2, weight_decay=0.0)
    model.train()
    ids, mask = batch(model)
    h = model.hidden_states(ids, mask)
    logp = torch.log_softmax(model.logits(h, model.ids.image_slice).float(), -1)
    loss = -logp[..., 0].mean()
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in names:
            assert not torch.equal(p, before[n]), n
        else:
            assert p.grad is None and torch.equal(p, before[n]), n


def test_adapter_state_round_trip_and_refusals():
    rank, alpha = 4, 16.0
    model = apply_lora(base_model(), rank=rank, alpha=alpha, targets=ALL)
    perturb(model)
    state = adapter_state(model)
    assert set(state) == {n for n, _ in trainable_parameters(model)}
    first, param = next(iter(trainable_parameters(model)))
    with torch.no_grad():
        param.add_(1.0)  # the state is a copy, not an alias
        assert not torch.equal(state[first], param)
        param.copy_(state[first])
    torch.manual_seed(123)  # another A init in the fresh model
    fresh = apply_lora(base_model(), rank=rank, alpha=alpha, targets=ALL)
    load_adapter_state(fresh, state)
    assert all(torch.equal(v, state[k]) for k, v in adapter_state(fresh).items())
    ids, mask = batch(model)
    with torch.no_grad():
        assert torch.equal(fresh(ids, mask).logits, model(ids, mask).logits)
    kept = adapter_state(fresh)
    wrong_rank = adapter_state(apply_lora(base_model(), rank=rank + 1, alpha=alpha, targets=ALL))
    bad = {
        "shape": wrong_rank,
        "dtype": {k: v.double() for k, v in state.items()},
        "missing": {k: v for k, v in state.items() if "blocks.1.q_proj" not in k},
        "unexpected": {**state, "model.transformer.blocks.0.q_proj.lora_C.weight": torch.zeros(1)},
    }
    for what, tensors in bad.items():
        with pytest.raises(ValueError, match=r"^tensors: .*" + ("rank" if what == "shape" else what)) as e:
            load_adapter_state(fresh, tensors)
        assert "\n" not in str(e.value)
    assert all(torch.equal(v, kept[k]) for k, v in adapter_state(fresh).items())  # refusals change nothing
    with pytest.raises(ValueError, match="^model: "):
        load_adapter_state(base_model(), state)


@pytest.mark.parametrize("kwargs,arg", [
    ({"rank": 0}, "rank"), ({"rank": 2.0}, "rank"), ({"rank": True}, "rank"),
    ({"rank": 2, "alpha": 0.0}, "alpha"), ({"rank": 2, "alpha": float("nan")}, "alpha"),
    ({"rank": 2, "dropout": 1.0}, "dropout"), ({"rank": 2, "dropout": -0.1}, "dropout"),
    ({"rank": 2, "targets": ()}, "targets"), ({"rank": 2, "targets": "attention"}, "targets"),
    ({"rank": 2, "targets": ("attention", "vision")}, "targets"),
    ({"rank": 2, "targets": ("mlp", "mlp")}, "targets"),
    ({"rank": 2, "quantize": "int8"}, "quantize"), ({"rank": 2, "quantize": "nf4"}, "quantize"),
])
def test_bad_arguments_refused(kwargs, arg):
    model = base_model()
    with pytest.raises(ValueError, match=f"^{arg}: ") as e:
        apply_lora(model, **kwargs)
    assert "\n" not in str(e.value) and not has_adapters(model)
    assert all(p.requires_grad for p in model.parameters())  # refused before touching the model


def test_bad_models_refused():
    with pytest.raises(ValueError, match="^model: "):
        apply_lora(torch.nn.Linear(2, 2), rank=2)
    model = apply_lora(base_model(), rank=2)
    with pytest.raises(ValueError, match="^model: already"):
        apply_lora(model, rank=2)


def test_padding_mask_holds_with_adapters():
    model = apply_lora(base_model(torch.float64), rank=4, dropout=0.3, targets=ALL)  # eval, as its base
    perturb(model)
    ids, mask = batch(model)
    with torch.no_grad():
        full = model(ids, mask).logits
        other = ids.clone()
        other[mask == 0] = (other[mask == 0] + 17) % model.config.vocab_rows  # other padding tokens
        again = model(other, mask).logits
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            alone = model(ids[row:row + 1, :n]).logits[0]
            torch.testing.assert_close(full[row, :n], alone, rtol=0, atol=1e-12)
            torch.testing.assert_close(again[row, :n], alone, rtol=0, atol=1e-12)


def test_dropout_follows_train_eval():
    torch.manual_seed(0)
    a = apply_lora(base_model(), rank=4, dropout=0.5, targets=ALL)
    torch.manual_seed(0)
    b = apply_lora(base_model(), rank=4, dropout=0.0, targets=ALL)
    perturb(a)
    perturb(b)
    ids, mask = batch(a)
    assert not any(m.training for m in a.modules())  # the adapters took the eval mode of tiny_dimoo's model
    with torch.no_grad():
        assert torch.equal(a(ids, mask).logits, b(ids, mask).logits)  # eval: no dropout
        a.train()
        assert not torch.equal(a(ids, mask).logits, b(ids, mask).logits)
    assert all(m.training for m in a.modules())
    a.eval()
    assert not any(m.training for m in a.modules())


def test_gradient_checkpointing_same_grads():
    model = apply_lora(base_model(torch.float64), rank=2, targets=ALL)
    perturb(model)
    model.train()
    ids, mask = batch(model)
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad(set_to_none=True)
        model(ids, mask).logits.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in trainable_parameters(model)})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-10, atol=1e-14)


def test_fused_policy_loss_sees_the_adapted_head():
    """The fused linear loss on (hidden_states, head_weight(image_slice)) gives the adapters the gradients of the
    unfused loss on a head written by hand as W[slice] + s B[slice] @ A."""
    import pairuni_kernels as pk

    rank, alpha = 4, 16.0
    model = apply_lora(base_model(torch.float64), rank=rank, alpha=alpha, targets=ALL)
    perturb(model)
    sl, ids_, mask = model.ids.image_slice, *batch(model)
    g = torch.Generator().manual_seed(5)
    targets = torch.randint(0, model.config.codebook_size, ids_.shape, generator=g)
    adv = torch.randn(ids_.shape[0], generator=g, dtype=torch.float64)
    head = model.model.transformer.ff_out

    def grads(fused):
        model.zero_grad(set_to_none=True)
        h = model.hidden_states(ids_, mask)
        if fused:
            w = model.head_weight(sl)
        else:
            w = head.weight[sl] + (alpha / rank) * (head.lora_B.weight[sl] @ head.lora_A.weight)
        logp = torch.log_softmax(F.linear(h.detach(), w.detach()), -1).gather(-1, targets[..., None])[..., 0]
        old = logp + 0.1 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(6), dtype=logp.dtype)
        if fused:
            out = pk.fused_linear_policy_loss(h, w, targets, old, adv, mask.bool())
        else:
            logp = torch.log_softmax(F.linear(h, w), -1).gather(-1, targets[..., None])[..., 0]
            out = pk.clipped_policy_loss(logp, old, adv, mask.bool())
        out.loss.backward()
        return {n: p.grad.clone() for n, p in trainable_parameters(model)}

    fused, plain = grads(True), grads(False)
    assert fused["model.transformer.ff_out.lora_B.weight"].abs().max() > 0
    for n, gr in plain.items():
        torch.testing.assert_close(fused[n], gr, rtol=1e-9, atol=1e-12)
