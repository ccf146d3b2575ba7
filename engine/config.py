"""Run configuration: the schema (dataclasses, one docstring per field, choices as `Literal` types),
YAML files and `key=value` overrides.

    cfg = load_config("configs/janus_pro_1b.yaml", ["rollout.group_size=4", "train.steps=10"])

Parsing checks every key, type and choice; `load_config` then runs `engine.checks.check`: each value's
range (`check_values`, here; the `algo.` section, `AlgoConfig`, is engine/algo.py's), the rules between keys
(in the modules that own them) and the files a config names. Every failure is a `ConfigError` naming the
key, before anything heavy loads. Nothing here writes to the disk: where a run starts (resume, an earlier
run in run_dir) and how its pairs are split is `engine.run_start`. With no file, the defaults are the tiny
demo run (`configs/tiny.yaml`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

import yaml

from .algo import AlgoConfig

# ----------------------------------------------------------------------------- choices (each module's
# tuple of names is derived from these: `engine.optim.OPTIMIZERS` is `typing.get_args(Optimizer)`)
Dtype = Literal["float32", "bfloat16", "float16"]
AttnImplementation = Literal["auto", "sdpa", "eager", "flash_attention_2"]
TrainModule = Literal["language_model", "aligner", "generation_aligner", "generation_head", "lm_head",
                      "vision_model", "vqmodel", "generation_embeddings"]
LoraTarget = Literal["attention", "mlp", "generation_head", "lm_head"]
LoraQuantize = Literal["none", "nf4"]
ImageLogprob = Literal["cond", "cfg"]
Optimizer = Literal["adamw8bit", "adamw"]
Update = Literal["round", "kahan", "stochastic_rounding"]
OnExisting = Literal["refuse", "set_aside", "overwrite"]
Family = Literal["janus_pro", "dimoo"]
RevealOrder = Literal["random", "confidence"]

#: What trains by default: everything but the vision encoder, the VQ model and the generation embeddings.
DEFAULT_TRAIN_MODULES = ("language_model", "aligner", "generation_aligner", "generation_head", "lm_head")
#: Default LoRA targets: the language model's projections and the image head.
LORA_DEFAULT_TARGETS = ("attention", "mlp", "generation_head")


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range; the message names the key.

    Raised by `load_config` / `engine.checks.check` (values, rules, files) and by `engine.run_start`
    (the checkpoint to resume, the run folder, the pairs the rewards will read)."""


@dataclass
class LoraConfig:
    """LoRA adapters (peft) instead of full fine-tuning; see engine/lora.py."""

    rank: int = 0
    """r of every adapter; 0: no LoRA (model.train_modules train in full)."""
    alpha: float = 16.0
    """Scale numerator: the adapter adds (alpha / rank) B A x."""
    dropout: float = 0.0
    """Dropout on the adapters' input during updates (0 <= dropout < 1)."""
    targets: list[LoraTarget] = field(default_factory=lambda: list(LORA_DEFAULT_TARGETS))
    """What carries adapters: attention (q/k/v/o projections) | mlp (gate/up/down) | generation_head
    (proj_out, vision_head) | lm_head. Everything else stays frozen."""
    quantize: LoraQuantize = "none"
    """The frozen language model's projections: none (model.dtype) | nf4 (bitsandbytes 4-bit NormalFloat,
    CUDA only; heads, embeddings, vision encoder and VQ model stay in model.dtype)."""


@dataclass
class ModelConfig:
    family: Family = "janus_pro"
    """janus_pro (autoregressive Janus-Pro; engine/model.py) | dimoo (Lumina-DiMOO, discrete diffusion;
    engine/dimoo/, docs/DIMOO.md). One line switches a run's family; the keys each family does not read are
    refused when set (engine/family.py)."""
    path: str | None = None
    """Local Hugging Face directory of a checkpoint of model.family (safetensors). None: the tiny random model."""
    dtype: Dtype = "float32"
    """Parameter dtype: float32 | bfloat16 | float16. Real runs use bfloat16."""
    attn_implementation: AttnImplementation = "auto"
    """auto (flash_attention_2 when flash-attn imports, else sdpa) | sdpa | eager | flash_attention_2."""
    gradient_checkpointing: bool = False
    """Recompute decoder layers in backward to save activation memory (needed for 7B on one GPU)."""
    train_modules: list[TrainModule] = field(default_factory=lambda: list(DEFAULT_TRAIN_MODULES))
    """Modules that train; everything else (vision encoder, VQ model, generation embeddings) is frozen."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters on a frozen (optionally 4-bit) base; off while lora.rank is 0."""
    tiny_seed: int = 0
    """Initialisation seed of the tiny random Janus (used only when path is None)."""
    tiny_palette: bool = True
    """Tiny model only: make its VQ decoder paint each image token as a flat block of a toy-world colour
    (white + the toy-world colours, repeated), so pixel rewards see what the tokens say. False: random decoder."""


@dataclass
class DataConfig:
    pairs_path: str | None = None
    """PairUG JSONL file. None: the bundled toy-world pairs (engine/data/toyworld_default)."""
    image_root: str | None = None
    """Directory that relative image paths in the JSONL are resolved against (default: the file's directory)."""
    pairs_per_step: int = 4
    """P: UG pairs per PairGRPO step (each gives G answers and G images)."""
    shuffle: bool = True
    """Visit pairs in a seeded random order, reshuffled each epoch."""
    max_pairs: int | None = 8
    """Use only the first max_pairs pairs of the file (None: all). The tiny demo uses 8."""
    eval_pairs_path: str | None = None
    """PairUG JSONL file of held-out pairs that `train.eval_every` evaluates on (images resolved against
    data.image_root, else the file's folder). Exclusive with eval_fraction."""
    eval_fraction: float = 0.0
    """Keep this fraction of the pairs (after max_pairs; at least one) out of training, chosen by train.seed,
    for `train.eval_every` (0: train on every pair); they are written to run_dir/eval/heldout_pairs.jsonl for
    `pairuni eval --pairs`. Exclusive with eval_pairs_path."""


@dataclass
class RolloutConfig:
    group_size: int = 8
    """G: sampled answers per question and sampled images per prompt."""
    temperature: float = 1.0
    """Sampling temperature of understanding answers (0: greedy)."""
    max_new_tokens: int = 4
    """Longest understanding answer, in tokens."""
    cfg_scale: float = 5.0
    """Classifier-free guidance scale of image generation (Janus-Pro: 5)."""
    image_temperature: float = 1.0
    """Sampling temperature of image tokens (0: greedy)."""
    image_top_k: int = 0
    """Top-k on guided image logits (0: off, as in the official Janus sampler)."""
    image_top_p: float = 1.0
    """Top-p on guided image logits (1: off)."""
    image_logprob: ImageLogprob = "cond"
    """Policy log-prob of an image token: cond (conditional branch, as T2I-R1/PairUni) | cfg (guided distribution)."""
    decode_images: bool = True
    """Decode image tokens to pixels with the VQ decoder (needed by pixel-based rewards)."""
    max_batch: int = 0
    """Most rollouts (rows) sampled at once per task; bounds KV-cache memory (0: all P * G at once)."""
    compile: bool = False
    """torch.compile the rollouts' decode step (CUDA: captured once as a CUDA graph and replayed); same tokens."""
    image_steps: int = 4
    """model.family=dimoo: denoising steps of the image sampler (cosine schedule; Lumina-DiMOO uses 64)."""
    text_steps: int = 2
    """model.family=dimoo: denoising steps of an answer (LLaDA block sampler; a multiple of its blocks)."""
    text_block_length: int = 2
    """model.family=dimoo: block length of the answer sampler (max_new_tokens is a multiple of it)."""
    reveal_order: RevealOrder = "random"
    """model.family=dimoo: which masked tokens a step reveals: random (from the rollout's seed, not the model:
    the scored ratio is exact) | confidence (DiMOO's own; the ratio omits the position choice: approximate)."""
    score_groups: int = 0
    """model.family=dimoo: most forwards (and live activations) per rollout in the update: a rollout's steps are
    split into this many runs, each scored at its first step's state (0: one per step, exact)."""
    image_resolution: int = 0
    """model.family=dimoo: generated image side in pixels, a multiple of 16 (0: the model's default: 512 for a
    Lumina-DiMOO folder, 64 for the tiny toy-world model)."""


@dataclass
class RewardConfig:
    understanding: str = "accuracy"
    """Reward of understanding answers (a name in engine/rewards.py's registry: accuracy)."""
    generation: str = "toyworld"
    """Reward of generated images (a name in engine/rewards.py's registry: toyworld | clip | hpsv2 | pair_qa)."""
    clip_path: str | None = None
    """Local directory of a transformers CLIP model (generation=clip)."""
    hpsv2_path: str | None = None
    """HPSv2 checkpoint file (generation=hpsv2; needs the `hpsv2` package)."""


@dataclass
class OptimConfig:
    optimizer: Optimizer = "adamw8bit"
    """adamw8bit (bitsandbytes) | adamw (torch); see engine/optim.py."""
    lr: float = 1e-2
    """Learning rate (PairUni: 1e-6 on Janus-Pro; the tiny random demo model needs 1e-2)."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    micro_batch_size: int = 16
    """Trajectories per forward/backward; gradients accumulate to the full batch."""
    master_weights: bool = False
    """Keep fp32 master copies of the trainable weights for the optimizer when model.dtype is bf16/fp16
    (single process). With bf16 weights and lr 1e-6 most AdamW steps are below half a bf16 ulp and are
    lost; the master copy keeps them. +4 bytes per trainable parameter (26 GiB for 7B). Under torchrun
    use model.dtype=float32 with distributed.param_dtype=bfloat16 instead (fp32 shards are the masters)."""
    update: Update = "round"
    """How a step lands in bf16 weights without master weights: round (to nearest: lr 1e-6 steps mostly
    vanish) | kahan (a bf16 compensation buffer keeps each rounding error and adds it to the next step;
    +2 bytes per trainable parameter) | stochastic_rounding (rounds up or down so the expected bf16
    weight is the fp32 one; no extra memory). kahan / stochastic_rounding need model.dtype=bfloat16,
    master_weights=false and a single process; see engine/optim.py."""


@dataclass
class TrainConfig:
    steps: int = 40
    """PairGRPO steps to run."""
    seed: int = 0
    """Seed of data order, rollouts and everything else."""
    device: str = "auto"
    """auto (cuda when available) | cpu | cuda | cuda:N."""
    run_dir: str = "runs/tiny"
    """Where metrics.jsonl, TensorBoard logs, the reward curve and checkpoints go."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    resume: bool = False
    """Continue from the newest verified checkpoint in run_dir when there is one (False: start afresh)."""
    on_existing: OnExisting = "refuse"
    """What a fresh start does when run_dir holds an earlier run (metrics, checkpoints): refuse (the
    default: nothing is ever overwritten unasked) | set_aside (move it to run_dir/previous-<time>/) |
    overwrite (set it aside, then delete it once the first step has succeeded)."""
    max_bad_steps: int = 3
    """Stop the run with an error after this many steps in a row whose loss or gradient norm was not
    finite (each such update is skipped and logged)."""
    progress: bool = True
    """Show a tqdm progress bar."""
    num_threads: int = 0
    """torch CPU threads (0: one for a model under 20 M parameters such as the tiny demo model, else torch's
    default; see engine.build.set_threads)."""
    eval_every: int = 0
    """Evaluate the policy on the held-out pairs (data.eval_pairs_path or data.eval_fraction) every N steps:
    understanding accuracy, generation reward, per tag, logged as eval/* in metrics.jsonl and TensorBoard, and
    a grid of generated images in run_dir/eval/ (0: never). Uses its own seeds: training is unchanged."""
    eval_samples: int = 4
    """Images generated per held-out prompt at each evaluation."""


@dataclass
class DistributedConfig:
    """Used only under `torchrun` (WORLD_SIZE set); see engine/distributed.py."""

    param_dtype: Dtype | None = None
    """FSDP2 compute dtype of gathered parameters (None: model.dtype). With model.dtype=float32 and
    bfloat16 here, the fp32 shards are master weights and forward/backward run in bf16."""
    reduce_dtype: Dtype | None = None
    """dtype of the gradient reduce-scatter (None: the compute dtype). float32 is the safe choice with bf16."""
    reshard_after_forward: bool = True
    """Free each decoder layer's gathered parameters after its forward (ZeRO-3); False keeps them (ZeRO-2-like)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model."""
    data: DataConfig = field(default_factory=DataConfig)
    """PairUG pairs."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling of answers and images."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward functions."""
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    """PairGRPO objective: loss type, clips, KL, entropy, advantages (engine/algo.py)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop, logging, checkpoints."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """torchrun + FSDP2 (ignored in a single process)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- parsing
def field_types(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value, tp):
    """Check `value` against the annotation `tp` (int -> float allowed); raise ConfigError otherwise."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if isinstance(value, str) and value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: expected one of {' | '.join(typing.get_args(tp))}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads "1e-6" as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # .inf / .nan would poison every step without an error
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def apply(obj, data: dict, prefix: str = "") -> None:
    """Set `obj`'s fields (a config section) from `data`, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = field_types(type(obj))
    for key, value in data.items():
        full = prefix + str(key)
        if key not in hints:
            raise ConfigError(f"{full}: unknown key; expected one of {sorted(hints)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            apply(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(full, value, hints[key]))


def parse_override(text: str) -> dict:
    """`a.b=value` -> {"a": {"b": value}}; the value is parsed as YAML (numbers, bools, null, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. rollout.group_size=4")
    from .strict_yaml import parse_yaml  # duplicate keys, anchors and aliases refused: one short line

    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    value = parse_yaml(raw, f"override {key[:80]}: cannot parse value", ConfigError) if raw.strip() else ""
    out: dict = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = (), *, check: bool = True) -> Config:
    """Defaults <- YAML file <- `key=value` overrides, then `engine.checks.check`. Raises ConfigError.

    check=False checks keys, types and choices only, not ranges, rules or files (`pairuni plan` reads a
    run's config before its model and data are downloaded)."""
    cfg = layered(Config(), path, overrides)
    if check:
        from .checks import check as check_config

        check_config(cfg)
    return cfg


def layered(cfg: Config, path: str | None, overrides) -> Config:
    """`cfg` <- YAML file <- `key=value` overrides (keys and types checked)."""
    if path is not None:  # duplicate keys, anchors and aliases refused (engine.strict_yaml): one short line
        from .strict_yaml import read_yaml

        if not os.path.isfile(path):
            raise ConfigError(f"--config: no such file {path!r}")
        apply(cfg, read_yaml(path, ConfigError) or {})
    for text in overrides:
        apply(cfg, parse_override(text))
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- ranges
def require(cond: bool, key: str, expected: str, value) -> None:
    """Raise `ConfigError("KEY: expected EXPECTED, got VALUE")` unless `cond`; every check uses it."""
    if not cond:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def check_values(cfg: Config) -> None:
    """Each value's own range (choices and types were checked while parsing); no rule between keys."""
    m, d, r, o, t = cfg.model, cfg.data, cfg.rollout, cfg.optim, cfg.train
    require(m.path != "", "model.path", "a local directory or null (the tiny model)", m.path)
    for key, path in (("data.pairs_path", d.pairs_path), ("data.image_root", d.image_root), ("data.eval_pairs_path",
                      d.eval_pairs_path), ("reward.clip_path", cfg.reward.clip_path),
                      ("reward.hpsv2_path", cfg.reward.hpsv2_path)):
        require(path is None or path.strip() != "", key, "a path or null (an empty path names nothing)", path)
    require(len(set(m.train_modules)) == len(m.train_modules), "model.train_modules", "distinct names", m.train_modules)
    require(d.pairs_per_step >= 1, "data.pairs_per_step", "an integer >= 1", d.pairs_per_step)
    require(d.max_pairs is None or d.max_pairs >= 1, "data.max_pairs", "null or an integer >= 1", d.max_pairs)
    require(0 <= d.eval_fraction < 1, "data.eval_fraction", "a number in [0, 1)", d.eval_fraction)
    require(r.group_size >= 2, "rollout.group_size", "an integer >= 2 (a group of one has zero advantage)", r.group_size)
    require(r.temperature >= 0, "rollout.temperature", "a number >= 0", r.temperature)
    require(r.max_new_tokens >= 1, "rollout.max_new_tokens", "an integer >= 1", r.max_new_tokens)
    require(r.cfg_scale >= 1, "rollout.cfg_scale", "a number >= 1", r.cfg_scale)
    require(r.image_temperature >= 0, "rollout.image_temperature", "a number >= 0", r.image_temperature)
    require(r.image_top_k >= 0, "rollout.image_top_k", "an integer >= 0", r.image_top_k)
    require(0 < r.image_top_p <= 1, "rollout.image_top_p", "a number in (0, 1]", r.image_top_p)
    require(r.max_batch >= 0, "rollout.max_batch", "an integer >= 0", r.max_batch)
    for key in ("image_steps", "text_steps", "text_block_length"):
        require(getattr(r, key) >= 1, f"rollout.{key}", "an integer >= 1", getattr(r, key))
    require(r.score_groups >= 0, "rollout.score_groups", "an integer >= 0 (0: one forward per step)", r.score_groups)
    require(r.image_resolution >= 0 and r.image_resolution % 16 == 0, "rollout.image_resolution",
            "0 or a multiple of 16 (the VQ's downsampling)", r.image_resolution)
    require(o.lr > 0, "optim.lr", "a number > 0", o.lr)
    require(o.weight_decay >= 0, "optim.weight_decay", "a number >= 0", o.weight_decay)
    require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "two numbers in [0, 1)", o.betas)
    require(o.max_grad_norm >= 0, "optim.max_grad_norm", "a number >= 0", o.max_grad_norm)
    require(o.micro_batch_size >= 1, "optim.micro_batch_size", "an integer >= 1", o.micro_batch_size)
    require(t.steps >= 1, "train.steps", "an integer >= 1", t.steps)
    require(t.save_every >= 0, "train.save_every", "an integer >= 0", t.save_every)
    require(t.num_threads >= 0, "train.num_threads", "an integer >= 0", t.num_threads)
    require(t.max_bad_steps >= 1, "train.max_bad_steps", "an integer >= 1", t.max_bad_steps)
    require(t.eval_every >= 0, "train.eval_every", "an integer >= 0", t.eval_every)
    require(t.eval_samples >= 1, "train.eval_samples", "an integer >= 1", t.eval_samples)
    require(bool(t.run_dir), "train.run_dir", "a folder (an empty path would write into the current one)", t.run_dir)
