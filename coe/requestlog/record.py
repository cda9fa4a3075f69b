"""One row of the request log, and the SQLite table that holds the rows.

A row is written once per request, when it ends (answered, failed or cancelled). Times are in
seconds: ``time`` is the wall-clock start (Unix time), ``ttft_s`` and ``latency_s`` are counted
from the moment the front end took the request.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields
from typing import Any, Literal

FrontEnd = Literal["cli", "gateway", "eval"]
PromptPolicy = Literal["keep", "hash", "none"]

# Bumped when the table changes; a file of another version is left alone (see writer.py).
SCHEMA_VERSION = 1


@dataclass
class RequestRecord:
    time: float
    front_end: str
    request_id: str | None = None
    pool: str | None = None  # the experts.yaml the pool was read from
    client: str | None = None  # the gateway's client (key:NAME or peer:ADDRESS)
    model: str | None = None  # as asked: auto, an expert, auto:CATEGORY
    category: str | None = None
    confidence: float | None = None
    fallback: bool | None = None  # the router fell back, or a fallback expert stood in
    routed_by: str | None = None  # caller, category, session, router, fallback
    expert: str | None = None
    strategy: str | None = None
    messages: int | None = None  # turns in the conversation sent
    prompt: str | None = None  # the last user turn, when prompts are kept
    prompt_sha256: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    answer_chars: int | None = None
    finish_reason: str | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    cache: str | None = None  # hit, miss, bypass (the gateway's response cache)
    error: str | None = None  # "ClassName: message", redacted

    def row(self) -> tuple[Any, ...]:
        return astuple(self)

    @classmethod
    def from_row(cls, row: Any) -> RequestRecord:
        values = dict(zip(COLUMNS, row, strict=True))
        if values["fallback"] is not None:
            values["fallback"] = bool(values["fallback"])
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in COLUMNS}


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(RequestRecord))

_TYPES = {
    "time": "REAL NOT NULL",
    "front_end": "TEXT NOT NULL",
    "confidence": "REAL",
    "fallback": "INTEGER",
    "messages": "INTEGER",
    "prompt_tokens": "INTEGER",
    "completion_tokens": "INTEGER",
    "answer_chars": "INTEGER",
    "ttft_s": "REAL",
    "latency_s": "REAL",
}

CREATE_TABLE = (
    "CREATE TABLE IF NOT EXISTS requests (id INTEGER PRIMARY KEY, "
    + ", ".join(f"{c} {_TYPES.get(c, 'TEXT')}" for c in COLUMNS)
    + ")"
)
CREATE_INDEXES = (
    "CREATE INDEX IF NOT EXISTS requests_time ON requests (time)",
    "CREATE INDEX IF NOT EXISTS requests_expert ON requests (expert, time)",
)
INSERT = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"
