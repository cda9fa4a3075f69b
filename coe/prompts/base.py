"""What a prompt strategy is: given a conversation routed to a category, say what goes before it.

A Shaping says what goes before the conversation: a system text (an expert identity, or a
mixture region's instruction, ahead of the expert's own system prompt) and demos (earlier
user/assistant turns). Each strategy is one module meeting ``PromptStrategy`` and one line of
``coe.prompts.registry``; experts.yaml names it in a category's ``strategy``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

from coe.config import Category, PoolConfig
from coe.prompts.mixture import Demo
from coe.router.base import Embedder
from coe.types import Message

if TYPE_CHECKING:
    from coe.prompts.identity import IdentityWriter


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
    """The instruction a strategy looks at: the conversation's last user turn."""
    return next(m.content for m in reversed(messages) if m.role == "user")


@dataclass
class StrategyContext:
    """What every strategy may use; shared by all of them, so a writer set later reaches each."""

    config: PoolConfig
    # The router's embedder, made on first use (most pools never need it).
    embedder: Callable[[], Embedder]
    # Writes expert identities with an LLM; the orchestrator sets it once it has a store.
    writer: IdentityWriter | None = None


class PromptStrategy(Protocol):
    # The name experts.yaml gives it (a category's ``strategy``), reported in Shaping.strategy.
    name: ClassVar[str]

    def __init__(self, context: StrategyContext) -> None: ...

    def describe(self, category: Category, messages: Sequence[Message]) -> Shaping:
        """The shaping without calling any LLM (for `coe route` and /v1/route)."""
        ...

    async def shape(self, category: Category, messages: Sequence[Message]) -> Shaping:
        """The shaping a request is answered with."""
        ...

    def fingerprint(self, category: Category) -> bytes:
        """What the category's shaping depends on beyond experts.yaml (files it reads): cached
        answers end when it changes. Empty when nothing."""
        ...

    def check(self, category: Category) -> None:
        """Called at start: load what the category needs now, so a broken file fails clearly."""
        ...
