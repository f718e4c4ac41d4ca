"""The scheduler's configuration (part of `EngineConfig`; each field's docstring is its `--help`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of continuous batching: how many requests run, how many tokens a step holds."""

    max_num_seqs: int = 256
    """Requests running at once (each holds KV pages and pins its adapter)."""
    max_num_batched_tokens: int = 2048
    """Tokens computed per step, prefill chunks and decodes together; longer prompts are chunked."""
    max_waiting_requests: int = 10_000
    """Requests queued beyond the running ones; more are refused (HTTP 429)."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        # Every running request must be able to decode in one step, as vLLM requires.
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens must be >= max_num_seqs ({self.max_num_seqs}), "
                f"got {self.max_num_batched_tokens}"
            )
        if self.max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be >= 1, got {self.max_waiting_requests}")
