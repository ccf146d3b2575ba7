"""`pairuni plan` for DiMOO: exact parameter counts, the plan read off a DiMOO run's config (configs/dimoo_8b_*.yaml),
the old flags as overrides of its keys, and the memory plan against a measured peak."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from engine.config import layered, load_config
from engine.dimoo import plan as dplan
from engine.dimoo.model import DimooConfig, DimooModel, tiny_dimoo_config
from engine.dimoo.shapes import dimoo_config, linear_shapes, parameter_counts

SMALL = [tiny_dimoo_config(), tiny_dimoo_config(d_model=96, n_layers=3, n_heads=6, n_kv_heads=2, mlp_hidden_size=160),
         DimooConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_hidden_size=48, vocab_size=134548)]


@pytest.mark.parametrize("cfg", SMALL, ids=["tiny", "gqa", "released-vocab"])
def test_counts_and_linears_are_the_networks(cfg):
    """The formula's counts per module and the linear layers equal the real DimooModel's module tree."""
    with torch.device("meta"):
        model = DimooModel(cfg, attn_backend="sdpa")
    real: dict[str, int] = {}
    for name, p in model.named_parameters():
        key = "blocks" if ".blocks." in name else name.split(".")[2]
        real[key] = real.get(key, 0) + p.numel()
    assert parameter_counts(cfg) == real
    assert linear_shapes(cfg) == {n: (m.in_features, m.out_features) for n, m in model.named_modules()
                                  if isinstance(m, torch.nn.Linear)}


def test_8b_shapes_match_llada_8b():
    """DiMOO-8B is LLaDA-8B with 8192 image codes: with LLaDA's vocabulary (126464) the formula gives LLaDA-8B's
    published 8.02 B parameters; DiMOO's 134548-id vocabulary adds 2 x 8084 x 4096 (embedding and head)."""
    llada = sum(parameter_counts(DimooConfig(vocab_size=126464, embedding_size=126464)).values())
    assert llada == pytest.approx(8.02e9, rel=0.005)
    dimoo = sum(parameter_counts(dimoo_config("dimoo-8b")).values())
    assert dimoo - llada == 2 * (134548 - 126464) * 4096


def plan_for(*overrides, steps=64, score_groups=4, model="dimoo-8b", resolution=512):
    run = load_config(None, ["model.dtype=bfloat16", "model.gradient_checkpointing=true", "rollout.group_size=4",
                             "data.pairs_per_step=1", f"rollout.image_steps={steps}",
                             f"rollout.score_groups={score_groups}", f"rollout.image_resolution={resolution}",
                             *overrides], check=False)
    return dplan.plan_of_run(run, model=model)


def test_steps_and_score_groups_change_time_not_memory():
    a, b = dplan.estimate(plan_for(steps=35)), dplan.estimate(plan_for(steps=64))
    assert a["peak"] == b["peak"] and a["activations"] == b["activations"]
    assert (a["rollout_forwards_per_image"], b["rollout_forwards_per_image"]) == (70, 128)
    one, eight = dplan.estimate(plan_for(score_groups=1)), dplan.estimate(plan_for(score_groups=8))
    assert one["peak"] == eight["peak"] and eight["update_forwards_per_image"] == 8 * one["update_forwards_per_image"]
    g8 = dplan.estimate(plan_for("rollout.group_size=8"))
    assert g8["activations_image"] == pytest.approx(2 * a["activations_image"])
    off = dplan.estimate(plan_for("model.gradient_checkpointing=false"))
    assert off["activations"] > 5 * a["activations"]


def test_lora_and_nf4_terms_are_engine_plans():
    """LoRA counts r x (in + out) per adapted DiMOO linear (engine.plan's term on DiMOO's layers by role)."""
    cfg = dimoo_config("dimoo-8b")
    lo = dplan.estimate(plan_for("model.lora.rank=8", "model.lora.targets=[attention]"))
    attn = [s for n, s in linear_shapes(cfg).items() if n.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "attn_out")]
    assert len(attn) == 4 * 32 and lo["trainable_parameters"] == sum(8 * (i + o) for i, o in attn)
    nf4 = dplan.estimate(plan_for("model.lora.rank=8", "model.lora.targets=[attention]", "model.lora.quantize=nf4"))
    blocks = parameter_counts(cfg)["blocks"] - 32 * 2 * 4096  # the projections, not the norms
    from engine.plan import NF4_BYTES
    assert lo["weights"] - nf4["weights"] == pytest.approx(blocks * (2 - NF4_BYTES))


def test_cli_prints_the_dimoo_table_and_refuses_dimoo_flags_for_janus(capsys):
    from engine import cli

    assert cli.main(["plan", "--model", "dimoo-8b", "--steps", "35", "--checkpointing", "--param-dtype",
                     "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "dimoo-8b" in out and "T=35 steps" in out and "| peak |" in out and "rollout 70 forwards" in out
    assert cli.main(["plan", "--model", "janus-pro-1b", "--steps", "35"]) == 2
    assert "--steps: only for a DiMOO plan" in capsys.readouterr().err
    assert cli.main(["plan", "--model", "dimoo-8b", "--score-groups", "-1"]) == 2
    assert "rollout.score_groups: expected an integer >= 0" in capsys.readouterr().err
    assert cli.main(["plan", "--model", "dimoo-8b", "--json", "--steps", "35"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["steps"] == 35 and out["bytes"]["parameters"] == sum(parameter_counts(DimooConfig()).values())


# ----------------------------------------------------------------------------- the plan of a DiMOO run's config
ONE_GPU, LORA_24GB = "configs/dimoo_8b_1gpu.yaml", "configs/dimoo_8b_lora_24gb.yaml"


def cli_json(capsys, *argv):
    """`pairuni plan --json ARGV` -> its {"config", "bytes"} (exit code 0 asserted)."""
    from engine import cli

    code = cli.main(["plan", "--json", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def revealing_steps(codes: int, steps: int) -> int:
    from engine.dimoo.sampler import cosine_schedule

    return sum(k > 0 for k in cosine_schedule(codes, steps))


@pytest.mark.parametrize(("path", "gib"), [(ONE_GPU, 80), (LORA_24GB, 24)])
def test_dimoo_configs_load_and_their_plans_fit(path, gib, capsys):
    """Each config parses, is a DiMOO run, and `pairuni plan --config` (no DiMOO flag) reads its keys and plans a
    peak under its GPU's size; the 1-GPU plan equals the old all-flags command's for the same values."""
    run = load_config(path, check=False)
    assert run.model.family == "dimoo" and not os.path.isdir(run.model.path)  # a placeholder: the preset is dimoo-8b
    out = cli_json(capsys, "--config", path)
    c, b = out["config"], out["bytes"]
    assert c["model"] == "dimoo-8b" and b["parameters"] == sum(parameter_counts(DimooConfig()).values())
    assert (c["steps"], c["score_groups"], c["resolution"], c["reveal_order"]) == (
        run.rollout.image_steps, run.rollout.score_groups or run.rollout.image_steps,
        run.rollout.image_resolution or 512, run.rollout.reveal_order)
    assert (c["group_size"], c["pairs_per_gpu"], c["param_dtype"], c["gradient_checkpointing"]) == (
        run.rollout.group_size, run.data.pairs_per_step, run.model.dtype, run.model.gradient_checkpointing)
    assert (c["optimizer"], c["update"], c["master_weights"], c["lora_rank"], c["lora_quantize"],
            c["lora_targets"]) == (
        run.optim.optimizer, run.optim.update, run.optim.master_weights, run.model.lora.rank,
        run.model.lora.quantize, list(run.model.lora.targets))
    assert b["peak"] == dplan.estimate(dplan.plan_of_run(run))["peak"]
    assert b["peak"] < gib * 2**30
    if path == ONE_GPU:
        assert run.rollout.image_steps == dplan.STEPS and b["trainable_parameters"] == b["parameters"]
        r = run.rollout
        flags = cli_json(capsys, "--model", "dimoo-8b", "--steps", str(r.image_steps), "--score-groups",
                         str(r.score_groups), "--resolution", str(r.image_resolution), "--group-size",
                         str(r.group_size), "--pairs-per-gpu", str(run.data.pairs_per_step), "--answer-tokens",
                         str(r.max_new_tokens), "--checkpointing", "--param-dtype", run.model.dtype, "--update",
                         run.optim.update, f"reward.generation={run.reward.generation}", f"model.path={run.model.path}",
                         f"rollout.text_steps={r.text_steps}", f"rollout.text_block_length={r.text_block_length}")
        assert flags == out


@pytest.mark.parametrize(("steps", "groups", "resolution"), [(35, 4, 512), (64, 0, 512), (64, 8, 256), (16, 100, 0)])
def test_config_keys_and_flags_plan_alike(steps, groups, resolution, capsys):
    """rollout.image_steps / score_groups / image_resolution set by `key=value` and by --steps / --score-groups /
    --resolution give the same plan, on a DiMOO config and on --model dimoo-8b; what changes against the config's own
    plan is what a plain re-computation says (forwards from the cosine schedule; memory only with the resolution)."""
    keys = [f"rollout.image_steps={steps}", f"rollout.score_groups={groups}", f"rollout.image_resolution={resolution}"]
    flags = ["--steps", str(steps), "--score-groups", str(groups), "--resolution", str(resolution)]
    by_keys = cli_json(capsys, "--config", ONE_GPU, *keys)
    assert cli_json(capsys, "--config", ONE_GPU, *flags) == by_keys
    assert cli_json(capsys, "--model", "dimoo-8b", *flags) == cli_json(capsys, "--model", "dimoo-8b", *keys)
    c, b = by_keys["config"], by_keys["bytes"]
    side = (resolution or 512) // 16
    revealing = revealing_steps(side * side, steps)
    assert (c["steps"], c["score_groups"], c["resolution"]) == (steps, groups or steps, resolution or 512)
    assert b["rollout_forwards_per_image"] == 2 * revealing
    assert b["update_forwards_per_image"] == 2 * min(groups or steps, revealing)
    base = cli_json(capsys, "--config", ONE_GPU)["bytes"]
    if resolution in (0, 512):
        assert b["peak"] == base["peak"] and b["activations"] == base["activations"]
    else:
        scale = (4 + side * (side + 1) + 64) / (4 + 32 * 33 + 64)  # S = frame + grid + prompt tokens
        assert b["activations_image"] == pytest.approx(scale * base["activations_image"])


def test_dimoo_flags_refused_for_a_janus_config(capsys):
    """--steps / --score-groups / --resolution on a model.family=janus_pro plan: one line, exit 2; a Janus preset on a
    DiMOO config likewise; --model dimoo-* on a Janus config plans DiMOO."""
    from engine import cli

    for flag in ("--steps", "--score-groups", "--resolution"):
        assert cli.main(["plan", "--config", "configs/janus_pro_7b_1gpu.yaml", "--model", "janus-pro-7b", flag,
                         "16"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{flag}: only for a DiMOO plan" in err and "model.family=janus_pro" in err
    assert cli.main(["plan", "--config", ONE_GPU, "--model", "janus-pro-7b"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model: expected one of" in err and "model.family=dimoo" in err
    out = cli_json(capsys, "--config", "configs/tiny.yaml", "--model", "dimoo-8b", "--steps", "35")
    assert load_config("configs/tiny.yaml", check=False).model.family == "janus_pro"
    assert out["config"]["model"] == "dimoo-8b" and out["config"]["steps"] == 35
    # a Janus-only key the Janus config sets is refused for its DiMOO plan, in one line naming it
    assert cli.main(["plan", "--config", "configs/janus_pro_7b_1gpu.yaml", "--model", "dimoo-8b"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "only model.family=janus_pro reads it" in err


def test_preset_is_read_off_the_model_folder(tmp_path):
    """No --model: the preset whose shapes model.path's config.json has; a folder not downloaded yet: dimoo-8b;
    model.path null: the tiny DiMOO (64 px); other shapes: one line asking for --model."""
    def plan(path):
        run = load_config(None, ["model.family=dimoo", "model.dtype=bfloat16", f"model.path={path}"], check=False)
        return dplan.plan_of_run(run)

    for name, cfg, codebook in (("big", DimooConfig(), None), ("tiny", tiny_dimoo_config(), 64),
                                ("other", tiny_dimoo_config(d_model=96), 64)):
        (tmp_path / name / "vqvae").mkdir(parents=True)
        (tmp_path / name / "config.json").write_text(json.dumps(cfg.to_json_dict()))
        if codebook is not None:
            (tmp_path / name / "vqvae" / "config.json").write_text(json.dumps({"num_vq_embeddings": codebook}))
    assert plan(tmp_path / "big").run.model == "dimoo-8b"
    tiny = plan(tmp_path / "tiny")
    assert (tiny.run.model, tiny.resolution) == ("dimoo-tiny", dplan.RESOLUTIONS["dimoo-tiny"])
    assert plan(tmp_path / "absent").run.model == "dimoo-8b" and plan("null").run.model == "dimoo-tiny"
    with pytest.raises(ValueError, match="not a DiMOO preset's; pass --model"):
        plan(tmp_path / "other")


# ----------------------------------------------------------------------------- measured
D_MODEL, LAYERS, HEADS, MLP, CODEBOOK, SIDE, G = 192, 4, 4, 512, 256, 8, 4
PROMPT = 12


def _rollout(model, seed: int):
    from engine.dimoo.sampler import image_rows, model_logits_fn, sample_image

    ids = model.ids
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 100, (PROMPT,), generator=gen)
    uncond = torch.cat([prompt[:-1], torch.tensor([ids.uncondition])])  # as long as the prompt (the plan's S)
    start, ustart, pos = image_rows(ids, prompt, uncond, SIDE, SIDE)
    return sample_image(model_logits_fn(model, ids.image_slice), start, pos, uncond_start=ustart,
                        seeds=torch.arange(G, dtype=torch.int64) + 100 * seed, steps=6, cfg_scale=4.0,
                        mask_id=ids.mask, vocab_offset=ids.image_offset, order="random")


def _update(model, optimizer, rollouts, score_groups):
    """The engine's update (engine/dimoo/pairgrpo.py `backward`): per rollout, per score run, one guided forward
    through the fused head, backpropagated before the next run; then one optimizer step."""
    from engine.dimoo.scoring import _branches, _group_rows, model_hidden_fn, score_plan
    from pairuni_kernels import fused_linear_policy_loss
    from pairuni_kernels.reference import cfg_mix

    optimizer.zero_grad()
    for ro in rollouts:
        adv = torch.linspace(-1, 1, G)
        for run in score_plan(ro, score_groups):
            step, b_idx, p_idx, member = _group_rows(ro, run)
            hc, hu = _branches(model_hidden_fn(model), ro, step, b_idx, p_idx, "hidden_fn")
            h = cfg_mix(hc, hu, ro.guidance_scale)
            hidden = h.new_zeros(*ro.step_map.shape, h.shape[-1]).index_put((b_idx, p_idx), h)
            out = fused_linear_policy_loss(hidden, model.head_weight(model.ids.image_slice), ro.targets(),
                                           ro.old_logp, adv, member, temperature=ro.scoring_temperature)
            out.loss.backward()
            del out, hidden, h, hc, hu
    optimizer.step()


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_update_peak_matches_a_measured_dimoo_update(checkpointing):
    from torch.distributed._tools.mem_tracker import MemTracker

    from engine.config import OptimConfig
    from engine.optim import PolicyOptimizer

    class Totals(MemTracker):  # device totals only (a module called many times per step), as test_plan_measured
        def _pre_fw_hook(self, *args):
            pass

        _post_fw_hook = _pre_bw_hook = _post_bw_hook = _pre_fw_hook

    cfg = tiny_dimoo_config(codebook_size=CODEBOOK, d_model=D_MODEL, n_layers=LAYERS, n_heads=HEADS,
                            mlp_hidden_size=MLP)
    torch.manual_seed(0)
    model = DimooModel(cfg, attn_backend="sdpa").train()
    model.gradient_checkpointing = checkpointing
    rollouts = [_rollout(model.eval(), s) for s in (1, 2)]  # two prompts: gradients exist during the second's runs
    model.train()
    optimizer = PolicyOptimizer(model, OptimConfig(optimizer="adamw", lr=1e-4), torch.device("cpu"))
    _update(model, optimizer, rollouts, 3)  # the optimizer state exists from here on
    tracker = Totals()
    tracker.track_external(model, optimizer.inner)
    with tracker:
        _update(model, optimizer, rollouts, 3)
    measured = float(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])

    run = load_config(None, ["model.dtype=float32", f"model.gradient_checkpointing={str(checkpointing).lower()}",
                             f"rollout.group_size={G}", "data.pairs_per_step=1", "optim.optimizer=adamw",
                             "rollout.max_new_tokens=1", "rollout.text_block_length=1"], check=False)
    run = layered(run, None, ["rollout.image_steps=6", "rollout.score_groups=3",
                              f"rollout.image_resolution={16 * SIDE}"])
    plan = dplan.plan_of_run(run, model="dimoo-tiny", prompt_tokens=PROMPT)
    est = dplan.estimate(plan, config=cfg)
    share = est["activations"] / est["update_peak"]
    print(f"checkpointing={checkpointing}: measured {measured / 2**20:.1f} MiB, planned {est['update_peak'] / 2**20:.1f}"
          f" MiB (activations {est['activations'] / 2**20:.1f} MiB, {share:.0%})")
    assert est["activations"] == est["activations_image"]
    if not checkpointing:  # activations must matter, or a wrong activation formula would pass
        assert share > 0.4
        # negative control: had the update held its 3 runs' forwards at once, the plan would be far off
        assert est["update_peak"] + 2 * est["activations"] != pytest.approx(measured, rel=0.2)
    assert est["update_peak"] == pytest.approx(measured, rel=0.2)
    assert dataclasses.asdict(plan)["score_groups"] == 3


@pytest.mark.slow
def test_rollout_peak_matches_a_measured_dimoo_sampler():
    """The rollout terms (one no-grad call's working set, the sliced logits and the step's fp32 copies) against
    the measured peak of `sample_image` (DiMOO's confidence order, CFG) over 16 rows on a scaled-down DimooModel;
    no optimizer exists here, so its term is left out of the planned peak."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from engine.dimoo.sampler import image_rows, model_logits_fn, sample_image

    class Totals(MemTracker):
        def _pre_fw_hook(self, *args):
            pass

        _post_fw_hook = _pre_bw_hook = _post_bw_hook = _pre_fw_hook

    rows = 16
    cfg = tiny_dimoo_config(codebook_size=CODEBOOK, d_model=D_MODEL, n_layers=LAYERS, n_heads=HEADS,
                            mlp_hidden_size=MLP)
    torch.manual_seed(0)
    model = DimooModel(cfg, attn_backend="sdpa").eval()
    ids = model.ids
    prompt = torch.randint(0, 100, (PROMPT,))
    start, ustart, pos = image_rows(ids, prompt, torch.cat([prompt[:-1], torch.tensor([ids.uncondition])]),
                                    SIDE, SIDE)
    tracker = Totals()
    tracker.track_external(model)
    with tracker:
        sample_image(model_logits_fn(model, ids.image_slice), start, pos, uncond_start=ustart,
                     seeds=torch.arange(rows, dtype=torch.int64), steps=6, cfg_scale=4.0, mask_id=ids.mask,
                     vocab_offset=ids.image_offset, order="confidence")
    measured = float(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])
    run = load_config(None, ["model.dtype=float32", f"rollout.group_size={rows}", "data.pairs_per_step=1",
                             "optim.optimizer=adamw", "rollout.max_new_tokens=1", "rollout.text_block_length=1"],
                      check=False)
    run = layered(run, None, ["rollout.image_steps=6", f"rollout.image_resolution={16 * SIDE}"])
    est = dplan.estimate(dplan.plan_of_run(run, model="dimoo-tiny", prompt_tokens=PROMPT), config=cfg)
    planned = est["rollout_peak"] - est["optimizer"]
    transient = est["rollout_forward"] + est["rollout_logits"]
    print(f"rollout: measured {measured / 2**20:.1f} MiB, planned {planned / 2**20:.1f} MiB "
          f"(transient {transient / 2**20:.1f} MiB)")
    assert transient > 0.5 * planned  # the rollout terms matter, or a wrong formula would pass
    assert planned == pytest.approx(measured, rel=0.2)


def test_a_kl_reference_adds_one_copy_of_the_weights(capsys):
    """algo.beta > 0: the reference model (a frozen copy of the start model, engine/dimoo/trainer.py) is one more
    set of weights in the run's dtype, held through the rollout and the update."""
    plain = cli_json(capsys, "--config", "configs/dimoo_8b_1gpu.yaml")["bytes"]
    kl = cli_json(capsys, "--config", "configs/dimoo_8b_1gpu.yaml", "algo.beta=0.05")["bytes"]
    assert plain["reference"] == 0 and kl["reference"] == kl["parameters"] * 2  # bf16
    for key in ("rollout_peak", "update_peak", "peak"):
        assert kl[key] == plain[key] + kl["reference"], key
