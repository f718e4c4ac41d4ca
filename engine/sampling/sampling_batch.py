"""The sampling state of the running requests, kept across steps (vLLM's persistent batch).

A request's sampling parameters are prepared once, when the engine adds it (`add`): its
seeded generator, its constraints, the ids `min_tokens` holds back. When it first samples
it takes a slot: a row of tensors allocated once at `max_num_seqs` that holds its scalar
parameters, how often it produced each token (for the frequency and presence penalties)
and which tokens its prompt holds (for the repetition penalty). Each step, `rows(seqs)`
gathers the rows the step samples, in plan order, by one index tensor; `append` then
counts the tokens the penalized ones drew, so that no step recounts a sequence.

Worked example, max_num_seqs 2:

    add a; add b; add c          prepared (a, b penalized), no slot yet (a request may wait)
    rows([b, a])                 b -> slot 0, a -> slot 1, their tokens so far counted;
                                 slot index [0, 1]
    append(view, [7, 9])         counts[0, 7] += 1; counts[1, 9] += 1
    remove b; rows([a, c])       c -> slot 0 (b's); slot index [1, 0]

A slot is held from a request's first sampling step until `remove`. When every slot is
held and a row needs one, it takes the slot of a request this step does not sample (one
preempted, back in the queue), whose counts are rebuilt from its tokens when it samples
again. Counting what was drawn is exact because every token the runner samples becomes
its request's next output token, or the request ends (engine/core/core.py's postprocess).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np
import torch

from loraserve.engine.core.sampling_params import SamplingParams
from loraserve.engine.sampling.constraints import ConstrainedRow, RequestConstraints
from loraserve.engine.sampling.sampling_rows import (
    NUM_VALUES,
    PenalizedRows,
    SampledRows,
    SamplingRows,
    flatten,
    slot_values,
    to_device,
)
from loraserve.engine.sampling.structured import RequestGrammar

_SEED_MASK = (1 << 64) - 1  # torch seeds are 64-bit; any Python int maps into that range
NO_SLOT = -1
"""A request that holds no slot (not yet sampled, or its slot was taken while it waited)."""


class SampledSequence(Protocol):
    """A sequence the step samples: its id and its tokens (the scheduler's `SequenceState`)."""

    @property
    def request_id(self) -> str: ...

    @property
    def prompt_token_ids(self) -> Sequence[int]: ...

    @property
    def output_token_ids(self) -> Sequence[int]: ...


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator for one seeded request, on the device the logits live on."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed & _SEED_MASK)
    return generator


@dataclass
class PreparedRequest:
    """What a request's rows are made of, prepared once when it is added."""

    request_id: str
    params: SamplingParams
    generator: torch.Generator | None
    """Its own random stream (seeded requests), kept for its whole life, slot or not."""
    grammar: RequestGrammar | None
    constraints: RequestConstraints | None
    min_tokens_stop_ids: np.ndarray
    """[num_ids] int64: EOS (unless ignore_eos) and stop_token_ids, masked until min_tokens."""


@dataclass
class HostColumns:
    """Per-slot facts the host decides by (which stages run), so that deciding never
    reads the device."""

    greedy: np.ndarray
    seeded: np.ndarray
    filters_top_k_top_p: np.ndarray
    filters_min_p: np.ndarray
    penalized: np.ndarray
    constrained: np.ndarray
    has_grammar: np.ndarray
    num_top: np.ndarray
    """`logprobs`, -1 for None."""
    min_tokens: np.ndarray
    num_outputs: np.ndarray
    """Output tokens of the slot's request so far."""

    @staticmethod
    def allocate(max_num_seqs: int) -> HostColumns:
        """Columns of `max_num_seqs` slots, each [max_num_seqs]: bool flags, int64 counts."""
        counts = ("num_top", "min_tokens", "num_outputs")
        return HostColumns(
            **{
                column.name: np.zeros(max_num_seqs, np.int64 if column.name in counts else bool)
                for column in fields(HostColumns)
            }
        )

    def write(self, slot: int, request: PreparedRequest) -> None:
        """The facts of a slot's new request (Python's truth of each, NaN included)."""
        params = request.params
        self.greedy[slot] = params.greedy
        self.seeded[slot] = request.generator is not None
        self.filters_top_k_top_p[slot] = bool(params.effective_top_k or params.top_p < 1)
        self.filters_min_p[slot] = params.min_p > 0
        self.penalized[slot] = params.repetition_penalty != 1.0 or bool(
            params.frequency_penalty or params.presence_penalty
        )
        self.constrained[slot] = request.constraints is not None
        self.has_grammar[slot] = request.grammar is not None
        self.num_top[slot] = -1 if params.logprobs is None else params.logprobs
        self.min_tokens[slot] = params.min_tokens

    def num_top_list(self, slots: np.ndarray) -> list[int | None] | None:
        """The rows' `logprobs`, or None when none asks."""
        num_top = self.num_top[slots]
        if not (num_top >= 0).any():
            return None
        return [None if n < 0 else n for n in num_top.tolist()]


class SamplingBatch:
    """Per-request sampling state in slots allocated once; one gather per step."""

    def __init__(
        self,
        max_num_seqs: int,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        device: torch.device,
    ) -> None:
        self.max_num_seqs, self.vocab_size = max_num_seqs, vocab_size
        self.eos_token_ids, self.device = tuple(eos_token_ids), device
        self._requests: dict[str, PreparedRequest] = {}
        self._slot_of: dict[str, int] = {}
        self._seated: list[PreparedRequest | None] = [None] * max_num_seqs  # by slot
        self._free = list(range(max_num_seqs - 1, -1, -1))  # popped from the end: slot 0 first
        self._host = HostColumns.allocate(max_num_seqs)
        self._values = torch.zeros(max_num_seqs, NUM_VALUES, device=device)
        self._output_counts = torch.zeros(  # [max_num_seqs, vocab_size]
            max_num_seqs, vocab_size, dtype=torch.int32, device=device
        )
        self._in_prompt = torch.zeros(  # [max_num_seqs, vocab_size]
            max_num_seqs, vocab_size, dtype=torch.bool, device=device
        )

    def add(
        self, request_id: str, params: SamplingParams, grammar: RequestGrammar | None = None
    ) -> None:
        """Prepare a request's rows (it takes a slot when it first samples)."""
        assert request_id not in self._requests, f"request {request_id!r} added twice"
        # With ignore_eos, EOS ends nothing, so min_tokens has no reason to hold it back.
        eos = () if params.ignore_eos else self.eos_token_ids
        stop_ids = [token for token in [*params.stop_token_ids, *eos] if token < self.vocab_size]
        self._requests[request_id] = PreparedRequest(
            request_id=request_id,
            params=params,
            generator=None if params.seed is None else make_generator(params.seed, self.device),
            grammar=grammar,
            constraints=RequestConstraints.of(params, self.vocab_size),
            min_tokens_stop_ids=np.array(stop_ids, dtype=np.int64),
        )

    def remove(self, request_id: str) -> None:
        """Forget a finished or aborted request; its slot is free for the next."""
        self._requests.pop(request_id, None)
        slot = self._slot_of.pop(request_id, None)
        if slot is not None:
            self._seated[slot] = None
            self._free.append(slot)

    def rows(self, seqs: Sequence[SampledSequence]) -> SamplingRows:
        """The step's rows, one per sequence of `seqs` (plan order), each request added."""
        slots = np.array(
            [self._slot_of.get(seq.request_id, NO_SLOT) for seq in seqs], dtype=np.int64
        )  # [num_rows]
        unseated = np.flatnonzero(slots == NO_SLOT)
        if len(unseated):
            self._seat(seqs, slots, unseated)
        return self._gather(seqs, slots)

    def append(self, rows: SamplingRows, token_ids: Sequence[int]) -> None:
        """Count the token each row drew (in row order) into its request's output. Only the
        penalties read the device counts, so a step without penalized rows touches no tensor."""
        self._host.num_outputs[rows.slots] += 1
        penalized = np.flatnonzero(self._host.penalized[rows.slots])
        if not len(penalized):
            return
        drawn = np.asarray(token_ids, dtype=np.int64)[penalized]
        slots, tokens = to_device([rows.slots[penalized], drawn], self.device)
        ones = torch.ones(len(penalized), dtype=torch.int32, device=self.device)
        self._output_counts.index_put_((slots, tokens), ones, accumulate=True)

    # -- slots -------------------------------------------------------------------------------

    def _seat(self, seqs: Sequence[SampledSequence], slots: np.ndarray, rows: np.ndarray) -> None:
        """Give `rows` slots (written into `slots`) and count the tokens they hold so far."""
        values, prompts, outputs = [], [], []
        for row in rows.tolist():
            seq = seqs[row]
            request = self._requests[seq.request_id]
            slot = slots[row] = self._take_slot(slots)
            self._seated[slot] = request
            self._slot_of[seq.request_id] = slot
            self._host.write(slot, request)
            values.append(slot_values(request.params, self.vocab_size))
            repetition = request.params.repetition_penalty != 1.0
            prompts.append(seq.prompt_token_ids if repetition else ())
            # Counted for the penalties only (`append` counts the same rows).
            outputs.append(seq.output_token_ids if self._host.penalized[slot] else ())
            self._host.num_outputs[slot] = len(seq.output_token_ids)
        new_slots = slots[rows]
        # Only the penalties read a slot's counts: an unpenalized request leaves them stale.
        penalized = new_slots[self._host.penalized[new_slots]]
        slot_index, penalized_index, prompt_slots, prompt_tokens, output_slots, output_tokens = (
            to_device(
                [new_slots, penalized, *flatten(new_slots, prompts), *flatten(new_slots, outputs)],
                self.device,
            )
        )
        self._values[slot_index] = torch.tensor(values, device=self.device)  # [rows, NUM_VALUES]
        if not len(penalized):
            return
        self._in_prompt[penalized_index] = False
        self._in_prompt[prompt_slots, prompt_tokens] = True
        self._output_counts[penalized_index] = 0
        ones = torch.ones(len(output_tokens), dtype=torch.int32, device=self.device)
        self._output_counts.index_put_((output_slots, output_tokens), ones, accumulate=True)

    def _take_slot(self, step_slots: np.ndarray) -> int:
        """A free slot, else that of a request this step does not sample."""
        if self._free:
            return self._free.pop()
        idle = np.setdiff1d(np.arange(self.max_num_seqs), step_slots)
        assert len(idle), f"a step samples more than max_num_seqs ({self.max_num_seqs}) rows"
        slot = int(idle[0])
        del self._slot_of[
            self._at(slot).request_id
        ]  # it counts its tokens again when it next samples
        return slot

    # -- the step's view ---------------------------------------------------------------------

    def _gather(self, seqs: Sequence[SampledSequence], slots: np.ndarray) -> SamplingRows:
        """The view of `slots` (every one seated): one copy of indices to the device."""
        host = self._host
        sampled = np.flatnonzero(~host.greedy[slots])
        unseeded = np.flatnonzero(~host.seeded[slots[sampled]])
        penalized = np.flatnonzero(host.penalized[slots])
        short = np.flatnonzero(host.num_outputs[slots] < host.min_tokens[slots])
        stops = flatten(short, [self._at(slots[row]).min_tokens_stop_ids for row in short])
        slot_index, sampled_index, unseeded_index, penalized_index, stop_rows, stop_ids = to_device(
            [slots, sampled, unseeded, penalized, *stops], self.device
        )
        return SamplingRows(
            num_rows=len(slots),
            slots=slots,
            slot_index=slot_index,
            sampled=self._sampled(slots[sampled], slot_index, sampled_index, unseeded_index),
            penalized=self._penalized(slot_index, penalized_index),
            min_tokens_stops=(stop_rows, stop_ids) if len(short) else None,
            constrained=self._constrained(seqs, slots),
            grammars=[
                (row, self._grammar_at(slots[row]))
                for row in np.flatnonzero(host.has_grammar[slots]).tolist()
            ],
            num_top=host.num_top_list(slots),
        )

    def _sampled(
        self,
        sampled_slots: np.ndarray,
        slot_index: torch.Tensor,
        index: torch.Tensor,
        unseeded: torch.Tensor,
    ) -> SampledRows | None:
        """The rows at `index` that draw (slots `sampled_slots`), or None if none does."""
        if not len(sampled_slots):
            return None
        host = self._host
        seeded = np.flatnonzero(host.seeded[sampled_slots]).tolist()
        return SampledRows(
            index=index,
            values=self._values[slot_index[index]],  # [num_sampled, NUM_VALUES]
            filters_top_k_top_p=bool(host.filters_top_k_top_p[sampled_slots].any()),
            filters_min_p=bool(host.filters_min_p[sampled_slots].any()),
            unseeded=unseeded,
            seeded=[(position, self._generator_at(sampled_slots[position])) for position in seeded],
        )

    def _penalized(self, slot_index: torch.Tensor, index: torch.Tensor) -> PenalizedRows | None:
        """The penalized rows at `index`, with their counts, or None if there are none."""
        if not len(index):
            return None
        slots = slot_index[index]  # [num_penalized]
        return PenalizedRows(
            index=index,
            values=self._values[slots],  # [num_penalized, NUM_VALUES]
            output_counts=self._output_counts[slots],  # [num_penalized, vocab_size]
            in_prompt=self._in_prompt[slots],  # [num_penalized, vocab_size]
        )

    def _constrained(
        self, seqs: Sequence[SampledSequence], slots: np.ndarray
    ) -> list[ConstrainedRow]:
        """The rows with constraints, with the tokens their bad words ban now."""
        constrained = []
        for row in np.flatnonzero(self._host.constrained[slots]).tolist():
            constraints = self._at(slots[row]).constraints
            assert constraints is not None
            banned = (
                constraints.banned_now(seqs[row].output_token_ids) if constraints.bad_words else []
            )
            constrained.append(ConstrainedRow(row, constraints, banned))
        return constrained

    def _at(self, slot: int) -> PreparedRequest:
        request = self._seated[slot]
        assert request is not None, f"slot {slot} is free"
        return request

    def _generator_at(self, slot: int) -> torch.Generator:
        generator = self._at(slot).generator
        assert generator is not None
        return generator

    def _grammar_at(self, slot: int) -> RequestGrammar:
        grammar = self._at(slot).grammar
        assert grammar is not None
        return grammar
