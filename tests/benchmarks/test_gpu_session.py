"""The one-call GPU session (benchmarks/gpu_session.py) in its dry run: every stage on CPU with tiny
shapes, called as on the lent machine (results packed into $OUT), and what makes one call lose nothing:
a stage that fails or hangs is recorded, leaves nothing running, the next stages run; a stage cut by its
cap keeps the rows it measured; a failed build leaves the benchmark stages importing the checkout;
$OUT is rewritten after every stage, so killing the whole session keeps what it had; the caps fit 7
minutes; the session budget cuts stages short instead of overrunning.

The compile stage runs a stand-in for kernel_resources.py --warm-cache here (the real one compiles 357
kernels: over a minute on 2 cores; `make cuda-build` runs the dry run with it).
"""

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_session.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_session  # noqa: E402

# the session order: set-up (environment, build, Triton compiles, optimizer), GPU tests, the benchmark
# suites, the 7B step, the rollout, the 4-bit LoRA step
STAGES = ["environment", "build", "compile", "optimizer", "gpu_tests", "sampler", "policy_loss", "advantages",
          "linear", "trl_head", "train_7b", "rollout", "lora_4bit"]
NAME = re.compile(r"^[A-Za-z0-9._-]+$")
STAND_IN = """
import argparse, json, os, sys
ap = argparse.ArgumentParser()
ap.add_argument("--warm-cache", action="store_true")
ap.add_argument("--workers", type=int)
ap.add_argument("--arch", type=int)
ap.parse_args()
cache = os.environ["TRITON_CACHE_DIR"]
os.makedirs(cache, exist_ok=True)
with open(os.path.join(cache, "stand_in.json"), "w") as fh:
    json.dump({"argv": sys.argv[1:], "cache": cache}, fh)
print("warm-cache stand-in: done")
"""
NO_WARM_CACHE = "import argparse; argparse.ArgumentParser().add_argument('--out'); argparse.ArgumentParser().parse_args()"
# put first on PYTHONPATH, makes `pairuni_kernels._C` unimportable in every child: the GPU machine's
# checkout after a failed build (the one here has an extension built for CI's torch)
HIDE_EXTENSION = """
import sys

class _NoExtension:
    def find_spec(self, name, path=None, target=None):
        if name == "pairuni_kernels._C":
            raise ImportError("pairuni_kernels._C hidden by the test (as after a failed build)")
        return None

sys.meta_path.insert(0, _NoExtension())
"""

pytestmark = pytest.mark.slow


def stand_in(tmp_path: Path, text: str = STAND_IN) -> str:
    path = tmp_path / "kernel_resources_stand_in.py"
    path.write_text(text)
    return str(path)


def session_cmd(tmp_path: Path, *flags: str, compile_script: str | None = None) -> list[str]:
    script = compile_script or stand_in(tmp_path)
    return [sys.executable, str(SCRIPT), "--dry-run", "--work", str(tmp_path / "work"), "--kernel-resources", script,
            *flags]


def dry_run(tmp_path: Path, *flags: str, timeout: float = 600, env: dict | None = None,
            compile_script: str | None = None):
    """Runs the dry run with OUT set as the device sets it; returns (process, $OUT, work dir, summary)."""
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    t0 = time.monotonic()
    proc = subprocess.run(session_cmd(tmp_path, *flags, compile_script=compile_script), cwd=tmp_path,
                          env=dict(env or os.environ, OUT=str(out)), capture_output=True, text=True, timeout=timeout)
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


def packed(out: Path) -> dict[str, bytes]:
    with tarfile.open(out / "session.tgz") as tar:
        return {n: tar.extractfile(n).read() for n in tar.getnames() if tar.getmember(n).isfile()}


def alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"waited {timeout} s for {what}")


def summary_in(out: Path) -> dict | None:
    try:
        return json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- the plan
def test_caps_fit_seven_minutes_with_the_pack_reserve():
    assert list(gpu_session.STAGES) == STAGES and set(gpu_session.CAPS) == set(STAGES)
    total = sum(gpu_session.CAPS.values()) + gpu_session.PACK_RESERVE_S
    assert total <= 420, f"stage caps {sum(gpu_session.CAPS.values())} s + pack reserve = {total} s > 7 minutes"
    assert gpu_session.BUDGET_S <= 420
    assert all(cap > 0 for cap in gpu_session.CAPS.values())
    assert gpu_session.DRY_SLOWDOWN >= 1


def test_real_kernel_resources_offers_the_warm_cache_interface():
    """The compile stage calls `kernel_resources.py --warm-cache --workers N [--arch NN]`."""
    helped = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr[-2000:]
    if "--warm-cache" not in helped.stdout:
        pytest.skip("kernel_resources.py has no --warm-cache yet (the compile stage then skips with a line)")
    assert "--workers" in helped.stdout and "--arch" in helped.stdout


# ----------------------------------------------------------------------------- the whole dry run
def test_dry_run_runs_every_stage_and_packs_three_files(tmp_path):
    proc, out, work, summary = dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert [r["stage"] for r in summary["stages"]] == STAGES and summary["complete"] is True
    got = statuses(summary)
    # no bitsandbytes wheel carried here: the optimizer stage says so in one line (with one: ok)
    assert got["optimizer"] in ("ok", "skipped: no bitsandbytes wheel in wheels/ (make wheels): torch AdamW instead")
    assert {s: v for s, v in got.items() if s != "optimizer"} == dict.fromkeys(STAGES[:3] + STAGES[4:], "ok"), got
    # each stage within its cap x the slow-machine factor (the dry run carries no time between stages)
    for r in summary["stages"]:
        assert r["cap_s"] == gpu_session.CAPS[r["stage"]] * gpu_session.DRY_SLOWDOWN
        assert r["seconds"] <= r["cap_s"], r
    # only the packed files: no stage wrote into $OUT although OUT was set
    assert sorted(p.name for p in returned_files(out)) == ["session.tgz", "summary.json", "summary.md"]
    env = summary["environment"]
    assert env["dry_run"] is True and env["device"].startswith("cpu")
    assert env["torch"] == torch.__version__ and env["python"] and env["triton"] and env["transformers"]
    assert env["TRITON_CACHE_DIR"] == str(work / "triton_cache")
    assert Path(env["pairuni_kernels"]) == ROOT / "pairuni_kernels"  # the checkout, first on PYTHONPATH
    # the compile stage called the warm-cache interface with all cores into the one cache of every stage
    called = json.loads((work / "triton_cache" / "stand_in.json").read_text())
    assert called["argv"] == ["--warm-cache", "--workers", str(os.cpu_count()), "--arch", "90"]
    assert called["cache"] == str(work / "triton_cache") and summary["compile"]["exit"] == 0
    # the GPU tests ran in parallel pytest processes, each on its own block
    shards = summary["gpu_tests"]["rows"]
    assert len(shards) == 2 and sum(r["tests"] for r in shards) == 2 and all(r["exit"] == 0 for r in shards)
    md = (out / "summary.md").read_text()
    assert f"torch {torch.__version__}" in md and f"Device: {env['device']}" in md and "Session complete" in md
    assert all(f"| {stage} | {got[stage]} |" in md for stage in STAGES)
    # every benchmark stage left its (complete) results in the packed tree and in summary.json
    files = packed(out)
    names = set(files)
    assert not any(n.startswith(("session/site", "session/train_run", "session/triton_cache")) for n in names)
    results = {n.split("/")[-1]: json.loads(v) for n, v in files.items() if n.startswith("session/results/")
               and n.endswith(".json")}
    for suite in ("sampling", "policy_loss", "advantages", "linear", "trl_head", "rollout"):
        data = results[f"{suite}_cpu_quick.json"]
        assert data["complete"] is True and data == summary["results"][f"{suite}_cpu_quick.json"], suite
        assert data["rows"] and all("case" in r and "impl" in r for r in data["rows"]), suite
    sampler = [r for r in results["sampling_cpu_quick.json"]["rows"] if r["impl"] == "pairuni"]
    assert sampler and all(r["kernel"] == "CPU kernel" and r["ms"] > 0 for r in sampler)
    linear = results["linear_cpu_quick.json"]["rows"]
    fused = {r["case"]: r for r in linear if r["impl"] == "fused"}
    assert len(fused) == 2 and all(r["time_ms"] > 0 for r in fused.values()), linear
    assert {r["impl"] for r in linear} == {"fused", "unfused"}  # the session's implementations, no compile
    # ours against TRL's fused head: both measured where TRL imports, and then the same step on both sides;
    # where it does not (the GPU machine's venv has no TRL unless wheels/ carries it) its rows say so
    trl_head = results["trl_head_cpu_quick.json"]["rows"]
    ours = [r for r in trl_head if r["impl"] == "pairuni"]
    assert len(ours) == 2 and all(r["time_ms"] > 0 and "peak_extra_mb" in r for r in ours), trl_head
    theirs = [r for r in trl_head if r["impl"] == "trl"]
    assert len(theirs) == 2 and all(r.get("time_ms", 0) > 0 or r.get("note", "").startswith(
        "baseline unavailable: trl not importable") for r in theirs), theirs
    if any("time_ms" in r for r in theirs):
        assert all(r["same_result"] is True for r in ours), ours
    train = results["train_one_gpu_smoke.json"]
    assert train["complete"] is True and [r["model"] for r in train["results"]] == ["janus-pro-7b"]
    step = train["results"][0]
    assert step["optimizer"] == "AdamW" and len(step["steps"]) == 2 and all(s["update_s"] > 0 for s in step["steps"])
    assert step["image_tokens"] == 16 and "oom" not in step and "plan_error" not in step
    # the 4-bit LoRA stage: NF4 needs CUDA, so the dry run trains LoRA on a bf16 base (one step) and says so
    lora = results["train_one_gpu_smoke_lora64.json"]["results"]
    assert lora[0]["lora"] == "r=64, base none" and len(lora[0]["steps"]) == 1 and "oom" not in lora[0]
    assert "4-bit NF4 skipped" in (work / "logs" / "lora_4bit.log").read_text()
    assert "LoRA on a 4-bit base" in md
    # transformers' generate is handed its cache (5.17 raises TypeError without it): both rows measured
    rollout = {r["impl"]: r for r in results["rollout_cpu_quick.json"]["rows"]}
    assert set(rollout) == {"transformers", "engine"} and all(r["step_ms"] > 0 for r in rollout.values()), rollout


def test_failing_and_hanging_stages_are_recorded_and_the_next_ones_run(tmp_path):
    proc, out, work, summary = dry_run(tmp_path, "--inject", "optimizer=raise", "--inject", "sampler=raise",
                                       "--inject", "advantages=hang", "--stage-timeout", "advantages=5",
                                       "--inject", "linear=raise", "--inject", "compile=raise")
    assert proc.returncode == 1
    got = statuses(summary)
    assert list(got) == STAGES
    for stage in ("optimizer", "sampler", "linear", "compile"):
        assert got[stage].startswith("failed"), (stage, got[stage])
    assert got["advantages"] == "timed out after 5 s"
    # the stages after each failure ran: gpu_tests after optimizer, policy_loss after sampler, train_7b later
    for stage in ("environment", "build", "gpu_tests", "policy_loss", "train_7b"):
        assert got[stage] == "ok", (stage, summary["stages"])
    records = {r["stage"]: r for r in summary["stages"]}
    assert "injected failure of stage sampler" in records["sampler"]["tail"]
    assert "injected failure of stage optimizer" in records["optimizer"]["tail"]
    assert "injected failure of stage compile" in records["compile"]["tail"]
    # the hung stage's own child was killed with it, not left running through the later stages
    pids = [int(p) for p in (work / "logs" / "advantages.hang.pids").read_text().split()]
    assert not any(alive(p) for p in pids), f"the hung stage's processes {pids} are still running"
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


# ----------------------------------------------------------------------------- nothing measured is lost
def test_a_suite_cut_by_its_cap_keeps_the_rows_it_measured(tmp_path):
    """The sampler suite stops making progress after 3 rows; its stage is cut by its cap, and the 3 rows
    are in summary.json, summary.md and the packed tree."""
    proc, out, work, summary = dry_run(tmp_path, "--only", "sampler", "--inject", "sampler=hang-after-3",
                                       "--stage-timeout", "sampler=30")
    assert proc.returncode == 1
    got = statuses(summary)
    assert got["sampler"] == "timed out after 30 s"
    assert all(s == "skipped: not selected (--only)" for name, s in got.items() if name != "sampler")
    kept = summary["results"]["sampling_cpu_quick.json"]
    assert kept["complete"] is False and len(kept["rows"]) == 3, kept
    assert all(r["ms"] > 0 for r in kept["rows"] if "note" not in r)
    assert json.loads(packed(out)["session/results/sampling_cpu_quick.json"]) == kept
    assert "## sampling_cpu_quick.json (INCOMPLETE: 3 rows)" in (out / "summary.md").read_text()
    returned_files(out)
    # the suite's process (a child of run_all) was killed with its stage, and its log shows where it stopped
    log = (work / "logs" / "sampler.log").read_text()
    pid = int(re.search(r"hanging after 3 rows \(pid (\d+)\)", log).group(1))
    assert not alive(pid), f"the suite's process {pid} outlived its stage"


def test_a_failed_build_leaves_the_benchmarks_importing_the_checkout(tmp_path):
    """No extension (as on the GPU machine after a failed build): the sampler stage still runs, from the
    checkout, and records that cfg_sample ran the reference."""
    hide = tmp_path / "hide_extension"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE_EXTENSION)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(hide), os.environ.get("PYTHONPATH")])))
    proc, out, work, summary = dry_run(tmp_path, "--inject", "build=raise", "--only", "environment,build,sampler",
                                       env=env)
    got = statuses(summary)
    assert got["build"].startswith("failed") and got["environment"] == "ok" and got["sampler"] == "ok", summary
    assert Path(summary["environment"]["pairuni_kernels"]) == ROOT / "pairuni_kernels"
    rows = summary["results"]["sampling_cpu_quick.json"]["rows"]
    pairuni = [r for r in rows if r["impl"] == "pairuni"]
    assert pairuni and all(r["kernel"].startswith("reference (pairuni_kernels._C is not built") for r in pairuni)
    assert all(r["ms"] > 0 for r in pairuni)
    assert "reference (pairuni_kernels._C is not built" in (out / "summary.md").read_text()


def test_out_holds_every_finished_stage_when_the_session_is_killed(tmp_path):
    """$OUT is rewritten after every stage: SIGKILL the session (as the device's time limit would) while a
    stage hangs, and $OUT lists the stages before it with their results."""
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    cmd = session_cmd(tmp_path, "--only", "environment,advantages,rollout", "--inject", "rollout=hang",
                      "--stage-timeout", "rollout=300")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=dict(os.environ, OUT=str(out)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    pids_file = work / "logs" / "rollout.hang.pids"
    try:
        def rollout_running():
            summary = summary_in(out)
            return summary if summary and statuses(summary).get("rollout") == "running" and pids_file.exists() \
                else None

        wait_for(rollout_running, 240, "the rollout stage to be running in $OUT/summary.json")
    finally:
        kill(proc.pid)
        proc.wait()
        for pid in (pids_file.read_text().split() if pids_file.exists() else []):
            kill(int(pid))
    summary = summary_in(out)
    got = statuses(summary)
    assert summary["complete"] is False and list(got) == STAGES
    assert got["environment"] == "ok" and got["advantages"] == "ok" and got["rollout"] == "running"
    assert got["compile"] == "skipped: not selected (--only)" and got["lora_4bit"] == "pending"
    assert summary["results"]["advantages_cpu_quick.json"]["complete"] is True
    assert "session/results/advantages_cpu_quick.json" in packed(out)
    assert "IN PROGRESS" in (out / "summary.md").read_text()
    returned_files(out)


def test_sigterm_stops_the_running_stage_and_finishes_the_summary(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    cmd = session_cmd(tmp_path, "--only", "sampler", "--inject", "sampler=hang", "--stage-timeout", "sampler=300")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=dict(os.environ, OUT=str(out)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    pids_file = work / "logs" / "sampler.hang.pids"
    try:
        wait_for(pids_file.exists, 120, "the hung stage to start")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 1
    finally:
        kill(proc.pid)
        proc.wait()
    pids = [int(p) for p in pids_file.read_text().split()]
    assert not any(alive(p) for p in pids), f"the stage's processes {pids} outlived the session"
    summary = summary_in(out)
    got = statuses(summary)
    assert summary["complete"] is True and got["sampler"] == "killed: the session was interrupted (SIGTERM)"
    assert list(got) == STAGES


def test_compile_stage_skips_with_a_line_without_the_warm_cache_option(tmp_path):
    proc, out, work, summary = dry_run(tmp_path, "--only", "compile",
                                       compile_script=stand_in(tmp_path, NO_WARM_CACHE))
    got = statuses(summary)
    assert got["compile"].startswith("skipped: ") and "has no --warm-cache" in got["compile"]
    assert proc.returncode == 0  # a stated skip is not a failure
