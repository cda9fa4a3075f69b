"""`coe route`: where a prompt, or a conversation, would go, without starting any engine."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO

import click

from coe.cli.runtime import CliContext, load_router, pass_cli
from coe.types import Message, RouteDecision


@click.command()
@click.argument("prompt", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the RouteDecision as JSON.")
@click.option(
    "--router", "router_path", type=click.Path(path_type=Path), help="Router folder to use."
)
@click.option(
    "--messages",
    "messages_file",
    type=click.File("r"),
    help='A whole conversation to route: a JSON list of {"role", "content"} (OpenAI '
    "style; - reads stdin). Its latest turn is routed with the task it belongs to.",
)
@pass_cli
def route(
    cli: CliContext,
    prompt: str | None,
    as_json: bool,
    router_path: Path | None,
    messages_file: IO[str] | None,
) -> None:
    """Show where PROMPT (or a conversation) would go: category, confidence, expert."""
    from coe.orchestrator import Orchestrator

    messages = _conversation(prompt, messages_file)
    # The orchestrator decides as it would for a request; no engine starts (they start lazily).
    orchestrator = Orchestrator(cli.config, router=load_router(cli.config, router_path))
    # A broken mixture-of-prompts folder raises MixtureError: exit 2 with its message.
    decision = orchestrator.describe(orchestrator.route(messages), messages)
    if as_json:
        click.echo(json.dumps(decision.as_dict(), ensure_ascii=False))
        return
    _print_decision(decision)


def _conversation(prompt: str | None, messages_file: IO[str] | None) -> list[Message]:
    """PROMPT as one user turn (- reads stdin), or the conversation in --messages."""
    if messages_file is not None:
        if prompt is not None:
            raise click.UsageError("give PROMPT or --messages, not both")
        return _read_messages(messages_file)
    if prompt == "-":
        prompt = sys.stdin.read()
    if prompt is None or not prompt.strip():
        raise click.BadParameter("the prompt is empty", param_hint="PROMPT")
    return [Message("user", prompt)]


def _read_messages(handle: IO[str]) -> list[Message]:
    """A conversation from JSON: [{"role": "user", "content": "..."}, ...]; a clear error else."""
    where = getattr(handle, "name", "--messages")
    try:
        raw = json.load(handle)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(
            f"{where}: not JSON ({exc.msg})", param_hint="--messages"
        ) from None
    roles = ("system", "user", "assistant")
    if not isinstance(raw, list) or not all(
        isinstance(m, dict) and m.get("role") in roles and isinstance(m.get("content"), str)
        for m in raw
    ):
        raise click.BadParameter(
            f'{where}: expected a list of {{"role": system|user|assistant, "content": text}}',
            param_hint="--messages",
        )
    if not any(m["role"] == "user" and m["content"].strip() for m in raw):
        raise click.BadParameter(f"{where}: no user message", param_hint="--messages")
    return [Message(m["role"], m["content"]) for m in raw]


def _print_decision(decision: RouteDecision) -> None:
    click.echo(
        f"{decision.category} → {decision.expert}  (confidence {decision.confidence:.2f}, "
        f"{decision.latency_s * 1e3:.1f} ms)"
    )
    click.echo(f"  {decision.reason}")
    if decision.strategy != "none":
        where = f", region {decision.region}" if decision.region is not None else ""
        click.echo(f"  strategy: {decision.strategy}{where}")
        if decision.identity:
            click.echo(f"  identity ({decision.identity_source}): {decision.identity}")
    for category, p in decision.alternatives:
        click.echo(f"  runner-up: {category} {p:.2f}")
