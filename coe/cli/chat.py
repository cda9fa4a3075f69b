"""`coe chat`: chat with the pool on a terminal, or answer a pipe's lines (see chat_session)."""

from __future__ import annotations

import sys

import click

from coe.cli.answerer import open_answerer, pool_options
from coe.cli.runtime import CliContext, pass_cli, sampling_options


@click.command()
@click.option("--expert", help="Start with every prompt going to this expert (/auto undoes it).")
@click.option("--system", help="System prompt for the whole chat (replaces the experts' own).")
@sampling_options
@pool_options
@pass_cli
def chat(
    cli: CliContext,
    expert: str | None,
    system: str | None,
    max_tokens: int | None,
    temperature: float | None,
    url: str | None,
    api_key: str | None,
    local: bool,
) -> None:
    """Chat with the pool. On a terminal: multi-turn, streamed, /help for commands.

    Uses the pool `coe up` runs for this experts.yaml (or --url's) when there is one, else
    starts the pool in this process. With stdin from a pipe, answers each input line and exits
    at end of input:

        echo "Name the largest planet." | coe chat
    """
    from coe.cli.chat_session import ChatSession

    with open_answerer(cli, expert, url=url, api_key=api_key, local=local) as answerer:
        session = ChatSession(
            answerer, sampling={"max_tokens": max_tokens, "temperature": temperature}
        )
        session.state.expert = expert
        session.state.system = system
        interactive = sys.stdin.isatty()
        code = session.run_interactive() if interactive else session.run_piped(sys.stdin)
    sys.exit(code)
