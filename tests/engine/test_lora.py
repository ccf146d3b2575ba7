"""LoRA (engine/lora.py): only adapters train, the fused losses see the adapted heads exactly as a merged
model's, the merged model equals the adapted one, resume is exact, and bad settings fail before a model loads."""

from __future__ import annotations

import pytest
import torch

from engine import lora
from engine import model as janus
from engine.config import ConfigError, load_config
from engine.trainer import PairGRPOTrainer

ALL_TARGETS = "[attention,mlp,generation_head,lm_head]"


@pytest.fixture
def make_trainer(toy_world, tiny_overrides):
    def make(run_dir, **extra):
        extra = {"model.lora.rank": 4, "model.lora.alpha": 8, **extra}
        return PairGRPOTrainer.from_config(load_config(None, tiny_overrides(toy_world, run_dir, **extra)))
    return make


def _randomize_adapters(model, seed: int) -> None:
    """B = 0 at start makes an adapter invisible; fresh random A and B make every check able to fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.adapter_state(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _metrics(step: dict) -> dict:
    return {k: v for k, v in step.items() if not k.startswith("time.")}


def test_lora_training_moves_only_the_adapters(tmp_path, make_trainer):
    tr = make_trainer(tmp_path, **{"model.dtype": "bfloat16", "optim.lr": 1e-2})
    trainable = {n for n, p in tr.model.named_parameters() if p.requires_grad}
    assert trainable == set(lora.adapter_state(tr.model)) and trainable
    assert all(p.dtype == torch.float32 for p in lora.adapter_state(tr.model).values())
    names = {n.split(".lora_")[0] for n in trainable}
    assert "model.generation_head.vision_head" in names and "model.language_model.layers.1.mlp.down_proj" in names
    assert "lm_head" not in names  # not in the default targets
    base = {n: p.detach().clone() for n, p in tr.model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in lora.adapter_state(tr.model).items()}
    for _ in range(2):
        tr.train_step()
    for n, p in tr.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base[n]), f"{n}: a frozen base weight moved"
    moved = [n for n, p in lora.adapter_state(tr.model).items() if not torch.equal(p, adapters[n])]
    assert len(moved) == len(adapters)  # every A and B got a gradient (B = 0 at start, A through B's step)


def test_fused_losses_and_gradients_equal_an_explicitly_merged_model(tmp_path, make_trainer):
    """The loss on adapted heads (extra input features, `lora.linear_operands`) equals the loss of the model
    with W + s B A written into its weights; the adapters' gradients are the chain rule through the merged
    weight: dB = s G A^T, dA = s B^T G with G the merged weight's gradient."""
    tr = make_trainer(tmp_path, **{"model.lora.targets": ALL_TARGETS})
    _randomize_adapters(tr.model, 0)
    batch = tr.make_batch(1, tr.sampler.next())
    adapted = tr.model
    merged = lora.merged_model(adapted)
    layers = {n: m for n, m in adapted.named_modules() if lora.is_adapted(m)}
    assert {"lm_head", "model.generation_head.vision_head", "model.generation_head.proj_out"} <= set(layers)
    for name in layers:
        merged.get_submodule(name).weight.requires_grad_(True)
    rows = slice(0, len(batch.und.response_ids))
    for task, _ in tr.tasks():
        adapted.zero_grad()
        merged.zero_grad()
        out = tr.task_loss(task, batch, rows)
        out.loss.backward()
        tr.model = merged
        try:
            ref = tr.task_loss(task, batch, rows)
        finally:
            tr.model = adapted
        ref.loss.backward()
        assert float(out.loss.detach()) == pytest.approx(float(ref.loss.detach()), rel=1e-5, abs=1e-7)
        checked = 0
        for name, layer in layers.items():
            g = merged.get_submodule(name).weight.grad
            if g is None or not bool(g.ne(0).any()):
                continue
            a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
            torch.testing.assert_close(b.grad, s * g @ a.detach().T, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(a.grad, s * b.detach().T @ g, rtol=1e-4, atol=1e-6)
            checked += 1
        head = "lm_head" if task == "understanding" else "model.generation_head.vision_head"
        assert merged.get_submodule(head).weight.grad is not None and checked >= 8, (task, checked)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_merged_model_equals_the_adapted_model(tiny, dtype, tol):
    """A plain JanusForConditionalGeneration (no peft layers) whose text logits and image logits equal the
    adapted model's; bf16: both round differently (W + sBA stored in bf16), so within bf16 noise."""
    from transformers import JanusForConditionalGeneration

    from engine.config import LoraConfig

    fresh_keys = set(tiny.state_dict())
    model = tiny.to(dtype)
    lora.add_adapters(model, LoraConfig(rank=3, alpha=6.0, targets=["attention", "mlp", "generation_head", "lm_head"]))
    _randomize_adapters(model, 1)
    merged = lora.merged_model(model)
    assert type(merged) is JanusForConditionalGeneration and set(merged.state_dict()) == fresh_keys
    assert not any(lora.is_adapted(m) for m in merged.modules())
    assert all(p.dtype == dtype for p in merged.parameters())
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(6, 96, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    outs = []
    for m in (model, merged):
        h = janus.policy_hidden(m, m.get_input_embeddings()(ids), mask, janus.positions_from_mask(mask))
        x, w, b = janus.image_head_operands(m, janus.image_head_input(m, h))
        outs.append(tuple(t.detach().float() for t in (janus.text_logits(m, h), torch.nn.functional.linear(x, w, b),
                                                       m.model.generation_head(h))))
    for got, want in zip(*outs):
        scale = float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=0, atol=tol * scale)
    torch.testing.assert_close(outs[0][1], outs[0][2], rtol=0, atol=tol * float(outs[0][2].abs().max()))
    # the adapters matter: the base model's logits differ by far more than the tolerance
    base_logits = torch.nn.functional.linear(h, tiny.lm_head.get_base_layer().weight).detach().float()
    assert float((base_logits - outs[1][0]).abs().max()) > 10 * tol * float(outs[1][0].abs().max())


def test_adapted_head_refuses_the_plain_head_accessor(tiny):
    from engine.config import LoraConfig

    lora.add_adapters(tiny, LoraConfig(rank=2, targets=["lm_head"]))
    with pytest.raises(ValueError, match="text_head_operands"):
        janus.text_head(tiny)
    assert janus.image_head(tiny)[0].shape[0] == tiny.config.vq_config.num_embeddings


def test_lora_resumes_exactly_and_checkpoints_only_adapters(tmp_path, make_trainer):
    from safetensors.torch import load_file

    extra = {"model.dtype": "bfloat16", "algo.mu": 1, "optim.lr": 1e-3}
    tr = make_trainer(tmp_path, **extra)
    tr.train_step()
    path = tr.save()
    assert set(load_file(str(path / "policy.safetensors"))) == set(lora.adapter_state(tr.model))
    fresh = make_trainer(tmp_path, **extra, **{"train.resume": True})
    assert fresh.maybe_resume()
    for n, p in lora.adapter_state(fresh.model).items():
        assert torch.equal(p, lora.adapter_state(tr.model)[n])
    for _ in range(2):
        assert _metrics(tr.train_step()) == _metrics(fresh.train_step())
    for n, p in fresh.model.state_dict().items():
        assert torch.equal(p, tr.model.state_dict()[n]), n


@pytest.mark.parametrize("override,match", [
    ("model.lora.rank=-1", "model.lora.rank"), ("model.lora.alpha=0", "model.lora.alpha"),
    ("model.lora.dropout=1.0", "model.lora.dropout"), ("model.lora.targets=[attention,qkv]", "model.lora.targets"),
    ("model.lora.targets=[]", "model.lora.targets"), ("model.lora.quantize=int3", "model.lora.quantize"),
])
def test_bad_lora_values_are_config_errors(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["model.lora.rank=4", f"train.run_dir={tmp_path}", override])


def test_lora_config_errors_name_the_conflict(tmp_path):
    run = f"train.run_dir={tmp_path}"
    with pytest.raises(ConfigError, match="model.lora.quantize.*CUDA"):
        load_config(None, [run, "model.lora.rank=4", "model.lora.quantize=nf4", "model.dtype=bfloat16",
                           "train.device=cpu"])
    with pytest.raises(ConfigError, match="model.lora.quantize: expected none while model.lora.rank is 0"):
        load_config(None, [run, "model.lora.quantize=nf4"])
    with pytest.raises(ConfigError, match="model.train_modules"):
        load_config(None, [run, "model.lora.rank=4", "model.train_modules=[lm_head]"])
    with pytest.raises(ConfigError, match="optim.update"):
        load_config(None, [run, "model.lora.rank=4", "model.dtype=bfloat16", "optim.update=kahan"])


def test_nf4_layers_are_the_projections_the_planner_counts(tiny):
    """On CPU the layers are swapped but not quantized (that happens on the move to CUDA, which the GPU
    session's lora_4bit stage runs): exactly the language model's projections, same weights, heads untouched,
    and peft wraps them with its bitsandbytes LoRA layer."""
    import re

    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from engine.config import LoraConfig
    from engine.janus_shapes import linear_shapes

    model = tiny.to(torch.bfloat16)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    lora.nf4_layers(model)
    swapped = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    planned = {n for n in linear_shapes(model.config) if re.fullmatch(lora.QUANTIZED_PROJECTIONS, n)}
    assert swapped == planned and len(swapped) == 7 * model.config.text_config.num_hidden_layers
    for n in swapped:
        assert torch.equal(model.get_submodule(n).weight.data, before[n])
    lora.add_adapters(model, LoraConfig(rank=4))
    assert all(isinstance(model.get_submodule(n), LoraLinear4bit) for n in swapped)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    with pytest.raises(ValueError, match="nf4: needs a CUDA device"):
        lora.quantize_nf4(model, torch.device("cpu"))


def test_saved_adapter_loads_back_into_a_fresh_model(tmp_path, tiny):
    """The folder is what peft writes: `peft.PeftModel.from_pretrained` on a fresh base gets every adapter weight
    (a silently missing key would leave B = 0), and nothing but adapters is saved, even with lm_head adapted."""
    import peft
    from safetensors.torch import load_file

    from engine.config import LoraConfig

    settings = LoraConfig(rank=3, alpha=6.0, targets=["attention", "generation_head", "lm_head"])
    lora.add_adapters(tiny, settings)
    _randomize_adapters(tiny, 4)
    lora.save_adapter(tiny, tmp_path / "adapter", base_model="some/base")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(n.startswith(lora.PEFT_PREFIX) and (".lora_A." in n or ".lora_B." in n) for n in saved)
    loaded = peft.PeftModel.from_pretrained(janus.tiny_janus(96, seed=3), str(tmp_path / "adapter"))
    assert loaded.peft_config["default"].base_model_name_or_path == "some/base"
    want = lora.adapter_state(tiny)
    got = {n.removeprefix(lora.PEFT_PREFIX): p for n, p in lora.adapter_state(loaded).items()}
    assert set(got) == set(want)
    for n, p in got.items():
        assert torch.equal(p, want[n]), n
    with pytest.raises(ValueError, match="no LoRA adapter"):
        lora.save_adapter(janus.tiny_janus(96), tmp_path / "none")


def test_merge_after_a_cpu_nf4_forward_reads_the_repacked_weight(tiny):
    """bitsandbytes' CPU kernel (AVX512-BF16, eval, no grad) repacks a 4-bit weight on its first forward, with
    bf16 block scales; `merged_model` then unpacks it as bitsandbytes' state_dict does. Equal to the merge before
    the forward up to the bf16 rounding of the block scales (relative 2^-9, 1% allowed); without the unpacking the
    dequantized bits are in the wrong order (errors of the weights' own size)."""
    from engine.config import LoraConfig

    model = lora.nf4_layers(tiny).to("cpu")
    lora.add_adapters(model, LoraConfig(rank=2))
    _randomize_adapters(model, 5)
    model.eval()
    before = lora.merged_model(model).state_dict()
    ids = torch.randint(6, 96, (2, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    state = model.get_submodule("model.language_model.layers.0.self_attn.q_proj").get_base_layer().weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        pytest.skip("this CPU / bitsandbytes does not repack 4-bit weights")
    after = lora.merged_model(model).state_dict()
    for name, want in before.items():
        assert float((after[name] - want).abs().max()) <= 1e-2 * float(want.abs().max()), name
