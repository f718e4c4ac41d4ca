"""The scheduler's configuration (part of `EngineConfig`; each field's docstring is its `--help`)."""

from __future__ import annotations

from dataclasses import dataclass

from loraserve.scheduler.policy import POLICIES


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of continuous batching: how many requests run, how many tokens a step holds."""

    max_num_seqs: int = 256
    """Requests running at once (each holds KV pages and pins its adapter)."""
    max_num_batched_tokens: int = 2048
    """Tokens computed per step, prefill chunks and decodes together; longer prompts are chunked."""
    max_waiting_requests: int = 10_000
    """Requests queued beyond the running ones; more are refused (HTTP 429)."""
    policy: str = "vtc"
    """Admission order of waiting requests: vtc (fair share between tenants: the Virtual Token Counter; with one tenant it is FCFS) | fcfs (arrival order)."""
    vtc_input_token_weight: float = 1.0
    """VTC: service counted per prompt token."""
    vtc_output_token_weight: float = 2.0
    """VTC: service counted per generated token (a generated token costs more than a prompt token)."""
    max_adapter_prefetch: int = 4
    """Adapters of waiting requests copied into free pool pages per step, ahead of their admission (0: only at admission)."""

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
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        weights = (self.vtc_input_token_weight, self.vtc_output_token_weight)
        if not (min(weights) >= 0 and sum(weights) > 0):
            raise ValueError(f"VTC token weights must be >= 0 and not both 0, got {weights}")
        if self.max_adapter_prefetch < 0:
            raise ValueError(f"max_adapter_prefetch must be >= 0, got {self.max_adapter_prefetch}")
