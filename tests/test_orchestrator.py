"""Orchestrator logic with a scripted fake engine (fast); the real engine is in test_engine_vllm."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from coe.cache.pool import EnginePool
from coe.config import Expert, PoolConfig, parse_config
from coe.engines.base import EngineError
from coe.orchestrator import Orchestrator
from coe.types import Chunk, Prompt, SamplingParams, Usage

from .conftest import pool_dict


class ScriptedEngine:
    """Fails the first ``failures`` requests (after ``emit_before_failing`` chunks), then echoes."""

    def __init__(self, failures: int = 0, retryable: bool = True, emit_before_failing: int = 0):
        self.name = "scripted"
        self.failures = failures
        self.retryable = retryable
        self.emit_before_failing = emit_before_failing
        self.calls: list[tuple[Prompt, SamplingParams]] = []

    @property
    def ready(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None

    async def stream(
        self, prompt: Prompt, sampling: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[Chunk]:
        self.calls.append((prompt, sampling))
        if len(self.calls) <= self.failures:
            for _ in range(self.emit_before_failing):
                yield Chunk(text="partial ")
            raise EngineError("engine died", retryable=self.retryable)
        yield Chunk(text="echo: ")
        yield Chunk(text=prompt.messages[-1].content, finish_reason="stop", usage=Usage(3, 2))


def make(engine: ScriptedEngine) -> tuple[Orchestrator, PoolConfig]:
    cfg = parse_config(pool_dict(), "experts.yaml")
    return Orchestrator(cfg, EnginePool(cfg, lambda _c, _e, _n: engine)), cfg


USER = [{"role": "user", "content": "hello"}]


async def test_default_route_is_the_fallback_category() -> None:
    orch, _ = make(ScriptedEngine())
    result = await orch.chat(USER)
    assert (result.decision.expert, result.decision.category) == ("qa", "general")
    assert result.decision.fell_back
    assert result.text == "echo: hello" and result.usage.completion_tokens == 2


async def test_system_prompt_sampling_and_format_come_from_the_expert() -> None:
    engine = ScriptedEngine()
    orch, cfg = make(engine)
    await orch.chat(USER, expert="chatty", max_tokens=7, temperature=None)
    prompt, sampling = engine.calls[-1]
    assert prompt.format == "chat"
    assert [m.role for m in prompt.messages] == ["system", "user"]
    assert prompt.messages[0].content == "Be brief."
    assert sampling.max_tokens == 7
    assert sampling.temperature == cfg.expert("chatty").sampling.temperature
    # A caller's system message replaces the expert's own.
    await orch.chat([{"role": "system", "content": "Mine."}, *USER], expert="chatty")
    assert engine.calls[-1][0].messages[0].content == "Mine."


async def test_request_retried_once_when_the_engine_died_before_any_output() -> None:
    engine = ScriptedEngine(failures=1)
    orch, _ = make(engine)
    result = await orch.chat(USER)
    assert result.text == "echo: hello" and len(engine.calls) == 2


async def test_no_retry_after_output_reached_the_caller() -> None:
    engine = ScriptedEngine(failures=1, emit_before_failing=1)
    orch, _ = make(engine)
    with pytest.raises(EngineError, match="engine died"):
        await orch.chat(USER)
    assert len(engine.calls) == 1


async def test_no_endless_retries_and_no_retry_of_permanent_errors() -> None:
    engine = ScriptedEngine(failures=5)
    with pytest.raises(EngineError):
        await make(engine)[0].chat(USER)
    assert len(engine.calls) == 2
    permanent = ScriptedEngine(failures=5, retryable=False)
    with pytest.raises(EngineError):
        await make(permanent)[0].chat(USER)
    assert len(permanent.calls) == 1


def test_experts_sharing_a_model_share_an_engine_and_others_do_not() -> None:
    data = pool_dict()
    data["experts"].append({"name": "other", "model": "/elsewhere", "max_model_len": 512})
    cfg = parse_config(data, "experts.yaml")
    made: list[Expert] = []

    def factory(_c: PoolConfig, expert: Expert, _n: str) -> ScriptedEngine:
        made.append(expert)
        return ScriptedEngine()

    pool = EnginePool(cfg, factory)
    assert [e.name for e in made] == ["qa", "other"]
    assert pool.engine_for("qa") is pool.engine_for("chatty")
    assert pool.engine_for("other") is not pool.engine_for("qa")


class PickWriting:
    """A router stand-in: sends everything to the writing category."""

    def __init__(self) -> None:
        self.seen: list[list] = []

    def route(self, messages):
        from coe.types import RouteDecision

        self.seen.append(list(messages))
        return RouteDecision("chatty", "writing", 0.9, False, "test router")


async def test_the_router_decides_when_no_expert_is_named() -> None:
    engine = ScriptedEngine()
    cfg = parse_config(pool_dict(), "experts.yaml")
    router = PickWriting()
    orch = Orchestrator(cfg, EnginePool(cfg, lambda _c, _e, _n: engine), router=router)
    result = await orch.chat(USER)
    assert (result.decision.expert, result.decision.category) == ("chatty", "writing")
    assert engine.calls[0][0].messages[0].content == "Be brief."  # chatty's system prompt
    named = await orch.chat(USER, expert="qa")
    assert named.decision.expert == "qa" and len(router.seen) == 1


async def test_decide_covers_every_model_name_and_sticky_sessions() -> None:
    from coe.orchestrator import UnknownModelError
    from coe.types import Message

    orch, cfg = make(ScriptedEngine())
    msgs = [Message("user", "hello")]
    decision, how = await orch.decide("auto", msgs)
    assert (decision.expert, how) == (cfg.fallback_expert, "fallback") and decision.fell_back
    decision, how = await orch.decide("auto:writing", msgs)
    assert (decision.expert, decision.category, how) == ("chatty", "writing", "category")
    decision, how = await orch.decide("qa", msgs)
    assert (decision.expert, decision.category, how) == ("qa", None, "caller")
    with pytest.raises(UnknownModelError, match="auto:writing"):
        await orch.decide("auto:nowhere", msgs)
    # A conversation answered once stays with its expert, by session id or by its history.
    await orch.remember(msgs, decision, ["hi"], session="s1")
    decision, how = await orch.decide("auto", [Message("user", "again")], "s1")
    assert (decision.expert, how) == ("qa", "session")
    later = [*msgs, Message("assistant", "hi"), Message("user", "more")]
    decision, how = await orch.decide("auto", later)
    assert (decision.expert, how) == ("qa", "session")


async def test_the_expert_is_prefetched_before_its_prompt_is_shaped() -> None:
    from coe.prompts.strategies import NONE

    orch, _ = make(ScriptedEngine())
    order: list[str] = []

    async def shape(category, messages):  # type: ignore[no-untyped-def]
        order.append("shape")
        return NONE

    orch.engines.prefetch = lambda name: order.append(f"prefetch {name}")  # type: ignore[attr-defined]
    orch.strategies.shape = shape  # type: ignore[method-assign]
    await orch.chat(USER, expert="qa")
    assert order == ["prefetch qa", "shape"]
