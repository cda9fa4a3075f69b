"""The `coe` command line: ask, chat, up, down, status, serve, logs, experts, models, route,
router, prompts, eval, bench, deploy.

Every command reads the pool from --config, else $COE_CONFIG, else ./experts.yaml, else the
project's default experts.yaml. Each command group lives in its own module of this package;
what they share (the context, the error -> exit status mapping, opening the pool) is in
`coe.cli.runtime`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from coe import __version__
from coe.cli.ask import ask
from coe.cli.bench import bench
from coe.cli.chat import chat
from coe.cli.deploy import deploy
from coe.cli.eval import eval_
from coe.cli.experts import experts
from coe.cli.logs import logs
from coe.cli.models import models
from coe.cli.prompts import prompts
from coe.cli.route import route
from coe.cli.router import router
from coe.cli.runtime import CliContext, CoeGroup
from coe.cli.serve import keys, serve
from coe.cli.up import down, status_, up
from coe.engines.vllm_local import quiet_vllm_logs

__all__ = ["main"]


@click.group(cls=CoeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="COE_CONFIG",
    help="experts.yaml to use (env COE_CONFIG; default ./experts.yaml, else the project's).",
)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(__version__, prog_name="coe")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None, verbose: int) -> None:
    """coe: serve a pool of expert LLMs as one model, routing each prompt to the right expert."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", logging.getLevelName(level))
    quiet_vllm_logs()
    ctx.obj = CliContext(config_path, verbose)


main.add_command(ask)
main.add_command(chat)
main.add_command(up)
main.add_command(down)
main.add_command(status_)
main.add_command(serve)
main.add_command(keys)
main.add_command(experts)
main.add_command(logs)
main.add_command(models)
main.add_command(route)
main.add_command(router)
main.add_command(prompts)
main.add_command(eval_)
main.add_command(bench)
main.add_command(deploy)
