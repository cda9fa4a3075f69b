"""The shared vocabulary of every layer: a conversation, the prompt an expert reads, sampling,
the token stream, and a routing decision. Plain data, no behaviour beyond small helpers; this
module imports nothing from coe, so every package can depend on it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]
PromptFormat = Literal["chat", "qa"]
# How an expert may answer a request with tools: "auto" (text or calls, its choice), "none"
# (text only), "required" (one or more calls), or "function" (a call of ToolSpec.function).
ToolChoice = Literal["auto", "none", "required", "function"]


@dataclass(frozen=True)
class ToolCall:
    """A function call an expert made: ``arguments`` is JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class Message:
    role: Role
    content: str
    # An assistant turn's calls, and a tool turn's answer to one (its call's id).
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.as_dict() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


@dataclass(frozen=True)
class Tool:
    """A function the expert may call; ``parameters`` is its JSON schema as JSON text (so the
    spec stays hashable and travels as it is)."""

    name: str
    description: str = ""
    parameters: str = '{"type": "object", "properties": {}}'

    def schema(self) -> dict[str, Any]:
        return dict(json.loads(self.parameters))

    def as_dict(self) -> dict[str, Any]:
        function = {"name": self.name, "parameters": self.schema()}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolSpec:
    """The tools of a request and how the expert may use them. ``parser`` is the expert's
    tool-call parser (vLLM's names: hermes, pythonic, ...), filled in from its entry: it reads
    calls out of free text, which ``auto`` needs on an in-process engine."""

    tools: tuple[Tool, ...]
    choice: ToolChoice = "auto"
    function: str | None = None  # the function a "function" choice forces
    parallel: bool = True
    parser: str | None = None

    def tool(self, name: str) -> Tool:
        return next(t for t in self.tools if t.name == name)


@dataclass(frozen=True)
class ResponseFormat:
    """Structured output: ``json_object`` (any JSON object) or ``json_schema`` (``schema``, JSON
    text, which the answer must follow)."""

    type: Literal["json_object", "json_schema"]
    schema: str | None = None
    name: str | None = None
    strict: bool = False


@dataclass(frozen=True)
class Prompt:
    """What the expert sees: the final messages and how they are turned into model input.

    ``chat`` uses the model's own chat template (from its tokenizer, or the remote server's);
    ``qa`` renders a plain "Question:/Answer:" transcript for base models that were never
    instruction-tuned and follow a chat template poorly.
    """

    messages: tuple[Message, ...]
    format: PromptFormat = "chat"
    tools: ToolSpec | None = None


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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # (token id, bias) pairs, as OpenAI's logit_bias.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # None: no log probabilities; k: each token's, with the k most likely alternatives.
    logprobs: int | None = None
    response_format: ResponseFormat | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class ToolCallDelta:
    """A piece of a streamed tool call, as OpenAI streams them: the first piece of call
    ``index`` carries its id and name, the following ones more of its arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class TokenLogprob:
    """A generated token's log probability, with the most likely alternatives at its place."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Chunk:
    """A piece of a token stream. Each stream ends with exactly one chunk that carries
    ``finish_reason`` and the token usage."""

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Completion:
    text: str
    finish_reason: str | None
    usage: Usage = field(default_factory=Usage)
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None


class ToolCallAssembler:
    """Streamed tool-call pieces back into whole calls."""

    def __init__(self) -> None:
        self._calls: dict[int, list[str]] = {}  # index -> [id, name, arguments]

    def add(self, deltas: list[ToolCallDelta]) -> None:
        for d in deltas:
            call = self._calls.setdefault(d.index, ["", "", ""])
            call[0] = d.id or call[0]
            call[1] = d.name or call[1]
            call[2] += d.arguments

    def calls(self) -> list[ToolCall]:
        return [ToolCall(*self._calls[i]) for i in sorted(self._calls)]


async def collect(stream: AsyncIterator[Chunk]) -> Completion:
    """Drain a chunk stream into one Completion."""
    parts: list[str] = []
    finish: str | None = None
    usage = Usage()
    calls = ToolCallAssembler()
    logprobs: list[TokenLogprob] | None = None
    async for chunk in stream:
        parts.append(chunk.text)
        calls.add(chunk.tool_calls)
        if chunk.logprobs is not None:
            logprobs = (logprobs or []) + chunk.logprobs
        if chunk.finish_reason is not None:
            finish = chunk.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    return Completion(
        text="".join(parts),
        finish_reason=finish,
        usage=usage,
        tool_calls=calls.calls(),
        logprobs=logprobs,
    )


@dataclass(frozen=True)
class RouteDecision:
    """Which expert answers a conversation, and why."""

    expert: str
    category: str | None
    confidence: float | None
    fell_back: bool
    reason: str
    latency_s: float = 0.0
    # The runner-up categories with their probabilities, best first (the winner not included).
    alternatives: tuple[tuple[str, float], ...] = ()
    # The category's prompt strategy as applied (coe.prompts.strategies): its name, the
    # mixture-of-prompts region, the expert identity and where that came from.
    strategy: str = "none"
    region: int | None = None
    identity: str | None = None
    identity_source: str | None = None
    # The latest user turn continues an earlier task ("now make it shorter") and was routed
    # with it; False for a one-turn conversation or a turn that starts a new task.
    continues: bool = False

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["alternatives"] = [{"category": c, "probability": p} for c, p in self.alternatives]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RouteDecision:
        """The inverse of as_dict; a TypeError or KeyError for another format."""
        fields = dict(data)
        alternatives = tuple((a["category"], a["probability"]) for a in fields.pop("alternatives"))
        return cls(**fields, alternatives=alternatives)
