"""A request's record in the request log (coe.requestlog), made as the request goes.

The orchestrator is the one place that sees every request's deciding and generation, whatever
front end sent it: it fills in the decision, the first token, the usage and any error. The front
end passes in what only it knows (an ``Origin``: which front end, the gateway's client, the model
as asked) and, for the gateway, the response cache's status.

The record is written once, when the request ends: a trace is held by the front end while it
works on the request (``with trace:``) and by each of the request's token streams while it runs
(a gateway request has ``n`` of them); the last to let go writes it. Nothing here waits on the
disk: writing is the log writer's thread's job.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from coe.redact import redact_text
from coe.requestlog import FrontEnd, RequestLog, RequestRecord
from coe.types import Chunk, Message, RouteDecision, Usage

MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class Origin:
    """Where a request came from: the fields of its record only the front end knows."""

    front_end: FrontEnd | None = None  # None: the log's (the front end this process is)
    client: str | None = None
    model: str | None = None  # as asked; None: the expert named, else auto
    request_id: str | None = None


def describe_error(exc: BaseException) -> str:
    """``ClassName: message``, with secrets masked and cut to a sensible length."""
    text = redact_text(f"{type(exc).__name__}: {exc}")
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


class RequestTrace:
    def __init__(
        self,
        log: RequestLog,
        origin: Origin,
        messages: Sequence[Message],
        started: float | None = None,
    ):
        """``started``: when the front end took the request (time.perf_counter()); now if
        None. Latency and time to first token count from it."""
        now = time.perf_counter()
        self.log = log
        self.started = now if started is None else started
        last_user = next((m.content for m in reversed(messages) if m.role == "user"), None)
        self.record = RequestRecord(
            time=time.time() - (now - self.started),
            front_end=origin.front_end or log.front_end,
            request_id=origin.request_id,
            client=origin.client,
            model=origin.model,
            messages=len(messages),
            prompt=last_user,
        )
        self._holds = 0
        self._written = False
        self._finished = False  # a choice ended with a finish reason
        self._chars = 0
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._counted = False

    # -- what the request shows as it goes -------------------------------------------------
    def decided(self, decision: RouteDecision, how: str | None = None) -> None:
        """The expert answering (a fallback's decision replaces the first one)."""
        r = self.record
        r.expert = decision.expert
        r.category = decision.category
        r.confidence = decision.confidence
        r.fallback = decision.fell_back
        r.strategy = decision.strategy
        if how is not None:
            r.routed_by = how

    def chunk(self, chunk: Chunk) -> None:
        """Called for every chunk generated: keep it cheap."""
        if chunk.text or chunk.tool_calls:
            if self.record.ttft_s is None:
                self.record.ttft_s = time.perf_counter() - self.started
            self._chars += len(chunk.text)
        if chunk.finish_reason is not None:
            self._finished = True
            if self.record.finish_reason is None:
                self.record.finish_reason = chunk.finish_reason
            if chunk.usage is not None:
                self.used(chunk.usage)

    def used(self, usage: Usage) -> None:
        # The prompt is one prompt however many choices are drawn from it.
        self._counted = True
        self._prompt_tokens = max(self._prompt_tokens, usage.prompt_tokens)
        self._completion_tokens += usage.completion_tokens

    def answered(
        self, decision: RouteDecision, usage: Usage, texts: Sequence[str], cache: str
    ) -> None:
        """A whole answer that was not generated now (the response cache's)."""
        self.decided(decision)
        self.record.cache = cache
        self.used(usage)
        self._chars += sum(len(t) for t in texts)
        self._finished = True

    def failed(self, exc: BaseException) -> None:
        """The request (or one of its choices) ended with ``exc``; the first error is kept. A
        caller that stopped reading after the answer's end is no error."""
        if self.record.error is not None:
            return
        if isinstance(exc, GeneratorExit | KeyboardInterrupt | asyncio.CancelledError):
            if not self._finished:
                self.record.error = "Cancelled: the caller stopped before the answer's end"
            return
        self.record.error = describe_error(exc)

    # -- holding and writing -----------------------------------------------------------------
    def hold(self) -> None:
        self._holds += 1

    def release(self) -> None:
        self._holds -= 1
        if self._holds <= 0 and not self._written:
            self._written = True
            self._write()

    def fail_now(self, exc: BaseException) -> None:
        """The request ended with ``exc`` before any stream held it: write it now."""
        self.hold()
        self.failed(exc)
        self.release()

    def __enter__(self) -> RequestTrace:
        self.hold()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self.failed(exc)
        self.release()

    def _write(self) -> None:
        r = self.record
        r.latency_s = time.perf_counter() - self.started
        r.answer_chars = self._chars
        if self._counted:
            r.prompt_tokens = self._prompt_tokens
            r.completion_tokens = self._completion_tokens
        self.log.record(r)
