"""The DiMOO PairGRPO loop's checkpoints, resume and export (engine/dimoo/run.py): checkpoints go through the
engine's one checkpoint store (engine/checkpoint_store.py); a resumed run equals an uninterrupted one bit for bit,
a save killed before it is published leaves the previous checkpoint in charge, a damaged file is refused by name,
a stopped run saves and resumes exactly, an export loads back exactly and appears all at once."""

import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from engine.algo import AlgoConfig
from engine.checkpoint_store import MANIFEST, CheckpointError, CheckpointStore, verify, write_manifest
from engine.data import default_pairs_path
from engine.data.io import data_root_of, read_pairs
from engine.dimoo import run as dr
from engine.dimoo.model import DimooModel
from engine.dimoo.pairgrpo import DimooGRPOConfig, train_step
from engine.dimoo.toyworld import ToyDimooWorld
from engine.lock import RunLock, held_here
from engine.metrics import read_row

REPO = Path(__file__).resolve().parents[3]
CFG = DimooGRPOConfig(group_size=2, algo=AlgoConfig(mu=2))
RUN = {"pairs_per_step": 2, "lr": 1e-2, "seed": 3}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pairs():
    return read_pairs(default_pairs_path())[:6]


@pytest.fixture(scope="module")
def world(pairs):
    return ToyDimooWorld.build(pairs, data_root_of(default_pairs_path()))


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _opt(model):
    return torch.optim.AdamW(model.parameters(), lr=RUN["lr"], weight_decay=0.0)


def _steps(out) -> list[int]:
    """The steps of the published checkpoints of the run folder `out`."""
    return [s for s, _ in CheckpointStore(out).step_folders()]


def _temps(out) -> list[Path]:
    """The store's temp folders (saves in progress or dead) of the run folder `out`."""
    root = Path(out) / "checkpoints"
    return sorted(p for p in root.iterdir() if p.name.startswith(".tmp_")) if root.is_dir() else []


def _scramble_rngs():
    """Move every global RNG: an exact resume must not depend on them."""
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    random.seed(os.urandom(8))


# ----------------------------------------------------------------------------- save / load
def test_save_load_resume_equals_straight_run_bit_for_bit(world, pairs, tmp_path):
    n = 4
    model = world.tiny_model(seed=1)
    opt = _opt(model)
    straight = [train_step(model, opt, world, dr.step_pairs(pairs, 3, s, 2), CFG, seed=3, step=s)
                for s in range(1, n + 1)]
    want = _weights(model)

    model = world.tiny_model(seed=1)
    opt = _opt(model)
    first = [train_step(model, opt, world, dr.step_pairs(pairs, 3, s, 2), CFG, seed=3, step=s)
             for s in range(1, n // 2 + 1)]
    folder = dr.save_state(tmp_path / "run", model, opt, n // 2, world, CFG, seed=3, metrics=first)
    assert folder == tmp_path / "run" / "checkpoints" / "step_000002"
    assert CheckpointStore(tmp_path / "run").latest_named() == folder and not _temps(tmp_path / "run")
    verify(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert manifest["step"] == n // 2 and set(manifest["files"]) == on_disk  # the manifest names every file
    assert {dr.STATE, dr.TOKENIZER, dr.METRICS, dr.OPTIMIZER_TENSORS, dr.OPTIMIZER_JSON,
            "model/model.safetensors", "model/config.json"} <= on_disk
    state = json.loads((folder / dr.STATE).read_text())
    assert state["family"] == "dimoo" and state["cfg"] == json.loads(json.dumps(CFG.to_dict()))
    del model, opt
    _scramble_rngs()
    fresh = world.tiny_model(seed=99)  # other weights: all must come from the checkpoint
    fresh_opt = _opt(fresh)
    st = dr.load_state(folder, fresh, fresh_opt)
    assert (st.step, st.seed, st.cfg, st.metrics) == (n // 2, 3, CFG, first)
    assert st.tokenizer.vocab == world.tokenizer.vocab and st.model is fresh
    world2 = ToyDimooWorld.build(pairs, data_root_of(default_pairs_path()), tokenizer=st.tokenizer)
    rest = [train_step(fresh, fresh_opt, world2, dr.step_pairs(pairs, 3, s, 2), CFG, seed=3, step=s)
            for s in range(n // 2 + 1, n + 1)]
    assert first + rest == straight  # metrics: equal floats, not close ones
    _assert_same(_weights(fresh), want)
    # without a model: built from the checkpoint, in its dtype
    built = dr.load_state(folder).model
    assert built.config == fresh.config and next(built.parameters()).dtype == torch.float32


def test_a_world_without_a_toy_tokenizer_saves_none(world, tmp_path):
    """A world on a real Lumina-DiMOO folder has a HF tokenizer: no toy_tokenizer.json, loaded back as None."""
    model = world.tiny_model(seed=0)
    hf_world = types.SimpleNamespace(tokenizer=object())
    folder = dr.save_state(tmp_path / "run", model, _opt(model), 0, hf_world, CFG)
    assert not (folder / dr.TOKENIZER).exists()
    assert dr.load_state(folder, model).tokenizer is None
    toy = dr.save_state(tmp_path / "run", model, _opt(model), 1, world, CFG)
    assert dr.load_state(toy, model).tokenizer.vocab == world.tokenizer.vocab


def test_load_refuses_a_model_of_another_shape_or_dtype(world, tmp_path):
    model = world.tiny_model(seed=0)
    folder = dr.save_state(tmp_path / "run", model, _opt(model), 0, world, CFG)
    with pytest.raises(ValueError, match="config differs"):
        dr.load_state(folder, world.tiny_model(d_model=32))
    with pytest.raises(ValueError, match=r"model: .*model.safetensors: .* is torch.float32 .* is torch.bfloat16"):
        dr.load_state(folder, world.tiny_model().to(torch.bfloat16))
    with pytest.raises(ValueError, match="optimizer: needs the model"):
        dr.load_state(folder, None, _opt(model))
    with pytest.raises(ValueError, match="step"):
        dr.save_state(tmp_path / "run2", model, _opt(model), -1, world, CFG)


@pytest.mark.parametrize("family", [None, "janus"])
def test_a_state_without_the_dimoo_family_is_refused(world, tmp_path, family):
    model = world.tiny_model(seed=0)
    folder = dr.save_state(tmp_path / "run", model, _opt(model), 1, world, CFG)
    path = folder / dr.STATE
    state = json.loads(path.read_text())
    state.pop("family")
    if family is not None:
        state["family"] = family
    path.write_text(json.dumps(state))
    write_manifest(folder, 1)  # sealed again: the checkpoint verifies, only its family is wrong
    verify(folder)
    with pytest.raises(CheckpointError) as err:
        dr.load_state(folder, model)
    msg = str(err.value)
    assert str(path) in msg and "family" in msg and "\n" not in msg


def test_metrics_with_a_nan_are_strict_json_and_read_back(world, tmp_path):
    model = world.tiny_model(seed=0)
    rows = [{"step": 1, "loss.generation": float("nan"), "grad_norm": 0.5}]
    folder = dr.save_state(tmp_path / "run", model, _opt(model), 1, world, CFG, metrics=rows)
    line = (folder / dr.METRICS).read_text()
    assert "NaN" not in line and json.loads(line)["nonfinite"] == ["loss.generation"]
    back = dr.load_state(folder, model).metrics
    assert math.isnan(back[0]["loss.generation"]) and back[0]["grad_norm"] == 0.5


def test_optimizer_state_round_trips_exactly(world):
    model = world.tiny_model(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    tensors, plain = dr.split_optimizer_state(opt.state_dict())
    json.dumps(plain)  # strict JSON
    back = dr.join_optimizer_state(tensors, json.loads(json.dumps(plain)))
    want = opt.state_dict()
    assert back["param_groups"] == want["param_groups"]
    assert back["param_groups"][0]["betas"] == (0.8, 0.95)
    for pid, entry in want["state"].items():
        for k, v in entry.items():
            assert torch.equal(back["state"][pid][k], v), (pid, k)


def test_run_then_resume_equals_one_uninterrupted_run(world, pairs, tmp_path):
    straight = dr.run(world, CFG, 4, tmp_path / "a", pairs=pairs, save_every=2, **RUN)
    assert straight.checkpoint == tmp_path / "a" / "checkpoints" / "step_000004" and not straight.stopped
    half = dr.run(world, CFG, 2, tmp_path / "b", pairs=pairs, save_every=2, **RUN)
    assert half.rows == straight.rows[:2]
    _scramble_rngs()
    resumed = dr.run(world, CFG, 4, tmp_path / "b", pairs=pairs, save_every=2, resume=True, **RUN)
    assert resumed.resumed_from == tmp_path / "b" / "checkpoints" / "step_000002"
    assert resumed.checkpoint == tmp_path / "b" / "checkpoints" / "step_000004"
    assert resumed.rows == straight.rows
    _assert_same(_weights(resumed.model), _weights(straight.model))
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == straight.rows
    assert _steps(tmp_path / "b") == [2, 4]
    assert CheckpointStore(tmp_path / "b").latest_named() == resumed.checkpoint
    # a fresh run into a folder with checkpoints, and a resume with other settings, are refused
    with pytest.raises(ValueError, match="already holds checkpoints"):
        dr.run(world, CFG, 4, tmp_path / "b", pairs=pairs, **RUN)
    other = CFG.replace(algo=dataclasses.replace(CFG.algo, mu=1))
    with pytest.raises(ValueError, match=r"\['lr', 'cfg.algo.mu'\] changed"):
        dr.run(world, other, 6, tmp_path / "b", pairs=pairs, resume=True, **{**RUN, "lr": 0.5})
    with pytest.raises(ValueError, match=r"\['cfg.group_size'\] changed"):
        dr.run(world, CFG.replace(group_size=3), 6, tmp_path / "b", pairs=pairs, resume=True, **RUN)


def test_should_stop_saves_the_step_and_a_resume_finishes_the_straight_run(world, pairs, tmp_path):
    straight = dr.run(world, CFG, 3, tmp_path / "a", pairs=pairs, save_every=0, **RUN)
    out, seen, made = tmp_path / "b", [], []

    def on_step(row):  # called once the row is in out/metrics.jsonl
        seen.append((row, read_row((out / "metrics.jsonl").read_text().splitlines()[-1])))

    def factory(params):
        made.append(params)
        return torch.optim.AdamW(params, lr=RUN["lr"], weight_decay=0.0)

    stopped = dr.run(world, CFG, 3, out, pairs=pairs, save_every=0, should_stop=lambda: True, on_step=on_step,
                     optimizer_factory=factory, **RUN)
    assert stopped.stopped and stopped.rows == straight.rows[:1] and [r for r, _ in seen] == stopped.rows
    assert all(row == disk for row, disk in seen)
    assert isinstance(made[0], list) and made[0] == list(stopped.model.parameters())
    assert stopped.optimizer.param_groups[0]["params"] == made[0]
    assert stopped.checkpoint == out / "checkpoints" / "step_000001" and _steps(out) == [1]  # save_every=0: stop
    assert dr.load_state(stopped.checkpoint).step == 1
    _scramble_rngs()
    resumed = dr.run(world, CFG, 3, out, pairs=pairs, save_every=0, resume=True, should_stop=lambda: False, **RUN)
    assert resumed.resumed_from == stopped.checkpoint and not resumed.stopped
    assert resumed.rows == straight.rows
    _assert_same(_weights(resumed.model), _weights(straight.model))
    assert _steps(out) == [1, 3]


def test_keep_one_leaves_only_the_newest_checkpoint(world, pairs, tmp_path):
    res = dr.run(world, CFG, 3, tmp_path / "run", pairs=pairs, save_every=1, keep=1, **RUN)
    assert _steps(tmp_path / "run") == [3] and res.checkpoint == tmp_path / "run" / "checkpoints" / "step_000003"
    assert CheckpointStore(tmp_path / "run").latest_named() == res.checkpoint and not _temps(tmp_path / "run")
    verify(res.checkpoint)


def test_lock_false_runs_under_the_callers_lock_and_leaves_it_held(world, pairs, tmp_path):
    out = tmp_path / "run"
    held = RunLock.acquire(out)
    try:
        dr.run(world, CFG, 1, out, pairs=pairs, lock=False, **RUN)
        assert held_here(out)  # run() took and released no lock of its own
    finally:
        held.release()
    assert _steps(out) == [1]


def test_step_pairs_is_a_seeded_epoch_shuffle(pairs):
    index = {id(p): i for i, p in enumerate(pairs)}
    epoch = [index[id(p)] for s in (1, 2, 3) for p in dr.step_pairs(pairs, 5, s, 2)]
    assert sorted(epoch) == list(range(len(pairs))) and epoch != sorted(epoch)  # steps 1-3: one shuffled epoch
    assert dr.step_pairs(pairs, 5, 4, 2) == dr.step_pairs(pairs, 5, 4, 2)  # a function of (seed, step)
    assert dr.step_pairs(pairs, 5, 1, 6) != dr.step_pairs(pairs, 6, 1, 6)
    with pytest.raises(ValueError, match="pairs_per_step"):
        dr.step_pairs(pairs, 5, 1, 0)


# ----------------------------------------------------------------------------- faults
KILLED_RUN = textwrap.dedent("""
    import sys
    from engine.algo import AlgoConfig
    from engine.data import default_pairs_path
    from engine.data.io import data_root_of, read_pairs
    from engine.dimoo import run as dr
    from engine.dimoo.pairgrpo import DimooGRPOConfig
    from engine.dimoo.toyworld import ToyDimooWorld
    pairs = read_pairs(default_pairs_path())[:6]
    world = ToyDimooWorld.build(pairs, data_root_of(default_pairs_path()))
    dr.run(world, DimooGRPOConfig(group_size=2, algo=AlgoConfig(mu=2)), 2, sys.argv[1], pairs=pairs, save_every=1,
           resume=True, pairs_per_step=2, lr=1e-2, seed=3)
    print("finished")
""")


def _run_killed(out: Path, point: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PAIRUNI_KILL_AT": point, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", KILLED_RUN, str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=240)


@pytest.mark.parametrize("point", ["save:files_written", "save:sealed"])
def test_sigkill_before_publishing_keeps_the_previous_checkpoint(world, pairs, tmp_path, point):
    out = tmp_path / "run"
    dr.run(world, CFG, 1, out, pairs=pairs, save_every=1, **RUN)  # step_000001, complete
    proc = _run_killed(out, point)  # resumes at 1, trains step 2, dies saving it
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    root = out / "checkpoints"
    temps = _temps(out)
    assert [p.name.split(".")[1] for p in temps] == ["tmp_step_000002"]  # one temp folder, of step 2
    assert (temps[0] / "model" / "model.safetensors").is_file()  # the weights were written
    if point == "save:files_written":
        assert not (temps[0] / MANIFEST).exists()
    else:
        verify(temps[0])  # sealed and complete, but never moved in: not seen
    assert _steps(out) == [1]  # the half-saved one is not a checkpoint
    point_found = CheckpointStore(out).resume_candidate()
    assert (point_found.path, point_found.skipped) == (root / "step_000001", [])
    assert dr.load_state(root / "step_000001").step == 1
    # the next run removes the dead temp folder and finishes exactly as an uninterrupted run
    straight = dr.run(world, CFG, 2, tmp_path / "straight", pairs=pairs, save_every=1, **RUN)
    resumed = dr.run(world, CFG, 2, out, pairs=pairs, save_every=1, resume=True, **RUN)
    assert not _temps(out) and _steps(out) == [1, 2]
    assert resumed.resumed_from == root / "step_000001"
    assert resumed.rows == straight.rows
    _assert_same(_weights(resumed.model), _weights(straight.model))


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_a_damaged_checkpoint_is_refused_naming_the_file(world, pairs, tmp_path, damage):
    out = tmp_path / "run"
    dr.run(world, CFG, 2, out, pairs=pairs, save_every=1, **RUN)
    ck = out / "checkpoints" / "step_000002"
    target = {"flip": ck / "model" / "model.safetensors", "truncate": ck / dr.OPTIMIZER_TENSORS,
              "missing": ck / dr.TOKENIZER}[damage]
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-8])
    else:
        target.unlink()
    with pytest.raises(CheckpointError) as err:
        dr.load_state(ck, world.tiny_model(), None)
    msg = str(err.value)
    assert str(target) in msg and "\n" not in msg
    # resume skips it (naming it) and continues from step 1, to the same result as a clean run
    res = dr.run(world, CFG, 2, out, pairs=pairs, save_every=1, resume=True, **RUN)
    assert res.resumed_from == out / "checkpoints" / "step_000001" and str(target) in res.skipped[0]
    clean = dr.run(world, CFG, 2, tmp_path / "clean", pairs=pairs, save_every=1, **RUN)
    assert res.rows == clean.rows
    verify(ck)  # the damaged step was saved again, whole
    assert res.checkpoint == ck and CheckpointStore(out).latest_named() == ck


def test_a_non_finite_weight_is_never_saved(world, tmp_path):
    model = world.tiny_model()
    with torch.no_grad():
        model.model.transformer.ln_f.weight[0] = float("nan")
    with pytest.raises(ValueError, match="ln_f.weight holds NaN"):
        dr.save_state(tmp_path / "run", model, _opt(model), 1, world, CFG)
    assert not list(tmp_path.iterdir())


def test_a_failed_save_removes_its_temp_folder_and_keeps_the_previous_checkpoint(world, tmp_path):
    model = world.tiny_model(seed=0)
    first = dr.save_state(tmp_path / "run", model, _opt(model), 1, world, CFG)
    bad = _opt(model)
    bad.state[next(iter(model.parameters()))] = {"oops": object()}
    with pytest.raises(ValueError, match="optimizer: cannot save"):  # fails after the weights are written
        dr.save_state(tmp_path / "run", model, bad, 2, world, CFG)
    assert not _temps(tmp_path / "run") and _steps(tmp_path / "run") == [1]
    assert CheckpointStore(tmp_path / "run").latest_named() == first


# ----------------------------------------------------------------------------- export
def test_export_round_trips_bit_for_bit_with_the_toy_vq(world, tmp_path, gen):
    model = world.tiny_model(seed=5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    out = dr.export(model, tmp_path / "exp", vq=world.vq)
    back = DimooModel.from_pretrained(out, dtype="float32")
    _assert_same(_weights(back), _weights(model))
    assert back.config == model.config and back.ids == model.ids
    assert (out / "vqvae" / "config.json").is_file() and (out / dr.EXPORT_MARKER).is_file()
    # sharded, and cast: the cast model is bf16 bit for bit, the model itself untouched
    before = _weights(model)
    out2 = dr.export(model, tmp_path / "exp16", vq=world.vq, dtype="bfloat16", shards=3)
    _assert_same(_weights(model), before)
    back16 = DimooModel.from_pretrained(out2, dtype="bfloat16")
    _assert_same(_weights(back16), {k: v.to(torch.bfloat16) for k, v in before.items()})
    with pytest.raises(ValueError, match="vq"):
        dr.export(model, tmp_path / "novq")


def test_export_carries_the_source_folders_tokenizer_and_vq(dimoo_dir, tmp_path, gen):
    model = DimooModel.from_pretrained(dimoo_dir, dtype="bfloat16")
    with torch.no_grad():
        model.model.transformer.ln_f.weight.add_(torch.rand(model.config.d_model, generator=gen).to(torch.bfloat16))
    out = dr.export(model, tmp_path / "exp", source=dimoo_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vqvae/config.json"):
        assert (out / name).read_bytes() == (Path(dimoo_dir) / name).read_bytes(), name
    _assert_same(_weights(DimooModel.from_pretrained(out, dtype="bfloat16")), _weights(model))


def test_export_is_atomic(world, tmp_path):
    out = tmp_path / "exp"
    first = world.tiny_model(seed=1)
    dr.export(first, out, vq=world.vq)
    second = world.tiny_model(seed=2)
    with pytest.raises(ValueError, match="exists"):
        dr.export(second, out, vq=world.vq)  # no overwrite: refused, untouched
    script = textwrap.dedent("""
        import sys
        from engine.data import default_pairs_path
        from engine.data.io import data_root_of, read_pairs
        from engine.dimoo import run as dr
        from engine.dimoo.toyworld import ToyDimooWorld
        world = ToyDimooWorld.build(read_pairs(default_pairs_path()), data_root_of(default_pairs_path()))
        dr.export(world.tiny_model(seed=2), sys.argv[1], vq=world.vq, overwrite=True)
    """)
    env = {**os.environ, "PAIRUNI_KILL_AT": "export:files_written", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    _assert_same(_weights(DimooModel.from_pretrained(out, dtype="float32")), _weights(first))  # the old one, whole
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".exp.")]  # only a hidden stage is left
    dr.export(second, out, vq=world.vq, overwrite=True)
    _assert_same(_weights(DimooModel.from_pretrained(out, dtype="float32")), _weights(second))
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    with pytest.raises(ValueError, match="not written by this command"):
        dr.export(second, foreign, vq=world.vq, overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "x"
