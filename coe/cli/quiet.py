"""A quiet terminal while engines start: their output goes to a log file.

vLLM's engine core and workers are child processes that write to the file descriptors they
inherit (1 and 2), below anything Python's logging or sys.stderr can redirect: their log lines
and "Loading safetensors checkpoint shards" bars reach the terminal whatever this process does
afterwards. So, while the pool starts, descriptors 1 and 2 point at the log file (the engine
processes spawned meanwhile keep it for their whole life), and the spinner goes to a copy of
the terminal's stderr. When the pool is up, 1 and 2 point at
the terminal again.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

MAX_LOG_BYTES = 10 * 1024 * 1024


@contextlib.contextmanager
def output_to_log(log_path: Path) -> Iterator[TextIO]:
    """Descriptors 1 and 2 write to ``log_path`` (appended) inside the block; yields a text
    stream on the terminal's stderr for what the user must still see (spinner, errors)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    with contextlib.suppress(OSError):
        if log_path.stat().st_size > MAX_LOG_BYTES:
            flags |= os.O_TRUNC  # one log per pool, kept from growing without end
    log_fd = os.open(log_path, flags, 0o644)
    terminal = os.fdopen(os.dup(saved_err), "w", buffering=1, encoding="utf-8", errors="replace")
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        yield terminal
    finally:
        # sys.stdout and sys.stderr are left as they are (loggers hold them): what this process
        # writes meanwhile lands in the log too; an error that ends the command is printed
        # after this block, on the terminal.
        with contextlib.suppress(ValueError, OSError):
            terminal.flush()
            sys.stdout.flush()
            sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (saved_out, saved_err, log_fd):
            os.close(fd)
        terminal.close()
