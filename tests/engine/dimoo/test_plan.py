"""`pairuni plan --model dimoo-8b`: DiMOO's exact parameter counts and the memory plan against a measured peak."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.config import load_config
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
                             "data.pairs_per_step=1", *overrides], check=False)
    return dplan.plan_of_run(run, model=model, steps=steps, score_groups=score_groups, resolution=resolution)


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
    assert "--steps: only for --model" in capsys.readouterr().err
    assert cli.main(["plan", "--model", "dimoo-8b", "--score-groups", "0"]) == 2
    assert "--score-groups: expected an integer >= 1" in capsys.readouterr().err
    assert cli.main(["plan", "--model", "dimoo-8b", "--json", "--steps", "35"]) == 0
    out = __import__("json").loads(capsys.readouterr().out)
    assert out["config"]["steps"] == 35 and out["bytes"]["parameters"] == sum(parameter_counts(DimooConfig()).values())


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
                             "rollout.max_new_tokens=1"], check=False)
    plan = dplan.plan_of_run(run, model="dimoo-tiny", steps=6, score_groups=3, resolution=16 * SIDE,
                             prompt_tokens=PROMPT)
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
                             "optim.optimizer=adamw", "rollout.max_new_tokens=1"], check=False)
    est = dplan.estimate(dplan.plan_of_run(run, model="dimoo-tiny", steps=6, resolution=16 * SIDE,
                                           prompt_tokens=PROMPT), config=cfg)
    planned = est["rollout_peak"] - est["optimizer"]
    transient = est["rollout_forward"] + est["rollout_logits"]
    print(f"rollout: measured {measured / 2**20:.1f} MiB, planned {planned / 2**20:.1f} MiB "
          f"(transient {transient / 2**20:.1f} MiB)")
    assert transient > 0.5 * planned  # the rollout terms matter, or a wrong formula would pass
    assert planned == pytest.approx(measured, rel=0.2)
