"""``none``: the conversation goes to the expert as it is."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from coe.config import Category
from coe.prompts.base import NONE, Shaping, StrategyContext
from coe.types import Message


class NoShaping:
    name: ClassVar[str] = "none"

    def __init__(self, context: StrategyContext):
        self.context = context

    def describe(self, category: Category, messages: Sequence[Message]) -> Shaping:
        return NONE

    async def shape(self, category: Category, messages: Sequence[Message]) -> Shaping:
        return NONE

    def fingerprint(self, category: Category) -> bytes:
        return b""

    def check(self, category: Category) -> None:
        pass
