"""`coe ask`: answer one prompt and exit."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import click

from coe.cli.answerer import Answer, Answerer, LocalAnswerer, open_answerer, pool_options
from coe.cli.runtime import (
    EXIT_FAILED,
    CliContext,
    pass_cli,
    plain_errors_are_bad_input,
    sampling_options,
)
from coe.types import Message

if TYPE_CHECKING:
    from coe.orchestrator import Orchestrator


@click.command()
@click.argument("prompt")
@click.option("--expert", help="Send the prompt to this expert instead of routing it.")
@click.option("--system", help="System prompt (replaces the expert's own).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming.")
@click.option("--no-stream", is_flag=True, help="Print the answer when it is complete.")
@click.option(
    "--show-prompt",
    is_flag=True,
    help="Print the final prompt the expert reads (strategy applied) to stderr first "
    "(starts the pool in this process: only it knows the prompt).",
)
@sampling_options
@pool_options
@pass_cli
def ask(
    cli: CliContext,
    prompt: str,
    expert: str | None,
    system: str | None,
    as_json: bool,
    no_stream: bool,
    show_prompt: bool,
    max_tokens: int | None,
    temperature: float | None,
    url: str | None,
    api_key: str | None,
    local: bool,
) -> None:
    """Answer one PROMPT (use - to read it from stdin) and exit.

    Uses the pool `coe up` runs for this experts.yaml (or --url's) when there is one, else
    starts the pool in this process. With --json prints {"expert", "category", "text",
    "usage", "latency_s"}.
    """
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise click.BadParameter("the prompt is empty", param_hint="PROMPT")
    sampling = {"max_tokens": max_tokens, "temperature": temperature}
    why_local = "--show-prompt" if show_prompt else None
    with (
        open_answerer(
            cli, expert, url=url, api_key=api_key, local=local, why_local=why_local
        ) as answerer,
        plain_errors_are_bad_input(ValueError),
    ):
        if show_prompt and isinstance(answerer, LocalAnswerer):
            pool = answerer.pool
            messages = [{"role": "user", "content": prompt}]
            final = pool.runner.run(_final_prompt(pool.orchestrator, messages, expert, system))
            click.echo(final, err=True)
        if as_json or no_stream:
            _answer_whole(answerer, prompt, expert, system, sampling, as_json)
        else:
            _answer_streamed(answerer, prompt, expert, system, sampling)


def _answer_whole(
    answerer: Answerer,
    prompt: str,
    expert: str | None,
    system: str | None,
    sampling: dict[str, Any],
    as_json: bool,
) -> None:
    from coe.cli.chat_session import format_decision

    result = answerer.complete(
        [Message("user", prompt)], expert=expert, system=system, sampling=sampling
    )
    if as_json:
        click.echo(json.dumps(_ask_json(result), ensure_ascii=False))
    else:
        click.echo(format_decision(result.decision), err=True)
        click.echo(result.text.strip())


def _answer_streamed(
    answerer: Answerer,
    prompt: str,
    expert: str | None,
    system: str | None,
    sampling: dict[str, Any],
) -> None:
    from coe.cli.chat_session import ChatSession

    session = ChatSession(answerer, sampling=sampling)
    session.state.system = system
    session.state.expert = expert
    # The session printed why the answer failed; only the exit status is left to give.
    if session.answer(prompt, keep_history=False, header_to=sys.stderr) is None:
        sys.exit(EXIT_FAILED)


async def _final_prompt(
    orch: Orchestrator, messages: list[dict[str, str]], expert: str | None, system: str | None
) -> str:
    """The exact text the chosen expert reads: its template, strategy and system prompt."""
    from coe.engines.render import render_qa, render_text
    from coe.orchestrator import to_messages

    # The same call a request makes (the identity it writes is cached for the answer itself);
    # its token stream is dropped before it starts, so nothing is generated here.
    decision, prompt, chunks = await orch.stream(
        to_messages(messages), expert=expert, system=system
    )
    await chunks.aclose()  # type: ignore[attr-defined]
    tokenizer = getattr(orch.engines.engine_for(decision.expert), "tokenizer", None)
    if tokenizer is not None:
        text = render_text(tokenizer, prompt)
    elif prompt.format == "qa":
        text = render_qa(prompt.messages)
    else:
        text = json.dumps([m.as_dict() for m in prompt.messages], indent=2, ensure_ascii=False)
    return f"--- prompt for {decision.expert} ---\n{text}\n--- end of prompt ---"


def _ask_json(result: Answer) -> dict[str, Any]:
    return {
        "expert": result.decision.expert,
        "category": result.decision.category,
        "text": result.text,
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
        },
        "latency_s": round(result.latency_s, 4),
        "finish_reason": result.finish_reason,
    }
