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
import json
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Tokenizing:
    """How a request's prompt becomes tokens (vLLM's request options)."""

    add_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    """Keep only the last this many tokens (-1: as many as the context holds)."""


@dataclass(frozen=True)
class ChatRendering:
    """How a conversation is rendered (vLLM's chat options)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    """End the prompt inside the last (assistant) message, for the model to continue it."""
    tools: list[dict[str, Any]] | None = None
    template: str | None = None
    """A Jinja template used instead of the model's."""
    variables: dict[str, Any] = field(default_factory=dict)
    """More template variables (`chat_template_kwargs`, `documents`, ...)."""
    describe_tools: bool = False
    """Describe `tools` in the system message (`TOOLS_PROMPT`) if the template never shows them."""


TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""
"""How tools are described to a model whose chat template never shows them: the words of
Qwen2.5's and Hermes' templates, whose `<tool_call>` format `--tool-call-parser hermes`
reads (transformers and vLLM leave such a model unaware of its tools); so only with that
parser and `tool_choice: auto`."""


def with_tools_described(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """`messages` with `TOOLS_PROMPT` at the end of the system message (one is added first
    if there is none)."""
    described = TOOLS_PROMPT.format(tools="\n".join(json.dumps(tool) for tool in tools))
    if messages and messages[0].get("role") == "system":
        system = messages[0]
        content = f"{system.get('content') or ''}\n\n{described}".lstrip()
        return [{**system, "content": content}, *messages[1:]]
    return [{"role": "system", "content": described}, *messages]


class PromptBuilder:
    """Token ids of the prompts of one served model, within its context limit."""

    def __init__(
        self, tokenizer: Tokenizer, max_model_len: int, chat_template: str | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.chat_template = chat_template
        """The server's template (`--chat-template`), used instead of the model's."""
        self.max_prompt_chars = max_model_len * tokenizer.longest_token_chars * CHARS_SLACK
        """Longest text that may still fit the context; longer ones are not tokenized."""

    def num_prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> int:
        """How many prompts a completions `prompt` field holds (OpenAI's four forms)."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            return len(prompt)
        return 1

    async def completion_prompts(
        self,
        prompt: str | list[str] | list[int] | list[list[int]],
        tokenizing: Tokenizing = Tokenizing(),
    ) -> list[Prompt]:
        """A completions request's prompts, in order."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise InvalidRequestError("prompt must not be empty", "prompt")
        if isinstance(prompt[0], int):
            return [self._token_prompt(prompt, tokenizing)]  # type: ignore[arg-type]
        if isinstance(prompt[0], list):
            return [self._token_prompt(ids, tokenizing) for ids in prompt]  # type: ignore[arg-type]
        texts: list[str] = prompt  # type: ignore[assignment]
        if tokenizing.truncate_prompt_tokens is None:
            for text in texts:
                self._check_chars(len(text), "prompt")
        return await asyncio.to_thread(
            lambda: [self._encode(text, "prompt", tokenizing) for text in texts]
        )

    async def chat_prompt(
        self,
        messages: list[dict[str, Any]],
        rendering: ChatRendering = ChatRendering(),
        tokenizing: Tokenizing = Tokenizing(add_special_tokens=False),
    ) -> Prompt:
        """The rendered conversation. The template writes BOS itself, so by default no
        special tokens are added again."""
        if tokenizing.truncate_prompt_tokens is None:
            self._check_chars(sum(_chars(message) for message in messages), "messages")

        def render() -> Prompt:
            text = self.render(messages, rendering)
            return self._encode(text, "messages", tokenizing)

        return await asyncio.to_thread(render)

    def render(self, messages: list[dict[str, Any]], rendering: ChatRendering) -> str:
        """The conversation as text (in a worker thread: templates are slow)."""
        if rendering.continue_final_message and rendering.add_generation_prompt:
            raise InvalidRequestError(
                "continue_final_message and add_generation_prompt cannot both be true",
                "continue_final_message",
            )
        if (
            rendering.tools
            and rendering.describe_tools
            and "tools" not in self._template_source(rendering)
        ):
            messages = with_tools_described(messages, rendering.tools)
        text = self.tokenizer.apply_chat_template(
            messages,
            rendering.add_generation_prompt,
            rendering.tools,
            template=rendering.template or self.chat_template,
            **rendering.variables,
        )
        if rendering.continue_final_message:
            text = _open_final_message(text, messages)
        return text

    def _template_source(self, rendering: ChatRendering) -> str:
        """The Jinja source that will render this conversation."""
        source = rendering.template or self.chat_template
        if source is None:
            templates = self.tokenizer.chat_templates
            source = templates.get("tool_use" if rendering.tools else "default")
            source = source or templates.get("default", "")
        return source

    def _token_prompt(self, token_ids: list[int], tokenizing: Tokenizing) -> Prompt:
        keep = self._keep(tokenizing)
        if keep is not None:
            token_ids = token_ids[-keep:]
        if len(token_ids) >= self.max_model_len:  # before anything reads the ids
            raise _too_long(len(token_ids), self.max_model_len, "prompt")
        return Prompt(None, list(token_ids))

    def _keep(self, tokenizing: Tokenizing) -> int | None:
        """How many last tokens truncation keeps (None: no truncation)."""
        keep = tokenizing.truncate_prompt_tokens
        if keep is None:
            return None
        if keep == -1 or keep >= self.max_model_len:
            return self.max_model_len - 1
        if keep == 0:
            raise InvalidRequestError(
                "truncate_prompt_tokens must be >= 1 or -1", "truncate_prompt_tokens"
            )
        return keep

    def _check_chars(self, num_chars: int, param: str) -> None:
        if num_chars > self.max_prompt_chars:
            raise InvalidRequestError(
                f"the {param} has {num_chars} characters; this model's maximum context length "
                f"is {self.max_model_len} tokens, which no text of more than "
                f"{self.max_prompt_chars} characters fits",
                param,
            )

    def _encode(self, text: str, param: str, tokenizing: Tokenizing) -> Prompt:
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
        add_special_tokens = tokenizing.add_special_tokens
        keep = self._keep(tokenizing)
        if keep is not None:  # truncated prompts are tokenized whole, then cut
            ids = self.tokenizer.encode(text, add_special_tokens)[-keep:]
            return Prompt(text, ids)
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


def _open_final_message(text: str, messages: list[dict[str, Any]]) -> str:
    """`text` cut just after the final message's content (transformers' rule for
    `continue_final_message`), so that the model continues that message."""
    final = messages[-1].get("content") if messages else None
    if not isinstance(final, str) or not final.strip():
        raise InvalidRequestError(
            "continue_final_message needs a final message with text content", "messages"
        )
    location = text.rfind(final.strip())
    if location < 0:
        raise InvalidRequestError(
            "continue_final_message: the chat template does not show the final message verbatim",
            "messages",
        )
    if text[location : location + len(final)] == final:
        return text[: location + len(final)]
    return text[: location + len(final.strip())]


def _chars(message: dict[str, Any]) -> int:
    """Characters a message brings to the template: its content (the rest is small)."""
    content = message.get("content")
    return len(content) if isinstance(content, str) else 0
