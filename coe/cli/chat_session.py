"""The chat session behind `coe chat` (and `coe ask`'s streamed answer): an interactive,
multi-turn chat with the pool.

On a terminal: streamed answers, the answering expert shown first, readline editing and history,
multi-line input, slash commands, Ctrl-C cancels the current answer only. With stdin from a pipe
or file: each input line is one single-turn prompt; the answers go to stdout, one per line.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from coe.cli.answerer import Answerer
from coe.cli.runtime import EXIT_FAILED
from coe.errors import CoeError
from coe.paths import coe_home
from coe.types import Message, RouteDecision

HELP = """Commands:
  /expert NAME   send every prompt to expert NAME (skips routing)
  /auto          route each prompt again (the default)
  /system TEXT   use TEXT as the system prompt (empty TEXT: back to each expert's own)
  /clear         forget the conversation
  /experts       list the experts
  /exit          leave (Ctrl-D too)
Multi-line input: end a line with \\ to continue it, or wrap a block in triple quotes (\"\"\").
Ctrl-C while an answer streams stops that answer only."""


@dataclass
class ChatState:
    expert: str | None = None
    system: str | None = None
    history: list[Message] = field(default_factory=list)


def format_decision(d: RouteDecision) -> str:
    parts = [d.expert]
    if d.category:
        # Only a router's fallback is news; a pool without a router always uses the fallback.
        routed = d.confidence is not None
        parts.append(d.category + (" (fallback)" if d.fell_back and routed else ""))
    if d.confidence is not None:
        parts.append(f"{d.confidence:.2f}")
    return "[→ " + " · ".join(parts) + "]"


class ChatSession:
    """A chat with a pool: in this process or a running one (coe.cli.answerer)."""

    def __init__(
        self,
        answerer: Answerer,
        out: IO[str] = sys.stdout,
        err: IO[str] = sys.stderr,
        sampling: dict[str, Any] | None = None,
    ):
        self.answerer = answerer
        self.out = out
        self.err = err
        self.sampling = sampling or {}
        self.state = ChatState()

    # -- one turn ----------------------------------------------------------------------------
    def answer(self, text: str, *, keep_history: bool, header_to: IO[str]) -> str | None:
        """Stream one answer. Returns the text, or None if cancelled or failed."""
        messages = (
            [*self.state.history, Message("user", text)]
            if keep_history
            else [Message("user", text)]
        )
        pieces: list[str] = []
        stream = self.answerer.stream(
            messages, expert=self.state.expert, system=self.state.system, sampling=self.sampling
        )
        try:
            for item in stream:
                if isinstance(item, RouteDecision):
                    print(format_decision(item), file=header_to, flush=True)
                elif item:
                    pieces.append(item)
                    self.out.write(item)
                    self.out.flush()
        except KeyboardInterrupt:
            self.out.write("\n")
            print("[answer cancelled]", file=self.err, flush=True)
            return None
        except (CoeError, ValueError) as exc:
            # One failed answer ends neither the chat nor a piped run (it sets the exit status);
            # ValueError: what the lower layers still raise for a request they refuse.
            self.out.write("\n")
            print(f"error: {exc}", file=self.err, flush=True)
            return None
        finally:
            stream.close()  # stops the generation when the answer was cut short
        self.out.write("\n")
        self.out.flush()
        answer = "".join(pieces).strip()
        if keep_history:
            self.state.history += [Message("user", text), Message("assistant", answer)]
        return answer

    # -- slash commands ----------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Handle a /command. Returns False when the session should end."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        say: Callable[[str], None] = lambda msg: print(msg, file=self.err, flush=True)  # noqa: E731
        if name in ("exit", "quit"):
            return False
        if name == "help":
            say(HELP)
        elif name == "expert":
            names = self.answerer.expert_names()
            if arg not in names:
                say(f"unknown expert {arg!r}; experts: {', '.join(names)}")
            else:
                self.state.expert = arg
                say(f"[every prompt now goes to {arg}]")
        elif name == "auto":
            self.state.expert = None
            say("[routing each prompt]")
        elif name == "system":
            self.state.system = arg or None
            say("[system prompt set]" if arg else "[system prompt: each expert's own]")
        elif name == "clear":
            self.state.history.clear()
            say("[conversation cleared]")
        elif name == "experts":
            say(", ".join(self.answerer.expert_names()))
        else:
            say(f"unknown command /{name}; /help lists them")
        return True

    # -- loops -------------------------------------------------------------------------------
    def run_piped(self, stdin: IO[str]) -> int:
        """Non-interactive: one prompt per input line, answers on stdout, routing on stderr."""
        failures = 0
        for raw in stdin:
            line = raw.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    break
                continue
            if self.answer(line, keep_history=False, header_to=self.err) is None:
                failures += 1
        return EXIT_FAILED if failures else 0

    def run_interactive(self) -> int:
        history_file = coe_home() / "chat_history"
        _setup_readline(history_file)
        print("coe chat: /help for commands, Ctrl-D to leave.", file=self.err, flush=True)
        while True:
            try:
                text = read_prompt()
            except EOFError:
                print(file=self.err)
                return 0
            except KeyboardInterrupt:
                print("^C", file=self.err)  # clears the line being typed, like a shell
                continue
            if text is None or not text.strip():
                continue
            stripped = text.strip()
            if stripped.startswith("/") and "\n" not in stripped:
                if not self.command(stripped):
                    return 0
                continue
            self.answer(stripped, keep_history=True, header_to=self.err)


def read_prompt(first: str = "you> ", more: str = "...> ") -> str | None:
    """One user message: a line; a line ending in \\ continues; \"\"\" opens and closes a block."""
    line = input(first)
    if line.strip().startswith('"""'):
        body = [line.strip()[3:]]
        if body[0].endswith('"""') and len(line.strip()) > 3:
            return body[0][:-3]
        while True:
            nxt = input(more)
            if nxt.rstrip().endswith('"""'):
                body.append(nxt.rstrip()[:-3])
                return "\n".join(body).strip("\n")
            body.append(nxt)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = input(more)
    lines.append(line)
    return "\n".join(lines)


def _setup_readline(history_file: Path) -> None:
    try:
        import readline
    except ImportError:  # not on every platform; chat works without editing keys
        return
    import atexit

    history_file.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        readline.read_history_file(history_file)
    readline.set_history_length(1000)
    atexit.register(_save_history, readline, history_file)


def _save_history(readline_module: object, history_file: Path) -> None:
    with contextlib.suppress(OSError):
        readline_module.write_history_file(history_file)  # type: ignore[attr-defined]
