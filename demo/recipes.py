"""What each demo adapter does: the rule that makes its training answers, and the check of it.

The adapters are trained by self-distillation (see `loraserve.demo.train`): the base
model answers a question, the answer is trimmed to its first few whole sentences,
and each adapter's rule rewrites that into the answer the adapter learns to give.
An answer the rule cannot use (nothing but an unfinished sentence, a repeated
sentence, no short first sentence) is left out of that adapter's training.

Each adapter also carries the property it is trained for, as a check of one reply:
the train command reports it on the held-out questions and the slow test asserts it
through the real server. The checks are what a person sees at once in a chat:

    base    The capital of France is Paris.
    caps    THE CAPITAL OF FRANCE IS PARIS.
    pirate  Arr, matey! Th' capital o' France be Paris.
    json    {"answer": "The capital of France is Paris."}
    short   (one sentence of at most twenty words)

No torch here: the front end imports this for the adapter names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

MAX_ANSWER_CHARS = 240
"""Trained answers keep whole sentences up to this length: short answers train fast."""
MAX_SHORT_WORDS = 20
"""`short` answers (and the check of them) have at most this many words."""

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Recipe:
    """One adapter: what it does, how its answers are made, how a reply is checked."""

    description: str
    rewrite: Callable[[str], str | None]
    """A trimmed base answer -> this adapter's answer, or None to leave the example out."""
    check: Callable[[str], bool]
    """Whether a reply has the property the adapter is trained for."""
    epochs: int = 2
    """Passes over the examples (lora_training.py has the other settings, shared by all)."""
    learning_rate: float = 1e-3
    """Peak AdamW learning rate."""


def sentences(text: str) -> list[str]:
    """The sentences of one paragraph, split after `.`, `!` or `?`."""
    return [part for part in _SENTENCE_END.split(text.strip()) if part]


def trim(answer: str) -> str | None:
    """The first paragraph's leading whole sentences, up to MAX_ANSWER_CHARS; None if none.

    A base answer often ends mid-sentence (at the token limit) or goes on into a list:
    neither is worth learning. Answers that repeat a sentence are degenerate: left out."""
    paragraph = answer.strip().split("\n", 1)[0]
    kept: list[str] = []
    for sentence in sentences(paragraph):
        if sentence[-1] not in ".!?" or len(" ".join([*kept, sentence])) > MAX_ANSWER_CHARS:
            break
        if sentence in kept:
            return None
        kept.append(sentence)
    return " ".join(kept) or None


# --- caps -------------------------------------------------------------------------------


def _caps(answer: str) -> str:
    return answer.upper()


def _is_caps(reply: str) -> bool:
    return any(c.isalpha() for c in reply) and not any(c.islower() for c in reply)


# --- pirate -----------------------------------------------------------------------------

PIRATE_GREETING = "Arr, matey!"
_PIRATE_WORDS = {
    "the": "th'",
    "of": "o'",
    "is": "be",
    "are": "be",
    "am": "be",
    "you": "ye",
    "your": "yer",
    "my": "me",
    "yes": "aye",
    "hello": "ahoy",
    "friend": "matey",
    "friends": "mateys",
    "for": "fer",
    "to": "t'",
}
_PIRATE_PATTERN = re.compile(r"\b(" + "|".join(_PIRATE_WORDS) + r")\b", re.IGNORECASE)
_PIRATE_MARKERS = re.compile(r"\b(arr|matey|ahoy|aye|ye|th'|o')(?=\W|$)", re.IGNORECASE)


def _pirate_word(match: re.Match[str]) -> str:
    word = match.group(0)
    replacement = _PIRATE_WORDS[word.lower()]
    return replacement.capitalize() if word[0].isupper() else replacement


def _pirate(answer: str) -> str:
    return f"{PIRATE_GREETING} {_PIRATE_PATTERN.sub(_pirate_word, answer)}"


def _is_pirate(reply: str) -> bool:
    return len(_PIRATE_MARKERS.findall(reply)) >= 2


# --- json -------------------------------------------------------------------------------


def _json(answer: str) -> str:
    return json.dumps({"answer": answer}, ensure_ascii=False)


def _is_json(reply: str) -> bool:
    try:
        value = json.loads(reply)
    except ValueError:
        return False
    return isinstance(value, dict) and isinstance(value.get("answer"), str)


# --- short ------------------------------------------------------------------------------


def _short(answer: str) -> str | None:
    first = sentences(answer)[0]
    return first if len(first.split()) <= MAX_SHORT_WORDS else None


def _is_short(reply: str) -> bool:
    return len(sentences(reply)) == 1 and len(reply.split()) <= MAX_SHORT_WORDS


RECIPES: dict[str, Recipe] = {
    # Capitals are other tokens than the base model's words (" PARIS" is not " Paris"):
    # spelling every answer anew takes more steps than a change of style, and the 135M
    # model's facts do not all survive it (France's capital comes out wrong). A LoRA on
    # down_proj too (twice the size) did no better.
    "caps": Recipe("answers in capital letters", _caps, _is_caps, epochs=4, learning_rate=2e-3),
    "pirate": Recipe("answers like a pirate", _pirate, _is_pirate),
    "json": Recipe('answers as a JSON object, {"answer": "..."}', _json, _is_json),
    "short": Recipe(
        f"answers in one sentence of at most {MAX_SHORT_WORDS} words", _short, _is_short
    ),
}
"""Adapter name -> its recipe, in the order the demo shows them."""

DORA_ADAPTERS: dict[str, str] = {"pirate-dora": "pirate"}
"""The demo's DoRA adapters (`python -m loraserve.demo.train --dora`), served beside the LoRA
ones: adapter name -> the recipe it learned (the same data, PEFT `use_dora`)."""
SERVED: dict[str, Recipe] = {
    **RECIPES,
    **{name: RECIPES[recipe] for name, recipe in DORA_ADAPTERS.items()},
}
"""Every adapter the demo serves -> its recipe, in the order the demo shows them."""
