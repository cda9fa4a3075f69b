"""`coe experts`: the pool's experts, the categories each serves, and where their weights are."""

from __future__ import annotations

import json
from typing import Any

import click

from coe.cli.runtime import CliContext, pass_cli
from coe.config import PoolConfig

COLUMNS = ("expert", "engine", "model", "format", "params", "tier", "bytes", "hits", "categories")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the pool as JSON.")
@pass_cli
def experts(cli: CliContext, as_json: bool) -> None:
    """List the experts, the categories each serves, and where their weights are.

    Tier (hbm, host, disk), bytes and hit counts are live when a `coe chat` or `coe serve` on
    this experts.yaml is running; otherwise they show where the weights start.
    """
    from coe.cache.status import read_live

    cfg = cli.config
    live = read_live(cfg.source)
    rows = _expert_rows(cfg, live)
    if as_json:
        body = {"config": str(cfg.source), "live": live is not None, "experts": rows}
        click.echo(json.dumps(body, indent=2))
        return
    _print_experts(cfg, rows, live)


def _expert_rows(cfg: PoolConfig, live: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per expert: what it runs, and where its weights are (live if a pool runs)."""
    from coe.cache.plan import planned_residency
    from coe.engines.registry import engine_kind

    placement = planned_residency(cfg)
    if live is not None:
        for row in live["experts"]:
            for name in row.get("experts", [row["expert"]]):
                if row.get("kind") == "adapter":  # the fourth tier: engine, host, disk
                    placement.setdefault(name, {})
                if name in placement:
                    placement[name].update(
                        tier=row["tier"],
                        hits=row["hits"],
                        bytes=row["host_bytes"] or row["disk_bytes"],
                    )
    rows = []
    for e in cfg.experts:
        where = placement.get(e.name, {})
        rows.append(
            {
                "name": e.name,
                "engine": e.engine,
                "model": engine_kind(e.engine).backend(e),
                "format": e.prompt_format,
                "params": e.params,
                "bytes": where.get("bytes", e.bytes),
                "tier": where.get("tier", _starting_tier(e)),
                "hits": where.get("hits"),
                "slot_group": where.get("group"),
                "categories": [c.name for c in cfg.categories if c.expert == e.name],
                "lora": _lora_row(cfg, e),
            }
        )
    return rows


def _starting_tier(expert: Any) -> str:
    """Where an expert's weights are before any request: a LoRA adapter on disk (its engine
    loads it on first use), a remote expert elsewhere, any other in its engine."""
    if getattr(expert, "adapter", None) is not None:
        return "disk"
    return "remote" if expert.engine == "remote" else "hbm"


def _lora_row(cfg: PoolConfig, expert: Any) -> dict[str, Any] | None:
    """A LoRA adapter expert's base, adapter folder and rank (None for other experts)."""
    from coe.engines.lora import AdapterError, read_adapter

    adapter = getattr(expert, "adapter", None)
    if adapter is None:
        return None
    path = cfg.resolve_path(adapter)
    try:
        rank: int | None = read_adapter(path).rank
    except AdapterError:
        rank = None
    return {"base": expert.base, "adapter": str(path), "rank": rank}


def _print_experts(
    cfg: PoolConfig, rows: list[dict[str, Any]], live: dict[str, Any] | None
) -> None:
    from rich.console import Console
    from rich.table import Table

    state = f"live, pid {live['pid']}" if live else "planned"
    table = Table(title=f"experts ({cfg.source}; tiers {state})")
    for col in COLUMNS:
        table.add_column(col)
    for r in rows:
        params = f"{r['params'] / 1e6:,.0f}M" if r["params"] else "?"
        size = f"{r['bytes'] / 1e6:,.0f} MB" if r["bytes"] else "?"
        hits = "" if r["hits"] is None else str(r["hits"])
        model = r["model"]
        if r["lora"] is not None:
            lora = r["lora"]
            model = f"{lora['base']} + LoRA r{lora['rank'] or '?'} {lora['adapter']}"
        table.add_row(
            r["name"],
            r["engine"],
            model,
            r["format"],
            params,
            r["tier"],
            size,
            hits,
            ", ".join(r["categories"]),
        )
    Console().print(table)
