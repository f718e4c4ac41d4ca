"""Continuous batching policy: admission, token budget, chunked prefill, preemption.

Pure Python (no torch): the pool is reached through `PoolAccounting`.
"""

from loraserve.scheduler.config import SchedulerConfig
from loraserve.scheduler.interfaces import PoolAccounting
from loraserve.scheduler.request import SequenceState, SequenceStatus
from loraserve.scheduler.scheduler import ScheduledChunk, Scheduler, SchedulerOutput

__all__ = [
    "PoolAccounting",
    "ScheduledChunk",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "SequenceState",
    "SequenceStatus",
]
