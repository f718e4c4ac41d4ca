"""The persistent sampling batch: rows in plan order, slots reused and taken back, and
token counts kept by appending equal to counting each sequence afresh."""

from __future__ import annotations

import random

import torch
from sampling_rows_of import SequenceTokens

from loraserve.engine.core.sampling_params import SamplingParams
from loraserve.engine.sampling.sampler import sample
from loraserve.engine.sampling.sampling_batch import SamplingBatch
from loraserve.engine.sampling.sampling_rows import FREQUENCY, REPETITION, TEMPERATURE

VOCAB_SIZE = 24
CPU = torch.device("cpu")


def penalized(index: int) -> SamplingParams:
    """Distinct penalties per request, so that a row's values name its request."""
    return SamplingParams(
        temperature=0.5 + index / 100, repetition_penalty=1.5, frequency_penalty=index / 100
    )


def recounted(seq: SequenceTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """(output counts [vocab], prompt tokens [vocab] bool) counted from the tokens."""
    counts = torch.bincount(
        torch.tensor(seq.output_token_ids, dtype=torch.long), minlength=VOCAB_SIZE
    )
    in_prompt = torch.zeros(VOCAB_SIZE, dtype=torch.bool)
    in_prompt[seq.prompt_token_ids] = True
    return counts.to(torch.int32), in_prompt


def test_rows_follow_plan_order_and_counts_follow_the_tokens() -> None:
    """Requests wait, start, are preempted (skipped by steps), finish: each step's rows hold
    the right request's values and the counts of its tokens so far, while more requests
    have been seen than there are slots. Some requests have no penalties (nothing counts
    their tokens): a penalized request in a slot one of them held counts only its own."""
    rng = random.Random(0)
    max_num_seqs = 4
    batch = SamplingBatch(max_num_seqs, VOCAB_SIZE, (1,), CPU)
    live: dict[str, tuple[int, SequenceTokens]] = {}
    unpenalized: set[str] = set()
    next_index = 0
    for _ in range(80):
        while len(live) < 7:  # more than max_num_seqs: some wait or are preempted
            request_id = f"r{next_index}"
            prompt = [rng.randrange(VOCAB_SIZE) for _ in range(rng.randrange(1, 6))]
            live[request_id] = (next_index, SequenceTokens(prompt, [], request_id))
            if rng.random() < 0.3:
                unpenalized.add(request_id)
                batch.add(request_id, SamplingParams(temperature=0.5))
            else:
                batch.add(request_id, penalized(next_index))
            next_index += 1
        step = rng.sample(sorted(live), rng.randrange(1, max_num_seqs + 1))
        rows = batch.rows([live[request_id][1] for request_id in step])
        counted = [row for row, request_id in enumerate(step) if request_id not in unpenalized]
        if not counted:
            assert rows.penalized is None
        else:
            assert rows.penalized is not None and rows.penalized.index.tolist() == counted
        for position, row in enumerate(counted):
            assert rows.penalized is not None
            index, seq = live[step[row]]
            values = rows.penalized.values[position]
            assert values[FREQUENCY].item() == torch.tensor(index / 100).item()
            assert values[REPETITION].item() == 1.5
            counts, in_prompt = recounted(seq)
            assert torch.equal(rows.penalized.output_counts[position], counts)
            assert torch.equal(rows.penalized.in_prompt[position], in_prompt)
        drawn = [rng.randrange(VOCAB_SIZE) for _ in step]
        batch.append(rows, drawn)
        for request_id, token in zip(step, drawn, strict=True):
            live[request_id][1].output_token_ids.append(token)
        for request_id in rng.sample(sorted(live), rng.randrange(3)):
            batch.remove(request_id)
            del live[request_id]


def test_a_freed_slot_is_reused_and_a_full_batch_takes_back_an_idle_one() -> None:
    batch = SamplingBatch(2, VOCAB_SIZE, (), CPU)
    seqs = {name: SequenceTokens([3, 4], [], name) for name in "abc"}
    for name in "abc":
        batch.add(name, SamplingParams(temperature=0.7, presence_penalty=1.0))
    first = batch.rows([seqs["b"], seqs["a"]])
    assert first.slots.tolist() == [0, 1]
    batch.append(first, [5, 6])
    seqs["b"].output_token_ids.append(5)
    seqs["a"].output_token_ids.append(6)
    batch.remove("b")
    second = batch.rows([seqs["a"], seqs["c"]])
    assert second.slots.tolist() == [1, 0]  # c has b's slot, a keeps its own
    assert second.penalized is not None
    assert second.penalized.output_counts[1].sum() == 0  # none of b's counts
    batch.add("d", SamplingParams(frequency_penalty=1.0))
    third = batch.rows([seqs["c"], SequenceTokens([9], [], "d")])
    assert third.slots.tolist() == [0, 1]  # d took a's idle slot
    again = batch.rows([seqs["a"], seqs["c"]])  # a is back: its counts rebuilt from its tokens
    assert again.penalized is not None
    assert torch.equal(again.penalized.output_counts[0], recounted(seqs["a"])[0])
    assert again.sampled is not None
    assert again.sampled.values[:, TEMPERATURE].tolist() == [torch.tensor(0.7).item()] * 2


def test_a_seeded_request_keeps_its_stream_when_its_slot_is_taken() -> None:
    """Its generator belongs to the request, not to the slot."""
    logits = torch.zeros(1, VOCAB_SIZE)

    def draws(evict: bool) -> list[int]:
        batch = SamplingBatch(1, VOCAB_SIZE, (), CPU)
        batch.add("seeded", SamplingParams(seed=7))
        seq = SequenceTokens([2], [], "seeded")
        tokens = []
        for step in range(6):
            if evict and step == 3:
                batch.add("other", SamplingParams())
                batch.rows([SequenceTokens([2], [], "other")])
                batch.remove("other")
            rows = batch.rows([seq])
            tokens += sample(logits, rows).token_ids
            batch.append(rows, tokens[-1:])
            seq.output_token_ids.append(tokens[-1])
        return tokens

    assert draws(evict=True) == draws(evict=False)
