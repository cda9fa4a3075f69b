"""The Store protocol, and the token-bucket arithmetic both stores share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

MINUTE_MS = 60_000


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    # When a refused client may try again; 0 when allowed.
    retry_after_s: float = 0.0
    # Which limit refused: "requests" or "tokens".
    limit: str | None = None


class Store(Protocol):
    """Bytes by key with a TTL, plus atomic per-subject rate limits.

    A store that loses its backend keeps answering: reads miss, writes are dropped and every
    request is admitted, while ``healthy`` is False. It reconnects by itself.
    """

    kind: str

    @property
    def healthy(self) -> bool: ...

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl_s: float) -> None: ...

    async def admit(
        self, subject: str, requests_per_minute: int | None, tokens_per_minute: int | None
    ) -> RateDecision:
        """Count one request against the subject's limits, unless a limit refuses it."""
        ...

    async def charge_tokens(self, subject: str, tokens: int, tokens_per_minute: int | None) -> None:
        """Take a finished request's tokens from the subject's token budget."""
        ...

    async def ping(self) -> bool:
        """Check the backend now (no back-off); updates ``healthy``."""
        ...

    async def close(self) -> None: ...


def refill(level: float | None, stamp_ms: float, capacity: int, now_ms: float) -> float:
    """A bucket holding up to ``capacity`` that refills at ``capacity`` per minute.

    A bucket never seen before is full. Token buckets may be negative (a request that used more
    than was left); they refill from there.
    """
    if level is None:
        return float(capacity)
    return min(float(capacity), level + max(0.0, now_ms - stamp_ms) * capacity / MINUTE_MS)


def wait_ms(level: float, capacity: int) -> float:
    """Milliseconds until a bucket at ``level`` holds one unit again (what admission needs)."""
    return max(0.0, 1.0 - level) * MINUTE_MS / capacity
