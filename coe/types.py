"""The shared vocabulary of every layer: a conversation, the prompt an expert reads, sampling,
the token stream, and a routing decision. Plain data, no behaviour beyond small helpers; this
module imports nothing from coe, so every package can depend on it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

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
    """A piece of a token stream. Each stream ends with exactly one chunk that carries
    ``finish_reason`` and the token usage."""

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass
class Completion:
    text: str
    finish_reason: str | None
    usage: Usage = field(default_factory=Usage)


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
