"""The Anthropic Messages API (POST /v1/messages) as coe speaks it: requests in, messages, stream
events and errors out. Requests reject unknown fields, as on /v1/chat/completions."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Content that is neither text nor a tool block: refused with a 400 naming the block, but typed
# so that the refusal is coe's, not a validation error.
OTHER_BLOCKS = (
    "image", "document", "thinking", "redacted_thinking", "search_result", "server_tool_use",
    "web_search_tool_result",
)  # fmt: skip


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextBlock(_Request):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None  # prompt caching hints: accepted, no effect
    citations: list[dict[str, Any]] | None = None


class ToolUseBlock(BaseModel):
    """An assistant turn's call of a tool, as the client got it back. Clients echo the SDK's
    block, whose fields grow with each SDK release (caller, toolset_name, ...): those beyond the
    call itself are ignored here, not refused."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None


class ToolResultBlock(_Request):
    """A user turn's answer to a call (its tool_use_id)."""

    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool = False
    cache_control: dict[str, Any] | None = None

    def text(self) -> str:
        text = (
            self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)
        )
        return f"error: {text}" if self.is_error else text


class OtherBlock(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal[OTHER_BLOCKS]  # type: ignore[valid-type]


ContentBlock = Annotated[
    TextBlock | ToolUseBlock | ToolResultBlock | OtherBlock, Field(discriminator="type")
]


class ToolDef(_Request):
    """A client tool (Anthropic's server tools, such as web search, have other types)."""

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,128}$")
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None


class ToolChoice(_Request):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class InputMessage(_Request):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class Metadata(_Request):
    user_id: str | None = None


class MessagesRequest(_Request):
    model: str = Field(
        description="`auto` routes; an expert's name skips routing; `auto:CATEGORY` uses the "
        "category's expert."
    )
    messages: list[InputMessage] = Field(min_length=1)
    max_tokens: int = Field(ge=1, le=1_000_000)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = Field(None, max_length=4)
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, description="not supported: a 400 when sent")
    metadata: Metadata | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None  # each checked as a ToolDef (check_supported)
    tool_choice: ToolChoice | None = None
    thinking: dict[str, Any] | None = None
    service_tier: str | None = None  # bookkeeping: accepted, no effect

    def check_supported(self) -> tuple[str, str] | None:
        """(param, why) for the first field coe cannot honour, else None."""
        if self.top_k is not None:
            return "top_k", "top_k is not supported; leave it out"
        for i, tool in enumerate(self.tools or []):
            if tool.get("type", "custom") != "custom":
                return f"tools.{i}.type", f"only client tools are supported, not {tool['type']}"
            try:
                ToolDef.model_validate(tool)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                return f"tools.{i}.{where}", f"{where}: {first['msg']}"
        if self.tool_choice and self.tool_choice.type == "tool" and not self.tool_choice.name:
            return "tool_choice.name", "required when tool_choice.type is tool"
        if self.tool_choice and self.tool_choice.type != "none" and not self.tools:
            return "tool_choice", "tool_choice needs tools"
        if self.thinking and self.thinking.get("type") != "disabled":
            return "thinking", "extended thinking is not supported"
        for i, message in enumerate(self.messages):
            if isinstance(message.content, str):
                continue
            for j, block in enumerate(message.content):
                if block.type in ("text", "tool_use", "tool_result"):
                    continue
                return (
                    f"messages.{i}.content.{j}.type",
                    f"only text and tool blocks are supported, not {block.type}",
                )
        return None


class TextContent(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ToolUseContent(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class MessageUsage(BaseModel):
    input_tokens: int
    output_tokens: int


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class Message(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str = Field(description="The expert that answered.")
    content: list[TextContent | ToolUseContent]
    stop_reason: StopReason | None
    stop_sequence: str | None = None
    usage: MessageUsage


# -- stream events (each sent as `event: TYPE` with the object as its data) --------------------


class MessageStart(BaseModel):
    type: Literal["message_start"] = "message_start"
    message: Message


class ContentBlockStart(BaseModel):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: TextContent | ToolUseContent


class Ping(BaseModel):
    type: Literal["ping"] = "ping"


class TextDelta(BaseModel):
    type: Literal["text_delta"] = "text_delta"
    text: str


class InputJsonDelta(BaseModel):
    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


class ContentBlockDelta(BaseModel):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: TextDelta | InputJsonDelta


class ContentBlockStop(BaseModel):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class StopDelta(BaseModel):
    stop_reason: StopReason | None
    stop_sequence: str | None = None


class MessageDelta(BaseModel):
    type: Literal["message_delta"] = "message_delta"
    delta: StopDelta
    usage: MessageUsage


class MessageStop(BaseModel):
    type: Literal["message_stop"] = "message_stop"


# -- errors ------------------------------------------------------------------------------------


class AnthropicErrorBody(BaseModel):
    type: str = Field(
        description="invalid_request_error, authentication_error, not_found_error, "
        "request_too_large, rate_limit_error, api_error, overloaded_error or timeout_error"
    )
    message: str


class AnthropicError(BaseModel):
    type: Literal["error"] = "error"
    error: AnthropicErrorBody
