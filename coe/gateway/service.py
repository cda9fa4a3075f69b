"""What the gateway does for a chat request, between the HTTP handler and the orchestrator:
answer from the response cache, or have the orchestrator decide and generate ``n`` choices;
count and charge the tokens; keep the answer and the conversation's expert for its next turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator

from coe.config import GatewaySettings
from coe.gateway import metrics, sse
from coe.gateway.call import Call, decision_headers
from coe.gateway.errors import from_exception, model_not_found, served_by
from coe.gateway.health import check_store, summarize
from coe.gateway.response_cache import Answer, ResponseCache
from coe.gateway.schema import (
    AssistantMessage,
    ChatCompletion,
    Choice,
    ChoiceLogprobs,
    Delta,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    ToolCallOut,
    UsageInfo,
)
from coe.orchestrator import (
    AUTO,
    CATEGORY_PREFIX,
    How,
    Orchestrator,
    Origin,
    Plan,
    RequestTrace,
    UnknownModelError,
    model_names,
)
from coe.types import (
    Chunk,
    Completion,
    Message,
    RouteDecision,
    TokenLogprob,
    ToolCallAssembler,
    Usage,
    collect,
)


class ChatService:
    def __init__(self, orchestrator: Orchestrator, settings: GatewaySettings):
        self.orch = orchestrator
        self.store = orchestrator.store
        self.settings = settings
        config = orchestrator.config
        self.config = config
        # Cached answers belong to this pool: a changed experts.yaml (prompts, sampling, map),
        # a router refitted in place or new prompt regions must not serve the old answers.
        shaping = config.model_dump_json(exclude={"gateway", "store", "log"})
        pool = hashlib.sha256(shaping.encode())
        pool.update(orchestrator.fingerprint().encode())
        self.responses = ResponseCache(
            self.store, settings.response_cache, config, pool.hexdigest()[:16]
        )
        self.created = int(time.time())
        # Accounting that must finish even when the client has gone (its task is cancelled).
        self._background: set[asyncio.Task[None]] = set()

    # -- models ------------------------------------------------------------------------------
    def models(self) -> ModelList:
        cards = [ModelCard(id=AUTO, created=self.created, description="routed to the best expert")]
        cards += [
            ModelCard(id=e.name, created=self.created, description=e.description)
            for e in self.config.experts
        ]
        cards += [
            ModelCard(
                id=CATEGORY_PREFIX + c.name,
                created=self.created,
                description=f"the {c.name} category's expert ({c.expert})",
            )
            for c in self.config.categories
        ]
        return ModelList(data=cards)

    def model(self, model_id: str) -> ModelCard:
        for card in self.models().data:
            if card.id == model_id:
                return card
        raise model_not_found(model_id, model_names(self.config))

    def unfinished_requests(self) -> dict[str, int]:
        """Per in-process engine, the requests it holds unfinished (/metrics)."""
        return self.orch.engines.unfinished_requests()

    async def health(self) -> HealthResponse:
        """Every expert's engine as it is now, and the store by a live ping."""
        experts, store = await asyncio.gather(self.orch.engines.health(), check_store(self.store))
        routed = {c.expert for c in self.config.categories}
        return summarize(experts, routed, store)

    # -- deciding ----------------------------------------------------------------------------
    async def route(self, model: str, messages: list[Message], owner: str = "") -> RouteDecision:
        """/v1/route: where ``owner``'s conversation would go and with which strategy,
        generating nothing (a generated identity shows as its static fallback)."""
        decision, _ = await self._decide(model, messages, owner=owner)
        # Mixture-of-prompts embeds the conversation: milliseconds of CPU, off the event loop.
        return await asyncio.to_thread(self.orch.describe, decision, messages)

    async def _decide(
        self, model: str, messages: list[Message], session: str | None = None, owner: str = ""
    ) -> tuple[RouteDecision, How]:
        try:
            return await self.orch.decide(model, messages, session, owner)
        except UnknownModelError as exc:
            raise model_not_found(exc.model, exc.known) from None

    async def _plan(
        self, call: Call, trace: RequestTrace
    ) -> tuple[Plan, list[AsyncIterator[Chunk]]]:
        """Decide and shape once; then one stream per choice, all from the same plan."""
        decision, how = await self._decide(
            call.request.model, call.messages, call.session, call.client.subject
        )
        trace.decided(decision, how)
        metrics.ROUTED.labels(decision.category or "", decision.expert, how).inc()
        with served_by(decision.expert):
            plan = await self.orch.prepare(decision, call.messages, how=how)
            sampling = call.request.sampling()
            tools = call.request.tool_spec()
            if sampling["seed"] is None:
                sampling["seed"] = self.config.expert(decision.expert).sampling.seed
            streams = []
            for i in range(call.request.n):
                params = dict(sampling)
                if params["seed"] is not None:
                    params["seed"] = int(params["seed"]) + i  # n seeded choices must differ
                _, _, chunks = await self.orch.stream(
                    call.messages,
                    plan=plan,
                    request_id=f"{call.id}-{i}",
                    tools=tools,
                    trace=trace,
                    **params,
                )
                streams.append(chunks)
        return plan, streams

    # -- answering ---------------------------------------------------------------------------
    async def _cached(self, call: Call) -> Answer | None:
        answer = await self.responses.get(call)
        if answer is not None:
            # A hit is an answer too: the conversation's next turn stays with this expert.
            await self._remember(call, answer)
        return answer

    async def _keep(self, call: Call, answer: Answer) -> None:
        """After a whole answer: cache it (when it is a "miss") and remember the session."""
        await self.responses.put(call, answer)
        await self._remember(call, answer)

    async def _remember(self, call: Call, answer: Answer) -> None:
        # Sessions belong to the client: another key sending the same id starts its own.
        await self.orch.remember(
            call.messages, answer.decision, answer.turns(), call.session, call.client.subject
        )

    def _account(self, call: Call, expert: str, usage: Usage) -> None:
        """Count the tokens and charge them to the client, also for an answer cut short; in a
        task of its own, so a client that hangs up cannot cancel it."""
        metrics.TOKENS.labels(expert, "prompt").inc(usage.prompt_tokens)
        metrics.TOKENS.labels(expert, "completion").inc(usage.completion_tokens)
        limit = call.client.limits.tokens_per_minute
        if not limit or not usage.total_tokens:
            return
        task = asyncio.get_running_loop().create_task(
            self.store.charge_tokens(call.client.subject, usage.total_tokens, limit)
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _trace(self, call: Call) -> RequestTrace:
        """The request's record in the request log, timed from when the gateway took it."""
        front_end = "cli" if call.front_end == "cli" else "gateway"  # coe ask via a pool
        origin = Origin(front_end, call.client.subject, call.request.model, call.id)
        return self.orch.trace(call.messages, origin, started=call.started)

    async def complete(self, call: Call) -> tuple[ChatCompletion, dict[str, str]]:
        with self._trace(call) as trace:  # written when this ends, however it ends
            return await self._complete(call, trace)

    async def _complete(
        self, call: Call, trace: RequestTrace
    ) -> tuple[ChatCompletion, dict[str, str]]:
        # The cache key covers the model as asked ("auto" too) and everything that shapes the
        # answer, so a hit skips routing as well as generation.
        cached = await self._cached(call)
        if cached is not None:
            trace.answered(cached.decision, cached.usage, cached.texts, "hit")
            return self._completion(call, cached), decision_headers(cached.decision, "hit")
        plan, streams = await self._plan(call, trace)
        with served_by(plan.decision.expert):
            results = await _collect_all(streams)
        decision = plan.route.decision  # the expert that answered: a fallback, if one did
        answer = Answer(
            decision=decision,
            texts=[r.text for r in results],
            finish_reasons=[r.finish_reason for r in results],
            usage=_total_usage([r.usage for r in results]),
            cache=self._cache_status(call, plan),
            tool_calls=[r.tool_calls for r in results],
            logprobs=[r.logprobs for r in results],
        )
        trace.record.cache = answer.cache
        self._account(call, decision.expert, answer.usage)
        await self._keep(call, answer)
        return self._completion(call, answer), decision_headers(decision, answer.cache)

    def _cache_status(self, call: Call, plan: Plan) -> str:
        """Whether a generated answer is kept: not one a fallback expert gave while the chosen
        one was down, or repeats would get it after the expert is back."""
        if plan.route.stood_in:
            return "bypass"
        return self.responses.status(call, plan.route.decision)

    def _completion(self, call: Call, answer: Answer) -> ChatCompletion:
        return ChatCompletion(
            id=call.id,
            created=call.created,
            model=answer.decision.expert,
            choices=[
                Choice(
                    index=i,
                    message=AssistantMessage(
                        # A turn of calls only has no text: null, as OpenAI sends it.
                        content=text if text or not answer.calls(i) else None,
                        tool_calls=[ToolCallOut.of(c) for c in answer.calls(i)] or None,
                    ),
                    finish_reason=answer.finish_reasons[i],
                    logprobs=ChoiceLogprobs.of(answer.choice_logprobs(i)),
                )
                for i, text in enumerate(answer.texts)
            ],
            usage=UsageInfo.of(answer.usage),
        )

    async def stream(self, call: Call) -> tuple[dict[str, str], AsyncIterator[str]]:
        """Headers and the SSE body. Everything up to the first generated text happens before
        this returns, so a request that cannot be served gets a proper error status.

        The request's record is written when the events end (the trace is held until then)."""
        trace = self._trace(call)
        trace.hold()
        try:
            cached = await self._cached(call)
            if cached is not None:
                trace.answered(cached.decision, cached.usage, cached.texts, "hit")
                events = _releasing(trace, sse.replay(call, cached))
                return decision_headers(cached.decision, "hit"), events
            plan, streams = await self._plan(call, trace)
            with served_by(plan.decision.expert):
                merged = sse.merge(streams)
                first = await sse.first(merged)
        except BaseException as exc:
            trace.failed(exc)
            trace.release()
            raise
        # After the first chunk the expert answering is known (a fallback, if one took over);
        # no other is tried after it, since its text is about to reach the client.
        decision = plan.route.decision
        cache = trace.record.cache = self._cache_status(call, plan)
        events = self._events(call, decision, cache, first, merged)
        return decision_headers(decision, cache), _releasing(trace, events)

    async def _events(
        self,
        call: Call,
        decision: RouteDecision,
        cache: str,
        first: tuple[int, Chunk] | None,
        rest: AsyncIterator[tuple[int, Chunk]],
    ) -> AsyncIterator[str]:
        n = call.request.n
        texts: list[list[str]] = [[] for _ in range(n)]
        calls = [ToolCallAssembler() for _ in range(n)]
        logprobs: list[list[TokenLogprob] | None] = [None] * n
        finishes: list[str | None] = [None] * n
        usages: list[Usage | None] = [None] * n
        timed = False
        expert = decision.expert
        try:
            async with contextlib.aclosing(rest) as chunks:
                for i in range(n):
                    yield sse.chunk_event(call, expert, i, Delta(role="assistant", content=""))
                pending = [first] if first is not None else []
                async for index, chunk in sse.chain(pending, chunks):
                    if chunk.logprobs is not None:
                        logprobs[index] = (logprobs[index] or []) + chunk.logprobs
                    if chunk.text or chunk.tool_calls:
                        if not timed:
                            timed = True
                            metrics.FIRST_TOKEN_SECONDS.labels(expert).observe(
                                time.perf_counter() - call.started
                            )
                        texts[index].append(chunk.text)
                        calls[index].add(chunk.tool_calls)
                        delta = Delta(
                            content=chunk.text or None,
                            tool_calls=sse.tool_call_deltas(chunk.tool_calls) or None,
                        )
                        yield sse.chunk_event(call, expert, index, delta, None, chunk.logprobs)
                    elif chunk.logprobs and chunk.finish_reason is None:
                        yield sse.chunk_event(call, expert, index, Delta(), None, chunk.logprobs)
                    if chunk.finish_reason is not None:
                        finishes[index] = chunk.finish_reason
                        usages[index] = chunk.usage or Usage()
                        last = chunk.logprobs if not (chunk.text or chunk.tool_calls) else None
                        yield sse.chunk_event(
                            call, expert, index, Delta(), chunk.finish_reason, last
                        )
        except Exception as exc:  # the status is sent; the error travels as the last event
            error = from_exception(exc, expert)
            yield sse.event(ErrorResponse(error=error.body).model_dump_json())
            yield sse.event(sse.DONE)
            return
        finally:
            # A choice cut short (client gone, engine failed) is charged what it produced:
            # about a token per streamed piece.
            spent = [u or Usage(0, len(t)) for u, t in zip(usages, texts, strict=True)]
            self._account(call, expert, _total_usage(spent))
        answer = Answer(
            decision,
            ["".join(t) for t in texts],
            finishes,
            _total_usage([u or Usage() for u in usages]),
            cache,
            tool_calls=[c.calls() for c in calls],
            logprobs=logprobs,
        )
        # Before [DONE]: a client that hangs up once it has the answer must not undo this.
        await self._keep(call, answer)
        if sse.include_usage(call):
            yield sse.usage_event(call, expert, answer.usage)
        yield sse.event(sse.DONE)


async def _releasing(trace: RequestTrace, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """The events, letting go of the request's trace when they end (sent, failed or the client
    gone): the record is written then."""
    try:
        async with contextlib.aclosing(events) as sent:  # type: ignore[type-var]
            async for event in sent:
                yield event
    except BaseException as exc:
        trace.failed(exc)
        raise
    finally:
        trace.release()


def _total_usage(usages: list[Usage]) -> Usage:
    # The prompt is one prompt however many choices are drawn from it.
    prompt = max((u.prompt_tokens for u in usages), default=0)
    return Usage(prompt, sum(u.completion_tokens for u in usages))


async def _collect_all(streams: list[AsyncIterator[Chunk]]) -> list[Completion]:
    """All choices at once; if one fails, the others are cancelled (and aborted in the engine)."""
    tasks = [asyncio.ensure_future(collect(s)) for s in streams]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
