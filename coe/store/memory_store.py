"""The in-process store: one gateway process, nothing shared, nothing to run."""

from __future__ import annotations

import time
from collections import OrderedDict

from coe.store.base import RateDecision, StoreState, refill, wait_ms

# Oldest entries go first beyond this many keys, so a long-running process stays bounded.
MAX_ENTRIES = 10_000


def _now_ms() -> float:
    return time.time() * 1000


def _level(
    buckets: dict[str, tuple[float, float, int]], subject: str, capacity: int, now: float
) -> float:
    if subject not in buckets:
        return float(capacity)
    level, stamp, _ = buckets[subject]
    return refill(level, stamp, capacity, now)


class MemoryStore:
    kind = "memory"

    def __init__(self, max_entries: int = MAX_ENTRIES):
        self.max_entries = max_entries
        self._data: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        # subject -> (level, stamp_ms, capacity), one dict per bucket kind.
        self._requests: dict[str, tuple[float, float, int]] = {}
        self._tokens: dict[str, tuple[float, float, int]] = {}

    @property
    def healthy(self) -> bool:
        return True

    @property
    def state(self) -> StoreState:
        return "ok"

    @property
    def problem(self) -> str | None:
        return None

    async def get(self, key: str) -> bytes | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires <= time.monotonic():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        self._data[key] = (value, time.monotonic() + ttl_s)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    async def admit(
        self, subject: str, requests_per_minute: int | None, tokens_per_minute: int | None
    ) -> RateDecision:
        # No await in here: the check and the debit are atomic with respect to other requests.
        now = _now_ms()
        requests = None
        if requests_per_minute:
            requests = _level(self._requests, subject, requests_per_minute, now)
            if requests < 1:
                wait = wait_ms(requests, requests_per_minute) / 1000
                return RateDecision(False, wait, "requests")
        if tokens_per_minute:
            tokens = _level(self._tokens, subject, tokens_per_minute, now)
            if tokens < 1:
                return RateDecision(False, wait_ms(tokens, tokens_per_minute) / 1000, "tokens")
        if requests_per_minute and requests is not None:
            self._requests[subject] = (requests - 1, now, requests_per_minute)
        if len(self._requests) + len(self._tokens) > self.max_entries:
            self._forget_full_buckets(now)
        return RateDecision(True)

    def _forget_full_buckets(self, now: float) -> None:
        """A bucket that has refilled is the same as no bucket: drop those (bounded memory)."""
        for buckets in (self._requests, self._tokens):
            for subject, (level, stamp, capacity) in list(buckets.items()):
                if refill(level, stamp, capacity, now) >= capacity:
                    del buckets[subject]

    async def charge_tokens(self, subject: str, tokens: int, tokens_per_minute: int | None) -> None:
        if not tokens_per_minute or tokens <= 0:
            return
        now = _now_ms()
        level = _level(self._tokens, subject, tokens_per_minute, now)
        self._tokens[subject] = (level - tokens, now, tokens_per_minute)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._data.clear()
