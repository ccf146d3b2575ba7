"""PairUniGRPOTrainer against the real `trl.GRPOTrainer` (TRL from PyPI) on a tiny random Qwen2.

Both trainers load the same local checkpoint. Loss tests feed the very same generated batch to
stock TRL's `compute_loss` and to ours and compare loss, every parameter gradient and TRL's logged
metrics; off-policy old log-probs (and reference log-probs for the KL) are perturbed copies of the
model's own, so clipping, dual clipping and the KL all act. Advantage tests generate with the same
seed through both trainers and compare TRL's advantages with ours. One test runs a full
`trainer.train()` step both ways and compares the updated weights.
"""

from __future__ import annotations

import copy

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from pairuni_kernels import fused_linear_policy_loss
from pairuni_kernels.integrations.trl import LOSS_TYPE_TO_AGG_MODE, PairUniGRPOTrainer

NUM_PROMPTS = 4
NUM_GENERATIONS = 4
MAX_COMPLETION = 6


def _dataset():
    return Dataset.from_dict({
        "prompt": [f"w{i} w{i + 3} w{i + 7}" for i in range(NUM_PROMPTS)],
        "pair_weight": [1.0, 0.5, 0.25, 0.8],
    })


def _reward(completions, **_):
    """A reward that varies inside every group: weighted token ids of the completion text."""
    return [sum((j + 1) * int(w[1:]) for j, w in enumerate(c.split()) if w[1:].isdigit()) / 40.0
            for c in completions]


def _sometimes_unscorable(completions, **_):
    return [None if i % 5 == 0 else r for i, r in enumerate(_reward(completions))]


def _config(tmp_path, **overrides):
    kwargs = {"output_dir": str(tmp_path), "per_device_train_batch_size": NUM_PROMPTS * NUM_GENERATIONS,
                  "num_generations": NUM_GENERATIONS, "max_completion_length": MAX_COMPLETION, "max_steps": 1,
                  "report_to": "none", "use_cpu": True, "save_strategy": "no", "logging_steps": 1, "seed": 7,
                  "learning_rate": 0.05, "temperature": 0.9, "disable_dropout": True,
                  "bf16": False}  # fp32 end to end: TRL would autocast the CPU run to bf16
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def _pair(tiny_lm_dir, tok, tmp_path, reward=_reward, ours_kwargs=None, **overrides):
    """(stock TRL trainer, PairUni trainer), same checkpoint, same tokenizer, same config."""
    made = []
    for cls, extra in ((GRPOTrainer, {}), (PairUniGRPOTrainer, ours_kwargs or {})):
        made.append(cls(model=tiny_lm_dir, reward_funcs=reward, args=_config(tmp_path / cls.__name__, **overrides),
                        train_dataset=_dataset(), processing_class=tok, **extra))
    return made


def _generated_batch(trainer, seed=0):
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    torch.manual_seed(seed)
    return trainer._generate_and_score_completions(batch)


def _own_logps(trainer, inputs):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn,
                                                                 inputs["completion_ids"].size(1))
    return logps


def _loss_and_grads(trainer, inputs, accumulation):
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = accumulation
    for values in trainer._metrics.values():
        values.clear()
    loss = trainer.compute_loss(trainer.model, copy.copy(inputs))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


LOSS_CASES = [
    {"loss_type": "grpo"},
    {"loss_type": "bnpo", "epsilon_high": 0.28},
    {"loss_type": "dr_grpo"},
    {"loss_type": "dapo", "steps_per_generation": 2, "per_device_train_batch_size": 8},
    {"loss_type": "grpo", "importance_sampling_level": "sequence"},
    {"loss_type": "dapo", "delta": 1.6, "epsilon": 0.1},
    {"loss_type": "bnpo", "beta": 0.05, "use_bias_correction_kl": False},
    {"loss_type": "grpo", "top_entropy_quantile": 0.5, "off_policy_mask_threshold": 0.3},
]


@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_loss_and_gradients_match_stock_trl(tiny_lm_dir, tiny_tokenizer, tmp_path, case):
    stock, ours = _pair(tiny_lm_dir, tiny_tokenizer, tmp_path, **case)
    inputs = _generated_batch(stock)
    logps = _own_logps(stock, inputs)
    noise = torch.Generator().manual_seed(3)
    inputs["old_per_token_logps"] = logps + 0.6 * torch.randn(logps.shape, generator=noise)
    if case.get("beta"):
        inputs["ref_per_token_logps"] = logps + 0.3 * torch.randn(logps.shape, generator=noise)
    mask = inputs["completion_mask"]
    mask[1, 1:] = 0  # a short completion
    mask[2] = 0  # and an empty one (e.g. all tool output)
    assert mask.sum() > 20

    want_loss, want_grads, want_metrics = _loss_and_grads(stock, inputs, accumulation=2)
    got_loss, got_grads, got_metrics = _loss_and_grads(ours, inputs, accumulation=2)

    torch.testing.assert_close(got_loss, want_loss, rtol=2e-5, atol=1e-6)
    assert want_grads.keys() == got_grads.keys() and len(got_grads) > 10
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, rtol=1e-4, atol=1e-6, msg=name)
    assert sum(g.abs().sum() for g in got_grads.values()) > 0
    for key in ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "clip_ratio/low_min", "clip_ratio/high_max") + (("kl",) if case.get("beta") else ()):
        assert got_metrics[key] == pytest.approx(want_metrics[key], rel=1e-5, abs=1e-6), key
    assert want_metrics["clip_ratio/region_mean"] > 0  # the perturbation makes the clip act


@pytest.mark.parametrize("compute_entropy", [True, False])
def test_on_policy_step_without_old_logps(tiny_lm_dir, tiny_tokenizer, tmp_path, compute_entropy):
    """TRL's default (num_iterations=1): no old log-probs, ratio 1, gradient -A * grad logp."""
    stock, ours = _pair(tiny_lm_dir, tiny_tokenizer, tmp_path, loss_type="dapo",
                        ours_kwargs={"compute_entropy": compute_entropy})
    inputs = _generated_batch(stock)
    assert "old_per_token_logps" not in inputs
    want_loss, want_grads, _ = _loss_and_grads(stock, inputs, accumulation=1)
    got_loss, got_grads, got_metrics = _loss_and_grads(ours, inputs, accumulation=1)
    torch.testing.assert_close(got_loss, want_loss, rtol=2e-5, atol=1e-6)
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, rtol=1e-4, atol=1e-6, msg=name)
    assert ("entropy" in got_metrics) == compute_entropy


def test_loss_equals_fused_linear_policy_loss(tiny_lm_dir, tiny_tokenizer, tmp_path):
    """The subclass computes exactly `fused_linear_policy_loss` on the backbone's hidden states (bnpo = token-mean)."""
    _, ours = _pair(tiny_lm_dir, tiny_tokenizer, tmp_path, loss_type="bnpo")
    inputs = _generated_batch(ours)
    logps = _own_logps(ours, inputs)
    inputs["old_per_token_logps"] = logps + 0.5 * torch.randn(logps.shape, generator=torch.Generator().manual_seed(1))
    got, _, _ = _loss_and_grads(ours, inputs, accumulation=1)

    model = ours.model
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    t = inputs["completion_ids"].size(1)
    hidden = model.base_model(input_ids=ids, attention_mask=attn).last_hidden_state[:, -t - 1:-1]
    want = fused_linear_policy_loss(hidden, model.lm_head.weight, inputs["completion_ids"],
                                    inputs["old_per_token_logps"], inputs["advantages"], inputs["completion_mask"],
                                    temperature=ours.temperature, loss_agg_mode=LOSS_TYPE_TO_AGG_MODE["bnpo"])
    torch.testing.assert_close(got, want.loss.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none", True, False])
def test_advantages_match_stock_trl(tiny_lm_dir, tiny_tokenizer, tmp_path, scale_rewards):
    stock, ours = _pair(tiny_lm_dir, tiny_tokenizer, tmp_path, scale_rewards=scale_rewards)
    want = _generated_batch(stock, seed=11)
    got = _generated_batch(ours, seed=11)
    assert torch.equal(got["completion_ids"], want["completion_ids"])  # same samples, so the comparison means something
    assert want["advantages"].abs().max() > 0.1
    torch.testing.assert_close(got["advantages"], want["advantages"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale_rewards", ["group", "batch"])
def test_unscorable_completions_match_stock_trl(tiny_lm_dir, tiny_tokenizer, tmp_path, scale_rewards):
    stock, ours = _pair(tiny_lm_dir, tiny_tokenizer, tmp_path, reward=_sometimes_unscorable,
                        scale_rewards=scale_rewards)
    want = _generated_batch(stock, seed=5)
    got = _generated_batch(ours, seed=5)
    assert torch.equal(got["completion_ids"], want["completion_ids"])
    torch.testing.assert_close(got["advantages"], want["advantages"], rtol=1e-5, atol=1e-6)
    assert (got["advantages"][::5] == 0).all()


def test_weight_column_multiplies_advantages(tiny_lm_dir, tiny_tokenizer, tmp_path):
    """PairGRPO: a per-prompt weight column scales that prompt's advantages (stock TRL x weight)."""
    stock, ours = _pair(tiny_lm_dir, tiny_tokenizer, tmp_path, ours_kwargs={"weight_column": "pair_weight"})
    want = _generated_batch(stock, seed=2)
    got = _generated_batch(ours, seed=2)
    assert torch.equal(got["completion_ids"], want["completion_ids"])
    # RepeatSampler lists each prompt NUM_GENERATIONS times in a row; recover each row's prompt weight
    weights = torch.tensor(_dataset()["pair_weight"])
    prompt_of_row = [int(ids[-1]) for ids in want["prompt_ids"]]  # last prompt token w{i+7} -> id i + 9
    expected = want["advantages"] * weights[torch.tensor(prompt_of_row) - 9]
    torch.testing.assert_close(got["advantages"], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got["advantages"], want["advantages"])


def test_one_training_step_matches_stock_trl(tiny_lm_dir, tiny_tokenizer, tmp_path):
    """A real `trainer.train()` step both ways: same samples, same loss, same updated weights."""
    stock, ours = _pair(tiny_lm_dir, tiny_tokenizer, tmp_path, loss_type="grpo", optim="sgd", learning_rate=0.5)
    before = {n: p.detach().clone() for n, p in stock.model.named_parameters()}
    for trainer in (stock, ours):
        torch.manual_seed(123)  # the same sampling stream for both runs
        trainer.train()
    want_log, got_log = stock.state.log_history[0], ours.state.log_history[0]
    assert got_log["loss"] == pytest.approx(want_log["loss"], rel=1e-4, abs=1e-6)
    assert got_log["reward"] == pytest.approx(want_log["reward"], rel=1e-6)  # same completions were sampled
    moved = 0.0
    for (name, p_stock), (_, p_ours) in zip(stock.model.named_parameters(), ours.model.named_parameters()):
        torch.testing.assert_close(p_ours.detach(), p_stock.detach(), rtol=1e-4, atol=1e-6, msg=name)
        moved += (p_stock.detach() - before[name]).abs().sum().item()
    assert moved > 0


@pytest.mark.parametrize("overrides, match", [
    ({"loss_type": "cispo"}, "loss_type"),
    ({"entropy_coef": 0.01}, "entropy"),
    ({"beta": 0.1}, "use_bias_correction_kl"),
    ({"delta": 1.1, "epsilon": 0.2}, "delta"),
])
def test_unsupported_settings_are_refused(tiny_lm_dir, tiny_tokenizer, tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        PairUniGRPOTrainer(model=tiny_lm_dir, reward_funcs=_reward, args=_config(tmp_path, **overrides),
                           train_dataset=_dataset(), processing_class=tiny_tokenizer)


def test_generation_still_works_after_patching(tiny_lm_dir, tiny_tokenizer, tmp_path):
    _, ours = _pair(tiny_lm_dir, tiny_tokenizer, tmp_path)
    out = ours.model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6)
