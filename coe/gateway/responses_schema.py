"""The OpenAI Responses API (POST /v1/responses) as coe speaks it: requests in, the response
object and its stream events out. Errors keep OpenAI's shape (schema.ErrorResponse)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from pydantic_core import PydanticCustomError

from coe.gateway.schema import StreamOptions

INPUT_PARTS_REFUSED = ("input_image", "input_file", "input_audio", "refusal")
ITEMS_REFUSED = (
    "reasoning", "item_reference", "file_search_call",
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


class FunctionCallItem(_Request):
    """An earlier function call, as the client got it (an assistant turn's tool call)."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(_Request):
    """A function call's result (a tool turn): text, or input_text parts."""

    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputPart]
    id: str | None = None
    status: str | None = None


class OtherItem(BaseModel):
    """Other tools' calls and outputs, reasoning: refused with a 400 naming the item."""

    model_config = ConfigDict(extra="allow")
    type: Literal[ITEMS_REFUSED]  # type: ignore[valid-type]


def _kind(known: tuple[str, ...], default: str | None = None) -> Any:
    """A discriminator by ``type``: a known type is its own tag, any other is "other"."""

    def tag(value: Any) -> str:
        kind = (
            value.get("type", default) if isinstance(value, dict) else getattr(value, "type", None)
        )
        return kind if kind in known else "other"

    return Discriminator(tag)


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[OtherItem, Tag("other")],
    _kind(("message", "function_call", "function_call_output"), default="message"),
]


class FunctionTool(_Request):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def chat(self) -> dict[str, Any]:
        """The chat completions tool: ``{"type": "function", "function": {...}}``."""
        return {"type": "function", "function": self.model_dump(exclude={"type"})}


class OtherTool(BaseModel):
    """web_search, file_search, computer_use, mcp...: refused with a 400 naming tools[i].type."""

    model_config = ConfigDict(extra="allow")
    type: str


ToolItem = Annotated[
    Annotated[FunctionTool, Tag("function")] | Annotated[OtherTool, Tag("other")],
    _kind(("function",)),
]


class FunctionChoice(_Request):
    type: Literal["function"]
    name: str


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
    input: str | list[InputItem] = Field(min_length=1)
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
    # Function tools become chat completions tools; other kinds are refused (check_supported).
    tools: list[ToolItem] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    # Refused with a 400 naming them unless empty or neutral (check_supported).
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

    @field_validator("input", "tools", mode="wrap")
    @classmethod
    def _one_error(cls, value: Any, handler: ValidatorFunctionWrapHandler, info: Any) -> Any:
        """An invalid item is named by its place in the list (input[2].call_id), not by the
        union's branches."""
        try:
            return handler(value)
        except ValidationError as exc:
            if not isinstance(value, list):
                raise
            for error in exc.errors():
                loc = error["loc"]
                if loc and loc[0] != "str" and isinstance(loc[0], str):
                    loc = loc[1:]  # the list branch of input's str | list
                if loc and isinstance(loc[0], int):
                    break
            else:
                raise  # about the list as a whole (empty, too long): as pydantic says it
            index, *rest = loc
            tags = ("message", "function_call", "function_call_output", "function", "other")
            path = "".join(f".{p}" for p in rest if p not in tags)
            raise PydanticCustomError(
                "list_item", "{where}: {msg}",
                {"where": f"{info.field_name}[{index}]{path}", "msg": error["msg"]},
            ) from None  # fmt: skip

    @field_validator("tool_choice", mode="wrap")
    @classmethod
    def _choice(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(
                "tool_choice",
                "expected 'none', 'auto', 'required' or "
                '{"type": "function", "name": ...} (function tools only)',
            ) from None

    def check_supported(self) -> tuple[str, str] | None:
        """(param, why) for the first field coe cannot honour, else None."""
        for i, tool in enumerate(self.tools or ()):
            if isinstance(tool, OtherTool):
                return f"tools[{i}].type", f"only function tools are supported, not {tool.type}"
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
                what = "function tool items are" if "call" in item.type else "message items are"
                return f"input.{i}.type", f"only {what} supported, not {item.type}"
            if isinstance(item, FunctionCallItem):
                continue
            parts = item.output if isinstance(item, FunctionCallOutputItem) else item.content
            where = "output" if isinstance(item, FunctionCallOutputItem) else "content"
            if isinstance(parts, str):
                continue
            for j, part in enumerate(parts):
                if isinstance(part, OtherPart):
                    return f"input.{i}.{where}.{j}.type", f"only text is supported, not {part.type}"
        return None

    def chat_tools(self) -> dict[str, Any]:
        """tools, tool_choice and parallel_tool_calls as chat completions fields."""
        out: dict[str, Any] = {}
        if self.tools:
            out["tools"] = [t.chat() for t in self.tools if isinstance(t, FunctionTool)]
        if isinstance(self.tool_choice, FunctionChoice):
            out["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            out["tool_choice"] = self.tool_choice
        if self.parallel_tool_calls is not None:
            out["parallel_tool_calls"] = self.parallel_tool_calls
        return out


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


class FunctionCallOut(BaseModel):
    """A call the expert made: ``id`` is the item's, ``call_id`` the one its output names."""

    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]

    def chat(self) -> dict[str, Any]:
        """The chat completions tool call."""
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": self.call_id, "type": "function", "function": function}


OutputItem = Annotated[OutputMessage | FunctionCallOut, Field(discriminator="type")]


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
    output: list[OutputItem]
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
    parallel_tool_calls: bool = True
    tool_choice: str | FunctionChoice = "auto"
    tools: list[FunctionTool] = []
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
    item: OutputItem


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


class ArgumentsDeltaEvent(BaseModel):
    type: Literal["response.function_call_arguments.delta"] = (
        "response.function_call_arguments.delta"
    )
    sequence_number: int
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(BaseModel):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    sequence_number: int
    item_id: str
    output_index: int
    arguments: str
