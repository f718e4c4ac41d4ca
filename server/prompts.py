"""Prompts from request bodies: refused by size before any expensive work, rendered and
tokenized in a worker thread, never on the event loop.

Order of the checks, cheapest first, so that a huge input costs (almost) nothing:
1. token-id lists: their length against the context limit, before any id is read;
2. texts: their length in characters against what the context can hold
   (`max_prompt_chars`), before tokenizing;
3. tokenizing (in a worker thread; `tokenizers` releases the GIL while it works), and
   the number of tokens against the context limit before the ids become a Python list.
The engine then checks the ids against the vocabulary and prompt + output against the
context and the pool.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from loraserve.errors import InvalidRequestError
from loraserve.models.tokenizer import Tokenizer

CHARS_SLACK = 4
"""How many characters per character of vocabulary a text may have before it is refused
untokenized: room for whitespace and normalization that no token spells."""


@dataclass(frozen=True)
class Prompt:
    """One prompt, tokenized (text kept for the engine's outputs when there is one)."""

    text: str | None
    token_ids: list[int]


class PromptBuilder:
    """Token ids of the prompts of one served model, within its context limit."""

    def __init__(self, tokenizer: Tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_prompt_chars = max_model_len * tokenizer.longest_token_chars * CHARS_SLACK
        """Longest text that may still fit the context; longer ones are not tokenized."""

    def num_prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> int:
        """How many prompts a completions `prompt` field holds (OpenAI's four forms)."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            return len(prompt)
        return 1

    async def completion_prompts(
        self, prompt: str | list[str] | list[int] | list[list[int]]
    ) -> list[Prompt]:
        """A completions request's prompts, in order."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise InvalidRequestError("prompt must not be empty", "prompt")
        if isinstance(prompt[0], int):
            return [self._token_prompt(prompt)]  # type: ignore[arg-type]
        if isinstance(prompt[0], list):
            return [self._token_prompt(ids) for ids in prompt]  # type: ignore[arg-type]
        texts: list[str] = prompt  # type: ignore[assignment]
        for text in texts:
            self._check_chars(len(text), "prompt")
        return await asyncio.to_thread(lambda: [self._encode(text, "prompt") for text in texts])

    async def chat_prompt(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool
    ) -> Prompt:
        """The rendered conversation. The template writes BOS itself, so no special tokens
        are added again."""
        self._check_chars(sum(_chars(message) for message in messages), "messages")

        def render() -> Prompt:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt)
            return self._encode(text, "messages", add_special_tokens=False)

        return await asyncio.to_thread(render)

    def _token_prompt(self, token_ids: list[int]) -> Prompt:
        if len(token_ids) >= self.max_model_len:  # before anything reads the ids
            raise _too_long(len(token_ids), self.max_model_len, "prompt")
        return Prompt(None, list(token_ids))

    def _check_chars(self, num_chars: int, param: str) -> None:
        if num_chars > self.max_prompt_chars:
            raise InvalidRequestError(
                f"the {param} has {num_chars} characters; this model's maximum context length "
                f"is {self.max_model_len} tokens, which no text of more than "
                f"{self.max_prompt_chars} characters fits",
                param,
            )

    def _encode(self, text: str, param: str, add_special_tokens: bool = True) -> Prompt:
        """Runs in a worker thread."""
        if not text.isascii():  # isascii is O(1); only other texts can hold a lone surrogate
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:
                raise InvalidRequestError(
                    f"the {param} contains a lone UTF-16 surrogate (U+{ord(error.object[error.start]):04X}), "
                    "which is not a Unicode character",
                    param,
                ) from None
        encoded = self.tokenizer.encode_at_most(text, self.max_model_len - 1, add_special_tokens)
        if encoded.ids is None:
            raise _too_long(encoded.num_tokens, self.max_model_len, param, encoded.exact)
        return Prompt(text, encoded.ids)


def _too_long(
    num_tokens: int, max_model_len: int, param: str, exact: bool = True
) -> InvalidRequestError:
    """The engine's words for the same refusal."""
    return InvalidRequestError(
        f"the prompt has {'' if exact else 'at least '}{num_tokens} tokens; this model's "
        f"maximum context length is {max_model_len} tokens, prompt and output together",
        param,
    )


def _chars(message: dict[str, Any]) -> int:
    """Characters a message brings to the template: its content (the rest is small)."""
    content = message.get("content")
    return len(content) if isinstance(content, str) else 0
