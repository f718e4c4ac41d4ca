"""The OpenAPI schema, true to what the server sends.

FastAPI documents a 422 for every body that does not validate; loraserve answers
those with a 400 (OpenAI's status), in OpenAI's error object. Here the 422s are
replaced by the error statuses each route can send, all with that object's schema.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_SCHEMA: dict[str, Any] = {
    "title": "ErrorResponse",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
ERROR_STATUSES = {
    "400": "Invalid request (a bad field is named in `param`)",
    "401": "Missing or unknown API key",
    "403": "The key may not do this",
    "404": "Unknown model or adapter",
    "413": "Request body too large",
    "415": "The body is not declared JSON (Content-Type)",
    "429": "Rate limit or full queue (see Retry-After)",
    "500": "Internal error",
    "503": "Engine stopped, or the server is draining",
}
OTHER_ROUTES_STATUSES = {"/health": ("503",), "/metrics": ("401", "403")}
"""What the routes outside /v1 can answer besides 200."""


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema with loraserve's error responses (built once, then cached)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schema.setdefault("components", {}).setdefault("schemas", {})["ErrorResponse"] = (
            ERROR_SCHEMA
        )
        schema["components"]["schemas"].pop("HTTPValidationError", None)
        schema["components"]["schemas"].pop("ValidationError", None)
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                _error_responses(path, operation["responses"])
        app.openapi_schema = schema
    return app.openapi_schema


def _error_responses(path: str, responses: dict[str, Any]) -> None:
    responses.pop("422", None)
    statuses = OTHER_ROUTES_STATUSES.get(path, tuple(ERROR_STATUSES))
    reference = {"$ref": "#/components/schemas/ErrorResponse"}
    for status in statuses:
        responses[status] = {
            "description": ERROR_STATUSES[status],
            "content": {"application/json": {"schema": reference}},
        }
