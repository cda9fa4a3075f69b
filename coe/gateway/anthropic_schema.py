"""The Anthropic Messages API (POST /v1/messages) as coe speaks it: requests in, messages, stream
events and errors out. Requests reject unknown fields, as on /v1/chat/completions."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Content that is not text: refused with a 400 naming the block (tool blocks: see
# anthropic.tool_blocks), but typed so that the refusal is coe's, not a validation error.
NON_TEXT_BLOCKS = (
    "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking",
    "search_result", "server_tool_use", "web_search_tool_result",
)  # fmt: skip


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextBlock(_Request):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None  # prompt caching hints: accepted, no effect
    citations: list[dict[str, Any]] | None = None


class OtherBlock(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal[NON_TEXT_BLOCKS]  # type: ignore[valid-type]


ContentBlock = Annotated[TextBlock | OtherBlock, Field(discriminator="type")]


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
    # Refused with a 400 naming them until coe's experts call tools (anthropic.tool_blocks).
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    service_tier: str | None = None  # bookkeeping: accepted, no effect

    def check_supported(self) -> tuple[str, str] | None:
        """(param, why) for the first field coe cannot honour, else None."""
        if self.top_k is not None:
            return "top_k", "top_k is not supported; leave it out"
        if self.tools or (self.tool_choice and self.tool_choice.get("type") != "none"):
            return "tools", "tools are not supported on /v1/messages yet"
        if self.thinking and self.thinking.get("type") != "disabled":
            return "thinking", "extended thinking is not supported"
        for i, message in enumerate(self.messages):
            if isinstance(message.content, str):
                continue
            for j, block in enumerate(message.content):
                if block.type == "text":
                    continue
                what = "tool blocks are" if "tool" in block.type else "only text content is"
                return f"messages.{i}.content.{j}.type", f"{what} supported, not {block.type}"
        return None


class TextContent(BaseModel):
    type: Literal["text"] = "text"
    text: str


class MessageUsage(BaseModel):
    input_tokens: int
    output_tokens: int


StopReason = Literal["end_turn", "max_tokens", "stop_sequence"]


class Message(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str = Field(description="The expert that answered.")
    content: list[TextContent]
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
    content_block: TextContent


class Ping(BaseModel):
    type: Literal["ping"] = "ping"


class TextDelta(BaseModel):
    type: Literal["text_delta"] = "text_delta"
    text: str


class ContentBlockDelta(BaseModel):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: TextDelta


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
