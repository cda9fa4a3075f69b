"""What the other protocols' front ends share (Anthropic Messages in anthropic.py, Responses in
responses.py, legacy completions in completions.py): each turns its request into a chat
completions request and goes through ChatService like /v1/chat/completions (routing, the
response cache, rate limits, token accounting, sessions), then turns the answer back into its
own shapes."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from pydantic import ValidationError

from coe.gateway import sse
from coe.gateway.auth import Client
from coe.gateway.call import CACHE_CONTROL_HEADER, SESSION_HEADER, Call
from coe.gateway.errors import invalid
from coe.gateway.schema import ChatCompletionChunk, ChatCompletionRequest, ErrorBody, ErrorResponse
from coe.gateway.service import ChatService


def chat_request(fields: dict[str, Any], params: Mapping[str, str]) -> ChatCompletionRequest:
    """The chat completions request for a translated one; a 400 (naming the caller's field, by
    ``params``: chat field -> the protocol's) when it is not valid as one."""
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        loc = [str(p) for p in first.get("loc", ())]
        head = message.split(":")[0]
        if not loc and head in fields:  # a whole-request check names the field first
            loc = [head]
        param = params.get(loc[0], loc[0]) if loc else None
        for chat, own in params.items():
            message = message.replace(f"{chat}:", f"{own}:")
        raise invalid(message, param=param) from None


def call_for(
    request: ChatCompletionRequest, client: Client, headers: Mapping[str, str], id_prefix: str
) -> Call:
    """The Call (with the x-coe-session and x-coe-cache-control headers) under an id of the
    protocol's own kind (msg_, resp_, cmpl-)."""
    return Call(
        request,
        client,
        session=headers.get(SESSION_HEADER),
        cache_control=headers.get(CACHE_CONTROL_HEADER),
        id=id_prefix + uuid.uuid4().hex,
    )


def named_event(name: str, data: str) -> str:
    """A server-sent event with an event name (Anthropic's and the Responses API's framing)."""
    return f"event: {name}\ndata: {data}\n\n"


STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class StreamFailed(Exception):
    """An error event: the stream failed after it began. ``body`` is what the client is told."""

    def __init__(self, body: ErrorBody):
        super().__init__(body.message)
        self.body = body


async def chunks(
    service: ChatService, call: Call
) -> tuple[dict[str, str], AsyncIterator[ChatCompletionChunk]]:
    """ChatService.stream as typed chunks, for the other protocols' framings: the same cache,
    sessions, accounting, headers and errors before the first chunk (APIError). The chunks are
    read back from the OpenAI events, so that whatever chat streaming learns reaches them too;
    an error event (after the start) raises StreamFailed."""
    headers, events = await service.stream(call)
    return headers, _decode(events)


async def _decode(events: AsyncIterator[str]) -> AsyncIterator[ChatCompletionChunk]:
    async with contextlib.aclosing(events) as framed:  # type: ignore[type-var]
        async for framed_event in framed:
            data = framed_event.removeprefix("data: ").rstrip("\n")
            if data == sse.DONE:
                return
            raw = json.loads(data)
            if "error" in raw:
                raise StreamFailed(ErrorResponse.model_validate(raw).error)
            yield ChatCompletionChunk.model_validate(raw)
