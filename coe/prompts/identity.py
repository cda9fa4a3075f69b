"""Expert-prompting (after Xu et al. 2023, "ExpertPrompting"): the expert answers in the persona
of the expert best suited to the instruction, described in the second person.

``static`` uses the category's identity from experts.yaml. ``generated`` has an LLM (the
``writer`` expert) write one for each instruction, from a few examples of (instruction, identity)
pairs written for coe; identities are cached in the store by instruction, and when writing takes
longer than the budget the static identity is used while the writing finishes in the background
and fills the cache for the next time.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from coe.config import Category, ExpertPromptingSettings
from coe.store import Store
from coe.types import Message

log = logging.getLogger(__name__)

TASK = (
    "For each instruction, describe in two or three sentences, in the second person, the expert "
    "best placed to carry it out: their field, experience and way of working."
)

# Our own examples: varied fields, each identity specific to its instruction.
EXAMPLES: tuple[tuple[str, str], ...] = (
    (
        "Explain why the sky is blue.",
        "You are an atmospheric physicist who has taught optics to undergraduates for twenty "
        "years. You explain scattering of light with simple pictures first and the physics "
        "after, and you never skip the step that makes it click.",
    ),
    (
        "Write a Python function that merges two sorted lists.",
        "You are a senior software engineer who writes clear, tested Python. You reach for the "
        "simplest correct algorithm, state its complexity, and handle empty inputs and "
        "duplicates without being asked.",
    ),
    (
        "Draft a polite email asking my landlord to fix the heating.",
        "You are an experienced tenant-rights advisor and a careful writer of letters. You keep "
        "the tone courteous and firm, state the facts and dates, and ask for a specific action "
        "by a specific time.",
    ),
    (
        "What caused the fall of the Western Roman Empire?",
        "You are a historian of late antiquity who weighs economic, military and political "
        "causes against the evidence. You present the main scholarly views fairly and say "
        "where they disagree.",
    ),
)


def default_identity(category: Category) -> str:
    subject = category.description.rstrip(".") or category.name.replace("_", " ")
    return f"You are a seasoned expert in this field: {subject}. Answer with that expertise."


def static_identity(category: Category) -> str:
    return category.identity or default_identity(category)


def writer_prompt(instruction: str) -> list[Message]:
    """The few-shot conversation that asks the writer for an identity."""
    messages = [Message("system", TASK)]
    for example, identity in EXAMPLES:
        messages += [Message("user", example), Message("assistant", identity)]
    messages.append(Message("user", instruction.strip()))
    return messages


def clean_identity(text: str) -> str | None:
    """The first paragraph, if it reads as a second-person identity."""
    first = text.strip().split("\n\n")[0].strip()
    return first if first.lower().startswith("you ") and len(first) > 20 else None


@dataclass(frozen=True)
class Identity:
    text: str
    # static | generated | cached | fallback (the static one, because writing failed or was slow)
    source: str


# (messages) -> generated text: how the writer expert is called (the orchestrator supplies it).
WriteFn = Callable[[list[Message]], Awaitable[str]]


# Only the start of a long instruction is sent to the writer: it says what the task is.
INSTRUCTION_CHARS = 2000
# A failed writing is remembered this long, so repeats of the prompt do not wait for it again.
FAILURE_TTL_S = 300
_FAILED = b""


class IdentityWriter:
    def __init__(
        self,
        settings: ExpertPromptingSettings,
        store: Store,
        write: WriteFn,
        writer_name: str | None = None,
    ):
        self.settings = settings
        self.store = store
        self.write = write
        self.writer_name = writer_name or settings.writer
        self._pending: dict[str, asyncio.Task[str | None]] = {}

    def key(self, instruction: str) -> str:
        # Keyed by the expert that writes: another writer means other identities.
        digest = hashlib.sha256(f"{self.writer_name}\n{instruction}".encode()).hexdigest()
        return "identity:" + digest

    async def identity(self, category: Category, instruction: str) -> Identity:
        static = static_identity(category)
        if self.settings.mode == "static":
            return Identity(static, "static")
        instruction = instruction.strip()[:INSTRUCTION_CHARS]
        key = self.key(instruction)
        task = self._pending.get(key)
        if task is None:
            cached = await self.store.get(key)
            if cached == _FAILED:
                return Identity(static, "fallback")
            if cached is not None:
                return Identity(cached.decode(), "cached")
            task = self._pending.get(key)  # another request may have started it meanwhile
        if task is None:
            # One writing per instruction at a time; it outlives a budget that runs out, and
            # stores what it wrote for the next request.
            task = self._pending[key] = asyncio.ensure_future(self._write(key, instruction))
            task.add_done_callback(lambda _: self._pending.pop(key, None))
        try:
            written = await asyncio.wait_for(asyncio.shield(task), self.settings.budget_s)
        except TimeoutError:
            return Identity(static, "fallback")
        return Identity(written, "generated") if written else Identity(static, "fallback")

    async def _write(self, key: str, instruction: str) -> str | None:
        try:
            text = clean_identity(await self.write(writer_prompt(instruction)))
        except Exception as exc:  # a failed identity must never fail the request itself
            log.warning("expert identity not written (%s); using the static one", exc)
            text = None
        if text is None:
            await self.store.set(key, _FAILED, FAILURE_TTL_S)
        else:
            await self.store.set(key, text.encode(), self.settings.cache_ttl_s)
        return text
