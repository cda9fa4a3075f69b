"""The gateway's other protocols over HTTP with their official clients, on engines that echo:
Anthropic Messages (/v1/messages), OpenAI Responses (/v1/responses) and legacy completions
(/v1/completions). The real vLLM engine behind them is in test_gateway_engine."""

from __future__ import annotations

import json
from collections.abc import Iterator

import anthropic
import httpx
import litellm
import openai
import pytest
from openai.types.responses import ResponseFunctionToolCall

from coe.gateway.responses import turns
from coe.gateway.responses_schema import ResponsesRequest
from coe.gateway.schema import ChatCompletionRequest

from .test_gateway import (
    KEY,
    LIMITED_KEY,
    OTHER_KEY,
    Running,
    assert_error,
    gateway_pool,
    scrape,
    start_gateway,
)


@pytest.fixture(scope="module")
def gw() -> Iterator[Running]:
    running, runner = start_gateway(gateway_pool())
    try:
        yield running
    finally:
        running.server.stop()
        runner.close()


def claude(gw: Running, key: str = KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.base, api_key=key, max_retries=0)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def sse_events(text: str) -> list[tuple[str, dict]]:
    """(event name, data) of a named-event stream, in order."""
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def anthropic_error(r: httpx.Response, status: int, kind: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == kind and body["error"]["message"]
    return body["error"]["message"]


# -- Anthropic Messages ---------------------------------------------------------------------------


def test_messages_create_with_the_anthropic_sdk(gw: Running) -> None:
    raw = claude(gw).messages.with_raw_response.create(
        model="auto", max_tokens=20, messages=user("write code please")
    )
    message = raw.parse()
    assert message.model == "coder" and message.role == "assistant"
    assert message.content[0].type == "text"
    assert message.content[0].text == "coder: write code please"
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.input_tokens == 3 and message.usage.output_tokens == 4
    assert message.id.startswith("msg_")
    assert raw.headers["x-coe-expert"] == "coder" and raw.headers["x-coe-category"] == "coding"


def test_messages_system_blocks_and_stop_reasons(gw: Running) -> None:
    client = claude(gw)
    # The echo engine speaks as the conversation's system prompt.
    blocks = client.messages.create(
        model="auto:coding",
        max_tokens=20,
        system=[{"type": "text", "text": "tutor"}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "explain this"}]}],
        metadata={"user_id": "u-1"},
        extra_body={"temperature": 0.0, "top_p": 0.9},  # older SDKs' parameters
    )
    assert blocks.content[0].text == "tutor: explain this"
    short = client.messages.create(model="coder", max_tokens=2, messages=user("one two three"))
    assert short.content[0].text == "coder: one" and short.stop_reason == "max_tokens"
    stopped = client.messages.create(
        model="coder", max_tokens=20, messages=user("one two three"), stop_sequences=["three"]
    )
    assert stopped.content[0].text == "coder: one two "
    assert stopped.stop_reason in ("end_turn", "stop_sequence")


def test_messages_stream_with_the_anthropic_sdk(gw: Running) -> None:
    with claude(gw).messages.stream(
        model="writer", max_tokens=20, messages=user("a poem about rain")
    ) as stream:
        deltas = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(deltas) == "writer: a poem about rain" and len(deltas) == 5
    assert final.content[0].text == "writer: a poem about rain"
    assert final.stop_reason == "end_turn" and final.model == "writer"
    assert final.usage.output_tokens == 5 and final.usage.input_tokens == 4


def test_messages_stream_events_in_anthropic_order(gw: Running) -> None:
    r = httpx.post(
        gw.base + "/v1/messages",
        json={"model": "coder", "max_tokens": 3, "messages": user("a b c d"), "stream": True},
        headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-coe-expert"] == "coder"
    events = sse_events(r.text)
    names = [name for name, _ in events]
    assert names == ["message_start", "content_block_start", "ping"] + [
        "content_block_delta"
    ] * 3 + ["content_block_stop", "message_delta", "message_stop"]
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert start["model"] == "coder" and start["content"] == [] and start["stop_reason"] is None
    assert next(d["delta"] for n, d in events if n == "content_block_delta") == {
        "type": "text_delta",
        "text": "coder:",
    }
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "max_tokens"
    assert delta["usage"] == {"input_tokens": 4, "output_tokens": 3}


def test_messages_error_after_streaming_started_is_an_error_event(gw: Running) -> None:
    r = httpx.post(
        gw.base + "/v1/messages",
        json={"model": "coder", "max_tokens": 9, "messages": user("midway"), "stream": True},
        headers={"x-api-key": KEY},
    )
    events = sse_events(r.text)
    assert events[0][0] == "message_start" and events[-1][0] == "error"
    assert events[-1][1]["error"]["type"] == "overloaded_error"
    with (
        pytest.raises(anthropic.APIError),
        claude(gw).messages.stream(model="coder", max_tokens=9, messages=user("midway")) as stream,
    ):
        list(stream.text_stream)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "auto", "messages": user("x")}, "max_tokens"),
        ({"model": "auto", "max_tokens": 5, "messages": user("x"), "top_k": 5}, "top_k"),
        ({"model": "auto", "max_tokens": 5, "messages": user("x"), "tools": [{"name": "f"}]},
         "tools.0.input_schema"),
        ({"model": "auto", "max_tokens": 5, "messages": user("x"),
          "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
        ({"model": "auto", "max_tokens": 5, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "data": "", "media_type": "x"}}]}]},
         "messages.0.content.0.type"),
        ({"model": "auto", "max_tokens": 5, "messages": user("x"), "temperature": 1.5},
         "temperature"),
        ({"model": "auto", "max_tokens": 5, "messages": user("x"), "stop_sequences": [""]},
         "stop_sequences"),
        ({"model": "auto", "max_tokens": 5, "messages": [{"role": "assistant", "content": "x"}]},
         "messages"),
    ],
)  # fmt: skip
def test_messages_refusals_are_anthropic_400s(gw: Running, body: dict, param: str) -> None:
    r = httpx.post(gw.base + "/v1/messages", json=body, headers={"x-api-key": KEY})
    message = anthropic_error(r, 400, "invalid_request_error")
    assert message.startswith(param)


def test_messages_errors_in_anthropic_shape_and_status(gw: Running) -> None:
    ok = {"model": "coder", "max_tokens": 5, "messages": user("x")}
    url = gw.base + "/v1/messages"
    anthropic_error(httpx.post(url, json=ok), 401, "authentication_error")
    anthropic_error(httpx.post(url, json=ok, headers={"x-api-key": "wrong"}), 401,
                    "authentication_error")  # fmt: skip
    with pytest.raises(anthropic.AuthenticationError):
        claude(gw, key="wrong").messages.create(**ok)
    with pytest.raises(anthropic.NotFoundError):
        claude(gw).messages.create(**{**ok, "model": "gpt-9"})
    big = {**ok, "messages": user("x" * 5000)}
    anthropic_error(httpx.post(url, json=big, headers={"x-api-key": KEY}), 413,
                    "request_too_large")  # fmt: skip
    boom = {**ok, "messages": user("boom")}
    anthropic_error(httpx.post(url, json=boom, headers={"x-api-key": KEY}), 503,
                    "overloaded_error")  # fmt: skip
    streamed = httpx.post(url, json={**boom, "stream": True}, headers={"x-api-key": KEY})
    anthropic_error(streamed, 503, "overloaded_error")
    malformed = httpx.post(
        url, content=b"{nope", headers={"x-api-key": KEY, "content-type": "application/json"}
    )
    anthropic_error(malformed, 400, "invalid_request_error")


def test_limits_hold_on_every_new_endpoint(gw: Running) -> None:
    """The limited key has 2 requests a minute, across all endpoints alike."""
    bearer = {"authorization": f"Bearer {LIMITED_KEY}"}
    assert gw.post("/v1/completions", {"model": "coder", "prompt": "x"}, key=LIMITED_KEY).is_success
    assert gw.post("/v1/responses", {"model": "coder", "input": "x"}, key=LIMITED_KEY).is_success
    r = httpx.post(gw.base + "/v1/messages", headers={"x-api-key": LIMITED_KEY},
                   json={"model": "coder", "max_tokens": 5, "messages": user("x")})  # fmt: skip
    anthropic_error(r, 429, "rate_limit_error")
    assert 1 <= int(r.headers["retry-after"]) <= 60
    with pytest.raises(anthropic.RateLimitError):
        claude(gw, LIMITED_KEY).messages.create(model="coder", max_tokens=5, messages=user("x"))
    for path, body in [
        ("/v1/responses", {"model": "coder", "input": "x"}),
        ("/v1/completions", {"model": "coder", "prompt": "x"}),
    ]:
        assert_error(httpx.post(gw.base + path, json=body, headers=bearer), 429)
        assert_error(gw.post(path, body, key=None), 401)


# -- Responses ------------------------------------------------------------------------------------

WEATHER = {"type": "object", "properties": {"echo": {"type": "string"}}, "required": ["echo"]}
FUNCTIONS = [
    {"type": "function", "name": "weather", "description": "The weather.", "parameters": WEATHER,
     "strict": True},
    {"type": "function", "name": "clock", "parameters": None, "strict": False},
]  # fmt: skip


def test_responses_create_with_the_openai_sdk(gw: Running) -> None:
    raw = gw.client().responses.with_raw_response.create(model="auto", input="write code please")
    response = raw.parse()
    assert response.output_text == "coder: write code please"
    assert response.status == "completed" and response.incomplete_details is None
    assert response.model == "coder" and response.id.startswith("resp_")
    assert response.output[0].type == "message" and response.output[0].role == "assistant"
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (3, 4)
    assert response.usage.total_tokens == 7
    assert raw.headers["x-coe-expert"] == "coder"


def test_responses_items_instructions_and_incomplete(gw: Running) -> None:
    client = gw.client()
    items = client.responses.create(
        model="coder",
        instructions="tutor",
        input=[
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        ],
        temperature=0,
        store=False,
    )
    assert items.output_text == "tutor: hi"
    cut = client.responses.create(model="coder", input="one two three", max_output_tokens=2)
    assert cut.status == "incomplete" and cut.output_text == "coder: one"
    assert cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"


def test_responses_stream_events_in_order(gw: Running) -> None:
    events = list(gw.client().responses.create(model="writer", input="a b c", stream=True))
    types = [e.type for e in events]
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 4,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == "writer: a b c"
    final = events[-1].response
    assert final.output_text == deltas and final.status == "completed"
    assert final.usage is not None and final.usage.output_tokens == 4


def test_responses_continue_a_stored_response_of_the_same_key(gw: Running) -> None:
    """The keyword router routes on the conversation's first user turn: a continued response
    goes where the first went."""
    client = gw.client()
    first = client.responses.create(model="auto", input="some code")
    assert first.model == "coder"
    follow = client.responses.create(model="auto", input="and more", previous_response_id=first.id)
    assert follow.model == "coder" and follow.output_text == "coder: and more"
    assert follow.previous_response_id == first.id
    fresh = client.responses.create(model="auto", input="and more")
    assert fresh.model == "writer"
    streamed = list(
        client.responses.create(
            model="auto", input="again", previous_response_id=follow.id, stream=True
        )
    )
    assert streamed[-1].response.model == "coder"
    # Another key, an unstored response, an unknown id: not found.
    unstored = client.responses.create(model="auto", input="some code", store=False)
    for key, previous in [(OTHER_KEY, first.id), (KEY, unstored.id), (KEY, "resp_nope")]:
        r = gw.post("/v1/responses", {"model": "auto", "input": "x",
                                      "previous_response_id": previous}, key=key)  # fmt: skip
        error = assert_error(r, 400, "previous_response_not_found")
        assert error["param"] == "previous_response_id"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "auto", "input": "x", "tools": [FUNCTIONS[0], {"type": "web_search"}]},
         "tools[1].type"),
        ({"model": "coder", "input": "x", "tools": FUNCTIONS}, "tool_choice"),  # auto: no parser
        ({"model": "auto", "input": "x", "tools": FUNCTIONS,
          "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"model": "auto", "input": "x", "tools": FUNCTIONS,
          "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        ({"model": "auto", "input": "x", "tools": [{"type": "function", "name": "a b"}]},
         "tools"),
        ({"model": "auto", "input": [{"role": "user", "content": "x"},
                                     {"type": "function_call", "call_id": "c"}]}, "input"),
        ({"model": "auto", "input": "x", "text": {"format": {"type": "json_object"}}},
         "text.format"),
        ({"model": "auto", "input": [{"type": "reasoning", "summary": []}]}, "input.0.type"),
        ({"model": "auto", "input": [{"role": "user", "content": "x"},
                                     {"type": "function_call_output", "call_id": "c", "output": [
                                         {"type": "input_image", "image_url": "http://x"}]}]},
         "input.1.output.0.type"),
        ({"model": "auto", "input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": "http://x"}]}]}, "input.0.content.0.type"),
        ({"model": "auto", "input": "x", "background": True}, "background"),
        ({"model": "auto", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "auto", "input": [{"role": "assistant", "content": "x"}]}, "input"),
        ({"model": "auto", "inputs": "x"}, "input"),
    ],
)  # fmt: skip
def test_responses_refusals_are_openai_400s(gw: Running, body: dict, param: str) -> None:
    error = assert_error(gw.post("/v1/responses", body), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_responses_tools_translate_to_chat_tools_and_back() -> None:
    """tools, tool_choice, parallel_tool_calls and the function_call items become the chat
    completions request's tools and messages (consecutive calls one assistant turn)."""
    body = ResponsesRequest.model_validate(
        {
            "model": "auto",
            "input": [
                {"role": "user", "content": "weather and time?"},
                {"type": "message", "role": "assistant", "status": "completed",
                 "content": [{"type": "output_text", "text": "checking", "annotations": []}]},
                {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "weather",
                 "arguments": '{"echo":"x"}', "status": "completed"},
                {"type": "function_call", "call_id": "c2", "name": "clock", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                {"type": "function_call_output", "call_id": "c2",
                 "output": [{"type": "input_text", "text": "noon"}]},
                {"type": "function_call", "call_id": "c3", "name": "clock", "arguments": "{}"},
            ],
            "tools": FUNCTIONS,
            "tool_choice": {"type": "function", "name": "clock"},
            "parallel_tool_calls": False,
        }
    )  # fmt: skip
    assert body.check_supported() is None
    assert body.chat_tools() == {
        "tools": [
            {"type": "function", "function": {"name": "weather", "description": "The weather.",
                                              "parameters": WEATHER, "strict": True}},
            {"type": "function", "function": {"name": "clock", "description": None,
                                              "parameters": None, "strict": False}},
        ],
        "tool_choice": {"type": "function", "function": {"name": "clock"}},
        "parallel_tool_calls": False,
    }  # fmt: skip

    def call(id: str, name: str, arguments: str) -> dict:
        return {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}

    assert turns(body) == [
        {"role": "user", "content": "weather and time?"},
        {"role": "assistant", "content": "checking",
         "tool_calls": [call("c1", "weather", '{"echo":"x"}'), call("c2", "clock", "{}")]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "noon"},
        {"role": "assistant", "content": None, "tool_calls": [call("c3", "clock", "{}")]},
    ]  # fmt: skip
    for choice in ("auto", "none", "required"):
        spec = body.model_copy(update={"tool_choice": choice}).chat_tools()
        assert spec["tool_choice"] == choice
    chat = ChatCompletionRequest.model_validate({"model": "auto", "messages": turns(body),
                                                 **body.chat_tools()})  # fmt: skip
    spec = chat.tool_spec()
    assert spec is not None and (spec.choice, spec.function, spec.parallel) == (
        "function", "clock", False)  # fmt: skip


def test_responses_function_calls_with_the_openai_sdk(gw: Running) -> None:
    client = gw.client()
    forced = client.responses.create(
        model="coder",
        input="paris",
        tools=FUNCTIONS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "name": "weather"},
    )
    assert forced.status == "completed" and len(forced.output) == 1
    call = forced.output[0]
    assert isinstance(call, ResponseFunctionToolCall)
    assert (call.name, call.call_id, call.status) == ("weather", "call_0_weather", "completed")
    assert json.loads(call.arguments) == {"echo": "paris"} and call.id and call.id.startswith("fc_")
    assert forced.output_text == ""
    assert [t.name for t in forced.tools] == ["weather", "clock"]  # type: ignore[union-attr]
    assert forced.tool_choice.name == "weather"  # type: ignore[union-attr]
    # Text first (a message item), then a function_call item per call.
    both = client.responses.create(
        model="coder", input="say hi", tools=FUNCTIONS, tool_choice="required",  # type: ignore[arg-type]
        parallel_tool_calls=True,
    )  # fmt: skip
    assert [item.type for item in both.output] == ["message", "function_call", "function_call"]
    assert both.output_text == "coder: calling" and both.parallel_tool_calls is True
    assert [c.name for c in both.output[1:]] == ["weather", "clock"]  # type: ignore[union-attr]
    # The client sends the calls back with their outputs (the SDK's own output items).
    history: list = [{"role": "user", "content": "say hi"}, *both.output]
    history.append({"type": "function_call_output", "call_id": "call_1_clock", "output": "noon"})
    answer = client.responses.create(model="coder", input=history, store=False)
    assert answer.output_text == "coder: got noon from clock"
    # previous_response_id: the stored turn keeps its calls, which the output answers.
    follow = client.responses.create(
        model="coder",
        previous_response_id=forced.id,
        input=[{"type": "function_call_output", "call_id": "call_0_weather", "output": "sunny"}],
    )
    assert follow.output_text == "coder: got sunny from weather"
    later = client.responses.create(
        model="coder",
        previous_response_id=follow.id,
        input=[{"type": "function_call_output", "call_id": "call_0_weather", "output": "rain"}],
    )
    assert later.output_text == "coder: got rain from weather"


def test_responses_stream_function_call_events_in_order(gw: Running) -> None:
    events = list(
        gw.client().responses.create(
            model="coder", input="say it", tools=FUNCTIONS, tool_choice="required",  # type: ignore[arg-type]
            stream=True,
        )
    )  # fmt: skip
    call_events = [
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * 2,
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 2,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        *call_events,
        *call_events,
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert final.status == "completed" and final.output_text == "coder: calling"
    for index, name in [(1, "weather"), (2, "clock")]:
        mine = [e for e in events if getattr(e, "output_index", None) == index]
        added, *deltas, done, item_done = mine
        assert added.item.type == "function_call" and added.item.arguments == ""
        assert added.item.status == "in_progress" and added.item.name == name
        arguments = "".join(e.delta for e in deltas)
        assert json.loads(arguments) == {"echo": "say it"} and done.arguments == arguments
        assert {e.item_id for e in [*deltas, done]} == {added.item.id}
        assert item_done.item == final.output[index] and item_done.item.status == "completed"
        assert final.output[index].arguments == arguments
    # A forced call alone: no message item at all.
    alone = list(
        gw.client().responses.create(
            model="coder", input="x", tools=FUNCTIONS, stream=True,  # type: ignore[arg-type]
            tool_choice={"type": "function", "name": "clock"},
        )
    )  # fmt: skip
    assert [e.type for e in alone] == ["response.created", "response.in_progress",
                                       *call_events, "response.completed"]  # fmt: skip
    assert alone[2].output_index == 0 and alone[-1].response.output[0].name == "clock"


def test_responses_errors(gw: Running) -> None:
    with pytest.raises(openai.NotFoundError):
        gw.client().responses.create(model="gpt-9", input="x")
    assert_error(gw.post("/v1/responses", {"model": "coder", "input": "boom"}), 503)
    failed = list(gw.client().responses.create(model="coder", input="midway", stream=True))
    assert failed[-1].type == "response.failed"
    assert failed[-1].response.error is not None
    assert failed[-1].response.error.code == "expert_unavailable"


# -- legacy completions ---------------------------------------------------------------------------


def test_completions_with_the_openai_sdk(gw: Running) -> None:
    client = gw.client()
    raw = client.completions.with_raw_response.create(model="auto", prompt="write code please")
    done = raw.parse()
    assert done.object == "text_completion" and done.model == "coder"
    assert done.choices[0].text == "coder: write code please"
    assert done.choices[0].finish_reason == "stop"
    assert done.usage is not None and done.usage.completion_tokens == 4
    assert raw.headers["x-coe-expert"] == "coder"
    many = client.completions.create(model="coder", prompt=["a b", "c"], n=2, echo=True, seed=3)
    assert [(c.index, c.text) for c in many.choices] == [
        (0, "a bcoder: a b"),
        (1, "a bcoder: a b"),
        (2, "ccoder: c"),
        (3, "ccoder: c"),
    ]
    cut = client.completions.create(model="coder", prompt="one two three", max_tokens=2,
                                    stop=["zzz"], temperature=0)  # fmt: skip
    assert cut.choices[0].text == "coder: one" and cut.choices[0].finish_reason == "length"


def test_completions_stream(gw: Running) -> None:
    chunks = list(
        gw.client().completions.create(
            model="coder",
            prompt="a b",
            stream=True,
            echo=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "a bcoder: a b"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert {c.object for c in chunks} == {"text_completion"}
    r = gw.post("/v1/completions", {"model": "coder", "prompt": "midway", "stream": True})
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "auto", "prompt": [1, 2, 3]}, "prompt"),
        ({"model": "auto", "prompt": ["a", "b"], "stream": True}, "prompt"),
        ({"model": "auto", "prompt": ["a"] * 9}, "prompt"),
        ({"model": "auto", "prompt": "x", "logprobs": 2}, "logprobs"),
        ({"model": "auto", "prompt": "x", "suffix": "end"}, "suffix"),
        ({"model": "auto", "prompt": "x", "best_of": 3}, "best_of"),
        ({"model": "auto", "prompt": "x", "presence_penalty": 1}, "presence_penalty"),
        ({"model": "auto", "prompt": "x", "n": 9}, "n"),
        ({"model": "auto"}, "prompt"),
    ],
)
def test_completions_refusals_are_400s(gw: Running, body: dict, param: str) -> None:
    assert assert_error(gw.post("/v1/completions", body), 400)["param"] == param


def test_new_endpoints_are_cached_and_counted_like_chat(gw: Running) -> None:
    body = {"model": "coder", "max_tokens": 20, "messages": user("cache this"), "temperature": 0}
    headers = {"x-api-key": KEY}
    first = httpx.post(gw.base + "/v1/messages", json=body, headers=headers)
    again = httpx.post(gw.base + "/v1/messages", json={**body, "stream": True}, headers=headers)
    assert first.headers["x-coe-cache"] == "miss" and again.headers["x-coe-cache"] == "hit"
    assert "cache this" in again.text and again.text.rstrip().endswith('{"type":"message_stop"}')
    # The same conversation asked as a chat completion is the same cached answer.
    chat_body = {k: v for k, v in body.items()}
    chat = gw.post("/v1/chat/completions", chat_body)
    assert chat.headers["x-coe-cache"] == "hit"
    samples = scrape(gw)
    for path in ("/v1/messages", "/v1/responses", "/v1/completions"):
        counted = sum(
            v for (name, labels), v in samples.items()
            if name == "coe_requests_total" and ("endpoint", path) in labels
        )  # fmt: skip
        assert counted >= 1, path


def test_litellm_as_a_client_of_every_protocol(gw: Running) -> None:
    """LiteLLM pointed at the gateway as an OpenAI, an Anthropic, a text-completion and a
    Responses provider (LITELLM_LOCAL_MODEL_COST_MAP is set in conftest: nothing downloaded)."""
    msgs = user("write code please")
    chat = litellm.completion(
        model="openai/auto", api_base=gw.base + "/v1", api_key=KEY, messages=msgs, max_tokens=8
    )
    assert chat.choices[0].message.content == "coder: write code please"
    claude_reply = litellm.completion(
        model="anthropic/auto", api_base=gw.base, api_key=KEY, messages=msgs, max_tokens=8
    )
    assert claude_reply.choices[0].message.content == "coder: write code please"
    assert claude_reply.choices[0].finish_reason == "stop"
    assert claude_reply.usage.completion_tokens == 4
    streamed = litellm.completion(
        model="anthropic/auto",
        api_base=gw.base,
        api_key=KEY,
        messages=msgs,
        max_tokens=8,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == "coder: write code please"
    text = litellm.text_completion(
        model="text-completion-openai/coder", api_base=gw.base + "/v1", api_key=KEY, prompt="a b"
    )
    assert text.choices[0].text == "coder: a b"
    answer = litellm.responses(model="openai/coder", api_base=gw.base + "/v1", api_key=KEY,
                               input="a b")  # fmt: skip
    assert answer.output[0].content[0].text == "coder: a b"
