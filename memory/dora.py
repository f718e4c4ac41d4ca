"""DoRA's magnitude scale g, computed once when an adapter is read.

A DoRA module (PEFT `use_dora=True`) computes, unmerged and at inference,

    result = base + (g - 1) * (base - bias) + g * s * B @ A @ x
    g      = m / ||W + s * B @ A||      (the norm of each output row; m: lora_magnitude_vector)

that is `y = g * (W x + s B A x) + bias` (PEFT `tuners/lora/dora.py`, `DoraLinearLayer`).
g depends on the base weight W, the adapter's A, B, s and m only, never on the input:
it is one vector per adapted module, computed here and stored in the pool beside B
(memory/adapter_store.py); the LoRA expand kernels apply it in their epilogue
(kernels/ops.py, `LoraExpand`).

Precision: g is computed in float32, from W as the model computes with it (the
checkpoint converted to the model's dtype, which is what PEFT's `dequantize_module_weight`
hands its norm) plus s * B @ A in float32, then rounded once to the pool's dtype. With a
float32 model this is PEFT's computation; with half precision PEFT computes the norm in the
model's dtype (or float32 where it autocasts the adapter), and loraserve's float32 norm is
the more accurate of the two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from loraserve.memory.peft_config import refuse
from loraserve.memory.peft_format import LoraModule

NORM_CHUNK_ELEMENTS = 1 << 22
"""Elements of W (and of sBA) in float32 at a time while g is computed: 16 MiB each."""


class BaseWeights(Protocol):
    """The base model's linear weights, as the forward computes with them (the runner is one)."""

    def base_weight(self, layer: int, module: str) -> torch.Tensor:
        """[out_features, in_features] of linear `module` (a name of `arch.linear_modules`:
        `q_proj`, ..., or Phi-3's fused `qkv_proj`) of decoder layer `layer`, the model's
        dtype and device; read only (a view of the model's own tensor)."""
        ...


def magnitude_scale(module: LoraModule, base: BaseWeights, folder: Path) -> torch.Tensor:
    """g = m / ||W + s B A|| per output row of a DoRA module: [out_features] float32 on the CPU.

    AdapterError when a row's norm is zero or g is not finite (nothing to divide by)."""
    assert module.magnitude is not None, "magnitude_scale of a plain LoRA module"
    weight = base.base_weight(module.layer, module.name)  # [out, in]
    device = weight.device
    # [r, in], [out, r]: views of the mapped file, in float32 as PEFT's float32 model holds them
    lora_a, lora_b = (t.to(device, torch.float32) for t in (module.lora_a, module.lora_b))
    # Rows a few at a time: the float32 copy of a whole [out, in] weight (gigabytes at 70B)
    # must not be needed on a device whose memory the pool has taken.
    rows = max(1, NORM_CHUNK_ELEMENTS // weight.shape[1])
    norm = torch.cat(
        [
            # PEFT: weight + scaling * lora_weight, then torch.linalg.norm over each row.
            torch.linalg.norm(
                weight[first : first + rows].float()
                + module.scaling * (lora_b[first : first + rows] @ lora_a),
                dim=1,
            )
            for first in range(0, weight.shape[0], rows)
        ]
    )  # [out]
    scale = (module.magnitude.to(device) / norm).cpu()
    if not torch.isfinite(scale).all():
        raise refuse(
            folder,
            f"DoRA magnitude {module.magnitude_name} over ||W + sBA|| is not finite "
            "(a row of the adapted weight has norm zero)",
        )
    return scale
