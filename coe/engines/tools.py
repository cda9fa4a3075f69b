"""Tool calls and structured output for engines that decode themselves (in-process vLLM).

A forced call (tool choice ``function`` or ``required``) is guided decoding, as vLLM's own
server does it: the named function's parameters schema is the grammar, and the output is the
call's arguments (``required`` with several functions: a JSON array of ``{"name",
"parameters"}`` objects). So any model, even a base model with no notion of tools, produces
calls that parse and follow the schema. ``auto`` lets the model write freely and reads calls out
of its text with a vLLM tool parser, which the expert must declare (``tool_parser``).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from coe.types import Message, ResponseFormat, ToolCall, ToolSpec

# Finish reasons as OpenAI gives them.
TOOL_CALLS = "tool_calls"


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def forced_function(spec: ToolSpec | None) -> str | None:
    """The function whose arguments the whole output is: a named function, or ``required``
    with a single function (one call is a valid answer to it)."""
    if spec is None or not spec.tools:
        return None
    if spec.choice == "function":
        return spec.function
    if spec.choice == "required" and len(spec.tools) == 1:
        return spec.tools[0].name
    return None


def parameters_schema(spec: ToolSpec, name: str) -> dict[str, Any]:
    schema = spec.tool(name).schema()
    return schema or {"type": "object", "properties": {}}


def required_schema(spec: ToolSpec) -> dict[str, Any]:
    """``required`` over several functions: an array of calls, each one of the functions."""
    items = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [t.name]},
                "parameters": t.schema() or {"type": "object", "properties": {}},
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in spec.tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not spec.parallel:
        schema["maxItems"] = 1
    return schema


def calls_from_required(text: str) -> list[ToolCall]:
    """The calls in a ``required`` answer (a JSON array); ValueError if it is not one."""
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError("not a JSON array of calls")
    return [
        ToolCall(new_call_id(), str(c["name"]), json.dumps(c.get("parameters", {}))) for c in data
    ]


def guided_json(
    spec: ToolSpec | None, response_format: ResponseFormat | None
) -> dict[str, Any] | bool | None:
    """The grammar an answer is decoded with: a schema (dict), True for any JSON object, or
    None for free text. A forced tool call takes precedence over response_format, as in vLLM."""
    forced = forced_function(spec)
    if spec is not None and forced is not None:
        return parameters_schema(spec, forced)
    if spec is not None and spec.tools and spec.choice == "required":
        return required_schema(spec)
    if response_format is None:
        return None
    if response_format.type == "json_schema" and response_format.schema:
        return dict(json.loads(response_format.schema))
    return True


def as_text(messages: tuple[Message, ...] | list[Message]) -> list[Message]:
    """Tool turns for chat templates (and the Q/A transcript) that know no tool role: a call
    becomes the assistant's text, a tool's answer a user turn that says what it is."""
    out = []
    for m in messages:
        if m.role == "tool":
            out.append(Message("user", f"Tool result ({m.tool_call_id or 'call'}): {m.content}"))
        elif m.tool_calls:
            calls = "\n".join(
                json.dumps({"name": c.name, "arguments": _loads_or_text(c.arguments)})
                for c in m.tool_calls
            )
            out.append(Message("assistant", "\n".join(p for p in (m.content, calls) if p)))
        else:
            out.append(m)
    return out


def _loads_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
