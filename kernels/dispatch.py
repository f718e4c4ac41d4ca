"""The one place that chooses between the Triton kernels and the torch references."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from loraserve.kernels import reference

KERNEL_BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class Kernels:
    """The kernels the forward pass calls; see kernels/reference.py for their semantics."""

    name: str
    lora_shrink: Callable[..., torch.Tensor]
    lora_expand: Callable[..., None]
    write_kv: Callable[..., None]
    paged_attention: Callable[..., torch.Tensor]


REFERENCE_KERNELS = Kernels(
    "torch",
    reference.lora_shrink,
    reference.lora_expand,
    reference.write_kv,
    reference.paged_attention,
)


def select_kernels(backend: str, device: torch.device | str) -> Kernels:
    """`auto`: Triton on CUDA, torch references elsewhere; `triton` / `torch` force one.

    `triton` on a CPU works only under TRITON_INTERPRET=1 (slow: for tests)."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
    use_triton = backend == "triton" or (backend == "auto" and torch.device(device).type == "cuda")
    return _triton_kernels() if use_triton else REFERENCE_KERNELS


def _triton_kernels() -> Kernels:
    raise NotImplementedError("the Triton kernels are not written yet")
