"""What a run reports: metrics.jsonl, TensorBoard scalars, the reward-curve PNG, the end-of-run summary.

One row per step (`PairGRPOTrainer.train_step`): the step, mean rewards, the loss statistics of
the last inner epoch per task, the gradient norm, timings, (CUDA) peak memory and, at an evaluation
step (`train.eval_every`), the `eval/*` numbers of engine/evaluate.py (whose image grid goes to
TensorBoard as an image). Only rank 0
writes; a resumed run drops the rows after its checkpoint (when its first step has succeeded,
never before), so the file reads like one run.

The file is strict JSON, one object a line: a non-finite number (a NaN loss of a skipped update) is
written as null and its key listed in the row's `nonfinite` (`{"loss.generation": null, ...,
"nonfinite": ["loss.generation"]}`); rows read back (a resumed run's) hold NaN there again.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from .files import atomic_writer

log = logging.getLogger("pairuni.metrics")

REWARD_KEYS = (("reward.understanding", "understanding"), ("reward.generation", "generation"))


def strict_row(row: dict) -> dict:
    """`row` as strict JSON holds it: each non-finite number is null, its key listed in `nonfinite`."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return row
    return {**{k: None if k in bad else v for k, v in row.items()}, "nonfinite": bad}


def read_row(line: str) -> dict:
    """A metrics.jsonl line as the run wrote it: the keys its `nonfinite` lists hold NaN again."""
    row = json.loads(line)
    for key in row.pop("nonfinite", None) or ():
        row[key] = math.nan
    return row


def _line(row: dict) -> str:
    return json.dumps(strict_row(row), allow_nan=False)


def _row_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a blank or torn one (a kill mid-append), so it is dropped."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class MetricsLog:
    """metrics.jsonl + TensorBoard scalars + a reward-curve PNG, all in the run directory.

    enabled=False (ranks other than 0) keeps the rows in memory and writes nothing.
    """

    def __init__(self, run_dir: Path, start_step: int, *, enabled: bool = True):
        self.run_dir, self.enabled = run_dir, enabled
        self.path = run_dir / "metrics.jsonl"
        self.rows: list[dict] = []
        self.tb = None
        if not enabled:
            return
        kept = []
        if self.path.exists():  # a resumed run rewrites history after its checkpoint ...
            kept = [ln for ln in self.path.read_text().splitlines() if _row_step(ln) <= start_step]
        self.rows = [read_row(ln) for ln in kept]
        # ... but only once its first step succeeded (rows of an older, non-strict file made strict)
        self._rewrite = [_line(r) for r in self.rows] if self.path.exists() else None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)
        except ImportError:
            log.warning("tensorboard is not installed; TensorBoard logs are skipped")

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        if self._rewrite is not None:
            with atomic_writer(self.path) as fh:
                fh.write("".join(ln + "\n" for ln in self._rewrite))
            self._rewrite = None
        with open(self.path, "a") as fh:
            fh.write(_line(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k.replace(".", "/"), v, row["step"])

    def image(self, tag: str, image, step: int) -> None:
        """A PIL image in TensorBoard under `tag` at `step` (no-op without TensorBoard or off rank 0)."""
        if self.enabled and self.tb is not None:
            import numpy as np

            self.tb.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def plot(self) -> Path | None:
        return plot_rewards(self.run_dir, self.rows) if self.enabled else None

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_rewards(run_dir: Path, rows: list[dict]) -> Path | None:
    """run_dir/reward_curve.png: both mean rewards per step of `rows` (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in REWARD_KEYS:
        ax.plot(steps, [r[key] for r in rows], marker=".", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_title("PairGRPO rewards")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run_dir / "reward_curve.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def summarize(rows: list[dict]) -> dict:
    """Mean rewards over the first and the last k steps (k = a third of the run, 1 to 5)."""
    k = max(1, min(5, len(rows) // 3))
    out = {}
    for key, _ in REWARD_KEYS:
        out[f"{key}.first"] = sum(r[key] for r in rows[:k]) / k
        out[f"{key}.last"] = sum(r[key] for r in rows[-k:]) / k
    return out
