"""Admission policies: the waiting queue, and the order its requests are offered in.

The scheduler asks a policy for candidates (`candidates()`, lazily: what comes next
may depend on what was admitted just before) and admits them while budget, seats and
pages allow; it tells the policy what it admitted, finished, preempted and generated.

- `FcfsPolicy`: arrival order (a preempted request goes back to the front).
- `VtcPolicy`: the Virtual Token Counter of Sheng et al., "Fairness in Serving Large
  Language Models" (OSDI 2024). Each tenant has a counter of the service it received:
  `input_weight` per prompt token (charged once, at its first admission) plus
  `output_weight` per generated token, divided by the tenant's weight (from the
  API-keys file), so a tenant of weight 2 is owed twice the tokens. The next candidate
  is the earliest waiting request of the backlogged tenant with the smallest counter.
  A tenant that comes back from idle (nothing waiting or running) is lifted to the
  smallest counter of the backlogged tenants (or, when none is, to the counter of the
  tenant that left the backlog last), so idle time is not banked as credit.

With one tenant (no API keys: every request is the anonymous tenant's), VTC offers
requests in exactly FCFS order. Pure Python, no torch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Protocol

from loraserve.scheduler.request import SequenceState

POLICIES = ("fcfs", "vtc")


class AdmissionPolicy(Protocol):
    """The scheduler's waiting queue and its admission order."""

    def add(self, seq: SequenceState) -> None:
        """A new request, at the back of its line."""
        ...

    def requeue(self, seq: SequenceState) -> None:
        """A preempted request (it was running), back at the front of its line."""
        ...

    def remove(self, seq: SequenceState) -> None:
        """Take a waiting request out: admitted, or aborted while waiting."""
        ...

    def candidates(self) -> Iterator[SequenceState]:
        """Waiting requests in the order to offer them; each is offered once per call.
        The scheduler `remove`s and `on_admitted`s those it admits as it goes."""
        ...

    def on_admitted(self, seq: SequenceState) -> None:
        """`seq` left waiting for running."""
        ...

    def on_finished(self, seq: SequenceState) -> None:
        """A running `seq` ended (finished or aborted)."""
        ...

    def on_token(self, seq: SequenceState) -> None:
        """A running `seq` generated one token."""
        ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[SequenceState]:
        """Every waiting request (for counts and metrics)."""
        ...


class FcfsPolicy:
    """First come, first served."""

    def __init__(self) -> None:
        self._queue: deque[SequenceState] = deque()

    def add(self, seq: SequenceState) -> None:
        self._queue.append(seq)

    def requeue(self, seq: SequenceState) -> None:
        # Victims are taken latest first, so pushing each to the front keeps their order.
        self._queue.appendleft(seq)

    def remove(self, seq: SequenceState) -> None:
        self._queue.remove(seq)

    def candidates(self) -> Iterator[SequenceState]:
        yield from list(self._queue)  # a snapshot: the scheduler removes what it admits

    def on_admitted(self, seq: SequenceState) -> None:
        pass

    def on_finished(self, seq: SequenceState) -> None:
        pass

    def on_token(self, seq: SequenceState) -> None:
        pass

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[SequenceState]:
        return iter(self._queue)


class VtcPolicy:
    """Virtual Token Counter fair queueing between tenants (see the module docstring)."""

    def __init__(self, input_weight: float, output_weight: float) -> None:
        """Weights of a prompt and a generated token (SchedulerConfig checks them)."""
        self.input_weight = input_weight
        self.output_weight = output_weight
        self.counters: dict[str, float] = {}
        """Service received per tenant, in weighted tokens (divided by the tenant's weight)."""
        self._queues: dict[str, deque[SequenceState]] = {}
        self._num_running: dict[str, int] = {}
        self._last_left = 0.0  # counter of the tenant that left the backlog last
        self._num_waiting = 0

    def add(self, seq: SequenceState) -> None:
        tenant = _tenant(seq)
        if not self._is_backlogged(tenant):
            backlogged = [self.counters[t] for t in self._queues if self._is_backlogged(t)]
            floor = min(backlogged) if backlogged else self._last_left
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)
        self._queues.setdefault(tenant, deque()).append(seq)
        self._num_waiting += 1

    def requeue(self, seq: SequenceState) -> None:
        tenant = _tenant(seq)
        self._num_running[tenant] -= 1
        self._queues.setdefault(tenant, deque()).appendleft(seq)
        self._num_waiting += 1

    def remove(self, seq: SequenceState) -> None:
        tenant = _tenant(seq)
        self._queues[tenant].remove(seq)
        self._num_waiting -= 1
        if seq.status.is_finished:  # aborted while waiting
            self._note_if_idle(tenant)

    def candidates(self) -> Iterator[SequenceState]:
        lines = {tenant: list(queue) for tenant, queue in self._queues.items() if queue}
        cursors = dict.fromkeys(lines, 0)
        while True:
            best: tuple[float, int] | None = None
            chosen = ""
            for tenant, line in lines.items():
                if cursors[tenant] < len(line):
                    key = (self.counters[tenant], line[cursors[tenant]].arrival_index)
                    if best is None or key < best:
                        best, chosen = key, tenant
            if best is None:
                return
            cursors[chosen] += 1
            yield lines[chosen][cursors[chosen] - 1]

    def on_admitted(self, seq: SequenceState) -> None:
        tenant = _tenant(seq)
        self._num_running[tenant] = self._num_running.get(tenant, 0) + 1
        if seq.num_preemptions == 0:  # a recompute after preemption is free
            self._charge(seq, self.input_weight * seq.num_prompt_tokens)

    def on_finished(self, seq: SequenceState) -> None:
        tenant = _tenant(seq)
        self._num_running[tenant] -= 1
        self._note_if_idle(tenant)

    def on_token(self, seq: SequenceState) -> None:
        self._charge(seq, self.output_weight)

    def __len__(self) -> int:
        return self._num_waiting

    def __iter__(self) -> Iterator[SequenceState]:
        for queue in self._queues.values():
            yield from queue

    def _charge(self, seq: SequenceState, tokens: float) -> None:
        tenant = _tenant(seq)
        self.counters[tenant] = self.counters.get(tenant, 0.0) + tokens / seq.tenant_weight

    def _is_backlogged(self, tenant: str) -> bool:
        return bool(self._queues.get(tenant)) or self._num_running.get(tenant, 0) > 0

    def _note_if_idle(self, tenant: str) -> None:
        if not self._is_backlogged(tenant):
            self._last_left = self.counters.get(tenant, 0.0)


def _tenant(seq: SequenceState) -> str:
    return seq.tenant or ""


def make_policy(name: str, input_weight: float, output_weight: float) -> AdmissionPolicy:
    """The policy named by `SchedulerConfig.policy`."""
    if name == "fcfs":
        return FcfsPolicy()
    if name == "vtc":
        return VtcPolicy(input_weight, output_weight)
    raise ValueError(f"policy must be one of {POLICIES}, got {name!r}")
