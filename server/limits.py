"""How much one request may ask for: counts and sizes the server refuses (HTTP 400) before
any work is done for it.

`SamplingParams` (engine/core/sampling_params.py) bounds each value to what the sampler can
compute; these limits bound how *many* things one request may bring (completions,
prompts, stop strings), so that no single request can hold the engine thread, the
event loop or memory for long. Each field is a `loraserve serve` option.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields

from loraserve.engine.sampling.structured import StructuredOutputs
from loraserve.errors import InvalidRequestError


@dataclass(frozen=True)
class RequestLimits:
    """Limits on what one request may ask for (above them: HTTP 400)."""

    max_n: int = 128
    """Most completions per prompt (`n`, and `best_of`); each is a request for the engine."""
    max_prompts_per_request: int = 256
    """Most prompts in one /v1/completions request (a list of texts or of token-id lists)."""
    max_sequences_per_request: int = 1024
    """Most sequences one request may queue: its prompts times `n` (or `best_of`), checked before anything is queued (the waiting queue then takes all or none)."""
    max_stop_strings: int = 64
    """Most `stop` strings per request (each is checked against the text at every token)."""
    max_stop_string_chars: int = 1024
    """Longest `stop` string, in characters."""
    max_stop_token_ids: int = 1024
    """Most `stop_token_ids` per request."""
    max_token_constraints: int = 4096
    """Most entries of each of `logit_bias`, `allowed_token_ids` and `bad_words` per request (the sampler reads them every step)."""
    max_grammar_bytes: int = 65536
    """Largest output constraint, in UTF-8 bytes: a grammar, a regex, a JSON schema (as JSON), `guided_choice` (all its strings) or the schema `tools` make (the engine compiles it between two steps: ~1 ms per KB)."""
    max_grammar_rules: int = 1024
    """Most rule definitions in a Lark or GBNF grammar (`guided_grammar`)."""
    max_guided_choices: int = 1024
    """Most strings in `guided_choice` (llguidance's parser gives up past 2,000 items in a row)."""
    max_grammar_alternatives: int = 1024
    """Most alternatives (`|`) in a Lark or GBNF grammar, for the same reason."""
    max_tools: int = 128
    """Most `tools` in one chat request (OpenAI's own limit)."""
    max_schema_branches: int = 128
    """Most branches of one `anyOf` / `oneOf` in a JSON schema: llguidance's parser holds ~15 items a branch in one row and gives up past 2,000, at the token that opens the choice (a failure mid-answer, not a 400, if let through)."""

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field.name} must be an integer >= 1, got {value!r}")

    def check_n(self, n: int, num_prompts: int, param: str = "n") -> None:
        """`n` completions of each of `num_prompts` prompts."""
        _at_most(n, self.max_n, param, "completions per prompt")
        _at_most(num_prompts, self.max_prompts_per_request, "prompt", "prompts per request")
        _at_most(n * num_prompts, self.max_sequences_per_request, param, "sequences (prompts x n)")

    def check_stops(self, stop: str | Sequence[str] | None, stop_token_ids: Sequence[int]) -> None:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        _at_most(len(stops), self.max_stop_strings, "stop", "stop strings")
        longest = max((len(text) for text in stops), default=0)
        _at_most(longest, self.max_stop_string_chars, "stop", "characters in a stop string")
        _at_most(len(stop_token_ids), self.max_stop_token_ids, "stop_token_ids", "stop token ids")

    def check_token_lists(self, *lists: Sequence[object] | dict[str, float] | None) -> None:
        """`allowed_token_ids`, `logit_bias` and `bad_words`, in that order."""
        for name, values in zip(
            ("allowed_token_ids", "logit_bias", "bad_words"), lists, strict=True
        ):
            _at_most(len(values or ()), self.max_token_constraints, name, "entries")

    def check_constraint(self, constraint: StructuredOutputs, param: str) -> None:
        """An output constraint's size, before anything compiles it."""
        _at_most(constraint.source_bytes(), self.max_grammar_bytes, param, "bytes of constraint")
        _at_most(len(constraint.choice or ()), self.max_guided_choices, param, "choices")
        if constraint.grammar is not None:
            rules = len(RULE_DEFINITION.findall(constraint.grammar))
            _at_most(rules, self.max_grammar_rules, param, "grammar rules")
            alternatives = constraint.grammar.count("|")  # in literals too: errs on the safe side
            _at_most(alternatives, self.max_grammar_alternatives, param, "grammar alternatives")
        if constraint.json is not None:
            branches = widest_branching(_parsed(constraint.json))
            _at_most(branches, self.max_schema_branches, param, "anyOf/oneOf branches")

    def check_tools(self, tools: Sequence[object] | None) -> None:
        _at_most(len(tools or ()), self.max_tools, "tools", "tools")


RULE_DEFINITION = re.compile(
    r"^[ \t]*[?!]?[A-Za-z_][\w-]*(?:\.-?\d+)?[ \t]*(?::|::=)", re.MULTILINE
)
"""The start of a rule (or terminal) definition in Lark (`name:`, `?name.2:`) or GBNF (`name ::=`)."""


def _parsed(schema: str) -> object:
    """A JSON schema's text (StructuredOutputs keeps it as text), parsed; None if it is not
    JSON (llguidance refuses it then, with its own message)."""
    try:
        return json.loads(schema)
    except ValueError:
        return None


def widest_branching(schema: object) -> int:
    """The most branches of any `anyOf` / `oneOf` list in a JSON schema (walked iteratively:
    a schema may be nested deeper than Python's recursion allows)."""
    widest, pending = 0, [schema]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("anyOf", "oneOf") and isinstance(value, list):
                    widest = max(widest, len(value))
                pending.append(value)
        elif isinstance(node, list):
            pending.extend(node)
    return widest


def _at_most(value: int, limit: int, param: str, what: str) -> None:
    if value > limit:
        raise InvalidRequestError(
            f"{param}: this server allows at most {limit} {what}, got {value}", param
        )
