"""Pure ASGI middleware (no buffering, so streaming and disconnects pass through untouched).

- `AuthMiddleware`: every /v1 call needs a known API key when tenants are configured;
  the tenant goes to `request.state.tenant`. It runs before the body is read, so an
  unauthenticated caller learns nothing from validation errors. /metrics needs the
  metrics key or an admin key when either is configured (server/auth.py); the
  --metrics-port listener serves /metrics and /health only, without a key.
- `BodyLimitMiddleware`: bodies over the limit get 413, whether announced by
  Content-Length or sent chunked.
- `JsonBodyMiddleware`: a POST whose body is not declared JSON (`Content-Type`) gets
  415, as vLLM answers, rather than a puzzling validation error.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraserve.server.auth import OPEN_TENANT, MetricsAccess, Tenant, Tenants
from loraserve.server.errors import APIError

PROTECTED_PREFIX = "/v1/"
PROTECTED_PATHS = ("/tokenize", "/detokenize", "/invocations")
"""Outside /v1 but tenants' business too: they name a model."""
METRICS_PORT_PATHS = ("/metrics", "/health")
BODILESS_POSTS = ("/ping",)


class AuthMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        tenants: Tenants | None,
        metrics: MetricsAccess | None = None,
        metrics_port: int | None = None,
    ) -> None:
        self.app = app
        self.tenants = tenants
        self.metrics = metrics or MetricsAccess(tenants, None)
        self.metrics_port = metrics_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            tenant = self._caller(scope)
        except APIError as error:
            await error.response()(scope, receive, send)
            return
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)

    def _caller(self, scope: Scope) -> Tenant:
        """The tenant of this request; APIError if it may not make it."""
        path, authorization = scope["path"], _header(scope, b"authorization")
        server = scope.get("server")  # (host, port) of the socket the request came in on
        if self.metrics_port is not None and server is not None and server[1] == self.metrics_port:
            if path not in METRICS_PORT_PATHS:
                raise APIError(404, "this port serves /metrics and /health only")
            return OPEN_TENANT
        if path == "/metrics":
            self.metrics.check(authorization)
        elif self.tenants is not None and (
            path.startswith(PROTECTED_PREFIX) or path in PROTECTED_PATHS
        ):
            return self.tenants.authenticate(authorization)
        return OPEN_TENANT


class JsonBodyMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] not in BODILESS_POSTS
        ):
            media_type = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
            if not (media_type == "application/json" or media_type.endswith("+json")):
                error = APIError(
                    415,
                    f"Unsupported Media Type: only application/json is accepted, got "
                    f"{media_type or 'no Content-Type'}",
                    code="unsupported_media_type",
                )
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._too_large().response()(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # Raised while the route reads its body: FastAPI passes HTTPException
                # through to the app's handlers, which answer in OpenAI's shape.
                raise HTTPException(413, self._too_large().message)
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self) -> APIError:
        return APIError(
            413, f"the request body is larger than {self.max_bytes} bytes", code="body_too_large"
        )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None
