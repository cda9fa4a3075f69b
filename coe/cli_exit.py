"""How the `coe` commands end on an error: one line on stderr and an exit status a script can
test. 1 for a failure while working, 2 for bad input (config, arguments), as click does."""

from __future__ import annotations

import sys
from typing import NoReturn

import click

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def fail(message: str, status: int = EXIT_BAD_INPUT) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(status)
