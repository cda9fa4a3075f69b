"""The CLI as a user runs it: `coe ask --json`, `coe chat` from a pipe and on a terminal (pty)."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pexpect
import pytest

from coe.paths import models_dir

from .conftest import COE, cancel_one_answer, cli_env, default_sigint

pytestmark = pytest.mark.engine


@pytest.fixture
def home(tmp_path: Path, model_dir: Path) -> Path:
    """A private COE_HOME (chat history lands here) that sees the prepared models."""
    (tmp_path / "models").symlink_to(models_dir(), target_is_directory=True)
    return tmp_path


def test_ask_json(test_pool_file: Path, home: Path) -> None:
    env = cli_env(COE_HOME=str(home))
    env.pop("COE_LOG_DB")  # the log in its default place: under COE_HOME
    run = subprocess.run(
        [COE, "--config", str(test_pool_file), "ask", "--json", "--temperature", "0",
         "--show-prompt", "Name the largest planet in the solar system."],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)  # stdout holds the JSON object and nothing else
    assert set(out) >= {"expert", "category", "text", "usage", "latency_s"}
    assert out["expert"] == "qa" and out["category"] == "general"
    assert "Jupiter" in out["text"]
    assert out["usage"]["completion_tokens"] > 0 and out["usage"]["prompt_tokens"] > 0
    assert out["latency_s"] > 0
    # --show-prompt: the exact text the expert read, in its format, on stderr.
    assert "--- prompt for qa ---\n<bos>Question: Name the largest planet" in run.stderr
    # The request log holds the answer, once (--show-prompt generates nothing).
    logs = subprocess.run(
        [COE, "--config", str(test_pool_file), "logs", "--json"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert logs.returncode == 0, logs.stderr
    (row,) = json.loads(logs.stdout)
    assert (row["front_end"], row["model"], row["expert"], row["category"]) == (
        "cli", "auto", "qa", "general"
    )  # fmt: skip
    assert row["prompt"] == "Name the largest planet in the solar system."
    assert row["completion_tokens"] == out["usage"]["completion_tokens"]
    assert row["error"] is None and 0 < row["ttft_s"] <= row["latency_s"]
    assert (home / "logs" / "requests.sqlite").is_file()


def test_ask_unknown_expert_is_a_usage_error(test_pool_file: Path) -> None:
    run = subprocess.run(
        [COE, "--config", str(test_pool_file), "ask", "--expert", "nobody", "hi"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2
    assert "unknown expert 'nobody'; defined: qa, chatty" in run.stderr


def test_piped_chat_answers_each_line(test_pool_file: Path, home: Path) -> None:
    lines = "Name the largest planet in the solar system.\n\nWhat is the capital of France?\n"
    run = subprocess.run(
        [COE, "--config", str(test_pool_file), "chat", "--temperature", "0"],
        input=lines, capture_output=True, text=True, timeout=600,
        env=cli_env(COE_HOME=str(home)),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    answers = [a for a in run.stdout.splitlines() if a.strip()]
    assert len(answers) == 2, run.stdout
    assert "Jupiter" in answers[0] and "Paris" in answers[1]
    assert run.stderr.count("[→ qa · general]") == 2


def test_interactive_chat_on_a_terminal(test_pool_file: Path, home: Path) -> None:
    child = pexpect.spawn(
        COE,
        ["--config", str(test_pool_file), "chat", "--temperature", "0", "--max-tokens", "300"],
        env=cli_env(COE_HOME=str(home), TERM="dumb"),
        encoding="utf-8",
        timeout=600,
        dimensions=(40, 200),
        preexec_fn=default_sigint,
    )
    screen = io.StringIO()
    child.logfile_read = screen
    try:
        child.expect_exact("you> ")
        # A quiet terminal: the engines' own output went to their log file (coe.cli.quiet).
        assert "safetensors" not in screen.getvalue() and "WARNING" not in screen.getvalue()
        assert "Loading safetensors" in next((home / "run").glob("*/engine.log")).read_text()
        child.sendline("Name the largest planet in the solar system.")
        child.expect_exact("[→ qa · general]")
        child.expect("Jupiter")
        child.expect_exact("you> ", timeout=120)

        # Ctrl-C at the prompt clears the line; the session goes on.
        child.sendintr()
        child.expect_exact("you> ", timeout=30)

        # Ctrl-C while an answer streams cancels that answer only.
        child.sendline("/expert chatty")
        child.expect_exact("[every prompt now goes to chatty]")
        child.expect_exact("you> ")
        cancel_one_answer(child, "[→ chatty]")

        # The engine survived: a multi-line prompt (trailing backslash) is answered.
        child.sendline("/auto")
        child.expect_exact("you> ")
        child.sendline("What is the capital \\")
        child.expect_exact("...> ")
        child.sendline("of France?")
        child.expect_exact("[→ qa · general]", timeout=120)
        child.expect("Paris", timeout=120)
        child.expect_exact("you> ", timeout=120)

        child.sendline("/exit")
        child.expect(pexpect.EOF, timeout=120)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    # Ctrl-C reached coe only: the engine (in a process group of its own) never went down.
    assert "restarted" not in screen.getvalue()
    assert (home / "chat_history").read_text().count("France") == 1


def test_bench_engine_json(test_pool_file: Path, home: Path) -> None:
    run = subprocess.run(
        [COE, "--config", str(test_pool_file), "bench", "engine", "--json",
         "--tokens", "8", "--batch", "2"],
        capture_output=True, text=True, timeout=600, env=cli_env(COE_HOME=str(home)),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    figures = json.loads(run.stdout)
    assert figures["expert"] == "qa" and figures["tokens_per_request"] == 8
    for key in ("engine_start_s", "single_stream_tok_s", "batched_tok_s",
                "reference_load_s", "reference_single_stream_tok_s"):  # fmt: skip
        assert figures[key] > 0, key
