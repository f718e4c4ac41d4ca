"""The one place that chooses between the Triton kernels and the torch references."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from loraserve.kernels import cpu, reference
from loraserve.kernels.constants import KERNEL_BACKENDS


@dataclass(frozen=True)
class Kernels:
    """The kernels the forward pass calls; see kernels/reference.py for their semantics."""

    name: str
    lora_shrink: Callable[..., torch.Tensor]
    lora_expand: Callable[..., None]
    write_kv: Callable[..., None]
    paged_attention: Callable[..., torch.Tensor]


# The torch backend: the references' semantics with fewer calls per step (kernels/cpu.py).
TORCH_KERNELS = Kernels(
    "torch",
    cpu.lora_shrink,
    cpu.lora_expand,
    cpu.write_kv,
    cpu.paged_attention,
)
# The plain references themselves: the yardstick, for checking and measuring the others.
REFERENCE_KERNELS = Kernels(
    "reference",
    reference.lora_shrink,
    reference.lora_expand,
    reference.write_kv,
    reference.paged_attention,
)


def select_kernels(
    backend: str, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> Kernels:
    """`auto`: Triton on CUDA, the torch path elsewhere; `triton` / `torch` / `reference`
    force one.

    `triton` on a CPU works only under TRITON_INTERPRET=1 (slow: for tests)."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
    if backend == "reference":
        return REFERENCE_KERNELS
    use_triton = backend == "triton" or (backend == "auto" and torch.device(device).type == "cuda")
    return _triton_kernels() if use_triton else TORCH_KERNELS


def _triton_kernels() -> Kernels:
    # Imported here, not at the top: Triton reads TRITON_INTERPRET when a kernel is
    # defined, and the torch backend must work where Triton is not even importable.
    from loraserve.kernels.kv_write import write_kv
    from loraserve.kernels.lora_expand import lora_expand
    from loraserve.kernels.lora_shrink import lora_shrink
    from loraserve.kernels.paged_attention import paged_attention

    return Kernels("triton", lora_shrink, lora_expand, write_kv, paged_attention)
