"""docs/TRAINING.md's "Train Janus-Pro-1B / 7B" section, run command by command, in order, as a user would.

The commands are parsed from that section's ```bash / ```py blocks (so the two cannot drift) and
run in a fresh folder where `checkpoints/Janus-Pro-1B` and `checkpoints/Janus-Pro-7B` are the tiny
directory in the exact Janus-Pro-1B format (the `janus_pro_dir` fixture) and `configs/` is the repository's.
What the test adds to a command only shrinks it (`SHRINK`: steps, group size, answer length, pairs; a
2-process torchrun; a probe of 2 batches); paths and every other argument are the document's. `pairuni` commands run in-process
(`engine.cli.main`), torchrun and the Python snippet as subprocesses. Skipped, and asserted to be exactly
these: `hf download` (network) and the NF4 LoRA run (CUDA only; run when a GPU is present).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from engine import cli

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "TRAINING.md"
SECTION = "## Train Janus-Pro-1B / 7B"

#: Overrides that only shrink a training run to the tiny directory's scale (a few seconds a step on 2 cores).
SHRINK = ["data.pairs_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=3", "rollout.max_batch=4",
          "optim.micro_batch_size=4", "train.save_every=1", "train.progress=false"]
#: ... and, for a run that evaluates, an evaluation at every step with one image per prompt.
SHRINK_EVAL = ["train.eval_every=1", "train.eval_samples=1"]
#: What a network download or a CUDA-only run needs; these commands are skipped here, for this reason.
NETWORK, CUDA = "needs the network (the fixture stands in for the download)", "needs CUDA (bitsandbytes NF4)"


def section_text(doc: str | None = None) -> str:
    doc = DOC.read_text() if doc is None else doc
    start = doc.index(SECTION)
    end = doc.find("\n## ", start + len(SECTION))
    return doc[start:end if end >= 0 else len(doc)]


def section_commands(text: str) -> list[tuple[str, str]]:
    """[(kind, source)] in the document's order: kind "shell" (one command, continuation lines joined) or "python"
    (a whole ```py block)."""
    out: list[tuple[str, str]] = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):
        if lang == "py":
            out.append(("python", body))
            continue
        assert lang == "bash", f"a ```{lang} block in {SECTION!r}: fence commands as bash, Python as py"
        for line in body.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                out.append(("shell", " ".join(line.split())))
    return out


def skip_reason(argv: list[str]) -> str | None:
    if argv[0] == "hf":
        return NETWORK
    if argv[:2] == ["pairuni", "train"] and "configs/janus_pro_7b_24gb.yaml" in argv and not torch.cuda.is_available():
        return CUDA
    return None


def _option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _key(argv: list[str], key: str) -> str | None:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(key + "=")]
    return values[-1] if values else None


def _label(argv: list[str]) -> str:
    """A command's first words and its config: what the skip list and the report name it by."""
    config = [_option(argv, "--config")] if "--config" in argv else []
    return " ".join([*argv[:3], *config])


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_section_is_parsed_as_the_user_reads_it():
    commands = section_commands(section_text())
    shell = [shlex.split(src) for kind, src in commands if kind == "shell"]
    assert [a[:2] for a in shell[:4]] == [["hf", "download"], ["pairuni", "toy-world"], ["pairuni", "validate"],
                                          ["pairuni", "plan"]]
    assert [k for k, _ in commands].count("python") == 1
    joined = next(a for a in shell if a[:2] == ["pairuni", "train"])
    assert "data.pairs_path=data/toy/pairs.jsonl" in joined and "train.eval_every=50" in joined  # continuations joined
    assert section_commands("```bash\n# a comment\npairuni a \\\n    b\n```\n") == [("shell", "pairuni a b")]


def test_train_janus_pro_section_runs(janus_pro_dir, tmp_path, monkeypatch, capsys):
    for name in ("Janus-Pro-1B", "Janus-Pro-7B"):
        (tmp_path / "checkpoints").mkdir(exist_ok=True)
        (tmp_path / "checkpoints" / name).symlink_to(janus_pro_dir, target_is_directory=True)
    (tmp_path / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    skipped, ran, runs = [], [], {}
    text = section_text()
    for kind, src in section_commands(text):
        if kind == "python":
            script = tmp_path / "readme_snippet.py"
            script.write_text(src)
            proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=300)
            assert proc.returncode == 0, f"the walk-through's snippet failed:\n{proc.stderr[-3000:]}"
            with Image.open(tmp_path / "three_red_circles.png") as drawn:  # the snippet loaded the export and drew
                assert drawn.mode == "RGB" and drawn.size[0] > 0
            ran.append("python snippet")
            continue
        argv = shlex.split(src)
        reason = skip_reason(argv)
        if reason:
            skipped.append((_label(argv), reason))
            continue
        ran.append(_label(argv))
        capsys.readouterr()
        if argv[0] == "torchrun":
            nproc = argv.index("--nproc_per_node")
            argv = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
                    *argv[nproc + 2:], *SHRINK, "train.steps=1"]
            # two ranks on CPU (gloo) even where there is a GPU: NCCL cannot put two ranks on one GPU
            proc = subprocess.run(argv, cwd=tmp_path, env={**env, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True,
                                  text=True, timeout=300)
            assert proc.returncode == 0, f"{src}\n{proc.stderr[-3000:]}"
            run_dir = Path(_key(argv, "train.run_dir"))
            assert _steps(run_dir) == [1] and (run_dir / "checkpoints" / "latest").is_file()
            continue
        assert argv[0] == "pairuni", f"a command this test does not handle: {src}"
        command, args = argv[1], argv[2:]
        if command == "toy-world":
            args = [*args, "--n", "12", "--size", "32", "--quiet"]
        elif command == "train":
            run_dir = Path(_key(args, "train.run_dir"))
            resumed = _key(args, "train.resume") == "true" and run_dir in runs
            evaluates = _key(args, "train.eval_every") is not None
            args = [*args, *SHRINK, *(SHRINK_EVAL if evaluates else []), f"train.steps={2 if resumed else 1}"]
        elif command == "eval":
            args = [*args, "--samples", "2", "--no-progress"]
        elif command == "probe-gradients":
            args[args.index("--num-batches") + 1] = "2"
            args = [*args, *SHRINK]
        assert cli.main([command, *args]) == 0, f"{src}\n{capsys.readouterr().err[-3000:]}"
        out = capsys.readouterr().out
        if command == "toy-world":
            assert (Path(_option(args, "--out")) / "pairs.jsonl").is_file()
        elif command == "plan":
            peak = re.search(r"\| peak \| (\d+\.\d\d) \|", out)
            assert peak and f"{peak[1]} GiB" in text, f"the section should state the plan's {peak and peak[1]} GiB peak: {src}"
        elif command == "train":
            if resumed:  # the interrupted run's step is kept, the next one appended, from its checkpoint
                assert _steps(run_dir) == [1, 2] and _steps(run_dir)[:1] == runs[run_dir]
                assert (run_dir / "checkpoints" / "step_000002").is_dir()
            else:
                assert _steps(run_dir) == [1] and (run_dir / "checkpoints" / "latest").is_file()
                runs[run_dir] = [1]
            if evaluates:
                assert (run_dir / "eval" / "heldout_pairs.jsonl").is_file()
                assert (run_dir / "eval" / f"step_{_steps(run_dir)[-1]:06d}.png").is_file()
                assert any(k.startswith("eval/") for k in json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1]))
        elif command == "probe-gradients":  # the config's run folder holds the run trained above: only read
            assert (Path(_option(args, "--out")) / "gradient_probe.json").is_file() and "median" in out
        elif command == "export":
            folder = Path(_option(args, "--out"))
            assert {"config.json", "generation_config.json", "tokenizer.json", "preprocessor_config.json"} <= {
                p.name for p in folder.iterdir()}
            assert any(p.suffix == ".safetensors" for p in folder.iterdir())
        elif command == "eval":
            report = json.loads((Path(_option(args, "--out")) / "eval.json").read_text())
            overall = report["summary"]["overall"]
            assert {"understanding_accuracy", "generation_reward"} <= set(overall), overall
            assert overall["images"] == 2 * overall["prompts"] > 0
            assert (Path(_option(args, "--out")) / "eval.png").is_file() and "overall" in out
    expected = [(f"hf download deepseek-community/Janus-Pro-{size}", NETWORK) for size in ("1B", "7B")]
    if not torch.cuda.is_available():
        expected.append(("pairuni train --config configs/janus_pro_7b_24gb.yaml", CUDA))
    assert skipped == expected
    assert {"python snippet", "torchrun --nproc_per_node 8 configs/janus_pro_7b_fsdp.yaml",
            "pairuni train --config configs/janus_pro_1b.yaml", "pairuni train --config configs/janus_pro_7b_1gpu.yaml",
            "pairuni export runs/janus_pro_1b", "pairuni eval --model",
            "pairuni probe-gradients --config configs/janus_pro_1b.yaml"} <= set(ran)
