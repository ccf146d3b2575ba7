"""One entry that checks a parsed config, `check(cfg)` (what `load_config` runs), before anything loads:

- each value's range (`config.check_values`);
- the rules between keys, each exported by the module that owns it (`check_config(cfg, world)`): `algo`
  (the `algo.` ranges, loss-type knobs and estimators, run through the kernels' own checks), `lora`,
  `policy` (image scoring), `rewards`, `optim`, `distributed` (torchrun), `run_start` (held-out pairs);
- what the config needs of this machine (`check_environment`): the files and folders it names exist and
  can be read, the device exists, the packages it needs import. Nothing is written, moved or deleted
  (where a run starts is `engine.run_start.start_point`).

`pairuni plan` runs the first two alone, for the process count it plans (`world`), on any machine.
Every failure is one `ConfigError` line naming the key.
"""

from __future__ import annotations

import os

from . import algo, distributed, family, lora, optim, policy, preflight, rewards, run_start
from .config import Config, ConfigError, check_values, require

RULES = (family.check_config, algo.check_config, lora.check_config, policy.check_config, rewards.check_config,
         optim.check_config, distributed.check_config, run_start.check_config)
_FROM_ENV = object()


def check(cfg: Config, *, world=_FROM_ENV, environment: bool = True) -> None:
    """Ranges and rules of `cfg` for `world` processes (default: torchrun's, None outside it), then, with
    `environment`, what it needs of this machine. Raises ConfigError naming the key."""
    if world is _FROM_ENV:
        world = distributed.torchrun_world_size()
    try:
        check_values(cfg)
        for rule in RULES:
            rule(cfg, world)
        if environment:
            check_environment(cfg)
    except preflight.PreflightError as exc:
        raise ConfigError(str(exc)) from None


def check_environment(cfg: Config) -> None:
    """The model folder, pairs files, image root, device, run folder and packages the config needs (read,
    never written)."""
    m, d, t = cfg.model, cfg.data, cfg.train
    family.check_buildable(cfg)
    require(m.path is None or os.path.isdir(m.path), "model.path", "an existing local directory (nothing is "
            "downloaded)", m.path)
    if m.path is not None and m.family == "dimoo":
        from .dimoo.folder_world import check_dimoo_folder

        try:
            check_dimoo_folder(m.path)
        except ValueError as exc:
            raise ConfigError(f"model.path: {exc}") from None
    elif m.path is not None:
        preflight.check_model_dir(m.path)
    lora.check_environment(cfg)
    require(d.pairs_path is None or os.path.isfile(d.pairs_path), "data.pairs_path", "an existing JSONL file",
            d.pairs_path)
    require(d.image_root is None or os.path.isdir(d.image_root), "data.image_root", "an existing directory", d.image_root)
    require(d.eval_pairs_path is None or os.path.isfile(d.eval_pairs_path), "data.eval_pairs_path",
            "an existing JSONL file", d.eval_pairs_path)
    rewards.check_environment(cfg)
    preflight.check_device(t.device)
    preflight.check_run_dir(t.run_dir)
