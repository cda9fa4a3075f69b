"""Tools, structured outputs and log probabilities on the real engine (gemma-3-270m, a base
model), through an in-process gateway and the official openai client: forced tool calls and
json_schema answers come from guided decoding, so even this model's answers must validate."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from .conftest import in_process_gateway, pool_dict

pytestmark = pytest.mark.engine

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather forecast for a city.",
            "parameters": WEATHER,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "maxLength": 12}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "admin": {"type": "boolean"},
    },
    "required": ["name", "age", "admin"],
    "additionalProperties": False,
}
PERSON_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": PERSON, "strict": True},
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris this week?"}]
ASK_PERSON = [{"role": "user", "content": "Describe a user of the system as JSON."}]
NO_CACHE = {"x-coe-cache-control": "no-cache"}


@pytest.fixture(scope="module")
def base_url(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An in-process gateway on one real engine shared by both experts (`qa`, `chatty`)."""
    from coe.config import parse_config

    config = parse_config(pool_dict(), tmp_path_factory.mktemp("tools") / "experts.yaml")
    with in_process_gateway(config) as (url, _, _):
        yield url + "/v1"


def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)


def test_a_named_tool_choice_gives_a_call_that_follows_the_schema(base_url: str) -> None:
    answer = client(base_url).chat.completions.create(
        model="chatty", messages=ASK_WEATHER, tools=TOOLS, tool_choice=NAMED,
        max_tokens=48, temperature=0.0, extra_headers=NO_CACHE,
    )  # fmt: skip
    choice = answer.choices[0]
    assert choice.finish_reason == "stop"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)

    # Streamed: the deltas reassemble to the same call.
    stream = client(base_url).chat.completions.create(
        model="chatty", messages=ASK_WEATHER, tools=TOOLS, tool_choice=NAMED,
        max_tokens=48, temperature=0.0, stream=True, extra_headers=NO_CACHE,
    )  # fmt: skip
    name, arguments, ids, finish = None, "", [], None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for piece in delta.tool_calls or ():
            assert piece.index == 0
            ids += [piece.id] if piece.id else []
            name = piece.function.name or name
            arguments += piece.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert len(ids) == 1 and name == "get_weather" and finish == "stop"
    assert arguments == call.function.arguments

    # The tool's result goes back in the history, after the assistant turn with the call.
    history = [
        *ASK_WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny, 21 C"}'},
    ]
    done = client(base_url).chat.completions.create(
        model="chatty", messages=history, tools=TOOLS, tool_choice="none", max_tokens=16
    )
    assert done.choices[0].message.content and not done.choices[0].message.tool_calls


def test_required_over_several_functions_calls_one_of_them(base_url: str) -> None:
    answer = client(base_url).chat.completions.create(
        model="qa", messages=ASK_WEATHER, tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False, max_tokens=64, temperature=0.0,
    )  # fmt: skip
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    jsonschema.validate(json.loads(call.function.arguments), schema[call.function.name])


def test_json_schema_answers_validate_and_a_cut_one_says_length(base_url: str) -> None:
    answer = client(base_url).chat.completions.create(
        model="chatty", messages=ASK_PERSON, response_format=PERSON_FORMAT,
        max_tokens=64, temperature=0.0,
    )  # fmt: skip
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), PERSON)
    cut = client(base_url).chat.completions.create(
        model="chatty", messages=ASK_PERSON, response_format=PERSON_FORMAT,
        max_tokens=3, temperature=0.0,
    )  # fmt: skip
    assert cut.choices[0].finish_reason == "length"
    anything = client(base_url).chat.completions.create(
        model="chatty", messages=ASK_PERSON, response_format={"type": "json_object"},
        max_tokens=64, temperature=0.0,
    )  # fmt: skip
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(anything.choices[0].message.content), dict)


def test_logprobs_penalties_and_logit_bias(base_url: str) -> None:
    answer = client(base_url).chat.completions.create(
        model="qa", messages=[{"role": "user", "content": "Count: 1, 2, 3,"}],
        max_tokens=6, temperature=0.0, logprobs=True, top_logprobs=2,
        presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"2": -100}, user="tester",
    )  # fmt: skip
    content = answer.choices[0].logprobs.content
    assert content and len(content) == answer.usage.completion_tokens
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 2
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob
    stream = client(base_url).chat.completions.create(
        model="qa", messages=[{"role": "user", "content": "Count: 1, 2, 3,"}],
        max_tokens=6, temperature=0.0, logprobs=True, top_logprobs=1, stream=True,
        extra_headers=NO_CACHE,
    )  # fmt: skip
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]  # fmt: skip
    assert [t.token for t in streamed] == [t.token for t in content]


async def _validity(base_url: str, seeds: range, **request: Any) -> tuple[int, float]:
    """How many of the seeded requests' answers validate, and the seconds they took."""
    aclient = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
    limit = asyncio.Semaphore(8)

    async def one(seed: int) -> Any:
        async with limit:
            return await aclient.chat.completions.create(
                seed=seed, temperature=1.0, extra_headers=NO_CACHE, **request
            )

    t0 = time.monotonic()
    try:
        answers = await asyncio.gather(*(one(s) for s in seeds))
    finally:
        await aclient.close()
    return sum(_valid(a, request) for a in answers), time.monotonic() - t0


def _valid(answer: Any, request: dict[str, Any]) -> bool:
    choice = answer.choices[0]
    try:
        if "tools" in request:
            [call] = choice.message.tool_calls
            jsonschema.validate(json.loads(call.function.arguments), WEATHER)
        else:
            jsonschema.validate(json.loads(choice.message.content), PERSON)
    except (ValueError, TypeError, jsonschema.ValidationError):
        return False
    return choice.finish_reason == "stop"


def test_fifty_seeded_forced_calls_and_json_schema_answers_all_validate(base_url: str) -> None:
    seeds = range(50)
    forced = {"messages": ASK_WEATHER, "tools": TOOLS, "tool_choice": NAMED, "max_tokens": 48}
    calls, calls_s = asyncio.run(_validity(base_url, seeds, model="chatty", **forced))
    shaped = {"messages": ASK_PERSON, "response_format": PERSON_FORMAT, "max_tokens": 64}
    answers, answers_s = asyncio.run(_validity(base_url, seeds, model="chatty", **shaped))
    print(f"forced tool calls valid {calls}/50 in {calls_s:.1f} s; "
          f"json_schema answers valid {answers}/50 in {answers_s:.1f} s")  # fmt: skip
    assert (calls, answers) == (50, 50)


def test_the_anthropic_sdk_forces_a_tool_and_sends_its_result_back(base_url: str) -> None:
    import anthropic

    claude = anthropic.Anthropic(
        base_url=base_url.removesuffix("/v1"), api_key="unused", max_retries=0
    )
    weather = {"name": "get_weather", "description": "A forecast.", "input_schema": WEATHER}
    ask = {
        "model": "chatty",
        "max_tokens": 48,
        "messages": ASK_WEATHER,
        "tools": [weather],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        # Greedy, so the streamed call equals the other (this SDK has no temperature argument).
        "extra_body": {"temperature": 0.0},
        "extra_headers": NO_CACHE,
    }
    message = claude.messages.create(**ask)
    assert message.stop_reason == "tool_use"
    [use] = [b for b in message.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id
    jsonschema.validate(use.input, WEATHER)

    # Streamed: input_json_delta pieces assemble into the same input.
    with claude.messages.stream(**ask) as stream:
        final = stream.get_final_message()
    [streamed] = [b for b in final.content if b.type == "tool_use"]
    assert streamed.input == use.input and final.stop_reason == "tool_use"

    # The result goes back as a tool_result block; the expert answers in text.
    follow = claude.messages.create(
        model="chatty",
        max_tokens=16,
        messages=[
            *ASK_WEATHER,
            {"role": "assistant", "content": [use.model_dump()]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21 C"}]},
        ],
        tools=[weather],
        tool_choice={"type": "none"},  # auto would need a tool_parser on the expert
    )  # fmt: skip
    assert follow.content and follow.content[0].type == "text" and follow.content[0].text
