"""The one place that chooses the kernels: Triton, native C (CPU), the torch path, the references.

Each backend is a `Kernels` (kernels/ops.py): its implementation of every op, held to the
op's protocol.
"""

from __future__ import annotations

import torch

from loraserve.kernels import native, native_build, reference, torch_path
from loraserve.kernels.constants import KERNEL_BACKENDS
from loraserve.kernels.ops import Kernels

# The native backend: C kernels for float32 on the CPU (kernels/native.py), built on first use;
# the glue ops in torch, as the torch path runs them.
NATIVE_KERNELS = Kernels(
    "native",
    native.lora_shrink,
    native.lora_expand,
    native.write_kv,
    native.paged_attention,
    add_rms_norm=reference.add_rms_norm,
    rope_write_kv=native.rope_write_kv,
    gated_activation=reference.gated_activation,
    add_rms_norm_shrink=native.add_rms_norm_shrink,
    gated_activation_shrink=native.gated_activation_shrink,
    rope_write_kv_attention=native.rope_write_kv_attention,
)
# The torch backend: the references' semantics with fewer calls per step (kernels/torch_path.py),
# for CPUs without a C compiler and dtypes other than float32.
TORCH_KERNELS = Kernels(
    "torch",
    torch_path.lora_shrink,
    torch_path.lora_expand,
    torch_path.write_kv,
    torch_path.paged_attention,
    add_rms_norm=torch_path.add_rms_norm,
    rope_write_kv=torch_path.rope_write_kv,
    gated_activation=torch_path.gated_activation,
    add_rms_norm_shrink=torch_path.add_rms_norm_shrink,
    gated_activation_shrink=torch_path.gated_activation_shrink,
    rope_write_kv_attention=torch_path.rope_write_kv_attention,
)
# The plain references themselves: the yardstick, for checking and measuring the others.
REFERENCE_KERNELS = Kernels(
    "reference",
    reference.lora_shrink,
    reference.lora_expand,
    reference.write_kv,
    reference.paged_attention,
    add_rms_norm=reference.add_rms_norm,
    rope_write_kv=reference.rope_write_kv,
    gated_activation=reference.gated_activation,
    add_rms_norm_shrink=reference.add_rms_norm_shrink,
    gated_activation_shrink=reference.gated_activation_shrink,
    rope_write_kv_attention=reference.rope_write_kv_attention,
)


def select_kernels(
    backend: str, device: torch.device | str, dtype: torch.dtype | None = None
) -> Kernels:
    """`auto`: Triton on CUDA; on a CPU the native C kernels when `dtype` is float32 and a
    C compiler is there, else the torch path. `triton` / `native` / `torch` / `reference`
    force one.

    `dtype` is the pool's (and the model's); None (not known) keeps `auto` off `native`.
    `triton` on a CPU works only under TRITON_INTERPRET=1 (slow: for tests). `native`
    raises ValueError off the CPU or off float32, and native_build.NativeKernelsUnavailable
    (with the compiler's message) where the library cannot be built."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
    on_cuda = torch.device(device).type == "cuda"
    if backend == "reference":
        return REFERENCE_KERNELS
    if backend == "triton" or (backend == "auto" and on_cuda):
        return _triton_kernels()
    if backend == "native":
        if on_cuda or dtype not in (None, torch.float32):
            raise ValueError(
                f"kernel_backend=native runs float32 on the CPU, got {dtype} on {device}"
            )
        native_build.load()  # fail here, with the compiler's message, not in the first step
        return NATIVE_KERNELS
    if backend == "auto" and dtype == torch.float32 and native.available():
        return NATIVE_KERNELS
    return TORCH_KERNELS


def _triton_kernels() -> Kernels:
    # Imported here, not at the top: Triton reads TRITON_INTERPRET when a kernel is
    # defined, and the torch backend must work where Triton is not even importable.
    from loraserve.kernels.add_rms_norm import add_rms_norm
    from loraserve.kernels.add_rms_norm_shrink import add_rms_norm_shrink
    from loraserve.kernels.gated_activation import gated_activation
    from loraserve.kernels.gated_activation_shrink import gated_activation_shrink
    from loraserve.kernels.kv_write import write_kv
    from loraserve.kernels.lora_expand import lora_expand
    from loraserve.kernels.lora_shrink import lora_shrink
    from loraserve.kernels.paged_attention import paged_attention
    from loraserve.kernels.rope_kv_attention import rope_write_kv_attention
    from loraserve.kernels.rope_kv_write import rope_write_kv

    return Kernels(
        "triton",
        lora_shrink,
        lora_expand,
        write_kv,
        paged_attention,
        add_rms_norm=add_rms_norm,
        rope_write_kv=rope_write_kv,
        gated_activation=gated_activation,
        add_rms_norm_shrink=add_rms_norm_shrink,
        gated_activation_shrink=gated_activation_shrink,
        rope_write_kv_attention=rope_write_kv_attention,
        reads_tile_map=True,
    )
