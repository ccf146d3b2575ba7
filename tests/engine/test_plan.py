"""`pairuni plan`: exact Janus-Pro shapes and the memory terms' arithmetic."""

import contextlib

import pytest

from engine import plan
from engine.config import ConfigError, load_config
from engine.janus_shapes import janus_pro_config, parameter_counts

#: The settings of the methods table (`pairuni plan --methods-table` with these overrides): G=4, one pair per
#: step, 256-token answers, micro-batches of one, gradient checkpointing, bf16 weights.
PAPER = ("rollout.group_size=4", "data.pairs_per_step=1", "rollout.max_new_tokens=256", "optim.micro_batch_size=1",
         "model.gradient_checkpointing=true", "model.dtype=bfloat16")


def plan_for(model: str, *overrides: str, gpus: int = 1) -> plan.PlanConfig:
    """The plan of the PAPER settings plus `overrides` on `gpus` GPUs, as `pairuni plan` builds it."""
    return plan.plan_of_run(load_config(None, [*PAPER, *overrides], check=False), gpus=gpus, model=model)


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
    one = plan.estimate(plan_for("janus-pro-7b"))
    total = sum(counts_7b.values())
    trainable = total - counts_7b["vision_model"] - counts_7b["vqmodel"]
    assert one["weights"] == pytest.approx(2 * total)
    assert one["grads"] == pytest.approx(2 * trainable)
    assert one["optimizer"] == pytest.approx(trainable * (2 + 8 / 2048))
    # torchrun needs torch's AdamW (bitsandbytes cannot step FSDP2's DTensors): the same rule as a launch
    with pytest.raises(ConfigError, match="optim.optimizer: expected adamw under torchrun"):
        plan_for("janus-pro-7b", "data.pairs_per_step=8", gpus=8)
    one_adamw = plan.estimate(plan_for("janus-pro-7b", "optim.optimizer=adamw"))
    eight = plan.estimate(plan_for("janus-pro-7b", "optim.optimizer=adamw", "data.pairs_per_step=8", gpus=8))
    for key in ("weights", "grads", "optimizer"):
        assert eight[key] == pytest.approx(one_adamw[key] / 8)
    assert eight["fsdp_gather"] > 0 == one["fsdp_gather"]
    fp32 = plan.estimate(plan_for("janus-pro-7b", "optim.optimizer=adamw", "model.dtype=float32"))
    assert fp32["optimizer"] == pytest.approx(8 * trainable)


def test_checkpointing_and_group_size_move_the_right_terms():
    on = plan.estimate(plan_for("janus-pro-1b", "rollout.group_size=8"))
    off = plan.estimate(plan_for("janus-pro-1b", "rollout.group_size=8", "model.gradient_checkpointing=false"))
    assert off["activations"] > 5 * on["activations"]
    big = plan.estimate(plan_for("janus-pro-1b", "rollout.group_size=16"))
    assert big["kv_cache"] == pytest.approx(2 * on["kv_cache"])
    assert on["peak"] == max(on["rollout_peak"], on["update_peak"])


@pytest.mark.parametrize("args,message", [
    (["--model", "janus-pro-3b"], "invalid choice"), (["--gpus", "0"], "--gpus: expected an integer >= 1"),
    (["--optimizer", "sgd"], "optim.optimizer: expected one of adamw8bit | adamw"),
    (["--param-dtype", "int8"], "model.dtype: expected one of"), (["rollout.group_size=1"], "rollout.group_size"),
    (["--lora-rank", "8", "--gpus", "2", "optim.optimizer=adamw"], "model.lora.rank: expected 0 under torchrun"),
    (["--update", "kahan"], "optim.update: expected round unless model.dtype=bfloat16")])
def test_bad_plan_flags_get_the_runs_one_line_errors(args, message, capsys):
    """The planner has no rules of its own: a bad flag or override is refused as a run's config would be."""
    from engine import cli

    with pytest.raises(SystemExit) if "invalid choice" in message else contextlib.nullcontext():
        assert cli.main(["plan", "--model", "janus-pro-1b", *args]) == 2
    assert message in capsys.readouterr().err


def test_fsdp_rollouts_hold_the_gathered_model():
    one = plan.estimate(plan_for("janus-pro-7b", "optim.optimizer=adamw"))
    eight = plan.estimate(plan_for("janus-pro-7b", "optim.optimizer=adamw", "data.pairs_per_step=8", gpus=8))
    assert one["rollout_gather"] == 0
    # rollouts keep every parameter gathered: the 7/8 this GPU does not own, in bf16
    assert eight["rollout_gather"] == pytest.approx(one["weights"] * 7 / 8)
    assert eight["rollout_peak"] > eight["weights"] + eight["optimizer"] + eight["rollout_gather"]


def test_plan_of_a_run_config_uses_its_sizes(tmp_path):
    from engine.config import load_config

    # on 2 GPUs as a torchrun launch must run it: torch AdamW, fp32 shards (the masters) computed in bf16
    fsdp = ["optim.optimizer=adamw", "optim.master_weights=false", "model.dtype=float32", "distributed.param_dtype=bfloat16"]
    run = load_config("configs/janus_pro_1b.yaml", ["rollout.max_batch=4", *fsdp], check=False)
    cfg = plan.plan_of_run(run, gpus=2, model="janus-pro-1b")
    assert (cfg.group_size, cfg.pairs_per_gpu, cfg.answer_tokens, cfg.micro_batch) == (
        run.rollout.group_size, run.data.pairs_per_step // 2, run.rollout.max_new_tokens, run.optim.micro_batch_size)
    assert cfg.reward_params == plan.REWARD_MODEL_PARAMS["clip"] and cfg.master_weights
    assert cfg.param_dtype == "bfloat16"
    chunked, whole = plan.estimate(cfg), plan.estimate(plan.plan_of_run(load_config(
        "configs/janus_pro_1b.yaml", ["rollout.max_batch=0", *fsdp], check=False), gpus=2, model="janus-pro-1b"))
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

    full = plan.estimate(plan_for("janus-pro-1b"))
    kahan = plan.estimate(plan_for("janus-pro-1b", "optim.update=kahan"))
    assert kahan["compensation"] == 2 * full["trainable_parameters"]
    lo = plan.estimate(plan_for("janus-pro-1b", "model.lora.rank=8", "model.lora.targets=[attention]"))
    shapes = linear_shapes(janus_pro_config("janus-pro-1b"))
    attn = [s for n, s in shapes.items() if n.startswith("model.language_model.") and ".self_attn." in n]
    assert len(attn) == 4 * 24 and lo["trainable_parameters"] == sum(8 * (i + o) for i, o in attn)
    nf4 = plan.estimate(plan_for("janus-pro-1b", "model.lora.rank=8", "model.lora.quantize=nf4"))
    lm_proj = sum(i * o for n, (i, o) in shapes.items() if n.startswith("model.language_model.layers."))
    saved = plan.estimate(plan_for("janus-pro-1b", "model.lora.rank=8"))["weights"] - nf4["weights"]
    assert saved == pytest.approx(lm_proj * (2 - plan.NF4_BYTES))


def test_docs_gpu_table_is_the_planners(capsys):
    """docs/MEMORY.md's "How much GPU do I need?" table is what its own command prints today."""
    import shlex
    from pathlib import Path

    from engine import cli

    doc = (Path(__file__).resolve().parents[2] / "docs" / "MEMORY.md").read_text()
    command = next(line for line in doc.splitlines() if line.startswith("pairuni plan --methods-table"))
    assert set(PAPER) <= set(shlex.split(command))
    assert cli.main(shlex.split(command)[1:]) == 0
    table = capsys.readouterr().out.strip()
    assert len(table.splitlines()) == 2 + 2 * len(plan.METHODS)
    assert table in doc


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
    keys = [f"optim.{k}={str(v).lower()}" for k, v in kwargs.items()]
    cfg = plan_for("janus-pro-1b", "optim.optimizer=adamw", f"model.dtype={dtype}", *keys)
    assert plan.optimizer_state_bytes(cfg) == state / trained


def test_adamw_7b_plan_counts_bf16_state(counts_7b):
    trainable = sum(counts_7b.values()) - counts_7b["vision_model"] - counts_7b["vqmodel"]
    bf16 = plan.estimate(plan_for("janus-pro-7b", "optim.optimizer=adamw"))
    masters = plan.estimate(plan_for("janus-pro-7b", "optim.optimizer=adamw", "optim.master_weights=true"))
    assert bf16["optimizer"] == pytest.approx(4 * trainable)
    assert masters["optimizer"] == pytest.approx(8 * trainable)
