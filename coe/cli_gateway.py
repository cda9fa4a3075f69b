"""`coe serve` (the OpenAI-compatible gateway), `coe keys new`, and `coe bench gateway`."""

from __future__ import annotations

import json
import signal
import sys
from typing import Any

import click


def _interrupt(signum: int, frame: Any) -> None:
    # SIGTERM (docker stop, systemd) shuts down like Ctrl-C: engines and Redis closed cleanly.
    raise KeyboardInterrupt


def register(main: click.Group, bench: click.Group, pass_ctx: Any) -> None:
    @main.command()
    @click.option(
        "--host",
        default="127.0.0.1",
        envvar="COE_HOST",
        show_default=True,
        help="Address to bind (env COE_HOST). Beyond loopback, configure API keys.",
    )
    @click.option(
        "--port", default=8000, envvar="COE_PORT", show_default=True, help="Port (env COE_PORT)."
    )
    @click.option(
        "--redis-url",
        envvar="COE_REDIS_URL",
        help="redis://host:port/db for the shared store (env COE_REDIS_URL; default: store.url "
        "in experts.yaml, else an in-process store).",
    )
    @click.option(
        "--log-level",
        type=click.Choice(["warning", "info", "debug"]),
        default="warning",
        show_default=True,
        help="uvicorn's logging; info adds one access-log line per request.",
    )
    @pass_ctx
    def serve(ctx: Any, host: str, port: int, redis_url: str | None, log_level: str) -> None:
        """Serve the pool as one OpenAI-compatible model at http://HOST:PORT/v1.

        model "auto" routes each request; an expert's name skips routing; "auto:CATEGORY" uses
        the category's expert. Also /v1/models, /v1/route, /health and /metrics. API keys come
        from gateway.api_keys in experts.yaml (hashed) and $COE_API_KEYS (comma-separated).
        """
        from coe import cli
        from coe.gateway.server import GatewayServer, is_loopback

        cfg = ctx.config
        runner, orch = cli._open_orchestrator(
            cfg, cfg.expert_names, store_url=redis_url or cfg.store.url
        )
        try:
            server = GatewayServer(orch, runner, host=host, port=port, log_level=log_level)
            if not server.keys.required and not is_loopback(host):
                click.echo(
                    f"warning: serving on {host} without API keys: anyone who can reach it can "
                    "use the pool. Add gateway.api_keys (coe keys new) or set COE_API_KEYS.",
                    err=True,
                )
            signal.signal(signal.SIGTERM, _interrupt)
            try:
                server.start()
            except (OSError, RuntimeError) as exc:
                click.echo(f"error: cannot serve on {host}:{port}: {exc}", err=True)
                sys.exit(cli.EXIT_FAILED)
            store = (
                f"Redis {redis_url or cfg.store.url}"
                if server.store.kind == "redis"
                else ("in-process store")
            )
            click.echo(
                f"coe serve: {server.url}/v1 ({len(cfg.experts)} experts, {store}); Ctrl-C stops",
                err=True,
            )
            server.wait()
        finally:
            cli._close(runner, orch)

    @main.group()
    def keys() -> None:
        """API keys of the gateway."""

    @keys.command("new")
    @click.option("--name", required=True, help="Whose key it is (rate limits and logs use it).")
    def keys_new(name: str) -> None:
        """Make a key: prints the key once, and the entry for experts.yaml (its hash only)."""
        from coe.gateway.auth import hash_key, new_key

        key = new_key()
        click.echo(f"key (give it to the client; it is not stored anywhere): {key}", err=True)
        click.echo("add under gateway.api_keys in experts.yaml:", err=True)
        click.echo(f"  - {{name: {name}, sha256: {hash_key(key)}}}")

    @bench.command("gateway")
    @click.option("--requests", default=200, show_default=True, help="Requests per measurement.")
    @click.option("--tokens", default=1, show_default=True, help="New tokens per request.")
    @click.option("--max-seconds", default=120.0, show_default=True, help="Stop measuring after.")
    @click.option(
        "--redis-url",
        envvar="COE_REDIS_URL",
        help="Measure with this Redis as the store (env COE_REDIS_URL; default in-process).",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
    @pass_ctx
    def bench_gateway(
        ctx: Any,
        requests: int,
        tokens: int,
        max_seconds: float,
        redis_url: str | None,
        as_json: bool,
    ) -> None:
        """Gateway overhead: the same requests through the HTTP gateway and straight to the
        engine, interleaved in one run; and the latency of response-cache hits. Loopback only."""
        from coe import cli
        from coe.bench.gateway import run_gateway_bench

        cfg = ctx.config
        expert = cfg.fallback_expert
        runner, orch = cli._open_orchestrator(cfg, [expert], store_url=redis_url)
        try:
            result = run_gateway_bench(orch, runner, expert, requests, tokens, max_seconds)
        finally:
            cli._close(runner, orch)
        if as_json:
            click.echo(json.dumps(result.as_dict(), indent=2))
            return
        result.print_table()
