"""The model-family seam: which family a config, a checkpoint or a model folder belongs to, and the config keys
each family reads.

    family_of_source("runs/dimoo")          # "dimoo": a run folder, a checkpoint or a model folder
    check_config(cfg, world)                 # a rule of engine.checks: keys the chosen family never reads

Two families: `janus_pro` (autoregressive; engine/model.py, engine/trainer.py) and `dimoo` (Lumina-DiMOO,
masked-token discrete diffusion; engine/dimoo/). Both read the same config (engine/config.py): data, the
`algo.` objective (engine/algo.py), optim, train; each has its own rollout keys. What a family provides to the
commands (docs/ARCHITECTURE.md "Model families"):

| what | janus_pro | dimoo |
|---|---|---|
| prompts of both tasks | engine/text.py | engine/dimoo/toyworld.py, folder_world.py |
| rollouts | engine/rollout.py (KV-cached AR) | engine/dimoo/sampler.py (cosine image / block text) |
| scoring of what was sampled | engine/policy.py (teacher-forced) | engine/dimoo/scoring.py (per reveal step) |
| heads of the fused losses | gen head / lm_head | the output projection's image-code / text slices |
| the step | engine/trainer.py | engine/dimoo/pairgrpo.py, trainer.py |
| checkpoints | engine/checkpoint_store.py (one store) | the same store |
| load / export | engine/policy_io.py, export.py | engine/dimoo/model.py, run.py `export` |
| plan shapes | engine/janus_shapes.py | engine/dimoo/shapes.py |

A family's keys that the other never reads are refused when set to anything but their default (one line naming
the key), so a config never silently carries a setting that does nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import Config, ConfigError, require

FAMILIES = ("janus_pro", "dimoo")
#: Keys only model.family=dimoo reads.
DIMOO_KEYS = ("rollout.image_steps", "rollout.text_steps", "rollout.text_block_length", "rollout.reveal_order",
              "rollout.score_groups", "rollout.image_resolution")
#: Keys only model.family=janus_pro reads (the DiMOO samplers have no top-k / top-p, always score the guided
#: distribution they sampled, batch a prompt's rows in one call, decode every image for its reward and bound
#: the update's memory by rollout.score_groups, not by micro-batches).
JANUS_KEYS = ("rollout.image_top_k", "rollout.image_top_p", "rollout.image_logprob", "rollout.decode_images",
              "rollout.max_batch", "rollout.compile", "model.train_modules", "model.tiny_palette",
              "optim.micro_batch_size")


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        if not hasattr(node, part):
            return None
        node = getattr(node, part)
    return node


def check_config(cfg: Config, world: int | None) -> None:
    """A rule of `engine.checks.check`: the keys of the family not chosen stay at their defaults, and the DiMOO
    step's own limits (its objective runs per score run, `pairgrpo.unsupported`; one process)."""
    defaults = Config()
    family = cfg.model.family
    other = JANUS_KEYS if family == "dimoo" else DIMOO_KEYS
    for key in other:
        value = _get(cfg, key)
        require(value == _get(defaults, key), key, f"its default {_get(defaults, key)!r}: only model.family="
                f"{'janus_pro' if family == 'dimoo' else 'dimoo'} reads it (model.family is {family})", value)
    if family != "dimoo":
        return
    from .dimoo.pairgrpo import unsupported

    bad = unsupported(cfg.algo)
    if bad is not None:
        raise ConfigError(f"algo.{bad[0]}: expected {bad[1]} with model.family=dimoo, got "
                          f"{getattr(cfg.algo, bad[0])!r}")
    r = cfg.rollout
    require(r.temperature > 0, "rollout.temperature", "a number > 0 with model.family=dimoo (the answer sampler "
            "draws every token; RL needs sampled, scored tokens)", r.temperature)
    require(r.image_temperature > 0, "rollout.image_temperature", "a number > 0 with model.family=dimoo",
            r.image_temperature)
    require(r.max_new_tokens % r.text_block_length == 0, "rollout.max_new_tokens", f"a multiple of "
            f"rollout.text_block_length ({r.text_block_length}) with model.family=dimoo", r.max_new_tokens)
    blocks = r.max_new_tokens // r.text_block_length
    require(r.text_steps % blocks == 0, "rollout.text_steps", f"a multiple of the answer's blocks ({blocks} = "
            "rollout.max_new_tokens / rollout.text_block_length) with model.family=dimoo", r.text_steps)
    require(world is None or world <= 1, "model.family", "janus_pro under torchrun (FSDP2 for DiMOO is not "
            "built yet; run DiMOO in one process)", family)
    defaults_r = defaults.reward
    for task in ("understanding", "generation"):
        name = getattr(cfg.reward, task)
        require(cfg.model.path is not None or name == getattr(defaults_r, task), f"reward.{task}",
                f"{getattr(defaults_r, task)} for the tiny toy-world DiMOO (model.path null)", name)
        require(name != "pair_qa", f"reward.{task}", "a reward that does not ask the policy (pair_qa's greedy "
                "answers are Janus-Pro's) with model.family=dimoo", name)
    require(cfg.model.attn_implementation != "eager", "model.attn_implementation", "auto | sdpa | "
            "flash_attention_2 with model.family=dimoo", cfg.model.attn_implementation)
    require(cfg.data.shuffle, "data.shuffle", "true with model.family=dimoo (its steps draw seeded epoch "
            "shuffles, `engine.dimoo.run.step_pairs`)", cfg.data.shuffle)


def check_buildable(cfg: Config) -> None:
    """What a run of `cfg` needs that this engine does not build yet, refused before anything loads (part of
    `engine.checks.check_environment`: `pairuni plan` still plans such a run)."""
    if cfg.model.family == "dimoo":
        require(cfg.model.lora.quantize == "none", "model.lora.quantize", "none with model.family=dimoo (an NF4 "
                "base for DiMOO's LoRA is not built yet; `pairuni plan` plans it)", cfg.model.lora.quantize)


# ----------------------------------------------------------------------------- what a path on disk is
def _state_family(folder: Path) -> str | None:
    state = folder / "state.json"
    if not state.is_file():
        return None
    try:
        return json.loads(state.read_text()).get("family", "janus_pro")
    except (ValueError, AttributeError):
        return None


def _checkpoint_folders(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def family_of_source(path: str | Path) -> str | None:
    """The family of a run folder (its checkpoints' state.json, else its config.json), a checkpoint folder
    (state.json: DiMOO's say "family": "dimoo"; Janus's have no such key) or a model folder (config.json:
    model_type llada = Lumina-DiMOO, else Janus-Pro). None: none of these (the caller's own error names it)."""
    p = Path(path)
    if not p.is_dir():
        return None
    found = _state_family(p)
    if found is not None:
        return found
    for ck in reversed(_checkpoint_folders(p)):
        found = _state_family(ck)
        if found is not None:
            return found
    config = p / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except ValueError:
            return None
        if isinstance(data, dict):
            if data.get("model_type") == "llada":
                return "dimoo"
            model = data.get("model")
            if isinstance(model, dict):  # a run folder's config.json (engine.trainer writes the run's config)
                return model.get("family", "janus_pro")
            return "janus_pro"
    return None


__all__ = ["DIMOO_KEYS", "FAMILIES", "JANUS_KEYS", "check_buildable", "check_config", "family_of_source"]
