"""POST /v1/messages, the Anthropic Messages API, over the chat completions path: a request
becomes a chat request (the system prompt first, each turn's text blocks joined), the answer a
message, the chunks Anthropic's stream events, errors Anthropic's shape."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel

from coe.gateway.anthropic_schema import (
    AnthropicError,
    AnthropicErrorBody,
    ContentBlockDelta,
    ContentBlockStart,
    ContentBlockStop,
    InputJsonDelta,
    InputMessage,
    Message,
    MessageDelta,
    MessagesRequest,
    MessageStart,
    MessageStop,
    MessageUsage,
    Ping,
    StopDelta,
    StopReason,
    TextBlock,
    TextContent,
    TextDelta,
    ToolChoice,
    ToolDef,
    ToolResultBlock,
    ToolUseBlock,
    ToolUseContent,
)
from coe.gateway.schema import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest
from coe.gateway.translate import StreamFailed, chat_request, named_event

ID_PREFIX = "msg_"
# Where a chat field's error is reported, in this API's names.
PARAMS = {"stop": "stop_sequences", "max_tokens": "max_tokens", "messages": "messages"}

# An error's Anthropic type, by HTTP status (a whole answer) or by OpenAI type (mid-stream).
TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}
TYPE_BY_OPENAI_TYPE = {
    "invalid_request_error": "invalid_request_error",
    "rate_limit_error": "rate_limit_error",
    "service_unavailable_error": "overloaded_error",
    "timeout_error": "timeout_error",
}


def _text(content: str | list[Any]) -> str:
    if isinstance(content, str):
        return content
    return "".join(block.text for block in content if isinstance(block, TextBlock))


def turn(message: InputMessage) -> list[dict[str, Any]]:
    """One Anthropic turn as chat messages. An assistant turn's tool_use blocks become its
    tool_calls; a user turn's tool_result blocks become tool messages (before its own text, which
    follows the results it comments on)."""
    text = _text(message.content)
    blocks = [] if isinstance(message.content, str) else message.content
    if message.role == "assistant":
        calls = [
            {"id": b.id, "type": "function",
             "function": {"name": b.name, "arguments": json.dumps(b.input)}}
            for b in blocks
            if isinstance(b, ToolUseBlock)
        ]  # fmt: skip
        return [
            {
                "role": "assistant",
                "content": text or None,
                **({"tool_calls": calls} if calls else {}),
            }
        ]
    out: list[dict[str, Any]] = [
        {"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text()}
        for b in blocks
        if isinstance(b, ToolResultBlock)
    ]
    if text or not out:
        out.append({"role": "user", "content": text})
    return out


def chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Anthropic tool definitions as chat completions' function tools."""
    out = []
    for raw in tools:
        tool = ToolDef.model_validate(raw)
        function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
        if tool.description:
            function["description"] = tool.description
        out.append({"type": "function", "function": function})
    return out


def chat_tool_choice(choice: ToolChoice) -> str | dict[str, Any]:
    """auto -> auto, any -> required, tool -> that function, none -> none."""
    if choice.type == "tool":
        return {"type": "function", "function": {"name": choice.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


def to_chat(body: MessagesRequest) -> ChatCompletionRequest:
    messages: list[dict[str, Any]] = []
    system = body.system if isinstance(body.system, str) else None
    if isinstance(body.system, list):
        system = "\n".join(block.text for block in body.system)
    if system:
        messages.append({"role": "system", "content": system})
    for m in body.messages:
        messages += turn(m)
    fields: dict[str, Any] = {
        "model": body.model,
        "messages": messages,
        "max_tokens": body.max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "stop": body.stop_sequences or None,
        "stream": body.stream,
        "user": body.metadata.user_id if body.metadata else None,
    }
    if body.tools:
        fields["tools"] = chat_tools(body.tools)
    if body.tool_choice is not None:
        fields["tool_choice"] = chat_tool_choice(body.tool_choice)
        if body.tool_choice.disable_parallel_tool_use:
            fields["parallel_tool_calls"] = False
    if body.stream:
        fields["stream_options"] = {"include_usage": True}
    return chat_request(fields, PARAMS)


def stop_reason(
    finish: str | None, stop_sequence: str | None = None, called: bool = False
) -> StopReason | None:
    """Anthropic's stop_reason for a chat finish_reason. The engines report a matched stop
    sequence as "stop", like an end of turn, so stop_sequence is only told when one is known."""
    if finish is None:
        return None
    if finish == "length":
        return "max_tokens"
    # OpenAI says "stop" after a forced call and "tool_calls" after one the model chose:
    # Anthropic says tool_use for both.
    if finish == "tool_calls" or called:
        return "tool_use"
    return "stop_sequence" if stop_sequence else "end_turn"


def message(completion: ChatCompletion) -> Message:
    choice = completion.choices[0]
    text = choice.message.content or ""
    content: list[TextContent | ToolUseContent] = [TextContent(text=text)] if text else []
    for call in choice.message.tool_calls or []:
        content.append(
            ToolUseContent(
                id=call.id, name=call.function.name, input=json.loads(call.function.arguments)
            )
        )
    return Message(
        id=completion.id,
        model=completion.model,
        content=content,
        stop_reason=stop_reason(choice.finish_reason, called=bool(choice.message.tool_calls)),
        usage=MessageUsage(
            input_tokens=completion.usage.prompt_tokens,
            output_tokens=completion.usage.completion_tokens,
        ),
    )


def _event(payload: BaseModel) -> str:
    return named_event(payload.type, payload.model_dump_json())  # type: ignore[attr-defined]


class Blocks:
    """The content blocks of a streamed message: one open at a time, numbered in order. Text
    deltas go to a text block, a tool call's pieces to a tool_use block of its own."""

    def __init__(self) -> None:
        self.count = 0
        self.open: tuple[str, int] | None = None  # ("text", -1) or ("tool", chat call index)
        self.called = False  # a tool_use block was opened

    def switch(self, kind: tuple[str, int], block: TextContent | ToolUseContent) -> list[str]:
        events = self.close()
        self.open = kind
        events.append(_event(ContentBlockStart(index=self.count, content_block=block)))
        return events

    def close(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        self.count += 1
        return [_event(ContentBlockStop(index=self.count - 1))]

    def text(self, text: str) -> list[str]:
        events = (
            [] if self.open == ("text", -1) else self.switch(("text", -1), TextContent(text=""))
        )
        return [*events, _event(ContentBlockDelta(index=self.count, delta=TextDelta(text=text)))]

    def tool(self, index: int, call_id: str | None, name: str | None, arguments: str) -> list[str]:
        events: list[str] = []
        if self.open != ("tool", index):
            block = ToolUseContent(id=call_id or "", name=name or "", input={})
            events = self.switch(("tool", index), block)
            self.called = True
        if arguments:
            delta = InputJsonDelta(partial_json=arguments)
            events.append(_event(ContentBlockDelta(index=self.count, delta=delta)))
        return events


async def events(message_id: str, chunks: AsyncIterator[ChatCompletionChunk]) -> AsyncIterator[str]:
    """Anthropic's stream: message_start, then per content block content_block_start (a ping
    after the first),
    content_block_delta (text_delta, or input_json_delta for a tool_use block)...,
    content_block_stop; then message_delta (stop_reason, usage), message_stop. An error after
    the start is an `error` event, the last."""
    finish: str | None = None
    usage = MessageUsage(input_tokens=0, output_tokens=0)
    started = False
    blocks = Blocks()
    pinged = False
    try:
        async with contextlib.aclosing(chunks) as stream:  # type: ignore[type-var]
            async for chunk in stream:
                if not started:
                    started = True
                    start = Message(
                        id=message_id, model=chunk.model, content=[], stop_reason=None, usage=usage
                    )
                    yield _event(MessageStart(message=start))
                if chunk.usage is not None:
                    usage = MessageUsage(
                        input_tokens=chunk.usage.prompt_tokens,
                        output_tokens=chunk.usage.completion_tokens,
                    )
                for choice in chunk.choices:
                    out: list[str] = []
                    if choice.delta.content:
                        out += blocks.text(choice.delta.content)
                    for call in choice.delta.tool_calls or []:
                        fn = call.function
                        out += blocks.tool(call.index, call.id, fn.name, fn.arguments or "")
                    if out and not pinged:  # as Anthropic does: a ping after the first block opens
                        pinged = True
                        out.insert(1, _event(Ping()))
                    for event in out:
                        yield event
                    if choice.finish_reason is not None:
                        finish = choice.finish_reason
    except StreamFailed as exc:
        kind = TYPE_BY_OPENAI_TYPE.get(exc.body.type, "api_error")
        error = AnthropicError(error=AnthropicErrorBody(type=kind, message=exc.body.message))
        yield named_event("error", error.model_dump_json())
        return
    if blocks.count == 0 and blocks.open is None:  # an empty answer is still one text block
        for event in blocks.switch(("text", -1), TextContent(text="")):
            yield event
    for event in blocks.close():
        yield event
    reason = stop_reason(finish, called=blocks.called)
    yield _event(MessageDelta(delta=StopDelta(stop_reason=reason), usage=usage))
    yield _event(MessageStop())


def error(status: int, body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI-shaped error body (whatever raised it: keys, limits, validation, the service)
    in Anthropic's shape, for the same status; the message starts with the param it names."""
    openai_error = body.get("error") if isinstance(body.get("error"), dict) else {}
    kind = TYPE_BY_STATUS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    message = str(openai_error.get("message") or "request failed")
    param = openai_error.get("param")
    if param and not message.startswith(str(param)):  # Anthropic's shape has no param field
        message = f"{param}: {message}"
    return AnthropicError(error=AnthropicErrorBody(type=kind, message=message)).model_dump()
