"""loraserve: serve thousands of LoRA adapters on one base model.

The public Python API is `LLM` and `SamplingParams`; the HTTP server is
`loraserve serve` (see README).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loraserve.engine.llm import LLM
    from loraserve.engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str) -> Any:
    # Imported lazily so that `import loraserve.scheduler` stays free of torch.
    if name == "LLM":
        from loraserve.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from loraserve.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
