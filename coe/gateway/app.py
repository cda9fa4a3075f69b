"""The FastAPI app: OpenAI-compatible endpoints over one ChatService. Handlers stay thin; the
work is in service.py (the response cache in response_cache.py, streaming in sse.py), the
shapes in schema.py, the failures in errors.py.

No ``from __future__ import annotations`` here: FastAPI reads the handlers' annotations at
runtime, and the dependencies they name are local to create_app.
"""

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coe import __version__
from coe.errors import CoeError
from coe.gateway import anthropic, completions, errors, metrics
from coe.gateway.anthropic_schema import AnthropicError, MessagesRequest
from coe.gateway.anthropic_schema import Message as AnthropicMessage
from coe.gateway.auth import Client
from coe.gateway.call import CACHE_CONTROL_HEADER, FRONT_END_HEADER, SESSION_HEADER, Call
from coe.gateway.completions_schema import Completion, CompletionRequest
from coe.gateway.errors import (
    forbidden,
    invalid,
    pool_change_refused,
    rate_limited,
    store_misconfigured,
    store_unavailable,
    too_large,
    unauthorized,
)
from coe.gateway.live import LivePool
from coe.gateway.responses import ResponsesAPI
from coe.gateway.responses_schema import Response as ResponseObject
from coe.gateway.responses_schema import ResponsesRequest
from coe.gateway.schema import (
    ChatCompletion,
    ChatCompletionRequest,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    RouteRequest,
    RouteResponse,
)
from coe.gateway.translate import STREAM_HEADERS, call_for, chunks
from coe.store import StoreMisconfiguredError, StoreUnavailableError

T = TypeVar("T")


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorResponse} for s in statuses}


# Every /v1 endpoint may answer these; the chat endpoint adds its own.
COMMON_ERRORS = _errors(400, 401, 413, 429, 503)
bearer = HTTPBearer(auto_error=False, description="An API key, when the gateway has keys.")
# Anthropic's clients send the key this way; it is the same key.
api_key_header = APIKeyHeader(
    name="x-api-key", auto_error=False, description="An API key, as Anthropic's clients send it."
)
SSE_BODY = {
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
    "description": "The answer, or server-sent events when stream is true.",
}
ANTHROPIC_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": AnthropicError} for s in (400, 401, 404, 413, 429, 503)
}


def create_app(live: LivePool) -> FastAPI:
    """The gateway's app. Each request is served by the pool's generation current when it
    arrived (``live``: a reload swaps it; the request finishes on what it started with)."""
    app = FastAPI(
        title="coe gateway",
        version=__version__,
        summary="A pool of expert LLMs served as one OpenAI-compatible model.",
        docs_url=None,
        redoc_url=None,
    )
    errors.install(app)
    paths = {
        "/v1/chat/completions",
        "/v1/models",
        "/v1/route",
        "/health",
        "/health/ready",
        "/metrics",
        "/v1/messages",
        "/v1/responses",
        "/v1/completions",
    }
    # Settings of the first experts.yaml; a reload does not change them (restart to).
    first = live.service
    app.add_middleware(BodyLimit, limit=first.settings.max_body_bytes)
    # Outside BodyLimit, so that its 413 is rewritten too.
    app.add_middleware(ErrorDialect, renderers={"/v1/messages": anthropic.error})
    app.add_middleware(RequestMetrics, endpoints=paths)
    # Outermost: counts each request against the generation it started on.
    app.add_middleware(InFlight, live=live)
    store = first.store

    async def client(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        api_key: Annotated[str | None, Depends(api_key_header)],
    ) -> Client:
        peer = request.client.host if request.client else "unknown"
        header = request.headers.get("authorization")
        if header is None and api_key is not None:
            header = f"Bearer {api_key}"
        found = live.keys.identify(header, peer)
        if found is None:
            raise unauthorized(
                "Missing API key: send Authorization: Bearer KEY (or x-api-key: KEY)"
                if not header
                else "Incorrect API key provided"
            )
        return found

    async def limited(found: Annotated[Client, Depends(client)]) -> Client:
        """Admission: the client's rate limits, and a store that works (every endpoint that
        uses this one reads or writes the store)."""
        limits = found.limits
        try:
            decision = await store.admit(
                found.subject, limits.requests_per_minute, limits.tokens_per_minute
            )
        except StoreMisconfiguredError as exc:
            metrics.STORE_TROUBLE.labels("misconfigured").inc()
            raise store_misconfigured() from exc
        except StoreUnavailableError as exc:
            # What limits do while Redis is away: closed (503) by default once keys are needed.
            if live.service.settings.limits.store_error_policy(live.keys.required) == "open":
                metrics.STORE_TROUBLE.labels("admitted_unchecked").inc()
                return found
            metrics.STORE_TROUBLE.labels("refused").inc()
            raise store_unavailable(exc.retry_after_s) from exc
        if not decision.allowed:
            metrics.RATE_LIMITED.labels(decision.limit or "requests").inc()
            raise rate_limited(decision.limit, decision.retry_after_s)
        return found

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={
            200: {
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
                "description": "The completion, or server-sent chunks when stream is true.",
            },
            **COMMON_ERRORS,
            **_errors(404, 503),
        },
    )
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, found: Annotated[Client, Depends(limited)]
    ) -> Response:
        unsupported = body.check_supported()
        if unsupported is not None:
            param, why = unsupported
            raise invalid(why, param=param, code="unsupported_parameter")
        call = Call(
            body,
            found,
            session=request.headers.get(SESSION_HEADER),
            cache_control=request.headers.get(CACHE_CONTROL_HEADER),
            front_end=request.headers.get(FRONT_END_HEADER),
        )
        if body.stream:
            headers, events = await until_disconnect(request, live.service.stream(call))
            headers |= {"cache-control": "no-cache", "x-accel-buffering": "no"}
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        completion, headers = await until_disconnect(request, live.service.complete(call))
        return JSONResponse(completion.model_dump(), headers=headers)

    @app.post(
        "/v1/messages",
        response_model=AnthropicMessage,
        responses={200: SSE_BODY, **ANTHROPIC_ERRORS},
        summary="Anthropic Messages",
    )
    async def messages(
        body: MessagesRequest, request: Request, found: Annotated[Client, Depends(limited)]
    ) -> Response:
        """The Anthropic Messages API (text), on the chat completions path; errors in
        Anthropic's shape. The anthropic-version header is accepted."""
        refuse_unsupported(body.check_supported())
        call = call_for(anthropic.to_chat(body), found, request.headers, anthropic.ID_PREFIX)
        if body.stream:
            headers, stream = await until_disconnect(request, chunks(live.service, call))
            events = anthropic.events(call.id, stream)
            return StreamingResponse(
                events, media_type="text/event-stream", headers=headers | STREAM_HEADERS
            )
        completion, headers = await until_disconnect(request, live.service.complete(call))
        return JSONResponse(anthropic.message(completion).model_dump(), headers=headers)

    responses_api = ResponsesAPI(store, first.settings.session_ttl_s)

    @app.post(
        "/v1/responses",
        response_model=ResponseObject,
        responses={200: SSE_BODY, **COMMON_ERRORS, **_errors(404)},
        summary="Responses",
    )
    async def responses(
        body: ResponsesRequest, request: Request, found: Annotated[Client, Depends(limited)]
    ) -> Response:
        """The OpenAI Responses API (text and function tools), on the chat completions path;
        previous_response_id continues a stored response of the same key."""
        refuse_unsupported(body.check_supported())
        turn = await responses_api.prepare(body, found, request.headers)
        if body.stream:
            headers, stream = await until_disconnect(request, chunks(live.service, turn.call))
            events = responses_api.events(turn, stream)
            return StreamingResponse(
                events, media_type="text/event-stream", headers=headers | STREAM_HEADERS
            )
        completion, headers = await until_disconnect(request, live.service.complete(turn.call))
        answer = await responses_api.complete(turn, completion)
        return JSONResponse(answer.model_dump(), headers=headers)

    @app.post(
        "/v1/completions",
        response_model=Completion,
        responses={200: SSE_BODY, **COMMON_ERRORS, **_errors(404)},
        summary="Completions (legacy)",
    )
    async def text_completions(
        body: CompletionRequest, request: Request, found: Annotated[Client, Depends(limited)]
    ) -> Response:
        """Legacy text completions: each prompt is one user message, routed like a chat."""
        refuse_unsupported(body.check_supported())
        calls = completions.calls(body, found, request.headers)
        if body.stream:
            headers, stream = await until_disconnect(request, chunks(live.service, calls[0]))
            events = completions.events(body, calls[0], stream)
            return StreamingResponse(
                events, media_type="text/event-stream", headers=headers | STREAM_HEADERS
            )
        work = completions.complete(body, calls, live.service.complete)
        completion, headers = await until_disconnect(request, work)
        return JSONResponse(completion.model_dump(), headers=headers)

    @app.get("/v1/models", response_model=ModelList, responses=_errors(401))
    async def list_models(found: Annotated[Client, Depends(client)]) -> ModelList:
        return live.service.models()

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses=_errors(401, 404))
    async def get_model(model_id: str, found: Annotated[Client, Depends(client)]) -> ModelCard:
        return live.service.model(model_id)

    @app.post(
        "/v1/route", response_model=RouteResponse, responses={**COMMON_ERRORS, **_errors(404)}
    )
    async def route(
        body: RouteRequest, found: Annotated[Client, Depends(limited)]
    ) -> RouteResponse:
        """Where a conversation would go, without generating."""
        messages = [m.to_message() for m in body.messages]
        decision = await live.service.route(body.model, messages, owner=found.subject)
        return RouteResponse.model_validate(decision.as_dict())

    @app.get("/health", response_model=HealthResponse)
    async def health() -> HealthResponse:
        """Liveness (200 while the gateway answers) and a summary: each expert's state, the
        store's; `status` and `ready` sum them up."""
        return await live.service.health()

    @app.get(
        "/health/ready", response_model=HealthResponse, responses={503: {"model": HealthResponse}}
    )
    async def ready() -> JSONResponse:
        """Readiness: 503 while an expert the router sends to is down, or the store is."""
        body = await live.service.health()
        return JSONResponse(body.model_dump(), 200 if body.ready else 503)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}, **_errors(401)},
    )
    async def prometheus(found: Annotated[Client, Depends(client)]) -> Response:
        """Prometheus metrics, behind the API keys like /v1 (any valid key; not rate-limited,
        so a scraper never gets a 429): they tell each client's traffic and the pool's load.
        /health stays open, for load balancers and container healthchecks."""
        metrics.STORE_HEALTHY.set(1 if store.healthy else 0)
        for engine, count in live.service.unfinished_requests().items():
            metrics.ENGINE_UNFINISHED.labels(engine).set(count)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    async def admin(found: Annotated[Client, Depends(client)]) -> Client:
        if not found.admin:
            raise forbidden(
                "This key may not change the pool: /admin needs a key with `admin: true` in "
                "gateway.api_keys (or one in $COE_ADMIN_KEYS)"
            )
        return found

    @app.post("/admin/reload", responses=_errors(400, 401, 403, 503), summary="Reload the pool")
    async def reload(found: Annotated[Client, Depends(admin)]) -> JSONResponse:
        """Read experts.yaml (and the router folder) again and serve it; requests in flight
        finish on the pool they started with. A broken file changes nothing (400)."""
        try:
            report = await live.reload()
        except CoeError as exc:
            raise pool_change_refused(exc) from exc
        return JSONResponse(report.as_dict())

    @app.post("/admin/adapters", responses=_errors(400, 401, 403, 503), summary="Load an adapter")
    async def load_adapter(
        body: AdapterEntry, found: Annotated[Client, Depends(admin)]
    ) -> JSONResponse:
        """Serve a LoRA adapter as an expert (its entry as in experts.yaml: name, base,
        adapter), until unloaded or the gateway restarts."""
        try:
            report = await live.load_adapter(body.model_dump(exclude_none=True))
        except CoeError as exc:
            raise pool_change_refused(exc) from exc
        return JSONResponse(report.as_dict())

    @app.delete(
        "/admin/adapters/{name}", responses=_errors(400, 401, 403), summary="Unload an adapter"
    )
    async def unload_adapter(name: str, found: Annotated[Client, Depends(admin)]) -> JSONResponse:
        """Stop serving an adapter loaded through /admin/adapters."""
        try:
            report = await live.unload_adapter(name)
        except CoeError as exc:
            raise pool_change_refused(exc) from exc
        return JSONResponse(report.as_dict())

    return app


class AdapterEntry(BaseModel):
    """An adapter expert, as its experts.yaml entry (the checks are experts.yaml's)."""

    model_config = ConfigDict(extra="allow")
    name: str
    base: str
    adapter: str
    description: str | None = None


class InFlight:
    """Counts each HTTP request against the pool generation current when it arrived, so that
    a reload retires the previous generation's engines only once its requests are done."""

    def __init__(self, app: ASGIApp, live: LivePool):
        self.app = app
        self.live = live

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        generation = self.live.current
        generation.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            generation.leave()


def refuse_unsupported(unsupported: tuple[str, str] | None) -> None:
    if unsupported is not None:
        param, why = unsupported
        raise invalid(why, param=param, code="unsupported_parameter")


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client hangs up first: Starlette does not cancel a
    handler whose client has gone, and a cancelled generation is aborted in its engine."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        # The body has been read: the next message the server gives is the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    finally:
        watcher.cancel()


class BodyLimit:
    """413 for bodies over the limit, whether announced by Content-Length or streamed."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await too_large(self.limit).response()(scope, receive, send)
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # FastAPI re-raises HTTP exceptions from body reading; errors.py shapes it.
                    raise _TooLarge(self.limit)
            return message

        await self.app(scope, counted, send)


class _TooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, too_large(limit).body.message)


class ErrorDialect:
    """Error answers on some paths in another protocol's shape: whatever answered (the keys,
    the limits, the body limit, validation, the service), the OpenAI-shaped body is rewritten by
    the path's renderer (status, body) -> body. Streamed errors are the framings' own."""

    def __init__(
        self, app: ASGIApp, renderers: dict[str, Callable[[int, dict[str, Any]], dict[str, Any]]]
    ):
        self.app = app
        self.renderers = renderers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        render = self.renderers.get(scope["path"]) if scope["type"] == "http" else None
        if render is None:
            await self.app(scope, receive, send)
            return
        held: Message | None = None
        parts: list[bytes] = []

        async def rewriting(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held = message
                return
            if held is None or message["type"] != "http.response.body":
                await send(message)
                return
            parts.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            try:
                body = json.dumps(render(held["status"], json.loads(b"".join(parts)))).encode()
            except ValueError:
                body = b"".join(parts)
            headers = [(k, v) for k, v in held["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**held, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewriting)


class RequestMetrics:
    """Counts requests by endpoint and status, and times them to the last byte sent."""

    def __init__(self, app: ASGIApp, endpoints: set[str]):
        self.app = app
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in self.endpoints else "other"
        status = 500
        t0 = time.perf_counter()

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            metrics.REQUESTS.labels(endpoint, str(status)).inc()
            metrics.REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - t0)
