"""What a request must satisfy to be queued: checked by the core before anything is held.

Each refusal is an `InvalidRequestError` naming the field, answered as a 400: a prompt that
is empty, too long or holds ids outside the vocabulary; `max_tokens` beyond the context or
beyond what the pool could ever give the request; token ids outside the vocabulary in any
field; stop tokens that would leave nothing to sample before `min_tokens` are out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loraserve.engine.core.config import RuntimeInfo
from loraserve.engine.core.sampling_params import SamplingParams
from loraserve.errors import InvalidRequestError


@dataclass(frozen=True)
class Admission:
    """The checks, for one model and pool."""

    vocab_size: int
    info: RuntimeInfo
    block_size: int

    def max_tokens(
        self, prompt: list[int], params: SamplingParams, adapter_pages: int, available_pages: int
    ) -> int:
        """Validate the prompt against the context and the pool (`adapter_pages`: the most
        the request's adapter can take; `available_pages`: the pool's pages for requests,
        pinned adapters' never free up); returns max_tokens."""
        limit, vocab = self.info.max_model_len, self.vocab_size
        if not prompt:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if len(prompt) >= limit:
            raise InvalidRequestError(
                f"the prompt has {len(prompt)} tokens; this model's maximum context length is "
                f"{limit} tokens, prompt and output together",
                "prompt",
            )
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - len(prompt)
        if len(prompt) + max_tokens > limit:
            raise InvalidRequestError(
                f"this model's maximum context length is {limit} tokens; you asked for "
                f"{len(prompt) + max_tokens} ({len(prompt)} in the prompt, {max_tokens} to generate)",
                "max_tokens",
            )
        pages = math.ceil((len(prompt) + max_tokens) / self.block_size) + adapter_pages
        if pages > available_pages:
            raise InvalidRequestError(
                f"the request needs {pages} pages of the pool at most, which has only "
                f"{available_pages} for requests; send a shorter prompt or fewer max_tokens",
                "max_tokens",
            )
        return max_tokens

    def check_token_ids(self, params: SamplingParams) -> None:
        """Every token id a field names is within the vocabulary."""
        vocab = self.vocab_size
        for name, token_ids in params.token_ids_to_check():
            if any(not token_id < vocab for token_id in token_ids):
                raise InvalidRequestError(f"{name} must hold token ids in [0, {vocab})", name)

    def stop_token_ids(self, params: SamplingParams) -> frozenset[int]:
        """The tokens that end a request, leaving a token to sample before `min_tokens`
        are out."""
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops.update(self.info.eos_token_ids)
        if params.min_tokens and len(stops) >= self.vocab_size:
            raise InvalidRequestError(
                "stop_token_ids (with EOS) cover the whole vocabulary: with min_tokens, no "
                "token could ever be generated",
                "stop_token_ids",
            )
        return frozenset(stops)
