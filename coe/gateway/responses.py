"""POST /v1/responses, the OpenAI Responses API, over the chat completions path: ``input`` (and
the conversation of ``previous_response_id``) becomes the chat messages, ``instructions`` a
system message in front (not carried to the next response, as OpenAI does), the answer one
output message; the chunks become the Responses stream events.

A stored response (``store``, the default) keeps its conversation in the store under its id,
for the gateway's session_ttl_s, owned by the client's key: another key cannot continue it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from coe.gateway.auth import Client
from coe.gateway.call import Call
from coe.gateway.errors import invalid
from coe.gateway.responses_schema import (
    ContentPartEvent,
    IncompleteDetails,
    InputMessage,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    Response,
    ResponseError,
    ResponseEvent,
    ResponsesRequest,
    ResponseUsage,
    TextDeltaEvent,
    TextDoneEvent,
)
from coe.gateway.schema import ChatCompletion, ChatCompletionChunk
from coe.gateway.translate import StreamFailed, call_for, chat_request, named_event
from coe.store import Store

ID_PREFIX = "resp_"
PARAMS = {"messages": "input", "max_tokens": "max_output_tokens"}
OUTPUT_ITEM = "response.output_item."
PART = "response.content_part."


def _text(item: InputMessage) -> str:
    if isinstance(item.content, str):
        return item.content
    return "".join(getattr(part, "text", "") for part in item.content)


def turns(body: ResponsesRequest) -> list[dict[str, str]]:
    """The request's input as chat messages. The translation point for tools: function_call
    items would become the assistant's tool_calls and function_call_output items tool
    messages, once chat completions carries them (refused before this by check_supported)."""
    if isinstance(body.input, str):
        return [{"role": "user", "content": body.input}]
    return [
        {"role": item.role, "content": _text(item)}
        for item in body.input
        if isinstance(item, InputMessage)
    ]


@dataclass
class Turn:
    """One Responses request on its way: its chat call and the conversation to keep."""

    body: ResponsesRequest
    call: Call
    conversation: list[dict[str, str]]  # without the instructions
    message_id: str = field(default_factory=lambda: "msg_" + uuid.uuid4().hex)


class ResponsesAPI:
    def __init__(self, store: Store, ttl_s: int):
        self.store = store
        self.ttl_s = ttl_s

    @staticmethod
    def _key(owner: str, response_id: str) -> str:
        digest = hashlib.sha256(f"{owner}\0{response_id}".encode()).hexdigest()
        return "responses:" + digest

    async def prepare(
        self, body: ResponsesRequest, client: Client, headers: Mapping[str, str]
    ) -> Turn:
        conversation: list[dict[str, str]] = []
        if body.previous_response_id is not None:
            raw = await self.store.get(self._key(client.subject, body.previous_response_id))
            if raw is None:
                raise invalid(
                    f"Previous response with id {body.previous_response_id!r} not found "
                    "(it was not stored, has expired, or belongs to another key)",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            conversation = json.loads(raw)["conversation"]
        conversation += turns(body)
        messages = list(conversation)
        if body.instructions:
            messages.insert(0, {"role": "system", "content": body.instructions})
        fields: dict[str, Any] = {
            "model": body.model,
            "messages": messages,
            "max_tokens": body.max_output_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "stream": body.stream,
            "user": body.user,
        }
        if body.stream:
            fields["stream_options"] = {"include_usage": True}
        call = call_for(chat_request(fields, PARAMS), client, headers, ID_PREFIX)
        return Turn(body, call, conversation)

    def response(
        self,
        turn: Turn,
        model: str,
        status: str,
        text: str | None = None,
        usage: ResponseUsage | None = None,
        error: ResponseError | None = None,
    ) -> Response:
        body = turn.body
        output = []
        if text is not None:
            done = "completed" if status == "completed" else "incomplete"
            content = [OutputText(text=text)]
            output = [OutputMessage(id=turn.message_id, status=done, content=content)]
        return Response(
            id=turn.call.id,
            created_at=turn.call.created,
            status=status,  # type: ignore[arg-type]
            model=model,
            output=output,
            usage=usage,
            incomplete_details=(
                IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None
            ),
            error=error,
            instructions=body.instructions,
            max_output_tokens=body.max_output_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            previous_response_id=body.previous_response_id,
            store=body.store,
            metadata=body.metadata or {},
            user=body.user,
        )

    async def _keep(self, turn: Turn, text: str) -> None:
        if not turn.body.store:
            return
        conversation = [*turn.conversation, {"role": "assistant", "content": text}]
        value = json.dumps({"conversation": conversation}).encode()
        await self.store.set(self._key(turn.call.client.subject, turn.call.id), value, self.ttl_s)

    async def complete(self, turn: Turn, completion: ChatCompletion) -> Response:
        choice = completion.choices[0]
        text = choice.message.content or ""
        await self._keep(turn, text)
        status = "incomplete" if choice.finish_reason == "length" else "completed"
        return self.response(turn, completion.model, status, text, _usage(completion.usage))

    async def events(
        self, turn: Turn, chunks: AsyncIterator[ChatCompletionChunk]
    ) -> AsyncIterator[str]:
        """response.created, response.in_progress, response.output_item.added,
        response.content_part.added, response.output_text.delta..., response.output_text.done,
        response.content_part.done, response.output_item.done, then response.completed (or
        response.incomplete when cut by max_output_tokens; response.failed for an error after
        the start)."""
        numbered = 0

        def event(kind: type[BaseModel], **fields: Any) -> str:
            nonlocal numbered
            payload = kind(sequence_number=numbered, **fields)
            numbered += 1
            return named_event(payload.type, payload.model_dump_json())  # type: ignore[attr-defined]

        ids = {"item_id": turn.message_id, "output_index": 0, "content_index": 0}
        model, parts, finish, usage = "", [], None, None
        try:
            async with contextlib.aclosing(chunks) as stream:  # type: ignore[type-var]
                async for chunk in stream:
                    if not model:
                        model = chunk.model
                        started = self.response(turn, model, "in_progress")
                        item = OutputMessage(id=turn.message_id, status="in_progress", content=[])
                        yield event(ResponseEvent, type="response.created", response=started)
                        yield event(ResponseEvent, type="response.in_progress", response=started)
                        yield event(
                            OutputItemEvent, type=OUTPUT_ITEM + "added", output_index=0, item=item
                        )
                        yield event(
                            ContentPartEvent, type=PART + "added", part=OutputText(text=""), **ids
                        )
                    if chunk.usage is not None:
                        usage = _usage(chunk.usage)
                    for choice in chunk.choices:
                        if choice.delta.content:
                            parts.append(choice.delta.content)
                            yield event(TextDeltaEvent, delta=choice.delta.content, **ids)
                        if choice.finish_reason is not None:
                            finish = choice.finish_reason
        except StreamFailed as exc:
            failure = ResponseError(code=exc.body.code or exc.body.type, message=exc.body.message)
            failed = self.response(turn, model, "failed", error=failure)
            yield event(ResponseEvent, type="response.failed", response=failed)
            return
        text = "".join(parts)
        status = "incomplete" if finish == "length" else "completed"
        part = OutputText(text=text)
        item = OutputMessage(id=turn.message_id, status=status, content=[part])
        yield event(TextDoneEvent, text=text, **ids)
        yield event(ContentPartEvent, type=PART + "done", part=part, **ids)
        yield event(OutputItemEvent, type=OUTPUT_ITEM + "done", output_index=0, item=item)
        await self._keep(turn, text)
        final = self.response(turn, model, status, text, usage)
        yield event(ResponseEvent, type=f"response.{status}", response=final)


def _usage(usage: Any) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )
