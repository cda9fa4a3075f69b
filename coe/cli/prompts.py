"""`coe prompts fit`: build a category's mixture-of-prompts regions."""

from __future__ import annotations

import json
from pathlib import Path

import click

from coe.cli.runtime import CliContext, load_router, pass_cli


@click.group()
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
@pass_cli
def prompts_fit(
    cli: CliContext,
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
    from coe.prompts.mixture import fit_mixture, read_demos
    from coe.router.embed import load_embedder

    cfg = cli.config
    if category not in cfg.category_names:
        raise click.BadParameter(
            f"{category!r} is not a category of {cfg.source} "
            f"(defined: {', '.join(cfg.category_names)})",
            param_hint="--category",
        )
    # Bad demos or too few of them raise MixtureError: exit 2 with its message.
    rows = read_demos(demos)
    embedder = load_router(cfg).embedder if cfg.router.path is not None else load_embedder()
    mixture = fit_mixture(
        category, rows, _candidates(instructions), embedder, seed=seed, max_regions=max_regions
    )
    mixture.save(out)
    click.echo(f"{mixture.regions} region(s) from {len(rows)} demos -> {out}")
    for region, instruction in enumerate(mixture.instructions):
        size = int((mixture.demo_regions == region).sum())
        click.echo(f"  region {region}: {size} demos; instruction: {instruction}")


def _candidates(path: Path) -> list[str]:
    """A JSON list of strings, or one instruction per line."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        found = json.loads(text)
        if not isinstance(found, list) or not all(isinstance(c, str) for c in found):
            raise click.BadParameter("expected a JSON list of strings", param_hint="--instructions")
        return [c.strip() for c in found if c.strip()]
    return [line.strip() for line in text.splitlines() if line.strip()]
