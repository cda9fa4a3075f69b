"""The OpenAI Responses API (POST /v1/responses) as coe speaks it: requests in, the response
object and its stream events out. Errors keep OpenAI's shape (schema.ErrorResponse)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from coe.gateway.schema import StreamOptions

INPUT_PARTS_REFUSED = ("input_image", "input_file", "input_audio", "refusal")
ITEMS_REFUSED = (
    "function_call", "function_call_output", "reasoning", "item_reference", "file_search_call",
    "web_search_call", "computer_call", "computer_call_output", "custom_tool_call",
    "custom_tool_call_output", "mcp_call", "mcp_list_tools", "local_shell_call",
)  # fmt: skip


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputText(_Request):
    type: Literal["input_text"]
    text: str


class OutputTextPart(_Request):
    """An earlier answer's text, as clients send assistant turns back."""

    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class OtherPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal[INPUT_PARTS_REFUSED]  # type: ignore[valid-type]


InputPart = Annotated[InputText | OutputTextPart | OtherPart, Field(discriminator="type")]


class InputMessage(_Request):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputPart]
    id: str | None = None
    status: str | None = None


class OtherItem(BaseModel):
    """Tool calls and their outputs, reasoning: refused with a 400 naming the item."""

    model_config = ConfigDict(extra="allow")
    type: Literal[ITEMS_REFUSED]  # type: ignore[valid-type]


class TextFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(_Request):
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(_Request):
    model: str = Field(
        description="`auto` routes; an expert's name skips routing; `auto:CATEGORY` uses the "
        "category's expert."
    )
    input: str | list[InputMessage | OtherItem] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Kept (the default, as OpenAI's): the conversation is in the store for the gateway's
    # session_ttl_s, for a later request's previous_response_id.
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    # Refused with a 400 naming them unless empty or neutral (check_supported).
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    background: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    truncation: Literal["auto", "disabled"] | None = None
    # Bookkeeping: accepted, no effect.
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def check_supported(self) -> tuple[str, str] | None:
        """(param, why) for the first field coe cannot honour, else None."""
        if self.tools or self.tool_choice not in (None, "none", "auto"):
            return "tools", "tools are not supported on /v1/responses yet"
        if self.text and self.text.format and self.text.format.type != "text":
            return "text.format", "only text.format type 'text' is supported"
        if self.reasoning and self.reasoning.get("effort") is not None:
            return "reasoning", "reasoning options are not supported"
        if self.include:
            return "include", "include is not supported"
        if self.background:
            return "background", "background responses are not supported"
        if self.top_logprobs:
            return "top_logprobs", "log probabilities are not supported"
        if isinstance(self.input, str):
            return None
        for i, item in enumerate(self.input):
            if isinstance(item, OtherItem):
                what = "tool items are" if "call" in item.type else "only message items are"
                return f"input.{i}.type", f"{what} supported, not {item.type}"
            if isinstance(item.content, str):
                continue
            for j, part in enumerate(item.content):
                if isinstance(part, OtherPart):
                    return f"input.{i}.content.{j}.type", f"only text is supported, not {part.type}"
        return None


# -- the response --------------------------------------------------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = InputTokensDetails()
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    code: str
    message: str


class TextFormatOut(BaseModel):
    type: Literal["text"] = "text"


class TextOut(BaseModel):
    format: TextFormatOut = TextFormatOut()


class Response(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    model: str = Field(description="The expert that answered.")
    output: list[OutputMessage]
    usage: ResponseUsage | None = None
    incomplete_details: IncompleteDetails | None = None
    error: ResponseError | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, str] = {}
    user: str | None = None
    parallel_tool_calls: bool = False
    tool_choice: str = "none"
    tools: list[Any] = []
    text: TextOut = TextOut()
    truncation: Literal["disabled"] = "disabled"


# -- stream events (`event: TYPE`, the object as data; numbered by sequence_number) ----------


class ResponseEvent(BaseModel):
    type: Literal[
        "response.created",
        "response.in_progress",
        "response.completed",
        "response.incomplete",
        "response.failed",
    ]
    sequence_number: int
    response: Response


class OutputItemEvent(BaseModel):
    type: Literal["response.output_item.added", "response.output_item.done"]
    sequence_number: int
    output_index: int
    item: OutputMessage


class ContentPartEvent(BaseModel):
    type: Literal["response.content_part.added", "response.content_part.done"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class TextDeltaEvent(BaseModel):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = []


class TextDoneEvent(BaseModel):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = []
