"""Run the PairGRPO trainer on W CPU processes (gloo), as torchrun would, for tests/engine/test_distributed.py.

    python tests/engine/dist_worker.py --world 2 --out result.pt -- key=value ...

Spawns W processes with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set, each
builds `PairGRPOTrainer.from_config` (which starts the process group and shards the model with
FSDP2) and calls `train()`. Rank 0 saves {"rows": metrics rows, "params" / "grads": full
trainable parameters and the gradient of the last backward, "summary", "param_type"} to --out.
With --world 0 it runs the plain single-process trainer (no process group) and saves the same.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, out: str, overrides: list[str]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from engine import distributed
    from engine.config import load_config
    from engine.trainer import PairGRPOTrainer

    finished = False
    try:
        trainer = PairGRPOTrainer.from_config(load_config(None, overrides))
        summary = trainer.train()
        named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
        params = {n: distributed.full_tensor(p.detach()).clone() for n, p in named}
        grads = {n: distributed.full_tensor(p.grad).clone() for n, p in named if p.grad is not None}
        if rank == 0:
            torch.save({"rows": trainer_rows(trainer), "params": params, "grads": grads, "summary": summary,
                        "param_type": type(named[0][1]).__name__}, out)
        finished = True
    finally:
        distributed.shutdown(wait_for_peers=finished)


def single(out: str, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from engine.config import load_config
    from engine.trainer import PairGRPOTrainer

    trainer = PairGRPOTrainer.from_config(load_config(None, overrides))
    summary = trainer.train()
    named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    torch.save({"rows": trainer_rows(trainer), "params": {n: p.detach().clone() for n, p in named},
                "grads": {n: p.grad.clone() for n, p in named if p.grad is not None}, "summary": summary,
                "param_type": type(named[0][1]).__name__}, out)


def trainer_rows(trainer) -> list[dict]:
    import json

    path = Path(trainer.cfg.train.run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, required=True, help="processes; 0: single process, no process group")
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.world == 0:
        single(args.out, args.overrides)
    else:
        mp.spawn(worker, args=(args.world, free_port(), args.out, args.overrides), nprocs=args.world, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
