"""Deadlines and fallback experts through the real gateway, with the official openai client, on
fake engines that hang, stall or fail (tests/test_deadlines.py has the same engines): a missed
deadline is a 504 (503 for no slot in time) in OpenAI's error shape before the stream starts, a
final SSE error event then [DONE] after; never a hang. The real vLLM engine behind a deadline is
in tests/test_gateway_engine.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest

from coe.cache.pool import EnginePool
from coe.config import parse_config
from coe.gateway.server import GatewayServer, open_store_on_loop
from coe.orchestrator import Orchestrator
from coe.runtime import BackgroundLoop

from .test_deadlines import FakeEngine

FIRST_TOKEN_S = 0.3
TOTAL_S = 0.6
# Every request ends well within this (the deadlines plus a fallback's answer).
BOUND_S = 3.0


@dataclass
class Gateway:
    url: str
    engines: dict[str, FakeEngine]

    def client(self) -> openai.OpenAI:
        # No retries: the client would retry a 503/504 and hide what the gateway answered.
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)

    def modes(self, **modes: str) -> None:
        for name, engine in self.engines.items():
            engine.mode = modes.get(name, "ok")


@pytest.fixture(scope="module")
def gw() -> Iterator[Gateway]:
    data = {
        "experts": [
            {"name": n, "model": f"/nonexistent/{n}", "sampling": {"temperature": 0.0}}
            for n in ("primary", "backup")
        ],
        "categories": [{"name": "general", "expert": "primary", "fallbacks": ["backup"]}],
        "deadlines": {"first_token_s": FIRST_TOKEN_S, "total_s": TOTAL_S},
        # Greedy: every answer could be cached (a fallback's must not be).
    }
    config = parse_config(data, "experts.yaml")
    engines = {e.name: FakeEngine(e.name) for e in config.experts}
    runner = BackgroundLoop()
    pool = EnginePool(config, lambda _c, expert, _n: engines[expert.name])
    orch = Orchestrator(config, pool, store=runner.run(open_store_on_loop(None)))
    server = GatewayServer(orch, runner, host="127.0.0.1", port=0)
    server.start()
    try:
        yield Gateway(server.url, engines)
    finally:
        server.stop()
        runner.close()


HELLO = [{"role": "user", "content": "hello"}]


def test_a_hung_expert_is_a_504_first_token_deadline_not_a_hang(gw: Gateway) -> None:
    gw.modes(primary="hang")
    t0 = time.monotonic()
    with pytest.raises(openai.InternalServerError) as caught:
        gw.client().chat.completions.create(model="primary", messages=HELLO)
    assert FIRST_TOKEN_S <= time.monotonic() - t0 < BOUND_S
    error = caught.value
    assert error.status_code == 504 and error.code == "first_token_deadline_exceeded"
    assert error.type == "timeout_error"
    message = f"expert primary did not start its answer within {FIRST_TOKEN_S} s"
    assert isinstance(error.body, dict) and error.body["message"] == message
    assert gw.engines["primary"].cancelled >= 1


def test_a_stalled_answer_is_a_504_total_deadline(gw: Gateway) -> None:
    gw.modes(primary="stall")
    with pytest.raises(openai.InternalServerError) as caught:
        gw.client().chat.completions.create(model="primary", messages=HELLO)
    assert caught.value.status_code == 504 and caught.value.code == "total_deadline_exceeded"


def test_a_stream_that_stalls_ends_with_an_error_event_then_done(gw: Gateway) -> None:
    gw.modes(primary="stall")
    t0 = time.monotonic()
    stream = gw.client().chat.completions.create(model="primary", messages=HELLO, stream=True)
    text = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            text.extend(c.delta.content or "" for c in chunk.choices)
    assert TOTAL_S <= time.monotonic() - t0 < BOUND_S
    assert "".join(text) == "primary"
    assert caught.value.code == "total_deadline_exceeded"
    assert caught.value.message == f"expert primary did not finish its answer within {TOTAL_S} s"
    # On the wire: the error is the last event before [DONE].
    body = httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "primary", "messages": HELLO, "stream": True},
        timeout=BOUND_S,
    )
    assert body.status_code == 200
    events = [line for line in body.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert '"code":"total_deadline_exceeded"' in events[-2] and '"error"' in events[-2]


def test_a_stream_whose_expert_hangs_gets_a_504_before_it_starts(gw: Gateway) -> None:
    gw.modes(primary="hang")
    with pytest.raises(openai.InternalServerError) as caught:
        gw.client().chat.completions.create(model="primary", messages=HELLO, stream=True)
    assert caught.value.status_code == 504 and caught.value.code == "first_token_deadline_exceeded"


def test_no_slot_in_time_is_a_503_queue_deadline(gw: Gateway) -> None:
    gw.modes(primary="queue")
    with pytest.raises(openai.InternalServerError) as caught:
        gw.client().chat.completions.create(model="primary", messages=HELLO)
    assert caught.value.status_code == 503 and caught.value.code == "queue_deadline_exceeded"
    assert caught.value.type == "service_unavailable_error"


@pytest.mark.parametrize("mode", ["down", "hang", "queue"])
@pytest.mark.parametrize("stream", [False, True])
def test_the_category_fallback_answers_and_the_headers_say_so(
    gw: Gateway, mode: str, stream: bool
) -> None:
    gw.modes(primary=mode)
    # A question of its own: the answer to it is cached once the primary is back.
    messages = [{"role": "user", "content": f"hello {mode} {stream}"}]
    t0 = time.monotonic()
    raw = gw.client().chat.completions.with_raw_response.create(
        model="auto:general", messages=messages, stream=stream
    )
    assert raw.headers["x-coe-expert"] == "backup"
    assert raw.headers["x-coe-category"] == "general"
    # Not kept: once the expert is back, a repeat gets its answer, not the stand-in's.
    assert raw.headers["x-coe-cache"] == "bypass"
    if stream:
        chunks = list(raw.parse())
        text = "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices)
        assert {chunk.model for chunk in chunks} == {"backup"}
    else:
        completion = raw.parse()
        text = completion.choices[0].message.content or ""
        assert completion.model == "backup"
    assert text == "backup answers"
    assert time.monotonic() - t0 < BOUND_S
    gw.modes()
    back = gw.client().chat.completions.with_raw_response.create(
        model="auto:general", messages=messages, stream=stream
    )
    assert (back.headers["x-coe-expert"], back.headers["x-coe-cache"]) == ("primary", "miss")
