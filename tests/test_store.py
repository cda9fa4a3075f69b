"""Both stores behave alike: TTL'd bytes and atomic token-bucket rate limits. The Redis store
runs against a real redis-server, including an outage it must survive and recover from, a hang
it must notice within its timeout, and misconfigurations it must not take for an outage."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest
from redis import exceptions as rx

from coe.gateway.server import open_store_on_loop
from coe.redact import MASK, redact_text, redact_url
from coe.store import (
    MemoryStore,
    RedisStore,
    Store,
    StoreMisconfiguredError,
    StoreUnavailableError,
)
from coe.store.redis_store import classify

from .conftest import RedisProcess, free_port


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    redis: RedisProcess = request.getfixturevalue("redis_up")
    made = RedisStore(redis.url)
    await made._client.flushdb()
    try:
        yield made
    finally:
        await made.close()


async def test_get_set_and_expiry(store: Store) -> None:
    assert await store.get("k") is None
    await store.set("k", b"value", ttl_s=0.2)
    assert await store.get("k") == b"value"
    await asyncio.sleep(0.3)
    assert await store.get("k") is None


async def test_request_limit_refuses_with_a_retry_time(store: Store) -> None:
    assert (await store.admit("alice", 2, None)).allowed
    assert (await store.admit("alice", 2, None)).allowed
    refused = await store.admit("alice", 2, None)
    assert not refused.allowed and refused.limit == "requests"
    # Two per minute refill one every 30 s.
    assert 25 < refused.retry_after_s <= 30
    assert (await store.admit("bob", 2, None)).allowed, "limits are per subject"


async def test_token_limit_counts_finished_requests(store: Store) -> None:
    assert (await store.admit("carol", None, 600)).allowed
    await store.charge_tokens("carol", 900, 600)  # more than the budget: the bucket goes negative
    refused = await store.admit("carol", None, 600)
    assert not refused.allowed and refused.limit == "tokens"
    # 301 tokens short at 10 tokens/s.
    assert 29 < refused.retry_after_s <= 31


async def test_requests_admitted_concurrently_never_exceed_the_limit(store: Store) -> None:
    results = await asyncio.gather(*(store.admit("dave", 5, None) for _ in range(20)))
    assert sum(r.allowed for r in results) == 5


async def test_redis_outage_degrades_and_recovers(redis_up: RedisProcess) -> None:
    store = RedisStore(redis_up.url, retry_s=0.2)
    try:
        await store.set("k", b"v", 60)
        assert await store.get("k") == b"v" and store.healthy
        redis_up.stop()
        # Down: reads miss and writes drop without raising; a limit cannot be checked, which
        # admit says (the gateway's on_store_error decides); a subject without limits passes.
        assert await store.get("k") is None
        assert not store.healthy and store.state == "unreachable"
        assert store.problem is not None and "ConnectionError" in store.problem
        await store.set("k2", b"v", 60)
        with pytest.raises(StoreUnavailableError) as caught:
            await store.admit("erin", 1, None)
        assert caught.value.retry_after_s == 0.2
        assert (await store.admit("erin", None, None)).allowed
        assert not await store.ping()
        redis_up.start()
        await asyncio.sleep(0.3)
        await store.set("k3", b"back", 60)
        assert store.healthy
        assert await store.get("k3") == b"back"
        assert await store.ping() and store.state == "ok" and store.problem is None
    finally:
        await store.close()


async def test_a_hung_redis_is_noticed_within_the_timeout(own_redis: RedisProcess) -> None:
    """SIGSTOP: connections are accepted and nothing answers. The client timeout must end
    each call (one timeout, not the client's retries), and the store recovers on SIGCONT."""
    store = RedisStore(own_redis.url, timeout_s=0.3, retry_s=0.5)
    try:
        assert (await store.admit("gus", 10, None)).allowed
        own_redis.pause()
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            await store.admit("gus", 10, None)
        assert time.monotonic() - t0 < 0.6
        assert store.state == "unreachable" and "Timeout" in (store.problem or "")
        # Within the retry interval nothing waits on Redis again: these answer at once.
        t0 = time.monotonic()
        assert await store.get("k") is None
        with pytest.raises(StoreUnavailableError):
            await store.admit("gus", 10, None)
        assert time.monotonic() - t0 < 0.05
        # Many requests at once after the interval: one of them tries Redis, not all.
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        await asyncio.gather(*(store.get(f"k{i}") for i in range(20)))
        assert time.monotonic() - t0 < 0.6
        own_redis.resume()
        assert await store.ping() and store.state == "ok"
        assert (await store.admit("gus", 10, None)).allowed
    finally:
        own_redis.resume()
        await store.close()


async def test_a_wrong_password_is_a_misconfiguration_not_an_outage(
    own_redis: RedisProcess,
) -> None:
    own_redis.stop()
    own_redis.start(password="right-password")
    wrong = RedisStore(own_redis.url_with("wrong-password"))
    missing = RedisStore(own_redis.url)
    right = RedisStore(own_redis.url_with("right-password"))
    try:
        assert not await wrong.ping() and wrong.state == "misconfigured"
        assert "user or password" in (wrong.problem or "")
        assert not await missing.ping() and missing.state == "misconfigured"
        assert "requires a password" in (missing.problem or "")
        # Reads miss and writes drop, but admission refuses: limits or not.
        assert await wrong.get("k") is None
        for limits in ((5, None), (None, None)):
            with pytest.raises(StoreMisconfiguredError) as caught:
                await wrong.admit("hal", *limits)
        message = str(caught.value)
        assert "misconfigured" in message and "redis://:***@127.0.0.1" in message
        assert "wrong-password" not in message
        assert await right.ping() and (await right.admit("hal", 5, None)).allowed
    finally:
        for store in (wrong, missing, right):
            await store.close()


async def test_a_missing_permission_and_a_failing_script_are_misconfigurations(
    redis_up: RedisProcess,
) -> None:
    admin = RedisStore(redis_up.url)
    await admin._client.execute_command(
        "ACL", "SETUSER", "noscripts", "on", ">pw", "~*", "+@all", "-evalsha", "-eval"
    )
    denied = RedisStore(f"redis://noscripts:pw@127.0.0.1:{redis_up.port}/0")
    try:
        # The user may GET and SET; admission needs EVALSHA, which it may not run.
        await denied.set("k", b"v", 60)
        assert denied.state == "ok"
        with pytest.raises(StoreMisconfiguredError):
            await denied.admit("ida", 5, None)
        assert denied.state == "misconfigured" and "denies a command" in (denied.problem or "")
        assert not await denied.ping()

        assert admin.state == "ok"
        assert await admin._call(lambda: admin._client.eval("return redis.call('NOPE')", 0), 0) == 0
        assert admin.state == "misconfigured" and "script failed" in (admin.problem or "")
        # Taken back once Redis does what coe needs again.
        assert await admin.ping() and admin.state == "ok"
    finally:
        await admin._client.execute_command("ACL", "DELUSER", "noscripts")
        await denied.close()
        await admin.close()


@pytest.mark.parametrize(
    ("error", "state"),
    [
        (rx.ConnectionError("Connection refused"), "unreachable"),
        (rx.TimeoutError("Timeout reading"), "unreachable"),
        (TimeoutError(), "unreachable"),
        (ConnectionResetError(), "unreachable"),
        (rx.ReadOnlyError("READONLY You can't write against a read only replica."), "unreachable"),
        (rx.BusyLoadingError("LOADING Redis is loading the dataset in memory"), "unreachable"),
        (rx.ResponseError("BUSY Redis is busy running a script."), "unreachable"),
        (rx.AuthenticationError("invalid username-password pair"), "misconfigured"),
        (rx.AuthenticationError("NOAUTH Authentication required."), "misconfigured"),
        (rx.NoPermissionError("NOPERM this user has no permissions"), "misconfigured"),
        (rx.ResponseError("ERR Error running script"), "misconfigured"),
        (rx.InvalidResponse("Protocol error"), "misconfigured"),
        (ValueError("a bug"), None),
    ],
)
def test_errors_are_told_apart_by_whose_move_it_is(error: Exception, state: str | None) -> None:
    assert classify(error) == state


def test_urls_are_shown_without_their_password() -> None:
    assert redact_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert redact_url("redis://app:s3cret@host/1") == "redis://app:***@host/1"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"


def test_an_unusable_url_is_a_misconfiguration() -> None:
    with pytest.raises(StoreMisconfiguredError) as caught:
        RedisStore("http://:s3cret@host:6379/0")
    assert "s3cret" not in str(caught.value)


async def test_redis_keeps_a_token_debt_until_it_is_repaid(redis_up: RedisProcess) -> None:
    store = RedisStore(redis_up.url)
    try:
        await store.charge_tokens("frank", 5000, 1000)  # 4000 in debt: 5 minutes to refill
        ttl_ms = await store._client.pttl("coe:v1:rate:{key:frank}:tokens".replace("key:", ""))
        assert 4.5 * 60_000 < ttl_ms <= 5 * 60_000 + 1000
    finally:
        await store.close()


async def test_memory_store_forgets_refilled_buckets_beyond_its_size() -> None:
    store = MemoryStore(max_entries=10)
    for i in range(50):
        assert (await store.admit(f"peer-{i}", 6000, None)).allowed
        await asyncio.sleep(0.011)  # 6000/min refills one request in 10 ms
    assert len(store._requests) <= 11


# -- no password in what the store logs ---------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw-1@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://user:pw-1@host:6379/0", "redis://user:***@host:6379/0"),
        ("rediss://user:p@ss:w0rd@host/1", "rediss://user:***@host/1"),
        ("redis://host:6379/0?password=pw-1&db=2", "redis://host:6379/0?password=***&db=2"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://user@host/0", "redis://user@host/0"),
        ("http://vllm-coder:8000/v1", "http://vllm-coder:8000/v1"),
    ],
)
def test_redact_url_masks_the_password_and_keeps_where(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_text_masks_urls_bearer_tokens_and_named_secrets() -> None:
    text = (
        "Redis at redis://app:pw-1@10.0.0.5:6379/0 failed; sent Authorization: Bearer coe-abc; "
        "server said: bad key sk-live-123 for http://vllm:8000/v1"
    )
    out = redact_text(text, secrets=["sk-live-123", None, ""])
    for secret in ("pw-1", "coe-abc", "sk-live-123"):
        assert secret not in out
    assert "redis://app:***@10.0.0.5:6379/0" in out and f"Bearer {MASK}" in out
    assert "http://vllm:8000/v1" in out  # a URL without a password is left as it was


async def test_store_warnings_name_the_server_without_its_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()  # nothing listens there: the store's outage path logs
    url = f"redis://coe:Sup3r-Secret-pw@127.0.0.1:{port}/0"
    caplog.set_level(logging.WARNING)
    store = await open_store_on_loop(url)
    try:
        assert await store.get("k") is None and not store.healthy
    finally:
        await store.close()
    logged = caplog.text
    assert f"127.0.0.1:{port}" in logged and "coe:***@" in logged
    assert "Sup3r-Secret-pw" not in logged
    assert len(caplog.records) >= 2  # "not answering" at start, "failed" on the first call
