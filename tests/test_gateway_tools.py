"""Tools, structured outputs and the remaining sampling parameters without an engine: request
validation, the 400s that name the field or the expert, the cache key, the Ray wire format,
tool-result routing, the remote forwarding and the in-process engine's tool shaping."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from pydantic import ValidationError

from coe.cluster.replica import (
    chunk_from_wire,
    chunk_to_wire,
    prompt_from_wire,
    prompt_to_wire,
    sampling_from_wire,
    sampling_to_wire,
)
from coe.config import ResponseCacheSettings, parse_config
from coe.engines.remote import _openai_extras
from coe.engines.tools import as_text, guided_json
from coe.engines.vllm_local import _ToolShaper
from coe.gateway.auth import Client, RateLimits
from coe.gateway.call import Call
from coe.gateway.response_cache import Answer, ResponseCache
from coe.gateway.schema import ChatCompletionRequest
from coe.orchestrator import Orchestrator
from coe.orchestrator.prompting import ToolsUnsupportedError, build_prompt, check_tools
from coe.store import MemoryStore
from coe.types import (
    Chunk,
    Message,
    Prompt,
    ResponseFormat,
    RouteDecision,
    SamplingParams,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
    Usage,
)

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": WEATHER}}]
ASK = [{"role": "user", "content": "weather in Paris?"}]


def request(**extra: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "auto", "messages": ASK, **extra})


def pool(**tool_expert: object) -> object:
    base = {"model": "/nonexistent"}
    remote = {"engine": "remote", "remote": {"base_url": "http://x/v1", "model": "m"}}
    experts = [
        {"name": "plain", **base},
        {"name": "caller", **base, "tool_parser": "pythonic", **tool_expert},
        {"name": "far", **remote},
        {"name": "farqa", "prompt_format": "qa", **remote},
    ]
    data = {"experts": experts, "categories": [{"name": "general", "expert": "plain"}]}
    return parse_config(data, "experts.yaml")


# -- the request schema ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
         "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "custom", "function": {"name": "f"}}]}, "tools"),
        ({"tools": TOOLS * 2}, "tools"),
        ({"response_format": {"type": "json_schema"}}, "json_schema"),
        ({"messages": [*ASK, {"role": "tool", "content": "r"}]}, "tool_call_id"),
    ],
)  # fmt: skip
def test_tool_and_format_fields_are_validated(extra: dict, where: str) -> None:
    with pytest.raises(ValidationError, match=where):
        request(**extra)


def test_what_coe_cannot_honour_is_named() -> None:
    assert request(top_logprobs=2).check_supported()[0] == "top_logprobs"
    assert request(logit_bias={"x": 1}).check_supported()[0] == "logit_bias"
    assert request(logit_bias={"5": 300}).check_supported()[0] == "logit_bias"
    both = request(tools=TOOLS, response_format={"type": "json_object"})
    assert both.check_supported()[0] == "response_format"
    fine = request(
        tools=TOOLS, tool_choice="required", logprobs=True, top_logprobs=2, presence_penalty=1,
        frequency_penalty=-1, logit_bias={"5": -100}, user="u", stop=["a", "b"],
    )  # fmt: skip
    assert fine.check_supported() is None
    sampling = fine.sampling()
    assert sampling["logprobs"] == 2 and sampling["logit_bias"] == {5: -100}
    assert sampling["presence_penalty"] == 1 and sampling["stop"] == ["a", "b"]
    spec = fine.tool_spec()
    assert spec is not None and spec.choice == "required" and spec.tools[0].schema() == WEATHER


def test_history_with_calls_and_results_becomes_messages() -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}  # fmt: skip
    req = request(
        messages=[*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
    )  # fmt: skip
    _, turn, result = req.to_messages()
    assert turn.tool_calls == (ToolCall("call_1", "weather", '{"city": "Paris"}'),)
    assert result.role == "tool" and result.tool_call_id == "call_1"
    # Templates and transcripts without a tool role get them as plain turns.
    plain = as_text([turn, result])
    assert [m.role for m in plain] == ["assistant", "user"] and "sunny" in plain[1].content


# -- which experts can call tools ------------------------------------------------------------


def test_only_experts_that_can_honour_the_tool_choice_get_the_request() -> None:
    config = pool()
    auto = ToolSpec((Tool("weather"),), "auto")
    with pytest.raises(ToolsUnsupportedError, match="expert plain has no tool_parser") as caught:
        check_tools(config.expert("plain"), auto)
    assert caught.value.param == "tool_choice"
    check_tools(config.expert("caller"), auto)
    for forced in (replace(auto, choice="required"), replace(auto, choice="function")):
        check_tools(config.expert("plain"), forced)  # guided decoding, any model
    check_tools(config.expert("far"), auto)  # forwarded to the server
    with pytest.raises(ToolsUnsupportedError, match="expert farqa cannot call tools"):
        check_tools(config.expert("farqa"), replace(auto, choice="required"))
    prompt = build_prompt(config.expert("caller"), [Message("user", "hi")], tools=auto)
    assert prompt.tools is not None and prompt.tools.parser == "pythonic"


async def test_a_tool_result_goes_back_to_the_expert_that_made_the_call() -> None:
    orch = Orchestrator(pool(), store=MemoryStore())
    asked = [Message("user", "weather in Paris?")]
    call = ToolCall("call_1", "weather", '{"city": "Paris"}')
    decision = RouteDecision("caller", None, None, False, "test")
    await orch.remember(asked, decision, [Message("assistant", "", (call,))], owner="k")
    follow = [*asked, Message("assistant", "", (call,)), Message("tool", "sunny", (), "call_1")]
    chosen, how = await orch.decide("auto", follow, owner="k")
    assert (chosen.expert, how) == ("caller", "session")
    # Another client's identical conversation is its own.
    assert (await orch.decide("auto", follow, owner="other"))[0].expert == "plain"


# -- the response cache ----------------------------------------------------------------------


def test_the_cache_key_covers_tools_formats_and_logprobs() -> None:
    cache = ResponseCache(MemoryStore(), ResponseCacheSettings(), pool(), "p")
    client = Client("key:t", RateLimits())

    def key(**extra: object) -> str:
        return cache.key(Call(request(**extra), client))

    keys = [
        key(),
        key(tools=TOOLS),
        key(tools=TOOLS, tool_choice="required"),
        key(tools=TOOLS, parallel_tool_calls=False),
        key(response_format={"type": "json_object"}),
        key(logprobs=True),
        key(logprobs=True, top_logprobs=2),
        key(logit_bias={"5": 1}),
        key(presence_penalty=1),
    ]
    assert len(set(keys)) == len(keys)
    assert key(tools=TOOLS) == key(tools=TOOLS)


def test_a_cached_answer_keeps_its_calls_and_logprobs() -> None:
    decision = RouteDecision("plain", None, None, False, "test")
    answer = Answer(
        decision, [""], ["tool_calls"], Usage(3, 4), "miss",
        tool_calls=[[ToolCall("call_1", "weather", "{}")]],
        logprobs=[[TokenLogprob("a", -0.5, [("a", -0.5), ("b", -1.0)])]],
    )  # fmt: skip
    back = Answer.from_json(answer.to_json())
    assert back.tool_calls == answer.tool_calls and back.logprobs == answer.logprobs
    assert back.turns() == [Message("assistant", "", (ToolCall("call_1", "weather", "{}"),))]


# -- the Ray wire format ---------------------------------------------------------------------


def test_the_wire_carries_tools_calls_formats_and_logprobs() -> None:
    spec = ToolSpec((Tool("weather", "w", json.dumps(WEATHER)),), "function", "weather", False)
    call = ToolCall("call_1", "weather", '{"city": "P"}')
    prompt = Prompt(
        (Message("user", "q"), Message("assistant", "", (call,)), Message("tool", "r", (), "c")),
        "chat",
        spec,
    )
    assert prompt_from_wire(json.loads(json.dumps(prompt_to_wire(prompt)))) == prompt
    sampling = SamplingParams(
        presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((5, -100.0),), logprobs=2,
        response_format=ResponseFormat("json_schema", json.dumps(WEATHER), "w", True),
        stop=("x",),
    )  # fmt: skip
    wire = json.loads(json.dumps(sampling_to_wire(sampling)))
    assert sampling_from_wire(wire) == sampling
    chunk = Chunk(
        "t", "stop", Usage(1, 2), [ToolCallDelta(0, "call_1", "weather", "{")],
        [TokenLogprob("t", -0.1, [("t", -0.1)])],
    )  # fmt: skip
    assert chunk_from_wire(json.loads(json.dumps(chunk_to_wire(chunk)))) == chunk
    assert chunk_from_wire({"text": "old"}) == Chunk("old")


# -- engines ---------------------------------------------------------------------------------


def test_the_remote_engine_forwards_everything_in_openai_shapes() -> None:
    spec = ToolSpec((Tool("weather", "", json.dumps(WEATHER)),), "function", "weather", False)
    sampling = SamplingParams(
        presence_penalty=0.5, logit_bias=((5, -1.0),), logprobs=2,
        response_format=ResponseFormat("json_object"),
    )  # fmt: skip
    extras = _openai_extras(Prompt((Message("user", "q"),), "chat", spec), sampling)
    assert extras["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert extras["tools"][0]["function"]["parameters"] == WEATHER
    assert extras["parallel_tool_calls"] is False
    assert extras["logit_bias"] == {"5": -1.0} and extras["top_logprobs"] == 2
    assert extras["response_format"] == {"type": "json_object"}
    assert _openai_extras(Prompt((Message("user", "q"),)), SamplingParams()) == {}


def test_guided_decoding_follows_the_tool_choice_or_the_format() -> None:
    spec = ToolSpec((Tool("weather", "", json.dumps(WEATHER)), Tool("time")), "function", "weather")
    assert guided_json(spec, None) == WEATHER
    required = guided_json(replace(spec, choice="required", parallel=False), None)
    assert required["type"] == "array" and required["maxItems"] == 1
    assert guided_json(replace(spec, choice="auto"), None) is None
    assert guided_json(None, ResponseFormat("json_object")) is True
    assert guided_json(None, ResponseFormat("json_schema", json.dumps(WEATHER))) == WEATHER


def test_the_engine_turns_text_into_calls() -> None:
    spec = ToolSpec((Tool("weather", "", json.dumps(WEATHER)), Tool("time")), "function", "weather")
    forced = _ToolShaper(spec, None)
    first, second = forced.piece('{"city"'), forced.piece(': "P"}')
    assert first.tool_calls[0].name == "weather" and first.tool_calls[0].id
    assert second.tool_calls[0].id is None and second.tool_calls[0].arguments == ': "P"}'
    assert forced.finish("", "stop") == [] and forced.finish_reason == "stop"

    required = _ToolShaper(replace(spec, choice="required"), None)
    assert required.piece('[{"name": "time", "parameters": {}}]') is None
    [chunk] = required.finish("", "stop")
    assert chunk.tool_calls[0].name == "time" and required.finish_reason == "tool_calls"

    from vllm.tool_parsers import ToolParserManager

    parser = ToolParserManager.get_tool_parser("pythonic")(None)
    auto = _ToolShaper(replace(spec, choice="auto", parser="pythonic"), parser)
    assert auto.piece('[weather(city="Paris")]') is None
    [chunk] = auto.finish("", "stop")
    assert json.loads(chunk.tool_calls[0].arguments) == {"city": "Paris"}
    assert auto.finish_reason == "tool_calls"
    prose = _ToolShaper(replace(spec, choice="auto", parser="pythonic"), parser)
    assert prose.finish("It is sunny.", "stop")[0].text == "It is sunny."
    assert prose.finish_reason == "stop"
    # An answer cut by max_tokens is text, with reason "length", never a call.
    cut = _ToolShaper(replace(spec, choice="auto"), parser)
    assert cut.finish('[weather(city="Pa', "length")[0].text.startswith("[weather")
    assert cut.finish_reason == "length"
