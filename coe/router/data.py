"""Labelled prompts: our own JSONL, and the MT-Bench and Arena-Hard question files.

Formats are told apart by their keys:
- ``{"prompt": ..., "category": ...}``: coe's own training/eval data;
- ``{"question_id", "category", "turns": [...]}``: MT-Bench (the first turn is the prompt);
- ``{"uid", "category", "subcategory", "prompt"}``: Arena-Hard v2.0 (the subcategory is the label;
  its ``creative_writing`` is what coe calls ``writing``).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from coe.errors import BadRequestError
from coe.jsonl import read_jsonl
from coe.router.sheets import SheetError, read_sheet, read_sheets

ARENA_HARD_CATEGORY = {"creative_writing": "writing", "coding": "coding", "math": "math"}


def arena_hard_category(subcategory: str) -> str:
    """coe's category for an Arena-Hard subcategory (creative_writing is writing); any other
    name stands for itself."""
    return ARENA_HARD_CATEGORY.get(subcategory, subcategory)


class DataError(BadRequestError):
    pass


@dataclass(frozen=True)
class LabelledPrompt:
    prompt: str
    category: str
    # Where known (prompt sheets): the user's language and free tags such as "long" or "terse",
    # used to measure slices of a held-out split.
    lang: str = "en"
    tags: tuple[str, ...] = ()


def _row(raw: dict, where: str) -> LabelledPrompt:
    if "turns" in raw and "category" in raw:
        turns = raw["turns"]
        if not turns:
            raise DataError(f"{where}: MT-Bench row without turns")
        return LabelledPrompt(str(turns[0]), str(raw["category"]))
    if "subcategory" in raw and "prompt" in raw:
        return LabelledPrompt(str(raw["prompt"]), arena_hard_category(str(raw["subcategory"])))
    if "prompt" in raw and "category" in raw:
        return LabelledPrompt(str(raw["prompt"]), str(raw["category"]))
    raise DataError(
        f'{where}: expected {{"prompt": ..., "category": ...}} (or an MT-Bench / Arena-Hard '
        f"question row); got keys {sorted(raw)}"
    )


def read_labelled(path: Path | str) -> list[LabelledPrompt]:
    """Rows of a JSONL file, of one prompt sheet (``NAME.txt``: its name is the category), or of
    a folder of prompt sheets (``coe.router.sheets``)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir() or path.suffix == ".txt":
        try:
            sheet = read_sheets(path) if path.is_dir() else read_sheet(path)
        except SheetError as exc:
            raise DataError(str(exc)) from None
        return [LabelledPrompt(p.prompt, p.category, p.lang, p.tags) for p in sheet]
    rows = []
    for n, raw in read_jsonl(path, DataError):
        row = _row(raw, f"{path}:{n}")
        if not row.prompt.strip():
            raise DataError(f"{path}:{n}: empty prompt")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def data_hash(rows: list[LabelledPrompt]) -> str:
    """SHA-256 of the rows in order: identifies the training data a router was fitted on."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r.prompt, r.category], ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def is_heldout(prompt: str, fraction: float) -> bool:
    """Whether a prompt belongs to the held-out split: decided by a hash of its text, so the
    split is the same on every machine and a prompt keeps its side when others are added."""
    bucket = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % 10_000
    return bucket < fraction * 10_000


def split_heldout(
    rows: list[LabelledPrompt], fraction: float
) -> tuple[list[LabelledPrompt], list[LabelledPrompt]]:
    train: list[LabelledPrompt] = []
    held: list[LabelledPrompt] = []
    for r in rows:
        (held if is_heldout(r.prompt, fraction) else train).append(r)
    return train, held


def category_counts(rows: list[LabelledPrompt]) -> dict[str, int]:
    return dict(sorted(Counter(r.category for r in rows).items()))
