"""Sticky sessions: a conversation's later turns go to the expert that answered the earlier ones.

A conversation is found two ways: by the session id the caller sends, and by the conversation
so far (its hash, stored with every answer appended), so a client that resends the whole
history needs no id. Both live in the store for ``ttl_s``.

Both are scoped to their owner (the gateway's client subject, ``key:NAME``): a session id or a
conversation is only ever found by the client that made it, so one API key cannot pin, or learn
the expert of, another key's session by sending the same id or history.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence

from coe.orchestrator.decisions import continued
from coe.store import Store
from coe.types import Message, RouteDecision


def conversation_hash(messages: Sequence[Message]) -> str:
    turns: list[list[object]] = []
    for m in messages:
        turn: list[object] = [m.role, m.content]
        if m.tool_calls:  # a call is known by its function and arguments (ids are ours)
            turn.append([[c.name, c.arguments] for c in m.tool_calls])
        turns.append(turn)
    blob = json.dumps(turns, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def _scoped(owner: str, value: str) -> str:
    # The owner's length first: ("ab", "c") and ("a", "bc") must never share a key.
    return hashlib.sha256(f"{len(owner)}:{owner}{value}".encode()).hexdigest()


def _session_key(owner: str, session: str) -> str:
    return "session:id:" + _scoped(owner, session)


def _conversation_key(owner: str, messages: Sequence[Message]) -> str:
    return "session:conversation:" + _scoped(owner, conversation_hash(messages))


class Sessions:
    def __init__(self, store: Store, experts: Iterable[str], ttl_s: int):
        self.store = store
        self.experts = set(experts)
        self.ttl_s = ttl_s

    async def lookup(
        self, messages: Sequence[Message], session: str | None, owner: str = ""
    ) -> RouteDecision | None:
        """The expert that answered this conversation of ``owner``'s before, if it is still in
        the pool."""
        keys = []
        if session:
            keys.append(_session_key(owner, session))
        # The conversation up to the expert's last answer: before the latest user turn, or
        # before the tool results that answer its calls.
        last_user = max(i for i, m in enumerate(messages) if m.role == "user")
        end = len(messages) if messages[-1].role == "tool" else last_user
        while end > 0 and messages[end - 1].role == "tool":
            end -= 1
        earlier = messages[:end]
        if earlier and earlier[-1].role == "assistant":
            keys.append(_conversation_key(owner, earlier))
        for key in keys:
            raw = await self.store.get(key)
            if raw is None:
                continue
            seen = json.loads(raw)
            if seen["expert"] not in self.experts:
                continue  # the pool changed since; route afresh
            return continued(seen["expert"], seen["category"])
        return None

    async def remember(
        self,
        messages: Sequence[Message],
        decision: RouteDecision,
        answers: Iterable[str | Message],
        session: str | None = None,
        owner: str = "",
    ) -> None:
        """Store the expert for ``owner``'s next turn of the conversation (each answer appended
        to it: its text, or the assistant turn with its tool calls)."""
        value = json.dumps({"expert": decision.expert, "category": decision.category}).encode()
        turns = [a if isinstance(a, Message) else Message("assistant", a) for a in answers]
        for turn in dict.fromkeys(turns):  # the client may go on from any choice
            following = [*messages, turn]
            await self.store.set(_conversation_key(owner, following), value, self.ttl_s)
        if session:
            await self.store.set(_session_key(owner, session), value, self.ttl_s)
