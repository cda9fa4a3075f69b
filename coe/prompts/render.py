"""Turning a Prompt into what a model reads. One place, used by every engine and front end."""

from __future__ import annotations

from typing import Any

from coe.engines.base import Message, Prompt

QA_STOPS = ("\nQuestion:",)


def render_qa(messages: tuple[Message, ...] | list[Message]) -> str:
    """A "Question:/Answer:" transcript ending in an open answer, for base (non-chat) models."""
    lines: list[str] = []
    for m in messages:
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


def render_text(tokenizer: Any, prompt: Prompt) -> str:
    """The exact text the model is given (special tokens included), e.g. for --show-prompt."""
    if prompt.format == "qa":
        return (tokenizer.bos_token or "") + render_qa(prompt.messages)
    return tokenizer.apply_chat_template(
        [m.as_dict() for m in prompt.messages], add_generation_prompt=True, tokenize=False
    )


def render_token_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids for a local engine. BOS appears exactly once whichever format is used."""
    if prompt.format == "qa":
        # The tokenizer prepends BOS itself (add_special_tokens); Gemma needs it.
        return list(tokenizer(render_qa(prompt.messages)).input_ids)
    # Chat templates write BOS themselves; encode without adding another.
    text = render_text(tokenizer, prompt)
    return list(tokenizer(text, add_special_tokens=False).input_ids)
