"""What every `coe` command shares: the command-line context, the one mapping from errors to exit
statuses, opening and closing the expert pool, and small option and output helpers.

Errors end a command in one place, `exit_on_error`, which the `coe` group wraps around every
command: a `CoeError` prints one line, ``error: MESSAGE``, on stderr and exits with its
``exit_code`` (1 for a failure while working, 2 for bad input or a broken configuration, as
click does for usage errors); Ctrl-C exits with 130, as a shell reports SIGINT.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, TypeVar

import click

from coe.config import PREPARED_PREFIX, PoolConfig, load_config
from coe.errors import BadRequestError, CoeError
from coe.redact import redact_text

if TYPE_CHECKING:
    from rich.status import Status

    from coe.orchestrator import Orchestrator
    from coe.requestlog import FrontEnd
    from coe.router.router import TwoStageRouter
    from coe.runtime import BackgroundLoop

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

F = TypeVar("F", bound=Callable[..., Any])


# -- errors and exit statuses ----------------------------------------------------------------


class CommandError(CoeError):
    """A command's own reason to stop, with the exit status it chose."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.exit_code = exit_code


def fail(message: str, status: int = EXIT_BAD_INPUT) -> NoReturn:
    """Stop the command: ``error: MESSAGE`` on stderr, exit STATUS."""
    raise CommandError(message, status)


@contextlib.contextmanager
def exit_on_error() -> Iterator[None]:
    """The one mapping from errors to exit statuses (see the module's docstring). Click's own
    usage errors pass through: click prints them with the usage line and exits 2."""
    try:
        yield
    except CoeError as exc:
        # An error may quote a store URL or a server's reply: no password reaches the terminal.
        click.echo(f"error: {redact_text(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


@contextlib.contextmanager
def plain_errors_are_bad_input(*kinds: type[Exception]) -> Iterator[None]:
    """Treat these builtin errors as bad input (exit 2): some lower layers still raise a plain
    ValueError for input they refuse. A CoeError keeps its own exit status."""
    try:
        yield
    except CoeError:
        raise
    except kinds as exc:
        raise BadRequestError(str(exc)) from exc


class CoeGroup(click.Group):
    """The `coe` group: runs every subcommand inside `exit_on_error`."""

    def invoke(self, ctx: click.Context) -> Any:
        with exit_on_error():
            return super().invoke(ctx)


# -- the command-line context ----------------------------------------------------------------


class CliContext:
    """What the `coe` group's options give every command: the experts.yaml to use, read on
    first use (so `--help` and commands that need no pool never parse it)."""

    def __init__(self, config_path: Path | None, verbose: int = 0):
        self.config_path = config_path
        self.verbose = verbose
        self._config: PoolConfig | None = None

    @property
    def config_file(self) -> Path:
        """The experts.yaml this command uses (found as load_config finds it), not parsed."""
        from coe.config import default_config_path

        return (self.config_path or default_config_path()).expanduser().resolve()

    @property
    def config(self) -> PoolConfig:
        # A broken file raises ConfigError (exit 2 through exit_on_error).
        if self._config is None:
            from coe.prompts.registry import check_strategy_names

            config = load_config(self.config_path)
            check_strategy_names(config)  # the strategy names live above coe.config
            self._config = config
        return self._config


pass_cli = click.make_pass_decorator(CliContext)


# -- options and output ----------------------------------------------------------------------


def sampling_options(command: F) -> F:
    """--max-tokens and --temperature, for the commands that generate."""
    command = click.option("--max-tokens", type=click.IntRange(min=1), help="Cap on new tokens.")(
        command
    )
    return click.option(
        "--temperature", type=click.FloatRange(0, 2), help="Override the expert's temperature."
    )(command)


@contextlib.contextmanager
def status(message: str, terminal: TextIO | None = None) -> Iterator[Status | None]:
    """A spinner on a terminal (``terminal``: the stream to draw it on, default stderr); a plain
    line on stderr otherwise."""
    stream = terminal or sys.stderr
    if stream.isatty():
        from rich.console import Console

        with Console(file=stream).status(message) as spinner:
            yield spinner
    else:
        click.echo(message, err=True)
        yield None


# -- the pool --------------------------------------------------------------------------------


def check_expert(config: PoolConfig, expert: str | None) -> None:
    """Refuse an --expert the pool does not define."""
    if expert is not None and expert not in config.expert_names:
        raise click.BadParameter(
            f"unknown expert {expert!r}; defined: {', '.join(config.expert_names)}",
            param_hint="--expert",
        )


def experts_to_start(config: PoolConfig, expert: str | None) -> list[str]:
    """The expert asked for, else every expert the router can send a request to; and the
    identity writer when identities are generated."""
    if expert is not None:
        chosen = [expert]
    elif config.router.path is None:
        chosen = [config.fallback_expert]
    else:
        chosen = [c.expert for c in config.categories]
    settings = config.strategies.expert_prompting
    if settings.mode == "generated" and any(
        c.strategy == "expert_prompting" for c in config.categories
    ):
        chosen.append(config.identity_writer)
    return list(dict.fromkeys(chosen))


def needed_models(config: PoolConfig, experts: list[str]) -> list[str]:
    """The models coe builds locally (coe:NAME) that these experts run."""
    refs = [config.expert(e).model for e in experts]
    for name in experts:
        # A LoRA expert runs on its base: an expert of the pool, or a model reference.
        base = getattr(config.expert(name), "base", None)
        if base is not None:
            refs.append(config.expert(base).model if base in config.expert_names else base)
    return list(dict.fromkeys(r for r in refs if r and r.startswith(PREPARED_PREFIX)))


def load_router(
    config: PoolConfig, router_path: Path | None = None, backend: str | None = None
) -> TwoStageRouter:
    """The configured router (or the one in ROUTER_PATH). A broken one raises a
    ConfigurationError (RouterArtifactError, EmbedderError): exit 2 with its message."""
    from coe.router.router import TwoStageRouter

    if sys.stderr.isatty():
        click.echo("loading the router (the first run builds its ONNX embedder)", err=True)
    return TwoStageRouter.from_config(config, router_path, backend)


@dataclass(frozen=True)
class OpenPool:
    """A started pool: the orchestrator and the event loop its engines run on."""

    runner: BackgroundLoop
    orchestrator: Orchestrator


@contextlib.contextmanager
def open_pool(
    config: PoolConfig,
    experts: list[str],
    store_url: str | None = None,
    front_end: FrontEnd = "cli",
    engine_log: Path | None = None,
) -> Iterator[OpenPool]:
    """Prepare the models these experts need, load the router, start their engines; shut the
    engines and the loop down on leaving, whatever happened. ``store_url``: the gateway's
    Redis, for sessions and generated identities (default: in-process). Requests are recorded
    in the request log (experts.yaml ``log:``) under ``front_end``. ``engine_log``: the
    engines' own output goes there instead of the terminal (coe.cli.quiet), and one spinner
    shows the phase."""
    from coe.runtime import BackgroundLoop

    runner = BackgroundLoop()
    orchestrator: Orchestrator | None = None
    hang_up = _exit_on_hang_up()
    try:
        try:
            with contextlib.ExitStack() as quiet:
                terminal = None
                if engine_log is not None:
                    from coe.cli.quiet import output_to_log

                    terminal = quiet.enter_context(output_to_log(engine_log))
                with status("preparing models", terminal) as spinner:
                    say = spinner.update if spinner else (lambda m: click.echo(m, err=True))
                    orchestrator = _start_pool(config, experts, store_url, runner, say, front_end)
        except CoeError:
            if engine_log is not None:
                click.echo(f"the engines' output is in {engine_log}", err=True)
            raise
        yield OpenPool(runner, orchestrator)
    finally:
        # Shutting down must not hide why the command ended.
        if orchestrator is not None:
            with contextlib.suppress(Exception):
                runner.run(orchestrator.close())
        runner.close()
        hang_up.close()


def _hung_up(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)


def _exit_on_hang_up() -> contextlib.ExitStack:
    """Exit cleanly (engines shut down) when the terminal goes away. The engines run in a
    process group of their own (so that Ctrl-C spares them), which also spares them the
    terminal's SIGHUP: this process must stop them. Returns what restores the old handler;
    `coe serve` installs its own (reload) once serving."""
    import signal
    import threading

    stack = contextlib.ExitStack()
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGHUP, _hung_up)
        stack.callback(signal.signal, signal.SIGHUP, previous)
    return stack


def _start_pool(
    config: PoolConfig,
    experts: list[str],
    store_url: str | None,
    runner: BackgroundLoop,
    say: Callable[[str], object],
    front_end: FrontEnd,
) -> Orchestrator:
    from coe.models import ensure_models
    from coe.orchestrator import Orchestrator
    from coe.requestlog import RequestLog
    from coe.router.router import TwoStageRouter

    ensure_models(needed_models(config, experts), report=say)
    router = None
    if config.router.path is not None:
        say("loading the router (the first run builds its ONNX embedder)")
        router = TwoStageRouter.from_config(config)
    store = None
    if store_url is not None:
        from coe.gateway.server import open_store_on_loop

        store = runner.run(open_store_on_loop(store_url))
    requests = RequestLog.open(config, front_end)
    orchestrator = Orchestrator(config, router=router, store=store, requests=requests)
    say("starting the expert engine (about a minute on a CPU)")
    try:
        runner.run(orchestrator.start(experts))
    except BaseException:
        with contextlib.suppress(Exception):
            runner.run(orchestrator.close())
        raise
    return orchestrator
