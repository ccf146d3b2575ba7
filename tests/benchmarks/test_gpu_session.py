"""The one-call GPU session (benchmarks/gpu_session.py) in its dry run: every stage on CPU with tiny
shapes, called as on the lent machine (results packed into $OUT), and the isolation of its stages:
a stage that fails or hangs is recorded, leaves nothing running, the next stages run and the summary
is written; the session budget cuts stages short instead of overrunning.
"""

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_session.py"
# the session order (GPU tests, sampler, policy loss, advantages, fused linear, 7B step, rollout), after the set-up stages
STAGES = ["environment", "build", "optimizer", "gpu_tests", "sampler", "policy_loss", "advantages", "linear",
          "train_7b", "rollout", "lora_4bit"]
NAME = re.compile(r"^[A-Za-z0-9._-]+$")

pytestmark = pytest.mark.slow


def dry_run(tmp_path: Path, *flags: str, timeout: float = 600):
    """Runs the dry run with OUT set as the device sets it; returns (process, $OUT, work dir, summary)."""
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--work", str(work), *flags], cwd=tmp_path,
                          env=dict(os.environ, OUT=str(out)), capture_output=True, text=True, timeout=timeout)
    proc.wall_s = time.monotonic() - t0
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
    assert summary is not None, f"no summary.json in $OUT\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, out, work, summary


def statuses(summary: dict) -> dict[str, str]:
    return {r["stage"]: r["status"] for r in summary["stages"]}


def returned_files(out: Path) -> list[Path]:
    """What the device would bring back from $OUT, checked against its limits on the way."""
    files = [p for p in out.rglob("*") if not p.is_dir()]
    for p in files:
        rel = p.relative_to(out)
        assert len(rel.parts) <= 3, f"{rel}: more than 2 folders down in $OUT"
        assert all(NAME.match(part) for part in rel.parts), f"{rel}: a name the device would not return"
        assert p.is_file() and not p.is_symlink(), f"{rel}: not a plain file"
        assert p.stat().st_size <= 16 * 2**20, f"{rel}: over 16 MiB"
    assert len(files) <= 8, f"{len(files)} files in $OUT, the device returns at most 8: {files}"
    return files


def alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def test_dry_run_runs_every_stage_and_packs_three_files(tmp_path):
    proc, out, work, summary = dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert [r["stage"] for r in summary["stages"]] == STAGES
    assert statuses(summary) == dict.fromkeys(STAGES, "ok"), summary["stages"]
    # only the packed files: no stage wrote into $OUT although OUT was set
    assert sorted(p.name for p in returned_files(out)) == ["session.tgz", "summary.json", "summary.md"]
    env = summary["environment"]
    assert env["dry_run"] is True and env["device"].startswith("cpu")
    assert env["torch"] == torch.__version__ and env["python"] and env["triton"]
    md = (out / "summary.md").read_text()
    assert f"torch {torch.__version__}" in md and f"Device: {env['device']}" in md
    assert all(f"| {stage} | ok |" in md for stage in STAGES)
    # every benchmark stage left its results in the packed tree
    with tarfile.open(out / "session.tgz") as tar:
        names = set(tar.getnames())
        results = {n.split("/")[-1]: tar.extractfile(n).read() for n in names if n.endswith(".json")}
    assert "session/site" not in names and not any(n.startswith("session/train_run") for n in names)
    for suite in ("sampling", "policy_loss", "advantages", "linear", "rollout"):
        rows = json.loads(results[f"{suite}_cpu_quick.json"])["rows"]
        assert rows and all("case" in r and "impl" in r for r in rows), suite
    linear = json.loads(results["linear_cpu_quick.json"])["rows"]
    fused = {r["case"]: r for r in linear if r["impl"] == "fused"}
    assert len(fused) == 2 and all(r["time_ms"] > 0 for r in fused.values()), linear
    assert not any(r["impl"] == "compiled" for r in linear)  # the dry run compiles nothing
    train = json.loads(results["train_one_gpu_smoke.json"])["results"]
    assert [r["model"] for r in train] == ["janus-pro-7b"] and train[0]["optimizer"] == "AdamW"
    assert len(train[0]["steps"]) == 2 and all(s["update_s"] > 0 for s in train[0]["steps"])
    assert train[0]["image_tokens"] == 16 and "oom" not in train[0]
    # the 4-bit LoRA stage: NF4 needs CUDA, so the dry run trains LoRA on a bf16 base and says so
    lora = json.loads(results["train_one_gpu_smoke_lora64.json"])["results"]
    assert lora[0]["lora"] == "r=64, base none" and len(lora[0]["steps"]) == 2 and "oom" not in lora[0]
    assert "4-bit NF4 skipped" in (work / "logs" / "lora_4bit.log").read_text()
    assert "LoRA on a 4-bit base" in md
    rollout = {r["impl"]: r for r in json.loads(results["rollout_cpu_quick.json"])["rows"]}
    assert set(rollout) == {"transformers", "engine"} and all(r["step_ms"] > 0 for r in rollout.values())


def test_failing_and_hanging_stages_are_recorded_and_the_next_ones_run(tmp_path):
    proc, out, work, summary = dry_run(tmp_path, "--inject", "optimizer=raise", "--inject", "sampler=raise",
                                       "--inject", "advantages=hang", "--stage-timeout", "advantages=5",
                                       "--inject", "linear=raise")
    assert proc.returncode == 1
    got = statuses(summary)
    assert list(got) == STAGES
    assert got["optimizer"].startswith("failed") and got["sampler"].startswith("failed")
    assert got["linear"].startswith("failed")
    assert got["advantages"] == "timed out after 5 s"
    # the stages after each failure ran: gpu_tests after optimizer, policy_loss after sampler, train_7b last
    for stage in ("environment", "build", "gpu_tests", "policy_loss", "train_7b"):
        assert got[stage] == "ok", (stage, summary["stages"])
    records = {r["stage"]: r for r in summary["stages"]}
    assert "injected failure of stage sampler" in records["sampler"]["tail"]
    assert "injected failure of stage optimizer" in records["optimizer"]["tail"]
    # the hung stage's own child was killed with it, not left running through the later stages
    child = int((work / "logs" / "advantages.hang_child.pid").read_text())
    assert not alive(child), f"the hung stage's child {child} is still running"
    assert records["advantages"]["seconds"] < 30
    # without the optimizer stage the 7B step fell back to AdamW, and the summary says why
    md = (out / "summary.md").read_text()
    assert "Optimizer of the 7B step: adamw" in md and "optimizer stage failed" in md
    assert "## sampler: failed" in md and "## advantages: timed out after 5 s" in md
    returned_files(out)


def test_budget_cuts_the_session_short_and_still_writes_the_summary(tmp_path):
    budget = 24.0
    proc, out, work, summary = dry_run(tmp_path, "--budget", str(budget))
    assert proc.returncode == 1
    got = statuses(summary)
    assert list(got) == STAGES and got["environment"] == "ok"
    assert got["train_7b"] == "skipped: session budget spent"
    assert proc.wall_s < budget + 10, f"a {budget} s session took {proc.wall_s:.0f} s"
    assert (out / "summary.md").exists() and (out / "session.tgz").exists()
