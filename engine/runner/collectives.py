"""The tensor-parallel ranks' process group: torch.distributed's NCCL (CUDA) or gloo (CPU).

The group is made without torch.distributed's global default group (`ProcessGroupGloo` /
`ProcessGroupNCCL` on a `TCPStore`), so that one process may start and stop engines one
after another (tests, `LLM` objects) and nothing else in it sees the group. Rank 0, in the
engine-core process, hosts the store on 127.0.0.1 at a free port; the workers join it.

`RankCollectives` is what the forward pass calls (models.tensor_parallel.Collectives), and
it counts every call and byte for `bench.tp`.
"""

from __future__ import annotations

import datetime
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist

from loraserve.models.tensor_parallel import Shard

STORE_HOST = "127.0.0.1"
GROUP_TIMEOUT = datetime.timedelta(seconds=120)
"""How long a collective waits for a rank that never comes (a dead peer's closed connection
ends it sooner on gloo)."""


def host_store(size: int) -> dist.TCPStore:
    """The store rank 0 hosts (a free port on 127.0.0.1; `.port` says which)."""
    return dist.TCPStore(
        STORE_HOST, 0, size, is_master=True, timeout=GROUP_TIMEOUT, wait_for_workers=False
    )


def join_store(port: int, size: int) -> dist.TCPStore:
    """A worker's client of rank 0's store."""
    return dist.TCPStore(STORE_HOST, port, size, is_master=False, timeout=GROUP_TIMEOUT)


class RankCollectives:
    """One rank's all-reduce and all-gather over its group, counted."""

    def __init__(self, store: dist.Store, shard: Shard, device: torch.device) -> None:
        self.shard = shard
        self.device = device
        # ProcessGroupNCCL or ProcessGroupGloo: torch's stubs omit their collectives' methods.
        self.group: Any
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's communicators follow the current device
            self.group = dist.ProcessGroupNCCL(
                store, shard.rank, shard.size, dist.ProcessGroupNCCL.Options()
            )
        else:
            self.group = dist.ProcessGroupGloo(store, shard.rank, shard.size, GROUP_TIMEOUT)
        self.calls: Counter[str] = Counter()
        """Collectives made, by kind (all_reduce, all_gather)."""
        self.bytes: Counter[str] = Counter()
        """Bytes each rank sent into them, by kind (a tensor's size, per call)."""

    def all_reduce(self, tensor: torch.Tensor) -> None:
        self._count("all_reduce", tensor)
        self.group.allreduce([tensor]).wait()

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self._count("all_gather", tensor)
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.shard.size)]
        self.group.allgather([parts], [tensor]).wait()
        return torch.cat(parts, dim=-1)

    def agree_min(self, value: int) -> int:
        """The smallest of every rank's `value` (the pool's page count: the same on all)."""
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp(dist.ReduceOp.MIN)
        self.group.allreduce([tensor], options).wait()
        return int(tensor.item())

    def _count(self, kind: str, tensor: torch.Tensor) -> None:
        self.calls[kind] += 1
        self.bytes[kind] += tensor.numel() * tensor.element_size()
