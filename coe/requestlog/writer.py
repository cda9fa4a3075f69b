"""The request log's writer: records are queued by the request that ends and written to SQLite in
batches by a thread of the writer's own, so a request never waits on the disk.

- ``put`` never blocks: it appends to a bounded queue, or counts the record as dropped when the
  queue is full (the disk or a lock holds the thread up for long).
- A log that cannot be written (a read-only folder, a full disk, a file locked by another
  program, a file of another schema) never fails a request either: the writer warns once, counts
  the records it drops, and tries again with the next batch.
- SQLite in WAL mode: `coe logs` reads while a pool writes, and pools share one file.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coe.requestlog.record import (
    CREATE_INDEXES,
    CREATE_TABLE,
    INSERT,
    SCHEMA_VERSION,
    PromptPolicy,
    RequestRecord,
)

log = logging.getLogger(__name__)

MAX_QUEUE = 10_000
BATCH_SIZE = 512
FLUSH_INTERVAL_S = 0.25
# How long a batch waits on another writer's lock before it is dropped: short, since the
# queue grows meanwhile (a pool beside us holds the lock for milliseconds).
BUSY_TIMEOUT_S = 1.0


class SchemaMismatchError(sqlite3.DatabaseError):
    """The file holds another version of the request table."""


def connect(path: Path, busy_timeout_s: float = BUSY_TIMEOUT_S) -> sqlite3.Connection:
    """The log's database, created (folder, table, indexes) if need be, in WAL mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=busy_timeout_s, check_same_thread=False)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise SchemaMismatchError(
                f"{path} holds request-log schema {version}; this coe writes {SCHEMA_VERSION} "
                "(move the file aside, or set log.path in experts.yaml)"
            )
        if version == 0:
            conn.execute("PRAGMA journal_mode=WAL")
            with conn:
                conn.execute(CREATE_TABLE)
                for statement in CREATE_INDEXES:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        # One fsync per checkpoint, not per batch: a crash may lose the last batches, never
        # corrupt the file.
        conn.execute("PRAGMA synchronous=NORMAL")
    except BaseException:
        conn.close()
        raise
    return conn


def prompt_fields(record: RequestRecord, policy: PromptPolicy) -> RequestRecord:
    """The record with its prompt kept, hashed or removed, as experts.yaml's log.prompts says."""
    text = record.prompt
    if text is None:
        return record
    record.prompt_sha256 = None if policy == "none" else hashlib.sha256(text.encode()).hexdigest()
    if policy != "keep":
        record.prompt = None
    return record


class LogWriter:
    """A background thread that writes queued records to one SQLite file."""

    def __init__(
        self,
        path: Path,
        *,
        prompts: PromptPolicy = "keep",
        max_queue: int = MAX_QUEUE,
        batch_size: int = BATCH_SIZE,
        flush_interval_s: float = FLUSH_INTERVAL_S,
        busy_timeout_s: float = BUSY_TIMEOUT_S,
        connect_to: Callable[[Path, float], sqlite3.Connection] = connect,
    ):
        self.path = path
        self.prompts = prompts
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.busy_timeout_s = busy_timeout_s
        self._connect_to = connect_to
        self._queue: collections.deque[RequestRecord] = collections.deque()
        self._conn: sqlite3.Connection | None = None
        self.written = 0
        # Two counters: each is only added to by one thread (the requests', the writer's).
        self._refused = 0  # the queue was full, or the writer closed
        self._failed = 0  # in batches that could not be written
        self.problem: str | None = None  # why the last batch was dropped; None once one is written
        self._warned = False
        self._stopping = False
        self._wake = threading.Event()
        # Rounds of draining begun and finished: flush() waits for one that began after it.
        self._cond = threading.Condition()
        self._started = 0
        self._finished = 0
        self._thread = threading.Thread(target=self._run, name="coe-request-log", daemon=True)
        self._thread.start()

    # -- the request's side: never blocks ----------------------------------------------------
    def put(self, record: RequestRecord) -> None:
        if self._stopping or len(self._queue) >= self.max_queue:
            self._refused += 1
            return
        self._queue.append(record)  # deque.append is atomic; the thread pops from the left

    @property
    def dropped(self) -> int:
        """Records never written: refused by a full queue, or in a batch that failed."""
        return self._refused + self._failed

    @property
    def pending(self) -> int:
        return len(self._queue)

    # -- control -----------------------------------------------------------------------------
    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until what was queued before this call is written (or dropped); False on
        timeout."""
        with self._cond:
            target = self._started + 1
            self._wake.set()
            return self._cond.wait_for(lambda: self._finished >= target, timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued, then stop the thread. Records put after this are dropped."""
        if self._stopping:
            return
        self.flush(timeout_s)
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)

    # -- the thread --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                self._wake.wait(self.flush_interval_s)
                self._wake.clear()
                with self._cond:
                    self._started += 1
                self._drain()
                with self._cond:
                    self._finished += 1
                    self._cond.notify_all()
            self._drain()
        finally:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _drain(self) -> None:
        while self._queue:
            batch: list[Any] = []
            while self._queue and len(batch) < self.batch_size:
                batch.append(prompt_fields(self._queue.popleft(), self.prompts).row())
            self._write(batch)

    def _write(self, rows: list[Any]) -> None:
        try:
            if self._conn is None:
                self._conn = self._connect_to(self.path, self.busy_timeout_s)
            with self._conn:
                self._conn.executemany(INSERT, rows)
        except Exception as exc:  # whatever it is, the requests go on; say it once
            self._failed += len(rows)
            self.problem = f"{type(exc).__name__}: {exc}"
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if not self._warned:
                self._warned = True
                log.warning(
                    "cannot write the request log %s (%s); requests are served as usual and "
                    "their records dropped until it can be written",
                    self.path,
                    self.problem,
                )
            return
        self.written += len(rows)
        if self.problem is not None:
            log.info("the request log %s is written again", self.path)
            self.problem = None
