"""The README and the documents beside it say nothing that is not true today.

- Every ```python block of README.md, docs/*.md, benchmarks/README.md and studies/*/README.md runs as
  written (each in a fresh interpreter, on CPU). A block that cannot run here (it needs real weights or a
  GPU) is fenced ```py instead. Blocks quoted from docs/snippets/ run in
  tests/pairuni_kernels/integrations/test_readme_snippets.py; here they are only checked to be quoted
  verbatim.
- Every command of a ```bash / ```sh block is executed by a test or says, in a comment, why not:
  * the Janus-Pro walk-through of docs/TRAINING.md runs in tests/test_readme_janus.py (a command of
    another document that is identical to one of the walk-through's counts as run there);
  * the other `pairuni` commands of the documents run here, in a fresh folder, shrunk the way the
    walk-through shrinks its commands (`test_document_commands_run`); a `pairuni plan` must print what
    the document says it prints;
  * a few commands are run by another test or script (`RUN_ELSEWHERE`);
  * anything else carries a comment, on its line or on the comment line above it in the block, that
    starts with "need" (a GPU, the network, ...) or "not run by the tests" (and says why).
- Every relative link points at an existing file, and at an existing heading when it names one.
- The figures that come from a result file are that file's (the demo run's rewards from the golden file).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md",
        *sorted((ROOT / "studies").glob("*/README.md"))]
TRAINING = ROOT / "docs" / "TRAINING.md"
WALKTHROUGH = "## Train Janus-Pro-1B / 7B"
SNIPPETS = {p: p.read_text() for p in sorted((ROOT / "docs" / "snippets").glob("*.py"))}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.S | re.M)

#: Commands another test or script runs (the whole command, as the document writes it) -> that test or script.
RUN_ELSEWHERE = {
    "make demo": "tests/engine/test_golden_run.py",  # the same `pairuni train` defaults, its metrics checked
    "make test": "tests",  # the suite itself
    "python3 -m venv .venv && . .venv/bin/activate": "csrc/check/cuda_build.py",  # the GPU install (make cuda-build)
    "pip install torch==2.11.0": "csrc/check/cuda_build.py",
    'FORCE_CUDA=1 pip install --no-build-isolation -e ".[train]"': "csrc/check/cuda_build.py",
    "python -c \"import torch, pairuni_kernels._C; print(torch._C._dispatch_has_kernel_for_dispatch_key("
    "'pairuni::cfg_sample', 'CUDA'))\"": "csrc/check/cuda_build.py",
    "python studies/toyworld/ablation_toyworld.py --quick": "tests/studies/test_ablation.py",
    "python benchmarks/gpu_session.py --dry-run": "tests/benchmarks/test_gpu_session.py",
    # docs/PARITY.md's commands need the tiny model folder the page writes first: its own test runs the page in order
    "pairuni parity --model tiny-qwen2 --loss ppo cispo --json parity.json": "tests/engine/test_parity.py",
    "pairuni parity --model tiny-qwen2 --dtype bfloat16": "tests/engine/test_parity.py",
}
#: `pairuni` subcommands this file runs when a document (other than the walk-through) shows them.
RUN_HERE = {"plan", "toy-world", "validate", "build-pairs", "train", "eval", "export", "probe-gradients"}
#: What this file adds to a command only shrinks it (the walk-through's rule).
SHRINK = {"toy-world": ["--n", "12", "--size", "32", "--quiet"],
          "train": ["train.steps=2", "train.progress=false", "rollout.group_size=2", "rollout.max_new_tokens=2"],
          "eval": ["--samples", "1", "--max-pairs", "4", "--no-progress"],
          "probe-gradients": ["rollout.group_size=2", "rollout.max_new_tokens=3", "train.progress=false"]}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def prose(text: str) -> str:
    """The text without its fenced blocks (whose lines may look like headings or links)."""
    return FENCE.sub("", text)


def python_blocks() -> list[tuple[Path, int, str]]:
    out = []
    for doc in DOCS:
        blocks = [body for lang, body in FENCE.findall(doc.read_text()) if lang == "python"]
        out += [(doc, i, b) for i, b in enumerate(blocks) if b not in SNIPPETS.values()]
    return out


BLOCKS = python_blocks()


def split_comment(line: str) -> tuple[str, str]:
    """(command, comment) of one shell line: the comment starts at the first `#` outside quotes that follows a
    space or starts the line."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return " ".join(line[:i].split()), line[i:].lstrip("# ").strip()
    return " ".join(line.split()), ""


def shell_commands(text: str) -> list[tuple[str, str]]:
    """[(command, why)] of the ```bash / ```sh blocks of `text`, in order, continuation lines joined; `why` is
    the command's own comment and the block's last comment line above it."""
    out = []
    for lang, body in FENCE.findall(text):
        if lang not in ("bash", "sh", "shell"):
            continue
        above = ""
        for line in body.replace("\\\n", " ").splitlines():
            command, comment = split_comment(line)
            if command:
                out.append((command, f"{comment} | {above}"))
            elif comment:
                above = comment
    return out


def split_walkthrough(doc: Path) -> tuple[str, str]:
    """(the document without the walk-through, the walk-through) of docs/TRAINING.md; (text, "") otherwise."""
    text = doc.read_text()
    if doc != TRAINING:
        return text, ""
    start = text.index(WALKTHROUGH)
    end = text.find("\n## ", start + len(WALKTHROUGH))
    end = end if end >= 0 else len(text)
    return text[:start] + text[end:], text[start:end]


WALKTHROUGH_COMMANDS = [c for c, _ in shell_commands(split_walkthrough(TRAINING)[1])]


def says_why_not(why: str) -> bool:
    return any(part.strip().lower().startswith(("need", "not run by the tests")) for part in why.split("|"))


def how_it_runs(doc: Path, command: str, why: str) -> str | None:
    """'why not', 'here', 'walkthrough', 'elsewhere', or None (not covered) for a command outside the
    walk-through."""
    argv = shlex.split(command)
    if says_why_not(why):
        return "why not"
    if doc != README and argv[0] == "pairuni" and argv[1] in RUN_HERE:
        return "here"
    if argv in [shlex.split(c) for c in WALKTHROUGH_COMMANDS]:
        return "walkthrough"
    if command in RUN_ELSEWHERE:
        return "elsewhere"
    return None


def doc_commands(doc: Path) -> list[tuple[str, str | None]]:
    """[(command, how it runs)] of a document, the walk-through's commands last."""
    rest, walkthrough = split_walkthrough(doc)
    return ([(c, how_it_runs(doc, c, why)) for c, why in shell_commands(rest)]
            + [(c, "walkthrough") for c, _ in shell_commands(walkthrough)])


def test_readme_is_an_entrance():
    assert len(README.read_text().splitlines()) <= 250


def test_documents_have_runnable_examples():
    assert any(doc == README for doc, _, _ in BLOCKS), "README.md should carry at least one runnable ```python example"


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"{rel(d)}-{i}" for d, i, _ in BLOCKS])
def test_python_block_runs(index, tmp_path):
    doc, i, block = BLOCKS[index]
    script = tmp_path / f"block_{i}.py"
    script.write_text(block)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{rel(doc)} block {i} failed:\n{block}\n--- stderr ---\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("snippet", list(SNIPPETS), ids=lambda p: p.name)
def test_snippets_are_quoted_verbatim(snippet):
    quoted = [rel(doc) for doc in DOCS if SNIPPETS[snippet].strip() in doc.read_text()]
    assert quoted, f"{rel(snippet)} is quoted by no document"


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but `-` and `_` dropped, spaces to `-`; a repeated
    heading gets `-1`, `-2`, ..."""
    out: set[str] = set()
    for heading in re.findall(r"^#+ (.+)$", prose(path.read_text()), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = 0
        while (f"{slug}-{n}" if n else slug) in out:
            n += 1
        out.add(f"{slug}-{n}" if n else slug)
    return out


def test_relative_links_resolve():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(doc.read_text())):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists():
                broken.append(f"{rel(doc)}: {target} (no such file)")
            elif anchor and (path.suffix != ".md" or anchor not in anchors(path)):
                broken.append(f"{rel(doc)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_command_is_run_or_says_why_not():
    commands = [(doc, c, how) for doc in DOCS for c, how in doc_commands(doc)]
    uncovered = [f"{rel(doc)}: {c}" for doc, c, how in commands if how is None]
    assert not uncovered, ("commands neither run by a test nor saying why not (a '# needs ...' or "
                           "'# not run by the tests: ...' comment):\n" + "\n".join(uncovered))
    assert {"why not", "here", "walkthrough", "elsewhere"} <= {how for _, _, how in commands}
    assert len(WALKTHROUGH_COMMANDS) > 10
    for target in RUN_ELSEWHERE.values():
        assert (ROOT / target).exists(), target
    source = (ROOT / "tests" / "test_readme_janus.py").read_text()
    assert f'SECTION = "{WALKTHROUGH}"' in source and '"docs" / "TRAINING.md"' in source


@pytest.mark.slow
def test_document_commands_run(tmp_path, monkeypatch, capsys):
    """Each document's own `pairuni` commands, in its order, in one fresh folder per document."""
    from engine import cli

    ran = []
    for doc in DOCS:
        commands = [c for c, how in doc_commands(doc) if how == "here"]
        if not commands:
            continue
        folder = tmp_path / doc.stem  # stands in for the repository root, where the documents' commands run
        folder.mkdir()
        (folder / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
        monkeypatch.chdir(folder)
        text = doc.read_text()
        for command in commands:
            argv = shlex.split(command)
            sub, args = argv[1], argv[2:]
            if "--num-batches" in args:
                args[args.index("--num-batches") + 1] = "2"
            args = [*args, *SHRINK.get(sub, [])]
            capsys.readouterr()
            assert cli.main([sub, *args]) == 0, f"{rel(doc)}: {command}\n{capsys.readouterr().err[-3000:]}"
            out = capsys.readouterr().out
            ran.append((doc.name, sub))
            if sub == "plan":
                tables = re.findall(r"(?:^\|.*\|\n)+", out, flags=re.M)
                peak = re.search(r"\| peak \| (\d+\.\d\d) \|", out)
                assert any(t in text for t in tables) or (peak and f"{peak[1]} GiB" in text), (
                    f"{rel(doc)} should show what `{command}` prints:\n{out}")
            elif sub in ("build-pairs", "export"):
                assert Path(args[args.index("--out") + 1]).exists(), command
            elif sub == "probe-gradients":
                assert (Path(args[args.index("--out") + 1]) / "gradient_probe.json").is_file()
    assert {("TRAINING.md", s) for s in ("build-pairs", "train", "eval", "export", "probe-gradients")} <= set(ran)
    assert ("MEMORY.md", "plan") in ran


def test_demo_rewards_are_the_golden_runs():
    golden = ROOT / "tests" / "engine" / "golden" / "default_run_metrics.jsonl"
    rows = [json.loads(line) for line in golden.read_text().splitlines()]
    text = " ".join(TRAINING.read_text().split())
    for task in ("understanding", "generation"):
        values = [r[f"reward.{task}"] for r in rows]
        said = f"{task} {sum(values[:5]) / 5:.3f} -> {sum(values[-5:]) / 5:.3f}"
        assert said in text, f"docs/TRAINING.md should give the golden run's rewards: {said!r}"


def test_fault_matrix_names_existing_tests():
    names = set(re.findall(r"`(test_\w+)`", (ROOT / "docs" / "FAULTS.md").read_text()))
    defined = {name for path in (ROOT / "tests").rglob("test_*.py")
               for name in re.findall(r"^def (test_\w+)", path.read_text(), flags=re.M)}
    assert names and not names - defined, sorted(names - defined)
