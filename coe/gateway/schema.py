"""The OpenAI chat-completions schema as coe speaks it: requests in, responses out.

Requests reject unknown fields (a misspelt parameter is an error, not silently ignored). coe adds
its routing to the standard shapes only in headers (x-coe-*) and in /v1/route.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from coe.types import Message, TokenLogprob, Tool, ToolCall, ToolSpec, Usage
from coe.types import ResponseFormat as ResponseFormatSpec

INT64_MAX = 2**63 - 1


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str


class ToolCallParam(_Request):
    """A call in an assistant turn of the history, as the client got it."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    # "developer" is OpenAI's newer name for the system role.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # None only for an assistant turn (clients echo such turns back as they got them).
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers

    @model_validator(mode="after")
    def _check(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content: required for a {self.role} message")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("tool_call_id: required for a tool message")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls: only an assistant message has tool calls")
        return self

    def to_message(self) -> Message:
        if self.content is None:
            text = ""
        elif isinstance(self.content, str):
            text = self.content
        else:
            text = "".join(p.text for p in self.content)
        role = "system" if self.role == "developer" else self.role
        calls = tuple(
            ToolCall(c.id, c.function.name, c.function.arguments) for c in self.tool_calls or ()
        )
        return Message(role=role, content=text, tool_calls=calls, tool_call_id=self.tool_call_id)


class FunctionDef(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolParam(_Request):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Request):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI's; there is nothing to obfuscate here


class JsonSchemaFormat(_Request):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema: required when type is json_schema")
        return self

    def spec(self) -> ResponseFormatSpec | None:
        if self.type == "text":
            return None
        if self.type == "json_object" or self.json_schema is None:
            return ResponseFormatSpec("json_object")
        schema = self.json_schema.schema_ or {"type": "object"}
        return ResponseFormatSpec(
            "json_schema",
            schema=json.dumps(schema, sort_keys=True),
            name=self.json_schema.name,
            strict=bool(self.json_schema.strict),
        )


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
    tools: list[ToolParam] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
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
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        if isinstance(self.tool_choice, NamedToolChoice):
            if self.tool_choice.function.name not in names:
                raise ValueError(
                    f"tool_choice: function {self.tool_choice.function.name!r} is not in tools"
                )
        elif self.tool_choice == "required" and not names:
            raise ValueError("tool_choice: 'required' needs tools")
        return self

    def check_supported(self) -> tuple[str, str] | None:
        """(param, why) for the first parameter coe cannot honour, else None."""
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        for token, bias in (self.logit_bias or {}).items():
            if not token.isdigit():
                return "logit_bias", f"logit_bias keys are token ids; {token!r} is not one"
            if not -100 <= bias <= 100:
                return "logit_bias", f"logit_bias values are within -100..100; got {bias}"
        tools = self.tool_spec()
        structured = self.response_format is not None and self.response_format.type != "text"
        if tools is not None and tools.choice != "none" and structured:
            return "response_format", "response_format cannot be combined with tools"
        return None

    def tool_spec(self) -> ToolSpec | None:
        """The request's tools and tool choice (None: no tools)."""
        if not self.tools:
            return None
        tools = tuple(
            Tool(
                name=t.function.name,
                description=t.function.description or "",
                parameters=json.dumps(
                    t.function.parameters or {"type": "object", "properties": {}}, sort_keys=True
                ),
            )
            for t in self.tools
        )
        choice = self.tool_choice or "auto"
        if isinstance(choice, NamedToolChoice):
            return ToolSpec(
                tools, "function", choice.function.name, self.parallel_tool_calls is not False
            )
        return ToolSpec(tools, choice, None, self.parallel_tool_calls is not False)

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
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "logit_bias": {int(t): b for t, b in self.logit_bias.items()}
            if self.logit_bias
            else None,
            "logprobs": (self.top_logprobs or 0) if self.logprobs else None,
            "response_format": self.response_format.spec() if self.response_format else None,
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


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut

    @classmethod
    def of(cls, call: ToolCall) -> ToolCallOut:
        return cls(id=call.id, function=FunctionCallOut(name=call.name, arguments=call.arguments))


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]

    @classmethod
    def of(cls, lp: TokenLogprob) -> TokenLogprobOut:
        return cls(
            token=lp.token,
            logprob=max(lp.logprob, -9999.0),  # JSON has no -inf
            bytes=list(lp.token.encode()),
            top_logprobs=[
                TopLogprob(token=t, logprob=max(v, -9999.0), bytes=list(t.encode()))
                for t, v in lp.top
            ],
        )


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None
    refusal: None = None

    @classmethod
    def of(cls, logprobs: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
        if logprobs is None:
            return None
        return cls(content=[TokenLogprobOut.of(lp) for lp in logprobs])


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str = Field(description="The expert that answered.")
    choices: list[Choice]
    usage: UsageInfo


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDeltaOut(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDeltaOut] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


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
