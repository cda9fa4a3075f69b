"""Generation that always ends: deadlines on an expert's token stream, and the fallback experts
that take over a request whose expert is down before its first token.

- ``within_deadlines`` wraps one engine stream: no first chunk within ``first_token_s``, or no
  last one within ``total_s``, cancels the stream (the engine aborts the request, so nothing
  keeps running) and raises DeadlineError.
- ``Route`` is the order of experts a request may be answered by (the decided one, then its
  category's ``fallbacks:``), shared by the request's choices, and the decision as it stands.
- ``Generation`` is a request's token stream as callers see it, with that decision.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace

from coe.config import Deadlines
from coe.engines.base import Deadline, DeadlineError, EngineError
from coe.types import Chunk, RouteDecision


async def within_deadlines(
    stream: AsyncIterator[Chunk], expert: str, deadlines: Deadlines
) -> AsyncIterator[Chunk]:
    """The stream's chunks, cut off at the expert's first-token and total deadlines (both
    counted from now). The stream is cancelled where it waits, which makes an engine abort the
    request, and closed in any case."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    first_by = started + deadlines.first_token_s
    total_by = started + deadlines.total_s
    produced = False
    deadline: Deadline
    async with contextlib.aclosing(stream) as chunks:  # type: ignore[type-var]
        while True:
            if produced or total_by <= first_by:
                deadline, at, seconds = "total", total_by, deadlines.total_s
            else:
                deadline, at, seconds = "first_token", first_by, deadlines.first_token_s
            timeout = asyncio.timeout_at(at)
            try:
                async with timeout:
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if not timeout.expired():
                    raise  # the engine's own timeout, not ours
                raise DeadlineError(expert, deadline, seconds) from None
            produced = True
            # Outside the timeout: the caller's time with the chunk counts toward total_s only.
            yield chunk


def falls_back(exc: BaseException) -> bool:
    """Whether another expert may take a request that failed this way before its first token:
    the expert is down or hung; not when the request itself was refused."""
    return isinstance(exc, EngineError) and not exc.invalid_request


class Route:
    """The experts a request may be answered by, in order, and the decision as it stands.

    A request's choices share one Route: once one of them finds an expert down, the others
    skip it too, and every choice (and the caller's headers) report the same expert.
    """

    def __init__(self, decision: RouteDecision, fallbacks: list[str]):
        self.decision = decision
        self._order = [decision.expert, *(f for f in fallbacks if f != decision.expert)]
        self._at = 0

    @property
    def expert(self) -> str:
        return self._order[self._at]

    @property
    def stood_in(self) -> bool:
        """Whether a fallback expert took the request over from the one decided."""
        return self._at > 0

    def failed(self, expert: str, exc: BaseException) -> bool:
        """``expert`` failed a request before its first token. False when no expert is left to
        try; True when the request should go on with ``self.expert``."""
        if expert != self.expert:
            return True  # another choice moved on already
        if self._at + 1 >= len(self._order):
            return False
        self._at += 1
        self.decision = replace(
            self.decision,
            expert=self.expert,
            fell_back=True,
            reason=f"{self.decision.reason}; {expert} failed before its first token ({exc}): "
            f"fallback expert {self.expert}",
        )
        return True


class Generation:
    """A request's token stream (one choice), and the decision of the expert answering it:
    after the first chunk, the expert that actually answers (a fallback, if one took over)."""

    def __init__(self, route: Route, chunks: AsyncGenerator[Chunk, None]):
        self.route = route
        self._chunks = chunks

    @property
    def decision(self) -> RouteDecision:
        return self.route.decision

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> Chunk:
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        await self._chunks.aclose()
