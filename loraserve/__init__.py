"""loraserve: serve thousands of LoRA adapters on one base model.

The public Python API is `LLM` (with vLLM's `LoRARequest`), `SamplingParams` and
`StructuredOutputs`; the HTTP server is `loraserve serve` (see README).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any


def _off_the_clone_root(path: list[str]) -> list[str]:
    """`path` less the root of the clone loraserve runs from, if it runs from one.

    In a clone, loraserve's subpackages are top-level folders (`kernels/`, `server/`, ...;
    the install maps them to `loraserve.*`). `python -m` puts the current folder first on
    sys.path, and from the root those folders would shadow installed packages of the same
    names (transformers imports Hugging Face's `kernels`). So the root leaves sys.path as
    loraserve is imported: `python -m bench.NAME` and `python -m loraserve.demo.train` work
    from there. An installed loraserve (no pyproject.toml beside it) changes nothing.
    """
    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    clone = all(
        os.path.isfile(os.path.join(root, *f)) for f in (("pyproject.toml",), ("server", "cli.py"))
    )
    if not clone:
        return path
    return [entry for entry in path if os.path.realpath(entry or os.curdir) != root]


sys.path[:] = _off_the_clone_root(sys.path)

if TYPE_CHECKING:
    from loraserve.engine.client.llm import LLM, LoRARequest
    from loraserve.engine.core.sampling_params import SamplingParams
    from loraserve.engine.sampling.structured import StructuredOutputs

__all__ = ["LLM", "LoRARequest", "SamplingParams", "StructuredOutputs"]


def __getattr__(name: str) -> Any:
    # Imported lazily so that `import loraserve.scheduler` stays free of torch.
    if name == "LLM":
        from loraserve.engine.client.llm import LLM

        return LLM
    if name == "LoRARequest":
        from loraserve.engine.client.llm import LoRARequest

        return LoRARequest
    if name == "SamplingParams":
        from loraserve.engine.core.sampling_params import SamplingParams

        return SamplingParams
    if name == "StructuredOutputs":
        from loraserve.engine.sampling.structured import StructuredOutputs

        return StructuredOutputs
    raise AttributeError(name)
