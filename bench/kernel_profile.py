"""A torch.profiler trace of decode steps as a table by kernel class: launches and device
time per step, and launches per decoder layer (bench/gpu_check.py's profile section).

On CUDA the events counted are the kernels (those replayed from a CUDA graph included); on
a CPU (the dry run) the top-level operators, which no class but `elementwise` names.
"""

from __future__ import annotations

from typing import Any

from torch.autograd import DeviceType

KERNEL_CLASSES = (
    # The glue ops that also run a LoRA shrink (kernels/add_rms_norm_shrink.py, ...), before
    # the plain shrink's fragment matches them.
    ("norm_shrink", ("rms_norm_shrink",)),
    ("activation_shrink", ("activation_shrink",)),
    ("lora_shrink", ("lora_shrink", "shrink")),
    ("lora_expand", ("lora_expand", "expand")),
    ("attention", ("paged_attention", "attention_kernel")),
    ("attention_combine", ("combine",)),
    ("kv_write", ("write_kv", "kv_write")),
    ("norm", ("rms", "norm")),
    ("rope", ("rope", "rotary")),
    ("gemm", ("gemm", "gemv", "cutlass", "sm90", "sm80", "nvjet", "cublas", "addmm", "aten::mm")),
    ("copy", ("copy", "memcpy", "memset", "fill")),
    ("reduce", ("reduce",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "aten::")),
)
"""Kernel classes by name fragments, first match wins (CPU dry runs see aten ops instead)."""


def kernel_class(name: str) -> str:
    lowered = name.lower()
    for label, fragments in KERNEL_CLASSES:
        if any(fragment in lowered for fragment in fragments):
            return label
    return "other"


def kernel_table(profiler: Any, on_cuda: bool, steps: int, num_layers: int) -> dict:
    """Per kernel class: launches and device microseconds per step; and the totals."""
    classes: dict[str, dict[str, float]] = {}
    for event in profiler.events():
        if on_cuda and event.device_type != DeviceType.CUDA:
            continue
        if not on_cuda and event.cpu_parent is not None:
            continue
        entry = classes.setdefault(kernel_class(event.name), {"launches": 0, "us": 0.0})
        entry["launches"] += 1 / steps
        entry["us"] += event.time_range.elapsed_us() / steps  # on its device's clock
    launches = sum(entry["launches"] for entry in classes.values())
    return {
        "launches_per_step": launches,
        "launches_per_layer": launches / num_layers,
        "by_class": classes,
    }
