"""The remote engine's health probe against a small real HTTP server on loopback (fast); the real
`vllm serve` killed and restarted is in test_engine_remote.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from coe.engines.base import UP, EngineError, EngineHealth
from coe.engines.remote import RemoteEngine, RemoteOptions
from coe.types import Message, Prompt, SamplingParams, collect

from .conftest import free_port


class Scripted(ThreadingHTTPServer):
    """Answers each path with the status the test sets (404 for paths it did not set)."""

    def __init__(self, port: int):
        self.statuses: dict[str, int] = {}
        self.seen: list[tuple[str, str | None]] = []  # (path, authorization)
        super().__init__(("127.0.0.1", port), Handler)


class Handler(BaseHTTPRequestHandler):
    server: Scripted

    def _answer(self) -> None:
        self.server.seen.append((self.path, self.headers.get("authorization")))
        status = self.server.statuses.get(self.path, 404)
        body = b'{"error": {"message": "scripted"}}'
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Scripted]:
    httpd = Scripted(free_port())
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def engine_for(server: Scripted, **options: object) -> RemoteEngine:
    base = f"http://127.0.0.1:{server.server_address[1]}/v1"
    return RemoteEngine("far", RemoteOptions(base_url=base, model="m", **options))


async def test_up_by_health_down_when_its_engine_is_and_the_answer_is_cached(
    server: Scripted,
) -> None:
    engine = engine_for(server)
    assert not engine.ready  # nothing known before the first probe
    server.statuses["/health"] = 200
    assert await engine.health() == UP and engine.ready
    server.statuses["/health"] = 503  # vLLM: the API server is up, its engine is not
    assert await engine.health() == UP, "a probe within the TTL is answered from the cache"
    assert await engine.health(fresh=True) == EngineHealth("down", "its health check answered 503")
    assert not engine.ready
    assert [path for path, _ in server.seen] == ["/health", "/health"]


async def test_without_health_the_model_list_decides_with_the_key(
    server: Scripted, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COE_TEST_REMOTE_KEY", "sk-secret")
    engine = engine_for(server, api_key_env="COE_TEST_REMOTE_KEY")
    server.statuses["/v1/models"] = 200
    assert await engine.health() == UP
    assert server.seen[-1] == ("/v1/models", "Bearer sk-secret")
    server.statuses["/v1/models"] = 401
    health = await engine.health(fresh=True)
    assert health == EngineHealth("down", "the server refused the API key")
    monkeypatch.delenv("COE_TEST_REMOTE_KEY")
    health = await engine.health(fresh=True)
    assert health == EngineHealth("down", "environment variable COE_TEST_REMOTE_KEY is unset")


async def test_a_stopped_server_is_down_without_its_address_in_the_reason(
    server: Scripted,
) -> None:
    engine = engine_for(server)
    server.shutdown()
    server.server_close()
    health = await engine.health()
    assert health.state == "down" and health.reason.startswith("unreachable")
    assert "127.0.0.1" not in health.reason and "http" not in health.reason


async def test_a_failed_request_marks_it_down_until_a_probe_succeeds(server: Scripted) -> None:
    engine = engine_for(server)
    server.statuses["/health"] = 200
    await engine.start()
    assert engine.ready
    server.statuses["/v1/chat/completions"] = 500
    prompt = Prompt((Message("user", "hi"),), format="chat")
    with pytest.raises(EngineError):
        await collect(engine.stream(prompt, SamplingParams(max_tokens=4)))
    health = await engine.health()
    assert health.state == "down" and health.reason.startswith("a request failed")
    assert await engine.health(fresh=True) == UP
