"""The model's tokenizer (`tokenizer.json`, via `tokenizers`) and its chat template
(models/chat_template.py renders it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import Tokenizer as RustTokenizer

from loraserve.errors import InvalidRequestError, ModelLoadError
from loraserve.models.chat_template import (
    compile_template,
    find_templates,
    plain,
    prepare_messages,
)
from loraserve.models.hf_config import model_folder, read_json

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
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
        return cls(backend, special_tokens, find_templates(path, config))

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
        compiled = self._template(tools) if template is None else compile_template(template)
        variables = {**self.special_tokens, "documents": None, **plain(extra)}
        try:
            return str(
                compiled.render(
                    messages=prepare_messages(messages),
                    tools=plain(tools),
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
            self._compiled[name] = compile_template(
                self.chat_templates[name], "the model's chat template"
            )
        return self._compiled[name]

    def _token_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)


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
