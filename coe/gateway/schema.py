"""The OpenAI chat-completions schema as coe speaks it: requests in, responses out.

Requests reject unknown fields (a misspelt parameter is an error, not silently ignored). coe adds
its routing to the standard shapes only in headers (x-coe-*) and in /v1/route.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from coe.types import Message, Usage

INT64_MAX = 2**63 - 1


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    # "developer" is OpenAI's newer name for the system role.
    role: Literal["system", "developer", "user", "assistant"]
    # None only for an assistant turn (clients echo such turns back as they got them).
    content: str | list[TextPart] | None
    name: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content: required for a {self.role} message")
        return self

    def to_message(self) -> Message:
        if self.content is None:
            text = ""
        elif isinstance(self.content, str):
            text = self.content
        else:
            text = "".join(p.text for p in self.content)
        role = "system" if self.role == "developer" else self.role
        return Message(role=role, content=text)


class StreamOptions(_Request):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI's; there is nothing to obfuscate here


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(_Request):
    model: str = Field(
        description="`auto` routes; an expert's name skips routing; `auto:CATEGORY` uses the "
        "category's expert."
    )
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=8)
    stop: str | list[str] | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    seed: int | None = Field(None, ge=0, le=INT64_MAX)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    user: str | None = None
    # OpenAI parameters that clients send with neutral values; other values are refused with a
    # 400 naming them (check_supported), never silently ignored.
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # Bookkeeping fields: accepted, and they change nothing.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        stops = self.stop_list()
        if len(stops) > 4:
            raise ValueError("stop: at most 4 sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop: sequences must not be empty")
        if not any(m.role == "user" for m in self.messages):
            raise ValueError("messages: the conversation has no user message")
        return self

    def check_supported(self) -> tuple[str, str] | None:
        """(param, why) for the first parameter coe cannot honour, else None."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name, f"{name} is not supported; leave it out or send 0"
        if self.logprobs or self.top_logprobs:
            return "logprobs", "log probabilities are not supported"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format", "only response_format type 'text' is supported"
        if self.tools or self.tool_choice not in (None, "none"):
            return "tools", "tool calling is not supported by coe's experts"
        return None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def to_messages(self) -> list[Message]:
        return [m.to_message() for m in self.messages]

    def sampling(self) -> dict[str, object]:
        """Overrides of the expert's sampling defaults (None: keep the expert's)."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_completion_tokens or self.max_tokens,
            "seed": self.seed,
            "repetition_penalty": self.repetition_penalty,
            "stop": self.stop_list() or None,
        }


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, usage: Usage) -> UsageInfo:
        return cls(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str = Field(description="The expert that answered.")
    choices: list[Choice]
    usage: UsageInfo


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "coe"
    description: str = ""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class RouteRequest(_Request):
    model: str = "auto"
    messages: list[ChatMessage] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> RouteRequest:
        if not any(m.role == "user" for m in self.messages):
            raise ValueError("messages: the conversation has no user message")
        return self


class Alternative(BaseModel):
    category: str
    probability: float


class RouteResponse(BaseModel):
    expert: str
    category: str | None
    confidence: float | None
    fell_back: bool
    reason: str
    latency_s: float
    alternatives: list[Alternative]
    strategy: str = Field(description="none, expert_prompting or mixture_of_prompts")
    region: int | None = Field(description="the mixture-of-prompts region")
    identity: str | None = Field(description="the expert identity (expert-prompting)")
    identity_source: str | None = Field(description="static, generated, cached or fallback")


class StoreHealth(BaseModel):
    kind: str
    healthy: bool
    state: Literal["ok", "unreachable", "misconfigured"] = "ok"
    # Why, while state is not ok (no secrets, no addresses).
    problem: str | None = None


class ExpertHealth(BaseModel):
    state: Literal["up", "down", "starting"]
    reason: str = Field("", description="why it is not up (or which slots are not), briefly")
    routed: bool = Field(description="a category's expert: the router sends requests to it")


class HealthResponse(BaseModel):
    # ok: everything up; degraded: every routed request is served, but Redis is unreachable (no
    # cache or sessions, limits per gateway.limits.on_store_error) or an expert reachable only by
    # name is down; unavailable: a routed expert's engine is down or starting, or the store is
    # misconfigured (requests that need it get 503).
    status: Literal["ok", "degraded", "unavailable"]
    ready: bool = Field(description="every routed expert is up and the store answers")
    # Per expert: is its engine up (the state and the reason are in `experts`).
    engines: dict[str, bool]
    experts: dict[str, ExpertHealth]
    store: StoreHealth


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
