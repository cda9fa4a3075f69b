"""POST /v1/responses, the OpenAI Responses API, over the chat completions path: ``input`` (and
the conversation of ``previous_response_id``) becomes the chat messages, ``instructions`` a
system message in front (not carried to the next response, as OpenAI does), the answer one
output message; the chunks become the Responses stream events. Function tools are chat
completions tools: function_call items are the assistant's tool_calls, function_call_output
items tool messages, and each call the expert makes a function_call output item.

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
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    FunctionCallItem,
    FunctionCallOut,
    FunctionCallOutputItem,
    FunctionTool,
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
from coe.gateway.schema import ChatCompletion, ChatCompletionChunk, ToolCallOut
from coe.gateway.translate import StreamFailed, call_for, chat_request, named_event
from coe.store import Store

ID_PREFIX = "resp_"
PARAMS = {"messages": "input", "max_tokens": "max_output_tokens"}
OUTPUT_ITEM = "response.output_item."
PART = "response.content_part."


def _text(parts: str | list[Any]) -> str:
    if isinstance(parts, str):
        return parts
    return "".join(getattr(part, "text", "") for part in parts)


def turns(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as chat messages: function_call items become the assistant's
    tool_calls (consecutive ones, and those right after an assistant message, one assistant
    turn, as the response gave them), function_call_output items tool messages."""
    if isinstance(body.input, str):
        return [{"role": "user", "content": body.input}]
    out: list[dict[str, Any]] = []
    for item in body.input:
        if isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            result = _text(item.output)
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": result})
        elif isinstance(item, InputMessage):
            out.append({"role": item.role, "content": _text(item.content)})
    return out


def _assistant(text: str, calls: list[ToolCallOut]) -> dict[str, Any]:
    """The answer as a chat message, to keep in the conversation."""
    if not calls:
        return {"role": "assistant", "content": text}
    return {
        "role": "assistant",
        "content": text or None,
        "tool_calls": [c.model_dump() for c in calls],
    }


def _item_id() -> str:
    return "fc_" + uuid.uuid4().hex


@dataclass
class Turn:
    """One Responses request on its way: its chat call and the conversation to keep."""

    body: ResponsesRequest
    call: Call
    conversation: list[dict[str, Any]]  # without the instructions
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
        conversation: list[dict[str, Any]] = []
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
            **body.chat_tools(),
        }
        if body.stream:
            fields["stream_options"] = {"include_usage": True}
        call = call_for(chat_request(fields, PARAMS), client, headers, ID_PREFIX)
        return Turn(body, call, conversation)

    def message(self, turn: Turn, text: str, status: str) -> OutputMessage:
        done = "in_progress" if status == "in_progress" else _item_status(status)
        return OutputMessage(id=turn.message_id, status=done, content=[OutputText(text=text)])

    def response(
        self,
        turn: Turn,
        model: str,
        status: str,
        output: list[OutputMessage | FunctionCallOut] | None = None,
        usage: ResponseUsage | None = None,
        error: ResponseError | None = None,
    ) -> Response:
        body = turn.body
        functions = [t for t in body.tools or () if isinstance(t, FunctionTool)]
        return Response(
            id=turn.call.id,
            created_at=turn.call.created,
            status=status,  # type: ignore[arg-type]
            model=model,
            output=output or [],
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
            tools=functions,
            tool_choice=body.tool_choice or "auto",
            parallel_tool_calls=body.parallel_tool_calls is not False,
        )

    async def _keep(self, turn: Turn, text: str, calls: list[ToolCallOut]) -> None:
        if not turn.body.store:
            return
        conversation = [*turn.conversation, _assistant(text, calls)]
        value = json.dumps({"conversation": conversation}).encode()
        await self.store.set(self._key(turn.call.client.subject, turn.call.id), value, self.ttl_s)

    async def complete(self, turn: Turn, completion: ChatCompletion) -> Response:
        """The answer's text as a message item (left out when the answer is calls alone), then
        each call as a function_call item."""
        choice = completion.choices[0]
        text = choice.message.content or ""
        made = choice.message.tool_calls or []
        await self._keep(turn, text, made)
        status = "incomplete" if choice.finish_reason == "length" else "completed"
        output: list[OutputMessage | FunctionCallOut] = []
        if text or not made:
            output.append(self.message(turn, text, status))
        output += [_function_call(_item_id(), c, _item_status(status)) for c in made]
        usage = _usage(completion.usage)
        return self.response(turn, completion.model, status, output, usage)

    async def events(
        self, turn: Turn, chunks: AsyncIterator[ChatCompletionChunk]
    ) -> AsyncIterator[str]:
        """response.created, response.in_progress, then each output item: a message's
        response.output_item.added, response.content_part.added, response.output_text.delta...,
        response.output_text.done, response.content_part.done, response.output_item.done; a
        call's response.output_item.added, response.function_call_arguments.delta...,
        response.function_call_arguments.done, response.output_item.done (an item is done when
        the next one starts, or at the end); then response.completed (or response.incomplete
        when cut by max_output_tokens; response.failed for an error after the start)."""
        numbered = 0

        def event(kind: type[BaseModel], **fields: Any) -> str:
            nonlocal numbered
            payload = kind(sequence_number=numbered, **fields)
            numbered += 1
            return named_event(payload.type, payload.model_dump_json())  # type: ignore[attr-defined]

        items: list[_Item] = []  # in output order
        calls: dict[int, _Item] = {}  # by the chat call's index
        parts: list[str] = []
        text_item: _Item | None = None

        def close(status: str) -> list[str]:
            """The done events of the open item, if any."""
            if not items or not items[-1].open:
                return []
            item = items[-1]
            item.open = False
            at = {"item_id": item.id, "output_index": item.index}
            if item.call is None:
                text = "".join(parts)
                part = OutputText(text=text)
                done = self.message(turn, text, status)
                return [
                    event(TextDoneEvent, text=text, content_index=0, **at),
                    event(ContentPartEvent, type=PART + "done", part=part, content_index=0, **at),
                    event(OutputItemEvent, type=OUTPUT_ITEM + "done", output_index=item.index,
                          item=done),
                ]  # fmt: skip
            made = item.made(_item_status(status))
            return [
                event(ArgumentsDoneEvent, arguments=made.arguments, **at),
                event(OutputItemEvent, type=OUTPUT_ITEM + "done", output_index=item.index,
                      item=made),
            ]  # fmt: skip

        def open_text() -> list[str]:
            nonlocal text_item
            out = close("completed")
            text_item = _Item(turn.message_id, len(items))
            items.append(text_item)
            added = self.message(turn, "", "in_progress")
            added.content = []
            at = {"item_id": turn.message_id, "output_index": text_item.index}
            return [
                *out,
                event(OutputItemEvent, type=OUTPUT_ITEM + "added", output_index=text_item.index,
                      item=added),
                event(ContentPartEvent, type=PART + "added", part=OutputText(text=""),
                      content_index=0, **at),
            ]  # fmt: skip

        model, finish, usage = "", None, None
        try:
            async with contextlib.aclosing(chunks) as stream:  # type: ignore[type-var]
                async for chunk in stream:
                    if not model:
                        model = chunk.model
                        started = self.response(turn, model, "in_progress")
                        yield event(ResponseEvent, type="response.created", response=started)
                        yield event(ResponseEvent, type="response.in_progress", response=started)
                    if chunk.usage is not None:
                        usage = _usage(chunk.usage)
                    for choice in chunk.choices:
                        if choice.delta.content:
                            if text_item is None:
                                for line in open_text():
                                    yield line
                            assert text_item is not None
                            parts.append(choice.delta.content)
                            if text_item.open:
                                at = {"item_id": text_item.id, "output_index": text_item.index}
                                yield event(TextDeltaEvent, delta=choice.delta.content,
                                            content_index=0, **at)  # fmt: skip
                        for piece in choice.delta.tool_calls or ():
                            item = calls.get(piece.index)
                            if item is None:
                                for line in close("completed"):
                                    yield line
                                call = [piece.id or "", piece.function.name or "", []]
                                item = _Item(_item_id(), len(items), call)
                                calls[piece.index] = item
                                items.append(item)
                                yield event(OutputItemEvent, type=OUTPUT_ITEM + "added",
                                            output_index=item.index,
                                            item=item.made("in_progress"))  # fmt: skip
                            if piece.function.arguments:
                                item.call[2].append(piece.function.arguments)  # type: ignore[index]
                                yield event(ArgumentsDeltaEvent, item_id=item.id,
                                            output_index=item.index,
                                            delta=piece.function.arguments)  # fmt: skip
                        if choice.finish_reason is not None:
                            finish = choice.finish_reason
        except StreamFailed as exc:
            failure = ResponseError(code=exc.body.code or exc.body.type, message=exc.body.message)
            failed = self.response(turn, model, "failed", error=failure)
            yield event(ResponseEvent, type="response.failed", response=failed)
            return
        status = "incomplete" if finish == "length" else "completed"
        if not items:  # an empty answer is an empty message
            for line in open_text():
                yield line
        for line in close(status):
            yield line
        text = "".join(parts)
        output: list[OutputMessage | FunctionCallOut] = [
            self.message(turn, text, status if i is items[-1] else "completed")
            if i.call is None
            else i.made(_item_status(status) if i is items[-1] else "completed")
            for i in items
        ]
        made = [ToolCallOut.model_validate(c.made("completed").chat()) for c in calls.values()]
        await self._keep(turn, text, made)
        final = self.response(turn, model, status, output, usage)
        yield event(ResponseEvent, type=f"response.{status}", response=final)


@dataclass
class _Item:
    """An output item while it streams: a message, or a call ([call id, name, argument
    pieces])."""

    id: str
    index: int
    call: list[Any] | None = None
    open: bool = True

    def made(self, status: str) -> FunctionCallOut:
        assert self.call is not None
        call_id, name, pieces = self.call
        arguments = "".join(pieces)
        return FunctionCallOut(
            id=self.id, call_id=call_id, name=name, arguments=arguments, status=status
        )  # type: ignore[arg-type]


def _item_status(status: str) -> str:
    return "completed" if status == "completed" else "incomplete"


def _function_call(item_id: str, call: ToolCallOut, status: str) -> FunctionCallOut:
    return FunctionCallOut(
        id=item_id,
        call_id=call.id,
        name=call.function.name,
        arguments=call.function.arguments,
        status=status,  # type: ignore[arg-type]
    )


def _usage(usage: Any) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )
