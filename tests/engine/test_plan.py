"""`pairuni plan`: exact Janus-Pro shapes and the memory terms' arithmetic."""

import pytest

from engine import plan
from engine.config import load_config
from engine.janus_shapes import janus_pro_config, parameter_counts


@pytest.fixture(scope="module")
def counts_7b():
    return parameter_counts(janus_pro_config("janus-pro-7b"))


def test_janus_pro_shapes_match_released_sizes(counts_7b):
    # released checkpoints: Janus-Pro-7B ~7.4 B parameters, Janus-Pro-1B ~2.1 B (1.5 B language model)
    assert 7.35e9 < sum(counts_7b.values()) < 7.45e9
    counts_1b = parameter_counts(janus_pro_config("janus-pro-1b"))
    assert 2.0e9 < sum(counts_1b.values()) < 2.15e9
    # the text and image heads are separate matrices: 102400 x 4096 and (4096 -> 4096 -> 16384)
    assert counts_7b["lm_head"] == 102400 * 4096
    assert counts_7b["generation_head"] >= 4096 * 16384


def test_terms_follow_parameter_counts(counts_7b):
    cfg = plan.PlanConfig(model="janus-pro-7b", gpus=1)
    one = plan.estimate(cfg)
    total = sum(counts_7b.values())
    trainable = total - counts_7b["vision_model"] - counts_7b["vqmodel"]
    assert one["weights"] == pytest.approx(2 * total)
    assert one["grads"] == pytest.approx(2 * trainable)
    assert one["optimizer"] == pytest.approx(trainable * (2 + 8 / 2048))
    eight = plan.estimate(plan.PlanConfig(model="janus-pro-7b", gpus=8))
    for key in ("weights", "grads", "optimizer"):
        assert eight[key] == pytest.approx(one[key] / 8)
    assert eight["fsdp_gather"] > 0 == one["fsdp_gather"]
    fp32 = plan.estimate(plan.PlanConfig(model="janus-pro-7b", optimizer="adamw", param_dtype="float32"))
    assert fp32["optimizer"] == pytest.approx(8 * trainable)


def test_checkpointing_and_group_size_move_the_right_terms():
    on = plan.estimate(plan.PlanConfig(model="janus-pro-1b", group_size=8))
    off = plan.estimate(plan.PlanConfig(model="janus-pro-1b", group_size=8, gradient_checkpointing=False))
    assert off["activations"] > 5 * on["activations"]
    big = plan.estimate(plan.PlanConfig(model="janus-pro-1b", group_size=16))
    assert big["kv_cache"] == pytest.approx(2 * on["kv_cache"])
    assert on["peak"] == max(on["rollout_peak"], on["update_peak"])


@pytest.mark.parametrize("field,value", [("model", "janus-pro-3b"), ("gpus", 0), ("optimizer", "sgd"),
                                         ("param_dtype", "int8")])
def test_bad_plan_config(field, value):
    with pytest.raises(ValueError, match=field):
        plan.estimate(plan.PlanConfig(**{field: value}))


def test_fsdp_rollouts_hold_the_gathered_model():
    one = plan.estimate(plan.PlanConfig(model="janus-pro-7b", gpus=1))
    eight = plan.estimate(plan.PlanConfig(model="janus-pro-7b", gpus=8))
    assert one["rollout_gather"] == 0
    # rollouts keep every parameter gathered: the 7/8 this GPU does not own, in bf16
    assert eight["rollout_gather"] == pytest.approx(one["weights"] * 7 / 8)
    assert eight["rollout_peak"] > eight["weights"] + eight["optimizer"] + eight["rollout_gather"]


def test_plan_of_a_run_config_uses_its_sizes(tmp_path):
    from engine.config import load_config

    run = load_config("configs/janus_pro_1b.yaml", ["rollout.max_batch=4"], check=False)
    cfg = plan.plan_of_run(run, gpus=2, model="janus-pro-1b")
    assert (cfg.group_size, cfg.pairs_per_gpu, cfg.answer_tokens, cfg.micro_batch) == (
        run.rollout.group_size, run.data.pairs_per_step // 2, run.rollout.max_new_tokens, run.optim.micro_batch_size)
    assert cfg.reward_params == plan.REWARD_MODEL_PARAMS["clip"] and cfg.master_weights
    chunked, whole = plan.estimate(cfg), plan.estimate(plan.plan_of_run(load_config(
        "configs/janus_pro_1b.yaml", ["rollout.max_batch=0"], check=False), gpus=2, model="janus-pro-1b"))
    # rollout.max_batch=4 decodes 4 of the 8 pairs x G=8 rows at a time (0: all 64): the KV cache shrinks 16-fold
    assert chunked["kv_cache"] == pytest.approx(whole["kv_cache"] / 16)
    assert chunked["reward_models"] == 4 * plan.REWARD_MODEL_PARAMS["clip"]
    assert chunked["peak"] >= chunked["weights"] + chunked["reward_models"]


def test_plan_reads_the_preset_off_model_path(tmp_path, capsys):
    from engine import cli

    (tmp_path / "config.json").write_text('{"text_config": {"hidden_size": 4096}}')
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  path: {tmp_path}\nrollout:\n  group_size: 4\n")
    assert cli.main(["plan", "--config", str(config), "--json"]) == 0
    out = __import__("json").loads(capsys.readouterr().out)
    assert out["config"]["model"] == "janus-pro-7b" and out["config"]["group_size"] == 4
    config.write_text("model:\n  path: /nonexistent/janus\n")
    assert cli.main(["plan", "--config", str(config)]) == 2
    assert "model.path: cannot read the language model's hidden size" in capsys.readouterr().err
    with pytest.raises(ValueError, match="model.path"):  # --debug: the traceback, as every subcommand gives it
        cli.main(["--debug", "plan", "--config", str(config)])


@pytest.mark.parametrize("name, goal_bytes", [("janus_pro_7b_1gpu.yaml", 60e9), ("janus_pro_7b_24gb.yaml", 22e9)])
def test_7b_one_gpu_configs_meet_their_memory_goals(name, goal_bytes):
    """Issue goals at the paper's settings (G=4, CFG 5, 576 image tokens): full fine-tuning <= 60 GB,
    LoRA on a 4-bit base <= 22 GB (a 24 GB card with headroom)."""
    run = load_config(f"configs/{name}", check=False)
    cfg = plan.plan_of_run(run, model="janus-pro-7b")
    assert cfg.group_size == 4 and run.rollout.cfg_scale == 5.0 and not cfg.master_weights
    terms = plan.estimate(cfg)
    assert terms["peak"] <= goal_bytes
    if cfg.lora_rank:
        assert cfg.lora_quantize == "nf4" and terms["trainable_parameters"] < 0.05 * terms["parameters"]
    else:
        assert cfg.update in ("kahan", "stochastic_rounding")


def test_plan_terms_of_compensated_updates_and_lora():
    """Kahan adds 2 bytes per trained parameter; NF4 shrinks the language model's projections ~3.9x; LoRA's
    trainable parameters are r x (in + out) per adapted layer."""
    from engine.janus_shapes import janus_pro_config, linear_shapes

    full = plan.estimate(plan.PlanConfig(model="janus-pro-1b"))
    kahan = plan.estimate(plan.PlanConfig(model="janus-pro-1b", update="kahan"))
    assert kahan["compensation"] == 2 * full["trainable_parameters"]
    lo = plan.estimate(plan.PlanConfig(model="janus-pro-1b", lora_rank=8, lora_targets=("attention",)))
    shapes = linear_shapes(janus_pro_config("janus-pro-1b"))
    attn = [s for n, s in shapes.items() if n.startswith("model.language_model.") and ".self_attn." in n]
    assert len(attn) == 4 * 24 and lo["trainable_parameters"] == sum(8 * (i + o) for i, o in attn)
    nf4 = plan.estimate(plan.PlanConfig(model="janus-pro-1b", lora_rank=8, lora_quantize="nf4"))
    lm_proj = sum(i * o for n, (i, o) in shapes.items() if n.startswith("model.language_model.layers."))
    saved = plan.estimate(plan.PlanConfig(model="janus-pro-1b", lora_rank=8))["weights"] - nf4["weights"]
    assert saved == pytest.approx(lm_proj * (2 - plan.NF4_BYTES))
    with pytest.raises(ValueError, match="gpus"):
        plan.estimate(plan.PlanConfig(model="janus-pro-1b", lora_rank=8, gpus=2))


def test_readme_gpu_table_is_the_planners():
    """README's "How much GPU do I need?" table is what `pairuni plan --methods-table --group-size 4
    --pairs-per-gpu 1` prints today."""
    from pathlib import Path

    table = plan.methods_table(plan.PlanConfig(group_size=4, pairs_per_gpu=1))
    assert len(table.splitlines()) == 2 + 2 * len(plan.METHODS)
    assert table in (Path(__file__).resolve().parents[2] / "README.md").read_text()


@pytest.mark.parametrize("dtype,kwargs", [
    ("bfloat16", {}), ("float32", {}), ("bfloat16", {"master_weights": True}),
    ("bfloat16", {"update": "kahan"}), ("bfloat16", {"update": "stochastic_rounding"})])
def test_adamw_state_is_what_torch_keeps(dtype, kwargs):
    """The plan's AdamW term against the state torch.optim.AdamW really holds after a step of
    engine.optim.PolicyOptimizer on a small model (bf16 weights keep bf16 moments: 4 bytes, not 8)."""
    import torch

    from engine.config import OptimConfig
    from engine.optim import PolicyOptimizer

    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Linear(40, 8)).to(getattr(torch, dtype))
    opt = PolicyOptimizer(model, OptimConfig(optimizer="adamw", lr=1e-3, **kwargs), torch.device("cpu"))
    model(torch.randn(3, 24, dtype=model[0].weight.dtype)).square().sum().backward()
    opt.step()
    trained = sum(p.numel() for p in model.parameters())
    state = sum(t.numel() * t.element_size() for s in opt.inner.state.values() for k, t in s.items() if k != "step")
    cfg = plan.PlanConfig(model="janus-pro-1b", optimizer="adamw", param_dtype=dtype, **kwargs)
    assert plan.optimizer_state_bytes(cfg) == state / trained


def test_adamw_7b_plan_counts_bf16_state(counts_7b):
    trainable = sum(counts_7b.values()) - counts_7b["vision_model"] - counts_7b["vqmodel"]
    bf16 = plan.estimate(plan.PlanConfig(model="janus-pro-7b", optimizer="adamw"))
    masters = plan.estimate(plan.PlanConfig(model="janus-pro-7b", optimizer="adamw", master_weights=True))
    assert bf16["optimizer"] == pytest.approx(4 * trainable)
    assert masters["optimizer"] == pytest.approx(8 * trainable)
