"""The Store protocol, its errors, and the token-bucket arithmetic both stores share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from coe.errors import ConfigurationError, UnavailableError

MINUTE_MS = 60_000

# ok: the backend answers. unreachable: it does not (connection lost, timed out, a hang): an
# outage, which the store rides out and recovers from by itself. misconfigured: it answers but
# refuses coe (a wrong password, a missing permission, a failing script): no retry fixes that,
# only the operator.
StoreState = Literal["ok", "unreachable", "misconfigured"]


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    # When a refused client may try again; 0 when allowed.
    retry_after_s: float = 0.0
    # Which limit refused: "requests" or "tokens".
    limit: str | None = None


class StoreUnavailableError(UnavailableError):
    """The store's backend does not answer right now, so a rate limit could not be checked.
    ``retry_after_s``: when the store tries the backend again."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StoreMisconfiguredError(ConfigurationError):
    """The store's backend answers but refuses coe: a wrong or missing password, a permission
    coe needs, a script that fails. The message names the problem, never the password."""


class Store(Protocol):
    """Bytes by key with a TTL, plus atomic per-subject rate limits.

    A store whose backend is unreachable or misconfigured keeps answering reads and writes:
    reads miss and writes are dropped, while ``state`` says which and ``problem`` why. Only
    ``admit`` refuses to guess (see there). It tries the backend again by itself.
    """

    kind: str

    @property
    def healthy(self) -> bool:
        """``state == "ok"``."""
        ...

    @property
    def state(self) -> StoreState: ...

    @property
    def problem(self) -> str | None:
        """What is wrong while ``state`` is not "ok" (no secrets, no addresses)."""
        ...

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl_s: float) -> None: ...

    async def admit(
        self, subject: str, requests_per_minute: int | None, tokens_per_minute: int | None
    ) -> RateDecision:
        """Count one request against the subject's limits, unless a limit refuses it.

        Raises StoreMisconfiguredError while the store is misconfigured, limits or not (the
        request needs a store that works), and StoreUnavailableError when the subject has
        limits and the backend does not answer: whether to admit unchecked is the caller's
        policy (``gateway.limits.on_store_error``), not the store's.
        """
        ...

    async def charge_tokens(self, subject: str, tokens: int, tokens_per_minute: int | None) -> None:
        """Take a finished request's tokens from the subject's token budget."""
        ...

    async def ping(self) -> bool:
        """Check the backend now (no back-off); updates ``state``. True when it is "ok"."""
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
