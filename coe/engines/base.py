"""The Engine protocol: what every expert backend (in-process vLLM, remote server) provides, and
the EngineKind protocol: how experts.yaml selects, configures and builds one.

Engines take a fully shaped prompt (system prompt and strategy already applied) and sampling
parameters, and stream text deltas. Each stream ends with exactly one chunk that carries
``finish_reason`` and the token usage.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from coe.errors import UnavailableError
from coe.types import Chunk, Prompt, SamplingParams, ToolChoice


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


# Which deadline a request missed: its first token, its whole answer, or a slot in the weight
# cache's queue (experts.yaml: `deadlines.first_token_s`, `total_s`, `queue_s`).
Deadline = Literal["first_token", "total", "queue"]
_MISSED = {
    "first_token": "gave no first token within",
    "total": "did not finish the answer within",
    "queue": "had no slot free for the request within",
}


class DeadlineError(EngineError):
    """An expert missed one of its deadlines; the request was cancelled (aborted in the engine).

    A gateway answers 504 for a missed first token or total, 503 for no slot in time (the
    request never reached an engine: the pool is full, not slow).
    """

    http_status = 504

    def __init__(self, expert: str, deadline: Deadline, seconds: float):
        self.expert = expert
        self.deadline: Deadline = deadline
        self.seconds = seconds
        if deadline == "queue":
            self.http_status = 503
        super().__init__(f"expert {expert} {_MISSED[deadline]} {seconds:g} s ({deadline}_s)")


HealthState = Literal["up", "down", "starting"]


@dataclass(frozen=True)
class EngineHealth:
    """What an engine can say about itself right now.

    ``reason`` is a short phrase fit for a client (/health shows it): never a URL, a path, a key
    or an exception's text, which may hold any of them; logs carry those.
    """

    state: HealthState
    reason: str = ""

    @property
    def up(self) -> bool:
        return self.state == "up"


UP = EngineHealth("up")


@runtime_checkable
class Engine(Protocol):
    """An expert backend. Implementations start lazily on first use and restart after a crash."""

    name: str

    async def start(self) -> None: ...

    async def health(self) -> EngineHealth:
        """The engine's state now, checked against its process or server (cheap: callers poll
        it; a remote probe is cached for a few seconds)."""
        ...

    def stream(
        self, prompt: Prompt, sampling: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[Chunk]: ...

    async def shutdown(self) -> None: ...

    @property
    def ready(self) -> bool: ...


async def engine_health(engine: Engine) -> EngineHealth:
    """``engine.health()``; an engine class that predates it (a test's scripted engine) is judged
    by its ``ready`` flag, which is all it knows of itself."""
    probe = getattr(engine, "health", None)
    if probe is not None:
        return await probe()
    return UP if engine.ready else EngineHealth("down", "not running")


class EngineOptions(BaseModel):
    """Base of the option models an engine kind adds to experts.yaml. Unknown keys are errors (a
    typo like `max_num_seq:` must not be silently ignored); frozen, so options can key a dict."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ExpertView(Protocol):
    """What an engine kind reads of any expert entry of experts.yaml (a coe.config.Expert).

    An engine kind also reads its own fields (EngineKind.fields) from the entry it is given.
    """

    name: str
    engine: str
    # A model reference as written in the file (a path, a hub id, coe:NAME); None if the kind
    # needs none.
    model: str | None
    max_model_len: int


class ModelResolver(Protocol):
    """Turns an expert's model reference into what an engine loads (coe.config.PoolConfig)."""

    def resolve_model(self, expert: ExpertView) -> str: ...


class EngineKind(Protocol):
    """One kind of expert backend, selected by an expert entry's `engine:` key.

    coe.engines.registry lists the kinds; coe.config builds each kind's entry schema from
    ``fields``, and the engine pool asks the kind for the expert's engine.
    """

    # The value of `engine:` that selects this kind.
    name: ClassVar[str]
    # The entry keys this kind adds to the common ones (coe.config.Expert), with their defaults.
    fields: ClassVar[type[EngineOptions]]
    # Whether the engine runs in coe's own process (so, on a Ray cluster, in an expert
    # deployment's replica) rather than on a server of its own that coe only calls.
    in_process: ClassVar[bool]

    @classmethod
    def check(cls, expert: ExpertView) -> list[str]:
        """Problems with an entry that its types alone do not catch, each starting with the key
        path inside the entry (``"remote: required when ..."``)."""
        ...

    @classmethod
    def backend(cls, expert: ExpertView) -> str:
        """Where the expert runs, for listings (`coe experts`): a model reference, a URL."""
        ...

    @classmethod
    def engine_key(cls, pool: ModelResolver, expert: ExpertView) -> Hashable:
        """What decides which engine the expert needs: experts with equal keys share one."""
        ...

    @classmethod
    def build(cls, pool: ModelResolver, expert: ExpertView, name: str) -> Engine:
        """A new engine for the expert; ``name`` names it in logs and errors."""
        ...

    # Optional: ``tool_choices(expert) -> frozenset[ToolChoice]``, the tool choices the expert
    # honours (see ``tool_choices`` below); a kind without it calls no tools.


ALL_TOOL_CHOICES: frozenset[ToolChoice] = frozenset({"auto", "none", "required", "function"})


def tool_choices(kind: type[EngineKind], expert: ExpertView) -> frozenset[ToolChoice]:
    """The tool choices an expert honours: ``none`` always (tools ignored), the others as its
    engine kind declares."""
    declared = getattr(kind, "tool_choices", None)
    found: frozenset[ToolChoice] = declared(expert) if declared is not None else frozenset()
    return found | {"none"}
