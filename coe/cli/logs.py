"""`coe logs`: the request log (every request the pool answered, from any front end), listed
and filtered; `coe logs stats`: the routing mix, per-expert latency percentiles, fallback rate."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from coe.cli.runtime import CliContext, pass_cli


def _filter_options(command: Any) -> Any:
    for option in reversed(
        [
            click.option("--expert", help="Only requests this expert answered."),
            click.option("--category", help="Only requests routed to this category."),
            click.option(
                "--front-end",
                type=click.Choice(["cli", "gateway", "eval"]),
                help="Only requests from this front end.",
            ),
            click.option(
                "--since",
                help="Only requests from this time on: a duration back (30s, 10m, 2h, 7d) or an "
                "ISO time (2026-11-30T14:00, local unless it names its zone).",
            ),
            click.option(
                "--db",
                type=click.Path(path_type=Path, dir_okay=False),
                help="The log file to read (default: the one the pool writes: experts.yaml's "
                "log.path, else $COE_LOG_DB, else $COE_HOME/logs/requests.sqlite).",
            ),
            click.option("--json", "as_json", is_flag=True, help="Print JSON."),
        ]
    ):
        command = option(command)
    return command


def _log_path(cli: CliContext, db: Path | None) -> Path:
    if db is not None:
        return db
    config = cli.config
    if not config.log.enabled:
        click.echo(
            f"note: the request log is off in {config.source} (log.enabled: false); "
            "showing what it holds from before",
            err=True,
        )
    return config.request_log_path


def _filters(
    limit: int | None,
    expert: str | None,
    category: str | None,
    front_end: str | None,
    since: str | None,
) -> Any:
    from coe.requestlog.query import Filters, parse_since

    return Filters(
        limit=limit,
        expert=expert,
        category=category,
        front_end=front_end,
        since=parse_since(since) if since else None,
    )


@click.group(invoke_without_command=True)
@click.option(
    "-n",
    "--count",
    "limit",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="How many of the most recent requests to list (0: all).",
)
@_filter_options
@pass_cli
@click.pass_context
def logs(
    ctx: click.Context,
    cli: CliContext,
    limit: int,
    expert: str | None,
    category: str | None,
    front_end: str | None,
    since: str | None,
    db: Path | None,
    as_json: bool,
) -> None:
    """List the most recent requests: time, front end, client, model asked, routing (category,
    confidence, fallback, expert, strategy), tokens, time to first token, latency, cache, error.

    Every request through the pool is logged (`coe ask`, `coe chat`, `coe serve`, `coe eval`);
    experts.yaml's `log:` section turns it off or keeps prompts hashed only.
    """
    if ctx.invoked_subcommand is not None:
        given = [expert, category, front_end, since, db, as_json or None]
        if any(v is not None for v in given) or limit != 20:
            raise click.UsageError(
                f"give the options after `{ctx.invoked_subcommand}`: "
                f"coe logs {ctx.invoked_subcommand} [OPTIONS]"
            )
        return
    from coe.requestlog.query import read_records

    path = _log_path(cli, db)
    records = read_records(path, _filters(limit or None, expert, category, front_end, since))
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in records], ensure_ascii=False, indent=1))
        return
    if not records:
        click.echo(f"no requests logged in {path} (that match)", err=True)
        return
    _print_records(records)


def _print_records(records: list[Any]) -> None:
    now = time.time()
    headers = ("time", "from", "client", "model", "category", "conf", "expert", "strategy",
               "tokens", "ttft s", "latency s", "cache", "prompt / error")  # fmt: skip
    rows = []
    for r in records:
        when = datetime.fromtimestamp(r.time)
        shown = when.strftime("%H:%M:%S" if now - r.time < 86400 else "%Y-%m-%d %H:%M")
        category = (r.category or "") + (" (fb)" if r.fallback else "")
        tokens = "" if r.prompt_tokens is None else f"{r.prompt_tokens}+{r.completion_tokens}"
        tail = f"error: {r.error}" if r.error else (r.prompt or "").replace("\n", " ")
        rows.append(
            (
                shown, r.front_end, r.client or "", r.model or "", category,
                "" if r.confidence is None else f"{r.confidence:.2f}", r.expert or "",
                r.strategy or "", tokens, _seconds(r.ttft_s), _seconds(r.latency_s),
                r.cache or "", tail[:60],
            )
        )  # fmt: skip
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table()
        for h in headers:
            table.add_column(h, overflow="fold" if h == "prompt / error" else "ellipsis")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
    else:
        click.echo("\t".join(headers))
        for row in rows:
            click.echo("\t".join(row))


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


@logs.command("stats")
@_filter_options
@click.option(
    "--plot",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also draw the routing mix over time to this PNG file.",
)
@click.option(
    "--by",
    type=click.Choice(["category", "expert"]),
    default="category",
    show_default=True,
    help="What the plot stacks.",
)
@pass_cli
def stats(
    cli: CliContext,
    expert: str | None,
    category: str | None,
    front_end: str | None,
    since: str | None,
    db: Path | None,
    as_json: bool,
    plot: Path | None,
    by: str,
) -> None:
    """The routing mix (requests and share per category and expert), per-expert latency and
    time-to-first-token percentiles (p50/p90/p99, over requests answered without error), the
    fallback rate and the error count."""
    from coe.requestlog.query import read_records, summarize

    path = _log_path(cli, db)
    records = read_records(path, _filters(None, expert, category, front_end, since))
    summary = summarize(records)
    if plot is not None:
        from coe.requestlog.plot import plot_mix

        plot_mix(records, plot, by)
        summary["plot"] = str(plot)
    if as_json:
        click.echo(json.dumps(summary, ensure_ascii=False, indent=1))
        return
    if not records:
        click.echo(f"no requests logged in {path} (that match)", err=True)
        return
    _print_stats(summary)
    if plot is not None:
        click.echo(f"routing mix over time: {plot}", err=True)


def _print_stats(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    # Off a terminal (a pipe, a file) no screen limits the width: keep the columns whole.
    console = Console(width=None if sys.stdout.isatty() else 120)
    span = ""
    if s["first"] is not None:
        first = datetime.fromtimestamp(s["first"]).strftime("%Y-%m-%d %H:%M")
        last = datetime.fromtimestamp(s["last"]).strftime("%Y-%m-%d %H:%M")
        span = f" from {first} to {last}"
    rate = "n/a" if s["fallback_rate"] is None else f"{100 * s['fallback_rate']:.1f}%"
    cache = ", ".join(f"{k} {v}" for k, v in sorted(s["cache"].items())) or "none"
    console.print(
        f"{s['requests']} requests{span}; errors {s['errors']}; "
        f"fallback rate {rate} ({s['fallbacks']}); response cache: {cache}"
    )
    mix = Table(title="routing mix by category")
    for col in ("category", "requests", "share"):
        mix.add_column(col)
    for c in s["categories"]:
        mix.add_row(c["name"], str(c["count"]), f"{100 * c['share']:.1f}%")
    console.print(mix)
    experts = Table(title="per expert: seconds, p50 / p90 / p99 of answered requests")
    for col in ("expert", "requests", "share", "errors", "latency", "time to first token"):
        experts.add_column(col, no_wrap=True)
    for e in s["experts"]:
        experts.add_row(
            e["expert"],
            str(e["count"]),
            f"{100 * e['share']:.1f}%",
            str(e["errors"]),
            _spread(e["latency_s"]),
            _spread(e["ttft_s"]),
        )
    console.print(experts)


def _spread(quantiles: dict[str, float | None]) -> str:
    return " / ".join(_seconds(quantiles[q]) or "-" for q in ("p50", "p90", "p99"))
