"""A streamed Responses request (`stream: true`): the chat route's stream of chunks, retold
as the Responses API's events, each `event: <type>` with a `data:` object of that `type` and
a `sequence_number`:

    response.created, response.in_progress          the response, in progress, no output
    response.output_item.added                      the assistant message, no content yet
    response.content_part.added                     its output_text part, empty
    response.output_text.delta ...                  each piece of text as it comes
    response.output_text.done, response.content_part.done, response.output_item.done
    response.completed | response.incomplete        the whole response, with usage

An error after the stream began is an `error` event (and the stream ends there).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loraserve.server.responses_api import ResponseShape


async def response_events(shape: ResponseShape, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """The Responses events of a chat completion's SSE chunks (`include_usage` on)."""
    numbers = itertools.count()

    def event(kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": next(numbers), **fields}
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"

    where = {"item_id": shape.message_id, "output_index": 0, "content_index": 0}
    yield event("response.created", response=shape.response("in_progress", [], None))
    yield event("response.in_progress", response=shape.response("in_progress", [], None))
    yield event("response.output_item.added", output_index=0, item=shape.message(None))
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    yield event("response.content_part.added", **where, part=part)
    text, finish_reason, usage = "", None, None
    async for chunk in _chunks(chunks):
        if "error" in chunk:
            error = chunk["error"]
            yield event("error", code=error.get("code"), message=error["message"], param=None)
            return
        for choice in chunk.get("choices", []):
            delta = choice.get("delta", {}).get("content")
            if delta:
                text += delta
                yield event("response.output_text.delta", **where, delta=delta, logprobs=[])
            finish_reason = choice.get("finish_reason") or finish_reason
        usage = chunk.get("usage") or usage
    cut = finish_reason == "length"
    message = shape.message(text, cut)
    yield event("response.output_text.done", **where, text=text, logprobs=[])
    yield event("response.content_part.done", **where, part=message["content"][0])
    yield event("response.output_item.done", output_index=0, item=message)
    status = "incomplete" if cut else "completed"
    yield event(f"response.{status}", response=shape.response(status, [message], usage))


async def _chunks(events: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of `data:` events, until `[DONE]`."""
    async for event in events:
        for data in _data_lines(event):
            if data == "[DONE]":
                return
            yield json.loads(data)


def _data_lines(event: str) -> Iterator[str]:
    for line in event.splitlines():
        if line.startswith("data: "):
            yield line.removeprefix("data: ").strip()
