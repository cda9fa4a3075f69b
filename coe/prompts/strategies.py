"""The prompt strategy of each category, applied between routing and generation.

Each category names its strategy in experts.yaml; Strategies finds it in coe.prompts.registry
and asks it for the Shaping (see coe/prompts/base.py) of a conversation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from coe.config import Category, PoolConfig
from coe.prompts.base import NONE, PromptStrategy, Shaping, StrategyContext
from coe.prompts.identity import IdentityWriter
from coe.prompts.mixture import MixtureOfPrompts
from coe.prompts.mixture_of_prompts import MixtureOfPromptsStrategy
from coe.prompts.registry import STRATEGIES, check_strategy_names
from coe.router.base import Embedder
from coe.types import Message

__all__ = ["NONE", "Shaping", "Strategies"]


class Strategies:
    def __init__(
        self,
        config: PoolConfig,
        embedder: Callable[[], Embedder],
        writer: IdentityWriter | None = None,
    ):
        check_strategy_names(config)  # a pool built without load_config + the CLI's check
        self.config = config
        self.context = StrategyContext(config, embedder, writer)
        # One of each: a strategy keeps what it loaded (regions, ...) for every category.
        self._strategies: dict[str, PromptStrategy] = {
            name: kind(self.context) for name, kind in STRATEGIES.items()
        }

    @property
    def writer(self) -> IdentityWriter | None:
        return self.context.writer

    @writer.setter
    def writer(self, writer: IdentityWriter | None) -> None:
        self.context.writer = writer

    def strategy(self, category: Category) -> PromptStrategy:
        return self._strategies[category.strategy]

    def mixture(self, category: Category) -> MixtureOfPrompts:
        """The category's mixture-of-prompts regions (loaded once)."""
        strategy = self._strategies[MixtureOfPromptsStrategy.name]
        assert isinstance(strategy, MixtureOfPromptsStrategy)
        return strategy.mixture(category)

    def fingerprint(self) -> str:
        """A hash of what every category's shaping reads (region files, ...): cached answers end
        when it changes."""
        digest = hashlib.sha256()
        for category in self.config.categories:
            digest.update(self.strategy(category).fingerprint(category))
        return digest.hexdigest()

    def check(self) -> None:
        """Load what every category needs now, so a broken folder fails at start, clearly."""
        for category in self.config.categories:
            self.strategy(category).check(category)

    def _category(self, name: str | None) -> Category | None:
        if name is None or name not in self.config.category_names:
            return None
        return self.config.category(name)

    def describe(self, category_name: str | None, messages: Sequence[Message]) -> Shaping:
        """The shaping without calling any LLM (for `coe route` and /v1/route): a generated
        identity is shown as the static one it falls back to."""
        category = self._category(category_name)
        if category is None:
            return NONE
        return self.strategy(category).describe(category, messages)

    async def shape(self, category_name: str | None, messages: Sequence[Message]) -> Shaping:
        category = self._category(category_name)
        if category is None:
            return NONE
        return await self.strategy(category).shape(category, messages)
