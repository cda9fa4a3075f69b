"""Shared state of the gateway: response cache, rate limits, session stickiness.

``open_store(url)`` gives a Redis-backed store for ``redis://`` URLs (shared by every gateway
process) and an in-process one for ``None`` (a single process, the embedded default).
"""

from coe.store.base import (
    RateDecision,
    Store,
    StoreMisconfiguredError,
    StoreState,
    StoreUnavailableError,
)
from coe.store.memory_store import MemoryStore
from coe.store.redis_store import RedisStore


def open_store(url: str | None) -> Store:
    """Raises StoreMisconfiguredError for a URL the Redis client cannot use."""
    return RedisStore(url) if url else MemoryStore()


__all__ = [
    "MemoryStore",
    "RateDecision",
    "RedisStore",
    "Store",
    "StoreMisconfiguredError",
    "StoreState",
    "StoreUnavailableError",
    "open_store",
]
