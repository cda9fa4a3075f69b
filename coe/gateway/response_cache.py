"""The response cache: a whole answer kept in the store, served again to the same request.

The key covers the model as asked ("auto" too) and everything that shapes the answer, so a hit
skips routing as well as generation. Only answers a repeat would reproduce are kept (greedy or
seeded sampling), unless the operator or the request asks otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

from coe.config import PoolConfig, ResponseCacheSettings
from coe.gateway import metrics
from coe.gateway.call import Call
from coe.orchestrator import named_expert
from coe.store import Store
from coe.types import Message, RouteDecision, TokenLogprob, ToolCall, Usage

log = logging.getLogger(__name__)


@dataclass
class Answer:
    """A finished chat answer: what the cache stores and what a response is built from."""

    decision: RouteDecision
    texts: list[str]
    finish_reasons: list[str | None]
    usage: Usage
    cache: str = "miss"
    # Per choice: its tool calls, and its tokens' log probabilities when asked for.
    tool_calls: list[list[ToolCall]] = field(default_factory=list)
    logprobs: list[list[TokenLogprob] | None] = field(default_factory=list)

    def calls(self, i: int) -> list[ToolCall]:
        return self.tool_calls[i] if i < len(self.tool_calls) else []

    def choice_logprobs(self, i: int) -> list[TokenLogprob] | None:
        return self.logprobs[i] if i < len(self.logprobs) else None

    def turns(self) -> list[Message]:
        """Each choice as the assistant turn a client sends back in its next request."""
        return [
            Message("assistant", text, tuple(self.calls(i))) for i, text in enumerate(self.texts)
        ]

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "decision": self.decision.as_dict(),
                "texts": self.texts,
                "finish_reasons": self.finish_reasons,
                "usage": [self.usage.prompt_tokens, self.usage.completion_tokens],
                "tool_calls": [[asdict(c) for c in calls] for calls in self.tool_calls],
                "logprobs": [
                    None if lps is None else [[lp.token, lp.logprob, lp.top] for lp in lps]
                    for lps in self.logprobs
                ],
            }
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Answer:
        """Raises ValueError (or KeyError, TypeError) for an entry in another format."""
        data = json.loads(raw)
        # Entries are versioned by the store's key prefix; unknown fields mean another format.
        return cls(
            decision=RouteDecision.from_dict(data["decision"]),
            texts=data["texts"],
            finish_reasons=data["finish_reasons"],
            usage=Usage(*data["usage"]),
            cache="hit",
            tool_calls=[[ToolCall(**c) for c in calls] for calls in data.get("tool_calls", [])],
            logprobs=[
                None
                if lps is None
                else [TokenLogprob(t, v, [(a, b) for a, b in top]) for t, v, top in lps]
                for lps in data.get("logprobs", [])
            ],
        )


class ResponseCache:
    def __init__(
        self, store: Store, settings: ResponseCacheSettings, config: PoolConfig, pool: str
    ):
        """``pool`` fingerprints the pool (experts.yaml, router, prompt regions): answers made
        under another one are not served."""
        self.store = store
        self.settings = settings
        self.config = config
        self.pool = pool

    def key(self, call: Call) -> str:
        req = call.request
        blob = json.dumps(
            {
                "pool": self.pool,
                "model": req.model,
                "messages": [_turn(m) for m in call.messages],
                "sampling": req.sampling(),
                # A plain answer is never one to a request with tools, nor the other way round.
                "tools": req.tool_spec(),
                "n": req.n,
                "session": call.session,
                # A sampled answer kept on request is only for requests that ask the same way.
                "kept_on_request": call.cache_control == "store",
                # Unless shared, a client never sees (or learns of) another client's prompts.
                "client": None if self.settings.shared else call.client.subject,
            },
            sort_keys=True,
            ensure_ascii=False,
            default=_plain,
        )
        return "response:" + hashlib.sha256(blob.encode()).hexdigest()

    def _enabled(self, call: Call) -> bool:
        return self.settings.enabled and call.cache_control != "no-cache"

    def _storable_anyway(self, call: Call) -> bool:
        return self.settings.nondeterministic or call.cache_control == "store"

    def _storable(self, call: Call, expert: str) -> bool:
        """Only answers a repeat would reproduce: greedy or seeded sampling, unless asked."""
        if self._storable_anyway(call):
            return True
        req, defaults = call.request, self.config.expert(expert).sampling
        temperature = req.temperature if req.temperature is not None else defaults.temperature
        seed = req.seed if req.seed is not None else defaults.seed
        return temperature == 0 or seed is not None

    def _may_hit(self, call: Call) -> bool:
        """Whether a stored answer may serve this request, decided before routing."""
        if not self._enabled(call):
            return False
        named = named_expert(self.config, call.request.model)
        if named is not None:
            return self._storable(call, named)
        # auto: an answer was stored only if the expert it was routed to answers repeatably
        # (or it was kept on request, which is part of the key), and the same request routes
        # the same way under the same pool and router (also part of the key).
        req = call.request
        sampled = req.temperature is not None and req.temperature > 0 and req.seed is None
        return not sampled or self._storable_anyway(call)

    async def get(self, call: Call) -> Answer | None:
        if not self._may_hit(call):
            return None
        raw = await self.store.get(self.key(call))
        if raw is None:
            metrics.RESPONSE_CACHE.labels("miss").inc()
            return None
        try:
            answer = Answer.from_json(raw)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring a cached answer in an unknown format: %s", exc)
            return None
        metrics.RESPONSE_CACHE.labels("hit").inc()
        return answer

    def status(self, call: Call, decision: RouteDecision) -> str:
        """For a generated answer: "miss" when it will be cached, else "bypass"."""
        if not self.store.healthy:
            return "bypass"
        if decision.identity_source == "fallback":
            # The generated identity was late: a repeat will get it, so do not keep this one.
            return "bypass"
        storable = self._enabled(call) and self._storable(call, decision.expert)
        return "miss" if storable else "bypass"

    async def put(self, call: Call, answer: Answer) -> None:
        """Keep a whole answer that ``status`` called a "miss"."""
        if answer.cache == "miss":
            await self.store.set(self.key(call), answer.to_json(), self.settings.ttl_s)


def _turn(m: Message) -> list[Any]:
    turn: list[Any] = [m.role, m.content]
    if m.tool_calls or m.tool_call_id is not None:
        turn += [[asdict(c) for c in m.tool_calls], m.tool_call_id]
    return turn


def _plain(value: Any) -> Any:
    """JSON for the key's dataclasses (a ToolSpec, a ResponseFormat)."""
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    raise TypeError(f"not JSON: {type(value).__name__}")
