"""`coe up`, `coe down`, `coe status`: the pool of an experts.yaml kept running in the
background (a detached `coe serve`; see coe.cli.background), so that `coe ask` and `coe chat`
answer in a second instead of starting engines each time."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from coe.cli.background import (
    RunFiles,
    ServerRecord,
    find_server,
    free_port,
    last_line,
    log_tail,
    remove_state,
    run_root,
    spawn_server,
    stop_server,
)
from coe.cli.runtime import EXIT_FAILED, CliContext, fail, pass_cli, status
from coe.paths import exclusive_lock

# The endpoints that answer a prompt: what "requests served" counts.
ANSWERING = ("/v1/chat/completions", "/v1/messages", "/v1/responses", "/v1/completions")


def _say(message: str) -> None:
    click.echo(message, err=True)


@click.command()
@click.option(
    "--host",
    default="127.0.0.1",
    envvar="COE_UP_HOST",
    show_default=True,
    help="Address to bind (env COE_UP_HOST). Beyond loopback, configure API keys (coe serve).",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    envvar="COE_UP_PORT",
    help="Port (env COE_UP_PORT; default: a free one).",
)
@click.option(
    "--redis-url",
    envvar="COE_REDIS_URL",
    help="redis://host:port/db for the pool's store (env COE_REDIS_URL; default as coe serve).",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=1),
    default=900.0,
    envvar="COE_UP_TIMEOUT",
    show_default=True,
    help="Seconds to wait for the pool to be up (env COE_UP_TIMEOUT); then it is stopped.",
)
@pass_cli
def up(
    cli: CliContext, host: str, port: int | None, redis_url: str | None, timeout_s: float
) -> None:
    """Start the pool of this experts.yaml in the background (`coe serve`), wait until it
    answers, and print its URL on stdout. Its pid, URL and log are under $COE_HOME/run; `coe
    ask` and `coe chat` use it from then on; `coe down` stops it. A pool already running for
    this experts.yaml is left as it is."""
    _ = cli.config  # a broken experts.yaml fails here (exit 2), not in the server's log
    files = RunFiles.for_config(cli.config_file)
    # Two `coe up` at once for one file: the second waits, then finds the first one's pool.
    with exclusive_lock(files.folder / "up.lock"):
        running = find_server(files, _say)
        if running is not None:
            _say(f"the pool of {running.config} is already running (pid {running.pid})")
            click.echo(f"{running.url}/v1")
            return
        extra = ["--redis-url", redis_url] if redis_url else []
        proc, record = spawn_server(cli.config_file, files, host, port or free_port(host), extra)
        try:
            _wait_until_up(proc, record, files, timeout_s)
        except BaseException:
            stop_server(record, deadline_s=30)
            remove_state(files)
            raise
    _say(
        f"pool up at {record.url}/v1 (pid {record.pid}; log {record.log}); "
        "`coe ask` and `coe chat` use it, `coe down` stops it"
    )
    click.echo(f"{record.url}/v1")


def _wait_until_up(proc: Any, record: ServerRecord, files: RunFiles, timeout_s: float) -> None:
    """Poll /health until it answers, showing the server's latest log line as the phase; the
    log's tail and exit 1 if the server exits first or the time runs out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    with (
        httpx.Client(timeout=2.0, trust_env=False) as client,
        status("starting the pool") as spinner,
    ):
        while True:
            code = proc.poll()
            if code is not None:
                _say(f"the pool's server exited ({code}) while starting; end of {record.log}:")
                _say(log_tail(files.server_log))
                fail("the pool did not start (its log is above)", EXIT_FAILED)
            try:
                if client.get(f"{record.url}/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet: engines start before the socket opens
            if time.monotonic() > deadline:
                _say(f"end of {record.log}:\n{log_tail(files.server_log)}")
                fail(f"the pool was not up within {timeout_s:.0f} s; stopped it", EXIT_FAILED)
            if spinner is not None:
                phase = last_line(files.server_log)[:90] or "starting"
                spinner.update(f"starting the pool: {phase}")
            time.sleep(0.5)


@click.command()
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds to wait after SIGTERM before SIGKILL (of the server and its engines).",
)
@pass_cli
def down(cli: CliContext, timeout_s: float) -> None:
    """Stop the background pool of this experts.yaml (`coe up`) and remove its pid file. Its
    log stays (server.log under $COE_HOME/run) for a look afterwards."""
    files = RunFiles.for_config(cli.config_file)
    record = find_server(files, _say)
    if record is None:
        _say(f"no pool is running for {cli.config_file}")
        return
    how = stop_server(record, timeout_s)
    remove_state(files)
    _say(f"pool at {record.url} (pid {record.pid}): {how}")


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (--all: a list).")
@click.option("--all", "every_pool", is_flag=True, help="Every pool running under $COE_HOME/run.")
@click.option(
    "--api-key",
    envvar="COE_API_KEY",
    help="API key for /metrics when the pool has keys (env COE_API_KEY; without it, requests "
    "served are not shown).",
)
@pass_cli
def status_(cli: CliContext, as_json: bool, every_pool: bool, api_key: str | None) -> None:
    """Show the background pool of this experts.yaml: URL, pid, uptime, each expert with its
    state and weight tier, requests served. Exits 1 when no pool is running."""
    if every_pool:
        records = [r for r in (find_server(f, _say) for f in _all_run_files()) if r is not None]
        reports = [pool_report(r, api_key) for r in records]
        if as_json:
            click.echo(json.dumps(reports, indent=2))
        for report in [] if as_json else reports:
            _print_report(report)
        if not records:
            _say("no pool is running (`coe up` starts one)")
            sys.exit(EXIT_FAILED)
        return
    files = RunFiles.for_config(cli.config_file)
    record = find_server(files, _say)
    if record is None:
        if as_json:
            click.echo(json.dumps({"running": False, "config": str(cli.config_file)}))
        else:
            _say(f"no pool is running for {cli.config_file} (`coe up` starts one)")
        sys.exit(EXIT_FAILED)
    report = pool_report(record, api_key)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_report(report)


def _all_run_files() -> list[RunFiles]:
    root = run_root()
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return [RunFiles(f) for f in folders]


def pool_report(record: ServerRecord, api_key: str | None) -> dict[str, Any]:
    """What a running pool says of itself: /health (experts' states), /metrics (tiers,
    requests served; behind the keys), and the run record."""
    import httpx

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    report: dict[str, Any] = {
        "running": True,
        "url": f"{record.url}/v1",
        "pid": record.pid,
        "config": record.config,
        "log": record.log,
        "uptime_s": round(record.uptime_s, 1),
        "status": None,
        "experts": {},
        "requests_served": None,
    }
    with httpx.Client(base_url=record.url, timeout=5.0, trust_env=False, headers=headers) as c:
        try:
            health = c.get("/health").json()
        except (httpx.HTTPError, ValueError) as exc:
            report["status"] = f"not answering ({type(exc).__name__}): still starting?"
            return report
        try:
            reply = c.get("/metrics")
            metrics_text = reply.text if reply.status_code == 200 else ""
        except httpx.HTTPError:
            metrics_text = ""
    tiers, served = _read_metrics(metrics_text)
    report["status"] = health.get("status")
    for name, info in health.get("experts", {}).items():
        up = info.get("state") == "up"
        report["experts"][name] = {
            "state": info.get("state"),
            "routed": info.get("routed"),
            # An expert outside the weight cache holds its weights in its own engine.
            "tier": tiers.get(name) or ("hbm" if up else None),
        }
    report["requests_served"] = served if metrics_text else None
    return report


def _read_metrics(text: str) -> tuple[dict[str, str], int]:
    """Each expert's tier (coe_expert_residency) and the answered requests (coe_requests)."""
    from prometheus_client.parser import text_string_to_metric_families

    tiers: dict[str, str] = {}
    served = 0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "coe_expert_residency" and sample.value == 1:
                tiers[sample.labels["expert"]] = sample.labels["tier"]
            elif sample.name == "coe_requests_total" and sample.labels.get("endpoint") in ANSWERING:
                served += int(sample.value)
    return tiers, served


def _print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    uptime = _duration(report["uptime_s"])
    served = report["requests_served"]
    console = Console()
    console.print(
        f"pool [bold]{report['url']}[/] ({report['status']}): pid {report['pid']}, up {uptime}, "
        f"requests served: {'n/a (needs --api-key)' if served is None else served}"
    )
    console.print(f"experts.yaml {report['config']}; log {report['log']}")
    table = Table("expert", "state", "tier", "routed")
    for name, info in report["experts"].items():
        table.add_row(name, str(info["state"]), str(info["tier"] or "-"), str(info["routed"]))
    console.print(table)


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s"
