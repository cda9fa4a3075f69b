"""``expert_prompting``: the expert answers as the expert best suited to the instruction (see
coe/prompts/identity.py): the category's static identity, or one an LLM writes per instruction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from coe.config import Category
from coe.prompts.base import Shaping, StrategyContext, last_instruction
from coe.prompts.identity import static_identity
from coe.types import Message


class ExpertPrompting:
    name: ClassVar[str] = "expert_prompting"

    def __init__(self, context: StrategyContext):
        self.context = context

    def describe(self, category: Category, messages: Sequence[Message]) -> Shaping:
        # No LLM here: a generated identity is shown as the static one it falls back to.
        identity = static_identity(category)
        mode = self.context.config.strategies.expert_prompting.mode
        return Shaping(
            strategy=self.name,
            system=identity,
            identity=identity,
            identity_source="static" if mode == "static" else "fallback",
        )

    async def shape(self, category: Category, messages: Sequence[Message]) -> Shaping:
        writer = self.context.writer
        if writer is None:
            return self.describe(category, messages)
        found = await writer.identity(category, last_instruction(messages))
        return Shaping(
            strategy=self.name,
            system=found.text,
            identity=found.text,
            identity_source=found.source,
        )

    def fingerprint(self, category: Category) -> bytes:
        return b""  # the identity is in experts.yaml, or written per instruction

    def check(self, category: Category) -> None:
        pass
