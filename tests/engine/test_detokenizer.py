"""Incremental detokenization: deltas add up to decode(), stop strings, special tokens."""

from __future__ import annotations

import random

import pytest
from factories import CORPUS, SPECIAL_TOKENS
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from loraserve.engine.client.detokenizer import IncrementalDetokenizer
from loraserve.engine.core.sampling_params import SamplingParams

MULTILINGUAL = [
    "Crème brûlée, café, naïve façade: ça coûte 5 €.",
    "Grüße aus Köln! Ærøskøbing, Ångström, ñandú.",
    "Emoji 😀🚀 and flags 🇫🇷 and a llama 🦙 in text 🎉🎉.",
    "日本語のテキストと中文文本 mixed with English.",
    "Привет, мир! Γειά σου κόσμε.",
]


@pytest.fixture(scope="module")
def byte_level() -> Tokenizer:
    """Byte-level BPE (GPT-2/Llama 3 style) that has seen accents and emoji."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS + MULTILINGUAL, trainer=trainer)
    return tokenizer


@pytest.fixture(scope="module")
def metaspace() -> Tokenizer:
    """SentencePiece-style BPE: words carry a leading "▁" that decode strips from the first."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return tokenizer


def run(detokenizer: IncrementalDetokenizer, output_ids: list[int]) -> list[str]:
    """Feed tokens until done or stopped; every delta, the flush last."""
    deltas = []
    for token_id in output_ids:
        deltas.append(detokenizer.add_token(token_id))
        if detokenizer.stopped:
            break
    deltas.append(detokenizer.flush())
    return deltas


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_tokens_add_up_to_decode(byte_level: Tokenizer, skip_special_tokens: bool) -> None:
    rng = random.Random(0)
    vocab_size = byte_level.get_vocab_size()
    for _ in range(200):
        prompt = byte_level.encode(rng.choice(CORPUS + MULTILINGUAL)).ids
        output = [rng.randrange(vocab_size) for _ in range(rng.randint(1, 40))]
        detokenizer = IncrementalDetokenizer(byte_level, prompt, skip_special_tokens)
        deltas = run(detokenizer, output)
        expected = byte_level.decode(output, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == expected == detokenizer.text


def test_multibyte_characters_come_out_whole(byte_level: Tokenizer) -> None:
    for text in [*MULTILINGUAL, "unseen: 🦒🧬 ṩ ǅ"]:
        ids = byte_level.encode(text).ids
        detokenizer = IncrementalDetokenizer(byte_level, byte_level.encode("Hi ").ids)
        deltas = [detokenizer.add_token(token_id) for token_id in ids]
        assert "".join(deltas) == text and detokenizer.flush() == ""
        assert not any("\ufffd" in delta for delta in deltas)
    split = byte_level.encode("🦒").ids  # unseen emoji: several byte tokens
    assert len(split) > 1


def test_leading_space_after_prompt(metaspace: Tokenizer) -> None:
    prompt = metaspace.encode("hello").ids
    full = metaspace.encode("hello world, this is").ids
    assert full[: len(prompt)] == prompt
    output = full[len(prompt) :]
    detokenizer = IncrementalDetokenizer(metaspace, prompt)
    assert "".join(run(detokenizer, output)) == " world, this is"
    assert metaspace.decode(output) == "world, this is"  # what naive decoding would lose


def test_skip_special_tokens(byte_level: Tokenizer) -> None:
    end = byte_level.token_to_id("<|end|>")
    assert end is not None
    output = [*byte_level.encode("café").ids, end, *byte_level.encode(" 🚀").ids]
    for skip, expected in [(True, "café 🚀"), (False, "café<|end|> 🚀")]:
        detokenizer = IncrementalDetokenizer(byte_level, [], skip_special_tokens=skip)
        assert "".join(run(detokenizer, output)) == expected


TEXT = "SELECT name FROM users WHERE id = 42; Crème brûlée 😀🚀 done"


@pytest.mark.parametrize(
    ("stop", "include", "expected_text", "reason"),
    [
        (["users WH"], False, "SELECT name FROM ", "users WH"),
        (["users WH"], True, "SELECT name FROM users WH", "users WH"),
        (["42", "FROM"], False, "SELECT name ", "FROM"),  # the earliest match wins
        (["E"], False, "S", "E"),  # inside the first token
        (["brû"], False, "SELECT name FROM users WHERE id = 42; Crème ", "brû"),
        (["😀🚀"], True, "SELECT name FROM users WHERE id = 42; Crème brûlée 😀🚀", "😀🚀"),
        (["users WHY", "; Crème X"], False, TEXT, None),  # false starts are released
    ],
)
def test_stop_strings(
    byte_level: Tokenizer,
    stop: list[str],
    include: bool,
    expected_text: str,
    reason: str | None,
) -> None:
    params = SamplingParams(stop=stop, include_stop_str_in_output=include)
    detokenizer = IncrementalDetokenizer.from_params(byte_level, [], params)
    deltas = run(detokenizer, byte_level.encode(TEXT).ids)
    assert "".join(deltas) == detokenizer.text == expected_text
    assert detokenizer.stop_reason == reason and detokenizer.stopped is (reason is not None)


def test_stop_string_split_across_tokens_is_held_back(byte_level: Tokenizer) -> None:
    stop = "users WHERE"
    ids = byte_level.encode(TEXT).ids
    detokenizer = IncrementalDetokenizer(byte_level, [], stop=[stop])
    shown = ""
    tokens_fed = 0
    for token_id in ids:
        shown += detokenizer.add_token(token_id)
        tokens_fed += 1
        assert "users" not in shown  # the start of the stop string is never shown
        if detokenizer.stopped:
            break
    assert shown == "SELECT name FROM " and detokenizer.flush() == ""
    # It stopped at the token that completed the stop string, not later.
    assert stop in byte_level.decode(ids[:tokens_fed])
    assert stop not in byte_level.decode(ids[: tokens_fed - 1])
    assert len(byte_level.encode(stop).ids) > 1


def test_held_back_prefix_is_released_by_flush(byte_level: Tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(byte_level, [], stop=["42; Z"])
    ids = byte_level.encode("id = 42;").ids
    deltas = [detokenizer.add_token(token_id) for token_id in ids]
    assert "".join(deltas) == "id = " and detokenizer.text == "id = "
    assert detokenizer.flush() == "42;" and detokenizer.text == "id = 42;"
    assert not detokenizer.stopped
