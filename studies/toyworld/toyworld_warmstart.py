"""Supervised warm start of the tiny Janus on the toy world: the ablation's stand-in for pretraining.

PairUni runs PairGRPO on Janus-Pro, a model that already reads images and draws them. The tiny
random Janus does neither, and GRPO from random weights only finds the answer prior (the first
study: every variant collapsed to the most common answer letter). So the study's testbed first
teaches each seed's tiny model both tasks by teacher forcing on a disjoint set of toy-world pairs,
stops it part way, exports it, and starts every RL variant of that seed from the same folder.

    folder = warm_start(pretrain_pairs, work / "warm_0", seed=0, steps=400)
    # then: model.path=<folder> in every run of seed 0

What it trains on (one step = `batch` pairs, both tasks, equal weight):
- understanding: the prompt of the question and image, target = the answer's tokens + EOS;
- generation: the caption's prompt, target = the image's block tokens (`block_tokens`: the tiny VQ
  decoder paints token k as a flat block of palette colour k, so the image's "VQ encoding" is, per
  block, the majority toy-world colour when foreground covers a quarter of it, else background).
Both losses are the mean token NLL of `engine.policy.task_view` (the same teacher-forced hidden
states, heads and targets the PairGRPO loss scores) through `pairuni_kernels.linear_logprobs`.
The vision encoder and the image-token embeddings train here too (they are Janus-Pro's pretrained
parts); the RL runs then train the default modules only.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from engine import model as janus
from engine.config import DEFAULT_TRAIN_MODULES, load_config
from engine.data import toyworld
from engine.export import export_policy
from engine.policy import task_view
from engine.rollout import GenerationRollout, UnderstandingRollout, uncond_prompt

log = logging.getLogger("pairuni.warmstart")

#: Trained by the warm start: the RL default plus the vision encoder and the image-token embeddings.
WARM_TRAIN_MODULES = (*DEFAULT_TRAIN_MODULES, "vision_model", "generation_embeddings")


def toy_palette() -> torch.Tensor:
    """[C, 3] in [0, 1]: background then the toy-world colours; entry k is VQ token k of the tiny model
    (`engine.model.codebook_palette` repeats this list over the codebook, so token k < C decodes to it)."""
    return torch.tensor([toyworld.BACKGROUND, *toyworld.COLORS.values()], dtype=torch.float32) / 255.0


def block_tokens(images: torch.Tensor, grid: int, palette: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 3, S, S] images in [0, 1] -> [B, grid * grid] long VQ tokens of the painted tiny decoder, row-major.

    Each pixel takes its nearest palette colour; a block is its most common foreground colour when
    foreground (palette index > 0) covers at least a quarter of it, else background (token 0)."""
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[-1] != images.shape[-2] or images.shape[-1] % grid:
        raise ValueError(f"images: expected [B, 3, S, S] with S a multiple of grid={grid}, got {tuple(images.shape)}")
    pal = toy_palette() if palette is None else palette
    b, _, s, _ = images.shape
    cell = s // grid
    px = images.float().permute(0, 2, 3, 1).reshape(-1, 3)
    idx = torch.cdist(px, pal.to(px.device)).argmin(-1).reshape(b, grid, cell, grid, cell)
    idx = idx.permute(0, 1, 3, 2, 4).reshape(b, grid * grid, cell * cell)  # [B, blocks, pixels]
    counts = torch.nn.functional.one_hot(idx, len(pal)).sum(2)  # [B, blocks, C]
    fg = counts[..., 1:]
    colour = fg.argmax(-1) + 1
    return torch.where(fg.sum(-1) * 4 >= cell * cell, colour, torch.zeros_like(colour))


def _right_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return ids, mask


def truth_understanding(prompts, samples: list, images: torch.Tensor) -> UnderstandingRollout:
    """A rollout whose responses are the samples' true answers + EOS (teacher forcing). images: [B, 3, S, S]."""
    ids, mask, pixels = prompts.understanding([s.question for s in samples], images)
    resp, resp_mask = _right_pad([prompts.tok.encode(s.answer) + [janus.TINY_SPECIAL.eos] for s in samples],
                                 janus.TINY_SPECIAL.pad)
    return UnderstandingRollout(ids, mask, pixels, resp, resp_mask, torch.zeros(resp.shape), [], 1.0)


def truth_generation(prompts, samples: list, images: torch.Tensor, grid: int) -> GenerationRollout:
    """A rollout whose image tokens are the samples' images' block tokens (teacher forcing, conditional branch)."""
    ids, mask = prompts.generation([s.prompt for s in samples])
    special = janus.TINY_SPECIAL
    uncond = uncond_prompt(ids, bos=special.bos, boi=special.boi, pad=special.pad)
    tokens = block_tokens(images, grid)
    return GenerationRollout(ids, uncond, mask, tokens, torch.zeros(tokens.shape), None, 1.0, 1.0, "cond")


def supervised_loss(model, task: str, rollout) -> torch.Tensor:
    """Mean NLL over the task's target tokens (`task_view`'s mask) of `rollout` under `model`; differentiable."""
    from pairuni_kernels import linear_logprobs

    view = task_view(model, task, rollout)
    logp = linear_logprobs(view.hidden.flatten(0, 1), view.weight, view.targets.flatten(), bias=view.bias)
    mask = view.mask.flatten()
    return -(logp * mask).sum() / mask.sum()


def warm_start(pairs_path: str | Path, out: str | Path, *, seed: int, steps: int, lr: float = 1e-3,
               batch: int = 32, work: str | Path | None = None, progress: bool = False,
               skip_generation_colour: str | None = None) -> dict:
    """Teach the tiny Janus of `seed` both tasks on `pairs_path` for `steps` steps; export it to `out`.

    skip_generation_colour: generation halves of this colour are left out of the generation loss (their
    words stay in the tokenizer): the transfer test's control, a model that never drew the colour.

    The run (config, checkpoint) lives in `work` (default: `out` + "_run"); the export is a model folder
    that `model.path` loads, with the toy tokenizer built from `pairs_path`'s words. Returns
    {"path": out, "steps", "loss.understanding", "loss.generation" (mean of the last 20 steps), "wall_s"}."""
    from engine.trainer import PairGRPOTrainer

    t0 = time.perf_counter()
    out = Path(out)
    work = Path(work) if work is not None else out.with_name(out.name + "_run")
    overrides = {"data.pairs_path": str(pairs_path), "data.max_pairs": "null", "model.tiny_seed": seed,
                 "train.seed": seed, "train.run_dir": str(work), "train.on_existing": "overwrite",
                 "train.progress": "false", "optim.optimizer": "adamw", "optim.lr": lr,
                 "model.train_modules": "[" + ",".join(WARM_TRAIN_MODULES) + "]"}
    trainer = PairGRPOTrainer.from_config(load_config(None, [f"{k}={v}" for k, v in overrides.items()]))
    model, prompts, pairs, images = trainer.model, trainer.prompts, trainer.pairs, trainer.parts.images
    grid = int(janus.image_token_count(model) ** 0.5)
    gen = torch.Generator().manual_seed(seed)
    recent: dict[str, list[float]] = {"understanding": [], "generation": []}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc=f"warm start (seed {seed})", unit="step")
    model.train()
    for step in range(1, steps + 1):
        picked = [pairs[i] for i in torch.randint(len(pairs), (batch,), generator=gen).tolist()]
        und = [p.understand for p in picked]
        gen_half = [p.generate for p in picked
                    if skip_generation_colour is None or p.generate.meta["attributes"]["color"] != skip_generation_colour]
        losses = {
            "understanding": supervised_loss(model, "understanding",
                                             truth_understanding(prompts, und, torch.stack([images(s) for s in und]))),
            "generation": supervised_loss(model, "generation",
                                          truth_generation(prompts, gen_half, torch.stack([images(s) for s in gen_half]),
                                                           grid)),
        }
        trainer.optimizer.zero_grad()
        (losses["understanding"] + losses["generation"]).backward()
        trainer.optimizer.clip_grad_norm(trainer.cfg.optim.max_grad_norm)
        trainer.optimizer.step()
        for k, v in losses.items():
            recent[k] = (recent[k] + [float(v.detach())])[-20:]
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k[:3]: f"{sum(v) / len(v):.3f}" for k, v in recent.items()})
    if bar is not None:
        bar.close()
    model.eval()
    trainer.step = steps
    trainer.save()
    export_policy(work, out, dtype="float32", overwrite=True)
    result = {"path": str(out), "steps": steps, "wall_s": time.perf_counter() - t0}
    result.update({f"loss.{k}": sum(v) / len(v) for k, v in recent.items() if v})
    log.info("warm start seed %d: %s", seed, result)
    return result
