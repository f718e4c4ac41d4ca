"""One chat choice's output as OpenAI's message or stream deltas: content and tool calls.

A stream sends each tool call as OpenAI does: a first delta naming it (`index`, `id`,
`type`, `function.name`, empty `arguments`), then deltas carrying more of its
arguments' JSON text as the model writes it. The text is rescanned whole at every delta
(server/tools.py); what is sent is the difference from what was sent before, which
json_scan guarantees only ever grows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraserve.server.responses import (
    AssistantMessage,
    FunctionCall,
    ToolCall,
    ToolCallDelta,
    ToolCallFunctionDelta,
)
from loraserve.server.tools import ToolMode, finished_calls, new_call_id


@dataclass
class ToolStream:
    """The deltas of one streamed choice."""

    mode: ToolMode
    parallel: bool = True
    text: str = ""
    content_sent: int = 0
    calls_sent: list[tuple[str, int]] = field(default_factory=list)
    """(id, characters of arguments sent) of each tool call begun."""

    @property
    def called(self) -> bool:
        return bool(self.calls_sent)

    def feed(self, new_text: str, final: bool) -> tuple[str, list[ToolCallDelta]]:
        """(content, tool-call deltas) to send for `new_text`."""
        if self.mode.kind == "none":  # no tools: the text is all content, nothing to scan
            return new_text, []
        self.text += new_text
        scan = self.mode.scan(self.text, final)
        content = scan.content[self.content_sent :]
        self.content_sent = max(self.content_sent, len(scan.content))
        deltas = []
        calls = scan.calls if self.parallel else scan.calls[:1]
        for index, call in enumerate(calls):
            if call.name is None:
                break  # a call is named before its arguments are sent
            if index == len(self.calls_sent):
                self.calls_sent.append((new_call_id(), 0))
                function = ToolCallFunctionDelta(name=call.name, arguments="")
                deltas.append(
                    ToolCallDelta(
                        index=index,
                        id=self.calls_sent[index][0],
                        type="function",
                        function=function,
                    )
                )
            call_id, sent = self.calls_sent[index]
            if len(call.arguments) > sent:
                function = ToolCallFunctionDelta(arguments=call.arguments[sent:])
                deltas.append(ToolCallDelta(index=index, function=function))
                self.calls_sent[index] = (call_id, len(call.arguments))
        return content, deltas


def message(mode: ToolMode, text: str, parallel: bool) -> AssistantMessage:
    """The whole answer: content, or tool calls when the mode finds them (an `auto` output
    whose calls do not parse is content, as in vLLM)."""
    if mode.kind == "none":
        return AssistantMessage(content=text)
    scan = mode.scan(text)
    calls = finished_calls(scan, parallel)
    if calls is None and mode.kind in ("named", "required"):  # cut short by max_tokens
        calls = [(call.name, call.arguments) for call in scan.calls if call.name is not None]
    if not calls:
        return AssistantMessage(content=text)
    tool_calls = [
        ToolCall(id=new_call_id(), function=FunctionCall(name=name, arguments=arguments))
        for name, arguments in calls
    ]
    return AssistantMessage(content=scan.content or None, tool_calls=tool_calls)


def finish_reason(mode: ToolMode, reason: str | None, called: bool) -> str | None:
    """`tool_calls` when an `auto` or `required` answer called tools and stopped (a named
    function's answer stops with `stop`, as OpenAI's)."""
    if reason == "stop" and called and mode.kind in ("auto", "required"):
        return "tool_calls"
    return reason
