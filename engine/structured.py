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
  checking grammars; llguidance is torch-free, so the front end validates a request's
  grammar in a worker thread and answers a bad one with a 400 before the core sees it;
- it has no compile step: a grammar becomes a matcher in ~1 ms (a cached one is copied
  in 10 us) and masks are computed lazily (xgrammar compiles each schema up front, 5 ms
  for a small one and seconds for large ones);
- its masks cost more per step than xgrammar's precomputed ones (64 rows: 0.8 ms against
  0.09 ms), which is why the runner fills them while the forward pass runs;
- it covers everything asked: JSON schema, regex, choice, Lark and GBNF grammars.

Every grammar is a Lark grammar with `no_forcing` (see GRAMMAR_OPTIONS). JSON whitespace
is flexible but bounded (`JSON_WHITESPACE`): a model may lay its JSON out
as it learned to, but cannot fill its whole budget with blanks between two tokens.

This module imports no torch: the front end uses `StructuredOutputs` and `check_grammar`.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.numpy as llguidance_numpy
import numpy as np

from loraserve.errors import InvalidRequestError

JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,20}"
"""Whitespace allowed between two JSON tokens: enough to indent nested JSON, never unbounded."""
GRAMMAR_OPTIONS = '%llguidance {"no_forcing": true}\n'
"""Every token whose text the grammar admits is allowed, not only the canonical tokenization
of text the grammar forces: so a constraint that admits the unconstrained answer leaves
its tokens unchanged (llguidance would otherwise force e.g. `HER` where the model says `H`)."""
EMPTY_OPTIONS = "%llguidance {}\n"
MAX_CACHED_GRAMMARS = 256
"""Compiled grammars kept in the core (least recently used dropped first)."""
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
    empty: none, compact JSON)."""

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

    @property
    def kind(self) -> str:
        return next(name for name in KINDS if getattr(self, name) not in (None, False))

    def to_grammar(self) -> str:
        """This constraint as one llguidance Lark grammar (checked by `check_grammar`)."""
        kind = self.kind
        if kind in ("json", "json_object"):
            schema = json.loads(str(self.json)) if kind == "json" else {"type": "object"}
            if not isinstance(schema, dict):
                raise InvalidRequestError("a JSON schema must be an object", kind)
            options: dict[str, Any] = {"whitespace_pattern": self.whitespace_pattern}
            if self.whitespace_pattern is None:
                options = {"whitespace_pattern": JSON_WHITESPACE}
            elif not self.whitespace_pattern:  # none at all: compact JSON
                options = {"whitespace_flexible": False}
            schema["x-guidance"] = {**options, **schema.get("x-guidance", {})}
            body = "start: %json " + json.dumps(schema)
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


def check_grammar(grammar: str, param: str) -> None:
    """InvalidRequestError (naming `param`) unless llguidance accepts `grammar`.
    Costs up to the grammar's compilation: the front end runs it in a worker thread."""
    message = llguidance.LLMatcher.validate_grammar(grammar)
    if message:
        raise InvalidRequestError(f"{param}: {message.strip()}", param)


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
        return str(self.matcher.get_error())


class GrammarCompiler:
    """The core's grammars: one tokenizer for llguidance, compiled grammars cached."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        """`tokenizer_json`: the model's tokenizer.json text; `vocab_size`: the width of
        the logits (masks cover it; ids the tokenizer lacks are never allowed)."""
        self._tokenizer = llguidance.LLTokenizer(
            tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids)
        )
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._executor = llguidance.LLExecutor()

    def grammar_for(self, constraint: StructuredOutputs) -> RequestGrammar:
        """A fresh matcher for `constraint`; InvalidRequestError if it does not compile."""
        grammar = constraint.to_grammar()
        initial = self._cache.get(grammar)
        if initial is None:
            initial = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
            if initial.is_error():
                raise InvalidRequestError(
                    f"{constraint.kind}: {initial.get_error()}", constraint.kind
                )
            self._cache[grammar] = initial
            if len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        self._cache.move_to_end(grammar)
        return RequestGrammar(initial.deep_copy(), self)

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
