"""PairUG records: one `Sample` per half, one `Pair` per JSONL line.

A PairUG line (the released format, docs/PAIRUNI.md "Data: UG pairs"):

    {"similarity": 0.71,
     "generate_ann":   {"image_path": ..., "prompt": ..., "question": ..., "answer": ..., "tag": ...},
     "understand_ann": {"image_path": ..., "prompt": ..., "question": ..., "answer": ..., "tag": ...}}

This project adds two optional keys that the released file does not carry:
`"kind": "aligned" | "retrieved"` on the line and `"id"` (the source sample id) inside each
half. When `kind` is absent it is inferred: a line whose two halves name the same image is an
aligned pair (both halves come from one quadruple), any other line is retrieved. Keys this
module does not know are kept in `extra` / `meta` and written back unchanged, so a
read-then-write round trip loses nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# The five keys every half of a PairUG line carries, in the order they are written.
ANN_FIELDS: tuple[str, ...] = ("image_path", "prompt", "question", "answer", "tag")
PAIR_KINDS: tuple[str, ...] = ("aligned", "retrieved")
# Suffix of every multiple-choice question in PairUG (and in the toy world).
MC_SUFFIX = "Answer with the options letter from the given choices directly."
OPTION_LETTERS = "ABCDEFGHIJ"


def format_multiple_choice(question: str, options: list[str]) -> str:
    """`question`, one `X. option` line per option, then `MC_SUFFIX`; the LLaVA/PairUG layout.

    Raises ValueError for fewer than 2 or more than len(OPTION_LETTERS) options, or for an
    empty or repeated option.
    """
    if not 2 <= len(options) <= len(OPTION_LETTERS):
        raise ValueError(f"options: expected 2..{len(OPTION_LETTERS)} choices, got {len(options)}")
    cleaned = [str(o).strip() for o in options]
    if any(not o for o in cleaned):
        raise ValueError(f"options: empty choice in {options!r}")
    if len({o.lower() for o in cleaned}) != len(cleaned):
        raise ValueError(f"options: repeated choice in {options!r}")
    lines = [question.strip()] + [f"{OPTION_LETTERS[i]}. {o}" for i, o in enumerate(cleaned)]
    return "\n".join(lines + [MC_SUFFIX])


def parse_multiple_choice(text: str) -> tuple[str, list[str]]:
    """Inverse of `format_multiple_choice`: `(stem, options)`; options is [] when `text` lists none."""
    stem: list[str] = []
    options: list[str] = []
    for line in text.strip().splitlines():
        line = line.strip()
        if line == MC_SUFFIX:
            continue
        expected = OPTION_LETTERS[len(options)] if len(options) < len(OPTION_LETTERS) else None
        if expected and line.startswith(f"{expected}. "):
            options.append(line[3:].strip())
        elif not options:
            stem.append(line)
    return " ".join(stem).strip(), options


@dataclass
class Sample:
    """One half of a pair, or one row of an understanding / generation source set.

    image_path: image file, relative to the data root (the folder of the JSONL by default) or absolute.
    prompt:     the caption, i.e. the text-to-image prompt ("" when not yet completed).
    question:   the understanding question, multiple choice ending in MC_SUFFIX ("" when missing).
    answer:     the reference answer, an option letter for multiple choice ("" when missing).
    tag:        free-form source / task label, e.g. "toy/color".
    source_id:  id of the sample in its source set ("" when unknown); written as "id".
    meta:       any other keys of the half, kept verbatim (the toy world stores "attributes" here).
    """

    image_path: str
    prompt: str = ""
    question: str = ""
    answer: str = ""
    tag: str = ""
    source_id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def has_caption(self) -> bool:
        return bool(self.prompt.strip())

    @property
    def has_qa(self) -> bool:
        return bool(self.question.strip()) and bool(self.answer.strip())

    @property
    def is_complete(self) -> bool:
        """True for a full quadruple (image, caption, question, answer)."""
        return bool(self.image_path) and self.has_caption and self.has_qa

    def to_ann(self) -> dict[str, Any]:
        """The PairUG `*_ann` dict (five fields, then `id` when known, then `meta`)."""
        ann: dict[str, Any] = {k: getattr(self, k) for k in ANN_FIELDS}
        if self.source_id:
            ann["id"] = self.source_id
        for key, value in self.meta.items():
            if key not in ann:
                ann[key] = value
        return ann

    @classmethod
    def from_ann(cls, ann: dict[str, Any], *, where: str = "ann") -> Sample:
        """Build from a PairUG half (or a source-set row). Missing text fields become "".

        Raises ValueError naming `where` and the key when `ann` is not a dict, lacks `image_path`,
        or holds a non-string where a string belongs.
        """
        if not isinstance(ann, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(ann).__name__}")  # noqa: TRY004 (bad file content)
        if "image_path" not in ann:
            raise ValueError(f"{where}: missing field 'image_path'")
        values: dict[str, str] = {}
        for key in ANN_FIELDS + ("id",):
            value = ann.get(key, "")
            if value is None:
                value = ""
            if key == "id" and isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str):
                raise ValueError(f"{where}.{key}: expected a string, got {type(value).__name__}")  # noqa: TRY004
            values[key] = value
        meta = {k: v for k, v in ann.items() if k not in ANN_FIELDS and k != "id"}
        return cls(image_path=values["image_path"], prompt=values["prompt"], question=values["question"],
                   answer=values["answer"], tag=values["tag"], source_id=values["id"], meta=meta)


@dataclass
class Pair:
    """One PairUG line: an understanding half and a generation half that talk about related content.

    kind:        "aligned" (both halves from one completed quadruple; pair weight 1) or
                 "retrieved" (matched by similarity; pair weight sqrt(similarity)).
    similarity:  cosine similarity of the two halves' features, in [0, 1] (1.0 for aligned pairs).
    understand:  the half whose (image, question, answer) trains understanding.
    generate:    the half whose (prompt, image) trains generation.
    extra:       other top-level keys of the line, kept verbatim.
    """

    kind: str
    similarity: float
    understand: Sample
    generate: Sample
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in PAIR_KINDS:
            raise ValueError(f"kind: expected one of {PAIR_KINDS}, got {self.kind!r}")
        s = self.similarity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0.0 <= s <= 1.0:
            raise ValueError(f"similarity: expected a number in [0, 1], got {s!r}")
        self.similarity = float(s)

    @property
    def aligned(self) -> bool:
        return self.kind == "aligned"

    def to_record(self) -> dict[str, Any]:
        """The PairUG JSON object for this pair (with the optional `kind` key)."""
        record: dict[str, Any] = {
            "similarity": self.similarity,
            "kind": self.kind,
            "generate_ann": self.generate.to_ann(),
            "understand_ann": self.understand.to_ann(),
        }
        for key, value in self.extra.items():
            record.setdefault(key, value)
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any], *, where: str = "pair") -> Pair:
        """Parse one PairUG JSON object; raises ValueError naming `where` and the offending key."""
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")  # noqa: TRY004
        for key in ("similarity", "generate_ann", "understand_ann"):
            if key not in record:
                raise ValueError(f"{where}: missing field {key!r}")
        understand = Sample.from_ann(record["understand_ann"], where=f"{where}.understand_ann")
        generate = Sample.from_ann(record["generate_ann"], where=f"{where}.generate_ann")
        kind = record.get("kind")
        if kind is None:
            kind = infer_kind(understand.image_path, generate.image_path)
        extra = {k: v for k, v in record.items() if k not in ("similarity", "kind", "generate_ann", "understand_ann")}
        try:
            return cls(kind=kind, similarity=record["similarity"], understand=understand, generate=generate, extra=extra)
        except ValueError as err:
            raise ValueError(f"{where}.{err}") from None


def infer_kind(understand_image_path: str, generate_image_path: str) -> str:
    """Kind of a line without a `kind` key: aligned when both halves show the same image."""
    return "aligned" if understand_image_path and understand_image_path == generate_image_path else "retrieved"
