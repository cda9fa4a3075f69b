"""Every failure leaves the gateway in OpenAI's error shape with the status a client expects:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from coe.engines.base import DeadlineError, EngineError
from coe.engines.vllm_local import PromptTooLongError
from coe.errors import BadRequestError, CoeError, ConfigurationError, UnavailableError
from coe.gateway.schema import ErrorBody, ErrorResponse
from coe.orchestrator import UnknownModelError
from coe.prompts.mixture import MixtureError
from coe.redact import redact_text

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(message=message, type=type, param=param, code=code)
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(
            ErrorResponse(error=self.body).model_dump(), self.status, headers=self.headers
        )


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str, known: list[str]) -> APIError:
    return APIError(
        404,
        f"The model {model!r} does not exist. Available: {', '.join(known)}",
        param="model",
        code="model_not_found",
    )


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def forbidden(message: str) -> APIError:
    return APIError(403, message, type="permission_error", code="forbidden")


def pool_change_refused(exc: CoeError) -> APIError:
    """An /admin change of the pool that did not happen: the new file or adapter is wrong
    (400, with the start-time error), or the new pool did not start (503)."""
    if isinstance(exc, UnavailableError):
        return APIError(503, str(exc), type="server_error", code="reload_failed")
    return invalid(str(exc), code="invalid_config")


def rate_limited(limit: str | None, retry_after_s: float) -> APIError:
    seconds = max(1, int(retry_after_s + 0.999))
    return APIError(
        429,
        f"Rate limit reached for {limit or 'requests'} per minute; retry in {seconds} s",
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(seconds)},
    )


def store_unavailable(retry_after_s: float) -> APIError:
    """Rate limits fail closed while the store is away (gateway.limits.on_store_error)."""
    seconds = max(1, int(retry_after_s + 0.999))
    return APIError(
        503,
        f"Rate limits cannot be checked while the gateway's store is unreachable; retry in "
        f"{seconds} s",
        type="service_unavailable_error",
        code="store_unavailable",
        headers={"Retry-After": str(seconds)},
    )


def store_misconfigured() -> APIError:
    """The store refuses the gateway (the details are in /health and the server's log)."""
    return APIError(
        503,
        "The gateway's store is misconfigured; requests that need it fail until an operator "
        "fixes it",
        type="service_unavailable_error",
        code="store_misconfigured",
    )


def too_large(limit: int) -> APIError:
    return APIError(
        413, f"The request body exceeds {limit} bytes", code="request_too_large", param=None
    )


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="service_unavailable_error", code="expert_unavailable")


def deadline_missed(exc: DeadlineError) -> APIError:
    """504 for an expert too slow to start or finish its answer; 503 when no slot of the
    weight cache could take the request in time (the request never ran). The code says which
    deadline: first_token_deadline_exceeded, total_deadline_exceeded, queue_deadline_exceeded."""
    code = f"{exc.deadline}_deadline_exceeded"
    if exc.deadline == "queue":
        message = (
            f"no engine could take the request for expert {exc.expert} within "
            f"{exc.seconds:g} s; retry shortly"
        )
        return APIError(503, message, type="service_unavailable_error", code=code)
    what = "start its answer" if exc.deadline == "first_token" else "finish its answer"
    message = f"expert {exc.expert} did not {what} within {exc.seconds:g} s"
    return APIError(504, message, type="timeout_error", code=code)


def from_exception(exc: BaseException, expert: str) -> APIError:
    """What the client is told when serving a request for ``expert`` failed."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, UnknownModelError):
        return model_not_found(exc.model, exc.known)
    if isinstance(exc, MixtureError):  # the server's own files: not the client's doing
        log.error("prompt regions for expert %s could not be used: %s", expert, _quiet(exc))
        return APIError(
            500, "the category's prompt strategy could not be loaded", type="server_error"
        )
    if isinstance(exc, ConfigurationError):  # the operator's files again: 500, not an outage
        log.error(
            "the pool's configuration failed a request for expert %s: %s", expert, _quiet(exc)
        )
        return APIError(500, "the server's configuration is broken", type="server_error")
    if isinstance(exc, PromptTooLongError):
        return invalid(str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, DeadlineError):  # before UnavailableError: it says which deadline
        log.warning("expert %s missed a deadline: %s", exc.expert, exc)
        return deadline_missed(exc)
    if isinstance(exc, EngineError) and exc.invalid_request:
        # A remote expert's server refused this request (a 4xx).
        return invalid(f"expert {expert} refused the request: {exc.reason}")
    if isinstance(exc, UnavailableError):
        # The details (engine names, internal addresses) go to the log, not to the client.
        log.warning("expert %s failed a request: %s", expert, _quiet(exc))
        if getattr(exc, "retryable", False):
            return unavailable(f"expert {expert} is restarting; retry the request shortly")
        return unavailable(f"expert {expert} could not serve the request")
    if isinstance(exc, (BadRequestError, ValueError)):
        return invalid(str(exc), param=getattr(exc, "param", None))
    log.error("unexpected error from expert %s", expert, exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}", type="server_error")


def _quiet(exc: BaseException) -> str:
    """An error's text for the log, without passwords in URLs or bearer tokens."""
    return redact_text(str(exc))


@contextlib.contextmanager
def served_by(expert: str) -> Iterator[None]:
    """Raise what fails while ``expert`` serves a request as the APIError the client gets."""
    try:
        yield
    except (CoeError, ValueError) as exc:
        raise from_exception(exc, expert) from exc


def _param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or None


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422; OpenAI clients expect 400 for a request they got wrong.
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = _param(tuple(first.get("loc", ())))
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, param = "The request body is not valid JSON", None
        return invalid(f"{param}: {message}" if param else message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
            exc.status_code
        )
        return APIError(
            exc.status_code, str(exc.detail), type=kind, code=code, headers=exc.headers
        ).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return APIError(
            500, f"internal error: {type(exc).__name__}", type="server_error"
        ).response()
