"""POST /v1/completions, the legacy text API, over the chat completions path. Each prompt is one
user message, routed like any chat (``auto``, an expert, ``auto:CATEGORY``), rendered in the
expert's prompt format with its system prompt: an instruction answered, not raw text continued.
``echo`` puts the prompt in front of the text; several prompts are answered concurrently, their
choices numbered prompt by prompt (prompt i's j-th choice has index i * n + j)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from coe.gateway import sse
from coe.gateway.auth import Client
from coe.gateway.call import Call
from coe.gateway.completions_schema import Completion, CompletionChoice, CompletionRequest
from coe.gateway.schema import ChatCompletion, ChatCompletionChunk, ErrorResponse, UsageInfo
from coe.gateway.translate import StreamFailed, call_for, chat_request

ID_PREFIX = "cmpl-"
PARAMS = {"messages": "prompt"}


def calls(body: CompletionRequest, client: Client, headers: Mapping[str, str]) -> list[Call]:
    """One chat call per prompt."""
    out = []
    for prompt in body.prompts():
        fields: dict[str, Any] = {
            "model": body.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": body.max_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "n": body.n,
            "stop": body.stop,
            "seed": body.seed,
            "stream": body.stream,
            "stream_options": body.stream_options,
            "user": body.user,
        }
        out.append(call_for(chat_request(fields, PARAMS), client, headers, ID_PREFIX))
    return out


async def complete(
    body: CompletionRequest,
    calls: list[Call],
    answer: Callable[[Call], Awaitable[tuple[ChatCompletion, dict[str, str]]]],
) -> tuple[Completion, dict[str, str]]:
    """Every prompt answered (the first one's headers; cancelled together on a failure)."""
    tasks = [asyncio.ensure_future(answer(call)) for call in calls]
    try:
        results = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    choices = []
    prompt_tokens = completion_tokens = 0
    for i, (chat, _) in enumerate(results):
        prefix = calls[i].messages[0].content if body.echo else ""
        for choice in chat.choices:
            choices.append(
                CompletionChoice(
                    text=prefix + (choice.message.content or ""),
                    index=i * body.n + choice.index,
                    finish_reason=choice.finish_reason,
                )
            )
        prompt_tokens += chat.usage.prompt_tokens
        completion_tokens += chat.usage.completion_tokens
    first, headers = results[0]
    usage = UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )
    completion = Completion(
        id=calls[0].id, created=calls[0].created, model=first.model, choices=choices, usage=usage
    )
    return completion, headers


async def events(
    body: CompletionRequest, call: Call, chunks: AsyncIterator[ChatCompletionChunk]
) -> AsyncIterator[str]:
    """OpenAI's text_completion chunks, then [DONE]; an error after the start is the last
    event before [DONE], as on /v1/chat/completions."""
    echoed: set[int] = set()
    try:
        async with contextlib.aclosing(chunks) as stream:  # type: ignore[type-var]
            async for chunk in stream:
                choices = []
                for choice in chunk.choices:
                    text = choice.delta.content or ""
                    if body.echo and choice.index not in echoed:
                        echoed.add(choice.index)
                        text = call.messages[0].content + text
                    if text or choice.finish_reason is not None:
                        choices.append(
                            CompletionChoice(
                                text=text, index=choice.index, finish_reason=choice.finish_reason
                            )
                        )
                if not choices and chunk.usage is None:
                    continue
                out = Completion(
                    id=call.id,
                    created=call.created,
                    model=chunk.model,
                    choices=choices,
                    usage=chunk.usage,
                )
                yield sse.event(out.model_dump_json())
    except StreamFailed as exc:
        yield sse.event(ErrorResponse(error=exc.body).model_dump_json())
    yield sse.event(sse.DONE)
