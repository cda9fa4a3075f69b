"""`coe prompts fit`: build a category's mixture-of-prompts regions."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click


def _candidates(path: Path) -> list[str]:
    """A JSON list of strings, or one instruction per line."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        found = json.loads(text)
        if not isinstance(found, list) or not all(isinstance(c, str) for c in found):
            raise click.BadParameter("expected a JSON list of strings", param_hint="--instructions")
        return [c.strip() for c in found if c.strip()]
    return [line.strip() for line in text.splitlines() if line.strip()]


def register(main: click.Group, bench: click.Group, pass_ctx: Any) -> None:
    @main.group()
    def prompts() -> None:
        """Prompt strategies: mixture-of-prompts regions."""

    @prompts.command("fit")
    @click.argument("demos", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @click.option("--category", required=True, help="The category the regions are for.")
    @click.option(
        "--instructions",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        required=True,
        help="Candidate instructions (one per line, or a JSON list); each region takes the one "
        "nearest to its demos.",
    )
    @click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
    @click.option("--seed", default=0, show_default=True, help="K-means seed.")
    @click.option("--max-regions", default=8, show_default=True, help="Most regions to try.")
    @pass_ctx
    def prompts_fit(
        ctx: Any,
        demos: Path,
        category: str,
        instructions: Path,
        out: Path,
        seed: int,
        max_regions: int,
    ) -> None:
        """Cluster DEMOS.jsonl ({"input", "output"} per line) into regions, each with its own
        instruction and demos, embedded with the router's embedder. Point the category's
        `prompts:` in experts.yaml at --out and set its strategy to mixture_of_prompts."""
        from coe.prompts.mixture import MixtureError, fit_mixture, read_demos
        from coe.router.embed import load_embedder

        cfg = ctx.config
        if category not in cfg.category_names:
            raise click.BadParameter(
                f"{category!r} is not a category of {cfg.source} "
                f"(defined: {', '.join(cfg.category_names)})",
                param_hint="--category",
            )
        try:
            rows = read_demos(demos)
            if cfg.router.path is not None:
                from coe.cli_router import load_router

                embedder = load_router(cfg).embedder
            else:
                embedder = load_embedder()
            mixture = fit_mixture(
                category, rows, _candidates(instructions), embedder,
                seed=seed, max_regions=max_regions,
            )  # fmt: skip
        except MixtureError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        mixture.save(out)
        click.echo(f"{mixture.regions} region(s) from {len(rows)} demos -> {out}")
        for region, instruction in enumerate(mixture.instructions):
            size = int((mixture.demo_regions == region).sum())
            click.echo(f"  region {region}: {size} demos; instruction: {instruction}")

    @bench.command("prompts")
    @click.option("--prompts", "count", default=40, show_default=True, help="Prompts to time.")
    @click.option(
        "--generated", default=5, show_default=True, help="Prompts whose identity is written."
    )
    @click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
    @pass_ctx
    def bench_prompts(ctx: Any, count: int, generated: int, as_json: bool) -> None:
        """Latency each prompt strategy adds (static and generated identities, mixture-of-prompts
        lookup), beside routing latency, in one run. Starts the writer expert's engine."""
        import tempfile

        from coe import cli
        from coe.bench.prompts import run_prompts_bench
        from coe.cli_router import load_router
        from coe.runtime import BackgroundLoop

        cfg = ctx.config
        if cfg.router.path is None:
            raise click.UsageError("the benchmark needs a router: set router.path in experts.yaml")
        router = load_router(cfg)
        fallback = cfg.fallback_expert
        from coe.models import ensure_models

        ensure_models(cli._needed_models(cfg, [fallback]), report=lambda m: None)
        runner = BackgroundLoop()
        try:
            with tempfile.TemporaryDirectory() as work:
                result = run_prompts_bench(cfg, router, runner, count, generated, Path(work))
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        finally:
            runner.close()
        if as_json:
            click.echo(json.dumps(result.as_dict(), indent=2))
            return
        result.print_table()
