"""The gateway over HTTP with the real openai client, on engines that echo (fast, exact), and the
in-process or a real Redis store. The real vLLM engine behind the gateway is test_gateway_engine.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from coe.cache.pool import EnginePool
from coe.config import ConfigError, PoolConfig, parse_config
from coe.engines.base import EngineError, EngineHealth
from coe.engines.vllm_local import PromptTooLongError
from coe.gateway.auth import hash_key
from coe.gateway.errors import from_exception
from coe.gateway.server import GatewayServer, open_store_on_loop
from coe.orchestrator import Orchestrator
from coe.orchestrator.sessions import Sessions
from coe.prompts.mixture import MixtureError
from coe.runtime import BackgroundLoop
from coe.store import MemoryStore, StoreMisconfiguredError
from coe.types import (
    Chunk,
    Message,
    Prompt,
    RouteDecision,
    SamplingParams,
    ToolCallDelta,
    ToolSpec,
    Usage,
)

from .conftest import RedisProcess

KEY = "coe-test-key"
LIMITED_KEY = "coe-limited-key"
OTHER_KEY = "coe-other-key"


class EchoEngine:
    """Answers "<system prompt>: <last user message>" word by word (each test expert's system
    prompt is its name); "boom" fails before any output, "midway" after the first word, "slow"
    takes a minute (and counts its cancellation). With tools (a call forced: required or a named
    function) it calls the named function, or each function, with ``{"echo": <last user
    message>}`` in two pieces, after the text "<name>: calling" when that message starts with
    "say"; a conversation that ends with a tool result is answered "<name>: got <result> from
    <the function of the call it answers>"."""

    def __init__(self, name: str):
        self.name = name
        self.ready = True
        self.seeds: list[int | None] = []
        self.cancelled = 0

    async def start(self) -> None:
        self.ready = True

    async def shutdown(self) -> None:
        self.ready = False

    async def stream(
        self, prompt: Prompt, sampling: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[Chunk]:
        last = [m.content for m in prompt.messages if m.role == "user"][-1]
        self.seeds.append(sampling.seed)
        if last == "slow":
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if last == "boom":
            raise EngineError(f"engine {self.name} is down")
        speaker = next((m.content for m in prompt.messages if m.role == "system"), self.name)
        if prompt.tools is not None and prompt.tools.choice in ("required", "function"):
            async for chunk in self._call(prompt.tools, speaker, last):
                yield chunk
            return
        if prompt.messages[-1].role == "tool":
            result = prompt.messages[-1]
            made = [c for m in prompt.messages for c in m.tool_calls]
            name = next((c.name for c in made if c.id == result.tool_call_id), "nothing")
            last = f"got {result.content} from {name}"
        words = f"{speaker}: {last}".split(" ")
        out: list[str] = []
        for i, word in enumerate(words[: sampling.max_tokens]):
            if last == "midway" and i == 1:
                raise EngineError(f"engine {self.name} died mid-answer", retryable=True)
            piece = word if i == 0 else " " + word
            text = "".join(out) + piece
            stop = next((s for s in sampling.stop if s in text), None)
            if stop is not None:
                yield Chunk(text=piece[: piece.find(stop)] if stop in piece else "")
                yield Chunk("", "stop", Usage(len(last.split()), i + 1))
                return
            out.append(piece)
            await asyncio.sleep(0)
            yield Chunk(text=piece)
        finish = "length" if len(words) > sampling.max_tokens else "stop"
        yield Chunk("", finish, Usage(len(last.split()), min(len(words), sampling.max_tokens)))

    @staticmethod
    async def _call(tools: ToolSpec, speaker: str, last: str) -> AsyncIterator[Chunk]:
        if last.startswith("say"):
            yield Chunk(text=f"{speaker}:")
            yield Chunk(text=" calling")
        names = [tools.function] if tools.choice == "function" else [t.name for t in tools.tools]
        arguments = json.dumps({"echo": last})
        half = len(arguments) // 2
        for i, name in enumerate(names):
            yield Chunk(
                "", tool_calls=[ToolCallDelta(i, f"call_{i}_{name}", name, arguments[:half])]
            )
            yield Chunk("", tool_calls=[ToolCallDelta(i, arguments=arguments[half:])])
        yield Chunk("", "tool_calls", Usage(len(last.split()), 2 * len(names)))


class KeywordRouter:
    """Routes to coding when the conversation's first user turn mentions code, else writing."""

    def route(self, messages: Sequence[Message]) -> RouteDecision:
        first = next(m.content for m in messages if m.role == "user")
        category = "coding" if "code" in first else "writing"
        return RouteDecision(
            expert="coder" if category == "coding" else "writer",
            category=category,
            confidence=0.9,
            fell_back=False,
            reason=f"keyword: {category}",
        )


class TopicRouter(KeywordRouter):
    """Tells follow-ups (a latest turn starting with "now") from new tasks, as the fitted router
    does: a follow-up is routed with the first turn, a new task on its own."""

    tells_followups = True

    def route(self, messages: Sequence[Message]) -> RouteDecision:
        users = [m for m in messages if m.role == "user"]
        continues = len(users) > 1 and users[-1].content.startswith("now")
        task = users[0] if continues or len(users) == 1 else users[-1]
        decision = super().route([task])
        return RouteDecision(**{**decision.__dict__, "continues": continues})


def gateway_pool(**gateway: object) -> PoolConfig:
    base = {"model": "/nonexistent", "sampling": {"temperature": 0.0, "max_tokens": 64}}
    data = {
        "experts": [
            {
                "name": "coder",
                "system_prompt": "coder",
                **base,
                "sampling": {"temperature": 0.0, "max_tokens": 64, "seed": 11},
            },
            {
                "name": "writer",
                "system_prompt": "writer",
                **base,
                "sampling": {"temperature": 0.8, "max_tokens": 64},
            },
        ],
        "categories": [
            {"name": "coding", "expert": "coder"},
            {"name": "writing", "expert": "writer"},
            {"name": "general", "expert": "writer"},
        ],
        "gateway": {
            "api_keys": [
                {"name": "tester", "sha256": hash_key(KEY)},
                {"name": "other", "sha256": hash_key(OTHER_KEY)},
                {
                    "name": "limited",
                    "sha256": hash_key(LIMITED_KEY),
                    "limits": {"requests_per_minute": 2},
                },
            ],
            "max_body_bytes": 4096,
            **gateway,
        },
    }
    return parse_config(data, "experts.yaml")


@dataclass
class Running:
    server: GatewayServer
    orch: Orchestrator

    @property
    def base(self) -> str:
        return self.server.url

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0)

    def post(
        self, path: str, body: object, key: str | None = KEY, **headers: str
    ) -> httpx.Response:
        auth = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.post(self.base + path, json=body, headers={**auth, **headers}, timeout=10)


def start_gateway(
    config: PoolConfig, redis_url: str | None = None, router: KeywordRouter | None = None
) -> tuple[Running, BackgroundLoop]:
    runner = BackgroundLoop()
    engines = EnginePool(config, factory=lambda cfg, expert, name: EchoEngine(name))
    store = runner.run(open_store_on_loop(redis_url))
    orch = Orchestrator(config, engines, router=router or KeywordRouter(), store=store)
    server = GatewayServer(orch, runner, host="127.0.0.1", port=0)
    server.start()
    return Running(server, orch), runner


@pytest.fixture(scope="module")
def gw() -> Iterator[Running]:
    running, runner = start_gateway(gateway_pool())
    try:
        yield running
    finally:
        running.server.stop()
        runner.close()


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# -- the openai client, sync and async, streaming and not -------------------------------------


def test_openai_client_non_streaming(gw: Running) -> None:
    raw = gw.client().chat.completions.with_raw_response.create(
        model="auto", messages=ask("write code please"), max_tokens=10
    )
    reply = raw.parse()
    assert reply.model == "coder"
    assert reply.choices[0].message.content == "coder: write code please"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    assert raw.headers["x-coe-expert"] == "coder"
    assert raw.headers["x-coe-category"] == "coding"
    assert raw.headers["x-coe-confidence"] == "0.9000"


def test_openai_client_streaming_with_usage(gw: Running) -> None:
    stream = gw.client().chat.completions.create(
        model="writer",
        messages=ask("a poem about rain"),
        stream=True,
        stream_options={"include_usage": True},
        temperature=0.5,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "writer: a poem about rain"
    assert {c.model for c in chunks} == {"writer"}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and finishes.count("stop") == 1


async def test_openai_async_client_streaming_and_not(gw: Running) -> None:
    client = openai.AsyncOpenAI(base_url=gw.base + "/v1", api_key=KEY, max_retries=0)
    reply = await client.chat.completions.create(model="auto:writing", messages=ask("hello"))
    assert reply.model == "writer" and reply.choices[0].message.content == "writer: hello"
    stream = await client.chat.completions.create(model="coder", messages=ask("hi"), stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "coder: hi"
    await client.close()


def test_sampling_parameters_reach_the_engine(gw: Running) -> None:
    client = gw.client()
    short = client.chat.completions.create(
        model="coder", messages=ask("one two three four"), max_completion_tokens=2
    )
    assert short.choices[0].message.content == "coder: one"
    assert short.choices[0].finish_reason == "length"
    stopped = client.chat.completions.create(
        model="coder", messages=ask("one two three four"), stop=["three"]
    )
    assert stopped.choices[0].message.content == "coder: one two "
    two = client.chat.completions.create(model="writer", messages=ask("same"), n=2, seed=7)
    assert [c.index for c in two.choices] == [0, 1]
    assert all(c.message.content == "writer: same" for c in two.choices)


def test_n_choices_stream_interleaved_by_index(gw: Running) -> None:
    stream = gw.client().chat.completions.create(
        model="coder", messages=ask("a b c"), n=3, stream=True
    )
    texts = ["", "", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == ["coder: a b c"] * 3


def test_models_lists_auto_experts_and_categories(gw: Running) -> None:
    ids = [m.id for m in gw.client().models.list().data]
    assert ids == ["auto", "coder", "writer", "auto:coding", "auto:writing", "auto:general"]
    assert gw.client().models.retrieve("coder").id == "coder"


def test_route_endpoint_decides_without_generating(gw: Running) -> None:
    r = gw.post("/v1/route", {"messages": ask("some code")})
    assert r.status_code == 200
    assert r.json()["expert"] == "coder" and r.json()["category"] == "coding"


# -- errors in the OpenAI shape ----------------------------------------------------------------


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def test_unknown_model_is_404_model_not_found(gw: Running) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        gw.client().chat.completions.create(model="gpt-9", messages=ask("hi"))
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    error = assert_error(
        gw.post("/v1/chat/completions", {"model": "auto:nope", "messages": ask("x")}), 404
    )
    assert error["param"] == "model"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "auto", "messages": ask("x"), "temperature": 3}, "temperature"),
        ({"model": "auto", "messages": ask("x"), "max_tokenz": 3}, "max_tokenz"),
        ({"model": "auto", "messages": []}, "messages"),
        ({"messages": ask("x")}, "model"),
        ({"model": "auto", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": "auto", "messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),
        ({"model": "auto", "messages": [{"role": "system", "content": "only"}]}, None),
        ({"model": "auto", "messages": ask("x"), "stop": ["a", ""]}, None),
    ],
)
def test_invalid_requests_are_400_not_422(gw: Running, body: dict, param: str | None) -> None:
    error = assert_error(gw.post("/v1/chat/completions", body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_malformed_json_is_400(gw: Running) -> None:
    r = httpx.post(
        gw.base + "/v1/chat/completions",
        content=b"{not json",
        headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )
    assert_error(r, 400)


def test_missing_or_wrong_key_is_401(gw: Running) -> None:
    assert_error(
        gw.post("/v1/chat/completions", {"model": "auto", "messages": ask("x")}, key=None),
        401,
        "invalid_api_key",
    )
    with pytest.raises(openai.AuthenticationError):
        gw.client(key="wrong").models.list()


def test_body_over_the_limit_is_413(gw: Running) -> None:
    big = {"model": "auto", "messages": ask("x" * 5000)}
    assert_error(gw.post("/v1/chat/completions", big), 413, "request_too_large")

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield json.dumps(big).encode()

    r = httpx.post(
        gw.base + "/v1/chat/completions",
        content=chunked(),
        headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )
    assert_error(r, 413)


def test_rate_limit_is_429_with_retry_after(gw: Running) -> None:
    body = {"model": "coder", "messages": ask("x")}
    assert gw.post("/v1/chat/completions", body, key=LIMITED_KEY).status_code == 200
    assert gw.post("/v1/chat/completions", body, key=LIMITED_KEY).status_code == 200
    r = gw.post("/v1/chat/completions", body, key=LIMITED_KEY)
    error = assert_error(r, 429, "rate_limit_exceeded")
    assert error["type"] == "rate_limit_error"
    assert 1 <= int(r.headers["retry-after"]) <= 30
    with pytest.raises(openai.RateLimitError):
        gw.client(LIMITED_KEY).chat.completions.create(model="coder", messages=ask("x"))


def test_engine_failure_is_503_before_streaming(gw: Running) -> None:
    assert_error(gw.post("/v1/chat/completions", {"model": "coder", "messages": ask("boom")}), 503)
    streamed = gw.post(
        "/v1/chat/completions", {"model": "coder", "messages": ask("boom"), "stream": True}
    )
    assert_error(streamed, 503, "expert_unavailable")


def test_error_after_streaming_started_is_the_last_event(gw: Running) -> None:
    r = gw.post(
        "/v1/chat/completions", {"model": "coder", "messages": ask("midway"), "stream": True}
    )
    assert r.status_code == 200
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["message"] == "expert coder is restarting; retry the request shortly"
    assert error["code"] == "expert_unavailable"
    with pytest.raises(openai.APIError):
        list(
            gw.client().chat.completions.create(model="coder", messages=ask("midway"), stream=True)
        )


def test_unknown_path_and_method_in_the_error_shape(gw: Running) -> None:
    assert_error(httpx.get(gw.base + "/v1/nothing"), 404)
    assert_error(httpx.get(gw.base + "/v1/chat/completions"), 405)


# -- response cache and sessions ----------------------------------------------------------------


def test_deterministic_requests_are_cached(gw: Running) -> None:
    body = {"model": "coder", "messages": ask("cache me"), "temperature": 0}
    first = gw.post("/v1/chat/completions", body)
    second = gw.post("/v1/chat/completions", body)
    assert first.headers["x-coe-cache"] == "miss" and second.headers["x-coe-cache"] == "hit"
    assert first.json()["choices"] == second.json()["choices"]
    assert first.json()["id"] != second.json()["id"]
    streamed = gw.post("/v1/chat/completions", {**body, "stream": True})
    assert streamed.headers["x-coe-cache"] == "hit"
    assert "cache me" in streamed.text and streamed.text.rstrip().endswith("data: [DONE]")
    skipped = gw.post("/v1/chat/completions", body, **{"x-coe-cache-control": "no-cache"})
    assert skipped.headers["x-coe-cache"] == "bypass"


def test_a_session_follows_a_new_task_and_keeps_a_follow_up() -> None:
    running, runner = start_gateway(gateway_pool(), router=TopicRouter())
    try:
        client = running.client()
        history = ask("write code for a parser")
        first = client.chat.completions.create(model="auto", messages=history, temperature=0.5)
        assert first.model == "coder"
        history.append({"role": "assistant", "content": first.choices[0].message.content})
        follow = [*history, {"role": "user", "content": "now a poem about it"}]
        kept = client.chat.completions.with_raw_response.create(
            model="auto", messages=follow, temperature=0.5
        )
        # The session's decision (no confidence: nothing was classified) is kept.
        assert kept.parse().model == "coder" and "x-coe-confidence" not in kept.headers
        switched = [*history, {"role": "user", "content": "different question: a poem"}]
        new = client.chat.completions.with_raw_response.create(
            model="auto", messages=switched, temperature=0.5
        )
        assert new.parse().model == "writer" and new.headers["x-coe-confidence"] == "0.9000"
    finally:
        running.server.stop()
        runner.close()


def test_sessions_belong_to_the_key_that_made_them(gw: Running) -> None:
    """Key A pins session S (and a conversation) to the coder; key B sending the same session
    id, or A's whole conversation, is routed on its own and pins nothing of A's."""
    s = {"x-coe-session": "shared-session-id"}
    chat = "/v1/chat/completions"
    a = gw.post(chat, {"model": "auto", "messages": ask("code it"), "temperature": 0.5}, **s)
    assert a.json()["model"] == "coder"
    poem = {"model": "auto", "messages": ask("a poem"), "temperature": 0.5}
    assert gw.post(chat, poem, **s).json()["model"] == "coder", "A's session holds for A"
    # B, same session id: routed afresh (a poem goes to the writer), not to A's coder.
    b = gw.post(chat, poem, key=OTHER_KEY, **s)
    assert b.status_code == 200 and b.json()["model"] == "writer"
    # B's turn pinned B's session to the writer; A's stays with the coder.
    assert gw.post(chat, poem, **s).json()["model"] == "coder"
    assert gw.post(chat, poem, key=OTHER_KEY, **s).json()["model"] == "writer"
    # A conversation found by its history is A's too. A asks the coder for a poem by name;
    # A's next turn (model auto) stays with the coder, though routed it would go to the writer.
    first = ask("a poem about rivers")
    answer = gw.client().chat.completions.create(model="coder", messages=first, temperature=0.5)
    history = [
        *first,
        {"role": "assistant", "content": answer.choices[0].message.content},
        {"role": "user", "content": "another"},
    ]
    mine = gw.client().chat.completions.create(model="auto", messages=history, temperature=0.5)
    assert mine.model == "coder"
    # B resending that very history is routed on its own.
    theirs = gw.client(OTHER_KEY).chat.completions.create(
        model="auto", messages=history, temperature=0.5
    )
    assert theirs.model == "writer"


async def test_session_keys_are_scoped_to_their_owner() -> None:
    store = MemoryStore()
    sessions = Sessions(store, ["coder", "writer"], ttl_s=60)
    decision = RouteDecision("coder", "coding", confidence=None, fell_back=False, reason="test")
    messages = [Message("user", "code it")]
    await sessions.remember(messages, decision, ["done"], session="s", owner="key:a")
    follow = [*messages, Message("assistant", "done"), Message("user", "more")]
    found = await sessions.lookup(follow, "s", owner="key:a")
    assert found is not None and found.expert == "coder"
    assert await sessions.lookup(follow, "s", owner="key:b") is None
    assert await sessions.lookup(follow, "s", owner="") is None
    # The owner's boundary is part of the key: ("key:a", "s") is not ("key:", "as").
    assert await sessions.lookup(messages, "as", owner="key:") is None


def test_sampled_requests_are_not_cached_unless_asked(gw: Running) -> None:
    body = {"model": "writer", "messages": ask("sampled"), "temperature": 0.9}
    assert gw.post("/v1/chat/completions", body).headers["x-coe-cache"] == "bypass"
    assert gw.post("/v1/chat/completions", body).headers["x-coe-cache"] == "bypass"
    asked = {"x-coe-cache-control": "store"}
    body["messages"] = ask("sampled, asked")
    assert gw.post("/v1/chat/completions", body, **asked).headers["x-coe-cache"] == "miss"
    assert gw.post("/v1/chat/completions", body, **asked).headers["x-coe-cache"] == "hit"


def test_a_conversation_stays_with_its_expert(gw: Running) -> None:
    client = gw.client()
    history = ask("write code for a parser")
    first = client.chat.completions.create(model="auto", messages=history, temperature=0.5)
    assert first.model == "coder"
    history += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "now a poem"},
    ]
    # Routed afresh, "now a poem" alone would go to the writer; the conversation stays.
    follow = client.chat.completions.with_raw_response.create(
        model="auto", messages=[history[0] | {"content": "a poem"}, *history[1:]], temperature=0.5
    )
    assert follow.parse().model == "writer", "a different first turn is another conversation"
    again = client.chat.completions.create(model="auto", messages=history, temperature=0.5)
    assert again.model == "coder"
    # An explicit session id works without the history.
    headers = {"x-coe-session": "s-1"}
    assert (
        gw.post(
            "/v1/chat/completions", {"model": "auto", "messages": ask("code it")}, **headers
        ).json()["model"]
        == "coder"
    )
    assert (
        gw.post(
            "/v1/chat/completions", {"model": "auto", "messages": ask("a poem")}, **headers
        ).json()["model"]
        == "coder"
    )


# -- health and metrics ---------------------------------------------------------------------------


def scrape(gw: Running) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample /metrics exports, by name and labels."""
    text = httpx.get(gw.base + "/metrics", headers={"authorization": f"Bearer {KEY}"}).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_health_and_metrics(gw: Running) -> None:
    health = httpx.get(gw.base + "/health").json()
    up = {"state": "up", "reason": "", "routed": True}
    assert health == {
        "status": "ok",
        "ready": True,
        "engines": {"coder": True, "writer": True},
        "experts": {"coder": up, "writer": up},
        "store": {"kind": "memory", "healthy": True, "state": "ok", "problem": None},
    }
    assert httpx.get(gw.base + "/health/ready").json() == health
    before = scrape(gw)
    named = gw.post("/v1/chat/completions", {"model": "coder", "messages": ask("count me")})
    routed = gw.post("/v1/chat/completions", {"model": "auto", "messages": ask("code, counted")})
    assert named.status_code == routed.status_code == 200
    after = scrape(gw)

    def moved(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    # Each counter moved by what these two requests did, under their labels.
    chat = "/v1/chat/completions"
    assert moved("coe_requests_total", endpoint=chat, status="200") == 2
    assert moved("coe_request_seconds_count", endpoint=chat) == 2
    assert moved("coe_routed_total", category="coding", expert="coder", how="router") == 1
    assert moved("coe_response_cache_total", result="miss") == 2  # both greedy, both new
    completion = named.json()["usage"]["completion_tokens"]
    completion += routed.json()["usage"]["completion_tokens"]
    assert completion > 0 and moved("coe_tokens_total", expert="coder", kind="completion") == (
        completion
    )
    # The weight cache's metrics are exported here too. This pool has no cache, so nothing
    # moved; tests/test_cache_engine.py checks they move with real swaps.
    moves = [k for k in after if k[0] == "coe_weight_moves_total"]
    assert all(after[k] == before.get(k, 0.0) for k in moves)
    text = httpx.get(gw.base + "/metrics", headers={"authorization": f"Bearer {KEY}"}).text
    assert "# TYPE coe_weight_moves_total counter" in text


def test_metrics_need_a_key_when_the_gateway_has_keys(gw: Running) -> None:
    for headers in ({}, {"authorization": "Bearer coe-not-a-key"}):
        refused = httpx.get(gw.base + "/metrics", headers=headers)
        assert refused.status_code == 401, headers
        assert refused.json()["error"]["type"] == "invalid_request_error"
        assert "coe_requests_total" not in refused.text
    # Any valid key reads them, the rate-limited one too (a scrape is not a request it pays).
    for key in (OTHER_KEY, LIMITED_KEY, LIMITED_KEY, LIMITED_KEY):
        shown = httpx.get(gw.base + "/metrics", headers={"authorization": f"Bearer {key}"})
        assert shown.status_code == 200 and "coe_requests_total" in shown.text
    # /health stays open: load balancers and container healthchecks carry no key.
    assert httpx.get(gw.base + "/health").status_code == 200


def test_metrics_are_open_when_the_gateway_has_no_keys() -> None:
    config = gateway_pool()
    open_pool = parse_config(
        {**config.model_dump(mode="json", exclude_none=True), "gateway": {}}, "experts.yaml"
    )
    running, runner = start_gateway(open_pool)
    try:
        assert httpx.get(running.base + "/metrics").status_code == 200
    finally:
        running.server.stop()
        runner.close()


class Refusing(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible server that refuses every key, as vLLM does with --api-key."""

    seen: ClassVar[list[str | None]] = []

    def do_POST(self) -> None:
        Refusing.seen.append(self.headers.get("authorization"))
        body = json.dumps({"error": "Unauthorized"}).encode()
        self.send_response(401)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_remote_server_refusing_the_key_is_a_500_that_never_shows_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "vllm-key-" + "s" * 40
    monkeypatch.setenv("COE_TEST_REMOTE_KEY", secret)
    server = http.server.HTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    config = parse_config(
        {
            "experts": [
                {
                    "name": "far",
                    "engine": "remote",
                    "remote": {
                        "base_url": base_url,
                        "model": "far",
                        "api_key_env": "COE_TEST_REMOTE_KEY",
                    },
                }
            ],
            "categories": [{"name": "general", "expert": "far"}],
            "gateway": {"api_keys": [{"name": "tester", "sha256": hash_key(KEY)}]},
        },
        "experts.yaml",
    )
    runner = BackgroundLoop()
    orch = Orchestrator(config, store=runner.run(open_store_on_loop(None)))
    runner.run(orch.start(["far"]))
    gateway = GatewayServer(orch, runner, host="127.0.0.1", port=0)
    gateway.start()
    running = Running(gateway, orch)
    try:
        r = running.post("/v1/chat/completions", {"model": "far", "messages": ask("hi")})
        assert Refusing.seen[-1] == f"Bearer {secret}"  # coe sent the key it was given
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert secret not in r.text
        assert "COE_TEST_REMOTE_KEY" in caplog.text and secret not in caplog.text
    finally:
        gateway.stop()
        runner.run(orch.close())
        runner.close()
        server.shutdown()


class Scripted(EchoEngine):
    """An echo engine whose health the test sets."""

    def __init__(self, name: str):
        super().__init__(name)
        self.state = EngineHealth("up")

    async def health(self) -> EngineHealth:
        return self.state


def test_health_reports_each_expert_and_ready_refuses_while_a_routed_one_is_down() -> None:
    data = gateway_pool().model_dump(exclude={"gateway", "store"})
    data["experts"] = [
        {"name": name, "model": f"/nonexistent/{name}", "system_prompt": name}
        for name in ("coder", "writer", "spare")  # spare: no category sends to it
    ]
    config = parse_config(data, "experts.yaml")
    runner = BackgroundLoop()
    engines = EnginePool(config, factory=lambda cfg, expert, name: Scripted(name))
    orch = Orchestrator(config, engines, router=KeywordRouter())
    server = GatewayServer(orch, runner, host="127.0.0.1", port=0)
    server.start()
    spare, coder = engines.engine_for("spare"), engines.engine_for("coder")
    assert isinstance(spare, Scripted) and isinstance(coder, Scripted)

    def health(path: str = "/health") -> tuple[int, dict]:
        r = httpx.get(server.url + path, timeout=10)
        return r.status_code, r.json()

    try:
        spare.state = EngineHealth("starting", "restarting after a crash")
        code, body = health()
        assert code == 200 and (body["status"], body["ready"]) == ("degraded", True)
        assert body["experts"]["spare"] == {
            "state": "starting",
            "reason": "restarting after a crash",
            "routed": False,
        }
        assert body["engines"] == {"coder": True, "writer": True, "spare": False}
        assert health("/health/ready")[0] == 200  # spare answers only by name
        coder.state = EngineHealth("down", "the engine process exited")
        code, body = health()
        assert code == 200 and (body["status"], body["ready"]) == ("unavailable", False)
        assert body["experts"]["coder"]["reason"] == "the engine process exited"
        assert health("/health/ready") == (503, body)
        coder.state = spare.state = EngineHealth("up")
        assert health("/health/ready")[1]["status"] == "ok"
    finally:
        server.stop()
        runner.run(orch.close())
        runner.close()


# -- Redis behind the gateway ------------------------------------------------------------------


def test_redis_outage_keeps_the_gateway_answering(redis_up: RedisProcess) -> None:
    config = gateway_pool(limits={"on_store_error": "open"})
    running, runner = start_gateway(config, redis_url=redis_up.url)
    body = {"model": "coder", "messages": ask("through redis"), "temperature": 0}
    try:
        assert running.post("/v1/chat/completions", body).headers["x-coe-cache"] == "miss"
        assert running.post("/v1/chat/completions", body).headers["x-coe-cache"] == "hit"
        assert httpx.get(running.base + "/health").json()["store"] == {
            "kind": "redis",
            "healthy": True,
            "state": "ok",
            "problem": None,
        }
        redis_up.stop()
        r = running.post("/v1/chat/completions", body)
        assert r.status_code == 200 and r.headers["x-coe-cache"] == "bypass"
        assert r.json()["choices"][0]["message"]["content"] == "coder: through redis"
        health = httpx.get(running.base + "/health")
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert health.json()["store"]["state"] == "unreachable"
        # Not ready: a load balancer should prefer a gateway whose store answers.
        ready = httpx.get(running.base + "/health/ready")
        assert ready.status_code == 503 and ready.json()["store"]["healthy"] is False
        # on_store_error: open: limits are off while Redis is away, the limited key passes
        # more than twice.
        for _ in range(3):
            assert running.post("/v1/chat/completions", body, key=LIMITED_KEY).status_code == 200
        redis_up.start()
        assert httpx.get(running.base + "/health").json()["status"] == "ok"
        assert httpx.get(running.base + "/health/ready").status_code == 200
        assert running.post("/v1/chat/completions", body).headers["x-coe-cache"] == "miss"
        assert running.post("/v1/chat/completions", body).headers["x-coe-cache"] == "hit"
    finally:
        running.server.stop()
        runner.close()


def test_limits_fail_closed_while_a_hung_redis_is_away(own_redis: RedisProcess) -> None:
    """Keys are configured, so on_store_error defaults to closed: while Redis hangs
    (SIGSTOP), a limited key gets 503 with Retry-After within the store timeout, a key without
    limits is served; after SIGCONT the limits are checked again."""
    running, runner = start_gateway(gateway_pool(), redis_url=own_redis.url)
    body = {"model": "coder", "messages": ask("hung"), "temperature": 0.5}
    try:
        assert running.post("/v1/chat/completions", body, key=LIMITED_KEY).status_code == 200
        own_redis.pause()
        t0 = time.monotonic()
        r = running.post("/v1/chat/completions", body, key=LIMITED_KEY)
        # One store timeout (0.5 s) at most, plus the request itself.
        assert time.monotonic() - t0 < 2.0
        error = assert_error(r, 503, "store_unavailable")
        assert error["type"] == "service_unavailable_error"
        assert int(r.headers["retry-after"]) >= 1
        t0 = time.monotonic()
        assert running.post("/v1/chat/completions", body).status_code == 200
        assert time.monotonic() - t0 < 2.0
        health = httpx.get(running.base + "/health", timeout=5)
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert health.json()["store"]["state"] == "unreachable"
        assert (
            'coe_store_trouble_total{outcome="refused"}'
            in httpx.get(running.base + "/metrics", headers={"authorization": f"Bearer {KEY}"}).text
        )
        own_redis.resume()
        deadline = time.monotonic() + 5
        while httpx.get(running.base + "/health").json()["status"] != "ok":
            assert time.monotonic() < deadline, "the gateway did not see Redis come back"
            time.sleep(0.1)
        # Limits are checked again, from the bucket that survived the hang (the admission that
        # timed out may have been counted when Redis woke up and read it).
        statuses = [
            running.post("/v1/chat/completions", body, key=LIMITED_KEY).status_code
            for _ in range(2)
        ]
        assert statuses[-1] == 429 and set(statuses) <= {200, 429}
    finally:
        own_redis.resume()
        running.server.stop()
        runner.close()


def test_redis_restarted_with_a_password_is_503_not_an_outage(own_redis: RedisProcess) -> None:
    """A Redis that answers but refuses the gateway is a misconfiguration: requests that need
    the store get 503 store_misconfigured (keys with limits or not, on_store_error open or
    not), /health is 503 and says why; it clears once Redis takes the gateway again."""
    config = gateway_pool(limits={"on_store_error": "open"})
    running, runner = start_gateway(config, redis_url=own_redis.url)
    body = {"model": "coder", "messages": ask("password"), "temperature": 0.5}
    try:
        assert running.post("/v1/chat/completions", body).status_code == 200
        own_redis.stop()
        own_redis.start(password="now-required")
        # The old connection is gone (a moment unreachable); the next try meets the password.
        deadline = time.monotonic() + 5
        while (r := running.post("/v1/chat/completions", body, key=LIMITED_KEY)).status_code != 503:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.1)
        error = assert_error(r, 503, "store_misconfigured")
        assert "misconfigured" in error["message"] and "127.0.0.1" not in error["message"]
        assert_error(running.post("/v1/chat/completions", body), 503, "store_misconfigured")
        assert_error(running.post("/v1/route", {"messages": ask("x")}), 503, "store_misconfigured")
        assert running.client().models.list().data, "endpoints without the store still answer"
        health = httpx.get(running.base + "/health")  # liveness: the gateway itself answers
        assert health.status_code == 200 and health.json()["status"] == "unavailable"
        assert httpx.get(running.base + "/health/ready").status_code == 503
        store = health.json()["store"]
        assert store["state"] == "misconfigured" and not store["healthy"]
        assert "requires a password" in store["problem"]
        own_redis.stop()
        own_redis.start()
        assert httpx.get(running.base + "/health").json()["status"] == "ok"
        assert running.post("/v1/chat/completions", body, key=LIMITED_KEY).status_code == 200
    finally:
        running.server.stop()
        runner.close()


def test_a_wrong_password_at_start_refuses_to_serve(own_redis: RedisProcess) -> None:
    own_redis.stop()
    own_redis.start(password="right")
    runner = BackgroundLoop()
    try:
        with pytest.raises(StoreMisconfiguredError) as caught:
            runner.run(open_store_on_loop(own_redis.url_with("wrong-secret")))
        assert "user or password" in str(caught.value) and "wrong-secret" not in str(caught.value)
        # Unreachable is an outage: the gateway starts degraded.
        own_redis.stop()
        store = runner.run(open_store_on_loop(own_redis.url))
        assert store.state == "unreachable"
        runner.run(store.close())
    finally:
        runner.close()


@pytest.mark.parametrize(
    ("configured", "has_keys", "policy"),
    [
        (None, True, "closed"),
        (None, False, "open"),
        ("open", True, "open"),
        ("closed", False, "closed"),
    ],
)
def test_on_store_error_defaults_to_closed_when_keys_are_configured(
    configured: str | None, has_keys: bool, policy: str
) -> None:
    limits = gateway_pool(limits={"on_store_error": configured}).gateway.limits
    assert limits.store_error_policy(has_keys) == policy
    with pytest.raises(ConfigError, match="on_store_error"):
        gateway_pool(limits={"on_store_error": "sometimes"})


def test_openai_parameters_coe_cannot_honour_are_named(gw: Running) -> None:
    base = {"model": "coder", "messages": ask("x")}
    tools = [{"type": "function", "function": {"name": "f"}}]
    for extra, param in (
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"a": 1}}, "logit_bias"),
        ({"tools": tools, "response_format": {"type": "json_object"}}, "response_format"),
    ):
        error = assert_error(gw.post("/v1/chat/completions", {**base, **extra}), 400)
        assert error["param"] == param and error["code"] == "unsupported_parameter"
    # tool_choice auto on an in-process expert without a tool_parser: refused, naming it.
    error = assert_error(gw.post("/v1/chat/completions", {**base, "tools": tools}), 400)
    assert error["param"] == "tool_choice" and "expert coder" in error["message"]
    assert "tool_parser" in error["message"]
    neutral = {"presence_penalty": 0, "frequency_penalty": 0, "logprobs": False, "store": False}
    assert gw.post("/v1/chat/completions", {**base, **neutral}).status_code == 200
    # An assistant turn without content, as clients echo tool-less replies back.
    history = [*ask("a"), {"role": "assistant", "content": None}, *ask("b")]
    assert gw.post("/v1/chat/completions", {**base, "messages": history}).status_code == 200


def test_n_choices_get_distinct_seeds_from_the_experts_default(gw: Running) -> None:
    engine = gw.orch.engines.engine_for("coder")
    engine.seeds.clear()
    r = gw.post("/v1/chat/completions", {"model": "coder", "messages": ask("seeded"), "n": 3})
    assert r.status_code == 200
    assert sorted(engine.seeds) == [11, 12, 13]


def test_cache_entries_are_per_client_unless_shared(gw: Running) -> None:
    body = {"model": "coder", "messages": ask("private prompt"), "temperature": 0}
    assert gw.post("/v1/chat/completions", body).headers["x-coe-cache"] == "miss"
    assert gw.post("/v1/chat/completions", body).headers["x-coe-cache"] == "hit"
    assert gw.post("/v1/chat/completions", body, key=OTHER_KEY).headers["x-coe-cache"] == "miss"


def test_a_kept_sampled_answer_serves_only_requests_that_ask_alike(gw: Running) -> None:
    body = {"model": "auto", "messages": ask("a sampled poem"), "temperature": 0.9}
    store = {"x-coe-cache-control": "store"}
    assert gw.post("/v1/chat/completions", body, **store).headers["x-coe-cache"] == "miss"
    assert gw.post("/v1/chat/completions", body, **store).headers["x-coe-cache"] == "hit"
    assert gw.post("/v1/chat/completions", body).headers["x-coe-cache"] == "bypass"


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_cancels_its_generation(gw: Running, stream: bool) -> None:
    engine = gw.orch.engines.engine_for("coder")
    before = engine.cancelled
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            gw.base + "/v1/chat/completions",
            json={"model": "coder", "messages": ask("slow"), "stream": stream},
            headers={"authorization": f"Bearer {KEY}"},
            timeout=0.5,
        )
    deadline = time.monotonic() + 5
    while engine.cancelled == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.cancelled == before + 1


@pytest.mark.parametrize(
    ("error", "status", "kind", "says"),
    [
        (
            EngineError("engine coder died", retryable=True),
            503,
            "service_unavailable_error",
            "expert coder is restarting",
        ),
        (
            EngineError("engine coder failed"),
            503,
            "service_unavailable_error",
            "expert coder could not serve",
        ),
        (
            EngineError("400 from server", invalid_request=True, reason="bad stop"),
            400,
            "invalid_request_error",
            "expert coder refused the request: bad stop",
        ),
        (
            PromptTooLongError("the prompt is 5000 tokens"),
            400,
            "invalid_request_error",
            "the prompt is 5000 tokens",
        ),
        (
            ConfigError("experts.yaml", ["router.path: no such folder"]),
            500,
            "server_error",
            "the server's configuration is broken",
        ),
        (
            MixtureError("regions.npz is missing"),
            500,
            "server_error",
            "prompt strategy could not be loaded",
        ),
        (
            ValueError("the conversation has no user message"),
            400,
            "invalid_request_error",
            "no user message",
        ),
    ],
)
def test_errors_map_to_the_client_shape_by_kind(
    error: Exception, status: int, kind: str, says: str
) -> None:
    """One mapping from the error hierarchy to OpenAI's shape: the caller's fault is 400, a
    broken part 503, the operator's files 500, and no internal detail reaches the client."""
    api = from_exception(error, "coder")
    assert (api.status, api.body.type) == (status, kind)
    assert says in api.body.message
    assert "engine coder" not in api.body.message
