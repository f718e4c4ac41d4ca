"""What a CUDA graph demands of the code it captures, checked on a CPU.

`NoDeviceSync`: a dispatch mode that fails on any op that, on a GPU, would make the host
wait for the device (a scalar read, a host copy) or whose output shape depends on the
data (nonzero, masked_select, boolean indexing, unique, repeat_interleave without
`output_size`). Inside a captured region each of those either breaks the capture or bakes
one step's values into every replay.

`EmulatedGraphs`: capture and replay as CUDA graphs do them, without CUDA: a "capture"
records the static batch (the metadata builder's buffers at a bucket's size) and runs the
forward pass on it once; a "replay" refills those buffers in place (the builder, as the
runner does before `graph.replay()`), checks that every tensor is still at the captured
address with the captured shape, and reruns the forward pass on the *captured* batch
object, the only one a graph knows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import fields
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

aten = torch.ops.aten

SYNCING_OPS = {
    aten._local_scalar_dense: "reads a scalar on the host (.item(), int(), bool(), float())",
    aten.nonzero: "has a data-dependent output shape (nonzero)",
    aten.masked_select: "has a data-dependent output shape (masked_select)",
    aten.unique_dim: "has a data-dependent output shape (unique)",
    aten._unique: "has a data-dependent output shape (unique)",
    aten._unique2: "has a data-dependent output shape (unique)",
    aten.unique_consecutive: "has a data-dependent output shape (unique_consecutive)",
    aten.is_nonzero: "reads a scalar on the host (bool(tensor))",
    aten.equal: "reads its answer on the host (torch.equal)",
    aten.allclose: "reads its answer on the host (torch.allclose)",
}
"""Ops that synchronise a GPU whatever their arguments, and why."""

HOST_READS = ("tolist", "numpy", "__array__", "cpu")
"""Tensor methods that copy to the host without an aten op (patched while checking)."""


class DeviceSyncError(AssertionError):
    """An op in the captured region would synchronise the GPU."""


class NoDeviceSync(TorchDispatchMode):
    """Fails on the first op that would synchronise a GPU; Triton launches are opaque (on a
    GPU they dispatch no aten op: the interpreter's own host copies are not the kernel's)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = _why_syncing(func, args, kwargs)
        if reason is not None:
            raise DeviceSyncError(f"{func} {reason}")
        return func(*args, **kwargs)


def _why_syncing(func: Any, args: tuple, kwargs: dict) -> str | None:
    packet = func.overloadpacket
    if packet in SYNCING_OPS:
        return SYNCING_OPS[packet]
    if packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(index is not None and index.dtype == torch.bool for index in indices):
            return "indexes with a boolean mask (a data-dependent shape)"
    repeats_by_tensor = packet is aten.repeat_interleave and (len(args) < 3 or args[2] is None)
    if repeats_by_tensor and kwargs.get("output_size") is None:
        return "repeats by tensor without output_size (a data-dependent shape)"
    if packet in (aten._to_copy, aten.copy_):
        return _host_copy(func, args, kwargs)
    return None


def _host_copy(func: Any, args: tuple, kwargs: dict) -> str | None:
    """A copy between devices; on a CPU-only run no such copy can occur, so an explicit
    target device of `cpu` for a tensor meant for the device is what betrays it."""
    if func.overloadpacket is aten._to_copy:
        target = kwargs.get("device")
        if target is not None and torch.device(target) != args[0].device:
            return f"copies from {args[0].device} to {target}"
        return None
    target, source = args[0], args[1]
    if isinstance(source, torch.Tensor) and source.device != target.device:
        return f"copies from {source.device} to {target.device}"
    return None


@contextlib.contextmanager
def no_device_sync() -> Iterator[None]:
    """Run the block under `NoDeviceSync`, with host reads (`tolist`, `numpy`, `cpu`) refused
    too; Triton kernel launches (interpreted on a CPU) run unchecked."""
    from triton.runtime import interpreter

    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    launch = interpreter.GridExecutor.__call__

    def refuse(name: str):
        def method(self, *args, **kwargs):
            raise DeviceSyncError(f"Tensor.{name} reads a device tensor on the host")

        return method

    def unchecked_launch(self, *args, **kwargs):
        with _disable_current_modes(), _host_reads(originals):
            return launch(self, *args, **kwargs)

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, refuse(name))
        interpreter.GridExecutor.__call__ = unchecked_launch
        with NoDeviceSync():
            yield
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
        interpreter.GridExecutor.__call__ = launch


@contextlib.contextmanager
def _host_reads(originals: dict[str, Any]) -> Iterator[None]:
    """The real host-read methods back for a while (inside a Triton launch)."""
    refused = {name: getattr(torch.Tensor, name) for name in originals}
    try:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
        yield
    finally:
        for name, method in refused.items():
            setattr(torch.Tensor, name, method)


def batch_tensors(batch: Any) -> dict[str, torch.Tensor]:
    """Every tensor of a ForwardBatch (its LoraBatch's and tile map's too), by field name."""
    return {name: value for name, value in _fields(batch) if isinstance(value, torch.Tensor)}


def batch_scalars(batch: Any) -> dict[str, int]:
    """Every int of a ForwardBatch, nested ones too (launch shapes: max rank, tile bounds)."""
    return {name: value for name, value in _fields(batch) if isinstance(value, int)}


def _fields(record: Any, prefix: str = "") -> list[tuple[str, Any]]:
    found = []
    for field in fields(record):
        value = getattr(record, field.name)
        if value is not None and hasattr(value, "__dataclass_fields__"):
            found += _fields(value, f"{prefix}{field.name}.")
        else:
            found.append((prefix + field.name, value))
    return found


class EmulatedGraphs:
    """Capture and replay of the decode forward pass, emulated (see the module docstring):
    both graph sets of engine/runner/cuda_graphs.py, with and without LoRA."""

    def __init__(self, forward: Any, metadata: Any, pool: Any) -> None:
        self.forward, self.metadata, self.pool = forward, metadata, pool
        self.captured: dict[tuple[int, bool], Any] = {}

    def capture(self, bucket: int) -> None:
        for with_lora in (True, False):
            batch = self.metadata.build([], self.pool, pad_to=bucket, with_lora=with_lora)
            self.forward(batch)  # what the capture runs: its outputs are never read
            self.captured[bucket, with_lora] = batch

    def replay(self, bucket: int, chunks: Any) -> torch.Tensor:
        """Refill the static buffers with `chunks` and rerun the captured forward pass."""
        refilled = self.metadata.build(chunks, self.pool, pad_to=bucket)
        static = self.captured[bucket, refilled.lora is not None]
        expected, got = batch_tensors(static), batch_tensors(refilled)
        assert expected.keys() == got.keys(), f"the batch's fields changed: {got.keys()}"
        for name, tensor in got.items():
            where = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
            captured = expected[name]
            assert where == (captured.data_ptr(), tuple(captured.shape), captured.stride()), (
                f"{name} moved or changed shape: a graph would read the captured buffer"
            )
        assert batch_scalars(refilled) == batch_scalars(static), "a launch's shape changed"
        return self.forward(static)
