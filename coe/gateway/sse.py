"""Server-sent events in OpenAI's streaming shape, and the merging of a request's ``n`` choices
into one stream of (choice index, chunk)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from coe.gateway.call import Call
from coe.gateway.response_cache import Answer
from coe.gateway.schema import ChatCompletionChunk, ChunkChoice, Delta, UsageInfo
from coe.types import Chunk, Usage

DONE = "[DONE]"


def event(data: str) -> str:
    return f"data: {data}\n\n"


def include_usage(call: Call) -> bool:
    options = call.request.stream_options
    return bool(options and options.include_usage)


def chunk_event(
    call: Call, expert: str, index: int, delta: Delta, finish: str | None = None
) -> str:
    chunk = ChatCompletionChunk(
        id=call.id,
        created=call.created,
        model=expert,
        choices=[ChunkChoice(index=index, delta=delta, finish_reason=finish)],
    )
    return event(chunk.model_dump_json(exclude_none=False))


def usage_event(call: Call, expert: str, usage: Usage) -> str:
    """stream_options.include_usage: a last chunk with no choices and the request's usage."""
    chunk = ChatCompletionChunk(
        id=call.id, created=call.created, model=expert, choices=[], usage=UsageInfo.of(usage)
    )
    return event(chunk.model_dump_json())


async def replay(call: Call, answer: Answer) -> AsyncIterator[str]:
    """A whole (cached) answer as the events a generated one would have sent."""
    expert = answer.decision.expert
    for i, text in enumerate(answer.texts):
        yield chunk_event(call, expert, i, Delta(role="assistant", content=""))
        yield chunk_event(call, expert, i, Delta(content=text))
        yield chunk_event(call, expert, i, Delta(), answer.finish_reasons[i])
    if include_usage(call):
        yield usage_event(call, expert, answer.usage)
    yield event(DONE)


async def first(stream: AsyncIterator[tuple[int, Chunk]]) -> tuple[int, Chunk] | None:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return None


async def chain(
    pending: list[tuple[int, Chunk]], rest: AsyncIterator[tuple[int, Chunk]]
) -> AsyncIterator[tuple[int, Chunk]]:
    for item in pending:
        yield item
    async for item in rest:
        yield item


async def merge(streams: list[AsyncIterator[Chunk]]) -> AsyncIterator[tuple[int, Chunk]]:
    """Interleave the choices' chunks as they come, each tagged with its choice index."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:  # type: ignore[type-var]
            async for chunk in only:
                yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, Chunk | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Chunk]) -> None:
        try:
            async for chunk in stream:
                await queue.put((index, chunk, None))
        except Exception as exc:
            await queue.put((index, None, exc))
            return
        await queue.put((index, None, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, chunk, error = await queue.get()
            if error is not None:
                raise error
            if chunk is None:
                remaining -= 1
                continue
            yield index, chunk
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
