"""The request log a process records into: the writer of the configured file (experts.yaml
``log:``), and who this process is (its front end, its pool), which every record carries."""

from __future__ import annotations

from pathlib import Path

from coe.config import PoolConfig
from coe.requestlog.record import FrontEnd, RequestRecord
from coe.requestlog.writer import LogWriter


class RequestLog:
    """Records requests, or (``writer`` None: the log is off) drops them unseen."""

    def __init__(
        self, writer: LogWriter | None, *, front_end: FrontEnd = "cli", pool: str | None = None
    ):
        self.writer = writer
        self.front_end: FrontEnd = front_end
        self.pool = pool

    @classmethod
    def open(cls, config: PoolConfig, front_end: FrontEnd) -> RequestLog:
        """The log experts.yaml asks for (``log.enabled``, ``log.path``, ``log.prompts``)."""
        pool = str(config.source) if config.source is not None else None
        if not config.log.enabled:
            return cls(None, front_end=front_end, pool=pool)
        writer = LogWriter(config.request_log_path, prompts=config.log.prompts)
        return cls(writer, front_end=front_end, pool=pool)

    @classmethod
    def off(cls, front_end: FrontEnd = "cli") -> RequestLog:
        return cls(None, front_end=front_end)

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    @property
    def path(self) -> Path | None:
        return self.writer.path if self.writer is not None else None

    def record(self, record: RequestRecord) -> None:
        """Queue one finished request's record; never blocks, never raises for the disk."""
        if self.writer is not None:
            if record.pool is None:
                record.pool = self.pool
            self.writer.put(record)

    def flush(self, timeout_s: float = 5.0) -> bool:
        return self.writer.flush(timeout_s) if self.writer is not None else True

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
