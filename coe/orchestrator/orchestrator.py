"""The request flow shared by every front end: decide, shape the prompt, generate.

A request names its expert, or the router picks one (``router.path`` in experts.yaml). A pool
without a router sends every request to the fallback category's expert (``router.fallback``).
Every decision is made here (decisions.py builds the ones no router makes), so the CLI, the
gateway and the evals route alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from coe.cache.pool import EnginePool
from coe.config import Expert, PoolConfig
from coe.engines.base import EngineError
from coe.orchestrator import decisions
from coe.orchestrator.decisions import AUTO, CALLER_REASON, CATEGORY_PREFIX, How
from coe.orchestrator.generation import Generation, Route, falls_back, within_deadlines
from coe.orchestrator.prompting import (
    build_prompt,
    check_tools,
    sampling_for,
    to_messages,
    with_shaping,
)
from coe.orchestrator.recording import Origin, RequestTrace
from coe.orchestrator.sessions import Sessions
from coe.prompts.identity import IdentityWriter
from coe.prompts.strategies import NONE as NO_SHAPING
from coe.prompts.strategies import Shaping, Strategies
from coe.requestlog import RequestLog
from coe.router.base import Embedder, Router
from coe.router.embed import RecentEmbeddings
from coe.store import MemoryStore, Store
from coe.types import (
    Chunk,
    Message,
    Prompt,
    RouteDecision,
    SamplingParams,
    ToolSpec,
    Usage,
    collect,
)

log = logging.getLogger(__name__)


@dataclass
class ChatResult:
    decision: RouteDecision
    text: str
    finish_reason: str | None
    usage: Usage
    latency_s: float
    prompt: Prompt | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Plan:
    """A request decided and shaped: what every choice of it is generated from, so the prompt
    strategy runs once per request. ``decision`` already carries the shaping's description.

    ``route`` is shared by the request's choices: the experts it may fall back to, and the
    decision as it stands (``route.decision`` names the expert that actually answers)."""

    decision: RouteDecision
    shaping: Shaping
    how: How
    route: Route = field(compare=False, repr=False)


class Orchestrator:
    def __init__(
        self,
        config: PoolConfig,
        engines: EnginePool | None = None,
        router: Router | None = None,
        store: Store | None = None,
        requests: RequestLog | None = None,
    ):
        """``store`` keeps generated expert identities and sticky sessions (the gateway passes
        its Redis; by default they live in this process). ``requests``: the request log every
        request is recorded in (off by default; the front ends open the configured one); the
        orchestrator closes it."""
        self.config = config
        self.requests = requests or RequestLog.off()
        self.engines = engines or EnginePool(config)
        self.router = router
        self.store = store or MemoryStore()
        self._embedder: Embedder | None = None
        if router is not None and hasattr(router, "embedder"):
            # Router and mixture-of-prompts share one embedder, and its recent results.
            router.embedder = self._embedder = RecentEmbeddings(router.embedder)
        writer = IdentityWriter(
            config.strategies.expert_prompting,
            self.store,
            self._write,
            writer_name=config.identity_writer,
        )
        self.strategies = Strategies(config, self.embedder, writer)
        self.sessions = Sessions(self.store, config.expert_names, config.gateway.session_ttl_s)

    @property
    def identity_writer(self) -> str:
        """The expert that writes generated identities."""
        return self.config.identity_writer

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
        name = self.identity_writer
        writer = self.config.expert(name)
        prompt = Prompt(messages=tuple(messages), format=writer.prompt_format)
        max_tokens = self.config.strategies.expert_prompting.max_tokens
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        done = await collect(self.engines.engine_for(name).stream(prompt, params))
        return done.text

    def fingerprint(self) -> str:
        """A hash of what shapes answers beyond experts.yaml: the router's files (a router
        refitted in place) and the prompt strategies' region files."""
        return _router_fingerprint(self.router) + self.strategies.fingerprint()

    # -- deciding ----------------------------------------------------------------------------
    def route(self, messages: list[Message], expert: str | None = None) -> RouteDecision:
        """The expert named, else the router's choice, else the fallback category's expert."""
        return self._route(messages, expert)[0]

    def _route(self, messages: list[Message], expert: str | None) -> tuple[RouteDecision, How]:
        t0 = time.perf_counter()
        if expert is not None:
            decision = decisions.chosen_expert(self.config, expert)
            return replace(decision, latency_s=time.perf_counter() - t0), "caller"
        if self.router is not None:
            decision = self.router.route(messages)
            return decision, "fallback" if decision.fell_back else "router"
        return decisions.fallback(self.config, latency_s=time.perf_counter() - t0), "fallback"

    def pick(
        self, expert: str, *, category: str | None = None, reason: str = CALLER_REASON
    ) -> RouteDecision:
        """An expert chosen without the router (an eval's baseline, say), with the ``category``
        whose prompt strategy applies, if the pool knows it."""
        return decisions.chosen_expert(self.config, expert, category=category, reason=reason)

    async def decide(
        self, model: str, messages: list[Message], session: str | None = None, owner: str = ""
    ) -> tuple[RouteDecision, How]:
        """The expert for a request and how it was chosen.

        ``model`` is ``auto`` (a sticky session, else the router), an expert's name, or
        ``auto:CATEGORY``; anything else raises UnknownModelError. ``owner`` (the client's
        subject) scopes the sticky session: only its own sessions are found.
        """
        if model == AUTO:
            sticky = await self.sessions.lookup(messages, session, owner)
            # Tool results go back to the expert that made the calls, whatever the router
            # would say of the conversation now.
            answers_calls = bool(messages) and messages[-1].role == "tool"
            if sticky is not None and (answers_calls or not self._tells_new_tasks()):
                return sticky, "session"
            if self.router is None:
                return self._route(messages, None)
            # The embedding takes milliseconds of CPU: keep the event loop free for streams.
            decision, how = await asyncio.to_thread(self._route, messages, None)
            if sticky is not None and decision.continues:
                return sticky, "session"  # a follow-up stays with the expert that answered
            return decision, how
        if model.startswith(CATEGORY_PREFIX):
            return decisions.chosen_category(self.config, model), "category"
        if model in self.config.expert_names:
            return self._route(messages, model)
        raise decisions.UnknownModelError(model, decisions.model_names(self.config))

    def _tells_new_tasks(self) -> bool:
        """Whether the router can tell a follow-up from a new task; without that, a session
        keeps its expert for every turn."""
        return bool(getattr(self.router, "tells_followups", False))

    async def remember(
        self,
        messages: Sequence[Message],
        decision: RouteDecision,
        answers: Iterable[str | Message],
        session: str | None = None,
        owner: str = "",
    ) -> None:
        """``owner``'s next turn of the conversation (after any of ``answers``) stays with this
        expert."""
        await self.sessions.remember(messages, decision, answers, session, owner)

    # -- shaping -----------------------------------------------------------------------------
    async def prepare(
        self,
        decision: RouteDecision,
        messages: list[Message],
        system: str | None = None,
        how: How = "caller",
    ) -> Plan:
        """Prefetch the expert, then run the category's prompt strategy for this request."""
        # The decision is the weight cache's prefetch signal: start moving the expert up now,
        # before the request reaches the head of its queue and before any identity writing.
        prefetch = getattr(self.engines, "prefetch", None)
        if prefetch is not None:
            prefetch(decision.expert)
        shaping = await self.shape(decision, messages, system)
        shaped = with_shaping(decision, shaping)
        route = Route(shaped, self.config.fallbacks_for(decision.category))
        return Plan(shaped, shaping, how, route)

    async def shape(
        self, decision: RouteDecision, messages: list[Message], system: str | None = None
    ) -> Shaping:
        """The category's prompt strategy for this conversation. A system prompt from the
        caller replaces the strategy's text (identity or instruction); demos still apply."""
        shaping = await self.strategies.shape(decision.category, messages)
        if system is not None or any(m.role == "system" for m in messages):
            shaping = replace(shaping, system=None, identity=None, identity_source=None)
        return shaping

    def describe(self, decision: RouteDecision, messages: list[Message]) -> RouteDecision:
        """The decision with the strategy it would get, without calling any LLM (a generated
        identity shows as the static one it falls back to): `coe route`, /v1/route."""
        return with_shaping(decision, self.strategies.describe(decision.category, messages))

    def build_prompt(
        self,
        expert: Expert,
        messages: list[Message],
        system: str | None = None,
        shaping: Shaping = NO_SHAPING,
    ) -> Prompt:
        return build_prompt(expert, messages, system, shaping)

    def sampling_for(self, expert: Expert, **overrides: Any) -> SamplingParams:
        return sampling_for(expert, **overrides)

    # -- recording ---------------------------------------------------------------------------
    def trace(
        self, messages: Sequence[Message], origin: Origin, started: float | None = None
    ) -> RequestTrace:
        """A request's record in the request log, for a front end that holds it over several
        calls (the gateway: the response cache, ``n`` choices); written when it ends."""
        return RequestTrace(self.requests, origin, messages, started)

    # -- generation --------------------------------------------------------------------------
    async def stream(
        self,
        messages: Iterable[Message | Mapping[str, Any]],
        *,
        expert: str | None = None,
        system: str | None = None,
        request_id: str | None = None,
        decision: RouteDecision | None = None,
        plan: Plan | None = None,
        tools: ToolSpec | None = None,
        origin: Origin | None = None,
        trace: RequestTrace | None = None,
        **sampling: Any,
    ) -> tuple[RouteDecision, Prompt, Generation]:
        """Decide and shape now; return the decision, the final prompt and the token stream.

        A caller that already decided passes ``decision`` (an eval's baseline, a later turn)
        and routing is skipped; one that also shaped passes ``plan`` (from ``prepare``: the
        gateway's several choices of one request) and shaping is skipped too.

        The stream keeps to the expert's deadlines (experts.yaml ``deadlines:``) and, when the
        expert is down before its first token, goes on with the category's fallback experts:
        the stream's ``decision`` (and ``plan.route.decision``) then names the one answering.

        ``tools``: the functions the expert may call; an expert that cannot honour the tool
        choice is refused at once (ToolsUnsupportedError, a BadRequestError naming it).

        The request is recorded in the request log when its stream ends (or when it fails
        here): under ``origin`` (the front end's fields), or in the caller's ``trace`` (a
        request the front end holds over several streams; it writes it).
        """
        msgs = to_messages(messages)
        if not any(m.role == "user" for m in msgs):
            raise ValueError("the conversation has no user message")
        own = trace is None
        if trace is None:
            asked = expert or (decision.expert if decision is not None else AUTO)
            trace = self.trace(msgs, origin or Origin(model=asked))
            if trace.record.model is None:
                trace.record.model = asked
        try:
            if plan is None:
                how: How = "caller"
                if decision is None:
                    decision, how = self._route(msgs, expert)
                plan = await self.prepare(decision, msgs, system, how)
            trace.decided(plan.decision, plan.how)
            chosen = self.config.expert(plan.decision.expert)
            check_tools(chosen, tools)
            prompt = build_prompt(chosen, msgs, system, plan.shaping, tools)
        except Exception as exc:
            if own:  # no stream will hold it: this is the request's end
                trace.fail_now(exc)
            raise
        chunks = self._generate(plan, msgs, system, sampling, request_id, tools, trace)
        return plan.decision, prompt, Generation(plan.route, chunks)

    async def _generate(
        self,
        plan: Plan,
        messages: list[Message],
        system: str | None,
        sampling: dict[str, Any],
        request_id: str | None,
        tools: ToolSpec | None,
        trace: RequestTrace,
    ) -> AsyncGenerator[Chunk, None]:
        """The answer from the route's expert; if it fails before its first token, from the
        next one (a fallback gets the prompt and sampling of its own entry). Never once text
        has reached the caller: a half-streamed answer cannot be redone.

        Every request's generation passes here: its chunks, its end and its error go into the
        request's ``trace`` (held while this runs, so the record is written at its end)."""
        route = plan.route
        trace.hold()
        try:
            for attempt in itertools.count():
                expert = route.expert
                chosen = self.config.expert(expert)
                check_tools(chosen, tools)  # a fallback expert too
                prompt = build_prompt(chosen, messages, system, plan.shaping, tools)
                params = sampling_for(chosen, **sampling)
                # A fresh id per attempt: the aborted one may still be on its way out of an
                # engine the next expert shares.
                rid = (
                    request_id if attempt == 0 or request_id is None else f"{request_id}-{attempt}"
                )
                produced = False
                answer = self._expert_stream(expert, prompt, params, rid)
                try:
                    async with contextlib.aclosing(answer) as chunks:  # type: ignore[type-var]
                        async for chunk in chunks:
                            produced = True
                            trace.chunk(chunk)
                            yield chunk
                    return
                except EngineError as exc:
                    if produced or not falls_back(exc) or not route.failed(expert, exc):
                        raise
                    log.warning(
                        "request %s: expert %s failed before its first token, %s answers: %s",
                        rid,
                        expert,
                        route.expert,
                        exc,
                    )
        except BaseException as exc:  # GeneratorExit too: the caller stopped reading
            trace.failed(exc)
            raise
        finally:
            trace.decided(route.decision)  # the expert that answered: a fallback, if one did
            trace.release()

    async def _expert_stream(
        self, expert: str, prompt: Prompt, params: SamplingParams, request_id: str | None
    ) -> AsyncIterator[Chunk]:
        """One expert's answer within its deadlines. A request that fails because the engine
        died is retried once on the restarted engine, within the same deadlines, if nothing
        reached the caller yet."""
        engine = self.engines.engine_for(expert)
        attempts = 2

        async def tries() -> AsyncIterator[Chunk]:
            for attempt in range(attempts):
                produced = False
                # aclosing: a caller that stops reading aborts the request in the engine now.
                stream = engine.stream(prompt, params, request_id)
                try:
                    async with contextlib.aclosing(stream) as chunks:  # type: ignore[type-var]
                        async for chunk in chunks:
                            produced = True
                            yield chunk
                    return
                except EngineError as exc:
                    if produced or not exc.retryable or attempt == attempts - 1:
                        raise

        limited = within_deadlines(tries(), expert, self.config.deadlines_for(expert))
        async with contextlib.aclosing(limited) as chunks:  # type: ignore[type-var]
            async for chunk in chunks:
                yield chunk

    async def chat(
        self,
        messages: Iterable[Message | Mapping[str, Any]],
        *,
        expert: str | None = None,
        system: str | None = None,
        decision: RouteDecision | None = None,
        origin: Origin | None = None,
        **sampling: Any,
    ) -> ChatResult:
        t0 = time.perf_counter()
        decision, prompt, chunks = await self.stream(
            messages, expert=expert, system=system, decision=decision, origin=origin, **sampling
        )
        completion = await collect(chunks)
        return ChatResult(
            decision=chunks.decision,  # the expert that answered (a fallback, if one did)
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
        try:
            await self.engines.shutdown()
        finally:
            # Writes what is queued: the last requests of a `coe ask` too.
            await asyncio.to_thread(self.requests.close)


def _router_fingerprint(router: object) -> str:
    """A hash of the router's files, when it has some (a fitted TwoStageRouter does)."""
    folder = getattr(getattr(router, "artifact", None), "path", None)
    if folder is None:
        return type(router).__name__
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and path.suffix in (".json", ".npz"):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()
