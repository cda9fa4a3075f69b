"""The Redis store (redis.asyncio): shared by every gateway process on the same Redis.

Rate limits are token buckets kept in Redis hashes and updated by Lua scripts, so the check and
the debit are one atomic step even with many gateway processes. When Redis cannot be reached the
store degrades instead of failing requests: reads miss, writes are dropped, every request is
admitted, and ``healthy`` is False. It tries Redis again after ``retry_s``, so it recovers by
itself once Redis is back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from coe.redact import redact_text, redact_url
from coe.store.base import MINUTE_MS, RateDecision

log = logging.getLogger(__name__)
T = TypeVar("T")

# Keys live under one prefix, versioned with the format of what coe writes, so gateways of
# different versions on one Redis never read each other's entries. A rate-limit subject's two
# buckets share a hash tag ({subject}) so they land on the same node of a Redis cluster.
PREFIX = "coe:v1:"
BUCKET_TTL_MS = 2 * MINUTE_MS

# Shared by both scripts: a bucket refilled up to now (a missing bucket is full).
_REFILL = """
local function refill(key, capacity, now)
  local v = redis.call('HMGET', key, 'level', 'stamp')
  local level = tonumber(v[1])
  if level == nil then return capacity end
  local elapsed = math.max(0, now - tonumber(v[2]))
  return math.min(capacity, level + elapsed * capacity / 60000)
end
"""

# KEYS: request bucket, token bucket. ARGV: now_ms, requests/min (0: none), tokens/min (0: none).
# Returns {1, "0", ""} when admitted, else {0, wait_ms, "requests" | "tokens"}.
ADMIT = (
    _REFILL
    + """
local now, rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local requests
if rpm > 0 then
  requests = refill(KEYS[1], rpm, now)
  if requests < 1 then return {0, tostring((1 - requests) * 60000 / rpm), 'requests'} end
end
if tpm > 0 then
  local tokens = refill(KEYS[2], tpm, now)
  if tokens < 1 then return {0, tostring((1 - tokens) * 60000 / tpm), 'tokens'} end
end
if rpm > 0 then
  redis.call('HSET', KEYS[1], 'level', tostring(requests - 1), 'stamp', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return {1, '0', ''}
"""
)

# KEYS: token bucket. ARGV: now_ms, tokens/min, tokens used.
CHARGE = (
    _REFILL
    + """
local now, tpm, used = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens = refill(KEYS[1], tpm, now) - used
redis.call('HSET', KEYS[1], 'level', tostring(tokens), 'stamp', ARGV[1])
-- Keep the bucket until it would be full again: expiring it earlier would forgive a debt.
local refilled_ms = math.ceil((tpm - tokens) * 60000 / tpm)
redis.call('PEXPIRE', KEYS[1], math.max(tonumber(ARGV[4]), refilled_ms))
return 1
"""
)

# Any Redis failure degrades the store rather than failing requests: unreachable, timed out, but
# also a replica that became read-only after a failover or a server out of memory. Each outage
# is logged and shown by /health and the coe_store_healthy metric.
_UNREACHABLE = (RedisError, OSError)


class RedisStore:
    kind = "redis"

    def __init__(self, url: str, *, timeout_s: float = 0.5, retry_s: float = 1.0):
        self.url = url
        # What logs and messages show: the URL without its password.
        self.where = redact_url(url)
        self.retry_s = retry_s
        self._client = aioredis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._admit = self._client.register_script(ADMIT)
        self._charge = self._client.register_script(CHARGE)
        self._down_since: float | None = None
        self._next_try = 0.0

    @property
    def healthy(self) -> bool:
        return self._down_since is None

    async def _call(self, op: Callable[[], Awaitable[T]], default: T, *, force: bool = False) -> T:
        if self._down_since is not None and not force and time.monotonic() < self._next_try:
            return default
        try:
            result = await op()
        except _UNREACHABLE as exc:
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning(
                    "Redis at %s failed (%s: %s): serving without response cache, rate limits "
                    "and sessions until it answers again",
                    self.where,
                    type(exc).__name__,
                    redact_text(str(exc)),
                )
            self._next_try = time.monotonic() + self.retry_s
            return default
        if self._down_since is not None:
            log.warning(
                "Redis at %s is back after %.1f s", self.where, time.monotonic() - self._down_since
            )
            self._down_since = None
        return result

    async def get(self, key: str) -> bytes | None:
        return await self._call(lambda: self._client.get(PREFIX + key), None)

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        ttl_ms = max(1, int(ttl_s * 1000))
        await self._call(lambda: self._client.set(PREFIX + key, value, px=ttl_ms), None)

    async def admit(
        self, subject: str, requests_per_minute: int | None, tokens_per_minute: int | None
    ) -> RateDecision:
        if not requests_per_minute and not tokens_per_minute:
            return RateDecision(True)
        keys = [f"{PREFIX}rate:{{{subject}}}:requests", f"{PREFIX}rate:{{{subject}}}:tokens"]
        args = [_now_ms(), requests_per_minute or 0, tokens_per_minute or 0, BUCKET_TTL_MS]
        reply: Any = await self._call(lambda: self._admit(keys=keys, args=args), None)
        if reply is None:  # Redis is down: admit
            return RateDecision(True)
        allowed, wait, limit = int(reply[0]), float(reply[1]), reply[2].decode()
        if allowed:
            return RateDecision(True)
        return RateDecision(False, wait / 1000, limit)

    async def charge_tokens(self, subject: str, tokens: int, tokens_per_minute: int | None) -> None:
        if not tokens_per_minute or tokens <= 0:
            return
        keys = [f"{PREFIX}rate:{{{subject}}}:tokens"]
        args = [_now_ms(), tokens_per_minute, tokens, BUCKET_TTL_MS]
        await self._call(lambda: self._charge(keys=keys, args=args), None)

    async def ping(self) -> bool:
        return bool(await self._call(self._client.ping, False, force=True))

    async def close(self) -> None:
        await self._client.aclose()


def _now_ms() -> int:
    return int(time.time() * 1000)
