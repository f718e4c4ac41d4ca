"""Turn a request's generated tokens into text, one delta per token, with stop strings.

Decoding token by token (`decode([t])`) is wrong for the tokenizers in use: byte-level
BPE splits one UTF-8 character over several tokens, and SentencePiece decoders drop
the leading space of the first token of what they decode. So, as in vLLM, every
step decodes a short window twice and emits the difference:

    ids = last prompt tokens + output tokens
    prefix_text = decode(ids[prefix_offset:read_offset])    # already emitted
    new_text    = decode(ids[prefix_offset:])
    delta       = new_text[len(prefix_text):]   unless new_text ends in U+FFFD

A window that ends in U+FFFD is an incomplete UTF-8 character (byte-level BPE
shows the missing bytes that way): nothing is emitted and the offsets stay, so
the next token completes it. Once emitted, prefix_offset moves to read_offset
and read_offset to the end, so the window stays a few tokens long.

Example, byte-level BPE, "é" = bytes c3 a9 in two tokens: after c3 the window
decodes to "\\ufffd" (held back); after a9 to "é", the delta.

Invariant (tested): the concatenated deltas plus `flush()` equal
`tokenizer.decode(output_ids)` when no stop string matched, for byte-level BPE.
Decoders that strip the leading space of their first token (SentencePiece)
instead give the text as it reads after the prompt (" world" after "Hello"),
which is what a completion should return; vLLM does the same.

Stop strings: text that could be the start of a stop string is held back until
it either completes the stop string (the request stops and the text is cut
before it, or after it with `include_stop_str_in_output`) or stops matching.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from loraserve.engine.core.sampling_params import SamplingParams

PROMPT_CONTEXT_TOKENS = 5
"""Prompt tokens decoded along with the first outputs, so that merges across the
prompt/output boundary (leading spaces) come out as they read after the prompt."""

_INCOMPLETE = "\ufffd"  # what decode shows for a partial UTF-8 sequence


class TokenDecoder(Protocol):
    """The one thing the detokenizer needs of a tokenizer."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Text deltas of one sequence, token by token, honouring stop strings."""

    def __init__(
        self,
        tokenizer: TokenDecoder,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stop_reason: str | None = None
        """The stop string that ended the text, once one has matched."""
        context = list(prompt_token_ids[max(len(prompt_token_ids) - PROMPT_CONTEXT_TOKENS, 0) :])
        self._ids: list[int] = context  # prompt context + output tokens
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._decoded = ""  # output text decoded so far, including what is held back
        self._emitted = 0  # characters of _decoded already returned

    @classmethod
    def from_params(
        cls, tokenizer: TokenDecoder, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> IncrementalDetokenizer:
        """The detokenizer for a request with these sampling params."""
        return cls(
            tokenizer,
            prompt_token_ids,
            params.skip_special_tokens,
            params.stop,
            params.include_stop_str_in_output,
        )

    @property
    def stopped(self) -> bool:
        """Whether a stop string has matched; no more tokens may be added."""
        return self.stop_reason is not None

    @property
    def text(self) -> str:
        """All text returned so far: the concatenation of every delta."""
        return self._decoded[: self._emitted]

    def add_token(self, token_id: int) -> str:
        """Take the next generated token; return the text that can be shown now."""
        assert not self.stopped, "add_token after a stop string matched"
        self._ids.append(token_id)
        searched_up_to = len(self._decoded)
        self._decoded += self._decode_step()
        self._check_stop(searched_up_to)
        return self._emit(final=self.stopped)

    def flush(self) -> str:
        """The text still held back, when the request ends for another reason."""
        if not self.stopped:
            prefix_text, new_text = self._window_texts()
            self._decoded += new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset = len(self._ids)
        return self._emit(final=True)

    def _window_texts(self) -> tuple[str, str]:
        """Decoded text of the window up to read_offset, and up to the end."""
        window = self._ids[self._prefix_offset :]
        prefix_text = self.tokenizer.decode(
            window[: self._read_offset - self._prefix_offset],
            skip_special_tokens=self.skip_special_tokens,
        )
        new_text = self.tokenizer.decode(window, skip_special_tokens=self.skip_special_tokens)
        return prefix_text, new_text

    def _decode_step(self) -> str:
        """The new text of the last token(s), or "" while a character is incomplete."""
        prefix_text, new_text = self._window_texts()
        if len(new_text) <= len(prefix_text) or new_text.endswith(_INCOMPLETE):
            return ""  # nothing new (skipped special token) or a character not yet complete
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]

    def _check_stop(self, searched_up_to: int) -> None:
        """Find the earliest stop string in the new text; cut the text there."""
        if not self.stop:
            return
        longest = max(len(stop) for stop in self.stop)
        # A match not found before must end in the new text; none starts before _emitted.
        start = max(self._emitted, searched_up_to - longest + 1)
        best: tuple[int, int, str] | None = None
        for stop in self.stop:
            index = self._decoded.find(stop, start)
            if index >= 0 and (best is None or (index, len(stop)) < best[:2]):
                best = (index, len(stop), stop)
        if best is None:
            return
        index, length, self.stop_reason = best
        end = index + length if self.include_stop_str_in_output else index
        self._decoded = self._decoded[:end]

    def _emit(self, final: bool) -> str:
        """Return the decoded text not yet returned, minus a possible stop-string start."""
        end = len(self._decoded) if final else len(self._decoded) - self._held_back()
        delta = self._decoded[self._emitted : end]
        self._emitted = end
        return delta

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        # Never reaches into emitted text: a stop string starting there would have
        # been held back when that text was emitted.
        pending = len(self._decoded) - self._emitted
        tail_limit = min(pending, max((len(stop) for stop in self.stop), default=0))
        for length in range(tail_limit, 0, -1):
            tail = self._decoded[-length:]
            if any(stop.startswith(tail) and stop != tail for stop in self.stop):
                return length
        return 0
