"""`pairuni plan` for Lumina-DiMOO: per-GPU memory (and forwards per sample) of PairGRPO on a DiMOO run.

    pairuni plan --config configs/dimoo_8b_1gpu.yaml                        # model.family: dimoo
    pairuni plan --config configs/dimoo_8b_1gpu.yaml rollout.score_groups=8  # == --score-groups 8
    pairuni plan --model dimoo-8b --steps 64 --score-groups 4 --checkpointing --param-dtype bfloat16 ...

Every term is read off the run's Config (`plan_of_run`), with no defaults of its own: group size, pairs, dtype,
optimizer, master weights, update, LoRA and reward models by `engine.plan.plan_of_run`, exactly as for Janus-Pro
(`optim.micro_batch_size` is not used: the unit of a DiMOO update is one scoring run of one prompt's G rows), and
DiMOO's own keys here: `rollout.image_steps` T (denoising steps of the image sampler; DiMOO's scripts sample 64,
DIMOO.md 2.1 also tabulates 35), `rollout.score_groups` (guided scoring forwards per sample,
`engine/dimoo/scoring.py`; 0: one per step), `rollout.image_resolution` (0: the preset's default, 512 px for
dimoo-8b: 32 x 32 codes, 1056 tokens with the row newlines) and `rollout.reveal_order` (exact or approximate
scoring; no memory). The flags --steps / --score-groups / --resolution are those keys under other names
(engine/plan.py `DIMOO_FLAGS`). The preset: `--model`, else the one whose shapes model.path's config.json has
(`preset_of`), else dimoo-8b (a folder not downloaded yet), or dimoo-tiny for model.path null (the tiny model).
The shapes are `engine.dimoo.shapes`' exact counts.

Terms (bytes per GPU) shared with engine/plan.py and computed by its code: weights, grads, optimizer
(`optimizer_state_bytes`), master, compensation, step, LoRA adapters and NF4 base (`_lora_terms`, with DiMOO's
layers named by role: `shapes.lora_role_shapes`), fsdp_gather, rollout_gather, reward_models. DiMOO's own:
  activations  a rollout of one prompt (its G rows) is scored in G_s = min(score_groups, steps that reveal)
               runs (`scoring.score_plan`), each ONE guided forward: 2 model calls of G rows (conditional and
               `<uncondition>` rows) for an image, 1 for an answer (no text CFG, DiMOO's default). The engine
               backpropagates each run before the next one's forward (engine/dimoo/pairgrpo.py `backward`), so
               one run's activations are held, with the gradients: score_groups changes time, not memory
               (at most score_groups runs are ever held, here 1). Per token and block, without checkpointing,
               about 10 [H] and 4 [M] tensors are kept (as engine/plan.py), with checkpointing each block's input
               [H] plus one call's block recomputed; outside the blocks the final norm keeps 3 [H]. Rows: image
               S = prompt + 4 + 1056 (prompt, <answer> <IMAGE>, grid, </IMAGE> </answer>), understanding
               S = prompt + 4 + 1056 + answer (prompt + <IMAGE> grid </IMAGE> + <answer> answer </answer>). The
               larger task counts.
  loss         fused linear loss chunk: `loss_chunk_rows` x C logits in fp32, twice; C = 8192 (the image-code
               slice) for images, 126356 (the text ids) for answers.
  rollout_forward  one no-grad model call of the sampler: `rows` (G, or rollout.max_batch) rows of one
               prompt (DiMOO batches rows of one prompt, without padding; cond and uncond are separate calls,
               engine/dimoo/sampler.py) hold the residual stream, the normed input and SwiGLU's three [M] tensors.
  rollout_logits  the call's sliced logits [rows, S, C] in param dtype, and the step's fp32 copies at the drawn
               positions (all masked codes at step 0: cond, uncond, their concatenation for cfg_sample, the
               confidence log-softmax: 5 [rows x 1024, 8192]); for answers 3 copies of [rows x answer, 126356].
  kv_cache     none: attention is bidirectional, every denoising step recomputes the whole row, so T changes
               time (forwards per sample), not memory.
Forwards per sample (time): the image sampler 2 per revealing step (2T); the update 2 G_s guided forwards, each
with its backward (about 3x a forward); `tflops_*` count 2 x (block + head-slice) matmul parameters per token and
4 L S^2 H for attention. Not counted: the VQ decoder (a diffusers VQModel whose DiMOO config is [U],
used only to decode rollouts for rewards). Checked against the measured CPU peaks of a scaled-down DimooModel's update
and of its image sampler (tests/engine/dimoo/test_plan.py, within 20%).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import plan as run_planner
from ..plan import DTYPE_BYTES, PROMPT_TOKENS, GiB, PlanConfig, _lora_terms, optimizer_state_bytes
from .model import DimooConfig
from .sampler import cosine_schedule
from .shapes import CODEBOOK_SIZE, MODEL_NAMES, RESOLUTION, dimoo_config, image_grid, lora_role_shapes, parameter_counts

#: DiMOO's image sampler steps (README "we sample 64 steps"; DIMOO.md 2.1), configs/dimoo_8b_*.yaml's image_steps
STEPS = 64
#: rollout.image_resolution=0: the preset's own image side in px (the tiny DiMOO's 4 x 4 codes: 64 px)
RESOLUTIONS = {"dimoo-8b": RESOLUTION, "dimoo-tiny": 64}
#: tokens of a row beside the prompt and the grid: <answer> <IMAGE> ... </IMAGE> </answer> (DIMOO.md 1.6)
FRAME_TOKENS = 4
#: DimooConfig fields that tell the presets apart (`preset_of`)
_SHAPE_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "embedding_size", "codebook_size")


@dataclass(frozen=True)
class DimooPlanConfig:
    """What the DiMOO estimate depends on: the run's PlanConfig and DiMOO's rollout keys, resolved."""

    run: PlanConfig
    steps: int
    """Denoising steps T of the image sampler (`rollout.image_steps`; time only)."""
    score_groups: int
    """Guided scoring forwards per sample in the update (`rollout.score_groups`, 0 resolved to `steps`;
    `engine.dimoo.scoring.score_plan` uses at most the revealing steps)."""
    resolution: int
    """Image side in px (`rollout.image_resolution`, 0 resolved to the preset's `RESOLUTIONS`; square; 512:
    32 x 32 codes, 1056 tokens)."""
    reveal_order: str
    """`rollout.reveal_order`: random | confidence (whether the scored ratio is exact; no memory)."""
    reference: bool = False
    """algo.beta > 0: the KL's frozen reference model, a second copy of the weights in the run's dtype."""


def preset_of(model_path: str | Path) -> str:
    """The preset (`MODEL_NAMES`) whose shapes a local Lumina-DiMOO folder has: its config.json (and
    vqvae/config.json's codebook size, else 8192, as `DimooModel.from_pretrained`) against each preset's."""
    folder = Path(model_path)
    try:
        vq = folder / "vqvae" / "config.json"
        codebook = json.loads(vq.read_text())["num_vq_embeddings"] if vq.is_file() else CODEBOOK_SIZE
        found = DimooConfig.from_json_dict(json.loads((folder / "config.json").read_text()), codebook_size=codebook)
    except (OSError, ValueError, KeyError, TypeError) as err:
        message = " ".join(str(err).split())
        raise ValueError(f"model.path: cannot read a DiMOO config from {folder / 'config.json'} ({message}); "
                         f"pass --model {'|'.join(MODEL_NAMES)}") from None
    shape = {k: getattr(found, k) for k in _SHAPE_FIELDS}
    for name in MODEL_NAMES:
        preset = dimoo_config(name)
        if shape == {k: getattr(preset, k) for k in _SHAPE_FIELDS}:
            return name
    raise ValueError(f"model.path: {folder / 'config.json'} has shapes {shape}, not a DiMOO preset's; "
                     f"pass --model {'|'.join(MODEL_NAMES)}")


def preset_of_run(run, model: str | None = None) -> str:
    """`model` if given, else read off `run.model.path`'s config.json when that folder exists, else dimoo-8b
    (a path not downloaded yet), or dimoo-tiny for model.path null (the tiny toy-world DiMOO)."""
    if model is not None:
        if model not in MODEL_NAMES:
            raise ValueError(f"--model: expected one of {MODEL_NAMES} for a DiMOO plan, got {model!r}")
        return model
    if run.model.family != "dimoo":
        raise ValueError(f"model.family: expected dimoo for a DiMOO plan without --model, got {run.model.family!r}")
    if run.model.path is None:
        return "dimoo-tiny"
    return preset_of(run.model.path) if Path(run.model.path).is_dir() else "dimoo-8b"


def plan_of_run(run, *, model: str | None = None, gpus: int = 1,
                prompt_tokens: int = PROMPT_TOKENS) -> DimooPlanConfig:
    """The DimooPlanConfig of an `engine.config.Config` (checked as engine.plan checks a run, as model.family=dimoo:
    a Janus-Pro config planned with `model` given is planned as that run with the family switched): T =
    rollout.image_steps, score groups = rollout.score_groups (0: T), resolution = rollout.image_resolution (0: the
    preset's), for the preset `model` (None: `preset_of_run`)."""
    model = preset_of_run(run, model)
    if run.model.family != "dimoo":  # --model dimoo-* on a Janus-Pro config: plan the DiMOO run it would be
        run = copy.deepcopy(run)
        run.model.family = "dimoo"
    base = run_planner.plan_of_run(run, gpus=gpus, model=model, prompt_tokens=prompt_tokens)  # checks the ranges
    r = run.rollout
    resolution = r.image_resolution or RESOLUTIONS[model]
    image_grid(resolution)
    return DimooPlanConfig(base, r.image_steps, r.score_groups or r.image_steps, resolution, r.reveal_order,
                           run.algo.beta > 0)


def estimate(plan: DimooPlanConfig, *, config: DimooConfig | None = None) -> dict[str, float]:
    """Bytes per GPU for each term, `rollout_peak`, `update_peak`, `peak`, and the forwards / TFLOPs per sample.
    `config` overrides the preset's shapes (the tests use a scaled-down DimooModel's)."""
    cfg = plan.run
    dc = config or dimoo_config(cfg.model)
    counts = parameter_counts(dc)
    total = trainable = sum(counts.values())  # every DiMOO parameter trains (no frozen encoder inside)
    pb, shard = DTYPE_BYTES[cfg.param_dtype], cfg.gpus
    h, n_layers, inter, codebook = dc.d_model, dc.n_layers, dc.mlp_hidden_size, dc.codebook_size
    text_vocab = dc.vocab_rows - codebook  # the text ids: the answer's vocabulary slice
    codes, grid_tokens = image_grid(plan.resolution)
    s_image = cfg.prompt_tokens + FRAME_TOKENS + grid_tokens
    s_text = s_image + cfg.answer_tokens

    weights, grad_bytes, head_copy = total * pb, pb, 0.0
    if cfg.lora_rank:
        weights, trainable, grad_bytes, head_copy = _lora_terms(cfg, total, pb,
                                                                lora_role_shapes(dc, cfg.lora_targets))
    t = {"weights": weights / shard, "grads": trainable * grad_bytes / shard,
         "optimizer": trainable * optimizer_state_bytes(cfg) / shard,
         "master": trainable * 4 / shard if cfg.master_weights else 0.0,
         "compensation": trainable * 2.0 if cfg.update == "kahan" else 0.0, "head_copy": head_copy,
         "reference": total * pb if plan.reference else 0.0}
    step_bytes = {"kahan": 8, "stochastic_rounding": 14}.get(cfg.update, 4 if cfg.master_weights else 0)
    largest = max(dc.vocab_rows * h, h * inter)
    t["step"] = 0.0 if cfg.lora_rank or shard > 1 else largest * step_bytes

    revealing = sum(k > 0 for k in cosine_schedule(codes, plan.steps))
    groups_image = min(plan.score_groups, revealing)
    rows = cfg.group_size  # the G rows of one prompt's rollout: one scoring call
    per_token_block = (10 * h + 4 * inter) * pb

    def activations(calls: int, seq: int) -> float:  # one run: `calls` model calls of G rows of seq tokens
        held = calls * rows * seq * (3 * h * pb)  # the final norm's saved input, normalised copy and output
        if cfg.gradient_checkpointing:
            return held + calls * rows * seq * n_layers * h * pb + rows * seq * per_token_block
        return held + calls * rows * seq * n_layers * per_token_block

    t["activations_image"] = activations(2, s_image)
    t["activations_text"] = activations(1, s_text)
    t["loss_image"] = 2 * min(cfg.loss_chunk_rows, rows * codes) * codebook * 4.0
    t["loss_text"] = 2 * min(cfg.loss_chunk_rows, rows * cfg.answer_tokens) * text_vocab * 4.0
    image_first = t["activations_image"] + t["loss_image"] >= t["activations_text"] + t["loss_text"]
    t["activations"] = t["activations_image"] if image_first else t["activations_text"]
    t["loss"] = t["loss_image"] if image_first else t["loss_text"]
    t["fsdp_gather"] = 2 * counts["blocks"] / n_layers * pb if shard > 1 else 0.0

    rows = cfg.group_size if not cfg.rollout_batch else min(cfg.rollout_batch, cfg.group_size)
    t["rollout_forward"] = rows * max(s_image, s_text) * (2 * h + 3 * inter) * pb
    t["rollout_logits"] = max(rows * s_image * codebook * pb + 5 * rows * codes * codebook * 4.0,
                              rows * s_text * text_vocab * pb + 3 * rows * cfg.answer_tokens * text_vocab * 4.0)
    t["rollout_gather"] = total * pb * (1 - 1 / shard)
    t["reward_models"] = cfg.reward_params * 4.0

    persistent = t["weights"] + t["optimizer"] + t["master"] + t["compensation"] + t["reward_models"] + t["reference"]
    t["rollout_peak"] = persistent + t["rollout_gather"] + t["rollout_forward"] + t["rollout_logits"]
    backward = t["activations"] + t["fsdp_gather"] + t["loss"] + t["head_copy"]
    t["update_peak"] = persistent + t["grads"] + max(backward, t["step"])
    t["peak"] = max(t["rollout_peak"], t["update_peak"])
    t["parameters"], t["trainable_parameters"] = float(total), float(trainable)

    # time: forwards per image sample and their matmul + attention FLOPs
    def forward_flops(seq: int, head_cols: int) -> float:
        return 2.0 * seq * (counts["blocks"] + h * head_cols) + 4.0 * n_layers * seq * seq * h

    t["score_groups_image"] = float(groups_image)
    t["rollout_forwards_per_image"] = 2.0 * revealing
    t["update_forwards_per_image"] = 2.0 * groups_image
    t["rollout_tflops_per_image"] = 2 * revealing * forward_flops(s_image, codebook) / 1e12
    t["update_tflops_per_image"] = 3 * 2 * groups_image * forward_flops(s_image, 0) / 1e12
    return t


TERMS = ("weights", "grads", "optimizer", "master", "compensation", "head_copy", "reference", "activations_image",
         "activations_text", "activations", "loss", "fsdp_gather", "step", "rollout_forward", "rollout_logits",
         "rollout_gather", "reward_models", "rollout_peak", "update_peak", "peak")


def format_table(plan: DimooPlanConfig, t: dict[str, float]) -> str:
    cfg = plan.run
    codes, tokens = image_grid(plan.resolution)
    # exact: one scoring run per revealing step, and a reveal order drawn from the seed (DIMOO.md "Scoring")
    exact = plan.reveal_order == "random" and 2 * t["score_groups_image"] == t["rollout_forwards_per_image"]
    lines = [f"memory plan: {cfg.model}, {cfg.gpus} GPU(s), G={cfg.group_size}, {cfg.pairs_per_gpu} pair(s)/GPU, "
             f"{plan.resolution} px ({codes} codes, {tokens} tokens), T={plan.steps} steps, "
             f"score_groups={plan.score_groups} ({int(t['score_groups_image'])} used, {plan.reveal_order} order: "
             f"{'exact' if exact else 'approximate'} scoring), {cfg.optimizer}, "
             f"checkpointing={'on' if cfg.gradient_checkpointing else 'off'}, "
             f"master={'fp32' if cfg.master_weights else 'none'}, update={cfg.update}, "
             + (f"LoRA r={cfg.lora_rank} on {'/'.join(cfg.lora_targets)}, base "
                f"{cfg.lora_quantize if cfg.lora_quantize != 'none' else cfg.param_dtype}" if cfg.lora_rank
                else "full fine-tuning"),
             f"parameters {t['parameters'] / 1e9:.3f} B (trainable {t['trainable_parameters'] / 1e9:.3f} B)",
             "| term | GiB per GPU |", "|---|---|"]
    lines += [f"| {key} | {t[key] / GiB:.2f} |" for key in TERMS]
    lines.append(f"per image sample: rollout {int(t['rollout_forwards_per_image'])} forwards "
                 f"({t['rollout_tflops_per_image']:.1f} TFLOP), update {int(t['update_forwards_per_image'])} "
                 f"forwards + backward ({t['update_tflops_per_image']:.1f} TFLOP)")
    return "\n".join(lines)


def run_plan(args, run) -> str:
    """The text `pairuni plan` prints for a DiMOO run: parsed `args` (--model, --gpus, --prompt-tokens, --json)
    and a loaded Config `run` (the flags --steps / --score-groups / --resolution already applied as overrides)."""
    plan = plan_of_run(run, model=args.model, gpus=args.gpus, prompt_tokens=args.prompt_tokens)
    terms = estimate(plan)
    if args.json:
        return json.dumps({"config": {**asdict(plan.run), "steps": plan.steps, "score_groups": plan.score_groups,
                                      "resolution": plan.resolution, "reveal_order": plan.reveal_order},
                           "bytes": terms}, indent=2)
    return format_table(plan, terms)


__all__ = ["DimooPlanConfig", "RESOLUTIONS", "STEPS", "estimate", "format_table", "plan_of_run", "preset_of",
           "preset_of_run", "run_plan"]
