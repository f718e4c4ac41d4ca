"""Pure ASGI middleware (no buffering, so streaming and disconnects pass through untouched).

- `AuthMiddleware`: every /v1 call needs a known API key when tenants are configured;
  the tenant goes to `request.state.tenant`. It runs before the body is read, so an
  unauthenticated caller learns nothing from validation errors.
- `BodyLimitMiddleware`: bodies over the limit get 413, whether announced by
  Content-Length or sent chunked.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraserve.server.auth import OPEN_TENANT, Tenants
from loraserve.server.errors import APIError

PROTECTED_PREFIX = "/v1/"


class AuthMiddleware:
    def __init__(self, app: ASGIApp, tenants: Tenants | None) -> None:
        self.app = app
        self.tenants = tenants

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tenant = OPEN_TENANT
        if self.tenants is not None and scope["path"].startswith(PROTECTED_PREFIX):
            try:
                tenant = self.tenants.authenticate(_header(scope, b"authorization"))
            except APIError as error:
                await error.response()(scope, receive, send)
                return
        scope.setdefault("state", {})["tenant"] = tenant
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
