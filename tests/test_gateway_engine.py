"""`coe serve` as a user runs it: the real vLLM engine (gemma-3-270m), the shipped router, a real
redis-server, and the official openai client over loopback HTTP."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import litellm
import openai
import pytest
import yaml

from coe.gateway.auth import hash_key

from .conftest import (
    COE,
    REPO,
    TEST_EXPERT_DEFAULTS,
    RedisProcess,
    cli_env,
    free_port,
    in_process_gateway,
    pool_dict,
    wait_for_health,
)

pytestmark = pytest.mark.engine

KEY = "coe-engine-test-key"
START_TIMEOUT_S = 420
CATEGORIES = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem",
              "humanities", "general"]  # fmt: skip


def serve_pool() -> dict:
    """Two experts on one engine (greedy `counter`, sampling `writer`), every category of the
    shipped router mapped to one of them."""
    base = {**TEST_EXPERT_DEFAULTS, "prompt_format": "qa"}
    return {
        "experts": [
            {"name": "counter", **base, "sampling": {"temperature": 0.0, "max_tokens": 24}},
            {"name": "writer", **base, "sampling": {"temperature": 0.8, "max_tokens": 24}},
        ],
        "categories": [
            {"name": c, "expert": "writer" if c in ("writing", "roleplay") else "counter"}
            for c in CATEGORIES
        ],
        "router": {"path": str(REPO / "routers/default"), "fallback": "general"},
        "gateway": {"api_keys": [{"name": "tester", "sha256": hash_key(KEY)}]},
    }


@pytest.fixture(scope="module")
def gateway(
    model_dir: Path, redis_server: RedisProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("serve")
    config = folder / "experts.yaml"
    config.write_text(yaml.safe_dump(serve_pool()))
    port = free_port()
    log_path = folder / "serve.log"
    cmd = [COE, "--config", str(config), "serve", "--port", str(port),
           "--redis-url", redis_server.url]  # fmt: skip
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=cli_env())
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(proc, base, log_path, "coe serve", START_TIMEOUT_S)
        yield base
    finally:
        proc.terminate()
        try:
            assert proc.wait(timeout=60) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)


def count_prompt(start: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Continue counting: {start}, {start + 1}, {start + 2},"}]


def test_auto_streams_an_answer_with_the_openai_client(gateway: str) -> None:
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="auto",
        messages=[{"role": "user", "content": "Write a short poem about the sea."}],
        stream=True,
        max_tokens=16,
    )
    assert raw.headers["x-coe-category"] == "writing"
    assert raw.headers["x-coe-expert"] == "writer"
    assert float(raw.headers["x-coe-confidence"]) > 0.5
    chunks = list(raw.parse())
    assert {c.model for c in chunks} == {"writer"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip(), "no text streamed"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_models_and_unknown_model(gateway: str) -> None:
    ids = [m.id for m in client(gateway).models.list().data]
    assert ids[:3] == ["auto", "counter", "writer"] and "auto:math" in ids
    with pytest.raises(openai.NotFoundError) as caught:
        client(gateway).chat.completions.create(model="nope", messages=count_prompt(1))
    assert caught.value.code == "model_not_found"


async def test_async_client_and_response_cache(gateway: str) -> None:
    aclient = openai.AsyncOpenAI(base_url=gateway + "/v1", api_key=KEY, max_retries=0)
    try:
        first = await aclient.chat.completions.with_raw_response.create(
            model="counter", messages=count_prompt(7), max_tokens=8
        )
        second = await aclient.chat.completions.with_raw_response.create(
            model="counter", messages=count_prompt(7), max_tokens=8
        )
        assert first.headers["x-coe-cache"] == "miss"
        assert second.headers["x-coe-cache"] == "hit"
        answer = first.parse().choices[0].message.content
        assert answer and re.search(r"\d", answer)
        assert second.parse().choices[0].message.content == answer
        stream = await aclient.chat.completions.create(
            model="counter", messages=count_prompt(7), max_tokens=8, stream=True
        )
        replay = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert replay == answer
    finally:
        await aclient.close()


async def test_32_concurrent_streams_come_back_whole_and_unmixed(gateway: str) -> None:
    aclient = openai.AsyncOpenAI(base_url=gateway + "/v1", api_key=KEY, max_retries=0)
    starts = [100 * i + 3 for i in range(32)]

    async def one(start: int) -> str:
        stream = await aclient.chat.completions.create(
            model="counter",
            messages=count_prompt(start),
            max_tokens=12,
            stream=True,
            extra_headers={"x-coe-cache-control": "no-cache"},
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    try:
        texts = await asyncio.gather(*(one(s) for s in starts))
    finally:
        await aclient.close()
    for start, text in zip(starts, texts, strict=True):
        numbers = [int(n) for n in re.findall(r"(\d+),", text)]
        # The model counts on from its own prompt; a chunk of another stream would bring a
        # number a hundred or more away.
        assert numbers, f"{start}: no complete number in {text!r}"
        assert all(start <= n < start + 20 for n in numbers), f"{start}: {text!r}"


def test_redis_killed_mid_test_the_gateway_answers_and_recovers(
    gateway: str, redis_server: RedisProcess
) -> None:
    body = {"model": "counter", "messages": count_prompt(50), "max_tokens": 6}
    headers = {"authorization": f"Bearer {KEY}"}
    url = gateway + "/v1/chat/completions"
    assert httpx.post(url, json=body, headers=headers, timeout=60).status_code == 200
    redis_server.stop()
    try:
        r = httpx.post(url, json=body, headers=headers, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        assert r.headers["x-coe-cache"] == "bypass"  # nowhere to keep it
        health = httpx.get(gateway + "/health", timeout=10).json()
        assert health["status"] == "degraded" and health["store"]["healthy"] is False
    finally:
        redis_server.start()
    assert httpx.get(gateway + "/health", timeout=10).json()["status"] == "ok"
    assert httpx.post(url, json=body, headers=headers, timeout=60).headers["x-coe-cache"] == "miss"
    assert httpx.post(url, json=body, headers=headers, timeout=60).headers["x-coe-cache"] == "hit"


def test_metrics_count_requests_routing_tokens_and_cache(gateway: str) -> None:
    auth = {"authorization": f"Bearer {KEY}"}  # /metrics is behind the keys
    text = httpx.get(gateway + "/metrics", headers=auth, timeout=10).text
    assert re.search(r'coe_requests_total\{endpoint="/v1/chat/completions",status="200"\} \d', text)
    assert 'coe_routed_total{category="writing",expert="writer",how="router"}' in text
    assert re.search(r'coe_tokens_total\{expert="counter",kind="completion"\} [1-9]', text)
    assert re.search(r'coe_response_cache_total\{result="hit"\} [1-9]', text)
    assert "coe_time_to_first_token_seconds_count" in text


# -- the other protocols with their own clients (/v1/messages, /v1/responses, /v1/completions) ---


def test_anthropic_sdk_on_the_real_engine(gateway: str) -> None:
    claude = anthropic.Anthropic(base_url=gateway, api_key=KEY, max_retries=0)  # x-api-key
    raw = claude.messages.with_raw_response.create(
        model="auto",
        max_tokens=12,
        messages=[{"role": "user", "content": "Write a short poem about the sea."}],
    )
    assert raw.headers["x-coe-expert"] == "writer" and raw.headers["x-coe-category"] == "writing"
    message = raw.parse()
    assert message.model == "writer" and message.content[0].text.strip()
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0 and 0 < message.usage.output_tokens <= 12
    with claude.messages.stream(
        model="counter", max_tokens=8, messages=count_prompt(20), system="Count."
    ) as stream:
        deltas = list(stream.text_stream)
        final = stream.get_final_message()
    assert deltas and "".join(deltas) == final.content[0].text
    assert re.search(r"\d", final.content[0].text)
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert final.usage.input_tokens > 0 and 0 < final.usage.output_tokens <= 8


def test_openai_sdk_responses_and_completions_on_the_real_engine(gateway: str) -> None:
    openai_client = client(gateway)
    prompt = count_prompt(30)[0]["content"]
    response = openai_client.responses.create(model="counter", input=prompt, max_output_tokens=8)
    assert re.search(r"\d", response.output_text)
    assert response.status in ("completed", "incomplete") and response.model == "counter"
    assert response.usage is not None and 0 < response.usage.output_tokens <= 8
    events = list(
        openai_client.responses.create(
            model="counter",
            input="And the next three?",
            previous_response_id=response.id,
            max_output_tokens=8,
            stream=True,
        )
    )
    assert events[0].type == "response.created"
    assert events[-1].type in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas.strip() and events[-1].response.output_text == deltas
    assert [e.sequence_number for e in events] == list(range(len(events)))
    completion = openai_client.completions.create(model="counter", prompt=prompt, max_tokens=8)
    assert completion.object == "text_completion"
    assert re.search(r"\d", completion.choices[0].text)
    assert completion.usage is not None and completion.usage.completion_tokens > 0


CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "A city's forecast.",
                "parameters": CITY, "strict": True}  # fmt: skip


def test_openai_sdk_responses_function_tools_on_the_real_engine(gateway: str) -> None:
    """A forced call is guided decoding: even the 270M model's arguments follow the schema."""
    openai_client = client(gateway)
    ask = "What is the weather in Paris this week?"
    forced = {"type": "function", "name": "get_weather"}
    response = openai_client.responses.create(
        model="counter", input=ask, tools=[WEATHER_TOOL], tool_choice=forced,  # type: ignore[list-item]
        max_output_tokens=64, extra_headers={"x-coe-cache-control": "no-cache"},
    )  # fmt: skip
    assert response.status == "completed" and response.model == "counter"
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id
    assert calls[0].status == "completed" and (calls[0].id or "").startswith("fc_")
    jsonschema.validate(json.loads(calls[0].arguments), CITY)

    events = list(
        openai_client.responses.create(
            model="counter", input=ask, tools=[WEATHER_TOOL], tool_choice=forced,  # type: ignore[list-item]
            max_output_tokens=64, stream=True, extra_headers={"x-coe-cache-control": "no-cache"},
        )
    )  # fmt: skip
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.completed"
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [e.item.type for e in added] == ["function_call"] and added[0].item.arguments == ""
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert deltas and done.arguments == deltas
    jsonschema.validate(json.loads(deltas), CITY)
    final_call = events[-1].response.output[-1]
    assert final_call.type == "function_call" and final_call.arguments == deltas

    # The next turn gives the call's output; the stored turn (with its call) comes before it.
    follow = openai_client.responses.create(
        model="counter",
        previous_response_id=response.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                "output": '{"forecast": "sunny, 21 C"}'}],
        max_output_tokens=16,
    )  # fmt: skip
    assert follow.status in ("completed", "incomplete") and follow.model == "counter"
    assert [item.type for item in follow.output] == ["message"]
    assert follow.usage is not None and response.usage is not None
    assert follow.usage.input_tokens > response.usage.input_tokens


def test_litellm_against_the_gateway_on_the_real_engine(gateway: str) -> None:
    reply = litellm.completion(
        model="anthropic/counter",
        api_base=gateway,
        api_key=KEY,
        messages=count_prompt(40),
        max_tokens=8,
    )
    assert re.search(r"\d", reply.choices[0].message.content)
    assert reply.usage.completion_tokens > 0


# -- a deadline on the real engine: the request ends, and is aborted in the engine ----------------

HURRIED_TOTAL_S = 0.5


@dataclass
class InProcess:
    url: str
    orch: Any
    runner: Any

    def unfinished(self) -> int:
        """Requests the engine still holds (vLLM's own count)."""
        engine = self.orch.engines.engine_for("qa")

        async def count() -> int:
            return int(engine._llm.get_num_unfinished_requests())

        return int(self.runner.run(count()))


@pytest.fixture(scope="module")
def hurried(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcess]:
    """An in-process gateway on one real engine: `qa` must finish within HURRIED_TOTAL_S,
    `chatty` (the same engine) has the default deadlines."""
    from coe.config import parse_config

    data = pool_dict()
    data["experts"][0]["deadlines"] = {"total_s": HURRIED_TOTAL_S}
    assert data["experts"][0]["name"] == "qa"
    config = parse_config(data, tmp_path_factory.mktemp("hurried") / "experts.yaml")
    with in_process_gateway(config) as (url, orch, runner):
        yield InProcess(url, orch, runner)


def test_a_total_deadline_on_the_real_engine_ends_the_request_and_aborts_it(
    hurried: InProcess,
) -> None:
    aclient = openai.OpenAI(base_url=hurried.url + "/v1", api_key="unused", max_retries=0)
    long_answer = {"model": "qa", "messages": count_prompt(1), "max_tokens": 900}
    t0 = time.monotonic()
    with pytest.raises(openai.InternalServerError) as caught:
        aclient.chat.completions.create(**long_answer, temperature=0.0)
    elapsed = time.monotonic() - t0
    assert caught.value.status_code == 504 and caught.value.code == "total_deadline_exceeded"
    assert HURRIED_TOTAL_S <= elapsed < HURRIED_TOTAL_S + 10, elapsed
    # Streamed: some text, then the error as the last event (the openai client raises it).
    stream = aclient.chat.completions.create(**long_answer, temperature=0.0, stream=True)
    with pytest.raises(openai.APIError) as streamed:
        for _ in stream:
            pass
    assert streamed.value.code == "total_deadline_exceeded"
    # Nothing keeps running in the engine: both requests were aborted, not left to finish.
    deadline = time.monotonic() + 10
    while hurried.unfinished() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hurried.unfinished() == 0
    # The engine serves the next request (an expert on it without the tight deadline).
    done = aclient.chat.completions.create(
        model="chatty", messages=count_prompt(5), max_tokens=8, temperature=0.0
    )
    assert done.choices[0].message.content
