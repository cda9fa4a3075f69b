"""Who answers `coe ask` and `coe chat`: the pool started in this process (an orchestrator and
its engines), or a pool already running behind a gateway (`coe up`, or any `coe serve` named by
--url), reached over its OpenAI API. Both give the same things: the routing decision first, then
the answer's text, streamed or whole, so the commands print the same either way.

The remote one uses httpx (imported in a tenth of a second; `coe ask` against a running pool is
meant to take about one) and reads the routing decision from the gateway's x-coe-* headers.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import click

from coe.errors import BadRequestError, UnavailableError
from coe.types import Message, RouteDecision

if TYPE_CHECKING:
    import httpx

    from coe.cli.runtime import CliContext, OpenPool

AUTO = "auto"
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Answer:
    """One whole answer, as `coe ask --json` prints it."""

    decision: RouteDecision
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float


class Answerer(Protocol):
    """What `coe ask` and `coe chat` ask a pool for."""

    where: str  # "in-process", or the gateway's URL

    def expert_names(self) -> list[str]: ...

    def stream(
        self,
        messages: list[Message],
        *,
        expert: str | None,
        system: str | None,
        sampling: dict[str, Any],
    ) -> Generator[RouteDecision | str, None, None]:
        """The decision (once, when the expert that answers is known), then text pieces.
        Closing the iterator (Ctrl-C) stops the generation."""
        ...

    def complete(
        self,
        messages: list[Message],
        *,
        expert: str | None,
        system: str | None,
        sampling: dict[str, Any],
    ) -> Answer: ...


class LocalAnswerer:
    """The pool in this process (coe.cli.runtime.open_pool)."""

    where = "in-process"

    def __init__(self, pool: OpenPool):
        self.pool = pool

    def expert_names(self) -> list[str]:
        return list(self.pool.orchestrator.config.expert_names)

    def stream(
        self,
        messages: list[Message],
        *,
        expert: str | None,
        system: str | None,
        sampling: dict[str, Any],
    ) -> Generator[RouteDecision | str, None, None]:
        orch = self.pool.orchestrator

        async def produce() -> Any:
            _, _prompt, chunks = await orch.stream(
                messages, expert=expert, system=system, **sampling
            )
            # The decision comes with the first chunk: only then is the expert that answers
            # known (a fallback expert, when the one chosen was down).
            announced = False
            async for chunk in chunks:
                if not announced:
                    announced = True
                    yield chunks.decision
                if chunk.text:
                    yield chunk.text
            if not announced:
                yield chunks.decision

        yield from self.pool.runner.iterate(produce)

    def complete(
        self,
        messages: list[Message],
        *,
        expert: str | None,
        system: str | None,
        sampling: dict[str, Any],
    ) -> Answer:
        orch = self.pool.orchestrator
        result = self.pool.runner.run(
            orch.chat([m.as_dict() for m in messages], expert=expert, system=system, **sampling)
        )
        return Answer(
            decision=result.decision,
            text=result.text,
            finish_reason=result.finish_reason,
            prompt_tokens=result.usage.prompt_tokens,
            completion_tokens=result.usage.completion_tokens,
            latency_s=result.latency_s,
        )


class RemotePoolError(UnavailableError):
    """The running pool is unreachable, or failed a request; the message is the gateway's."""


class RemoteAnswerer:
    """A pool behind a coe gateway, over its OpenAI-compatible API."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0):
        import httpx

        self.where = url.rstrip("/")
        base = self.where if self.where.endswith("/v1") else self.where + "/v1"
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        # The request log records these requests as the CLI's (coe.gateway.call's
        # FRONT_END_HEADER; not imported: the gateway package would slow every `coe ask`).
        headers["x-coe-front-end"] = "cli"
        # No proxy from the environment: the pool is on this machine or named by its URL.
        self.client = httpx.Client(
            base_url=base,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=5.0),
            trust_env=False,
        )
        self._experts: list[str] | None = None

    def close(self) -> None:
        self.client.close()

    def expert_names(self) -> list[str]:
        if self._experts is None:
            reply = self._checked(self._send("GET", "/models"))
            ids = [m["id"] for m in reply.json()["data"]]
            self._experts = [i for i in ids if i != AUTO and not i.startswith(AUTO + ":")]
        return self._experts

    def _body(
        self,
        messages: list[Message],
        expert: str | None,
        system: str | None,
        sampling: dict[str, Any],
        stream: bool,
    ) -> dict[str, Any]:
        # A system message replaces the expert's own system prompt, as --system does in-process.
        turns = [m.as_dict() for m in messages if system is None or m.role != "system"]
        if system is not None:
            turns.insert(0, {"role": "system", "content": system})
        body: dict[str, Any] = {"model": expert or AUTO, "messages": turns, "stream": stream}
        body.update({k: v for k, v in sampling.items() if v is not None})
        return body

    def stream(
        self,
        messages: list[Message],
        *,
        expert: str | None,
        system: str | None,
        sampling: dict[str, Any],
    ) -> Generator[RouteDecision | str, None, None]:
        body = self._body(messages, expert, system, sampling, stream=True)
        request = self.client.build_request("POST", "/chat/completions", json=body)
        response = self._send_request(request, stream=True)
        try:
            if response.status_code >= 400:
                response.read()
                self._checked(response)
            yield decision_from_headers(response.headers)
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise RemotePoolError(_error_message(event, self.where))
                for choice in event.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield text
        finally:
            response.close()  # a closed stream (Ctrl-C) makes the gateway cancel the request

    def complete(
        self,
        messages: list[Message],
        *,
        expert: str | None,
        system: str | None,
        sampling: dict[str, Any],
    ) -> Answer:
        body = self._body(messages, expert, system, sampling, stream=False)
        t0 = time.perf_counter()
        reply = self._checked(self._send("POST", "/chat/completions", json=body))
        latency = time.perf_counter() - t0
        data = reply.json()
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        return Answer(
            decision=decision_from_headers(reply.headers),
            text=choice["message"].get("content") or "",
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            latency_s=latency,
        )

    # -- HTTP ----------------------------------------------------------------------------------
    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self._send_request(self.client.build_request(method, path, **kwargs))

    def _send_request(self, request: httpx.Request, stream: bool = False) -> httpx.Response:
        import httpx

        try:
            return self.client.send(request, stream=stream)
        except httpx.HTTPError as exc:
            raise RemotePoolError(
                f"cannot reach the pool at {self.where} ({type(exc).__name__}: {exc}); is it "
                "running, or still starting? (`coe status`)"
            ) from None

    def _checked(self, response: httpx.Response) -> httpx.Response:
        if response.status_code < 400:
            return response
        try:
            message = _error_message(response.json(), self.where)
        except ValueError:
            message = f"the pool at {self.where} answered {response.status_code}"
        if response.status_code == 401:
            raise RemotePoolError(f"{message} (set COE_API_KEY or pass --api-key)")
        if response.status_code in (400, 404, 413):
            raise BadRequestError(message)  # bad input: exit 2, as in-process
        raise RemotePoolError(message)


def _error_message(body: Any, where: str) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return f"the pool at {where} failed the request: {body!r}"[:500]


def decision_from_headers(headers: Any) -> RouteDecision:
    """The routing decision the gateway reports in its x-coe-* headers (coe.gateway.call)."""
    confidence = headers.get("x-coe-confidence")
    return RouteDecision(
        expert=headers.get("x-coe-expert", "?"),
        category=headers.get("x-coe-category"),
        confidence=float(confidence) if confidence is not None else None,
        fell_back=headers.get("x-coe-fallback") == "1",
        reason="reported by the gateway",
        strategy=headers.get("x-coe-strategy", "none"),
    )


# -- choosing the answerer ---------------------------------------------------------------------


def pool_options(command: F) -> F:
    """--url, --api-key and --local: which pool answers."""
    command = click.option(
        "--local",
        is_flag=True,
        help="Start the pool in this process even when one is running (`coe up`).",
    )(command)
    command = click.option(
        "--api-key",
        envvar="COE_API_KEY",
        help="API key for the running pool, when it has keys (env COE_API_KEY).",
    )(command)
    return click.option(
        "--url",
        envvar="COE_URL",
        help="Use the coe gateway at this URL (env COE_URL; default: the pool `coe up` "
        "started for this experts.yaml, if one runs, else a pool started in this process).",
    )(command)


@contextlib.contextmanager
def open_answerer(
    cli: CliContext,
    expert: str | None,
    *,
    url: str | None,
    api_key: str | None,
    local: bool,
    why_local: str | None = None,
) -> Iterator[Answerer]:
    """The running pool that serves this experts.yaml (or the one --url names), else the pool
    started in this process (said once on stderr). ``why_local``: this call needs the pool in
    this process (an option only it can serve); it is used even if one runs."""
    from coe.cli.background import RunFiles, find_server
    from coe.cli.runtime import check_expert, experts_to_start, fail, open_pool

    say: Callable[[str], None] = lambda msg: click.echo(msg, err=True)  # noqa: E731
    if url is not None and local:
        fail("--url and --local contradict each other: pick one")
    if url is not None and why_local is not None:
        fail(f"--url: {why_local} needs the pool in this process (drop --url)")
    files = RunFiles.for_config(cli.config_file)
    if url is None:
        check_expert(cli.config, expert)
        if not local and why_local is None:
            record = find_server(files, say)
            url = record.url if record is not None else None
            if url is None:
                say("[no pool running for this experts.yaml: starting one in this process; "
                    "`coe up` keeps one running and makes the next call fast]")  # fmt: skip
    if url is not None:
        remote = RemoteAnswerer(url, api_key)
        try:
            if expert is not None and expert not in remote.expert_names():
                raise click.BadParameter(
                    f"unknown expert {expert!r}; the pool at {url} serves: "
                    f"{', '.join(remote.expert_names())}",
                    param_hint="--expert",
                )
            yield remote
        finally:
            remote.close()
        return
    cfg = cli.config
    # On a terminal, the engines' own logs go to a file unless the user asked for them (-v).
    quiet = sys.stderr.isatty() and cli.verbose == 0
    engine_log = files.engine_log if quiet else None
    with open_pool(cfg, experts_to_start(cfg, expert), engine_log=engine_log) as pool:
        yield LocalAnswerer(pool)
