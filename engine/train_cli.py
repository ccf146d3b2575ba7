"""`pairuni train [--config configs/X.yaml] [key=value ...]`: run PairGRPO.

With no arguments: the tiny random Janus on the bundled toy-world pairs, a short CPU run that
writes metrics.jsonl, TensorBoard logs, reward_curve.png and a checkpoint under runs/tiny.
The configuration is checked (and the pairs read) before any model loads.
Under `torchrun --nproc_per_node N -m engine.train_cli ...` the run is data-parallel with FSDP2
(engine/distributed.py); rank 0 logs and prints the summary.

A run holds its folder's lock (engine/lock.py) from just after the config checks to its exit: a second run
on the same folder is refused in one line naming the holder. SIGTERM / SIGINT stop the run with a verified
checkpoint of its last finished step, one line (where, and the command that resumes it), exit 143 / 130
(`trainer.StopRequest`); a second signal exits at once. An OS error (no space, read-only, permissions) is one
line naming the step, the file and the checkpoint kept.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys

from .cli import user_error


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a Janus-Pro or Lumina-DiMOO model (model.family) with PairGRPO",
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
    from .lock import RunLock, RunLockError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # bitsandbytes warns at import about optional 4-bit CPU kernels the engine never uses.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
    except ConfigError as exc:
        return user_error("train", args, exc, "config error: ")
    from .trainer import STOP_SIGNALS, Interrupted, StopRequest

    stop = StopRequest()
    stop.install()
    lock = None
    try:
        # the run folder's lock, after the config checks and before anything in the folder is read, moved or
        # written; under torchrun rank 0 takes it (the process group does not exist yet: RANK says who is 0)
        if os.environ.get("RANK", "0") == "0":
            lock = RunLock.acquire(cfg.train.run_dir)
        return _train(args, cfg, stop)
    except RunLockError as exc:
        return user_error("train", args, exc)
    except Interrupted as exc:
        print(f"pairuni train: {exc} before the first step started: nothing written, nothing to save; "
              f"start it again with: {resume_command(args, cfg.train.resume)}", file=sys.stderr)
        return STOP_SIGNALS[exc.signum]
    except OSError as exc:  # taking the lock in a folder that cannot be written
        return user_error("train", args, exc, "train.run_dir: ")
    finally:
        if lock is not None:
            lock.release()
        stop.uninstall()
        distributed.shutdown()


def _train(args, cfg, stop) -> int:
    from safetensors import SafetensorError

    from . import distributed
    from .checkpoint_store import kill_point
    from .config import ConfigError
    from .trainer import NonFiniteError, PairGRPOTrainer, Preempted

    try:
        with stop.interruptible():  # a signal abandons the start: nothing of the run is written before the model loads
            kill_point("start")
            if cfg.model.family == "dimoo":  # the second model family (engine/family.py, engine/dimoo/trainer.py)
                from .dimoo.trainer import DimooTrainer

                trainer = DimooTrainer.from_config(cfg)
            else:
                trainer = PairGRPOTrainer.from_config(cfg)
    except ConfigError as exc:
        distributed.shutdown()
        return user_error("train", args, exc, "config error: ")
    except ValueError as exc:  # a checkpoint that verified but does not load, a bad model folder, ...
        distributed.shutdown()
        return user_error("train", args, exc)
    except OSError as exc:  # a file that cannot be read or written while the run starts
        distributed.shutdown()
        return user_error("train", args, exc, "while starting: ")
    trainer.stop = stop
    finished = False
    try:
        summary = trainer.train()
        finished = True
    except Preempted as exc:
        if distributed.is_main():
            print(stop_line(exc, args), file=sys.stderr)
        return exc.exit_code
    except NonFiniteError as exc:  # names its step
        return user_error("train", args, exc)
    except (OSError, SafetensorError) as exc:  # no space, read-only, permissions: one line, what was kept
        return user_error("train", args, exc, f"{trainer.activity}: ", suffix=f"; {trainer.kept()}")
    except (ValueError, RuntimeError) as exc:  # CheckpointError, a rollout on a broken policy, ...
        return user_error("train", args, exc, f"step {trainer.step + 1}: ")
    finally:
        main = distributed.is_main()
        distributed.shutdown(wait_for_peers=finished)  # torchrun: leave the process group cleanly
    if main:  # one summary per job, from rank 0
        print(format_summary(summary))
    return 0


def resume_command(args, resume: bool = True, **replace: str) -> str:
    """The command line that continues this run: `train.resume=true` (unless `resume` is False) and `replace`'s
    `key=value` overrides in place of any the user gave for those keys."""
    replace = {"train.resume": "true", **replace} if resume else replace
    words = ["pairuni", "train"] + (["--config", args.config] if args.config else [])
    words += [o for o in args.overrides if o.split("=", 1)[0] not in replace]
    return shlex.join(words + [f"{k}={v}" for k, v in replace.items()])


def stop_line(exc, args) -> str:
    """The one line a run stopped by a signal prints: what it saved, and how to resume."""
    name = signal.Signals(exc.signum).name
    if exc.path is None:
        return (f"pairuni train: stopped by {name} before step 1 finished; nothing to save; start it again with: "
                f"{resume_command(args, False, **{'train.on_existing': 'overwrite'})}")
    what = "saved and verified" if exc.saved else "already saved"
    return (f"pairuni train: stopped by {name} after step {exc.step}; checkpoint {what}: {exc.path}; "
            f"resume with: {resume_command(args)}")


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
