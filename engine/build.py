"""Everything before step 1: config -> pairs, device, model, prompts, optimizer, rewards, FSDP wrapping.

    parts = build_components(cfg)            # what `PairGRPOTrainer.from_config(cfg)` runs
    trainer = PairGRPOTrainer(cfg, parts)

Order matters for the user: the pairs are read and checked (`run_start.data_splits`) before any
model loads, so a data error costs seconds, not a model load. `assemble` takes an already built
model and prompts (benchmarks build random-weight Janus-Pro shapes themselves) and does the rest.
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint, distributed, lora, rewards
from . import model as janus
from .checkpoint import Checkpointer
from .checkpoint_store import ResumePoint
from .config import Config
from .data.sampler import ImageCache, PairSampler
from .optim import PolicyOptimizer
from .policy import TASKS
from .policy_io import load_policy, tiny_policy
from .rollout import answer_questions
from .run_start import data_splits, start_point
from .text import ToyTokenizer, load_image

log = logging.getLogger("pairuni.build")


@dataclass
class Components:
    """What a trainer is made of (see `PairGRPOTrainer` for how each part is used).

    model: the policy (its parameters are DTensor shards under torchrun); fsdp: the FSDP2 root or None;
    ref_model: frozen copy of the initial policy when algo.beta > 0, else None; rewards: {task: reward};
    tokenizer_json: the toy tokenizer's vocabulary (tiny model only; stored in every checkpoint);
    eval_pairs, eval_root: the held-out pairs `train.eval_every` evaluates on and their image root (none: []).
    """

    model: torch.nn.Module
    prompts: object
    pairs: list
    sampler: PairSampler
    images: ImageCache
    optimizer: PolicyOptimizer
    rewards: dict
    checkpoints: Checkpointer
    device: torch.device
    dist: distributed.DistEnv | None = None
    fsdp: torch.nn.Module | None = None
    ref_model: torch.nn.Module | None = None
    tokenizer_json: str | None = None
    resume: ResumePoint | None = None
    eval_pairs: list = field(default_factory=list)
    eval_root: Path | None = None


def build_components(cfg: Config) -> Components:
    """Read the pairs, start the process group under torchrun, load or build the model, then `assemble`."""
    splits = data_splits(cfg)
    pairs, root = splits.train, splits.root
    start = start_point(cfg)  # checksums verified here, still before the model loads
    for skipped in start.skipped:
        log.warning("resume: skipped %s", skipped)
    env = distributed.init_from_env(cfg.train.device)  # torchrun: process group + this rank's device
    device = env.device if env is not None else distributed.resolve_device(cfg.train.device)
    nf4 = cfg.model.lora.quantize == "nf4"
    load_device = torch.device("cpu") if nf4 else device  # quantize_nf4 quantizes on the way to the GPU
    if cfg.model.path is None:
        model, prompts, tokenizer_json = tiny_run_policy(cfg, pairs, load_device, start.path)
    else:  # Janus-Pro, or a folder `pairuni export` wrote from a tiny-model run (toy prompts)
        policy = load_policy(cfg.model.path, dtype=cfg.model.dtype, device=load_device,
                             attn_implementation=cfg.model.attn_implementation, key="model.path")
        model, prompts, tokenizer_json = policy.model, policy.prompts, policy.tokenizer_json
    if nf4:
        model = lora.quantize_nf4(model, device)
    set_threads(cfg.train.num_threads, model)
    parts = assemble(cfg, model, prompts, pairs, root, tokenizer_json=tokenizer_json, resume=start)
    parts.eval_pairs, parts.eval_root = splits.eval, splits.eval_root
    return parts


#: Below this many parameters a model runs on one CPU thread unless train.num_threads says otherwise: its
#: matrices are too small to split, and a second thread only contends (the tiny demo Janus, 0.7 M parameters,
#: runs several times faster on one thread of a loaded 2-core machine, with the same numbers).
SMALL_MODEL_PARAMETERS = 20_000_000


def set_threads(num_threads: int, model: torch.nn.Module) -> int:
    """torch's CPU threads for the run: `num_threads` when > 0, one for a small model, else torch's default."""
    if num_threads == 0 and sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS:
        num_threads = 1
    if num_threads:
        torch.set_num_threads(num_threads)
    log.info("CPU threads: %d", torch.get_num_threads())
    return torch.get_num_threads()


def toy_tokenizer_texts(pairs: list) -> list[str]:
    """The texts a tiny run's toy tokenizer is built from: both halves' questions and answers, the prompts."""
    return [t for p in pairs for t in (p.understand.question, p.understand.answer, p.generate.prompt,
                                       p.generate.question, p.generate.answer)]


def tiny_run_policy(cfg: Config, pairs: list, device: torch.device, resume_from: Path | None = None):
    """(tiny random Janus, toy prompts, toy tokenizer JSON). The tokenizer is that of the checkpoint the run
    resumes from, or one built from the pairs' words, so a resumed run reads its text with the same ids."""
    if resume_from is not None:
        tok = ToyTokenizer.from_json(checkpoint.read_state(resume_from)["tokenizer"])
    else:
        tok = ToyTokenizer.from_texts(toy_tokenizer_texts(pairs))
    m = cfg.model
    model, prompts = tiny_policy(tok, device, dtype=m.dtype, seed=m.tiny_seed, palette=m.tiny_palette)
    return model, prompts, tok.to_json()


def assemble(cfg: Config, model, prompts, pairs: list, data_root: Path, *,
             tokenizer_json: str | None = None, resume: ResumePoint | None = None) -> Components:
    """The rest of construction around a built model: what trains, the reference model, FSDP2 under
    torchrun, the optimizer, the rewards, the pair sampler, the image cache and the checkpoints.

    resume: where the run starts (`run_start.start_point`; computed here when not given)."""
    if resume is None:
        resume = start_point(cfg)
    device = next(model.parameters()).device
    env = distributed.current()  # None in a single process
    distributed.local_pairs(cfg.data.pairs_per_step, env)  # raises unless every rank gets whole pairs
    if cfg.model.lora.rank > 0:
        log.info("LoRA (base frozen): %s", lora.add_adapters(model, cfg.model.lora))
    else:
        log.info("trainable parameters: %s", janus.set_trainable(model, cfg.model.train_modules))
    if cfg.model.gradient_checkpointing:
        janus.enable_gradient_checkpointing(model)
    ref_model = None
    if cfg.algo.beta > 0:  # a frozen copy of the initial policy; never built when beta == 0
        ref_model = copy.deepcopy(model).requires_grad_(False).eval()
    fsdp = None  # parameters below are DTensor shards once the root exists
    if env is not None:
        dc = cfg.distributed
        fsdp = distributed.shard_model(model, env, param_dtype=dc.param_dtype, reduce_dtype=dc.reduce_dtype,
                                       reshard_after_forward=dc.reshard_after_forward)
    optimizer = PolicyOptimizer(model, cfg.optim, device, seed=cfg.train.seed)
    return Components(
        model=model, prompts=prompts, pairs=pairs,
        sampler=PairSampler(pairs, cfg.data.pairs_per_step, cfg.train.seed, cfg.data.shuffle),
        images=image_cache(data_root, prompts), optimizer=optimizer, rewards=build_rewards(cfg, model, prompts, device),
        checkpoints=Checkpointer(cfg.train.run_dir, model, optimizer, fsdp), device=device, dist=env, fsdp=fsdp,
        ref_model=ref_model, tokenizer_json=tokenizer_json, resume=resume)


def build_rewards(cfg: Config, model, prompts, device: torch.device) -> dict:
    """{task: reward} of `cfg.reward`; a reward that asks the policy gets its greedy `answer_questions`."""
    answer = functools.partial(answer_questions, model, prompts, max_new_tokens=cfg.rollout.max_new_tokens)
    task_rewards = {}
    for task in TASKS:
        name = getattr(cfg.reward, task)
        asks_policy = {"answer_fn": answer} if rewards.reward_needs(name).policy else {}
        task_rewards[task] = rewards.build_reward(name, cfg.reward, device=device, **asks_policy)
    return task_rewards


def image_cache(root: Path, prompts) -> ImageCache:
    """Understanding images under `root`, loaded as `prompts`' vision encoder sees them (size, padding colour)."""
    return ImageCache(root, prompts.image_size, functools.partial(load_image, background=prompts.background_color))
