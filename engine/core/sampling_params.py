"""Per-request sampling parameters, with vLLM's names, defaults and meanings.

A `SamplingParams` is built once per request (by the server from the OpenAI
body, or directly by a library user) and validated on construction: a bad value
raises `InvalidRequestError` naming the field, the value and the allowed range,
which the server turns into a 400 with `param` set.

Every value must be one the sampler can compute with in float32, so that no
request can make a step fail (vLLM's ranges, narrowed where float32 needs it):
- `temperature` in [0, `MAX_TEMPERATURE`] (vLLM: >= 0, no upper bound; OpenAI: 0..2).
  Above 100 a float32 softmax is as flat as it gets; at 1e39 the value is infinite in
  float32 and -inf / inf is NaN. Below `GREEDY_EPSILON` the request is greedy:
  argmax, and top_k / top_p / min_p / seed play no part.
- `top_p` in (0, 1]. A value so small that float32 rounds it to 0 still keeps the
  most likely token: the sampler always keeps it (see sampler.py).
- `top_k` 0 and -1 both mean "off" (vLLM accepts both); otherwise 1..`MAX_TOP_K` (int32).
- `repetition_penalty` in [`MIN_REPETITION_PENALTY`, 2]: vLLM's (0, 2], with a
  floor, since dividing a logit by 1e-38 overflows float32.
- `presence_penalty`, `frequency_penalty` in [-2, 2] (OpenAI's and vLLM's).
- `logprobs` is limited to `MAX_LOGPROBS` (20, vLLM's default `max_logprobs`).
- `max_tokens` >= 1 or None, as in vLLM (0 is refused, not read as "no limit").
- `logit_bias` values in [-100, 100] (OpenAI's range); `prompt_logprobs` as `logprobs`.
- Token ids (`stop_token_ids`, `allowed_token_ids`, `logit_bias` keys, `bad_words`) are
  checked against the model's vocabulary by the engine, which knows it.
Counts and lengths (how many stop strings, how large `n`) are the server's limits
(server/limits.py): a library caller may ask for what its machine can hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from loraserve.engine.sampling.structured import StructuredOutputs
from loraserve.errors import InvalidRequestError

GREEDY_EPSILON = 1e-5
"""Temperatures below this are greedy; dividing logits by them would only overflow."""

MAX_LOGPROBS = 20
"""Most top logprobs a request may ask for per generated token."""

MAX_TEMPERATURE = 100.0
"""Highest temperature; hotter only flattens the distribution further, until it overflows."""

MAX_TOP_K = 2**31 - 1
"""Largest top_k (int32); anything above the vocabulary size keeps every token anyway."""

MIN_REPETITION_PENALTY = 1e-4
"""Smallest repetition penalty: far below any useful value, far above those that divide a
logit past float32's range (1e-38 does)."""

MAX_COUNT = 2**31 - 1
"""Largest n, max_tokens, min_tokens and token id: counts and ids fit int32 (the context
limit refuses far less anyway, with its own message)."""

SEED_RANGE = (-(2**63), 2**63 - 1)
"""Seeds are 64-bit, as torch's generators and vLLM's `seed` field."""

MAX_LOGIT_BIAS = 100.0
"""Largest |bias| added to a logit (OpenAI's range): -100 bans a token, 100 all but forces it."""


@dataclass
class SamplingParams:
    """How to pick each generated token of one request, and when to stop."""

    n: int = 1
    """Number of completions to generate for the prompt."""
    max_tokens: int | None = 16
    """Most tokens to generate; None = up to the model's context limit."""
    min_tokens: int = 0
    """EOS and `stop_token_ids` cannot be sampled before this many tokens are out."""
    temperature: float = 1.0
    """Logits are divided by it; 0 = greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability is >= top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 or -1 = off."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's."""
    seed: int | None = None
    """Seed of this request's own random generator: same seed, same tokens, whatever the batch."""
    stop: list[str] = field(default_factory=list)
    """Strings that end generation when they appear in the output text (a str is wrapped)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end generation when sampled (the token is kept in the output ids)."""
    ignore_eos: bool = False
    """Keep generating after EOS (benchmarks)."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the output text."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in prompt or output (positive logits divided, negative multiplied)."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already in the output."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it is already in the output."""
    logprobs: int | None = None
    """Top logprobs returned per generated token; 0 = only the chosen token's; None = none."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the output text."""
    prompt_logprobs: int | None = None
    """Logprobs of every prompt token (after the first) with this many top alternatives;
    None = none."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Token id -> value added to its logit before sampling (penalties come after)."""
    allowed_token_ids: list[int] | None = None
    """Only these tokens may be generated; None = all."""
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    """Token sequences that may not be generated: the last token of one is banned whenever
    the output ends with the others (vLLM's `bad_words`, tokenized by the caller)."""
    structured_outputs: StructuredOutputs | None = None
    """A JSON schema, regex, choice or grammar the output text must match."""

    def __post_init__(self) -> None:
        # Accept what JSON bodies and vLLM callers pass: a bare string, None, tuples.
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = {int(token): float(bias) for token, bias in self.logit_bias.items()}
        self.bad_words_token_ids = [list(word) for word in self.bad_words_token_ids]
        self._validate()
        self._validate_constraints()

    def token_ids_to_check(self) -> list[tuple[str, list[int]]]:
        """(field, token ids) of every field that names tokens, for the engine's vocabulary check."""
        return [
            ("stop_token_ids", self.stop_token_ids),
            ("logit_bias", list(self.logit_bias)),
            ("allowed_token_ids", self.allowed_token_ids or []),
            ("bad_words", [token for word in self.bad_words_token_ids for token in word]),
        ]

    @property
    def greedy(self) -> bool:
        """Whether tokens are chosen by argmax (temperature ~ 0)."""
        return self.temperature < GREEDY_EPSILON

    @property
    def effective_top_k(self) -> int:
        """top_k with "off" spelled as 0 whichever way the caller said it."""
        return max(self.top_k, 0)

    def _validate(self) -> None:
        _require(1 <= self.n <= MAX_COUNT, "n", self.n, f"must be in [1, {MAX_COUNT}]")
        if self.max_tokens is not None:
            _require(
                1 <= self.max_tokens <= MAX_COUNT,
                "max_tokens",
                self.max_tokens,
                f"must be in [1, {MAX_COUNT}] or null",
            )
        _require(
            0 <= self.min_tokens <= MAX_COUNT,
            "min_tokens",
            self.min_tokens,
            f"must be in [0, {MAX_COUNT}]",
        )
        if self.seed is not None:
            low, high = SEED_RANGE
            _require(low <= self.seed <= high, "seed", self.seed, f"must be in [{low}, {high}]")
        if self.max_tokens is not None:
            _require(
                self.min_tokens <= self.max_tokens,
                "min_tokens",
                self.min_tokens,
                f"must be <= max_tokens ({self.max_tokens})",
            )
        _require(
            0 <= self.temperature <= MAX_TEMPERATURE,
            "temperature",
            self.temperature,
            f"must be in [0, {MAX_TEMPERATURE:g}]",
        )
        _require(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        _require(
            -1 <= self.top_k <= MAX_TOP_K,
            "top_k",
            self.top_k,
            f"must be -1 or 0 (off), or in [1, {MAX_TOP_K}]",
        )
        _require(0 <= self.min_p <= 1, "min_p", self.min_p, "must be in [0, 1]")
        _require(
            MIN_REPETITION_PENALTY <= self.repetition_penalty <= 2,
            "repetition_penalty",
            self.repetition_penalty,
            f"must be in [{MIN_REPETITION_PENALTY:g}, 2]",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(-2 <= value <= 2, name, value, "must be in [-2, 2]")
        if self.logprobs is not None:
            _require(
                0 <= self.logprobs <= MAX_LOGPROBS,
                "logprobs",
                self.logprobs,
                f"must be in [0, {MAX_LOGPROBS}] or null",
            )
        for stop in self.stop:
            _require(
                isinstance(stop, str) and stop != "", "stop", stop, "must be non-empty strings"
            )

    def _validate_constraints(self) -> None:
        if self.prompt_logprobs is not None:
            _require(
                0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                "prompt_logprobs",
                self.prompt_logprobs,
                f"must be in [0, {MAX_LOGPROBS}] or null",
            )
        for bias in self.logit_bias.values():
            _require(
                -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS,
                "logit_bias",
                bias,
                f"values must be in [{-MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]",
            )
        if self.allowed_token_ids is not None:
            _require(
                len(self.allowed_token_ids) > 0,
                "allowed_token_ids",
                self.allowed_token_ids,
                "must not be empty",
            )
        for word in self.bad_words_token_ids:
            _require(len(word) > 0, "bad_words", word, "must be non-empty token sequences")
        for name, token_ids in self.token_ids_to_check():
            for token_id in token_ids:
                _require(
                    isinstance(token_id, int) and 0 <= token_id <= MAX_COUNT,
                    name,
                    token_id,
                    f"must hold token ids in [0, {MAX_COUNT}]",
                )


def _require(condition: bool, param: str, value: Any, expectation: str) -> None:
    """Raise InvalidRequestError for `param` unless `condition` holds.

    Callers write the condition positively (`x >= 0`), so NaN fails it too."""
    if not condition:
        raise InvalidRequestError(f"{param} {expectation}, got {value!r}", param=param)


def per_completion(params: SamplingParams) -> list[SamplingParams]:
    """The params of each of a request's `n` completions: the engine runs each as its own
    request (n=1), seeded apart (seed, seed + 1, ...) so that they differ yet reproduce."""
    if params.n == 1:
        return [params]
    return [
        replace(params, n=1, seed=None if params.seed is None else _wrap_seed(params.seed + index))
        for index in range(params.n)
    ]


def _wrap_seed(seed: int) -> int:
    """`seed` back into SEED_RANGE (64-bit two's complement), so seed + index stays valid."""
    return (seed + 2**63) % 2**64 - 2**63
