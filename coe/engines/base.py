"""The Engine protocol: what every expert backend (in-process vLLM, remote server) provides.

Engines take a fully shaped prompt (system prompt and strategy already applied) and sampling
parameters, and stream text deltas. Each stream ends with exactly one chunk that carries
``finish_reason`` and the token usage.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from coe.errors import UnavailableError
from coe.types import Chunk, Prompt, SamplingParams


class EngineError(UnavailableError):
    """The engine could not serve a request (it died, failed to start, or the server refused).

    ``retryable`` says whether the same request may succeed on a restarted engine;
    ``invalid_request`` that the backend refused this request itself (a remote server's 4xx), and
    ``reason`` is then what it said, fit to pass on to the client.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = False,
        invalid_request: bool = False,
        reason: str | None = None,
    ):
        super().__init__(message)
        self.retryable = retryable
        self.invalid_request = invalid_request
        self.reason = reason or message


@runtime_checkable
class Engine(Protocol):
    """An expert backend. Implementations start lazily on first use and restart after a crash."""

    name: str

    async def start(self) -> None: ...

    def stream(
        self, prompt: Prompt, sampling: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[Chunk]: ...

    async def shutdown(self) -> None: ...

    @property
    def ready(self) -> bool: ...
