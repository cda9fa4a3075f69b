"""Both stores behave alike: TTL'd bytes and atomic token-bucket rate limits. The Redis store
runs against a real redis-server, including an outage it must survive and recover from."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from coe.gateway.server import open_store_on_loop
from coe.redact import MASK, redact_text, redact_url
from coe.store import MemoryStore, RedisStore, Store

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
        # Down: reads miss, writes drop, requests are admitted past their limit, nothing raises.
        assert await store.get("k") is None
        assert not store.healthy
        await store.set("k2", b"v", 60)
        assert all([(await store.admit("erin", 1, None)).allowed for _ in range(3)])
        assert not await store.ping()
        redis_up.start()
        await asyncio.sleep(0.3)
        await store.set("k3", b"back", 60)
        assert store.healthy
        assert await store.get("k3") == b"back"
        assert await store.ping()
    finally:
        await store.close()


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
