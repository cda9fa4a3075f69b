"""What the gateway does for a chat request, between the HTTP handler and the orchestrator:
pick the expert (caller's choice, sticky session, or the router), answer from the response cache
or generate ``n`` choices, and remember the conversation's expert for its next turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from coe.config import GatewaySettings
from coe.engines.base import EngineError
from coe.engines.vllm_local import PromptTooLongError
from coe.gateway import metrics
from coe.gateway.auth import Client
from coe.gateway.errors import APIError, invalid, model_not_found, unavailable
from coe.gateway.schema import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ErrorResponse,
    ModelCard,
    ModelList,
    UsageInfo,
)
from coe.orchestrator import Orchestrator, with_shaping
from coe.prompts.mixture import MixtureError
from coe.store import Store
from coe.types import Chunk, Message, RouteDecision, Usage

log = logging.getLogger(__name__)

AUTO = "auto"
CATEGORY_PREFIX = "auto:"
SESSION_HEADER = "x-coe-session"
CACHE_CONTROL_HEADER = "x-coe-cache-control"


@dataclass
class Answer:
    """A finished chat answer: what the cache stores and what a response is built from."""

    decision: RouteDecision
    texts: list[str]
    finish_reasons: list[str | None]
    usage: Usage
    cache: str = "miss"

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "decision": self.decision.as_dict(),
                "texts": self.texts,
                "finish_reasons": self.finish_reasons,
                "usage": [self.usage.prompt_tokens, self.usage.completion_tokens],
            }
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Answer:
        """Raises ValueError (or KeyError, TypeError) for an entry in another format."""
        data = json.loads(raw)
        d = data["decision"]
        alternatives = tuple((a["category"], a["probability"]) for a in d.pop("alternatives"))
        # Entries are versioned by the store's key prefix; unknown fields mean another format.
        return cls(
            decision=RouteDecision(**d, alternatives=alternatives),
            texts=data["texts"],
            finish_reasons=data["finish_reasons"],
            usage=Usage(*data["usage"]),
            cache="hit",
        )


@dataclass
class Call:
    """One chat request as the service sees it."""

    request: ChatCompletionRequest
    client: Client
    session: str | None = None
    cache_control: str | None = None
    started: float = field(default_factory=time.perf_counter)
    id: str = field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.messages: list[Message] = self.request.to_messages()


def decision_headers(decision: RouteDecision, cache: str) -> dict[str, str]:
    headers = {"x-coe-expert": decision.expert, "x-coe-cache": cache}
    if decision.category is not None:
        headers["x-coe-category"] = decision.category
    if decision.confidence is not None:
        headers["x-coe-confidence"] = f"{decision.confidence:.4f}"
    if decision.strategy != "none":
        headers["x-coe-strategy"] = decision.strategy
    return headers


def conversation_hash(messages: Sequence[Message]) -> str:
    blob = json.dumps([[m.role, m.content] for m in messages], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class ChatService:
    def __init__(self, orchestrator: Orchestrator, store: Store, settings: GatewaySettings):
        self.orch = orchestrator
        self.store = store
        self.settings = settings
        config = orchestrator.config
        self.config = config
        # Cached answers belong to this pool: a changed experts.yaml (prompts, sampling, map)
        # must not serve answers made under the old one.
        pool = hashlib.sha256(config.model_dump_json(exclude={"gateway", "store"}).encode())
        # ... nor a router refitted in place.
        pool.update(_router_fingerprint(orchestrator.router).encode())
        pool.update(orchestrator.strategies.fingerprint().encode())
        self.pool_fingerprint = pool.hexdigest()[:16]
        self.created = int(time.time())
        # Accounting that must finish even when the client has gone (its task is cancelled).
        self._background: set[asyncio.Task[None]] = set()

    # -- models ------------------------------------------------------------------------------
    def model_ids(self) -> list[str]:
        return [
            AUTO,
            *self.config.expert_names,
            *(CATEGORY_PREFIX + c for c in self.config.category_names),
        ]

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
        raise model_not_found(model_id, self.model_ids())

    def engine_readiness(self) -> dict[str, bool]:
        """Per expert: is its engine (or slot group) up?"""
        engines = self.orch.engines
        return {name: bool(engines.engine_for(name).ready) for name in self.config.expert_names}

    # -- routing -----------------------------------------------------------------------------
    async def decide(
        self, model: str, messages: list[Message], session: str | None = None
    ) -> tuple[RouteDecision, str]:
        """The expert for a request and how it was chosen (caller, category, session, router)."""
        if model == AUTO:
            sticky = await self._sticky(messages, session)
            if sticky is not None and not self._tells_new_tasks():
                return sticky, "session"
            if self.orch.router is None:
                return self.orch.route(messages), "fallback"
            # The embedding takes milliseconds of CPU: keep the event loop free for streams.
            decision = await asyncio.to_thread(self.orch.route, messages)
            if sticky is not None and decision.continues:
                return sticky, "session"  # a follow-up stays with the expert that answered
            return decision, "fallback" if decision.fell_back else "router"
        if model.startswith(CATEGORY_PREFIX):
            name = model[len(CATEGORY_PREFIX) :]
            if name not in self.config.category_names:
                raise model_not_found(model, self.model_ids())
            category = self.config.category(name)
            return RouteDecision(
                expert=category.expert,
                category=name,
                confidence=None,
                fell_back=False,
                reason="category chosen by the caller",
            ), "category"
        if model in self.config.expert_names:
            return self.orch.route(messages, expert=model), "caller"
        raise model_not_found(model, self.model_ids())

    def _tells_new_tasks(self) -> bool:
        """Whether the router can tell a follow-up from a new task; without that, a session
        keeps its expert for every turn."""
        return bool(getattr(self.orch.router, "tells_followups", False))

    async def _sticky(self, messages: list[Message], session: str | None) -> RouteDecision | None:
        keys = []
        if session:
            keys.append("session:id:" + hashlib.sha256(session.encode()).hexdigest())
        last_user = max(i for i, m in enumerate(messages) if m.role == "user")
        earlier = messages[:last_user]
        if earlier and earlier[-1].role == "assistant":
            keys.append("session:conversation:" + conversation_hash(earlier))
        for key in keys:
            raw = await self.store.get(key)
            if raw is None:
                continue
            seen = json.loads(raw)
            if seen["expert"] not in self.config.expert_names:
                continue  # the pool changed since; route afresh
            return RouteDecision(
                expert=seen["expert"],
                category=seen["category"],
                confidence=None,
                fell_back=False,
                reason="the conversation stays with the expert that answered it",
            )
        return None

    async def _remember(self, call: Call, answer: Answer) -> None:
        """Store the expert for the conversation's next turn (the answer appended to it)."""
        value = json.dumps(
            {"expert": answer.decision.expert, "category": answer.decision.category}
        ).encode()
        ttl = self.settings.session_ttl_s
        for text in dict.fromkeys(answer.texts):  # the client may go on from any choice
            following = [*call.messages, Message("assistant", text)]
            key = "session:conversation:" + conversation_hash(following)
            await self.store.set(key, value, ttl)
        if call.session:
            key = "session:id:" + hashlib.sha256(call.session.encode()).hexdigest()
            await self.store.set(key, value, ttl)

    # -- response cache ----------------------------------------------------------------------
    def _cache_key(self, call: Call) -> str:
        req = call.request
        blob = json.dumps(
            {
                "pool": self.pool_fingerprint,
                "model": req.model,
                "messages": [[m.role, m.content] for m in call.messages],
                "sampling": req.sampling(),
                "n": req.n,
                "session": call.session,
                # A sampled answer kept on request is only for requests that ask the same way.
                "kept_on_request": call.cache_control == "store",
                # Unless shared, a client never sees (or learns of) another client's prompts.
                "client": None if self.settings.response_cache.shared else call.client.subject,
            },
            sort_keys=True,
            ensure_ascii=False,
        )
        return "response:" + hashlib.sha256(blob.encode()).hexdigest()

    def _cache_enabled(self, call: Call) -> bool:
        return self.settings.response_cache.enabled and call.cache_control != "no-cache"

    def _storable_anyway(self, call: Call) -> bool:
        return self.settings.response_cache.nondeterministic or call.cache_control == "store"

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
        if not self._cache_enabled(call):
            return False
        named = self._named_expert(call.request.model)
        if named is not None:
            return self._storable(call, named)
        # auto: an answer was stored only if the expert it was routed to answers repeatably
        # (or it was kept on request, which is part of the key), and the same request routes
        # the same way under the same pool and router (also part of the key).
        req = call.request
        sampled = req.temperature is not None and req.temperature > 0 and req.seed is None
        return not sampled or self._storable_anyway(call)

    def _named_expert(self, model: str) -> str | None:
        if model in self.config.expert_names:
            return model
        name = model.removeprefix(CATEGORY_PREFIX)
        if model.startswith(CATEGORY_PREFIX) and name in self.config.category_names:
            return self.config.category(name).expert
        return None

    async def _cached(self, call: Call) -> Answer | None:
        if not self._may_hit(call):
            return None
        raw = await self.store.get(self._cache_key(call))
        if raw is None:
            metrics.RESPONSE_CACHE.labels("miss").inc()
            return None
        try:
            answer = Answer.from_json(raw)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring a cached answer in an unknown format: %s", exc)
            return None
        metrics.RESPONSE_CACHE.labels("hit").inc()
        # A hit is an answer too: the conversation's next turn stays with this expert.
        await self._remember(call, answer)
        return answer

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

    async def _keep(self, call: Call, answer: Answer) -> None:
        """After a whole answer: cache it (when it is a "miss") and remember the session."""
        if answer.cache == "miss":
            ttl = self.settings.response_cache.ttl_s
            await self.store.set(self._cache_key(call), answer.to_json(), ttl)
        await self._remember(call, answer)

    def _cache_status(self, call: Call, decision: RouteDecision) -> str:
        """For a generated answer: "miss" when it will be cached, else "bypass"."""
        if not self.store.healthy:
            return "bypass"
        if decision.identity_source == "fallback":
            # The generated identity was late: a repeat will get it, so do not keep this one.
            return "bypass"
        storable = self._cache_enabled(call) and self._storable(call, decision.expert)
        return "miss" if storable else "bypass"

    # -- generation --------------------------------------------------------------------------
    async def _route(self, call: Call) -> RouteDecision:
        decision, how = await self.decide(call.request.model, call.messages, call.session)
        metrics.ROUTED.labels(decision.category or "", decision.expert, how).inc()
        return decision

    async def _choices(
        self, call: Call, decision: RouteDecision
    ) -> tuple[RouteDecision, list[AsyncIterator[Chunk]]]:
        """The choices' streams, and the decision with the prompt strategy it was given."""
        # The prompt strategy runs once per request: every choice gets the same shaping.
        shaping = await self.orch.shape(decision, call.messages)
        decision = with_shaping(decision, shaping)
        sampling = call.request.sampling()
        if sampling["seed"] is None:
            sampling["seed"] = self.config.expert(decision.expert).sampling.seed
        streams = []
        for i in range(call.request.n):
            params = dict(sampling)
            if params["seed"] is not None:
                params["seed"] = int(params["seed"]) + i  # n seeded choices must differ
            _, _, chunks = await self.orch.stream(
                call.messages,
                decision=decision,
                shaping=shaping,
                request_id=f"{call.id}-{i}",
                **params,
            )
            streams.append(chunks)
        return decision, streams

    async def complete(self, call: Call) -> tuple[ChatCompletion, dict[str, str]]:
        # The cache key covers the model as asked ("auto" too) and everything that shapes the
        # answer, so a hit skips routing as well as generation.
        cached = await self._cached(call)
        if cached is not None:
            return self._completion(call, cached), decision_headers(cached.decision, "hit")
        decision = await self._route(call)
        with _engine_errors(decision.expert):
            decision, streams = await self._choices(call, decision)
            results = await _collect_all(streams)
        answer = Answer(
            decision=decision,
            texts=[text for text, _, _ in results],
            finish_reasons=[finish for _, finish, _ in results],
            usage=_total_usage([usage for _, _, usage in results]),
            cache=self._cache_status(call, decision),
        )
        self._account(call, decision.expert, answer.usage)
        await self._keep(call, answer)
        return self._completion(call, answer), decision_headers(decision, answer.cache)

    def _completion(self, call: Call, answer: Answer) -> ChatCompletion:
        return ChatCompletion(
            id=call.id,
            created=call.created,
            model=answer.decision.expert,
            choices=[
                Choice(
                    index=i,
                    message=AssistantMessage(content=text),
                    finish_reason=answer.finish_reasons[i],
                )
                for i, text in enumerate(answer.texts)
            ],
            usage=_usage_info(answer.usage),
        )

    async def stream(self, call: Call) -> tuple[dict[str, str], AsyncIterator[str]]:
        """Headers and the SSE body. Everything up to the first generated text happens before
        this returns, so a request that cannot be served gets a proper error status."""
        cached = await self._cached(call)
        if cached is not None:
            return decision_headers(cached.decision, "hit"), self._replay(call, cached)
        decision = await self._route(call)
        with _engine_errors(decision.expert):
            decision, streams = await self._choices(call, decision)
            merged = _merge(streams)
            first = await _first(merged)
        cache = self._cache_status(call, decision)
        return decision_headers(decision, cache), self._sse(call, decision, cache, first, merged)

    async def _sse(
        self,
        call: Call,
        decision: RouteDecision,
        cache: str,
        first: tuple[int, Chunk] | None,
        rest: AsyncIterator[tuple[int, Chunk]],
    ) -> AsyncIterator[str]:
        n = call.request.n
        texts: list[list[str]] = [[] for _ in range(n)]
        finishes: list[str | None] = [None] * n
        usages: list[Usage | None] = [None] * n
        timed = False
        expert = decision.expert
        try:
            async with contextlib.aclosing(rest) as chunks:
                for i in range(n):
                    yield self._chunk(call, expert, i, Delta(role="assistant", content=""))
                pending = [first] if first is not None else []
                async for index, chunk in _chain(pending, chunks):
                    if chunk.text:
                        if not timed:
                            timed = True
                            metrics.FIRST_TOKEN_SECONDS.labels(expert).observe(
                                time.perf_counter() - call.started
                            )
                        texts[index].append(chunk.text)
                        yield self._chunk(call, expert, index, Delta(content=chunk.text))
                    if chunk.finish_reason is not None:
                        finishes[index] = chunk.finish_reason
                        usages[index] = chunk.usage or Usage()
                        yield self._chunk(call, expert, index, Delta(), chunk.finish_reason)
        except Exception as exc:  # the status is sent; the error travels as the last event
            error = _api_error(exc, expert)
            yield _event(ErrorResponse(error=error.body).model_dump_json())
            yield _event("[DONE]")
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
        )
        # Before [DONE]: a client that hangs up once it has the answer must not undo this.
        await self._keep(call, answer)
        if include_usage(call.request):
            yield self._usage_chunk(call, expert, answer.usage)
        yield _event("[DONE]")

    async def _replay(self, call: Call, answer: Answer) -> AsyncIterator[str]:
        expert = answer.decision.expert
        for i, text in enumerate(answer.texts):
            yield self._chunk(call, expert, i, Delta(role="assistant", content=""))
            yield self._chunk(call, expert, i, Delta(content=text))
            yield self._chunk(call, expert, i, Delta(), answer.finish_reasons[i])
        if include_usage(call.request):
            yield self._usage_chunk(call, expert, answer.usage)
        yield _event("[DONE]")

    def _usage_chunk(self, call: Call, expert: str, usage: Usage) -> str:
        """stream_options.include_usage: a last chunk with no choices and the request's usage."""
        chunk = ChatCompletionChunk(
            id=call.id, created=call.created, model=expert, choices=[], usage=_usage_info(usage)
        )
        return _event(chunk.model_dump_json())

    def _chunk(
        self, call: Call, expert: str, index: int, delta: Delta, finish: str | None = None
    ) -> str:
        chunk = ChatCompletionChunk(
            id=call.id,
            created=call.created,
            model=expert,
            choices=[ChunkChoice(index=index, delta=delta, finish_reason=finish)],
        )
        return _event(chunk.model_dump_json(exclude_none=False))


def include_usage(request: ChatCompletionRequest) -> bool:
    return bool(request.stream_options and request.stream_options.include_usage)


def _event(data: str) -> str:
    return f"data: {data}\n\n"


def _usage_info(usage: Usage) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def _total_usage(usages: list[Usage]) -> Usage:
    # The prompt is one prompt however many choices are drawn from it.
    prompt = max((u.prompt_tokens for u in usages), default=0)
    return Usage(prompt, sum(u.completion_tokens for u in usages))


async def _collect(stream: AsyncIterator[Chunk]) -> tuple[str, str | None, Usage]:
    parts, finish, usage = [], None, Usage()
    async for chunk in stream:
        parts.append(chunk.text)
        if chunk.finish_reason is not None:
            finish, usage = chunk.finish_reason, chunk.usage or Usage()
    return "".join(parts), finish, usage


async def _collect_all(streams: list[AsyncIterator[Chunk]]) -> list[tuple[str, str | None, Usage]]:
    """All choices at once; if one fails, the others are cancelled (and aborted in the engine)."""
    tasks = [asyncio.ensure_future(_collect(s)) for s in streams]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _api_error(exc: BaseException, expert: str) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, MixtureError):  # the server's own files: not the client's doing
        log.error("prompt regions for expert %s could not be used: %s", expert, exc)
        return APIError(
            500, "the category's prompt strategy could not be loaded", type="server_error"
        )
    if isinstance(exc, PromptTooLongError):
        return invalid(str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, EngineError):
        if exc.invalid_request:  # a remote expert's server refused this request (a 4xx)
            return invalid(f"expert {expert} refused the request: {exc.reason}")
        # The details (engine names, internal addresses) go to the log, not to the client.
        log.warning("expert %s failed a request: %s", expert, exc)
        if exc.retryable:
            return unavailable(f"expert {expert} is restarting; retry the request shortly")
        return unavailable(f"expert {expert} could not serve the request")
    if isinstance(exc, ValueError):
        return invalid(str(exc))
    log.error("unexpected error from expert %s", expert, exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}", type="server_error")


@contextlib.contextmanager
def _engine_errors(expert: str) -> Iterator[None]:
    try:
        yield
    except (EngineError, ValueError) as exc:
        raise _api_error(exc, expert) from exc


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


async def _first(
    stream: AsyncIterator[tuple[int, Chunk]],
) -> tuple[int, Chunk] | None:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return None


async def _chain(
    pending: list[tuple[int, Chunk]], rest: AsyncIterator[tuple[int, Chunk]]
) -> AsyncIterator[tuple[int, Chunk]]:
    for item in pending:
        yield item
    async for item in rest:
        yield item


async def _merge(streams: list[AsyncIterator[Chunk]]) -> AsyncIterator[tuple[int, Chunk]]:
    """Interleave the choices' chunks as they come, each tagged with its choice index."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:  # type: ignore[type-var]
            async for chunk in only:
                yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, Chunk | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Chunk]) -> None:
        try:
            async for chunk in stream:
                await queue.put((index, chunk, None))
        except Exception as exc:
            await queue.put((index, None, exc))
            return
        await queue.put((index, None, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, chunk, error = await queue.get()
            if error is not None:
                raise error
            if chunk is None:
                remaining -= 1
                continue
            yield index, chunk
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
