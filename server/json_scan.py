"""Where the members of a JSON object lie in text that may still be arriving.

Streaming a tool call means sending its arguments while the model writes them, before
the JSON around them is complete. `scan_object` reads an object from `text[start]` (a
`{`) as far as the text goes and says, for each top-level member, where its value
starts and, once it has, where it ends. What it reports for a prefix of the text is
never contradicted by the whole: a value's span only grows, so what was sent of it stays
a prefix of the final value.

Example: `{"name": "f", "arguments": {"x": 1` gives name = `"f"` (closed) and arguments
starting at `{` and still open; adding `}}` closes both, the object ending after `}}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

WHITESPACE = " \t\r\n"


@dataclass
class Member:
    key: str
    value_start: int
    value_end: int | None = None
    """Index just past the value; None while the value is still open."""


@dataclass
class ScannedObject:
    members: list[Member] = field(default_factory=list)
    end: int | None = None
    """Index just past the closing `}`; None while the object is open."""

    def value(self, text: str, key: str) -> tuple[str, bool] | None:
        """(the member's raw value text so far, whether it is complete), if present."""
        for member in self.members:
            if member.key == key:
                end = member.value_end
                return text[member.value_start : len(text) if end is None else end], end is not None
        return None


def scan_object(text: str, start: int) -> ScannedObject:
    """The object at `text[start]` (which must be `{`), as far as `text` goes."""
    assert text[start] == "{"
    scanned = ScannedObject()
    depth, position = 0, start
    expecting = "key"  # at depth 1: key, colon, value or comma
    key_start = 0
    while position < len(text):
        char = text[position]
        if char == '"':
            end = _string_end(text, position)
            if end is None:
                return scanned
            if depth == 1 and expecting == "key":
                key_start = position
                expecting = "colon"
            elif depth == 1 and expecting == "value":
                scanned.members.append(Member(_key(text, key_start), position, end))
                expecting = "comma"
            position = end
            continue
        if char in "{[":
            depth += 1
            if depth == 2 and expecting == "value":
                scanned.members.append(Member(_key(text, key_start), position))
                expecting = "comma"
        elif char in "}]":
            depth -= 1
            if depth == 1 and scanned.members and scanned.members[-1].value_end is None:
                scanned.members[-1].value_end = position + 1
            if depth == 0:
                _close_scalar(scanned, position)
                scanned.end = position + 1
                return scanned
        elif depth == 1:
            expecting = _top_level(text, position, char, expecting, key_start, scanned)
        position += 1
    return scanned


def _top_level(
    text: str, position: int, char: str, expecting: str, key_start: int, scanned: ScannedObject
) -> str:
    """A character outside strings at the object's own level."""
    if char == ":" and expecting == "colon":
        return "value"
    if char == ",":
        _close_scalar(scanned, position)
        return "key"
    if expecting == "value" and char not in WHITESPACE:  # a number, true, false or null
        scanned.members.append(Member(_key(text, key_start), position))
        return "scalar"
    if expecting == "scalar" and char in WHITESPACE:
        _close_scalar(scanned, position)
        return "comma"
    return expecting


def _close_scalar(scanned: ScannedObject, position: int) -> None:
    if scanned.members and scanned.members[-1].value_end is None:
        scanned.members[-1].value_end = position


def _string_end(text: str, start: int) -> int | None:
    """Index just past the string opening at `start`; None if it is not closed yet."""
    position = start + 1
    while position < len(text):
        if text[position] == "\\":
            position += 2
            continue
        if text[position] == '"':
            return position + 1
        position += 1
    return None


def _key(text: str, start: int) -> str:
    end = _string_end(text, start)
    assert end is not None
    try:
        return str(json.loads(text[start:end]))
    except ValueError:
        return text[start + 1 : end - 1]
