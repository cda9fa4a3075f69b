"""JSON Lines, read one way everywhere in coe.

Lines are split on "\\n" only: prompts may hold U+2028 and its kin, which JSON leaves raw and
str.splitlines() would treat as line breaks (one Arena-Hard prompt does).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def read_jsonl(
    path: Path, error: type[Exception] = ValueError
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each line that is not blank; `error` for anything else."""
    try:
        handle = path.open(encoding="utf-8", newline="\n")
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror})") from None
    with handle:
        for n, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{path}:{n}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise error(f"{path}:{n}: expected a JSON object")
            yield n, row
