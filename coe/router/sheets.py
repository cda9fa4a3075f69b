"""Prompt sheets: training prompts written by hand, one plain-text file per category.

A sheet is easier to write and review than JSON Lines, because pasted code, logs and e-mails keep
their line breaks. Each prompt starts with a header line and runs to the next header:

    <<<PROMPT lang=de tags=long,pasted>>>
    Hier ist mein Log ...
    Was ist da los?

The file's name is the category (``coding.txt``). ``lang`` is an ISO 639-1 code (default ``en``);
``tags`` are free words used to measure slices of the data (``long``, ``terse``, ``crossed``).
Blank lines around a prompt are dropped; those inside it are kept.

Run ``python -m coe.router.sheets FILE...`` to check sheets and count their prompts by shape.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from coe.errors import BadRequestError

HEADER = re.compile(r"^<<<PROMPT((?:\s+\w+=[^\s>]*)*)\s*>>>\s*$")
LONG_CHARS = (300, 3000)


class SheetError(BadRequestError):
    pass


@dataclass(frozen=True)
class SheetPrompt:
    prompt: str
    category: str
    lang: str = "en"
    tags: tuple[str, ...] = field(default=())
    where: str = ""


def read_sheet(path: Path | str) -> list[SheetPrompt]:
    path = Path(path)
    category = path.stem
    out: list[SheetPrompt] = []
    header: tuple[int, dict[str, str]] | None = None
    body: list[str] = []

    def flush() -> None:
        if header is None:
            if "".join(body).strip():
                raise SheetError(f"{path}:1: text before the first <<<PROMPT>>> header")
            return
        line, attrs = header
        text = "\n".join(body).strip("\n")
        if not text.strip():
            raise SheetError(f"{path}:{line}: empty prompt")
        tags = tuple(t for t in attrs.get("tags", "").split(",") if t)
        out.append(SheetPrompt(text, category, attrs.get("lang", "en"), tags, f"{path}:{line}"))

    for n, raw in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        m = HEADER.match(raw)
        if m is None:
            if raw.startswith("<<<PROMPT"):
                raise SheetError(f"{path}:{n}: malformed header {raw!r}")
            body.append(raw)
            continue
        flush()
        attrs = dict(a.split("=", 1) for a in m.group(1).split())
        unknown = set(attrs) - {"lang", "tags"}
        if unknown:
            raise SheetError(f"{path}:{n}: unknown header keys {sorted(unknown)} (lang, tags)")
        header, body = (n, attrs), []
    flush()
    return out


def read_sheets(folder: Path | str) -> list[SheetPrompt]:
    """Every ``*.txt`` sheet in FOLDER and its subfolders, in path order."""
    files = sorted(Path(folder).rglob("*.txt"))
    if not files:
        raise SheetError(f"{folder}: no *.txt prompt sheets")
    return [p for f in files for p in read_sheet(f)]


def shape_counts(prompts: list[SheetPrompt]) -> dict[str, int]:
    lo, hi = LONG_CHARS
    counts = Counter(
        {
            "prompts": len(prompts),
            "long (300-3000 chars)": sum(lo <= len(p.prompt) <= hi for p in prompts),
            "over 3000 chars": sum(len(p.prompt) > hi for p in prompts),
            "short (< 80 chars)": sum(len(p.prompt) < 80 for p in prompts),
            "not English": sum(p.lang != "en" for p in prompts),
        }
    )
    for p in prompts:
        for t in p.tags:
            counts[f"tag {t}"] += 1
    return dict(counts)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m coe.router.sheets SHEET.txt...", file=sys.stderr)
        return 2
    for name in argv:
        try:
            prompts = read_sheet(name)
        except SheetError as exc:
            print(exc, file=sys.stderr)
            return 1
        seen = Counter(p.prompt for p in prompts)
        dupes = sum(n - 1 for n in seen.values() if n > 1)
        langs = Counter(p.lang for p in prompts)
        print(f"{name}: {shape_counts(prompts)}; duplicates {dupes}; languages {dict(langs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
