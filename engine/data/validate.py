"""Validation of PairUG JSONL files: every problem of every line, with its line number.

`validate_pairs(path)` streams the file once and reports, per line:
malformed JSON, a line that is not an object, missing top-level or per-half fields,
non-string fields, similarity that is not a finite number in [0, 1], an unknown `kind`,
an empty understanding question / answer or generation prompt, an answer letter that
names no listed option, image files that do not exist under the data root or do not decode
as images (truncated, not an image, over the pixel budget, a mode without an RGB mapping), a line
that is not UTF-8 or longer than `io.MAX_LINE_BYTES` (reading goes on at the next line), a source
`id` that an earlier line already used for the same half, and pairs that repeat an earlier line
(same two halves). A file without any pair is a problem too. Memory grows with the number of
distinct pairs (one 16-byte digest each), ids and image paths, never with line length.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..files import atomic_writer
from .io import (
    ImageError,
    data_root_of,
    dumps_line,
    iter_line_results,
    open_rgb,
    relocate_image_path,
    resolve_image_path,
)
from .schema import (
    ANN_FIELDS,
    OPTION_LETTERS,
    PAIR_KINDS,
    infer_kind,
    parse_multiple_choice,
)

# Fields that must be non-empty, per half: the understanding half trains on (image, question,
# answer), the generation half on (prompt, image).
REQUIRED_TEXT = {"understand_ann": ("image_path", "question", "answer"), "generate_ann": ("image_path", "prompt")}


@dataclass(frozen=True)
class Problem:
    """One problem found in a PairUG file. line: 1-based line number; field: dotted key or "" for the line."""

    line: int
    field: str
    message: str

    def format(self, path: str | os.PathLike) -> str:
        where = f"{path}:{self.line}" if self.line else str(path)
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


@dataclass
class ValidationReport:
    """Outcome of `validate_pairs`.

    n_lines:      non-blank lines read.
    n_valid:      lines without any problem.
    n_problems:   all problems found (may exceed len(problems) when capped).
    problems:     the first `max_problems` problems, in file order.
    kinds:        count of valid lines per pair kind.
    """

    path: str
    n_lines: int = 0
    n_valid: int = 0
    n_problems: int = 0
    problems: list[Problem] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.n_problems == 0

    def summary(self) -> str:
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(self.kinds.items())) or "none"
        verdict = "OK" if self.ok else f"{self.n_problems} problem(s)"
        return f"{self.path}: {self.n_lines} lines, {self.n_valid} valid ({kinds}): {verdict}"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "n_lines": self.n_lines, "n_valid": self.n_valid, "n_problems": self.n_problems,
                "kinds": self.kinds, "problems": [p.__dict__ for p in self.problems]}


class _Checker:
    def __init__(self, data_root: Path | None, check_images: bool):
        self.data_root = data_root
        self.check_images = check_images
        self.seen: dict[bytes, int] = {}
        self.seen_ids: dict[tuple[str, str], int] = {}
        self.image_problem: dict[str, str | None] = {}

    def _image_problem(self, image_path: str) -> str | None:
        """None when the image exists and decodes; else what is wrong with it (cached per path)."""
        if image_path not in self.image_problem:
            self.image_problem[image_path] = image_file_problem(resolve_image_path(image_path, self.data_root))
        return self.image_problem[image_path]

    def check(self, number: int, text: str) -> tuple[list[Problem], dict | None]:
        problems: list[Problem] = []

        def report(key: str, message: str) -> None:
            problems.append(Problem(number, key, message))

        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            report("", f"malformed JSON ({err.msg} at column {err.colno})")
            return problems, None
        if not isinstance(record, dict):
            report("", f"expected a JSON object, got {type(record).__name__}")
            return problems, None

        for key in ("similarity", "generate_ann", "understand_ann"):
            if key not in record:
                report(key, "missing field")
        if "similarity" in record:
            s = record["similarity"]
            if isinstance(s, bool) or not isinstance(s, (int, float)):
                report("similarity", f"expected a number, got {json.dumps(s)}")
            elif not math.isfinite(s) or not 0.0 <= s <= 1.0:
                report("similarity", f"{s!r} is outside [0, 1]")
        if "kind" in record and record["kind"] not in PAIR_KINDS:
            report("kind", f"expected one of {list(PAIR_KINDS)}, got {json.dumps(record['kind'])}")

        halves: dict[str, dict] = {}
        for half in ("understand_ann", "generate_ann"):
            ann = record.get(half)
            if ann is None:
                continue
            if not isinstance(ann, dict):
                report(half, f"expected a JSON object, got {type(ann).__name__}")
                continue
            halves[half] = ann
            for key in ANN_FIELDS:
                where = f"{half}.{key}"
                if key not in ann:
                    report(where, "missing field")
                    continue
                value = ann[key]
                if value is not None and not isinstance(value, str):
                    report(where, f"expected a string, got {type(value).__name__}")
                    continue
                if key in REQUIRED_TEXT[half] and not (value or "").strip():
                    report(where, "empty")
            source_id = ann.get("id", "")
            if isinstance(source_id, bool) or not isinstance(source_id, (str, int)):
                report(f"{half}.id", f"expected a string, got {type(source_id).__name__}")
            elif str(source_id):
                first = self.seen_ids.setdefault((half, str(source_id)), number)
                if first != number:
                    report(f"{half}.id", f"duplicate id {json.dumps(source_id)} (first used on line {first})")

        u = halves.get("understand_ann", {})
        question, answer = u.get("question"), u.get("answer")
        if isinstance(question, str) and isinstance(answer, str):
            _, options = parse_multiple_choice(question)
            letter = answer.strip()
            if options and len(letter) == 1 and letter.upper() in OPTION_LETTERS[len(options):]:
                report("understand_ann.answer",
                       f"{letter!r} names no option (the question lists {OPTION_LETTERS[0]}-{OPTION_LETTERS[len(options) - 1]})")

        if self.check_images and self.data_root is not None:
            for half, ann in halves.items():
                path = ann.get("image_path")
                problem = self._image_problem(path) if isinstance(path, str) and path.strip() else None
                if problem is not None:
                    report(f"{half}.image_path", problem)

        if len(halves) == 2:
            key = _pair_digest(halves["understand_ann"], halves["generate_ann"])
            first = self.seen.get(key)
            if first is not None:
                report("", f"duplicate pair (same halves as line {first})")
            else:
                self.seen[key] = number
        return problems, (record if not problems else None)


def image_file_problem(path: Path) -> str | None:
    """None when `path` is a file that decodes to RGB as training will load it (`io.open_rgb`: pixels
    decoded, pixel budget, mode mapping); else a one-line reason naming it."""
    try:
        open_rgb(path)  # decodes the pixels: a truncated file fails here, not at training step 1
    except ImageError as err:
        return str(err)
    except OSError as err:  # e.g. a file unreadable for permissions
        return f"not a readable image: {path} ({type(err).__name__}: {err})"
    return None


def _pair_digest(understand: dict, generate: dict) -> bytes:
    """Identity of a pair: its two halves' PairUG fields, ignoring similarity, kind and extras."""
    core = [[understand.get(k) for k in ANN_FIELDS], [generate.get(k) for k in ANN_FIELDS]]
    return hashlib.blake2b(json.dumps(core, ensure_ascii=False).encode(), digest_size=16).digest()


def iter_checked_lines(path: str | os.PathLike, *, data_root: str | os.PathLike | None = None,
                       check_images: bool = True) -> Iterator[tuple[int, str, list[Problem], dict | None]]:
    """Yield `(line_number, text, problems, record_or_None)` for every non-blank line of `path`.

    `data_root` defaults to the folder of `path`; `check_images=False` skips the file checks.
    """
    root = Path(data_root) if data_root is not None else data_root_of(path)
    checker = _Checker(root, check_images)
    for number, text, problem in iter_line_results(path):
        if problem is not None:
            yield number, "", [Problem(number, "", problem)], None
            continue
        problems, record = checker.check(number, text)
        yield number, text, problems, record


def validate_pairs(path: str | os.PathLike, *, data_root: str | os.PathLike | None = None, check_images: bool = True,
                   max_problems: int | None = 10_000, keep_valid: str | os.PathLike | None = None) -> ValidationReport:
    """Check every line of a PairUG JSONL file and return all problems found.

    path:         the pairs file. Raises ValueError when it does not exist.
    data_root:    folder that relative `image_path`s are resolved against (default: the file's folder).
    check_images: also check that every image file exists.
    max_problems: keep at most this many `Problem`s in the report (all are counted); None keeps all.
    keep_valid:   when given, the lines without problems are written there, atomically (the
                  file appears only once the whole input was read); relative image paths are
                  rewritten so that they resolve from the new file's folder.
    """
    if not Path(path).is_file():
        raise ValueError(f"path: no such file: {path}")
    report = ValidationReport(path=str(path))
    from_root = Path(data_root) if data_root is not None else data_root_of(path)
    to_root = data_root_of(keep_valid) if keep_valid is not None else from_root
    with contextlib.ExitStack() as stack:
        fh = stack.enter_context(atomic_writer(keep_valid)) if keep_valid is not None else None
        for _, text, problems, record in iter_checked_lines(path, data_root=data_root, check_images=check_images):
            report.n_lines += 1
            if problems:
                report.n_problems += len(problems)
                room = None if max_problems is None else max_problems - len(report.problems)
                report.problems.extend(problems if room is None else problems[:max(room, 0)])
                continue
            report.n_valid += 1
            kind = record.get("kind") or infer_kind(record["understand_ann"]["image_path"],
                                                    record["generate_ann"]["image_path"])
            report.kinds[kind] = report.kinds.get(kind, 0) + 1
            if fh is not None:
                fh.write(_relocated_line(text, record, from_root, to_root))
    if report.n_lines == 0:
        report.n_problems += 1
        report.problems.append(Problem(0, "", "no pairs: the file is empty"))
    return report


def _relocated_line(text: str, record: dict, from_root: Path, to_root: Path) -> str:
    """`text` as a line of a file in `to_root`: unchanged when its image paths resolve the same."""
    if from_root.resolve() == to_root.resolve():
        return text if text.endswith("\n") else text + "\n"
    for half in ("understand_ann", "generate_ann"):
        image_path = record[half]["image_path"]
        if not Path(image_path).is_absolute():
            record[half]["image_path"] = relocate_image_path(image_path, from_root, to_root)
    return dumps_line(record) + "\n"
