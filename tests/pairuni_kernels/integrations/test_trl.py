"""PairUniGRPOTrainer against the real `trl.GRPOTrainer` (TRL from PyPI) on tiny random models.

Both trainers load the same local checkpoint (a Qwen2; a Mixtral for the MoE load-balancing loss, a
Granite for logit scaling, a Gemma2 for the soft-capping fallback). Loss tests feed the very same
generated batch to stock TRL's `compute_loss` and to ours and compare loss, every parameter gradient and
every metric TRL's loss logs, for every TRL loss type x importance-sampling level x entropy option, and
for the KL (with and without the ratio correction), delta, the off-policy mask, vLLM importance weights,
eval mode and the Triton kernels; off-policy old log-probs (and reference log-probs for the KL) are
perturbed copies of the model's own, so clipping, caps, the KL and the masks all act. Advantage tests
generate with the same seed through both trainers and compare TRL's advantages with ours. Training tests
run `trainer.train()` both ways and compare the updated weights and the adaptive-entropy controller.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from pairuni_kernels import fused_linear_policy_loss
from pairuni_kernels.integrations.trl import LOSS_TYPE_TO_AGG_MODE, PairUniGRPOTrainer, trl_policy_loss

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


def _length_reward(completions, **_):
    """A second objective on another scale: the completion's word count, unscored (None) for every third."""
    return [None if i % 3 == 0 else float(len(c.split())) for i, c in enumerate(completions)]


def _high_words(completions, **_):
    return [float(sum(int(w[1:]) > 15 for w in c.split() if w[1:].isdigit())) for c in completions]


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


def _loss_and_grads(trainer, inputs, accumulation, train=True):
    trainer.model.train(train)
    trainer.model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = accumulation
    for values in trainer._metrics.values():
        values.clear()
    loss = trainer.compute_loss(trainer.model, copy.copy(inputs))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train" if train else "eval"].items()}
    return loss.detach(), grads, metrics


def _perturbed_batch(stock, case, seed=3):
    """A generated batch made off-policy: old (and reference) log-probs are noisy copies of the model's own, so
    clipping, caps, the KL and the masks all act; one completion is cut short and one is empty."""
    inputs = _generated_batch(stock)
    logps = _own_logps(stock, inputs)
    noise = torch.Generator().manual_seed(seed)
    inputs["old_per_token_logps"] = logps + 0.6 * torch.randn(logps.shape, generator=noise)
    if case.get("beta"):
        inputs["ref_per_token_logps"] = logps + 0.3 * torch.randn(logps.shape, generator=noise)
    mask = inputs["completion_mask"]
    mask[1, 1:] = 0  # a short completion
    mask[2] = 0  # and an empty one (e.g. all tool output)
    assert mask.sum() > 20
    return inputs


def _assert_same_step(stock, ours, inputs, accumulation=2, train=True):
    """Loss, every parameter gradient and every metric TRL's loss logs agree (fp32 tolerances)."""
    want_loss, want_grads, want_metrics = _loss_and_grads(stock, inputs, accumulation, train)
    got_loss, got_grads, got_metrics = _loss_and_grads(ours, inputs, accumulation, train)
    torch.testing.assert_close(got_loss, want_loss, rtol=2e-5, atol=1e-6)
    assert want_grads.keys() == got_grads.keys() and len(got_grads) > 10
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, rtol=1e-4, atol=1e-6, msg=name)
    assert sum(g.abs().sum() for g in got_grads.values()) > 0
    assert got_metrics.keys() == want_metrics.keys()
    for key, want in want_metrics.items():
        assert got_metrics[key] == pytest.approx(want, rel=1e-5, abs=1e-6), key
    return want_metrics


TRL_LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo"]
#: per loss type: settings under which its clip / cap / weighting visibly acts on the perturbed batch
TYPE_SETTINGS = {"cispo": {"epsilon_high": 1.1}, "bnpo": {"epsilon_high": 0.28}}
ENTROPY_OPTIONS = {
    "plain": {},
    "top_entropy": {"top_entropy_quantile": 0.5},
    "bonus": {"entropy_coef": 0.3},
    "adaptive": {"use_adaptive_entropy": True, "entropy_coef": 0.2, "entropy_target": 50.0,
                 "entropy_coef_delta": 0.05},
}


def _prime_adaptive(*trainers):
    """The controller applies its coefficient once the last step's entropy was at or below the target."""
    for trainer in trainers:
        trainer._last_world_entropy = 1.0


@pytest.mark.parametrize("entropy", ENTROPY_OPTIONS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_loss_types_match_stock_trl(tiny_lm_dir, tiny_tokenizer, tmp_path, loss_type, level, entropy):
    """Every TRL loss type x importance-sampling level x entropy option: loss, gradients and metrics of TRL's."""
    case = {"loss_type": loss_type, "importance_sampling_level": level, **TYPE_SETTINGS.get(loss_type, {}),
            **ENTROPY_OPTIONS[entropy]}
    stock, ours = _pair(tiny_lm_dir, tiny_tokenizer, tmp_path, **case)
    assert ours._fallback_reason is None
    _prime_adaptive(stock, ours)
    metrics = _assert_same_step(stock, ours, _perturbed_batch(stock, case))
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        assert metrics["clip_ratio/region_mean"] > 0  # the perturbation makes the clip act
    if loss_type == "cispo":
        assert metrics["cispo_clip_ratio"] > 0
    if entropy in ("bonus", "adaptive"):
        assert metrics["entropy_coef"] > 0 and metrics["policy_loss"] != 0
    if entropy == "adaptive":  # the controller moved as TRL's did
        assert ours.entropy_coef == pytest.approx(stock.entropy_coef) and ours.entropy_coef != 0.2
        assert ours._last_world_entropy == pytest.approx(stock._last_world_entropy, rel=1e-6)


LOSS_CASES = [
    {"loss_type": "dapo", "steps_per_generation": 2, "per_device_train_batch_size": 8},
    {"loss_type": "dapo", "delta": 1.6, "epsilon": 0.1},  # delta > 1 + epsilon_high: a plain dual clip
    {"loss_type": "grpo", "delta": 1.1, "epsilon_high": 0.28},  # delta inside the clip range
    {"loss_type": "luspo", "importance_sampling_level": "sequence", "delta": 1.0},
    {"loss_type": "bnpo", "beta": 0.05, "use_bias_correction_kl": False},
    {"loss_type": "bnpo", "beta": 0.05},  # use_bias_correction_kl=True, TRL's default
    {"loss_type": "grpo", "beta": 0.05, "importance_sampling_level": "sequence"},
    {"loss_type": "cispo", "beta": 0.05, "epsilon_high": 1.1, "importance_sampling_level": "sequence"},
    {"loss_type": "sapo", "beta": 0.05, "sapo_temperature_pos": 0.7, "sapo_temperature_neg": 2.0},
    {"loss_type": "vespo", "beta": 0.05},
    {"loss_type": "vespo", "beta": 0.05, "importance_sampling_level": "sequence"},  # KL x the sequence ratio
    {"loss_type": "vespo", "vespo_k_pos": 1.5, "vespo_lambda_neg": 1.0},
    {"loss_type": "vespo", "vespo_k_neg": -0.5, "vespo_lambda_pos": -1.0},  # phi from TRL; lambda floored
    {"loss_type": "grpo", "top_entropy_quantile": 0.5, "off_policy_mask_threshold": 0.3},
    {"loss_type": "sapo", "off_policy_mask_threshold": 0.1, "importance_sampling_level": "sequence"},
    {"loss_type": "vespo", "off_policy_mask_threshold": 0.1, "top_entropy_quantile": 0.7},
    {"loss_type": "luspo", "epsilon": 1.5},  # a lower clip bound below 0 never acts
    {"loss_type": "grpo", "sapo_temperature_neg": -1.0, "vespo_k_pos": -1.0},  # other types' knobs are unused
    {"loss_type": "dapo", "top_entropy_quantile": 0.6, "entropy_coef": 0.3, "beta": 0.05},
    {"loss_type": "cispo", "epsilon_high": 1.1, "use_adaptive_entropy": True, "entropy_target": 50.0,
     "top_entropy_quantile": 0.8},
]


@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_loss_and_gradients_match_stock_trl(tiny_lm_dir, tiny_tokenizer, tmp_path, case):
    stock, ours = _pair(tiny_lm_dir, tiny_tokenizer, tmp_path, **case)
    assert ours._fallback_reason is None
    _prime_adaptive(stock, ours)
    metrics = _assert_same_step(stock, ours, _perturbed_batch(stock, case))
    if "delta" in case or "epsilon" in case:
        assert metrics["clip_ratio/region_mean"] > 0


@pytest.mark.parametrize("case", [
    {"loss_type": "grpo", "importance_sampling_level": "sequence", "beta": 0.05, "entropy_coef": 0.3},
    {"loss_type": "cispo", "epsilon_high": 1.1, "top_entropy_quantile": 0.5, "entropy_coef": 0.3},
    {"loss_type": "sapo", "delta": 1.5, "beta": 0.05, "use_adaptive_entropy": True, "entropy_target": 50.0},
    {"loss_type": "vespo", "importance_sampling_level": "sequence", "beta": 0.05, "off_policy_mask_threshold": 0.1},
], ids=lambda c: c["loss_type"])
def test_triton_kernels_match_stock_trl(triton_backend, tiny_lm_dir, tiny_tokenizer, tmp_path, case):
    """The same comparison through the Triton head and loss kernels (interpreted on CPU, compiled on a GPU)."""
    stock, ours = _pair(tiny_lm_dir, tiny_tokenizer, tmp_path, **case)
    _prime_adaptive(stock, ours)
    _assert_same_step(stock, ours, _perturbed_batch(stock, case))


@pytest.mark.parametrize("loss_type, mode", [("grpo", "token"), ("sapo", "token"), ("cispo", "token"),
                                             ("vespo", "token"), ("dapo", "sequence"), ("bnpo", "sequence")])
def test_vllm_importance_sampling_matches_stock_trl(tiny_lm_dir, tiny_tokenizer, tmp_path, loss_type, mode):
    """vLLM's importance_sampling_ratio (per token, with masked zeros, or per sequence) weights the token loss,
    or for vespo enters phi; sampling log-probs drive the off-policy mask."""
    case = {"loss_type": loss_type, "off_policy_mask_threshold": 0.2, **TYPE_SETTINGS.get(loss_type, {})}
    stock, ours = _pair(tiny_lm_dir, tiny_tokenizer, tmp_path, **case)
    inputs = _perturbed_batch(stock, case)
    noise = torch.Generator().manual_seed(8)
    old = inputs["old_per_token_logps"]
    inputs["sampling_per_token_logps"] = old + 0.3 * torch.randn(old.shape, generator=noise)
    shape = old.shape if mode == "token" else (old.shape[0], 1)
    ratio = torch.exp(0.4 * torch.randn(shape, generator=noise))
    if mode == "token":
        ratio[ratio > 1.5] = 0.0  # vllm_importance_sampling_mode="token_mask" zeroes ratios out of range
        assert (ratio == 0).any()
    inputs["importance_sampling_ratio"] = ratio
    for trainer in (stock, ours):
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
    _assert_same_step(stock, ours, inputs)


@pytest.mark.parametrize("case", [{"loss_type": "grpo", "use_adaptive_entropy": True, "entropy_target": 50.0},
                                  {"loss_type": "vespo", "entropy_coef": 0.3, "beta": 0.05}])
def test_eval_loss_matches_stock_trl(tiny_lm_dir, tiny_tokenizer, tmp_path, case):
    """Eval (prediction_step's loss): no accumulation scaling, the adaptive controller left alone."""
    stock, ours = _pair(tiny_lm_dir, tiny_tokenizer, tmp_path, **case)
    _prime_adaptive(stock, ours)
    inputs = _perturbed_batch(stock, case)
    coef = ours.entropy_coef
    _assert_same_step(stock, ours, inputs, accumulation=2, train=False)
    assert ours.entropy_coef == stock.entropy_coef == coef


def test_moe_router_aux_loss_matches_stock_trl(tiny_moe_lm_dir, tiny_tokenizer, tmp_path):
    """A Mixtral: the load-balancing loss (from the backbone's router logits) is added as TRL adds it."""
    case = {"loss_type": "dapo", "router_aux_loss_coef": 0.5, "entropy_coef": 0.1}
    stock, ours = _pair(tiny_moe_lm_dir, tiny_tokenizer, tmp_path, **case)
    assert ours.aux_loss_enabled and ours._fallback_reason is None
    metrics = _assert_same_step(stock, ours, _perturbed_batch(stock, case))
    assert metrics["aux_loss"] > 0


def test_logit_scaling_folded_into_temperature(tiny_scaled_lm_dir, tiny_tokenizer, tmp_path):
    """A Granite (logits / logits_scaling): the head runs at temperature T * logits_scaling, TRL's numbers."""
    case = {"loss_type": "grpo", "entropy_coef": 0.2, "top_entropy_quantile": 0.5}
    stock, ours = _pair(tiny_scaled_lm_dir, tiny_tokenizer, tmp_path, **case)
    assert ours._fallback_reason is None and ours.head_temperature == pytest.approx(0.9 * 2.5)
    _assert_same_step(stock, ours, _perturbed_batch(stock, case))


@pytest.mark.parametrize("model_fixture, overrides, reason", [
    ("tiny_softcap_lm_dir", {"loss_type": "sapo"}, "final_logit_softcapping"),
    ("tiny_lm_dir", {"loss_type": "grpo", "delta": 0.9}, "delta"),
    ("tiny_lm_dir", {"loss_type": "sapo", "sapo_temperature_neg": -1.0}, "sapo_temperature"),
    ("tiny_lm_dir", {"loss_type": "bnpo", "epsilon": -0.05}, "epsilon"),
])
def test_fallback_to_trl_loss_with_one_warning(request, tiny_tokenizer, tmp_path, model_fixture, overrides, reason):
    """What the pairuni kernels cannot express runs TRL's own loss, said once at construction."""
    model_dir = request.getfixturevalue(model_fixture)
    with pytest.warns(UserWarning, match=reason) as caught:
        stock, ours = _pair(model_dir, tiny_tokenizer, tmp_path, **overrides)
    assert sum("falls back" in str(w.message) for w in caught) == 1
    _assert_same_step(stock, ours, _perturbed_batch(stock, overrides))


def test_trl_policy_loss_compiles_fullgraph(gen):
    """`torch.compile(fullgraph=True)` traces the adapter's loss function for several loss types."""
    b, t = 4, 7
    logp = -torch.rand(b, t, generator=gen) * 3
    old = logp + 0.5 * torch.randn(b, t, generator=gen)
    ref = logp + 0.3 * torch.randn(b, t, generator=gen)
    adv = torch.randn(b, generator=gen)
    mask = torch.rand(b, t, generator=gen) > 0.2
    weight = (torch.rand(b, t, generator=gen) > 0.3).float()
    entropy = torch.rand(b, t, generator=gen) * 2
    scale = torch.tensor(0.37)
    cases = [
        dict(loss_type="ppo", loss_agg_mode="seq-mean-token-sum", dual_clip_c=1.5, beta=0.05,
             kl_ratio_correction=True, entropy_coef=0.2),
        dict(loss_type="sapo", loss_agg_mode="seq-mean-token-mean", importance_sampling_level="sequence"),
        dict(loss_type="cispo", loss_agg_mode="token-mean", epsilon_high=1.3, entropy_coef=0.1),
        dict(loss_type="vespo", loss_agg_mode="seq-mean-token-sum", beta=0.05, kl_ratio_correction=True,
             sequence_kl=True),
    ]
    for kwargs in cases:
        def step(lp, ent, kwargs=kwargs):
            return trl_policy_loss(lp, old, adv, mask, scale=scale, token_weight=weight, ref_logp=ref, entropy=ent,
                                   entropy_mask=weight > 0, **kwargs)

        torch._dynamo.reset()
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
        results = []
        for f in (step, compiled):
            leaves = [logp.clone().requires_grad_(), entropy.clone().requires_grad_()]
            loss = f(*leaves)
            results.append([loss.detach()] + list(torch.autograd.grad(loss, leaves, allow_unused=True)))
        assert results[0][1].abs().sum() > 0
        for got, want in zip(results[1], results[0]):
            if want is None:
                assert got is None
            else:
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


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


@pytest.mark.parametrize("rewards, reward_weights", [
    ([_reward, _high_words], [1.0, 0.5]),
    ([_sometimes_unscorable, _length_reward], [0.7, 2.0]),  # missing values, rows no function scored
])
def test_normalize_then_sum_advantages_match_stock_trl(tiny_lm_dir, tiny_tokenizer, tmp_path, rewards,
                                                       reward_weights):
    """multi_objective_aggregation="normalize_then_sum" (multi_reward_advantages), NaN handling as TRL's."""
    stock, ours = _pair(tiny_lm_dir, tiny_tokenizer, tmp_path, reward=rewards, reward_weights=reward_weights,
                        multi_objective_aggregation="normalize_then_sum", scale_rewards="none")
    want = _generated_batch(stock, seed=4)
    got = _generated_batch(ours, seed=4)
    assert torch.equal(got["completion_ids"], want["completion_ids"])
    assert want["advantages"].abs().max() > 0.1
    torch.testing.assert_close(got["advantages"], want["advantages"], rtol=1e-5, atol=1e-6)
    # not the sum_then_normalize numbers
    summed = _pair(tiny_lm_dir, tiny_tokenizer, tmp_path / "sum", reward=rewards, reward_weights=reward_weights)[1]
    assert not torch.allclose(_generated_batch(summed, seed=4)["advantages"], want["advantages"], atol=1e-3)


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


@pytest.mark.parametrize("overrides", [
    {"loss_type": "grpo"},
    {"loss_type": "sapo", "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2, "entropy_coef": 0.3,
     "top_entropy_quantile": 0.7, "beta": 0.05},
])
def test_one_training_step_matches_stock_trl(tiny_lm_dir, tiny_tokenizer, tmp_path, overrides):
    """A real `trainer.train()` step both ways: same samples, same loss, same updated weights."""
    stock, ours = _pair(tiny_lm_dir, tiny_tokenizer, tmp_path, optim="sgd", learning_rate=0.5, **overrides)
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


def test_adaptive_entropy_state_checkpointed_as_trl(tiny_lm_dir, tiny_tokenizer, tmp_path):
    """Two steps with gradient accumulation: the controller moves as TRL's, is saved in TRL's checkpoint file
    and restored on resume by TRL's own code (inherited)."""
    overrides = {"use_adaptive_entropy": True, "entropy_coef": 0.1, "entropy_target": 50.0,
                 "entropy_coef_delta": 0.03, "max_steps": 2, "per_device_train_batch_size": 8,
                 "gradient_accumulation_steps": 2, "save_strategy": "steps", "save_steps": 2, "optim": "sgd"}
    stock, ours = _pair(tiny_lm_dir, tiny_tokenizer, tmp_path, **overrides)
    for trainer in (stock, ours):
        torch.manual_seed(5)
        trainer.train()
    assert ours.entropy_coef == pytest.approx(0.16) and stock.entropy_coef == pytest.approx(0.16)
    assert ours._last_world_entropy == pytest.approx(stock._last_world_entropy, rel=1e-5)
    got_log = [x for x in ours.state.log_history if "entropy_coef" in x]
    want_log = [x for x in stock.state.log_history if "entropy_coef" in x]
    assert [x["entropy_coef"] for x in got_log] == pytest.approx([x["entropy_coef"] for x in want_log])
    saved = json.loads((tmp_path / "PairUniGRPOTrainer" / "checkpoint-2" / "entropy_ctrl_state.json").read_text())
    assert saved == {"entropy_coef": ours.entropy_coef, "last_world_entropy": ours._last_world_entropy}
    fresh = _pair(tiny_lm_dir, tiny_tokenizer, tmp_path / "fresh", **overrides)[1]
    fresh.create_optimizer_and_scheduler(num_training_steps=2)
    fresh._load_optimizer_and_scheduler(str(tmp_path / "PairUniGRPOTrainer" / "checkpoint-2"))
    assert (fresh.entropy_coef, fresh._last_world_entropy) == (ours.entropy_coef, ours._last_world_entropy)


def test_generation_still_works_after_patching(tiny_lm_dir, tiny_tokenizer, tmp_path):
    _, ours = _pair(tiny_lm_dir, tiny_tokenizer, tmp_path)
    out = ours.model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6)
