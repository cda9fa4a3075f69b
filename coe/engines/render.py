"""Turning a Prompt into what a model reads. One place, used by every engine and front end."""

from __future__ import annotations

from typing import Any

from coe.engines.tools import as_text
from coe.types import Message, Prompt

QA_STOPS = ("\nQuestion:",)


def render_qa(messages: tuple[Message, ...] | list[Message]) -> str:
    """A "Question:/Answer:" transcript ending in an open answer, for base (non-chat) models."""
    lines: list[str] = []
    for m in as_text(messages):
        if m.role == "system":
            lines.append(m.content.strip())
            lines.append("")
        elif m.role == "user":
            lines.append(f"Question: {m.content.strip()}")
        else:
            lines.append(f"Answer: {m.content.strip()}")
    lines.append("Answer:")
    return "\n".join(lines)


def format_stops(prompt: Prompt) -> tuple[str, ...]:
    """Stop strings a prompt format needs so the model ends its turn where the format does."""
    return QA_STOPS if prompt.format == "qa" else ()


def fold_system(messages: tuple[Message, ...] | list[Message]) -> list[Message]:
    """The system text moved to the head of the first user turn, for templates without a
    system role."""
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    turns = [m for m in messages if m.role != "system"]
    if system and turns and turns[0].role == "user":
        turns[0] = Message("user", f"{system}\n\n{turns[0].content}")
    return turns


def render_text(tokenizer: Any, prompt: Prompt) -> str:
    """The exact text the model is given (special tokens included), e.g. for --show-prompt.

    The model's own chat template renders chat prompts; a template that refuses a system role
    (it raises, as Mistral's and Gemma's originals do) gets the system text folded into the
    first user turn instead.
    """
    if prompt.format == "qa":
        return (tokenizer.bos_token or "") + render_qa(prompt.messages)
    from jinja2.exceptions import TemplateError

    spec = prompt.tools
    tools = [t.as_dict() for t in spec.tools] if spec and spec.choice != "none" else None

    def apply(messages: tuple[Message, ...] | list[Message]) -> str:
        extra = {"tools": tools} if tools else {}
        return tokenizer.apply_chat_template(
            [m.as_dict() for m in messages], add_generation_prompt=True, tokenize=False, **extra
        )

    # A template may refuse a system role (Mistral's, Gemma's) or tool turns: then the system
    # text goes into the first user turn, and tool turns are written as plain turns.
    attempts = [list(prompt.messages)]
    if any(m.role == "tool" or m.tool_calls for m in prompt.messages):
        attempts.append(as_text(prompt.messages))
    if any(m.role == "system" for m in prompt.messages):
        attempts += [fold_system(a) for a in list(attempts)]
    for i, messages in enumerate(attempts):
        try:
            return apply(messages)
        except TemplateError:
            if i == len(attempts) - 1:
                raise
    raise AssertionError("unreachable")


def render_token_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids for a local engine. BOS appears exactly once whichever format is used."""
    if prompt.format == "qa":
        # The tokenizer prepends BOS itself (add_special_tokens); Gemma needs it.
        return list(tokenizer(render_qa(prompt.messages)).input_ids)
    # Chat templates write BOS themselves; encode without adding another.
    text = render_text(tokenizer, prompt)
    return list(tokenizer(text, add_special_tokens=False).input_ids)
