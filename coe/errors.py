"""One error hierarchy for every layer, so each front end maps errors to its answer in one place.

Three kinds, by whose move it is:

- ``BadRequestError``: the request or the command's input is wrong; the caller fixes it
  (HTTP 400, exit status 2).
- ``UnavailableError``: a part that should work does not right now (an engine died, a server
  refused to start); the same request may succeed later (HTTP 503, exit status 1).
- ``ConfigurationError``: the operator's files (experts.yaml, a router or prompt folder) are
  wrong; no request can fix it, and it must not pass for an outage (HTTP 500, exit status 2).

Each concrete error lives beside the code that raises it and derives from one of these (and,
where callers relied on it before, from the builtin it used to be).
"""

from __future__ import annotations


class CoeError(Exception):
    """Anything coe raises on purpose. ``exit_code`` is the CLI's exit status for it and
    ``http_status`` the gateway's answer."""

    exit_code: int = 1
    http_status: int = 500


class BadRequestError(CoeError, ValueError):
    exit_code = 2
    http_status = 400
    # The request field at fault, when one is (the gateway's error names it).
    param: str | None = None

    def __init__(self, *args: object, param: str | None = None):
        super().__init__(*args)
        if param is not None:
            self.param = param


class UnavailableError(CoeError, RuntimeError):
    exit_code = 1
    http_status = 503


class ConfigurationError(CoeError):
    exit_code = 2
    http_status = 500
