"""Server-sent events as OpenAI frames them: `data: {json}` per event, `[DONE]` last, an
error after the 200 went out as an error event; the response aborts its engine requests
however it ends."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from loraserve.engine.client.async_engine import RequestStream
from loraserve.server.errors import to_api_error
from loraserve.server.responses import ResponseBody


def sse(data: ResponseBody | dict[str, Any]) -> str:
    """One server-sent event, as OpenAI frames them."""
    return f"data: {_json(data.dump() if isinstance(data, ResponseBody) else data)}\n\n"


async def _with_done(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """The events, then `[DONE]`; an error after the 200 went out becomes an error event."""
    try:
        async for event in events:
            yield event
    except Exception as error:
        yield sse(to_api_error(error).body())
    yield "data: [DONE]\n\n"


class EventStreamResponse(StreamingResponse):
    """SSE that aborts its engine requests however the response ends, even when the
    client is gone before the first event was pulled from the generators."""

    def __init__(self, events: AsyncIterator[str], streams: list[RequestStream]) -> None:
        super().__init__(_with_done(events), media_type="text/event-stream")
        self.streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for stream in self.streams:
                stream.abort()


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"))
