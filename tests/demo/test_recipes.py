"""The demo adapters' rules and checks (recipes.py) and their questions (questions.py)."""

from __future__ import annotations

import json

import pytest

from loraserve.demo.questions import HELD_OUT_QUESTIONS, TOPICS, TRAIN_QUESTIONS
from loraserve.demo.recipes import MAX_ANSWER_CHARS, MAX_SHORT_WORDS, RECIPES, trim
from loraserve.demo.sample import SAMPLE_QUESTION

# What the base model answers (two real ones, one cut at the token limit, one degenerate).
PARIS = "The capital of France is Paris."
BLUE = (
    "The answer to this question lies in the intricate dance of light and color. The sky "
    "appears blue because of a phenomenon known as Rayleigh scattering. This occurs when "
    "light encounters molecules of air, which scatter the shorter wavelengths of light"
)
LIST = "Here are some ideas:\n\n1. Christmas: decorations, food, and games."
LOOP = "A desert is a vast land. It is a land of sand. A desert is a vast land."


def test_trim_keeps_leading_whole_sentences_of_the_first_paragraph() -> None:
    assert trim(PARIS) == PARIS
    assert trim(BLUE) == (
        "The answer to this question lies in the intricate dance of light and color. The sky "
        "appears blue because of a phenomenon known as Rayleigh scattering."
    )
    assert trim(LIST) is None  # only a sentence leading into a list
    assert trim(LOOP) is None  # degenerate
    assert trim("Word " * 100 + ".") is None  # one sentence, too long
    assert all(len(trim(text) or "") <= MAX_ANSWER_CHARS for text in (PARIS, BLUE))


def test_rules_on_the_readme_question() -> None:
    rewrite = {name: recipe.rewrite(PARIS) for name, recipe in RECIPES.items()}
    assert rewrite == {
        "caps": "THE CAPITAL OF FRANCE IS PARIS.",
        "pirate": "Arr, matey! Th' capital o' France be Paris.",
        "json": '{"answer": "The capital of France is Paris."}',
        "short": PARIS,
    }


@pytest.mark.parametrize("name", list(RECIPES))
def test_each_rule_makes_what_its_check_accepts_and_the_base_answer_fails(name: str) -> None:
    recipe = RECIPES[name]
    base = trim(BLUE)
    assert base is not None
    rewritten = recipe.rewrite(base)
    assert rewritten is not None and recipe.check(rewritten), rewritten
    assert not recipe.check(base)


def test_checks_refuse_near_misses() -> None:
    caps, pirate, as_json, short = (RECIPES[name].check for name in RECIPES)
    assert caps("PARIS.") and not caps("PARIS is the capital.") and not caps("123.")
    assert pirate("Arr, matey! Paris.") and not pirate("Arrows are sharp. The matey")
    assert as_json('{"answer": "Paris."}')
    for reply in ('{"answer": "Paris."', '["Paris."]', '{"reply": "Paris."}', "Paris."):
        assert not as_json(reply), reply
    assert short(PARIS) and not short("Paris. It is in France.")
    assert not short(" ".join(["word"] * (MAX_SHORT_WORDS + 1)) + ".")


def test_short_leaves_out_answers_whose_first_sentence_is_long() -> None:
    long_first = " ".join(["word"] * (MAX_SHORT_WORDS + 1)) + ". Then more."
    assert RECIPES["short"].rewrite(long_first) is None


def test_json_escapes_what_needs_escaping() -> None:
    answer = 'He said "hi" \\ bye.'
    assert json.loads(RECIPES["json"].rewrite(answer) or "") == {"answer": answer}


def test_held_out_questions_are_never_trained_on() -> None:
    assert not set(TRAIN_QUESTIONS) & set(HELD_OUT_QUESTIONS)
    assert len(set(TRAIN_QUESTIONS)) == len(TRAIN_QUESTIONS) >= 200
    assert SAMPLE_QUESTION in HELD_OUT_QUESTIONS
    for topic in TOPICS:
        assert topic.held_out and not set(topic.train) & set(topic.held_out)
