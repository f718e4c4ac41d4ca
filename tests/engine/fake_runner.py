"""A `ModelRunner` without a model: the next token of a sequence is (its last token + 1) mod
the vocabulary. Deterministic and cheap, so engine-core tests check the step's flow, stops
and page accounting without torch's arithmetic in the way."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from loraserve.engine.core.config import EngineConfig
from loraserve.engine.core.request import Step
from loraserve.engine.core.sampling_params import SamplingParams
from loraserve.engine.sampling.sampler import SamplerOutput
from loraserve.memory.geometry import PoolGeometry
from loraserve.models.arch import ModelArch


@dataclass
class FakeRunner:
    config: EngineConfig
    arch: ModelArch
    geometry: PoolGeometry
    eos_token_ids: tuple[int, ...]
    num_pages: int = 0
    kernel_backend: str = "fake"
    warmup_seconds: float = 0.0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    requests: dict[str, SamplingParams] = field(default_factory=dict)
    plans: list[Any] = field(default_factory=list)
    """Every plan executed, in order."""
    loaded: list[tuple[str, int]] = field(default_factory=list)
    """(adapter, slot) of every load the plans carried."""

    def __post_init__(self) -> None:
        self.num_pages = self.config.cache.pool_pages or 64

    def execute(self, step: Step) -> SamplerOutput:
        for request_id in step.finished:
            del self.requests[request_id]
        for state in step.started:
            assert state.request.request_id not in self.requests
            self.requests[state.request.request_id] = state.params
        plan = step.plan
        self.plans.append(plan)
        self.loaded += [(load.name, load.slot) for load in plan.adapter_loads]
        tokens = []
        for chunk in plan.chunks:
            assert chunk.seq.request_id in self.requests, "executing an unknown request"
            if chunk.samples:
                tokens.append((chunk.seq.token_ids[-1] + 1) % self.arch.vocab_size)
        return SamplerOutput(tokens, [None] * len(tokens), [None] * len(tokens))

    def drain_load_seconds(self) -> list[float]:
        return []

    def check(self) -> None:
        pass

    def base_weight(self, layer: int, module: str) -> torch.Tensor:
        """A fixed stand-in weight (ones): DoRA folders read, their g well defined."""
        return torch.ones(tuple(reversed(self.arch.module_dims(module))))
