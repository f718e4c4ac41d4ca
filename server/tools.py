"""Tool calling: `tools` and `tool_choice` into a constraint, the model's text into tool calls.

- `tool_choice` `none`: the tools still reach the chat template (as in vLLM), the output
  is plain content.
- `auto`: the model writes what it likes; the parser chosen by `--tool-call-parser`
  finds tool calls in it (`hermes`: `<tool_call>{json}</tool_call>`, as Hermes and Qwen
  write them; `llama3_json`: a JSON object `{"name", "parameters"}` (several joined by
  `;`), optionally after `<|python_tag|>`; `mistral`: `[TOOL_CALLS]` and a JSON list of
  `{"name", "arguments"}`). Without a parser, `auto` is refused, as in vLLM.
- `required`: the output is constrained (structured output) to a JSON list of
  `{"name", "parameters"}` objects, one of the tools each (at most one without
  `parallel_tool_calls`); no parser is needed.
- a named function: the output is constrained to that function's parameters: the
  whole output is its arguments.

Each format is read by one `scan_*` function that works on a prefix of the output too,
so streaming (server/tool_stream.py) and whole answers share it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loraserve.engine.sampling.structured import StructuredOutputs
from loraserve.errors import InvalidRequestError
from loraserve.server.config import TOOL_CALL_PARSERS
from loraserve.server.json_scan import scan_object
from loraserve.server.protocol import ChatCompletionRequest, NamedToolChoice

PYTHON_TAG = "<|python_tag|>"
END = "\x00"
"""Appended to a whole output before scanning it: no tag starts with it, so nothing at the
end is held back as a possible tag."""


@dataclass
class PartialCall:
    """A tool call as far as the text goes."""

    name: str | None = None
    arguments: str = ""
    """The arguments' JSON text so far (only ever grows)."""


@dataclass
class Scan:
    """What a (possibly partial) output holds: content for the user, and tool calls."""

    content: str = ""
    calls: list[PartialCall] = field(default_factory=list)


@dataclass(frozen=True)
class ToolMode:
    """How one request's output is read."""

    kind: str
    """`none` (no tools, or tool_choice none), `auto`, `required` or `named`."""
    parser: str | None = None
    function: str | None = None
    """The named function."""

    def scan(self, text: str, final: bool = True) -> Scan:
        """What `text` holds; not `final`: more may follow, so a tail that could begin a
        tool-call tag is held back from the content."""
        if self.kind == "named":
            return Scan(calls=[PartialCall(self.function, text)])
        if self.kind == "required":
            return _scan_list(text, ("parameters",))
        if self.kind == "auto":
            scan = SCANNERS[str(self.parser)](text + (END if final else ""))
            scan.content = scan.content.removesuffix(END)
            return scan
        return Scan(content=text)


def tool_mode(body: ChatCompletionRequest, parser: str | None) -> ToolMode:
    """The request's mode; a 400 for a choice it cannot have."""
    choice = body.tool_choice
    if choice is not None and not body.tools:
        raise InvalidRequestError("tool_choice needs tools", "tool_choice")
    if not body.tools or choice == "none":
        return ToolMode("none")
    names = [tool.function.name for tool in body.tools]
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise InvalidRequestError(
                f"tool_choice names {choice.function.name!r}, which is not among the tools",
                "tool_choice",
            )
        return ToolMode("named", function=choice.function.name)
    if choice == "required":
        return ToolMode("required")
    if parser is None:
        raise InvalidRequestError(
            'tool_choice "auto" needs a server started with --tool-call-parser '
            f'({", ".join(TOOL_CALL_PARSERS)}); "required" or a named function work without',
            "tool_choice",
        )
    return ToolMode("auto", parser=parser)


def tool_constraint(body: ChatCompletionRequest, mode: ToolMode) -> StructuredOutputs | None:
    """The structured output that enforces `required` or a named function."""
    tools = {
        tool.function.name: tool.function.parameters or {"type": "object"}
        for tool in body.tools or ()
    }
    if mode.kind == "named":
        return StructuredOutputs(json=tools[str(mode.function)])
    if mode.kind != "required":
        return None
    items = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "parameters": parameters},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for name, parameters in tools.items()
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if body.parallel_tool_calls is False:
        schema["maxItems"] = 1
    return StructuredOutputs(json=schema)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def finished_calls(scan: Scan, parallel: bool) -> list[tuple[str, str]] | None:
    """(name, arguments) of each tool call of a whole output, or None if they do not parse
    (the output is then plain content); only the first without `parallel_tool_calls`."""
    calls = []
    for call in scan.calls:
        if call.name is None:
            return None
        try:
            json.loads(call.arguments)
        except ValueError:
            return None
        calls.append((call.name, call.arguments))
    return calls if parallel else calls[:1]


# -- the formats ---------------------------------------------------------------------------


def _call_at(
    text: str, start: int, arguments_keys: tuple[str, ...]
) -> tuple[PartialCall, int | None]:
    """The `{"name", arguments}` object at `text[start]` (its arguments under the first of
    `arguments_keys` it has), and the index past it."""
    scanned = scan_object(text, start)
    call = PartialCall()
    name = scanned.value(text, "name")
    if name is not None and name[1]:
        try:
            call.name = str(json.loads(name[0]))
        except ValueError:
            call.name = name[0].strip('"')
    for key in arguments_keys:
        arguments = scanned.value(text, key)
        if arguments is not None:
            call.arguments = arguments[0]
            break
    return call, scanned.end


def _scan_list(text: str, arguments_keys: tuple[str, ...], start: int = 0) -> Scan:
    """A JSON list of call objects (`required`; Mistral's `[TOOL_CALLS]` list)."""
    scan = Scan()
    position = text.find("{", start)
    while position >= 0:
        call, end = _call_at(text, position, arguments_keys)
        scan.calls.append(call)
        if end is None:
            break
        position = text.find("{", end)
    return scan


def _scan_hermes(text: str) -> Scan:
    scan = Scan()
    position = 0
    while True:
        open_tag = text.find("<tool_call>", position)
        if open_tag < 0:
            scan.content += _hold_back(text[position:], "<tool_call>")
            return scan
        scan.content += text[position:open_tag]
        brace = text.find("{", open_tag)
        if brace < 0:
            return scan
        call, end = _call_at(text, brace, ("arguments",))
        scan.calls.append(call)
        close = -1 if end is None else text.find("</tool_call>", end)
        if close < 0:
            return scan
        position = close + len("</tool_call>")


def _scan_llama3(text: str) -> Scan:
    body = text.lstrip()
    if PYTHON_TAG.startswith(body.removesuffix(END)):
        return Scan()  # nothing yet, or the start of the tag: wait
    body = body.removeprefix(PYTHON_TAG).lstrip()
    if not body.startswith("{"):
        return Scan(content=text)
    offset = len(text) - len(body)
    scan = Scan()
    position: int | None = offset
    while position is not None and position < len(text):
        call, end = _call_at(text, position, ("parameters", "arguments"))
        scan.calls.append(call)
        next_brace = -1 if end is None else text.find("{", end)
        position = None if next_brace < 0 else next_brace
    return scan


def _scan_mistral(text: str) -> Scan:
    marker = text.find("[TOOL_CALLS]")
    if marker < 0:
        return Scan(content=_hold_back(text, "[TOOL_CALLS]"))
    scan = _scan_list(text, ("arguments",), marker + len("[TOOL_CALLS]"))
    scan.content = text[:marker]
    return scan


def _hold_back(text: str, tag: str) -> str:
    """`text` without a tail that could be the start of `tag` (not yet content)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return text[:-length]
    return text


SCANNERS: dict[str, Callable[[str], Scan]] = {
    "hermes": _scan_hermes,
    "llama3_json": _scan_llama3,
    "mistral": _scan_mistral,
}
assert tuple(SCANNERS) == TOOL_CALL_PARSERS
