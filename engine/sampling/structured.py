"""Structured output: what a request's text must match, and the matcher that keeps it there.

A request may constrain its output to a JSON schema (or any JSON object), a regular
expression, one of a list of strings, or a context-free grammar (Lark or GBNF), as
vLLM's `structured_outputs` and OpenAI's `response_format` ask. `StructuredOutputs`
says which; `to_grammar()` turns it into one llguidance grammar. In the engine core, a
`GrammarCompiler` (one per model: the tokenizer's byte strings, a cache of compiled
grammars) gives each such request a `RequestGrammar`; the runner asks it for the mask
of tokens allowed next (computed while the forward pass runs), the sampler sets the
others to -inf, and the core's postprocess advances it with the token chosen.

Why llguidance rather than xgrammar or outlines-core (figures and command in
bench/results/2026-11-30-grammar-engines.txt, SmolLM2's 49,152-token vocabulary):
- it depends on nothing: xgrammar imports torch and transformers when imported (1.9 s),
  which would make transformers a server dependency and keep the front end from
  checking grammars; llguidance is torch-free, so the front end compiles a request's
  grammar (in a child process) and answers a bad one with a 400 before the core sees it;
- it has no compile step: a grammar becomes a matcher in ~1 ms (a cached one is copied
  in 10 us) and masks are computed lazily (xgrammar compiles each schema up front, 5 ms
  for a small one and seconds for large ones);
- its masks cost more per step than xgrammar's precomputed ones (64 rows: 0.8 ms against
  0.09 ms), which is why the runner fills them while the forward pass runs;
- it covers everything asked: JSON schema, regex, choice, Lark and GBNF grammars.

Every grammar is a Lark grammar with `no_forcing` (see GRAMMAR_OPTIONS). JSON whitespace
is flexible but bounded (`JSON_WHITESPACE`): a model may lay its JSON out
as it learned to, but cannot fill its whole budget with blanks between two tokens.

This module imports no torch: the front end checks each constraint with a `GrammarCompiler`
of its own, in a child process (server/grammar_check.py says why).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.numpy as llguidance_numpy
import numpy as np

from loraserve.errors import InvalidRequestError

logger = logging.getLogger(__name__)

JSON_WHITESPACE = r"(?:\x0A\x20{0,8}|\x20)?"
"""Whitespace allowed between two JSON tokens: one space, or a line break and an indent of up
to 8 spaces (four levels of two). OpenAI's strict mode emits compact JSON, and models
pretty-print with one break and an indent per gap, so this costs a model nothing it writes;
a weak model that takes every blank the grammar allows spends at most 9 tokens per gap, so
`{"city": "Paris"}` (4 gaps) closes within 45 tokens whatever it does. Measured on the demo
(SmolLM2-135M, greedy, "What is the capital of France? Reply in JSON.", max_tokens 60): the
base model and every demo adapter answer as before (6-10 tokens; `caps` loops inside the
string under any bound), and a random adapter (B std 0.1 on all seven modules) closes in 10
tokens, where the old bound (20 blanks of any kind per gap) let it write tabs for 49 and
one of `\x0a?[\x20\x09]{0,8}` for 34."""
MAX_WHITESPACE_CHARS = 9
"""Most characters a request's own `whitespace_pattern` may match per gap (JSON_WHITESPACE's)."""
GRAMMAR_OPTIONS = '%llguidance {"no_forcing": true}\n'
"""Every token whose text the grammar admits is allowed, not only the canonical tokenization
of text the grammar forces: so a constraint that admits the unconstrained answer leaves
its tokens unchanged (llguidance would otherwise force e.g. `HER` where the model says `H`)."""
EMPTY_OPTIONS = "%llguidance {}\n"
MAX_CACHED_GRAMMARS = 256
"""Compiled grammars kept in the core (least recently used dropped first)."""
MAX_ERROR_CHARS = 200
"""Longest llguidance error message shown to a client (the rest goes to the debug log)."""
KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputs:
    """One constraint on a request's output text (exactly one field set), as vLLM's
    `StructuredOutputsParams`."""

    json: str | dict[str, Any] | None = None
    """A JSON schema (object or its JSON text): the output is one JSON value valid under it."""
    regex: str | None = None
    """The output matches this regular expression (Rust `regex` syntax), whole."""
    choice: list[str] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """A context-free grammar, in Lark or GBNF (llama.cpp's) syntax."""
    json_object: bool = False
    """The output is any JSON object (OpenAI's `response_format: json_object`)."""
    whitespace_pattern: str | None = None
    """Regex of the whitespace allowed between JSON tokens (default `JSON_WHITESPACE`;
    empty: none, compact JSON); it may match at most `MAX_WHITESPACE_CHARS` characters."""
    disable_additional_properties: bool = False
    """Objects of the schema that do not say `additionalProperties` get it false (vLLM's)."""

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):
            self.json = json.dumps(self.json)
        chosen = [name for name in KINDS if getattr(self, name) not in (None, False)]
        if len(chosen) != 1:
            raise InvalidRequestError(
                f"structured output needs exactly one of {', '.join(KINDS)}, got "
                f"{', '.join(chosen) or 'none'}",
                "structured_outputs",
            )
        if self.choice is not None and not (
            self.choice and all(isinstance(item, str) and item for item in self.choice)
        ):
            raise InvalidRequestError(
                "choice must be a non-empty list of non-empty strings", "structured_outputs"
            )
        self._check_json_options()

    def _check_json_options(self) -> None:
        """A request may not lift the server's bound on whitespace (JSON_WHITESPACE says why)."""
        if isinstance(self.json, str) and '"x-guidance"' in self.json:
            schema = json.loads(self.json)
            if isinstance(schema, dict) and "x-guidance" in schema:
                raise InvalidRequestError(
                    "x-guidance in a JSON schema is not accepted: this server sets llguidance's "
                    "options itself (use whitespace_pattern or disable_any_whitespace)",
                    "json",
                )
        if self.whitespace_pattern:
            widest = _widest_match(self.whitespace_pattern)
            if widest > MAX_WHITESPACE_CHARS:
                raise InvalidRequestError(
                    f"whitespace_pattern may match at most {MAX_WHITESPACE_CHARS} characters "
                    "between two JSON tokens (a weak model would fill its budget with blanks)",
                    "whitespace_pattern",
                )

    def source_bytes(self) -> int:
        """The size of what the request sent, in UTF-8 bytes (the server bounds it)."""
        texts = [str(self.json or ""), self.regex or "", self.grammar or "", *(self.choice or ())]
        return sum(len(text.encode("utf-8", "replace")) for text in texts)

    @property
    def kind(self) -> str:
        return next(name for name in KINDS if getattr(self, name) not in (None, False))

    def _json_schema(self) -> dict[str, Any]:
        """The schema with the server's formatting options (`x-guidance`, which llguidance
        reads at the top level only; a request's own is refused in `__post_init__`)."""
        schema = json.loads(str(self.json)) if self.json is not None else {"type": "object"}
        if not isinstance(schema, dict):
            raise InvalidRequestError("a JSON schema must be an object", self.kind)
        if self.disable_additional_properties:
            close_objects(schema)
        options: dict[str, Any] = {"whitespace_pattern": self.whitespace_pattern}
        if self.whitespace_pattern is None:
            options = {"whitespace_pattern": JSON_WHITESPACE}
        elif not self.whitespace_pattern:  # none at all: compact JSON
            options = {"whitespace_flexible": False}
        schema["x-guidance"] = options
        return schema

    def to_grammar(self) -> str:
        """This constraint as one llguidance Lark grammar."""
        kind = self.kind
        if kind in ("json", "json_object"):
            body = "start: %json " + json.dumps(self._json_schema())
        elif kind == "regex":
            regex_grammar = json.loads(llguidance.LLMatcher.grammar_from_regex(str(self.regex)))
            body = regex_grammar["grammars"][0]["lark_grammar"]
        elif kind == "choice":
            body = llguidance.grammar_from("choice", json.dumps(self.choice))
        else:
            try:
                body = llguidance.grammar_from("grammar", str(self.grammar))
            except ValueError as error:
                raise InvalidRequestError(str(error), "grammar") from None
            body = body.removeprefix(EMPTY_OPTIONS)
        return GRAMMAR_OPTIONS + body


def close_objects(schema: dict[str, Any]) -> None:
    """Set `additionalProperties: false` on every object schema that does not say (in place;
    a loop, not recursion: a schema may be as deep as a body can nest)."""
    pending: list[Any] = [schema]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            if node.get("type") == "object" or "properties" in node:
                node.setdefault("additionalProperties", False)
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)


def _widest_match(pattern: str) -> int:
    """The most characters `pattern` can match (Python's reading of it; Rust's `regex`, which
    llguidance uses, agrees on what whitespace patterns use); unbounded if unreadable."""
    try:
        return int(re._parser.parse(pattern).getwidth()[1])  # type: ignore[attr-defined]
    except (re.error, RecursionError, OverflowError):
        return sys.maxsize


def public_error(message: str) -> str:
    """llguidance's error as a client may read it: its first line, without the parser state
    and compiled grammar that follow (those are logged at debug level)."""
    if message.startswith("NoExtensionBias"):
        return "the constraint admits no output (no token, nor the end, can come first)"
    if "Current row has" in message:  # "... consider making your grammar left-recursive"
        return "the constraint is too wide for this server's parser (over 2,000 items in a row)"
    first = message.strip().split("\n", 1)[0].split("<state>", 1)[0].strip()
    if len(first) > MAX_ERROR_CHARS:
        first = first[:MAX_ERROR_CHARS] + "..."
    return first or "llguidance refused the constraint"


def _refused(constraint: StructuredOutputs, message: str) -> InvalidRequestError:
    logger.debug("refused %s constraint: %s", constraint.kind, message)
    return InvalidRequestError(f"{constraint.kind}: {public_error(message)}", constraint.kind)


def allowed_token_ids(mask: np.ndarray) -> np.ndarray:
    """The token ids whose bit is set in one row of a bitmask (`GrammarCompiler.fill_masks`)."""
    bits = np.unpackbits(np.ascontiguousarray(mask, dtype="<i4").view(np.uint8), bitorder="little")
    return np.flatnonzero(bits)


class RequestGrammar:
    """One request's place in its grammar: what may come next, advanced token by token."""

    def __init__(self, matcher: llguidance.LLMatcher, compiler: GrammarCompiler) -> None:
        self.matcher = matcher
        self.compiler = compiler

    def accept(self, token_id: int) -> bool:
        """Advance by the token the sampler chose; False if the grammar refuses it."""
        return bool(self.matcher.consume_token(token_id)) and not self.matcher.is_error()

    @property
    def finished(self) -> bool:
        """Whether the grammar is complete and admits nothing more (the request stops)."""
        return bool(self.matcher.is_stopped())

    @property
    def error(self) -> str:
        """Why the grammar stopped, as a client may read it (the parser state: debug log)."""
        message = str(self.matcher.get_error())
        logger.debug("grammar error: %s", message)
        return public_error(message)


class GrammarCompiler:
    """The core's grammars: one tokenizer for llguidance, compiled grammars cached."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        """`tokenizer_json`: the model's tokenizer.json text; `vocab_size`: the width of
        the logits (masks cover it; ids the tokenizer lacks are never allowed)."""
        self._tokenizer = llguidance.LLTokenizer(
            tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids)
        )
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._cache_lock = threading.Lock()
        """The engine core compiles on a thread of its own (llguidance lets the GIL go)."""
        self._executor = llguidance.LLExecutor()

    def grammar_for(self, constraint: StructuredOutputs) -> RequestGrammar:
        """A fresh matcher for `constraint`; InvalidRequestError if it does not compile.
        Compiled once (cached); safe to call from two threads."""
        grammar = constraint.to_grammar()
        with self._cache_lock:
            initial = self._cache.get(grammar)
        if initial is None:
            initial = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
            if initial.is_error():
                raise _refused(constraint, initial.get_error())
        with self._cache_lock:
            self._cache[grammar] = initial
            self._cache.move_to_end(grammar)
            if len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return RequestGrammar(initial.deep_copy(), self)

    def first_mask(self, constraint: StructuredOutputs) -> np.ndarray:
        """The bitmask (`[ceil(vocab_size / 32)]` int32) of the tokens `constraint` allows
        first; InvalidRequestError if it does not compile or admits nothing (not even EOS,
        e.g. `{"$ref": "#"}`), or if llguidance gives up on it (too many lexer states)."""
        grammar = self.grammar_for(constraint)
        mask = self.fill_masks([grammar])[0]
        if grammar.matcher.is_error():
            raise _refused(constraint, grammar.error)
        if not mask.any():
            raise _refused(constraint, "NoExtensionBias")
        return mask

    def fill_masks(self, grammars: Sequence[RequestGrammar]) -> np.ndarray:
        """The allowed-token bitmask of each grammar's next token (grammars of this
        compiler), `[len(grammars), ceil(vocab_size / 32)]` int32 (bit t % 32 of word t // 32 set =
        token t allowed), computed on llguidance's threads without the GIL."""
        bitmask = llguidance_numpy.allocate_token_bitmask(len(grammars), self._tokenizer.vocab_size)
        matchers = [(grammar.matcher, row) for row, grammar in enumerate(grammars)]
        llguidance_numpy.fill_next_token_bitmask_par(self._executor, matchers, bitmask)
        return bitmask


def fill_masks(grammars: Sequence[RequestGrammar]) -> np.ndarray:
    """`GrammarCompiler.fill_masks` of the grammars' compiler (one per engine)."""
    return grammars[0].compiler.fill_masks(grammars)
