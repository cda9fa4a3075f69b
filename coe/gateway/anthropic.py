"""POST /v1/messages, the Anthropic Messages API, over the chat completions path: a request
becomes a chat request (the system prompt first, each turn's text blocks joined), the answer a
message, the chunks Anthropic's stream events, errors Anthropic's shape."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel

from coe.gateway.anthropic_schema import (
    AnthropicError,
    AnthropicErrorBody,
    ContentBlockDelta,
    ContentBlockStart,
    ContentBlockStop,
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


def turn(message: InputMessage) -> dict[str, str]:
    """One Anthropic turn as a chat message: its text blocks joined. The translation point for
    tools: tool_use blocks would become the assistant's tool_calls and tool_result blocks tool
    messages, once chat completions carries them (refused before this by check_supported)."""
    return {"role": message.role, "content": _text(message.content)}


def to_chat(body: MessagesRequest) -> ChatCompletionRequest:
    messages: list[dict[str, str]] = []
    system = body.system if isinstance(body.system, str) else None
    if isinstance(body.system, list):
        system = "\n".join(block.text for block in body.system)
    if system:
        messages.append({"role": "system", "content": system})
    messages += [turn(m) for m in body.messages]
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
    if body.stream:
        fields["stream_options"] = {"include_usage": True}
    return chat_request(fields, PARAMS)


def stop_reason(finish: str | None, stop_sequence: str | None = None) -> StopReason | None:
    """Anthropic's stop_reason for a chat finish_reason. The engines report a matched stop
    sequence as "stop", like an end of turn, so stop_sequence is only told when one is known."""
    if finish is None:
        return None
    if finish == "length":
        return "max_tokens"
    return "stop_sequence" if stop_sequence else "end_turn"


def message(completion: ChatCompletion) -> Message:
    choice = completion.choices[0]
    text = choice.message.content or ""
    return Message(
        id=completion.id,
        model=completion.model,
        content=[TextContent(text=text)] if text else [],
        stop_reason=stop_reason(choice.finish_reason),
        usage=MessageUsage(
            input_tokens=completion.usage.prompt_tokens,
            output_tokens=completion.usage.completion_tokens,
        ),
    )


def _event(payload: BaseModel) -> str:
    return named_event(payload.type, payload.model_dump_json())  # type: ignore[attr-defined]


async def events(message_id: str, chunks: AsyncIterator[ChatCompletionChunk]) -> AsyncIterator[str]:
    """Anthropic's stream: message_start, content_block_start, ping, content_block_delta
    (text_delta)..., content_block_stop, message_delta (stop_reason, usage), message_stop; an
    error after the start is an `error` event, the last."""
    finish: str | None = None
    usage = MessageUsage(input_tokens=0, output_tokens=0)
    started = False
    try:
        async with contextlib.aclosing(chunks) as stream:  # type: ignore[type-var]
            async for chunk in stream:
                if not started:
                    started = True
                    start = Message(
                        id=message_id, model=chunk.model, content=[], stop_reason=None, usage=usage
                    )
                    yield _event(MessageStart(message=start))
                    yield _event(ContentBlockStart(index=0, content_block=TextContent(text="")))
                    yield _event(Ping())
                if chunk.usage is not None:
                    usage = MessageUsage(
                        input_tokens=chunk.usage.prompt_tokens,
                        output_tokens=chunk.usage.completion_tokens,
                    )
                for choice in chunk.choices:
                    if choice.delta.content:
                        delta = TextDelta(text=choice.delta.content)
                        yield _event(ContentBlockDelta(index=0, delta=delta))
                    if choice.finish_reason is not None:
                        finish = choice.finish_reason
    except StreamFailed as exc:
        kind = TYPE_BY_OPENAI_TYPE.get(exc.body.type, "api_error")
        error = AnthropicError(error=AnthropicErrorBody(type=kind, message=exc.body.message))
        yield named_event("error", error.model_dump_json())
        return
    yield _event(ContentBlockStop(index=0))
    yield _event(MessageDelta(delta=StopDelta(stop_reason=stop_reason(finish)), usage=usage))
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
