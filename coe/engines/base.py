"""The Engine protocol: what every expert backend (in-process vLLM, remote server) provides.

Engines take a fully shaped prompt (system prompt and strategy already applied) and sampling
parameters, and stream text deltas. Each stream ends with exactly one chunk that carries
``finish_reason`` and the token usage.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

Role = Literal["system", "user", "assistant"]
PromptFormat = Literal["chat", "qa"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Prompt:
    """What the expert sees: the final messages and how they are turned into model input.

    ``chat`` uses the model's own chat template (from its tokenizer, or the remote server's);
    ``qa`` renders a plain "Question:/Answer:" transcript for base models that were never
    instruction-tuned and follow a chat template poorly.
    """

    messages: tuple[Message, ...]
    format: PromptFormat = "chat"


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 256
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Keep generating past end-of-sequence: benchmarks use it to decode a fixed token count.
    ignore_eos: bool = False


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Chunk:
    text: str
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass
class Completion:
    text: str
    finish_reason: str | None
    usage: Usage = field(default_factory=Usage)


class EngineError(RuntimeError):
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


async def collect(stream: AsyncIterator[Chunk]) -> Completion:
    """Drain a chunk stream into one Completion."""
    parts: list[str] = []
    finish: str | None = None
    usage = Usage()
    async for chunk in stream:
        parts.append(chunk.text)
        if chunk.finish_reason is not None:
            finish = chunk.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    return Completion(text="".join(parts), finish_reason=finish, usage=usage)
