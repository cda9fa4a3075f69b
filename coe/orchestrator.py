"""The request flow shared by every front end: route, shape the prompt, generate.

A request names its expert, or the router picks one (``router.path`` in experts.yaml). A pool
without a router sends every request to the fallback category's expert (``router.fallback``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from coe.cache.pool import EnginePool
from coe.config import Expert, PoolConfig
from coe.engines.base import EngineError
from coe.errors import BadRequestError
from coe.prompts.identity import IdentityWriter
from coe.prompts.strategies import NONE as NO_SHAPING
from coe.prompts.strategies import Shaping, Strategies
from coe.router.base import Embedder, Router
from coe.router.embed import RecentEmbeddings
from coe.store import MemoryStore, Store
from coe.types import Chunk, Message, Prompt, RouteDecision, SamplingParams, Usage, collect

__all__ = ["ChatResult", "Orchestrator", "RouteDecision", "UnknownExpertError", "to_messages"]


class UnknownExpertError(BadRequestError, KeyError):
    http_status = 404

    def __init__(self, name: str, known: list[str]):
        self.name = name
        self.known = known
        super().__init__(name)

    def __str__(self) -> str:
        return f"unknown expert {self.name!r}; defined experts: {', '.join(self.known)}"


@dataclass
class ChatResult:
    decision: RouteDecision
    text: str
    finish_reason: str | None
    usage: Usage
    latency_s: float
    prompt: Prompt | None = field(default=None, repr=False)


def with_shaping(decision: RouteDecision, shaping: Shaping) -> RouteDecision:
    return replace(
        decision,
        strategy=shaping.strategy,
        region=shaping.region,
        identity=shaping.identity,
        identity_source=shaping.identity_source,
    )


def to_messages(raw: Iterable[Message | Mapping[str, Any]]) -> list[Message]:
    out = []
    for m in raw:
        if isinstance(m, Message):
            out.append(m)
        else:
            out.append(Message(role=m["role"], content=str(m["content"])))
    return out


class Orchestrator:
    def __init__(
        self,
        config: PoolConfig,
        engines: EnginePool | None = None,
        router: Router | None = None,
        store: Store | None = None,
    ):
        self.config = config
        self.engines = engines or EnginePool(config)
        self.router = router
        self._embedder: Embedder | None = None
        if router is not None and hasattr(router, "embedder"):
            # Router and mixture-of-prompts share one embedder, and its recent results.
            router.embedder = self._embedder = RecentEmbeddings(router.embedder)
        self.strategies = Strategies(self.config, self.embedder)
        self.use_store(store or MemoryStore())

    @property
    def identity_writer(self) -> str:
        """The expert that writes generated identities."""
        settings = self.config.strategies.expert_prompting
        return settings.writer or self.config.category(self.config.router.fallback).expert

    def use_store(self, store: Store) -> None:
        """Where generated expert identities are cached (the gateway passes its Redis)."""
        self.store = store
        settings = self.config.strategies.expert_prompting
        self.strategies.writer = IdentityWriter(
            settings, store, self._write, writer_name=self.identity_writer
        )

    def embedder(self) -> Embedder:
        """The router's embedder (mixture-of-prompts regions live in its space)."""
        if self._embedder is None:
            found = getattr(self.router, "embedder", None)
            if found is None:
                from coe.router.embed import load_embedder

                found = load_embedder()
            self._embedder = found
        return self._embedder

    async def _write(self, messages: list[Message]) -> str:
        """Generate with the identity writer expert (greedy): expert-prompting's second LLM."""
        settings = self.config.strategies.expert_prompting
        name = self.identity_writer
        writer = self.config.expert(name)
        prompt = Prompt(messages=tuple(messages), format=writer.prompt_format)
        params = SamplingParams(temperature=0.0, max_tokens=settings.max_tokens)
        done = await collect(self.engines.engine_for(name).stream(prompt, params))
        return done.text

    # -- routing ---------------------------------------------------------------------------
    def route(self, messages: list[Message], expert: str | None = None) -> RouteDecision:
        t0 = time.perf_counter()
        if expert is not None:
            if expert not in self.config.expert_names:
                raise UnknownExpertError(expert, self.config.expert_names)
            return RouteDecision(
                expert=expert,
                category=None,
                confidence=None,
                fell_back=False,
                reason="expert chosen by the caller",
                latency_s=time.perf_counter() - t0,
            )
        if self.router is not None:
            return self.router.route(messages)
        fallback = self.config.category(self.config.router.fallback)
        return RouteDecision(
            expert=fallback.expert,
            category=fallback.name,
            confidence=None,
            fell_back=True,
            reason="no router configured: fallback category",
            latency_s=time.perf_counter() - t0,
        )

    # -- shaping ---------------------------------------------------------------------------
    def build_prompt(
        self,
        expert: Expert,
        messages: list[Message],
        system: str | None = None,
        shaping: Shaping = NO_SHAPING,
    ) -> Prompt:
        """System text, then the strategy's demos, then the conversation.

        The caller's ``system`` (or the conversation's own system messages) replaces the
        expert's system prompt; otherwise the strategy's text (an identity, a region's
        instruction) comes first and the expert's system prompt after it.
        """
        turns = [m for m in messages if m.role != "system"]
        given = "\n\n".join(m.content for m in messages if m.role == "system")
        if system is not None or given:
            system_text: str | None = system if system is not None else given
        else:
            parts = [shaping.system, expert.system_prompt]
            system_text = "\n\n".join(p for p in parts if p) or None
        demos = []
        for demo in shaping.demos:
            demos += [Message("user", demo.input), Message("assistant", demo.output)]
        final = ([Message("system", system_text)] if system_text else []) + demos + turns
        return Prompt(messages=tuple(final), format=expert.prompt_format)

    def sampling_for(self, expert: Expert, **overrides: Any) -> SamplingParams:
        base = expert.sampling
        params = SamplingParams(
            temperature=base.temperature,
            top_p=base.top_p,
            max_tokens=base.max_tokens,
            repetition_penalty=base.repetition_penalty,
            seed=base.seed,
        )
        given = {k: v for k, v in overrides.items() if v is not None}
        if "stop" in given:
            given["stop"] = tuple(given["stop"])
        return replace(params, **given)

    # -- generation ------------------------------------------------------------------------
    async def stream(
        self,
        messages: Iterable[Message | Mapping[str, Any]],
        *,
        expert: str | None = None,
        system: str | None = None,
        request_id: str | None = None,
        decision: RouteDecision | None = None,
        shaping: Shaping | None = None,
        **sampling: Any,
    ) -> tuple[RouteDecision, Prompt, AsyncIterator[Chunk]]:
        """Route and shape now; return the decision, the final prompt and the token stream.

        A caller that already decided (the gateway: a sticky session, several choices of one
        request) passes ``decision`` and routing is skipped, and ``shaping`` (from ``shape``)
        so that the prompt strategy runs once per request, not once per choice.
        """
        msgs = to_messages(messages)
        if not any(m.role == "user" for m in msgs):
            raise ValueError("the conversation has no user message")
        if decision is None:
            decision = self.route(msgs, expert)
        # The decision is the weight cache's prefetch signal: start moving the expert up now,
        # before the request reaches the head of its queue (and before any identity writing).
        prefetch = getattr(self.engines, "prefetch", None)
        if prefetch is not None:
            prefetch(decision.expert)
        if shaping is None:
            shaping = await self.shape(decision, msgs, system)
        decision = with_shaping(decision, shaping)
        chosen = self.config.expert(decision.expert)
        prompt = self.build_prompt(chosen, msgs, system, shaping)
        params = self.sampling_for(chosen, **sampling)
        engine = self.engines.engine_for(decision.expert)
        return decision, prompt, self._generate(engine, prompt, params, request_id)

    async def shape(
        self, decision: RouteDecision, messages: list[Message], system: str | None = None
    ) -> Shaping:
        """The category's prompt strategy for this conversation. A system prompt from the
        caller replaces the strategy's text (identity or instruction); demos still apply."""
        shaping = await self.strategies.shape(decision.category, messages)
        if system is not None or any(m.role == "system" for m in messages):
            shaping = replace(shaping, system=None, identity=None, identity_source=None)
        return shaping

    async def _generate(
        self, engine: Any, prompt: Prompt, params: SamplingParams, request_id: str | None
    ) -> AsyncIterator[Chunk]:
        # A request that fails because its engine died is retried once on the restarted engine,
        # but only if nothing reached the caller yet: a half-streamed answer cannot be redone.
        for attempt in range(2):
            produced = False
            try:
                async for chunk in engine.stream(prompt, params, request_id):
                    produced = True
                    yield chunk
                return
            except EngineError as exc:
                if produced or not exc.retryable or attempt == 1:
                    raise

    async def chat(
        self,
        messages: Iterable[Message | Mapping[str, Any]],
        *,
        expert: str | None = None,
        system: str | None = None,
        decision: RouteDecision | None = None,
        **sampling: Any,
    ) -> ChatResult:
        t0 = time.perf_counter()
        decision, prompt, chunks = await self.stream(
            messages, expert=expert, system=system, decision=decision, **sampling
        )
        completion = await collect(chunks)
        return ChatResult(
            decision=decision,
            text=completion.text,
            finish_reason=completion.finish_reason,
            usage=completion.usage,
            latency_s=time.perf_counter() - t0,
            prompt=prompt,
        )

    async def start(self, experts: list[str] | None = None) -> None:
        self.strategies.check()
        await self.engines.start(experts)

    async def close(self) -> None:
        await self.engines.shutdown()
