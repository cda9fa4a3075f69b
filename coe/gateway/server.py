"""Running the gateway: uvicorn serves the app on the event loop that owns the engines (vLLM's
async engine is bound to the loop it was started on), in the CLI's background loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import uvicorn

from coe.config import PoolConfig
from coe.errors import CoeError, ConfigurationError
from coe.gateway.app import create_app
from coe.gateway.auth import API_KEYS_ENV, KeyRing, is_loopback_address
from coe.gateway.live import LivePool
from coe.gateway.service import ChatService
from coe.orchestrator import Orchestrator
from coe.redact import redact_text
from coe.runtime import BackgroundLoop
from coe.store import RedisStore, Store, open_store

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """A bind address on this machine only (a name or an IP literal)."""
    return host == "localhost" or is_loopback_address(host)


class OpenGatewayError(ConfigurationError):
    """Serving without API keys beyond loopback, not asked for with --allow-open."""

    def __init__(self, host: str):
        super().__init__(
            f"refusing to serve on {host} without API keys: anyone who can reach it could use "
            "the pool. Add gateway.api_keys to experts.yaml (coe keys new) or set "
            f"{API_KEYS_ENV}; or bind 127.0.0.1; or pass --allow-open if that is what you want."
        )


def check_exposure(host: str, keys_required: bool, allow_open: bool) -> None:
    """Raise OpenGatewayError for an open gateway (no keys) on a non-loopback address, unless
    the operator allowed it: an open gateway on the network is a choice, never a default."""
    if not keys_required and not is_loopback(host) and not allow_open:
        raise OpenGatewayError(host)


def build_service(
    orchestrator: Orchestrator, keys: KeyRing | None = None
) -> tuple[ChatService, KeyRing]:
    config: PoolConfig = orchestrator.config
    settings = config.gateway
    ring = keys or KeyRing.for_gateway(settings)
    return ChatService(orchestrator, settings), ring


async def open_store_on_loop(url: str | None) -> Store:
    """The gateway's store, for the orchestrator it serves. Run it on the serving loop: the
    Redis client binds to the loop it is created on.

    Raises StoreMisconfiguredError (a ConfigurationError: `coe serve` exits 2) when Redis
    refuses coe (a wrong or missing password, a permission, a failing script): that will not
    pass by waiting. An unreachable Redis is an outage: serve degraded until it answers."""
    store = open_store(url)
    if isinstance(store, RedisStore) and not await store.ping():
        if store.state == "misconfigured":
            error = store.error()
            await store.close()
            raise error
        log.warning(
            "Redis at %s is not answering (%s); serving degraded until it is",
            store.display_url,
            store.problem,
        )
    return store


class GatewayServer:
    """uvicorn on a BackgroundLoop; ``start`` returns once the socket listens. It serves with
    the orchestrator's store (open it with ``open_store_on_loop``) and closes it on ``stop``."""

    def __init__(
        self,
        orchestrator: Orchestrator,
        runner: BackgroundLoop,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        keys: KeyRing | None = None,
        log_level: str = "warning",
    ):
        self.runner = runner
        self.host = host
        self.store = orchestrator.store
        self.service, self.keys = build_service(orchestrator, keys)
        self.live = LivePool(self.service, self.keys)
        self.app = create_app(self.live)
        config = uvicorn.Config(
            self.app,
            host=host,
            port=port,
            log_level=log_level,
            access_log=log_level in ("info", "debug", "trace"),
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)
        self._future: Any = None
        self._reloads: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> None:
        self._future = asyncio.run_coroutine_threadsafe(self.server.serve(), self.runner.loop)
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if self._future.done():
                self._future.result()  # raises why it stopped (port in use, ...)
                raise RuntimeError(f"the gateway stopped before listening on {self.host}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not listen within {timeout_s:.0f} s")
            time.sleep(0.02)

    def reload_soon(self, report: Callable[[str], None]) -> None:
        """Reload experts.yaml on the serving loop (SIGHUP), telling ``report`` how it went;
        a refused file leaves the pool as it was."""

        async def reload() -> None:
            try:
                done = await self.live.reload()
            except CoeError as exc:
                report(f"reload refused, the pool is unchanged: {redact_text(str(exc))}")
                return
            report(f"reloaded: {done.as_dict()}")

        def schedule() -> None:
            task = self.runner.loop.create_task(reload())
            self._reloads.add(task)  # held: the loop keeps only a weak reference
            task.add_done_callback(self._reloads.discard)

        self.runner.loop.call_soon_threadsafe(schedule)

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C or SIGTERM in the main thread stops it)."""
        try:
            while not self._future.done():
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
        self.stop()

    def stop(self) -> None:
        if self._future is None:
            return
        self.server.should_exit = True
        try:
            self._future.result(timeout=15)
        except Exception as exc:  # already stopping: report, do not mask the shutdown
            log.warning("gateway stopped with %s", redact_text(str(exc)))
        self.runner.run(self.live.close())
        self.runner.run(self.store.close())
        self._future = None
