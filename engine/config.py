"""Run configuration: dataclasses with one docstring per field, YAML files, `key=value` overrides.

    cfg = load_config("configs/janus_pro_1b.yaml", ["rollout.group_size=4", "train.steps=10"])

`load_config` checks every value (types, ranges, files that must exist) and raises
`ConfigError` naming the key before anything heavy (a model, a dataset) is loaded.
With no file, the defaults are the tiny demo run (`configs/tiny.yaml` holds the same values).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from pairuni_kernels.reference import KL_ESTIMATORS, LOSS_AGG_MODES

from . import checkpoint, distributed, rewards
from .checkpoint_store import CheckpointError
from .data import default_pairs_path
from .data.sampler import read_training_pairs
from .lora import DEFAULT_TARGETS as LORA_DEFAULT_TARGETS
from .lora import QUANTIZE as LORA_QUANTIZE
from .lora import TARGETS as LORA_TARGETS
from .model import ATTN_IMPLEMENTATIONS, DEFAULT_TRAIN_MODULES, DTYPES, TRAINABLE_MODULE_NAMES
from .optim import OPTIMIZERS, UPDATES
from .policy import IMAGE_LOGPROBS, PAIR_WEIGHTINGS
from .preflight import PreflightError, check_device, check_model_dir, check_run_dir, history_of


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range; the message names the key.

    Raised only from this module: `load_config` / `validate` (values, files, the launch, the
    checkpoint to resume) and `validated_pairs` (the data the rewards will read)."""


@dataclass
class LoraConfig:
    """LoRA adapters (peft) instead of full fine-tuning; see engine/lora.py."""

    rank: int = 0
    """r of every adapter; 0: no LoRA (model.train_modules train in full)."""
    alpha: float = 16.0
    """Scale numerator: the adapter adds (alpha / rank) B A x."""
    dropout: float = 0.0
    """Dropout on the adapters' input during updates (0 <= dropout < 1)."""
    targets: list[str] = field(default_factory=lambda: list(LORA_DEFAULT_TARGETS))
    """What carries adapters: attention (q/k/v/o projections) | mlp (gate/up/down) | generation_head
    (proj_out, vision_head) | lm_head. Everything else stays frozen."""
    quantize: str = "none"
    """The frozen language model's projections: none (model.dtype) | nf4 (bitsandbytes 4-bit NormalFloat,
    CUDA only; heads, embeddings, vision encoder and VQ model stay in model.dtype)."""


@dataclass
class ModelConfig:
    path: str | None = None
    """Local Hugging Face directory of a Janus-Pro checkpoint (safetensors). None: the tiny random Janus."""
    dtype: str = "float32"
    """Parameter dtype: float32 | bfloat16 | float16. Real runs use bfloat16."""
    attn_implementation: str = "auto"
    """auto (flash_attention_2 when flash-attn imports, else sdpa) | sdpa | eager | flash_attention_2."""
    gradient_checkpointing: bool = False
    """Recompute decoder layers in backward to save activation memory (needed for 7B on one GPU)."""
    train_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TRAIN_MODULES))
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
    image_logprob: str = "cond"
    """Policy log-prob of an image token: cond (conditional branch, as T2I-R1/PairUni) | cfg (guided distribution)."""
    decode_images: bool = True
    """Decode image tokens to pixels with the VQ decoder (needed by pixel-based rewards)."""
    max_batch: int = 0
    """Most rollouts (rows) sampled at once per task; bounds KV-cache memory (0: all P * G at once)."""
    compile: bool = False
    """torch.compile the rollouts' decode step (CUDA: captured once as a CUDA graph and replayed); same tokens."""


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
class AlgoConfig:
    epsilon_low: float = 0.2
    """PPO clip: ratio >= 1 - epsilon_low."""
    epsilon_high: float = 0.2
    """PPO clip: ratio <= 1 + epsilon_high."""
    beta: float = 0.0
    """KL coefficient; > 0 loads a frozen reference model (PairUni: 0)."""
    kl_estimator: str = "k3"
    """k1 | k2 | k3."""
    loss_agg_mode: str = "token-mean"
    """token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm."""
    mu: int = 2
    """Inner epochs: optimizer steps on each rollout batch (1 is on-policy GRPO)."""
    use_pair_weights: bool = True
    """Multiply both halves' advantages by w_p (1 aligned, sqrt(s) retrieved); False: plain GRPO."""
    pair_weighting: str = "sqrt"
    """w_p of a retrieved pair when use_pair_weights: sqrt (PairUni: sqrt(s)) | linear (s), the paper's
    weighting ablation. Aligned pairs always weigh 1."""
    advantage_eps: float = 1e-6
    """Added to the group std before dividing."""
    understanding_weight: float = 1.0
    """Weight of the understanding loss in the summed loss."""
    generation_weight: float = 1.0
    """Weight of the generation loss in the summed loss."""


@dataclass
class OptimConfig:
    optimizer: str = "adamw8bit"
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
    update: str = "round"
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
    on_existing: str = "refuse"
    """What a fresh start does when run_dir holds an earlier run (metrics, checkpoints): refuse (the
    default: nothing is ever overwritten unasked) | set_aside (move it to run_dir/previous-<time>/) |
    overwrite (set it aside, then delete it once the first step has succeeded)."""
    max_bad_steps: int = 3
    """Stop the run with an error after this many steps in a row whose loss or gradient norm was not
    finite (each such update is skipped and logged)."""
    progress: bool = True
    """Show a tqdm progress bar."""
    num_threads: int = 0
    """torch CPU threads (0: leave torch's default)."""
    eval_every: int = 0
    """Evaluate the policy on the held-out pairs (data.eval_pairs_path or data.eval_fraction) every N steps:
    understanding accuracy, generation reward, per tag, logged as eval/* in metrics.jsonl and TensorBoard, and
    a grid of generated images in run_dir/eval/ (0: never). Uses its own seeds: training is unchanged."""
    eval_samples: int = 4
    """Images generated per held-out prompt at each evaluation."""


@dataclass
class DistributedConfig:
    """Used only under `torchrun` (WORLD_SIZE set); see engine/distributed.py."""

    param_dtype: str | None = None
    """FSDP2 compute dtype of gathered parameters (None: model.dtype). With model.dtype=float32 and
    bfloat16 here, the fp32 shards are master weights and forward/backward run in bf16."""
    reduce_dtype: str | None = None
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
    """PairGRPO loss."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop, logging, checkpoints."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """torchrun + FSDP2 (ignored in a single process)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loading
def _field_types(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value, tp):
    """Check `value` against the annotation `tp` (int -> float allowed); raise ConfigError otherwise."""
    origin = typing.get_origin(tp)
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


def _apply(obj, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = _field_types(type(obj))
    for key, value in data.items():
        full = prefix + str(key)
        if key not in hints:
            raise ConfigError(f"{full}: unknown key; expected one of {sorted(hints)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(full, value, hints[key]))


def parse_override(text: str) -> dict:
    """`a.b=value` -> {"a": {"b": value}}; the value is parsed as YAML (numbers, bools, null, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. rollout.group_size=4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: cannot parse value: {exc}") from exc
    out: dict = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = (), *, check: bool = True) -> Config:
    """Defaults <- YAML file <- `key=value` overrides, then `validate`. Raises ConfigError.

    check=False checks keys and types only, not values or files (`pairuni plan` reads a run's config
    before its model and data are downloaded)."""
    cfg = _layered(Config(), path, overrides)
    if check:
        validate(cfg)
    return cfg


def _layered(cfg: Config, path: str | None, overrides) -> Config:
    """`cfg` <- YAML file <- `key=value` overrides (keys and types checked)."""
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"--config: no such file {path!r}")
        with open(path) as fh:
            try:
                data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"--config {path}: invalid YAML: {exc}") from exc
        _apply(cfg, data)
    for text in overrides:
        _apply(cfg, parse_override(text))
    return cfg


#: Sections of an evaluated run's config that `pairuni eval` takes over (how it samples and scores).
EVAL_SECTIONS = ("rollout", "reward")


def eval_config(saved: dict | None, path: str | None = None, overrides=(), *, pairs_path: str | None,
                device: str = "auto", max_pairs: int | None = None, out: str | None = None) -> Config:
    """The config `pairuni eval` runs with: the evaluated run's rollout and reward settings (`saved`: that run's
    config as a dict, when known; keys this engine does not know are ignored), then the YAML file and the
    `key=value` overrides, then the evaluation's own pairs file and device. Validated as a run is (the model
    comes from --model, not model.path); raises ConfigError."""
    cfg = Config()
    for section in EVAL_SECTIONS:
        known = _field_types(type(getattr(cfg, section)))
        values = {k: v for k, v in ((saved or {}).get(section) or {}).items() if k in known}
        _apply(getattr(cfg, section), values, f"{section}.")
    cfg = _layered(cfg, path, overrides)
    _check(pairs_path is None or os.path.isfile(pairs_path), "--pairs", "an existing JSONL file", pairs_path)
    d, t = cfg.data, cfg.train
    d.pairs_path, d.max_pairs, d.pairs_per_step, d.eval_pairs_path, d.eval_fraction = pairs_path, max_pairs, 1, None, 0.0
    cfg.model.path = None
    t.device, t.resume, t.eval_every, t.run_dir = device, False, 0, out or "."
    validate(cfg)
    return cfg


def _check(cond: bool, key: str, expected: str, value) -> None:
    if not cond:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def validate(cfg: Config) -> None:
    """Range and consistency checks; raises ConfigError naming the key. Touches only the file system."""
    m, d, r, w, a, o, t = cfg.model, cfg.data, cfg.rollout, cfg.reward, cfg.algo, cfg.optim, cfg.train
    _check(m.path is None or os.path.isdir(m.path), "model.path", "an existing local directory (nothing is downloaded)", m.path)
    if m.path is not None:
        _preflight(check_model_dir, m.path)
    _check(m.dtype in DTYPES, "model.dtype", f"one of {tuple(DTYPES)}", m.dtype)
    _check(m.attn_implementation in ATTN_IMPLEMENTATIONS, "model.attn_implementation",
           " | ".join(ATTN_IMPLEMENTATIONS), m.attn_implementation)
    bad = [n for n in m.train_modules if n not in TRAINABLE_MODULE_NAMES]
    _check(not bad, "model.train_modules", f"names from {TRAINABLE_MODULE_NAMES}", m.train_modules)
    _validate_lora(cfg)
    _check(d.pairs_path is None or os.path.isfile(d.pairs_path), "data.pairs_path", "an existing JSONL file", d.pairs_path)
    _check(d.image_root is None or os.path.isdir(d.image_root), "data.image_root", "an existing directory", d.image_root)
    _check(d.pairs_per_step >= 1, "data.pairs_per_step", "an integer >= 1", d.pairs_per_step)
    _check(d.max_pairs is None or d.max_pairs >= 1, "data.max_pairs", "null or an integer >= 1", d.max_pairs)
    _check(r.group_size >= 2, "rollout.group_size", "an integer >= 2 (a group of one has zero advantage)", r.group_size)
    _check(r.temperature >= 0, "rollout.temperature", "a number >= 0", r.temperature)
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", "an integer >= 1", r.max_new_tokens)
    _check(r.cfg_scale >= 1, "rollout.cfg_scale", "a number >= 1", r.cfg_scale)
    _check(r.image_temperature >= 0, "rollout.image_temperature", "a number >= 0", r.image_temperature)
    _check(r.image_top_k >= 0, "rollout.image_top_k", "an integer >= 0", r.image_top_k)
    _check(0 < r.image_top_p <= 1, "rollout.image_top_p", "a number in (0, 1]", r.image_top_p)
    _check(r.max_batch >= 0, "rollout.max_batch", "an integer >= 0", r.max_batch)
    _check(r.image_logprob in IMAGE_LOGPROBS, "rollout.image_logprob", " | ".join(IMAGE_LOGPROBS), r.image_logprob)
    if r.image_logprob == "cfg":
        _check(r.image_top_k == 0 and r.image_top_p == 1.0, "rollout.image_logprob",
               "cond when top-k/top-p is on (the trainer scores the untruncated guided distribution)", r.image_logprob)
    for task in rewards.TASKS:
        name = getattr(w, task)
        names = rewards.reward_names(task)
        _check(name in names, f"reward.{task}", f"one of {names}", name)
        needs = rewards.reward_needs(name)
        if needs.images:
            _check(r.decode_images, "rollout.decode_images", f"true (reward.{task}={name} reads decoded images)",
                   r.decode_images)
        if needs.path is not None:
            key, kind = needs.path
            value = getattr(w, key)
            exists = os.path.isdir if kind == "dir" else os.path.isfile
            what = "a local CLIP model directory" if kind == "dir" else "a local checkpoint file"
            _check(value is not None and exists(value), f"reward.{key}", f"{what} (reward.{task}={name})", value)
        if needs.module is not None:
            _check_importable(f"reward.{task}", name, *needs.module)
    _check(0 <= a.epsilon_low <= 1, "algo.epsilon_low", "a number in [0, 1]", a.epsilon_low)
    _check(a.epsilon_high >= 0, "algo.epsilon_high", "a number >= 0", a.epsilon_high)
    _check(a.beta >= 0, "algo.beta", "a number >= 0", a.beta)
    _check(a.kl_estimator in KL_ESTIMATORS, "algo.kl_estimator", " | ".join(KL_ESTIMATORS), a.kl_estimator)
    _check(a.pair_weighting in PAIR_WEIGHTINGS, "algo.pair_weighting", " | ".join(PAIR_WEIGHTINGS), a.pair_weighting)
    _check(a.loss_agg_mode in LOSS_AGG_MODES, "algo.loss_agg_mode", f"one of {LOSS_AGG_MODES}", a.loss_agg_mode)
    _check(a.mu >= 1, "algo.mu", "an integer >= 1", a.mu)
    _check(a.advantage_eps >= 0, "algo.advantage_eps", "a number >= 0", a.advantage_eps)
    _check(a.understanding_weight >= 0 and a.generation_weight >= 0 and a.understanding_weight + a.generation_weight > 0,
           "algo.understanding_weight/generation_weight", "weights >= 0, not both 0",
           (a.understanding_weight, a.generation_weight))
    _check(o.optimizer in OPTIMIZERS, "optim.optimizer", " | ".join(OPTIMIZERS), o.optimizer)
    _check(o.update in UPDATES, "optim.update", " | ".join(UPDATES), o.update)
    if o.update != "round":
        _check(m.dtype == "bfloat16", "optim.update", f"round unless model.dtype=bfloat16 (got {m.dtype})", o.update)
        _check(not o.master_weights, "optim.update", "round with optim.master_weights=true (the masters already "
               "keep every step)", o.update)
    _check(o.lr > 0, "optim.lr", "a number > 0", o.lr)
    _check(o.weight_decay >= 0, "optim.weight_decay", "a number >= 0", o.weight_decay)
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "two numbers in [0, 1)", o.betas)
    _check(o.max_grad_norm >= 0, "optim.max_grad_norm", "a number >= 0", o.max_grad_norm)
    _check(o.micro_batch_size >= 1, "optim.micro_batch_size", "an integer >= 1", o.micro_batch_size)
    _check(t.steps >= 1, "train.steps", "an integer >= 1", t.steps)
    _check(t.save_every >= 0, "train.save_every", "an integer >= 0", t.save_every)
    _check(t.num_threads >= 0, "train.num_threads", "an integer >= 0", t.num_threads)
    dc = cfg.distributed
    for key in ("param_dtype", "reduce_dtype"):
        value = getattr(dc, key)
        _check(value is None or value in DTYPES, f"distributed.{key}", f"null or one of {tuple(DTYPES)}", value)
    _check(t.max_bad_steps >= 1, "train.max_bad_steps", "an integer >= 1", t.max_bad_steps)
    _validate_eval(cfg)
    _check(t.on_existing in ON_EXISTING, "train.on_existing", " | ".join(ON_EXISTING), t.on_existing)
    _preflight(check_device, t.device)
    _preflight(check_run_dir, t.run_dir)
    _validate_launch(cfg)
    _validate_resume(cfg)


def _validate_lora(cfg: Config) -> None:
    lo = cfg.model.lora
    _check(lo.rank >= 0, "model.lora.rank", "an integer >= 0 (0: no LoRA)", lo.rank)
    _check(lo.alpha > 0, "model.lora.alpha", "a number > 0", lo.alpha)
    _check(0 <= lo.dropout < 1, "model.lora.dropout", "a number in [0, 1)", lo.dropout)
    _check(bool(lo.targets) and all(t in LORA_TARGETS for t in lo.targets) and len(set(lo.targets)) == len(lo.targets),
           "model.lora.targets", f"distinct names from {tuple(LORA_TARGETS)}", lo.targets)
    _check(lo.quantize in LORA_QUANTIZE, "model.lora.quantize", " | ".join(LORA_QUANTIZE), lo.quantize)
    if lo.rank == 0:
        _check(lo.quantize == "none", "model.lora.quantize", "none while model.lora.rank is 0 (a 4-bit base cannot "
               "be fully fine-tuned)", lo.quantize)
        return
    _check(sorted(cfg.model.train_modules) == sorted(DEFAULT_TRAIN_MODULES), "model.train_modules",
           "the default with model.lora.rank > 0 (only the adapters train; choose them with model.lora.targets)",
           cfg.model.train_modules)
    _check(distributed.torchrun_world_size() is None, "model.lora.rank", "0 under torchrun (LoRA runs in a single "
           "process)", lo.rank)
    _check(cfg.optim.update == "round", "optim.update", "round with LoRA (the adapters are fp32)", cfg.optim.update)
    if lo.quantize == "nf4":
        device = cfg.train.device
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        _check(cuda, "model.lora.quantize", f"none on {device if device != 'auto' else 'a machine without CUDA'} "
               "(bitsandbytes NF4 runs on CUDA only; use quantize=none for a frozen model.dtype base)", lo.quantize)
        _check(cfg.model.dtype != "float32", "model.dtype", "bfloat16 or float16 with model.lora.quantize=nf4 "
               "(the 4-bit layers compute in model.dtype)", cfg.model.dtype)
        _check_importable("model.lora.quantize", "nf4", "bitsandbytes", "pip install bitsandbytes")
    _check_importable("model.lora.rank", str(lo.rank), "peft", "pip install peft")


def _validate_eval(cfg: Config) -> None:
    d, t = cfg.data, cfg.train
    _check(d.eval_pairs_path is None or os.path.isfile(d.eval_pairs_path), "data.eval_pairs_path",
           "an existing JSONL file", d.eval_pairs_path)
    _check(0 <= d.eval_fraction < 1, "data.eval_fraction", "a number in [0, 1)", d.eval_fraction)
    _check(d.eval_pairs_path is None or d.eval_fraction == 0, "data.eval_fraction",
           "0 when data.eval_pairs_path is set (one held-out split)", d.eval_fraction)
    _check(t.eval_every >= 0, "train.eval_every", "an integer >= 0", t.eval_every)
    _check(t.eval_every == 0 or d.eval_pairs_path is not None or d.eval_fraction > 0, "train.eval_every",
           "0 without held-out pairs (set data.eval_pairs_path or data.eval_fraction)", t.eval_every)
    _check(t.eval_samples >= 1, "train.eval_samples", "an integer >= 1", t.eval_samples)


def _preflight(check, *args) -> None:
    """Run an environment check of engine/preflight.py; its one-line error becomes a ConfigError."""
    try:
        check(*args)
    except PreflightError as exc:
        raise ConfigError(str(exc)) from None


def _check_importable(key: str, name: str, module: str, install: str) -> None:
    """Import `module` now: any failure (missing, or a broken install that raises something other than
    ImportError) becomes one line naming the key, before a model loads."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any import failure is reported the same way
        first = (str(exc).splitlines() or [""])[0]
        raise ConfigError(f"{key}={name} needs the `{module}` package ({type(exc).__name__}: {first}); "
                          f"install it with: {install}") from None


def _validate_launch(cfg: Config) -> None:
    """What a torchrun (FSDP2) launch cannot do; checked before the process group starts."""
    world = distributed.torchrun_world_size()
    if world is None:
        return
    _check(cfg.optim.optimizer != "adamw8bit", "optim.optimizer",
           "adamw under torchrun (bitsandbytes cannot step FSDP2's DTensor parameters; adamw's state is "
           "sharded over the ranks)", cfg.optim.optimizer)
    _check(not cfg.optim.master_weights or cfg.model.dtype == "float32", "optim.master_weights",
           "false under torchrun with bf16/fp16 weights (use model.dtype=float32 with distributed.param_dtype=bfloat16: "
           "the fp32 shards are the master weights)", cfg.optim.master_weights)
    _check(cfg.optim.update == "round", "optim.update", "round under torchrun (use model.dtype=float32 with "
           "distributed.param_dtype=bfloat16: the fp32 shards are the master weights)", cfg.optim.update)
    _check(cfg.data.pairs_per_step % world == 0, "data.pairs_per_step",
           f"a multiple of the {world} ranks (every rank holds whole pairs)", cfg.data.pairs_per_step)


ON_EXISTING = ("refuse", "set_aside", "overwrite")


def start_point(cfg: Config) -> checkpoint.ResumePoint:
    """Where a training run starts: the newest fully verified checkpoint when `train.resume` finds one
    (`.skipped` lists what it passed over), else step 0 in a run_dir that holds nothing the user did
    not give up (`train.on_existing`). Call it before the model loads."""
    point = checkpoint.ResumePoint(None)
    if cfg.train.resume:
        try:
            point = checkpoint.find_resume_point(cfg.train.run_dir)
        except CheckpointError as exc:
            raise ConfigError(f"train.resume: {exc}") from None
    if point.path is None:
        _check_fresh_start(cfg)
    return point


def _check_fresh_start(cfg: Config) -> None:
    history = history_of(cfg.train.run_dir)
    if history and cfg.train.on_existing == "refuse":
        raise ConfigError(
            f"train.run_dir: {cfg.train.run_dir} holds an earlier run ({', '.join(history)})"
            f"{' but no checkpoint to resume' if cfg.train.resume else '; continue it with train.resume=true'}; "
            "start afresh with train.on_existing=set_aside (moves it to previous-<time>/) or =overwrite")


def _validate_resume(cfg: Config) -> None:
    """The checkpoint a resumed run starts from: complete, of the right kind (sharded or not), and
    written with the same trajectory-defining config."""
    if not cfg.train.resume:
        return
    try:  # manifests and sizes only: the trainer verifies the checksums when it loads
        point = checkpoint.find_resume_point(cfg.train.run_dir, deep=False)
    except CheckpointError as exc:
        raise ConfigError(f"train.resume: {exc}") from None
    if point.path is None:
        return
    latest = point.path
    sharded = checkpoint.is_sharded(latest)
    _check(not sharded or distributed.torchrun_world_size() is not None, "train.resume",
           f"a torchrun launch to resume {latest} (written by a torchrun run; any number of processes works, "
           "--nproc_per_node 1 included)", cfg.train.resume)
    _check(sharded or distributed.torchrun_world_size() is None, "train.resume",
           f"a single process to resume {latest} (a single-process checkpoint)", cfg.train.resume)
    try:
        saved = checkpoint.read_state(latest).get("config", {})
    except (OSError, ValueError) as exc:
        raise ConfigError(f"train.resume: {latest}/state.json cannot be read ({exc})") from None
    changes = trajectory_changes(saved, cfg.to_dict())
    if changes:
        raise ConfigError(f"train.resume: {latest} was written with another config, and these keys change what "
                          f"the run computes: {'; '.join(changes)} (start a new run_dir to change them)")


def _half(pair, task: str):
    return pair.understand if task == "understanding" else pair.generate


@dataclass
class DataSplits:
    """The pairs of a run: `train` (image root `root`) and the held-out `eval` pairs (image root `eval_root`;
    empty without data.eval_pairs_path / data.eval_fraction)."""

    train: list
    root: Path
    eval: list
    eval_root: Path


def _read_checked(cfg: Config, path: str, key: str, max_pairs: int | None):
    names = [cfg.reward.understanding, cfg.reward.generation]
    checks = [lambda pair, name=name: rewards.check_sample(name, _half(pair, rewards.reward_needs(name).task))
              for name in names]
    try:
        return read_training_pairs(path, max_pairs=max_pairs, image_root=cfg.data.image_root, checks=checks)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{key}: {exc}") from None


#: Added to train.seed to choose the held-out pairs of data.eval_fraction.
EVAL_SPLIT_SEED = 104_729


def data_splits(cfg: Config) -> DataSplits:
    """The training and held-out pairs of `cfg.data`, each pair checked for what the rollouts and both
    rewards read. Reads only the pairs files and checks image files exist: call it before any model loads.

    data.eval_fraction holds out max(1, round(n * fraction)) of the n pairs, drawn by train.seed; the
    training pairs keep their file order."""
    d = cfg.data
    path = d.pairs_path or str(default_pairs_path())
    pairs, root = _read_checked(cfg, path, "data.pairs_path", d.max_pairs)
    held, eval_root = [], root
    if d.eval_fraction > 0:
        import torch

        n_eval = max(1, round(len(pairs) * d.eval_fraction))
        _check(n_eval < len(pairs), "data.eval_fraction", f"a fraction that leaves training pairs of the {len(pairs)}",
               d.eval_fraction)
        g = torch.Generator().manual_seed(cfg.train.seed + EVAL_SPLIT_SEED)
        out = set(torch.randperm(len(pairs), generator=g)[:n_eval].tolist())
        held = [p for i, p in enumerate(pairs) if i in out]
        pairs = [p for i, p in enumerate(pairs) if i not in out]
    elif d.eval_pairs_path is not None:
        held, eval_root = _read_checked(cfg, d.eval_pairs_path, "data.eval_pairs_path", None)
    what = f"the {len(pairs)} training pairs in {path}" if held and d.eval_fraction > 0 else f"the {len(pairs)} pairs in {path}"
    _check(len(pairs) >= d.pairs_per_step, "data.pairs_per_step", f"at most {what}", d.pairs_per_step)
    return DataSplits(pairs, root, held, eval_root)


def validated_pairs(cfg: Config):
    """(training pairs, image root) of `cfg.data` (see `data_splits`)."""
    splits = data_splits(cfg)
    return splits.train, splits.root


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# Keys a resumed run may change: none of them alters what a step computes (or which steps run,
# beyond how many). Every other key is part of the trajectory that "exact resume" promises.
RESUME_MAY_CHANGE = frozenset({"train.steps", "train.save_every", "train.progress", "train.resume", "train.run_dir",
                               "train.on_existing", "train.max_bad_steps", "train.eval_every", "train.eval_samples",
                               "data.eval_pairs_path"})


def _flatten(tree: dict, prefix: str = "") -> dict[str, typing.Any]:
    flat: dict[str, typing.Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def trajectory_changes(saved: dict, current: dict) -> list[str]:
    """`key: saved -> current` for every key outside RESUME_MAY_CHANGE whose value differs. A key the saved
    config lacks (written before the key existed) counts as its default, which is what that run did."""
    old, new = {**_flatten(Config().to_dict()), **_flatten(saved)}, _flatten(current)
    missing = object()
    return [f"{key}: {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}"
            for key in sorted(old.keys() | new.keys())
            if key not in RESUME_MAY_CHANGE and old.get(key, missing) != new.get(key, missing)]
