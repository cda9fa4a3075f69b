"""An expert behind any OpenAI-compatible server (a separately started `vllm serve`, a hosted API),
called through litellm so one code path serves every provider litellm knows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Hashable
from typing import Any, ClassVar

import httpx
from pydantic import Field

from coe.engines.base import (
    ALL_TOOL_CHOICES,
    UP,
    EngineError,
    EngineHealth,
    EngineOptions,
    ExpertView,
    ModelResolver,
)
from coe.engines.render import format_stops, render_qa
from coe.errors import BadRequestError, ConfigurationError
from coe.redact import redact_text, redact_url
from coe.types import (
    Chunk,
    Prompt,
    SamplingParams,
    TokenLogprob,
    ToolCallDelta,
    ToolChoice,
    Usage,
)


class RemoteOptions(EngineOptions):
    """An expert behind any OpenAI-compatible server, called through litellm (an expert entry's
    `remote:` key)."""

    base_url: str
    # The model name the server knows the expert by.
    model: str
    # Name of the environment variable holding the API key (the key itself never goes in the file).
    api_key_env: str | None = None
    timeout_s: float = Field(120.0, gt=0.0)


log = logging.getLogger(__name__)

# A health probe gets this long to answer: a server slower than this to say it is alive is not
# one to send requests to.
PROBE_TIMEOUT_S = 2.0
# /health is polled (load balancers, compose): one probe answers every caller for this long.
PROBE_TTL_S = 3.0


class RemoteExpertFields(EngineOptions):
    """The keys an expert entry with `engine: remote` adds to the common ones."""

    # Required, but checked after the types (RemoteKind.check) so that a missing `remote:` is
    # reported together with every other problem of the file, with what to write there.
    remote: RemoteOptions | None = None


def load_litellm() -> Any:
    """The litellm module, imported on first use (it is slow to import) and kept quiet."""
    # litellm fetches a price map from the internet at import unless told to use its local copy.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True
    return litellm


class RemoteEngine:
    """Health is the server's, as last seen: a probe (its /health, else /v1/models) at most every
    PROBE_TTL_S, and every request's outcome in between (a failed one marks the expert down
    until a probe or a request succeeds)."""

    def __init__(self, name: str, options: RemoteOptions):
        self.name = name
        self.options = options
        self._health = EngineHealth("down", "not checked yet")
        self._checked: float | None = None  # monotonic time of the last probe or request
        self._probe_lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return self._health.up

    def _api_key(self) -> str:
        env = self.options.api_key_env
        if env is None:
            return "none"  # local servers accept any key; the client insists on one
        key = os.environ.get(env)
        if not key:
            raise EngineError(
                f"expert {self.name}: environment variable {env} (api_key_env) is unset"
            )
        return key

    async def start(self) -> None:
        # Nothing to start: the server is someone else's. A server that is down now is an
        # outage to report, not a reason to refuse to serve the other experts.
        load_litellm()
        health = await self.health(fresh=True)
        if not health.up:
            log.warning("remote expert %s is down at start: %s", self.name, health.reason)

    async def health(self, *, fresh: bool = False) -> EngineHealth:
        """The server's state, probed at most every PROBE_TTL_S (``fresh``: now)."""
        if not fresh and self._is_recent():
            return self._health
        async with self._probe_lock:  # concurrent callers share one probe
            if not fresh and self._is_recent():
                return self._health
            self._observe(await self._probe())
        return self._health

    def _is_recent(self) -> bool:
        return self._checked is not None and time.monotonic() - self._checked < PROBE_TTL_S

    def _observe(self, health: EngineHealth) -> None:
        if health.up != self._health.up and self._checked is not None:
            if health.up:
                log.warning("remote expert %s is up again", self.name)
            else:
                log.warning("remote expert %s is down: %s", self.name, health.reason)
        self._health = health
        self._checked = time.monotonic()

    def _server_root(self) -> str:
        """base_url without its /v1: vLLM serves /health beside /v1, not under it."""
        base = self.options.base_url.rstrip("/")
        return base.removesuffix("/v1")

    async def _probe(self) -> EngineHealth:
        try:
            headers = {"authorization": f"Bearer {self._api_key()}"}
        except EngineError:
            return EngineHealth("down", f"environment variable {self.options.api_key_env} is unset")
        try:
            async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_S) as client:
                answer = await client.get(self._server_root() + "/health", headers=headers)
                if answer.is_success:
                    return UP
                if answer.status_code >= 500:  # vLLM: the server is up, its engine is not
                    return EngineHealth("down", f"its health check answered {answer.status_code}")
                # No /health (a hosted API): listing the models needs a live server and the key.
                models = self.options.base_url.rstrip("/") + "/models"
                answer = await client.get(models, headers=headers)
        except httpx.TimeoutException:
            return EngineHealth("down", f"no answer within {PROBE_TIMEOUT_S:g} s")
        except httpx.HTTPError as exc:
            return EngineHealth("down", f"unreachable ({type(exc).__name__})")
        if answer.is_success:
            return UP
        if answer.status_code in (401, 403):
            return EngineHealth("down", "the server refused the API key")
        return EngineHealth("down", f"its model list answered {answer.status_code}")

    async def stream(
        self, prompt: Prompt, sampling: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[Chunk]:
        litellm = load_litellm()
        # "openai/" tells litellm to speak the plain OpenAI protocol to base_url.
        common: dict[str, Any] = {
            "model": f"openai/{self.options.model}",
            "api_base": self.options.base_url,
            "api_key": self._api_key(),
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "timeout": self.options.timeout_s,
            "num_retries": 0,
            "extra_headers": {"x-request-id": request_id or uuid.uuid4().hex},
        }
        stops = list(sampling.stop + format_stops(prompt))
        if stops:
            common["stop"] = stops
        if sampling.seed is not None:
            common["seed"] = sampling.seed
        if sampling.repetition_penalty != 1.0:
            common["extra_body"] = {"repetition_penalty": sampling.repetition_penalty}
        common.update(_openai_extras(prompt, sampling))
        try:
            if prompt.format == "qa":
                response = await litellm.atext_completion(
                    prompt=render_qa(prompt.messages), **common
                )
            else:
                messages = [m.as_dict() for m in prompt.messages]
                response = await litellm.acompletion(messages=messages, **common)
            finish: str | None = None
            usage: Usage | None = None
            async for part in response:
                if getattr(part, "usage", None):
                    u = part.usage
                    usage = Usage(u.prompt_tokens or 0, u.completion_tokens or 0)
                if not part.choices:
                    continue
                choice = part.choices[0]
                text = _delta_text(choice)
                finish = choice.finish_reason or finish
                calls = _delta_tool_calls(choice)
                logprobs = _delta_logprobs(choice) if sampling.logprobs is not None else None
                if text or calls or logprobs:
                    yield Chunk(text=text, tool_calls=calls, logprobs=logprobs)
        except EngineError:
            raise
        except Exception as exc:  # litellm maps every provider error to its own classes
            # The message is logged and a refusal's reason reaches the client: neither may
            # carry the server's key or a password in its URL, whatever litellm quoted.
            key = [common["api_key"]]
            if isinstance(exc, (litellm.AuthenticationError, litellm.PermissionDeniedError)):
                # A wrong or missing key is the operator's to fix, not an outage to wait out.
                raise RemoteKeyError(
                    self.name,
                    redact_url(self.options.base_url),
                    self.options.api_key_env,
                    redact_text(str(exc), key),
                ) from exc
            refused = isinstance(exc, litellm.BadRequestError)  # context too long, bad params
            if _retryable(litellm, exc):  # the server is away or failing, not this request
                self._observe(EngineHealth("down", f"a request failed ({type(exc).__name__})"))
            raise EngineError(
                f"remote expert {self.name} at {redact_url(self.options.base_url)} failed: "
                f"{type(exc).__name__}: {redact_text(str(exc), key)}",
                retryable=_retryable(litellm, exc),
                invalid_request=refused,
                reason=redact_text(str(getattr(exc, "message", exc)), key) if refused else None,
            ) from exc
        self._observe(UP)
        yield Chunk(text="", finish_reason=finish or "stop", usage=usage or Usage())

    async def shutdown(self) -> None:
        # The server is someone else's and stays up; nothing of ours to stop.
        pass


class RemoteKeyError(ConfigurationError):
    """The remote server refused coe's key (401/403): api_key_env unset, wrong or missing."""

    def __init__(self, expert: str, where: str, env: str | None, said: str):
        source = f"the key in ${env} (api_key_env)" if env else "a request without a key"
        hint = "" if env else " (set remote.api_key_env)"
        super().__init__(f"remote expert {expert} at {where} refused {source}{hint}: {said}")


def _openai_extras(prompt: Prompt, sampling: SamplingParams) -> dict[str, Any]:
    """The request fields beyond plain sampling, in OpenAI's shapes, only when set."""
    out: dict[str, Any] = {}
    if sampling.presence_penalty:
        out["presence_penalty"] = sampling.presence_penalty
    if sampling.frequency_penalty:
        out["frequency_penalty"] = sampling.frequency_penalty
    if sampling.logit_bias:
        out["logit_bias"] = {str(token): bias for token, bias in sampling.logit_bias}
    if sampling.logprobs is not None:
        out["logprobs"] = True
        out["top_logprobs"] = sampling.logprobs
    fmt = sampling.response_format
    if fmt is not None:
        if fmt.type == "json_object":
            out["response_format"] = {"type": "json_object"}
        else:
            schema = {"name": fmt.name or "response", "strict": fmt.strict}
            schema["schema"] = json.loads(fmt.schema or "{}")
            out["response_format"] = {"type": "json_schema", "json_schema": schema}
    spec = prompt.tools
    if spec is not None and spec.tools:
        if prompt.format == "qa":
            raise BadRequestError(
                "tools: this expert's server is asked for text completions (prompt_format qa), "
                "which take no tools",
                param="tools",
            )
        out["tools"] = [t.as_dict() for t in spec.tools]
        if spec.choice == "function":
            out["tool_choice"] = {"type": "function", "function": {"name": spec.function}}
        else:
            out["tool_choice"] = spec.choice
        if not spec.parallel:
            out["parallel_tool_calls"] = False
    return out


def _delta_tool_calls(choice: Any) -> list[ToolCallDelta]:
    delta = getattr(choice, "delta", None)
    out = []
    for i, call in enumerate(getattr(delta, "tool_calls", None) or []):
        function = getattr(call, "function", None)
        index = getattr(call, "index", None)
        out.append(
            ToolCallDelta(
                index=index if index is not None else i,
                id=getattr(call, "id", None),
                name=getattr(function, "name", None),
                arguments=getattr(function, "arguments", None) or "",
            )
        )
    return out


def _delta_logprobs(choice: Any) -> list[TokenLogprob] | None:
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    return [
        TokenLogprob(
            token=entry.token,
            logprob=float(entry.logprob),
            top=[(t.token, float(t.logprob)) for t in (entry.top_logprobs or [])],
        )
        for entry in content
    ]


def _delta_text(choice: Any) -> str:
    delta = getattr(choice, "delta", None)
    if delta is not None:
        return getattr(delta, "content", None) or ""
    return getattr(choice, "text", None) or ""


def _retryable(litellm: Any, exc: Exception) -> bool:
    """Connection failures, timeouts and 5xx may pass on a retry; 4xx will not."""
    transient = (
        litellm.APIConnectionError,
        litellm.Timeout,
        litellm.InternalServerError,
        litellm.ServiceUnavailableError,
    )
    return isinstance(exc, transient)


class RemoteKind:
    """`engine: remote`: the expert is served by someone else's OpenAI-compatible server."""

    name: ClassVar[str] = "remote"
    fields: ClassVar[type[EngineOptions]] = RemoteExpertFields
    in_process: ClassVar[bool] = False

    @classmethod
    def check(cls, expert: ExpertView) -> list[str]:
        assert isinstance(expert, RemoteExpertFields)
        if expert.remote is None:
            return [
                "remote: required when engine is 'remote' "
                "(give base_url and model of the OpenAI-compatible server)"
            ]
        return []

    @classmethod
    def backend(cls, expert: ExpertView) -> str:
        assert isinstance(expert, RemoteExpertFields)
        return expert.remote.base_url if expert.remote is not None else ""

    @classmethod
    def tool_choices(cls, expert: ExpertView) -> frozenset[ToolChoice]:
        """Tools are forwarded: the server calls them, or refuses the request (a 400). Not
        for a Q/A-format expert, whose server is asked for a plain text completion."""
        if getattr(expert, "prompt_format", "chat") == "qa":
            return frozenset()
        return ALL_TOOL_CHOICES

    @classmethod
    def engine_key(cls, pool: ModelResolver, expert: ExpertView) -> Hashable:
        assert isinstance(expert, RemoteExpertFields) and expert.remote is not None
        # The key too: experts on one server with different keys must not share a client.
        remote = expert.remote
        return ("remote", remote.base_url, remote.model, remote.api_key_env)

    @classmethod
    def build(cls, pool: ModelResolver, expert: ExpertView, name: str) -> RemoteEngine:
        assert isinstance(expert, RemoteExpertFields) and expert.remote is not None
        return RemoteEngine(name, expert.remote)
