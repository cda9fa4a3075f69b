"""JSON Lines, read one way everywhere in coe.

Lines are split on "\\n" only: prompts may hold U+2028 and its kin, which JSON leaves raw and
str.splitlines() would treat as line breaks (one Arena-Hard prompt does).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def read_jsonl(
    path: Path, error: type[Exception] = ValueError, *, skip_bad: bool = False
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each line that is not blank; `error` for anything else, or
    with `skip_bad` a warning and the next line (a file still being appended to)."""
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
                problem = None if isinstance(row, dict) else "expected a JSON object"
            except json.JSONDecodeError as exc:
                problem = f"not JSON ({exc.msg})"
            if problem is None:
                yield n, row
            elif skip_bad:
                log.warning("%s:%d: skipped: %s", path, n, problem)
            else:
                raise error(f"{path}:{n}: {problem}")
