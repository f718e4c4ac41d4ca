"""The model's tokenizer (`tokenizer.json`, via `tokenizers`) and its chat template.

Chat templates come from the model folder, i.e. from whoever published the model:
they are untrusted code. They run in Jinja's immutable sandbox with exactly the
options, globals and filters transformers gives them (`_compile_jinja_template`
in transformers' `utils/chat_template_utils.py`), so a prompt renders here as it
renders for the Hugging Face reference, and a template that reaches for Python
internals fails the request instead of escaping.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as RustTokenizer

from loraserve.errors import InvalidRequestError, ModelLoadError
from loraserve.models.config import model_folder, read_json

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
# The named special tokens transformers passes to every chat template.
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Older names of a message's reasoning; transformers copies it under the first two.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
NO_TEMPLATE_MESSAGE = "this model has no chat template; use /v1/completions"


COUNT_CHUNK_CHARS = 1 << 16
"""Texts longer than this are counted in chunks of it before being tokenized whole."""
CUT_TOKENS = 2
"""Tokens a cut between two chunks may add to their count."""


@dataclass(frozen=True)
class BoundedEncoding:
    """What `Tokenizer.encode_at_most` found."""

    ids: list[int] | None
    """The token ids; None when the text has more than the limit."""
    num_tokens: int
    """Tokens of the text: exact, or (`exact` False) a lower bound above the limit."""
    exact: bool


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template."""

    def __init__(
        self,
        backend: RustTokenizer,
        special_tokens: dict[str, str],
        chat_templates: dict[str, str],
    ) -> None:
        self.backend = backend
        self.special_tokens = special_tokens
        """Named special tokens (`bos_token`, `eos_token`, ...) -> their text."""
        self.chat_templates = chat_templates
        """Template name (`default`, `tool_use`, ...) -> Jinja source."""
        self._compiled: dict[str, jinja2.Template] = {}

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        """Load `tokenizer.json`, `tokenizer_config.json` and the chat template(s) of a model folder."""
        path = model_folder(folder)
        tokenizer_path = path / TOKENIZER_FILE
        if not tokenizer_path.is_file():
            raise ModelLoadError(
                f"{tokenizer_path} not found: loraserve needs a fast tokenizer ({TOKENIZER_FILE})"
            )
        try:
            backend = RustTokenizer.from_file(str(tokenizer_path))
        except Exception as error:  # the tokenizers library raises plain Exception
            raise ModelLoadError(f"cannot read {tokenizer_path}: {error}") from error
        config_path = path / TOKENIZER_CONFIG_FILE
        config = read_json(config_path) if config_path.is_file() else {}
        special_tokens = _special_tokens(config, path)
        return cls(backend, special_tokens, _chat_templates(path, config))

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (transformers' `len(tokenizer)`)."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    @property
    def bos_token_id(self) -> int | None:
        """Id of `bos_token` from tokenizer_config.json, None if it has none."""
        return self._token_id("bos_token")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Id of `eos_token` from tokenizer_config.json, as a tuple (empty if none).

        The engine stops on the union of these and `ModelArch.eos_token_ids`."""
        eos = self._token_id("eos_token")
        return () if eos is None else (eos,)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the special tokens, i.e. those `decode(skip_special_tokens=True)` drops."""
        added = self.backend.get_added_tokens_decoder()
        named = (self._token_id(name) for name in SPECIAL_TOKEN_NAMES)
        ids = {i for i, token in added.items() if token.special} | {
            i for i in named if i is not None
        }
        return sorted(ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` runs tokenizer.json's post-processor (BOS)."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_at_most(
        self, text: str, max_tokens: int, add_special_tokens: bool = True
    ) -> BoundedEncoding:
        """The ids of `text` if it has at most `max_tokens` tokens; else how many it has
        (at least), without ever holding the GIL for long: for the server's worker threads.

        Three things would hold every other thread of the process: `tokenizers`' `encode`
        (its `encode_batch` lets go of the GIL while it works; `encode` held a 5 MiB text
        for 2 s), freeing the Encoding of a million tokens (45 ms), and a list of a
        million ids. So a long text is first counted in chunks of COUNT_CHUNK_CHARS, cut
        at spaces, each Encoding freed before the next, stopping as soon as the count is
        clearly over; only a text that may fit is tokenized whole."""
        if len(text) > COUNT_CHUNK_CHARS:
            counted = self._count_in_chunks(text, max_tokens)
            if counted is not None:
                return BoundedEncoding(None, counted, exact=False)
        (encoding,) = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)
        num_tokens = len(encoding)
        ids = list(encoding.ids) if num_tokens <= max_tokens else None
        return BoundedEncoding(ids, num_tokens, exact=True)

    def _count_in_chunks(self, text: str, max_tokens: int) -> int | None:
        """A lower bound on the tokens of `text` once it is over `max_tokens`, else None.
        Cutting a text can add a token or two at the cut, never remove one, so the
        count is lowered by CUT_TOKENS per cut before it is compared."""
        counted, start = 0, 0
        while start < len(text):
            end = start + COUNT_CHUNK_CHARS
            if end < len(text):
                space = text.rfind(" ", start + 1, end)
                end = space if space > start else end
            (encoding,) = self.backend.encode_batch([text[start:end]], add_special_tokens=False)
            counted += len(encoding) - CUT_TOKENS
            del encoding
            if counted > max_tokens:
                return counted
            start = end
        return None

    @property
    def longest_token_chars(self) -> int:
        """Characters of the longest vocabulary entry: no token stands for more characters
        of text (byte-level entries spell one byte per character, byte-fallback entries
        `<0x41>` stand for one byte)."""
        return max(len(token) for token in self.backend.get_vocab(with_added_tokens=True))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`."""
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary entry (token string) of each id; InvalidRequestError for an unknown id."""
        tokens = []
        for token_id in ids:
            token = self.backend.id_to_token(token_id)
            if token is None:
                raise InvalidRequestError(
                    f"token id {token_id} is outside the vocabulary (size {self.vocab_size})"
                )
            tokens.append(token)
        return tokens

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        template: str | None = None,
        **extra: Any,
    ) -> str:
        """Render `messages` with the model's chat template (or `template`, a Jinja source
        given instead, run in the same sandbox), as transformers'
        `apply_chat_template(..., tokenize=False)` does.

        Encode the result with `add_special_tokens=False`: the template writes BOS
        itself. `extra` reaches the template as variables (e.g. `enable_thinking`,
        `documents`). Raises InvalidRequestError when the model has no template or the
        template fails."""
        compiled = self._template(tools) if template is None else _compile(template)
        variables = {**self.special_tokens, "documents": None, **_plain(extra)}
        try:
            return str(
                compiled.render(
                    messages=_prepare_messages(messages),
                    tools=_plain(tools),
                    add_generation_prompt=add_generation_prompt,
                    **variables,
                )
            )
        except Exception as error:
            # The template is untrusted code run on the request's data: whatever it
            # raises (raise_exception, a sandbox SecurityError, a TypeError on an
            # unexpected message shape) fails this request, not the server.
            raise InvalidRequestError(f"chat template error: {error}", param="messages") from error

    def _template(self, tools: list[dict[str, Any]] | None) -> jinja2.Template:
        """The compiled template to use: `tool_use` when tools are given and it exists, else `default`."""
        name = "tool_use" if tools is not None and "tool_use" in self.chat_templates else "default"
        if name not in self.chat_templates:
            raise InvalidRequestError(NO_TEMPLATE_MESSAGE, param="messages")
        if name not in self._compiled:
            self._compiled[name] = _compile(self.chat_templates[name], "the model's chat template")
        return self._compiled[name]

    def _token_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)


def _compile(source: str, what: str = "chat_template") -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateError as error:
        raise InvalidRequestError(f"{what} does not compile: {error}", param="messages") from error


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or `{"content": ...}`."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _special_tokens(config: dict[str, Any], folder: Path) -> dict[str, str]:
    """Named special tokens from tokenizer_config.json, completed by special_tokens_map.json (legacy)."""
    legacy_path = folder / "special_tokens_map.json"
    legacy = read_json(legacy_path) if legacy_path.is_file() else {}
    tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        text = _token_text(config.get(name)) or _token_text(legacy.get(name))
        if text is not None:
            tokens[name] = text
    return tokens


def _chat_templates(folder: Path, config: dict[str, Any]) -> dict[str, str]:
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


def _prepare_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Plain copies of the messages, None-valued keys dropped and reasoning aliased, as transformers does.

    OpenAI clients send `content: null` or `tool_calls: null`; templates handle a
    missing key but many render a literal `None`."""
    prepared = []
    for message in messages:
        if not isinstance(message, dict):
            raise InvalidRequestError(f"chat messages must be objects, got {message!r}", "messages")
        plain = {key: _plain(value) for key, value in message.items() if value is not None}
        reasoning = next((plain[k] for k in REASONING_FIELDS if plain.get(k) is not None), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        prepared.append(plain)
    return prepared


def _plain(value: Any) -> Any:
    """A copy made of plain JSON types only: the sandbox cannot vet the methods of other objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
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
