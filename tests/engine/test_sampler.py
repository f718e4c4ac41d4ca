"""The sampler against plain-Python statements of what each parameter means."""

from __future__ import annotations

import math

import pytest
import torch
from sampling_rows_of import SequenceTokens, rows_of

from loraserve.engine.core.sampling_params import SamplingParams
from loraserve.engine.sampling.sampler import apply_penalties, sample
from loraserve.engine.sampling.sampling_batch import SamplingBatch, make_generator

EOS = 1
CHI2_CRITICAL_DF7_P001 = 24.32  # chi-square, 7 degrees of freedom, p = 0.001


def draw_many(logits_row: torch.Tensor, params: SamplingParams, num_draws: int) -> list[int]:
    """`num_draws` independent draws for one row, made as one batch of identical rows."""
    logits = logits_row.unsqueeze(0).expand(num_draws, -1)  # [num_draws, vocab_size]
    output = sample(logits, rows_of([params] * num_draws, logits.shape[1]))
    return output.token_ids


def allowed_tokens(logits_row: torch.Tensor, params: SamplingParams) -> set[int]:
    """Tokens that top_k, then top_p, then min_p leave, computed one token at a time."""
    probs = torch.softmax(logits_row.double() / params.temperature, dim=-1).tolist()
    ranked = sorted(range(len(probs)), key=lambda token: -probs[token])
    if params.effective_top_k:
        ranked = ranked[: params.effective_top_k]
    total = sum(probs[token] for token in ranked)
    kept, mass = [], 0.0
    for token in ranked:
        if mass >= params.top_p:
            break
        kept.append(token)
        mass += probs[token] / total
    best = max(probs[token] for token in kept)
    return {token for token in kept if probs[token] >= params.min_p * best}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    logits = (torch.randn(6, 50) * 3).to(dtype)  # [num_seqs, vocab_size]
    before = logits.clone()
    params = [SamplingParams(temperature=0.0, top_k=2, top_p=0.1)] * 6  # top_k/p irrelevant
    output = sample(logits, rows_of(params, 50))
    assert output.token_ids == logits.float().argmax(dim=-1).tolist()
    assert output.logprobs == [None] * 6
    assert torch.equal(logits, before)  # the caller's logits are not touched


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_draws_follow_softmax(temperature: float) -> None:
    torch.manual_seed(1)
    logits_row = torch.randn(8) * 1.5  # [vocab_size]
    num_draws = 20_000
    tokens = draw_many(logits_row, SamplingParams(temperature=temperature), num_draws)
    observed = torch.bincount(torch.tensor(tokens), minlength=8).double()
    expected = torch.softmax(logits_row.double() / temperature, dim=-1) * num_draws
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_CRITICAL_DF7_P001, (observed.tolist(), expected.tolist())


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(top_k=5),
        SamplingParams(top_p=0.6),
        SamplingParams(top_p=1e-3),  # only the most likely token
        SamplingParams(min_p=0.1),
        SamplingParams(temperature=0.8, top_k=10, top_p=0.8, min_p=0.05),
        SamplingParams(temperature=1.7, top_k=-1, top_p=0.9, min_p=0.02),
    ],
    ids=["top_k", "top_p", "top_p_tiny", "min_p", "all_three", "hot"],
)
def test_filters_draw_exactly_the_allowed_set(params: SamplingParams) -> None:
    torch.manual_seed(2)
    logits_row = torch.randn(32) * 2  # [vocab_size]
    allowed = allowed_tokens(logits_row, params)
    assert 1 <= len(allowed) < 32  # the case really filters something
    drawn = set(draw_many(logits_row, params, 20_000))
    assert drawn == allowed  # nothing outside, and every allowed token does come up


def penalized_by_loop(logits: torch.Tensor, params, histories) -> list[list[float]]:
    """The penalty formulas, one token at a time, in float64."""
    result = []
    for row, (p, history) in enumerate(zip(params, histories, strict=True)):
        values = logits[row].double().tolist()
        for token in set(history.prompt_token_ids) | set(history.output_token_ids):
            if values[token] > 0:
                values[token] /= p.repetition_penalty
            else:
                values[token] *= p.repetition_penalty
        for token in range(len(values)):
            count = history.output_token_ids.count(token)
            values[token] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
        result.append(values)
    return result


def test_penalties_follow_the_formulas() -> None:
    torch.manual_seed(3)
    vocab_size = 40
    logits = torch.randn(4, vocab_size) * 3  # [num_seqs, vocab_size]
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(frequency_penalty=0.7, presence_penalty=-0.4),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=-1.1, presence_penalty=1.9),
        SamplingParams(),
    ]
    histories = [
        SequenceTokens(
            torch.randint(vocab_size, (12,)).tolist(), torch.randint(vocab_size, (20,)).tolist()
        )
        for _ in range(4)
    ]
    expected = torch.tensor(penalized_by_loop(logits, params, histories), dtype=torch.float32)
    penalized = logits.clone()
    rows = rows_of(params, vocab_size, histories)
    assert rows.penalized is not None
    apply_penalties(penalized, rows.penalized)
    torch.testing.assert_close(penalized, expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(penalized[:3], logits[:3]) and torch.equal(penalized[3], logits[3])


def test_repetition_penalty_changes_the_greedy_choice() -> None:
    logits = torch.tensor([[0.0, 0.0, 3.0, 2.0]])
    params = [SamplingParams(temperature=0.0, repetition_penalty=2.0)]
    assert sample(logits, rows_of(params, 4, [SequenceTokens([2])])).token_ids == [3]
    assert sample(logits, rows_of(params, 4)).token_ids == [2]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_masks_eos_and_stop_ids_until_reached(temperature: float) -> None:
    logits = torch.tensor([[0.0, 20.0, 0.0, 0.0, 0.0, 0.0, 0.0, 19.0]])  # EOS, then 7
    params = [SamplingParams(temperature=temperature, min_tokens=3, stop_token_ids=[7])]
    short = rows_of(params * 50, 8, [SequenceTokens([5], [4, 4])] * 50, [EOS])
    assert not {EOS, 7} & set(sample(logits.expand(50, -1), short).token_ids)
    done = sample(logits, rows_of(params, 8, [SequenceTokens([5], [4, 4, 4])], [EOS]))
    assert temperature > 0 or done.token_ids == [EOS]
    ignoring = [SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True)]
    early = sample(logits, rows_of(ignoring, 8, [SequenceTokens([5])], [EOS]))
    assert early.token_ids == [EOS]  # EOS does not end this request, so it is not delayed


def steps_of_target(position: int, batch_size: int, seed: int, num_steps: int = 8) -> list[int]:
    """Tokens a seeded request draws over `num_steps` steps, sitting at `position` in the batch
    among requests that start and finish around it (one of them seeded too)."""
    target_logits = torch.randn(num_steps, 100, generator=torch.Generator().manual_seed(9))
    batch = SamplingBatch(batch_size, 100, (), torch.device("cpu"))
    batch.add("target", SamplingParams(temperature=1.0, seed=seed))
    tokens = []
    for step in range(num_steps):
        logits = torch.randn(batch_size, 100)  # other rows: whatever
        logits[position] = target_logits[step]
        others = [f"{step}-{row}" for row in range(batch_size - 1)]
        for row, request_id in enumerate(others):
            batch.add(request_id, SamplingParams(temperature=0.9, seed=step if row == 0 else None))
        request_ids = [*others[:position], "target", *others[position:]]
        rows = batch.rows([SequenceTokens([3], [], request_id) for request_id in request_ids])
        output = sample(logits, rows)
        batch.append(rows, output.token_ids)
        for request_id in others:
            batch.remove(request_id)
        tokens.append(output.token_ids[position])
    return tokens


def test_seeded_request_is_reproducible_whatever_the_batch() -> None:
    torch.manual_seed(4)
    alone = steps_of_target(position=0, batch_size=1, seed=1234)
    torch.manual_seed(5)  # the default generator's state must not matter either
    crowded = steps_of_target(position=3, batch_size=6, seed=1234)
    assert alone == crowded
    assert steps_of_target(position=1, batch_size=2, seed=4321) != alone


@pytest.mark.parametrize("seed", [-1, 2**64 + 5, 0])
def test_make_generator_takes_any_int_seed(seed: int) -> None:
    first = torch.rand(3, generator=make_generator(seed, "cpu"))
    assert torch.equal(first, torch.rand(3, generator=make_generator(seed, "cpu")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_are_raw_and_sorted(dtype: torch.dtype) -> None:
    torch.manual_seed(6)
    logits = (torch.randn(4, 64) * 2).to(dtype)  # [num_seqs, vocab_size]
    raw_argmax = int(logits[0].float().argmax())
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=2.0, logprobs=5),
        SamplingParams(temperature=0.5, presence_penalty=1.0, logprobs=0),
        SamplingParams(temperature=1.3, top_k=3, logprobs=20),
        SamplingParams(),
    ]
    histories = [SequenceTokens([raw_argmax]), *[SequenceTokens([]) for _ in range(3)]]
    output = sample(logits, rows_of(params, 64, histories))
    expected = torch.log_softmax(logits.float(), dim=-1)  # [num_seqs, vocab_size]
    assert output.logprobs[3] is None
    for row, p in enumerate(params[:3]):
        entry = output.logprobs[row]
        assert entry is not None and entry.token_id == output.token_ids[row]
        assert math.isclose(entry.logprob, float(expected[row, entry.token_id]), abs_tol=1e-6)
        assert entry.rank == 1 + int((expected[row] > expected[row, entry.token_id]).sum())
        assert len(entry.top_logprobs) == p.logprobs
        values = [value for _, value in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.top_logprobs == list(
            zip(*[t.tolist() for t in expected[row].topk(p.logprobs or 0)][::-1], strict=True)
        )
    assert output.logprobs[0] is not None and output.logprobs[0].rank > 1  # penalty moved it
