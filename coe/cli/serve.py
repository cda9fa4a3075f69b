"""`coe serve` (the OpenAI-compatible gateway) and `coe keys new` (its API keys)."""

from __future__ import annotations

import signal
from types import FrameType

import click

from coe.cli.runtime import EXIT_BAD_INPUT, EXIT_FAILED, CliContext, fail, open_pool, pass_cli
from coe.config import PoolConfig


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM (docker stop, systemd) shuts down like Ctrl-C: engines and Redis closed cleanly.
    raise KeyboardInterrupt


@click.command()
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
    "--allow-open",
    is_flag=True,
    help="Serve without API keys on a non-loopback --host (refused otherwise): anyone who "
    "can reach the address can use the pool.",
)
@click.option(
    "--log-level",
    type=click.Choice(["warning", "info", "debug"]),
    default="warning",
    show_default=True,
    help="uvicorn's logging; info adds one access-log line per request.",
)
@click.option(
    "--ray",
    "on_ray",
    is_flag=True,
    help="Serve on Ray Serve: the gateway and expert deployments of experts.yaml's cluster: "
    "section (needs the ray extra).",
)
@click.option(
    "--ray-address",
    envvar="COE_RAY_ADDRESS",
    help="With --ray, the cluster to join (env COE_RAY_ADDRESS; default cluster.address in "
    "experts.yaml, else a one-node cluster of coe's own on --host, which must be loopback).",
)
@pass_cli
def serve(
    cli: CliContext,
    host: str,
    port: int,
    redis_url: str | None,
    allow_open: bool,
    log_level: str,
    on_ray: bool,
    ray_address: str | None,
) -> None:
    """Serve the pool as one OpenAI-compatible model at http://HOST:PORT/v1.

    model "auto" routes each request; an expert's name skips routing; "auto:CATEGORY" uses
    the category's expert. Also /v1/models, /v1/route, /health and /metrics (behind the keys).
    SIGHUP or POST /admin/reload (an admin key) reloads experts.yaml without a restart.
    API keys come from gateway.api_keys in experts.yaml (hashed) and $COE_API_KEYS
    (comma-separated, 32 characters or more). Without keys, only a loopback --host is served,
    unless --allow-open.
    """
    from coe.gateway.auth import KeyRing
    from coe.gateway.server import GatewayServer, check_exposure, is_loopback
    from coe.redact import redact_url

    cfg = cli.config
    # Keys and exposure are checked before any model is prepared or engine started: a refusal
    # comes in a second, not after the minute an engine takes.
    keys = KeyRing.for_gateway(cfg.gateway)
    check_exposure(host, keys.required, allow_open)
    if not keys.required and not is_loopback(host):
        click.echo(
            f"warning: serving on {host} without API keys (--allow-open): anyone who can reach "
            "it can use the pool.",
            err=True,
        )
    store_url = redis_url or cfg.store.url
    if on_ray:
        _serve_on_ray(cfg, host, port, ray_address or cfg.cluster.address, redis_url)
        return
    with open_pool(cfg, cfg.expert_names, store_url=store_url, front_end="gateway") as pool:
        server = GatewayServer(
            pool.orchestrator, pool.runner, host=host, port=port, keys=keys, log_level=log_level
        )
        signal.signal(signal.SIGTERM, _interrupt)
        # SIGHUP: read experts.yaml (and the router) again; a broken file changes nothing.
        say = lambda message: click.echo(message, err=True)  # noqa: E731
        signal.signal(signal.SIGHUP, lambda signum, frame: server.reload_soon(say))
        try:
            server.start()
        except (OSError, RuntimeError) as exc:
            fail(f"cannot serve on {host}:{port}: {exc}", EXIT_FAILED)
        store = (
            f"Redis {redact_url(store_url)}"
            if server.store.kind == "redis" and store_url
            else "in-process store"
        )
        click.echo(
            f"coe serve: {server.url}/v1 ({len(cfg.experts)} experts, {store}); Ctrl-C stops",
            err=True,
        )
        if pool.orchestrator.requests.enabled:
            click.echo(f"request log: {cfg.request_log_path} (coe logs)", err=True)
        server.wait()


def _serve_on_ray(
    cfg: PoolConfig, host: str, port: int, address: str | None, redis_url: str | None
) -> None:
    import os

    from coe.cluster.launch import deploy, wait_forever
    from coe.gateway.server import is_loopback

    if address is None and not is_loopback(host):
        fail(
            f"--host {host}: coe's own Ray cluster binds loopback only; to serve beyond this "
            "machine, start Ray on your nodes (ray start) and pass --ray-address",
            EXIT_BAD_INPUT,
        )
    signal.signal(signal.SIGTERM, _interrupt)
    deployed = deploy(cfg, host, port, address, float(os.cpu_count() or 1), redis_url)
    where = address or "a local one-node cluster"
    click.echo(f"coe serve --ray: {deployed.url}/v1 on {where}; Ctrl-C stops", err=True)
    wait_forever(deployed)


@click.group()
def keys() -> None:
    """API keys of the gateway."""


@keys.command("new")
@click.option("--name", required=True, help="Whose key it is (rate limits and logs use it).")
@click.option(
    "--admin", is_flag=True, help="The key may change the pool (/admin: reload, adapters)."
)
def keys_new(name: str, admin: bool) -> None:
    """Make a key: prints the key once, and the entry for experts.yaml (its hash only)."""
    from coe.gateway.auth import hash_key, new_key

    key = new_key()
    click.echo(f"key (give it to the client; it is not stored anywhere): {key}", err=True)
    click.echo("add under gateway.api_keys in experts.yaml:", err=True)
    extra = ", admin: true" if admin else ""
    click.echo(f"  - {{name: {name}, sha256: {hash_key(key)}{extra}}}")
