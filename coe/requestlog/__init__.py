"""The request log: one SQLite row per request through the orchestrator (any front end), written
off the request's path by a background thread; `coe logs` lists it and sums it up.

- record.py: the row (RequestRecord) and its table;
- writer.py: the batching writer thread (never blocks, never fails a request);
- log.py: RequestLog, what a process records into (experts.yaml ``log:``);
- query.py: reading rows back with filters, and the statistics of `coe logs stats`.
"""

from coe.requestlog.log import RequestLog
from coe.requestlog.record import COLUMNS, FrontEnd, PromptPolicy, RequestRecord
from coe.requestlog.writer import LogWriter

__all__ = ["COLUMNS", "FrontEnd", "LogWriter", "PromptPolicy", "RequestLog", "RequestRecord"]
