"""Typed gateway errors and their mapping onto the OpenAI error shape.

Every error response has the body ``{"error": {"message", "type", "param", "code"}}``, the
shape the ``openai`` SDK parses into ``BadRequestError``, ``NotFoundError``, ``RateLimitError``
and friends. Routes raise :class:`APIError` subclasses; the handlers installed by
:func:`install_error_handlers` turn them (and FastAPI's own validation and routing errors)
into responses. Unexpected exceptions become a 500 that says nothing about internals.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error the client caused or should know about; subclasses fix status and type."""

    status_code: int = 400
    error_type: str = "invalid_request_error"
    default_code: str | None = None

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        message, param = _printable(message), _printable(param)
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)


class InvalidRequest(APIError):
    """400: a parameter is missing, malformed, or not allowed for the chosen model."""

    default_code = "invalid_value"


class NotFound(APIError):
    """404: no such object for this caller (other tenants' objects are 'not found' too)."""

    status_code = 404
    default_code = "not_found"


class VideoNotReady(APIError):
    """404, as OpenAI answers ``GET /videos/{id}/content`` while a video is queued or rendering.

    404 rather than 409 also keeps the SDK from retrying: it retries 409 by default.
    """

    status_code = 404
    default_code = "video_not_ready"


class Forbidden(APIError):
    """403: the caller is known but may not do this (a role it does not hold)."""

    status_code = 403
    default_code = "permission_denied"


class Conflict(APIError):
    """409: the object is in a state that does not allow this operation."""

    status_code = 409
    default_code = "conflict"


class Unprocessable(APIError):
    """422: well-formed but refused, e.g. an Idempotency-Key reused for another request
    (the IETF Idempotency-Key draft's code for that case)."""

    status_code = 422
    default_code = "unprocessable"


class PayloadTooLarge(APIError):
    """413: the request body exceeds the gateway's limit."""

    status_code = 413
    default_code = "payload_too_large"


class UnsupportedMediaType(APIError):
    """415: a body in a content type the route does not read."""

    status_code = 415
    default_code = "unsupported_media_type"


class RateLimited(APIError):
    """429 with ``Retry-After``: a queue cap or a rate limit was reached; nothing was created."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "queue_full"

    def __init__(
        self, message: str, *, retry_after_s: float, code: str | None = None, headers: Mapping[str, str] | None = None,
    ) -> None:
        # Retry-After takes whole seconds; round up so a client never retries too early.
        if not math.isfinite(retry_after_s):
            retry_after_s = 60.0
        seconds = max(1, math.ceil(retry_after_s))
        super().__init__(message, code=code, headers={**(headers or {}), "Retry-After": str(seconds)})
        self.retry_after_s = seconds


class ServiceUnavailable(APIError):
    """503: a backing service (job store, object store) did not answer."""

    status_code = 503
    error_type = "server_error"
    default_code = "service_unavailable"


def _printable(text: str | None) -> str | None:
    # Clients can smuggle lone surrogates into names and values we echo; UTF-8 cannot encode them.
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ErrorDetail(BaseModel):
    """The inner object of an error response (documentation only)."""

    message: str = Field(description="What went wrong, naming the bad value and what is allowed.")
    type: str = Field(description="invalid_request_error, rate_limit_error or server_error.")
    param: str | None = Field(default=None, description="The request parameter at fault, if one is.")
    code: str | None = Field(default=None, description="A machine-readable error code.")


class ErrorResponse(BaseModel):
    """The OpenAI error envelope (documentation only)."""

    error: ErrorDetail


# -- pydantic / FastAPI validation errors -> one clear 400 ---------------------------------

_LOC_ROOTS = {"body", "query", "path", "header", "cookie", "form"}


def _param_of(loc: Sequence[Any], *, rooted: bool = True) -> str | None:
    """``rooted``: FastAPI's locations start with where the value was (body, query, …); a model
    validated by hand has no such root, and a field may well be *named* 'query' or 'body'."""
    parts = [str(p) for p in loc if not isinstance(p, int)]
    if not rooted:
        return ".".join(parts) if parts else None  # even "": the client's own (empty) key
    if parts and parts[0] in _LOC_ROOTS:
        parts = parts[1:]
    return ".".join(parts) or None


def _message_of(err: Mapping[str, Any], param: str | None) -> str:
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid value"))
    if kind == "missing":
        return f"{param}: is required"
    if kind == "extra_forbidden":
        return f"{param}: unknown parameter"
    if kind == "json_invalid":
        return f"request body is not valid JSON: {err.get('ctx', {}).get('error', msg)}"
    # Our own validators raise ValueError("field: what is wrong; allowed: ...").
    msg = msg.removeprefix("Value error, ")
    if param and msg.startswith(f"{param}:"):
        return msg
    shown = err.get("input")
    if isinstance(shown, (str, int, float, bool)) or shown is None:
        got = repr(shown)
        got = got if len(got) <= 80 else got[:77] + "..."  # never echo a whole oversized value
        return f"{param or 'request'}: {msg} (got {got})"
    return f"{param or 'request'}: {msg}"


def from_validation_errors(
    errors: Sequence[Mapping[str, Any]], *, allowed: Sequence[str] = (), rooted: bool = True,
) -> InvalidRequest:
    """The first validation error as a 400 naming its parameter; ``allowed`` lists known fields."""
    if not errors:
        return InvalidRequest("the request is not valid")
    first = errors[0]
    param = _param_of(first.get("loc", ()), rooted=rooted)
    message = _message_of(first, param)
    if first.get("type") == "extra_forbidden" and allowed:
        message += f"; allowed: {', '.join(allowed)}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    code = "missing_required_parameter" if first.get("type") == "missing" else (
        "unknown_parameter" if first.get("type") == "extra_forbidden" else "invalid_value"
    )
    return InvalidRequest(message, param=param, code=code)


def from_pydantic(exc: ValidationError, *, allowed: Sequence[str] = ()) -> InvalidRequest:
    return from_validation_errors(exc.errors(include_url=False), allowed=allowed, rooted=False)


# -- handlers ------------------------------------------------------------------------------


def _respond(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers or None)


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, APIError):  # pragma: no cover - registered for APIError only
        return await _unexpected(_, exc)
    return _respond(exc)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    return _respond(from_validation_errors(errors))


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, StarletteHTTPException):  # pragma: no cover
        return await _unexpected(request, exc)
    status = exc.status_code
    headers = dict(exc.headers or {})
    if status == 404 and exc.detail in (None, "Not Found"):
        message = f"no route {request.method} {request.url.path}"
    elif status == 405:
        allowed = _allowed_methods(request)
        message = f"method {request.method} is not allowed on {request.url.path}; allowed: {', '.join(allowed)}"
        headers["Allow"] = ", ".join(allowed)
    else:
        message = str(exc.detail)
    type_ = "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse(
        error_body(message, type_, None, _HTTP_CODES.get(status)), status_code=status, headers=headers or None,
    )


def _allowed_methods(request: Request) -> list[str]:
    """Every method the routes of this path serve; Starlette's own Allow names only the first route's.
    Where a literal path and a templated one both match (``/v1/videos/characters`` and
    ``/v1/videos/{video_id}``), the literal one's resource is meant: the fewest parameters win."""
    by_params: dict[int, set[str]] = {}
    for route in request.app.router.routes:
        if route.matches(request.scope)[0] != Match.NONE:
            params = getattr(route, "path", "").count("{")
            by_params.setdefault(params, set()).update(getattr(route, "methods", None) or ())
    return sorted(by_params[min(by_params)]) if by_params else []


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to the log, never to the client.
    log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(
        error_body("the server had an error while processing the request", "server_error", None, "internal_error"),
        status_code=500,
    )


def install_error_handlers(app: FastAPI) -> None:
    """Route every error the app can raise through the OpenAI error shape."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Bad request: message names names the parameter and what is allowed."},
    404: {"model": ErrorResponse, "description": "No such video for this caller, or its content is not ready yet."},
    500: {"model": ErrorResponse, "description": "Internal error; details are logged, not returned."},
}
