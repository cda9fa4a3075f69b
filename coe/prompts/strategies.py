"""The prompt strategy of each category, applied between routing and generation.

A Shaping says what goes before the conversation: a system text (an expert identity, or a
mixture region's instruction, ahead of the expert's own system prompt) and demos (earlier
user/assistant turns). The instruction a strategy looks at is the conversation's last user turn.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from coe.config import Category, PoolConfig
from coe.prompts.identity import IdentityWriter, static_identity
from coe.prompts.mixture import Demo, MixtureError, MixtureOfPrompts, load_mixture
from coe.router.base import Embedder
from coe.types import Message


@dataclass(frozen=True)
class Shaping:
    strategy: str = "none"
    system: str | None = None
    demos: tuple[Demo, ...] = field(default=(), repr=False)
    identity: str | None = None
    # Where the identity came from: static, generated, cached or fallback.
    identity_source: str | None = None
    region: int | None = None


NONE = Shaping()


def last_instruction(messages: Sequence[Message]) -> str:
    return next(m.content for m in reversed(messages) if m.role == "user")


class Strategies:
    def __init__(
        self,
        config: PoolConfig,
        embedder: Callable[[], Embedder],
        writer: IdentityWriter | None = None,
    ):
        self.config = config
        self._embedder = embedder
        self.writer = writer
        self._mixtures: dict[str, MixtureOfPrompts] = {}

    def mixture(self, category: Category) -> MixtureOfPrompts:
        """The category's regions, loaded once and checked against the embedder here."""
        if category.name not in self._mixtures:
            assert category.prompts is not None
            folder: Path = self.config.resolve_path(category.prompts)
            mixture = load_mixture(folder)
            embedder = self._embedder()
            if mixture.embedder["fingerprint"] != embedder.fingerprint:
                raise MixtureError(
                    f"{folder}: fitted with embeddings of {mixture.embedder['model']}, but the "
                    f"router embeds with {embedder.model_id}; refit with `coe prompts fit`"
                )
            self._mixtures[category.name] = mixture
        return self._mixtures[category.name]

    def fingerprint(self) -> str:
        """A hash of every category's region files: cached answers end when they change."""
        digest = hashlib.sha256()
        for category in self.config.categories:
            if category.strategy == "mixture_of_prompts" and category.prompts is not None:
                folder = self.config.resolve_path(category.prompts)
                for path in sorted(folder.glob("*")):
                    if path.is_file():
                        digest.update(path.name.encode() + path.read_bytes())
        return digest.hexdigest()

    def check(self) -> None:
        """Load every category's regions now, so a broken folder fails at start, clearly."""
        for category in self.config.categories:
            if category.strategy == "mixture_of_prompts":
                self.mixture(category)

    def _category(self, name: str | None) -> Category | None:
        if name is None or name not in self.config.category_names:
            return None
        return self.config.category(name)

    def _mixture_shaping(self, category: Category, instruction: str) -> Shaping:
        mixture = self.mixture(category)
        settings = self.config.strategies.mixture_of_prompts
        embedding = self._embedder().encode([instruction])[0]
        region = mixture.region_of(embedding)
        demos = mixture.demos_for(
            region, embedding, token_budget=settings.demo_tokens, max_demos=settings.max_demos
        )
        return Shaping(
            strategy="mixture_of_prompts",
            system=mixture.instructions[region],
            demos=tuple(demos),
            region=region,
        )

    def describe(self, category_name: str | None, messages: Sequence[Message]) -> Shaping:
        """The shaping without calling any LLM (for `coe route` and /v1/route): a generated
        identity is shown as the static one it falls back to."""
        category = self._category(category_name)
        if category is None or category.strategy == "none":
            return NONE
        instruction = last_instruction(messages)
        if category.strategy == "mixture_of_prompts":
            return self._mixture_shaping(category, instruction)
        identity = static_identity(category)
        mode = self.config.strategies.expert_prompting.mode
        return Shaping(
            strategy="expert_prompting",
            system=identity,
            identity=identity,
            identity_source="static" if mode == "static" else "fallback",
        )

    async def shape(self, category_name: str | None, messages: Sequence[Message]) -> Shaping:
        category = self._category(category_name)
        if category is None or category.strategy == "none":
            return NONE
        if category.strategy == "mixture_of_prompts":
            # An embedding may take milliseconds of CPU: off the event loop.
            return await asyncio.to_thread(self.describe, category_name, messages)
        if self.writer is None:
            return self.describe(category_name, messages)
        found = await self.writer.identity(category, last_instruction(messages))
        return Shaping(
            strategy="expert_prompting",
            system=found.text,
            identity=found.text,
            identity_source=found.source,
        )
