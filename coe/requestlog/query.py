"""Reading the request log back: recent rows with filters (`coe logs`), and what they add up to
(`coe logs stats`): the routing mix, per-expert latency and time-to-first-token percentiles, the
fallback rate and the errors."""

from __future__ import annotations

import re
import sqlite3
import time
import urllib.parse
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from coe.errors import BadRequestError
from coe.requestlog.record import COLUMNS, RequestRecord

_AGO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class SinceError(BadRequestError):
    def __init__(self, text: str):
        super().__init__(
            f"--since {text!r}: give a duration back from now (30s, 10m, 2h, 7d, 1w) or an ISO "
            "time (2026-11-30T14:00, local time unless it names its zone)"
        )


def parse_since(text: str, now: float | None = None) -> float:
    """The Unix time ``text`` names: a duration before ``now`` (10m, 2h) or an ISO time."""
    now = time.time() if now is None else now
    match = _AGO.match(text)
    if match:
        return now - float(match[1]) * _UNIT_S[match[2]]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()  # naive: local time
    except ValueError:
        raise SinceError(text) from None


@dataclass(frozen=True)
class Filters:
    limit: int | None = None  # the most recent ones; None: all
    expert: str | None = None
    category: str | None = None
    since: float | None = None  # Unix time
    front_end: str | None = None


def read_records(path: Path, filters: Filters = Filters()) -> list[RequestRecord]:
    """The matching rows, oldest first (the last ``limit`` of them). A missing file has none."""
    if not path.exists():
        return []
    where, args = [], []
    for column, value in (
        ("expert", filters.expert),
        ("category", filters.category),
        ("front_end", filters.front_end),
    ):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if filters.since is not None:
        where.append("time >= ?")
        args.append(filters.since)
    sql = f"SELECT {', '.join(COLUMNS)} FROM requests"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY time DESC, id DESC"
    if filters.limit is not None:
        sql += " LIMIT ?"
        args.append(filters.limit)
    # Read-only: reading never creates or changes the file a pool writes.
    uri = f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=5.0)
    try:
        rows = conn.execute(sql, args).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        conn.close()
    return [RequestRecord.from_row(r) for r in reversed(rows)]


# -- statistics ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (no interpolation); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))


def _spread(values: Sequence[float]) -> dict[str, float | None]:
    return {name: _round(percentile(values, q)) for name, q in QUANTILES}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _mix(counts: Counter[str], total: int) -> list[dict[str, Any]]:
    return [
        {"name": name, "count": n, "share": round(n / total, 4)} for name, n in counts.most_common()
    ]


def summarize(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """What `coe logs stats` prints. Latency and time-to-first-token percentiles are over the
    requests that were answered without an error (a failed request's time says little); the
    fallback rate is over the requests that were routed to an expert."""
    total = len(records)
    decided = [r for r in records if r.fallback is not None]
    ok = [r for r in records if r.error is None]
    experts = sorted({r.expert for r in records if r.expert is not None})
    per_expert = []
    for name in experts:
        mine = [r for r in records if r.expert == name]
        answered = [r for r in mine if r.error is None]
        per_expert.append(
            {
                "expert": name,
                "count": len(mine),
                "share": round(len(mine) / total, 4),
                "errors": len(mine) - len(answered),
                "latency_s": _spread([r.latency_s for r in answered if r.latency_s is not None]),
                "ttft_s": _spread([r.ttft_s for r in answered if r.ttft_s is not None]),
            }
        )
    return {
        "requests": total,
        "first": min((r.time for r in records), default=None),
        "last": max((r.time for r in records), default=None),
        "errors": total - len(ok),
        "fallbacks": sum(1 for r in decided if r.fallback),
        "fallback_rate": _round(sum(1 for r in decided if r.fallback) / len(decided))
        if decided
        else None,
        "cache": dict(Counter(r.cache for r in records if r.cache is not None)),
        "front_ends": dict(Counter(r.front_end for r in records)),
        "categories": _mix(Counter(r.category or "(none)" for r in records), total)
        if total
        else [],
        "experts": per_expert,
        "latency_s": _spread([r.latency_s for r in ok if r.latency_s is not None]),
        "ttft_s": _spread([r.ttft_s for r in ok if r.ttft_s is not None]),
    }
