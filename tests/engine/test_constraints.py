"""Per-request constraints and prompt logprobs against PEFT, through the real engine.

- A grammar that admits the unconstrained greedy answer leaves it unchanged (mixed batch).
- logit_bias: the first token is PEFT's argmax of the biased logits.
- allowed_token_ids / bad_words: the tokens they exclude never come out.
- JSON schema output parses and validates for every adapter of a mixed batch.
- prompt_logprobs equal PEFT's log-likelihoods, once per prompt token, with prompts
  chunked by a tiny token budget and requests preempted by a tiny pool.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from factories import greedy_reference, make_adapter, make_model, peft_model_for

from loraserve import LLM, SamplingParams
from loraserve.engine.sampling.structured import JSON_WHITESPACE, StructuredOutputs, public_error
from loraserve.errors import InvalidRequestError

NEW_TOKENS = 12
ADAPTERS = {
    "attn8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp4": dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
}
REQUESTS = [
    ("attn8", "hello world"),
    (None, "SELECT name FROM users"),
    ("mlp4", "Bonjour le monde"),
    ("attn8", "The quick brown fox"),
]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "kind": {"enum": ["cat", "dog"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "kind", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("constraints")
    # ASCII-only vocabulary: every answer is valid UTF-8, so a grammar over text can admit it.
    # Seed 9: no greedy answer below holds a special token (which no text grammar admits).
    base = make_model(root / "model", "llama", seed=9, all_bytes=False)
    folders = {
        name: make_adapter(base, root / name, seed=20 + i, **config)
        for i, (name, config) in enumerate(ADAPTERS.items())
    }
    peft = {name: peft_model_for(base, folder) for name, folder in folders.items()}
    models = {None: base, **peft}
    return root, folders, models


def make_llm(setup, **options) -> LLM:
    root, folders, _ = setup
    return LLM(root / "model", adapters=folders, device="cpu", dtype="float32", **options)


def references(llm: LLM, models) -> list[tuple[list[int], list[int], torch.Tensor]]:
    """(prompt ids, PEFT's greedy tokens, its step logits) per request."""
    result = []
    for adapter, text in REQUESTS:
        prompt = llm.tokenizer.encode(text)
        tokens, logits = greedy_reference(models[adapter], prompt, NEW_TOKENS)
        result.append((prompt, tokens, logits))
    return result


def greedy(**extra) -> SamplingParams:
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, **extra)


def test_a_grammar_admitting_the_greedy_answer_changes_nothing(setup) -> None:
    llm = make_llm(setup)
    refs = references(llm, setup[2])
    params = []
    for _, tokens, _ in refs:
        text = llm.tokenizer.decode(tokens)
        # The greedy text, or another answer that shares its start: a real constraint.
        regex = f"({re.escape(text)})|({re.escape(text[:2])}zz)"
        params.append(greedy(structured_outputs=StructuredOutputs(regex=regex)))
    outputs = llm.generate(
        prompt_token_ids=[p for p, _, _ in refs],
        sampling_params=params,
        adapter=[a for a, _ in REQUESTS],
    )
    for output, (_, tokens, _) in zip(outputs, refs, strict=True):
        assert output.token_ids == tokens
        assert output.finish_reason in ("stop", "length")


def test_logit_bias_moves_the_first_token_as_peft_logits_say(setup) -> None:
    llm = make_llm(setup)
    refs = references(llm, setup[2])
    params, expected = [], []
    for _, tokens, logits in refs:
        bias = {tokens[0]: -100.0, (tokens[0] + 7) % logits.shape[1]: 3.5}
        biased = logits[0].clone()
        for token, value in bias.items():
            biased[token] += value
        expected.append(int(biased.argmax()))
        params.append(greedy(logit_bias=bias))
    outputs = llm.generate(
        prompt_token_ids=[p for p, _, _ in refs], sampling_params=params,
        adapter=[a for a, _ in REQUESTS],
    )  # fmt: skip
    assert [output.token_ids[0] for output in outputs] == expected
    assert all(
        output.token_ids[0] != tokens[0]
        for output, (_, tokens, _) in zip(outputs, refs, strict=False)
    )


def test_allowed_token_ids_and_bad_words_exclude_tokens(setup) -> None:
    llm = make_llm(setup)
    refs = references(llm, setup[2])
    prompt, tokens, _ = refs[0]
    allowed = sorted({tokens[1], tokens[2], 5, 6})
    (restricted,) = llm.generate(
        prompt_token_ids=[prompt], sampling_params=greedy(allowed_token_ids=allowed)
    )
    assert set(restricted.token_ids) <= set(allowed)
    # A bad word of two tokens: its second is banned only right after its first.
    word = [tokens[0], tokens[1]]
    (banned,) = llm.generate(
        prompt_token_ids=[prompt],
        sampling_params=greedy(bad_words_token_ids=[word]),
        adapter="attn8",
    )
    assert banned.token_ids[0] == tokens[0]
    assert banned.token_ids[1] != tokens[1]
    pairs = zip(banned.token_ids, banned.token_ids[1:], strict=False)
    assert all([a, b] != word for a, b in pairs)


def test_json_schema_output_validates_for_every_adapter_of_a_mixed_batch(setup) -> None:
    llm = make_llm(setup)
    constraint = StructuredOutputs(json=SCHEMA)
    params = SamplingParams(max_tokens=200, temperature=1.0, seed=0, structured_outputs=constraint)
    adapters = [a for a, _ in REQUESTS] * 2
    prompts = [text for _, text in REQUESTS] * 2
    outputs = llm.generate(prompts, params, adapter=adapters)
    for output in outputs:
        assert output.finish_reason == "stop", (output.text, output.outputs[0].error)
        jsonschema.validate(json.loads(output.text), SCHEMA)


def test_a_grammar_that_does_not_compile_is_refused(setup) -> None:
    llm = make_llm(setup)
    with pytest.raises(InvalidRequestError, match="regex"):
        llm.generate("hello", greedy(structured_outputs=StructuredOutputs(regex="a(")))
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutputs(regex="a", choice=["b"])
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"max_num_batched_tokens": 5, "max_num_seqs": 5},  # every prompt in several chunks
        {"block_size": 8, "pool_pages": 8, "max_num_batched_tokens": 16, "max_num_seqs": 8},
    ],
    ids=["whole", "chunked", "preempted"],
)
def test_prompt_logprobs_equal_peft_once_per_prompt_token(setup, options) -> None:
    llm = make_llm(setup, **options)
    _, _, models = setup
    long_text = "hello world, this is a tiny corpus for a tiny tokenizer. SELECT name"
    requests = [*REQUESTS, ("mlp4", long_text)]
    prompts = [llm.tokenizer.encode(text) for _, text in requests]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    outputs = llm.generate(
        prompt_token_ids=prompts, sampling_params=params, adapter=[a for a, _ in requests]
    )
    if "pool_pages" in options:
        assert llm.engine.num_preemptions > 0
    for (adapter, _), prompt, output in zip(requests, prompts, outputs, strict=True):
        with torch.no_grad():
            logits = models[adapter](input_ids=torch.tensor([prompt])).logits[0].float()
        expected = torch.log_softmax(logits, dim=-1)  # [prompt_len, vocab]
        entries = output.outputs[0].prompt_logprobs
        assert entries is not None and len(entries) == len(prompt)
        assert entries[0] is None
        for position, entry in enumerate(entries[1:], start=1):
            assert entry is not None and entry.token_id == prompt[position]
            want = expected[position - 1, prompt[position]].item()
            assert entry.logprob == pytest.approx(want, abs=1e-4)
            assert len(entry.top_logprobs) == 2
            assert entry.top_logprobs[0][0] == int(expected[position - 1].argmax())


def test_bitmasks_apply_to_their_rows_only_bit_by_bit() -> None:
    """Bit t % 32 of word t // 32 allows token t, the sign bit (31) included; rows without
    a grammar are untouched; tokens past the mask's width are refused."""
    from loraserve.engine.sampling.constraints import GrammarMasks, apply_constraints

    torch.manual_seed(0)
    vocab_size = 70  # three words, the last partly past the vocabulary
    logits = torch.randn(4, vocab_size)
    before = logits.clone()
    allowed = {1: [0, 31, 32, 63], 3: [5, 64, 69]}
    bitmask = torch.zeros(2, 2, dtype=torch.int32)  # two words: tokens 64.. are outside
    for position, tokens in enumerate(allowed.values()):
        for token in tokens:
            if token < 64:
                word = int(bitmask[position, token // 32]) | (1 << (token % 32))
                bitmask[position, token // 32] = word - (1 << 32) if word >= 1 << 31 else word
    apply_constraints(logits, [], GrammarMasks([1, 3], bitmask))
    for row in (0, 2):
        assert torch.equal(logits[row], before[row])
    for row, tokens in allowed.items():
        kept = {t for t in tokens if t < 64}
        for token in range(vocab_size):
            expected = before[row, token].item() if token in kept else float("-inf")
            assert logits[row, token].item() == expected


def test_disable_additional_properties_closes_every_object_that_does_not_say() -> None:
    schema = {
        "type": "object",
        "properties": {
            "inner": {"type": "object", "properties": {"a": {"type": "integer"}}},
            "open": {"type": "object", "additionalProperties": True},
            "list": {"type": "array", "items": {"properties": {"b": {"type": "string"}}}},
        },
    }
    closed = StructuredOutputs(json=schema, disable_additional_properties=True)
    grammar_schema = json.loads(closed.to_grammar().split("%json ", 1)[1])
    properties = grammar_schema["properties"]
    assert grammar_schema["additionalProperties"] is False
    assert properties["inner"]["additionalProperties"] is False
    assert properties["open"]["additionalProperties"] is True
    assert properties["list"]["items"]["additionalProperties"] is False
    untouched = json.loads(StructuredOutputs(json=schema).to_grammar().split("%json ", 1)[1])
    assert "additionalProperties" not in untouched


@pytest.mark.parametrize(
    "options",
    [
        {"json": {"type": "object", "x-guidance": {"whitespace_pattern": "\\s*"}}},
        {"json_object": True, "whitespace_pattern": "[ \\n]+"},
        {"json_object": True, "whitespace_pattern": "\\s{0,10}"},
        {"json_object": True, "whitespace_pattern": "(unclosed"},
    ],
)
def test_a_request_cannot_widen_the_whitespace_between_json_tokens(options) -> None:
    with pytest.raises(InvalidRequestError, match=r"x-guidance|whitespace_pattern"):
        StructuredOutputs(**options)


def test_the_whitespace_bound_allows_one_space_or_one_break_and_an_indent() -> None:
    for allowed in ("", " ", "\n", "\n" + " " * 8):
        assert re.fullmatch(JSON_WHITESPACE, allowed), repr(allowed)
    for refused in ("\n\n", "  ", "\t", "\n" + " " * 9, "\r\n"):
        assert not re.fullmatch(JSON_WHITESPACE, refused), repr(refused)


def test_client_errors_carry_no_parser_state() -> None:
    dump = (
        'lexer error: too many expressions constructed\n<state>\nTokens: ...\nParser: {"rows": 1}'
    )
    assert public_error(dump) == "lexer error: too many expressions constructed"
    assert "admits no output" in public_error("NoExtensionBias\n<state>...")
    assert len(public_error("x" * 10_000)) <= 203
    row_limit = (
        "Parser Error: Current row has 6450 items; max is 2000; consider making your grammar "
        "left-recursive if it's right-recursive"
    )
    assert public_error(row_limit) == (
        "the constraint is too wide for this server's parser (over 2,000 items in a row)"
    )


@pytest.mark.slow
def test_structured_output_and_prompt_logprobs_on_two_ranks_as_on_one(setup) -> None:
    """Tensor parallelism (2 ranks, gloo): rank 0 keeps the grammars and samples; the other
    rank's batch carries the prompt-logprob rows too. Same answers, schema-valid."""
    constraint = StructuredOutputs(json=SCHEMA)
    params = SamplingParams(
        max_tokens=200, temperature=0.0, structured_outputs=constraint, prompt_logprobs=2
    )
    adapters = [a for a, _ in REQUESTS]
    prompts = [text for _, text in REQUESTS]
    one = make_llm(setup).generate(prompts, params, adapter=adapters)
    two = make_llm(setup, tensor_parallel_size=2).generate(prompts, params, adapter=adapters)
    for ours, theirs in zip(two, one, strict=True):
        assert ours.finish_reason == "stop", (ours.text, ours.outputs[0].error)
        jsonschema.validate(json.loads(ours.text), SCHEMA)
        assert ours.token_ids == theirs.token_ids
        mine_all, theirs_all = ours.outputs[0].prompt_logprobs, theirs.outputs[0].prompt_logprobs
        assert mine_all is not None and theirs_all is not None
        for mine, reference in zip(mine_all, theirs_all, strict=True):
            if reference is None:  # the first prompt token has none
                assert mine is None
                continue
            assert mine.token_id == reference.token_id
            assert mine.logprob == pytest.approx(reference.logprob, abs=1e-4)
