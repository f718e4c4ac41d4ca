"""loraserve: serve thousands of LoRA adapters on one base model.

The public Python API is `LLM`, `SamplingParams` and `StructuredOutputs`; the HTTP
server is `loraserve serve` (see README).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loraserve.engine.llm import LLM
    from loraserve.engine.sampling_params import SamplingParams
    from loraserve.engine.structured import StructuredOutputs

__all__ = ["LLM", "SamplingParams", "StructuredOutputs"]


def __getattr__(name: str) -> Any:
    # Imported lazily so that `import loraserve.scheduler` stays free of torch.
    if name == "LLM":
        from loraserve.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from loraserve.engine.sampling_params import SamplingParams

        return SamplingParams
    if name == "StructuredOutputs":
        from loraserve.engine.structured import StructuredOutputs

        return StructuredOutputs
    raise AttributeError(name)
