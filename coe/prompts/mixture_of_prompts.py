"""``mixture_of_prompts``: the instruction and nearest demos of the prompt's region of the
embedding space go before it (see coe/prompts/mixture.py; regions come from `coe prompts fit`)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import ClassVar

from coe.config import Category
from coe.prompts.base import Shaping, StrategyContext, last_instruction
from coe.prompts.mixture import MixtureError, MixtureOfPrompts, load_mixture
from coe.types import Message


class MixtureOfPromptsStrategy:
    name: ClassVar[str] = "mixture_of_prompts"

    def __init__(self, context: StrategyContext):
        self.context = context
        self._mixtures: dict[str, MixtureOfPrompts] = {}

    def mixture(self, category: Category) -> MixtureOfPrompts:
        """The category's regions, loaded once and checked against the embedder here."""
        if category.name not in self._mixtures:
            assert category.prompts is not None
            folder = self.context.config.resolve_path(category.prompts)
            mixture = load_mixture(folder)
            embedder = self.context.embedder()
            if mixture.embedder["fingerprint"] != embedder.fingerprint:
                raise MixtureError(
                    f"{folder}: fitted with embeddings of {mixture.embedder['model']}, but the "
                    f"router embeds with {embedder.model_id}; refit with `coe prompts fit`"
                )
            self._mixtures[category.name] = mixture
        return self._mixtures[category.name]

    def describe(self, category: Category, messages: Sequence[Message]) -> Shaping:
        mixture = self.mixture(category)
        settings = self.context.config.strategies.mixture_of_prompts
        embedding = self.context.embedder().encode([last_instruction(messages)])[0]
        region = mixture.region_of(embedding)
        demos = mixture.demos_for(
            region, embedding, token_budget=settings.demo_tokens, max_demos=settings.max_demos
        )
        return Shaping(
            strategy=self.name,
            system=mixture.instructions[region],
            demos=tuple(demos),
            region=region,
        )

    async def shape(self, category: Category, messages: Sequence[Message]) -> Shaping:
        # An embedding may take milliseconds of CPU: off the event loop.
        return await asyncio.to_thread(self.describe, category, messages)

    def fingerprint(self, category: Category) -> bytes:
        """Every file of the region folder, by name and content."""
        if category.prompts is None:
            return b""
        folder = self.context.config.resolve_path(category.prompts)
        return b"".join(
            path.name.encode() + path.read_bytes()
            for path in sorted(folder.glob("*"))
            if path.is_file()
        )

    def check(self, category: Category) -> None:
        self.mixture(category)
