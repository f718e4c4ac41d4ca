"""Listening and draining: the server's sockets, and SIGTERM as "finish what is in flight".

Kubernetes runs the preStop hook, then sends SIGTERM, and kills the pod
`terminationGracePeriodSeconds` after the hook began. On the first SIGTERM loraserve
drains:
- /health answers 503 (`draining`) while connections are still accepted, so that
  readiness fails and the Service and the endpoint picker stop sending requests here;
- new POST /v1/... requests get 503 (`draining`, `Connection: close`): the client
  retries elsewhere;
- requests in flight (streams too) run to their end;
- the process exits, status 0, as soon as none is left, or after
  `drain_timeout_seconds` (what is left is cut; status 1).
A second SIGTERM, or SIGINT (Ctrl-C), stops at once, as uvicorn does.
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from loraserve.server.errors import APIError

logger = logging.getLogger(__name__)

UNCOUNTED_PATHS = ("/health", "/metrics")
"""Probes and scrapes: neither counted as work in flight nor refused while draining."""
CUT_GRACE_SECONDS = 0.1
"""After a drain ran out of time: how long uvicorn still waits before cancelling what is left
(a clean drain leaves nothing to wait for)."""


class Drain:
    """Requests in flight, and whether (since when) the server is draining."""

    def __init__(self, timeout_seconds: float) -> None:
        self.timeout_seconds = timeout_seconds
        self.in_flight = 0
        self.started_at: float | None = None

    @property
    def draining(self) -> bool:
        return self.started_at is not None

    def begin(self) -> None:
        if self.started_at is None:
            self.started_at = time.monotonic()
            logger.info(
                "SIGTERM: draining %d request(s) in flight, for at most %g s",
                self.in_flight,
                self.timeout_seconds,
            )

    def finished(self) -> bool:
        """Draining, and either nothing is left or the time is up."""
        if self.started_at is None:
            return False
        return self.in_flight == 0 or self.timed_out()

    def timed_out(self) -> bool:
        return (
            self.started_at is not None
            and time.monotonic() - self.started_at >= self.timeout_seconds
        )


class DrainMiddleware:
    """Counts requests in flight; refuses new POST /v1/... requests while draining."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNCOUNTED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.drain.draining and scope["method"] == "POST" and scope["path"].startswith("/v1/"):
            refusal = APIError(
                503,
                "the server is shutting down; retry on another replica",
                code="draining",
                headers={"Connection": "close"},
            )
            await refusal.response()(scope, receive, send)
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn, with SIGTERM starting a drain instead of an immediate shutdown."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        self.cut_requests = 0
        """Requests still in flight when the drain ran out of time (they were cut)."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self.drain.draining:
            self.drain.begin()  # on_tick ends the server once the drain is over
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain.finished() and not self.should_exit:
            self.cut_requests = self.drain.in_flight
            if self.cut_requests:
                logger.warning(
                    "drain timed out after %g s; cutting %d request(s)",
                    self.drain.timeout_seconds,
                    self.cut_requests,
                )
            self.should_exit = True
        return await super().on_tick(counter)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, before the model loads: a port in use fails the
    start at once (OSError), not minutes later."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise OSError(error.errno, f"cannot listen on {host}:{port}: {error.strerror}") from None
    return sock
