"""`pairuni train [--config configs/X.yaml] [key=value ...]`: run PairGRPO.

With no arguments: the tiny random Janus on the bundled toy-world pairs, a short CPU run that
writes metrics.jsonl, TensorBoard logs, reward_curve.png and a checkpoint under runs/tiny.
The configuration is checked (and the pairs read) before any model loads.
Under `torchrun --nproc_per_node N -m engine.train_cli ...` the run is data-parallel with FSDP2
(engine/distributed.py); rank 0 logs and prints the summary.
"""

from __future__ import annotations

import logging
import sys

from .cli import user_error


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a Janus model with PairGRPO",
        description="PairGRPO training. Overrides are dotted keys, e.g. rollout.group_size=4 train.steps=100.",
    )
    p.add_argument("--config", default=None, help="YAML file (default: the tiny demo, configs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override a config value")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run)


def run(args) -> int:
    # imported here, not at the top: `pairuni --help` imports every command module and stays fast
    from . import distributed
    from .config import ConfigError, dump_yaml, load_config

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # bitsandbytes warns at import about optional 4-bit CPU kernels the engine never uses.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        from .trainer import NonFiniteError, PairGRPOTrainer

        trainer = PairGRPOTrainer.from_config(cfg)
    except ConfigError as exc:
        distributed.shutdown()
        return user_error("train", args, exc, "config error: ")
    except ValueError as exc:  # a checkpoint that verified but does not load, a bad model folder, ...
        distributed.shutdown()
        return user_error("train", args, exc)
    finished = False
    try:
        summary = trainer.train()
        finished = True
    except NonFiniteError as exc:  # names its step
        return user_error("train", args, exc)
    except (ValueError, RuntimeError) as exc:  # CheckpointError, a rollout on a broken policy, ...
        return user_error("train", args, exc, f"step {trainer.step + 1}: ")
    finally:
        main = distributed.is_main()
        distributed.shutdown(wait_for_peers=finished)  # torchrun: leave the process group cleanly
    if main:  # one summary per job, from rank 0
        print(format_summary(summary))
    return 0


def format_summary(s: dict) -> str:
    resumed = f" (resumed at step {s['resumed_from']})" if s["resumed_from"] is not None else ""
    und = (f"{s['reward.understanding.first']:.3f} (first steps) -> "
           f"{s['reward.understanding.last']:.3f} (last steps)")
    gen = f"{s['reward.generation.first']:.3f} (first steps) -> {s['reward.generation.last']:.3f} (last steps)"
    lines = [
        f"PairGRPO: {s['steps']} steps in {s['wall_s']:.1f} s{resumed}",
        f"  understanding reward: {und}",
        f"  generation reward:    {gen}",
        f"  run dir:      {s['run_dir']}",
        f"  metrics:      {s['metrics']}",
        f"  TensorBoard:  tensorboard --logdir {s['tensorboard']}",
        f"  reward curve: {s['reward_curve']}",
        f"  checkpoint:   {s['checkpoint']}",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:  # `python -m engine.train_cli`
    from .cli import run_command

    return run_command(register, "train", argv)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["format_summary", "register", "run"]
