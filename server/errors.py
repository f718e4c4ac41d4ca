"""Every failure as OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`.

Routes raise loraserve's typed errors (or `APIError` for HTTP-only cases); the
handlers installed here turn each into the right status. FastAPI's own 422 for a
body that does not validate becomes a 400 of the same shape, as OpenAI answers.

Anything else a route raises is a bug, answered by `CatchAllMiddleware` with a 500
error object on a connection that stays open. (An exception handler registered for
`Exception` would not do: Starlette's ServerErrorMiddleware sends its response and
then re-raises, and uvicorn closes the keep-alive connection of a request that
raised.) Error bodies are ASCII JSON, so a message that quotes the client's input
encodes even when that input holds a lone surrogate.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraserve.errors import (
    AdapterError,
    EngineDeadError,
    EngineError,
    InvalidRequestError,
    LoraserveError,
    QueueFullError,
    RequestFailedError,
    UnknownAdapterError,
)

logger = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}
MAX_LISTED_ERRORS = 4


class APIError(Exception):
    """An error with its HTTP status, in OpenAI's terms."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI sends (also used as an SSE `data:` event mid-stream)."""
        error_type = ERROR_TYPES.get(self.status, "invalid_request_error")
        return {
            "error": {
                "message": self.message,
                "type": error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return ErrorResponse(self.body(), status_code=self.status, headers=self.headers)


class ErrorResponse(JSONResponse):
    """JSON in ASCII: `\\ud800` stays an escape instead of failing to encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def model_not_found(name: str) -> APIError:
    """The same 404 for a model that does not exist and one the tenant may not use."""
    return APIError(
        404,
        f"The model `{name}` does not exist or you do not have access to it.",
        "model",
        "model_not_found",
    )


def to_api_error(error: BaseException) -> APIError:
    """The APIError for any exception a route or the engine raised."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, QueueFullError):
        retry = str(error.retry_after_seconds)
        return APIError(429, str(error), code="queue_full", headers={"Retry-After": retry})
    if isinstance(error, UnknownAdapterError):
        return APIError(404, str(error), "model", "model_not_found")
    if isinstance(error, InvalidRequestError):
        return APIError(400, str(error), error.param)
    if isinstance(error, AdapterError):
        return APIError(400, str(error), "lora_path", "invalid_adapter")
    if isinstance(error, RequestFailedError):
        return APIError(500, str(error), code="request_failed")
    if isinstance(error, LoraserveError):
        return APIError(400, str(error))
    if isinstance(error, EngineDeadError):
        return APIError(503, str(error), code="engine_dead")
    if isinstance(error, EngineError):
        return APIError(500, str(error), code="engine_error")
    logger.error("unexpected error", exc_info=error)
    return APIError(500, f"internal error: {error!r}", code="internal_error")


def validation_error(error: RequestValidationError) -> APIError:
    """A 400 naming the first field that failed, e.g. `max_tokens: Input should be ...`.

    A field of several accepted types (a union) fails once per type; those
    failures are listed together."""
    errors = error.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "malformed JSON")
        return APIError(400, f"The request body is not valid JSON: {detail}", code="invalid_json")
    path = _location(first)
    if not path:  # the body as a whole: missing, or not a JSON object
        if first.get("type") == "missing":
            return APIError(400, "The request body is missing: send a JSON object.")
        return APIError(400, f"The request body must be a JSON object: {first.get('msg')}.")
    param = path[0]
    same_field = [e for e in errors if _location(e)[:1] == path[:1]][:MAX_LISTED_ERRORS]
    message = "; ".join(f"{'.'.join(_location(e))}: {e.get('msg', 'invalid')}" for e in same_field)
    return APIError(400, message or "invalid request", param)


def _location(error: Any) -> list[str]:
    return [str(part) for part in error.get("loc", ()) if part != "body"]


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception to the OpenAI error object."""

    async def on_validation(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        return validation_error(error).response()

    async def on_http(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        message = str(error.detail) or HTTPStatus(error.status_code).phrase
        return APIError(error.status_code, message, headers=dict(error.headers or {})).response()

    async def on_known(request: Request, error: Exception) -> JSONResponse:
        return to_api_error(error).response()

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for kind in (APIError, LoraserveError, EngineError):
        app.add_exception_handler(kind, on_known)
    app.add_middleware(CatchAllMiddleware)


class CatchAllMiddleware:
    """Answers any exception that escaped the routes and handlers with a 500 error object;
    the connection stays open. One raised after the response started (a stream) can only
    be logged: the client sees the stream end early."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_and_note(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception as error:
            api_error = to_api_error(error)  # logs the unexpected ones
            if started:
                return
            await api_error.response()(scope, receive, send)
