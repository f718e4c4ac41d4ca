"""Tool-call parsing (server/tools.py, server/json_scan.py, server/tool_stream.py) on the
texts models write: whole answers, and the same answers streamed a character at a time,
whose deltas must add up to the whole answer's calls."""

from __future__ import annotations

import json

import pytest

from loraserve.server.json_scan import scan_object
from loraserve.server.tool_stream import ToolStream, finish_reason, message
from loraserve.server.tools import ToolMode

HERMES = (
    'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
    '"days": [1, 2], "note": "a } and a \\" inside"}}\n</tool_call>\n<tool_call>\n'
    '{"arguments": {"zone": "UTC"}, "name": "get_time"}\n</tool_call>'
)
LLAMA3 = (
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
    '{"name": "get_time", "parameters": {"zone": "UTC"}}'
)
MISTRAL = (
    '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
    '{"name": "get_time", "arguments": {"zone": "UTC"}}]'
)
REQUIRED = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {"zone": "UTC"}}]'
EXPECTED = [
    ("get_weather", {"city": "Paris"}),
    ("get_time", {"zone": "UTC"}),
]
CASES = [
    (ToolMode("auto", parser="llama3_json"), LLAMA3, ""),
    # Llama 3 models also write "arguments", as OpenAI names them
    (ToolMode("auto", parser="llama3_json"), LLAMA3.replace("parameters", "arguments"), ""),
    (ToolMode("auto", parser="mistral"), MISTRAL, ""),
    (ToolMode("required"), REQUIRED, ""),
]


@pytest.mark.parametrize(("mode", "output", "content"), CASES)
def test_whole_answers_give_their_calls(mode: ToolMode, output: str, content: str) -> None:
    answer = message(mode, output, parallel=True)
    assert answer.tool_calls is not None
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in answer.tool_calls]
    assert calls == EXPECTED
    assert (answer.content or "") == content
    assert finish_reason(mode, "stop", True) == "tool_calls"


def test_hermes_keeps_the_text_around_the_calls_as_content() -> None:
    answer = message(ToolMode("auto", parser="hermes"), HERMES, parallel=True)
    assert answer.content == "Let me check. \n"
    assert answer.tool_calls is not None
    weather, time = answer.tool_calls
    assert json.loads(weather.function.arguments)["note"] == 'a } and a " inside'
    assert (time.function.name, json.loads(time.function.arguments)) == (
        "get_time",
        {"zone": "UTC"},
    )
    assert (
        len(message(ToolMode("auto", parser="hermes"), HERMES, parallel=False).tool_calls or [])
        == 1
    )


def test_an_answer_without_calls_is_content() -> None:
    for parser in ("hermes", "llama3_json", "mistral"):
        answer = message(ToolMode("auto", parser=parser), "just words <tool", parallel=True)
        assert answer.content == "just words <tool" and answer.tool_calls is None
    broken = message(ToolMode("auto", parser="hermes"), "<tool_call>{not json</tool_call>", True)
    assert broken.tool_calls is None


@pytest.mark.parametrize(
    ("mode", "output"),
    [(ToolMode("auto", parser="hermes"), HERMES), *[(mode, out) for mode, out, _ in CASES]],
)
def test_streamed_deltas_add_up_to_the_whole_answer(mode: ToolMode, output: str) -> None:
    stream = ToolStream(mode)
    content, calls = "", {}  # index -> [name, arguments]
    for position, char in enumerate(output):
        new_content, deltas = stream.feed(char, final=position == len(output) - 1)
        content += new_content
        for delta in deltas:
            if delta.id is not None:
                assert delta.index not in calls and delta.function.name
                calls[delta.index] = [delta.function.name, ""]
            calls[delta.index][1] += delta.function.arguments or ""
    whole = message(mode, output, parallel=True)
    assert whole.tool_calls is not None
    assert [(c.function.name, c.function.arguments) for c in whole.tool_calls] == [
        tuple(calls[index]) for index in sorted(calls)
    ]
    assert content == (whole.content or "")


def test_a_named_function_streams_its_arguments_as_written() -> None:
    stream = ToolStream(ToolMode("named", function="f"))
    first, deltas = stream.feed('{"a"', final=False)
    assert first == "" and deltas[0].function.name == "f" and deltas[0].id
    _, more = stream.feed(": 1}", final=True)
    assert [d.function.arguments for d in deltas[1:] + more] == ['{"a"', ": 1}"]
    assert finish_reason(ToolMode("named", function="f"), "stop", True) == "stop"


def test_scan_object_reports_only_growing_spans() -> None:
    text = '{"name": "f", "arguments": {"x": [1, "}"], "y": true}, "n": 12}'
    previous = ""
    for end in range(1, len(text) + 1):
        scanned = scan_object(text[:end], 0)
        arguments = scanned.value(text[:end], "arguments")
        value = arguments[0] if arguments else ""
        assert value.startswith(previous)
        previous = value
    assert previous == '{"x": [1, "}"], "y": true}'
    final = scan_object(text, 0)
    assert final.end == len(text) and final.value(text, "n") == ("12", True)
