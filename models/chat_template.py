"""Chat templates: the model's, found in its folder, rendered as transformers renders them.

Chat templates come from the model folder, i.e. from whoever published the model:
they are untrusted code. They run in Jinja's immutable sandbox with exactly the
options, globals and filters transformers gives them (`_compile_jinja_template`
in transformers' `utils/chat_template_utils.py`), so a prompt renders here as it
renders for the Hugging Face reference, and a template that reaches for Python
internals fails the request instead of escaping.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from loraserve.errors import InvalidRequestError

CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
# Older names of a message's reasoning; transformers copies it under the first two.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def find_templates(folder: Path, config: dict[str, Any]) -> dict[str, str]:
    """Template name -> source. Template files, when present, win over tokenizer_config.json."""
    templates = {}
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        templates["default"] = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if (folder / CHAT_TEMPLATE_DIR).is_dir():
        for file in sorted((folder / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            templates[file.stem] = file.read_text(encoding="utf-8")
    if templates:
        return templates
    raw = config.get("chat_template")
    if isinstance(raw, str):
        return {"default": raw}
    if isinstance(raw, list):  # [{"name": ..., "template": ...}, ...]
        return {
            str(entry["name"]): str(entry["template"])
            for entry in raw
            if isinstance(entry, dict) and "name" in entry and "template" in entry
        }
    return {}


def compile_template(source: str, what: str = "chat_template") -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateError as error:
        raise InvalidRequestError(f"{what} does not compile: {error}", param="messages") from error


def prepare_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Plain copies of the messages, None-valued keys dropped and reasoning aliased, as transformers does.

    OpenAI clients send `content: null` or `tool_calls: null`; templates handle a
    missing key but many render a literal `None`."""
    prepared = []
    for message in messages:
        if not isinstance(message, dict):
            raise InvalidRequestError(f"chat messages must be objects, got {message!r}", "messages")
        copy = {key: plain(value) for key, value in message.items() if value is not None}
        reasoning = next((copy[k] for k in REASONING_FIELDS if copy.get(k) is not None), None)
        if reasoning is not None:
            copy = {"thinking": reasoning, **copy, "reasoning_content": reasoning}
        prepared.append(copy)
    return prepared


def plain(value: Any) -> Any:
    """A copy made of plain JSON types only: the sandbox cannot vet the methods of other objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {plain(key): plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(plain(item) for item in value)
    return f"<{type(value).__name__}>"


# --- the Jinja environment, as transformers builds it --------------------------------


class GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks.

    transformers records where the block's output lands; for serving only the
    output matters, so the body renders unchanged (through a call block, as there,
    which gives it the same scoping)."""

    tags = {"generation"}  # noqa: RUF012 (a Jinja extension API attribute)

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return str(caller())


class TemplateDict:
    """`dict` for templates: builds dicts without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class TemplateNamespace(jinja2.utils.Namespace):
    """`namespace` for templates: refuses underscore names, which lead to CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick: `self` may be a key
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace: {name!r}"
            )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' `tojson`: plain json.dumps, no HTML escaping (unlike Jinja's own)."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _environment() -> ImmutableSandboxedEnvironment:
    """A fresh sandbox with transformers' chat-template options, filters and globals."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["dict"] = TemplateDict()
    environment.globals["namespace"] = TemplateNamespace
    return environment
