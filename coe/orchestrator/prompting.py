"""From a conversation and its shaping to what the expert reads: the final prompt and the
sampling parameters."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from coe.config import Expert
from coe.engines.base import tool_choices
from coe.engines.registry import engine_kind
from coe.errors import BadRequestError
from coe.prompts.strategies import NONE as NO_SHAPING
from coe.prompts.strategies import Shaping
from coe.types import Message, Prompt, RouteDecision, SamplingParams, ToolSpec


def to_messages(raw: Iterable[Message | Mapping[str, Any]]) -> list[Message]:
    out = []
    for m in raw:
        if isinstance(m, Message):
            out.append(m)
        else:
            out.append(Message(role=m["role"], content=str(m.get("content") or "")))
    return out


def with_shaping(decision: RouteDecision, shaping: Shaping) -> RouteDecision:
    """The decision with the prompt strategy it was given, as reported to the caller."""
    return replace(
        decision,
        strategy=shaping.strategy,
        region=shaping.region,
        identity=shaping.identity,
        identity_source=shaping.identity_source,
    )


def build_prompt(
    expert: Expert,
    messages: list[Message],
    system: str | None = None,
    shaping: Shaping = NO_SHAPING,
    tools: ToolSpec | None = None,
) -> Prompt:
    """System text, then the strategy's demos, then the conversation.

    The caller's ``system`` (or the conversation's own system messages) replaces the
    expert's system prompt; otherwise the strategy's text (an identity, a region's
    instruction) comes first and the expert's system prompt after it.
    """
    turns = [m for m in messages if m.role != "system"]
    given = "\n\n".join(m.content for m in messages if m.role == "system")
    if system is not None or given:
        system_text: str | None = system if system is not None else given
    else:
        parts = [shaping.system, expert.system_prompt]
        system_text = "\n\n".join(p for p in parts if p) or None
    demos = []
    for demo in shaping.demos:
        demos += [Message("user", demo.input), Message("assistant", demo.output)]
    final = ([Message("system", system_text)] if system_text else []) + demos + turns
    if tools is not None:
        # The expert's own tool-call parser reads its calls (engine kinds that have one).
        tools = replace(tools, parser=getattr(expert, "tool_parser", None))
    return Prompt(messages=tuple(final), format=expert.prompt_format, tools=tools)


def check_tools(expert: Expert, tools: ToolSpec | None) -> None:
    """A request with tools for an expert that cannot honour its tool choice is refused,
    naming the expert and what it lacks."""
    if tools is None or not tools.tools:
        return
    if tools.choice in tool_choices(engine_kind(expert.engine), expert):
        return
    if tools.choice == "auto" and expert.engine == "vllm":
        why = (
            "has no tool_parser in experts.yaml, so it cannot choose between text and a call; "
            "send tool_choice 'required' or a named function, or use an expert with one"
        )
    else:
        why = f"cannot call tools (tool_choice {tools.choice!r})"
    raise ToolsUnsupportedError(f"expert {expert.name} {why}", param="tool_choice")


class ToolsUnsupportedError(BadRequestError):
    """A request with tools went to an expert that cannot honour them (HTTP 400)."""


def sampling_for(expert: Expert, **overrides: Any) -> SamplingParams:
    """The expert's sampling, with the caller's overrides (None means "the expert's")."""
    base = expert.sampling
    params = SamplingParams(
        temperature=base.temperature,
        top_p=base.top_p,
        max_tokens=base.max_tokens,
        repetition_penalty=base.repetition_penalty,
        seed=base.seed,
    )
    given = {k: v for k, v in overrides.items() if v is not None}
    if "stop" in given:
        given["stop"] = tuple(given["stop"])
    if "logit_bias" in given:
        given["logit_bias"] = tuple(
            (int(t), float(b)) for t, b in dict(given["logit_bias"]).items()
        )
    return replace(params, **given)
