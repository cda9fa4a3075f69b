"""Deadlines and fallback experts, on fake engines that hang (never yield), stall mid-answer or
fail: every request ends within its deadline, the engine's request is cancelled, and a request
whose expert is down before its first token is answered by the category's fallback expert.
Through the gateway with the openai client: tests/test_gateway_deadlines.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from coe.cache.pool import EnginePool
from coe.cache.scheduler import Scheduler
from coe.config import ConfigError, Deadlines, PoolConfig, parse_config
from coe.engines.base import DeadlineError, EngineError
from coe.orchestrator import Orchestrator, to_messages
from coe.orchestrator.generation import within_deadlines
from coe.types import Chunk, Prompt, SamplingParams, Usage

HELLO = [{"role": "user", "content": "hello"}]


class FakeEngine:
    """An engine whose behaviour the test sets: "ok" answers two words, "hang" never yields,
    "stall" yields a word and then hangs, "down" fails at once, "midway" fails after a word,
    "queue" misses its queue deadline. Counts its requests and their cancellations."""

    def __init__(self, name: str, mode: str = "ok"):
        self.name = name
        self.mode = mode
        self.ready = True
        self.requests: list[str | None] = []
        self.cancelled = 0

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def stream(
        self, prompt: Prompt, sampling: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[Chunk]:
        self.requests.append(request_id)
        try:
            if self.mode == "down":
                raise EngineError(f"engine {self.name} is down")
            if self.mode == "queue":
                raise DeadlineError(self.name, "queue", 0.1)
            if self.mode == "hang":
                await asyncio.Event().wait()
            yield Chunk(self.name)
            if self.mode == "stall":
                await asyncio.Event().wait()
            if self.mode == "midway":
                raise EngineError(f"engine {self.name} died mid-answer")
            yield Chunk(" answers", "stop", Usage(1, 2))
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


def pool(limits: dict[str, float] | None = None, **primary: Any) -> PoolConfig:
    """`primary` (the general category's expert, with `backup` then `spare` as fallbacks); the
    pool's deadlines are ``limits``, the primary's own entry gets ``primary``."""
    experts = [
        {"name": name, "model": f"/nonexistent/{name}"} for name in ("primary", "backup", "spare")
    ]
    experts[0].update(primary)
    data: dict[str, Any] = {
        "experts": experts,
        "categories": [{"name": "general", "expert": "primary", "fallbacks": ["backup", "spare"]}],
    }
    if limits is not None:
        data["deadlines"] = limits
    return parse_config(data, "experts.yaml")


def orchestrator(cfg: PoolConfig, **modes: str) -> tuple[Orchestrator, dict[str, FakeEngine]]:
    engines = {e.name: FakeEngine(e.name, modes.get(e.name, "ok")) for e in cfg.experts}
    pool_ = EnginePool(cfg, lambda _c, expert, _n: engines[expert.name])
    return Orchestrator(cfg, pool_), engines


FAST = {"first_token_s": 0.2, "total_s": 0.5, "queue_s": 0.2}


# -- configuration -----------------------------------------------------------------------------


def test_deadlines_have_defaults_and_an_expert_overrides_any_of_them() -> None:
    cfg = pool({"total_s": 90}, deadlines={"first_token_s": 3})
    assert cfg.deadlines_for("backup") == Deadlines(first_token_s=120, total_s=90, queue_s=60)
    assert cfg.deadlines_for("primary") == Deadlines(first_token_s=3, total_s=90, queue_s=60)
    assert cfg.fallbacks_for("general") == ["backup", "spare"]
    assert cfg.fallbacks_for(None) == []


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({"deadlines": {"first_token_s": 0}}, "experts[0].deadlines.first_token_s: Input should"),
        ({"deadlines": {"first_token": 3}}, "experts[0].deadlines.first_token: unknown key"),
        (
            {"deadlines": {"first_token_s": 30, "total_s": 10}},
            "experts[0].deadlines.first_token_s: 30 s is longer than total_s (10 s)",
        ),
    ],
)
def test_bad_deadlines_are_refused_with_their_key_path(section: dict, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        pool(**section)
    assert problem in str(caught.value)


def test_a_small_total_alone_is_fine() -> None:
    """Only total_s set: it ends the request before the default first-token deadline could."""
    assert pool(deadlines={"total_s": 1}).deadlines_for("primary").total_s == 1


@pytest.mark.parametrize(
    ("category", "problem"),
    [
        (
            {"fallbacks": ["nobody"]},
            "categories[0].fallbacks[0]: 'nobody' is not a defined expert "
            "(defined: primary, backup)",
        ),
        ({"fallbacks": ["primary"]}, "categories[0].fallbacks[0]: 'primary' is the category's own"),
        (
            {"fallbacks": ["backup", "backup"]},
            "categories[0].fallbacks[1]: 'backup' is listed twice",
        ),
    ],
)
def test_fallbacks_must_name_other_defined_experts(category: dict, problem: str) -> None:
    data = {
        "experts": [
            {"name": "primary", "model": "/nonexistent/a"},
            {"name": "backup", "model": "/nonexistent/b"},
        ],
        "categories": [{"name": "general", "expert": "primary", **category}],
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "experts.yaml")
    assert problem in str(caught.value)


# -- one stream within its deadlines -----------------------------------------------------------


async def test_a_hung_engine_misses_its_first_token_deadline_and_is_cancelled() -> None:
    engine = FakeEngine("hung", "hang")
    limits = Deadlines(first_token_s=0.2, total_s=5)
    t0 = time.monotonic()
    with pytest.raises(DeadlineError) as caught:
        async for _ in within_deadlines(engine.stream(Prompt(()), SamplingParams()), "x", limits):
            pass
    assert 0.2 <= time.monotonic() - t0 < 1.0
    assert (caught.value.deadline, caught.value.expert, caught.value.http_status) == (
        "first_token",
        "x",
        504,
    )
    assert str(caught.value) == "expert x gave no first token within 0.2 s (first_token_s)"
    assert engine.cancelled == 1, "the engine's request must be cancelled, not left running"


async def test_a_stream_that_stalls_mid_answer_misses_its_total_deadline() -> None:
    engine = FakeEngine("staller", "stall")
    limits = Deadlines(first_token_s=0.2, total_s=0.4)
    got: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(DeadlineError) as caught:
        async for chunk in within_deadlines(
            engine.stream(Prompt(()), SamplingParams()), "x", limits
        ):
            got.append(chunk.text)
    assert 0.4 <= time.monotonic() - t0 < 1.0
    assert got == ["staller"] and caught.value.deadline == "total"
    assert engine.cancelled == 1


async def test_a_total_shorter_than_the_first_token_deadline_is_the_one_reported() -> None:
    engine = FakeEngine("hung", "hang")
    with pytest.raises(DeadlineError) as caught:
        async for _ in within_deadlines(
            engine.stream(Prompt(()), SamplingParams()), "x", Deadlines(total_s=0.1)
        ):
            pass
    assert caught.value.deadline == "total"


async def test_an_answer_in_time_passes_whole_and_an_engine_timeout_is_not_ours() -> None:
    engine = FakeEngine("quick")
    chunks = [
        c
        async for c in within_deadlines(
            engine.stream(Prompt(()), SamplingParams()), "x", Deadlines()
        )
    ]
    assert "".join(c.text for c in chunks) == "quick answers"

    async def times_out() -> AsyncIterator[Chunk]:
        raise TimeoutError("the engine's own")
        yield Chunk("")

    with pytest.raises(TimeoutError, match="the engine's own"):
        async for _ in within_deadlines(times_out(), "x", Deadlines()):
            pass


# -- the queue deadline ------------------------------------------------------------------------


class BusySlot:
    """A slot that holds another expert with a request that never finishes."""

    index = 0
    in_flight = 1
    resident = "other"


class NeverSwitches:
    def switch_seconds(self, expert: str) -> float:
        return 1.0

    def can_serve(self, expert: str, slot: int) -> bool:
        return True

    async def make_resident(self, slot: Any, expert: str) -> None:
        raise AssertionError("a slot with a request in flight must not switch")


async def test_a_request_whose_slot_never_frees_leaves_the_queue_at_its_deadline() -> None:
    scheduler = Scheduler([BusySlot()], NeverSwitches(), max_wait_s=0.05)
    t0 = time.monotonic()
    with pytest.raises(DeadlineError) as caught:
        await scheduler.acquire("unit", wait_s=0.2, name="expert-a")
    assert 0.2 <= time.monotonic() - t0 < 1.0
    assert (caught.value.deadline, caught.value.expert, caught.value.http_status) == (
        "queue",
        "expert-a",
        503,
    )
    assert scheduler.waiting("unit") == 0 and not scheduler.busy()
    await scheduler.close()


async def test_no_queue_deadline_waits_until_cancelled() -> None:
    scheduler = Scheduler([BusySlot()], NeverSwitches(), max_wait_s=0.05)
    waiter = asyncio.ensure_future(scheduler.acquire("unit"))
    await asyncio.sleep(0.3)
    assert not waiter.done() and scheduler.waiting("unit") == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert scheduler.waiting("unit") == 0
    await scheduler.close()


# -- the orchestrator: deadlines and fallback experts ------------------------------------------


async def test_a_hung_expert_is_given_up_at_its_first_token_deadline_and_a_fallback_answers() -> (
    None
):
    orch, engines = orchestrator(pool(FAST), primary="hang")
    t0 = time.monotonic()
    result = await orch.chat(HELLO)
    assert time.monotonic() - t0 < 1.0
    assert result.text == "backup answers"
    assert result.decision.expert == "backup" and result.decision.fell_back
    assert "primary failed before its first token" in result.decision.reason
    assert "fallback expert backup" in result.decision.reason
    assert engines["primary"].cancelled == 1 and len(engines["primary"].requests) == 1


@pytest.mark.parametrize("mode", ["down", "queue"])
async def test_an_expert_down_or_without_a_slot_falls_back_in_order(mode: str) -> None:
    orch, engines = orchestrator(pool(FAST), primary=mode, backup="down")
    _, _, chunks = await orch.stream(HELLO, request_id="req")
    text = "".join([c.text async for c in chunks])
    assert text == "spare answers" and chunks.decision.expert == "spare"
    # Each expert got the request once, each under a fresh id.
    assert [e.requests for e in engines.values()] == [["req"], ["req-1"], ["req-2"]]


async def test_when_every_expert_is_down_the_last_error_is_raised() -> None:
    orch, engines = orchestrator(pool(FAST), primary="hang", backup="down", spare="hang")
    t0 = time.monotonic()
    with pytest.raises(DeadlineError) as caught:
        await orch.chat(HELLO)
    assert time.monotonic() - t0 < 1.5  # two first-token deadlines of 0.2 s
    assert (caught.value.expert, caught.value.deadline) == ("spare", "first_token")
    assert engines["spare"].cancelled == 1


@pytest.mark.parametrize("mode", ["midway", "stall"])
async def test_no_fallback_once_text_reached_the_caller(mode: str) -> None:
    orch, engines = orchestrator(pool(FAST), primary=mode)
    _, _, chunks = await orch.stream(HELLO)
    got = []
    with pytest.raises(EngineError):
        async for chunk in chunks:
            got.append(chunk.text)
    assert got == ["primary"] and chunks.decision.expert == "primary"
    assert engines["backup"].requests == [] and engines["spare"].requests == []


async def test_an_expert_named_by_the_caller_has_no_fallback() -> None:
    orch, engines = orchestrator(pool(FAST), primary="down")
    with pytest.raises(EngineError, match="primary is down"):
        await orch.chat(HELLO, expert="primary")
    assert engines["backup"].requests == []


async def test_the_choices_of_one_request_fall_back_together() -> None:
    """Two choices from one plan: the first finds the primary down, the second does not try it
    again, and both report the fallback."""
    orch, engines = orchestrator(pool(FAST), primary="down")
    messages = to_messages(HELLO)
    decision, how = await orch.decide("auto", messages)
    plan = await orch.prepare(decision, messages, how=how)
    texts = []
    for i in range(2):
        _, _, chunks = await orch.stream(messages, plan=plan, request_id=f"c{i}")
        texts.append("".join([c.text async for c in chunks]))
        assert chunks.decision.expert == "backup"
    assert texts == ["backup answers"] * 2
    assert engines["primary"].requests == ["c0"] and engines["backup"].requests == ["c0-1", "c1"]
    assert plan.decision.expert == "primary" and plan.route.decision.expert == "backup"


def test_the_cli_ends_a_missed_deadline_with_one_line_and_exit_status_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from coe.cli.runtime import exit_on_error

    with pytest.raises(SystemExit) as exited, exit_on_error():
        raise DeadlineError("writer", "first_token", 5)
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err == "error: expert writer gave no first token within 5 s (first_token_s)\n"
