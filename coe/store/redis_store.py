"""The Redis store (redis.asyncio): shared by every gateway process on the same Redis.

Rate limits are token buckets kept in Redis hashes and updated by Lua scripts, so the check and
the debit are one atomic step even with many gateway processes.

Failures are told apart by whose move it is (``classify``). Redis unreachable (connection lost,
refused, timed out, a hung server that the client timeout catches): an outage; the store
degrades (reads miss, writes drop) and tries Redis again every ``retry_s``, so it recovers by
itself. Redis answering but refusing coe (a wrong or missing password, a permission, a failing
script): a misconfiguration; the store says so (``state``, ``problem``) and ``admit`` raises,
so the gateway answers 503 instead of passing it off as an outage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as rx
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from coe.redact import redact_text, redact_url
from coe.store.base import (
    MINUTE_MS,
    RateDecision,
    StoreMisconfiguredError,
    StoreState,
    StoreUnavailableError,
)

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

# Replies that mean "not now" rather than "not you": a replica made read-only by a failover, a
# server out of memory, loading its data or busy with a script, a cluster between masters.
_TRANSIENT_REPLIES = (
    rx.ReadOnlyError,
    rx.OutOfMemoryError,
    rx.BusyLoadingError,
    rx.TryAgainError,
    rx.ClusterDownError,
)
_TRANSIENT_PREFIXES = ("BUSY", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")


def classify(exc: BaseException) -> StoreState | None:
    """Which state a failed Redis call puts the store in; None: not a Redis failure (a bug)."""
    # Before ConnectionError: redis-py files a refused password under ConnectionError.
    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError | rx.NoPermissionError):
        return "misconfigured"
    if isinstance(exc, rx.AuthenticationWrongNumberOfArgsError):
        return "misconfigured"
    if isinstance(exc, _TRANSIENT_REPLIES):
        return "unreachable"
    if isinstance(exc, rx.ResponseError):
        transient = str(exc).startswith(_TRANSIENT_PREFIXES)
        return "unreachable" if transient else "misconfigured"
    if isinstance(exc, rx.ConnectionError | rx.TimeoutError | OSError):
        # OSError covers the builtin TimeoutError (asyncio's too) and refused connections.
        return "unreachable"
    if isinstance(exc, rx.RedisError):
        # An unparseable reply (not a Redis server at that address) or bad client data.
        return "misconfigured"
    return None


def _misconfiguration(exc: BaseException) -> str:
    """What the operator should fix, from the error Redis answered (it never echoes secrets)."""
    said = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, rx.NoPermissionError):
        return f"Redis denies a command coe needs to its user ({said})"
    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError):
        # NOAUTH to a command, or (RESP3, redis-py's default) to the HELLO that opens a connection.
        if any(m in str(exc) for m in ("NOAUTH", "Authentication required", "authenticated")):
            return f"Redis requires a password and the store URL gives none ({said})"
        return f"Redis refused the store URL's user or password ({said})"
    if isinstance(exc, rx.ResponseError) and "script" in str(exc).lower():
        return f"a rate-limit script failed in Redis ({said})"
    return f"Redis answered with an error ({said})"


class RedisStore:
    kind = "redis"

    def __init__(self, url: str, *, timeout_s: float = 0.5, retry_s: float = 1.0):
        self.url = url
        self.display_url = redact_url(url)
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        try:
            self._client = aioredis.from_url(
                url,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                # No retries inside the client: a hung Redis must cost one timeout, not four;
                # the store does its own retrying, every retry_s.
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as exc:
            raise StoreMisconfiguredError(f"store URL {self.display_url}: {exc}") from None
        self._admit = self._client.register_script(ADMIT)
        self._charge = self._client.register_script(CHARGE)
        self._state: StoreState = "ok"
        self._problem: str | None = None
        self._since = 0.0
        self._next_try = 0.0

    @property
    def healthy(self) -> bool:
        return self._state == "ok"

    @property
    def state(self) -> StoreState:
        return self._state

    @property
    def problem(self) -> str | None:
        return self._problem

    def error(self) -> StoreMisconfiguredError | StoreUnavailableError:
        """The error for the store's present trouble (call it when ``state`` is not "ok")."""
        if self._state == "misconfigured":
            return StoreMisconfiguredError(
                f"the store at {self.display_url} is misconfigured: {self._problem}; fix "
                "store.url in experts.yaml or --redis-url ($COE_REDIS_URL), or Redis"
            )
        return StoreUnavailableError(
            f"the store at {self.display_url} is unreachable: {self._problem}", self.retry_s
        )

    async def _call(self, op: Callable[[], Awaitable[T]], default: T, *, force: bool = False) -> T:
        if self._state != "ok" and not force:
            now = time.monotonic()
            if now < self._next_try:
                return default
            # This call tries Redis again; the ones meanwhile keep the default, so a hung Redis
            # costs one timeout per retry interval, not one per request.
            self._next_try = now + self.retry_s
        try:
            result = await op()
        except Exception as exc:
            state = classify(exc)
            if state is None:
                raise
            self._fail(state, exc)
            return default
        self._recover()
        return result

    def _fail(self, state: StoreState, exc: BaseException) -> None:
        problem = redact_text(
            _misconfiguration(exc)
            if state == "misconfigured"
            else f"{type(exc).__name__}: {exc or 'no answer within the timeout'}"
        )
        if state != self._state:
            self._since = time.monotonic()
            if state == "misconfigured":
                log.error(
                    "Redis at %s is misconfigured: %s. Requests that need the store get 503 "
                    "until it is fixed",
                    self.display_url,
                    problem,
                )
            else:
                log.warning(
                    "Redis at %s is unreachable (%s): serving without response cache and "
                    "sessions, rate limits per gateway.limits.on_store_error, until it answers",
                    self.display_url,
                    problem,
                )
        self._state, self._problem = state, problem
        self._next_try = time.monotonic() + self.retry_s

    def _recover(self) -> None:
        if self._state != "ok":
            log.warning(
                "Redis at %s answers again (%s for %.1f s)",
                self.display_url,
                self._state,
                time.monotonic() - self._since,
            )
            self._state, self._problem = "ok", None

    async def get(self, key: str) -> bytes | None:
        return await self._call(lambda: self._client.get(PREFIX + key), None)

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        ttl_ms = max(1, int(ttl_s * 1000))
        await self._call(lambda: self._client.set(PREFIX + key, value, px=ttl_ms), None)

    async def admit(
        self, subject: str, requests_per_minute: int | None, tokens_per_minute: int | None
    ) -> RateDecision:
        if not requests_per_minute and not tokens_per_minute:
            if self._state == "misconfigured":
                await self._call(self._probe, None)  # taken back once it is fixed
                if self._state == "misconfigured":
                    raise self.error()
            return RateDecision(True)
        keys = [f"{PREFIX}rate:{{{subject}}}:requests", f"{PREFIX}rate:{{{subject}}}:tokens"]
        args = [_now_ms(), requests_per_minute or 0, tokens_per_minute or 0, BUCKET_TTL_MS]
        reply: Any = await self._call(lambda: self._admit(keys=keys, args=args), None)
        if reply is None:
            raise self.error()
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

    async def _probe(self) -> bool:
        """What a request needs: the connection, the password, and the admission script (run
        with no limits, it reads and writes nothing)."""
        keys = [f"{PREFIX}rate:{{probe}}:requests", f"{PREFIX}rate:{{probe}}:tokens"]
        await self._admit(keys=keys, args=[_now_ms(), 0, 0, BUCKET_TTL_MS])
        return True

    async def ping(self) -> bool:
        return await self._call(self._probe, False, force=True)

    async def close(self) -> None:
        await self._client.aclose()


def _now_ms() -> int:
    return int(time.time() * 1000)
