"""The recipe that made the demo's adapters (demo/lora-adapters/): self-distillation.

    python -m loraserve.demo.train --output demo/lora-adapters

1. The base model (SmolLM2-135M-Instruct, converted as `loraserve demo` does) answers
   every question of `questions.TRAIN_QUESTIONS` and `HELD_OUT_QUESTIONS`, greedy, through
   loraserve's own `LLM` (cached in the work folder: later runs reuse the answers).
2. Each adapter's rule (`recipes.py`) rewrites the trimmed answers into its own.
3. A LoRA per adapter learns the rewritten answers with PEFT on the CPU
   (`lora_training.py`: rank 8 on q_proj and v_proj, float32; epochs and learning rate
   per adapter in `recipes.py`). With `--dora`, the same recipe trains DoRA adapters
   (PEFT `use_dora`: a learned magnitude per output feature too), into `<name>-dora`.
4. loraserve serves every adapter on the held-out questions, never trained on, and the
   command prints how many replies of each (and of the base model) have the adapter's
   property, with one exchange: the figures `recipes.py`'s checks and the slow test use.

Needs the `demo` extra and peft (the `test` extra). Seeded, but float sums in another
order (other machine, other thread count) give slightly different weights. The committed
adapters came from this code in two runs (`--adapters pirate,json,short`, then
`--adapters caps`): 62 to 382 s each for pirate, json and short, 832 s for caps, on two
cores shared with other work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from loraserve.demo.assets import ADAPTERS_DIR, ensure_model
from loraserve.demo.cache import default_cache_dir
from loraserve.demo.questions import HELD_OUT_QUESTIONS, TRAIN_QUESTIONS
from loraserve.demo.recipes import RECIPES, trim

DISTILL_MAX_TOKENS = 96
"""Tokens of each base answer: past `recipes.MAX_ANSWER_CHARS` once trimmed."""
EVAL_MAX_TOKENS = 128
SHOWN_QUESTION = "What is the capital of France?"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loraserve.demo.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", type=Path, default=ADAPTERS_DIR, help="adapters go here")
    parser.add_argument(
        "--adapters", default=",".join(RECIPES), help="comma-separated names (default: all)"
    )
    parser.add_argument("--work-dir", type=Path, default=default_cache_dir() / "demo-training")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training")
    parser.add_argument("--skip-training", action="store_true", help="only evaluate")
    parser.add_argument(
        "--dora",
        action="store_true",
        help="train DoRA adapters (PEFT use_dora) with the same recipe, into <output>/<name>-dora",
    )
    args = parser.parse_args(argv)
    names = args.adapters.split(",")
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        parser.error(f"unknown adapters {unknown}; known: {', '.join(RECIPES)}")

    import torch

    torch.set_num_threads(args.threads)
    model_dir = ensure_model()
    answers = base_answers(model_dir, args.work_dir / "base_answers.json")
    if not args.skip_training:
        for name in names:
            train_one(
                model_dir, name, answers, args.output / folder_name(name, args.dora), args.dora
            )
    adapters = {name: args.output / folder_name(name, args.dora) for name in names}
    evaluate(model_dir, adapters, args.work_dir / "held_out_replies.json")
    return 0


def folder_name(name: str, dora: bool) -> str:
    """An adapter's folder: its recipe's name, `-dora` appended for a DoRA one."""
    return f"{name}-dora" if dora else name


def base_answers(model_dir: Path, path: Path) -> dict[str, str]:
    """{question: the base model's greedy answer}, generated once and kept in `path`."""
    questions = [*TRAIN_QUESTIONS, *HELD_OUT_QUESTIONS]
    if path.is_file():
        cached = json.loads(path.read_text())
        if set(cached) == set(questions):
            return dict(cached)
    print(f"the base model answers {len(questions)} questions (greedy) ...", flush=True)
    started = time.monotonic()
    replies = generate(
        model_dir, {}, [(question, None) for question in questions], DISTILL_MAX_TOKENS
    )
    answers = dict(zip(questions, replies, strict=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(answers, indent=1, ensure_ascii=False) + "\n")
    print(f"  done in {time.monotonic() - started:.0f} s", flush=True)
    return answers


def generate(
    model_dir: Path,
    adapters: dict[str, Path],
    requests: list[tuple[str, str | None]],
    max_tokens: int,
) -> list[str]:
    """Greedy replies of loraserve to (question, adapter or None) chats, all batched."""
    from loraserve import LLM, SamplingParams
    from loraserve.demo.lora_training import chat_prompt_ids

    llm = LLM(model_dir, adapters=dict(adapters), device="cpu", dtype="float32")
    prompts = [chat_prompt_ids(llm.tokenizer, question) for question, _ in requests]
    outputs = llm.generate(
        prompt_token_ids=prompts,
        sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0.0),
        adapter=[adapter for _, adapter in requests],
    )
    return [output.outputs[0].text for output in outputs]


def training_examples(name: str, answers: dict[str, str]) -> list[tuple[str, str]]:
    """(question, answer to learn) for adapter `name`: its rule applied to the base answers."""
    examples = []
    for question in TRAIN_QUESTIONS:
        trimmed = trim(answers[question])
        rewritten = RECIPES[name].rewrite(trimmed) if trimmed is not None else None
        if rewritten is not None:
            examples.append((question, rewritten))
    return examples


def train_one(
    model_dir: Path, name: str, answers: dict[str, str], output: Path, dora: bool = False
) -> None:
    from loraserve.demo.lora_training import TrainingSettings, encode_examples, train_adapter
    from loraserve.models.tokenizer import Tokenizer

    examples = training_examples(name, answers)
    print(f"adapter {name!r}: {len(examples)} examples, e.g. {examples[0][1]!r}", flush=True)
    started = time.monotonic()
    encoded = encode_examples(Tokenizer.from_folder(model_dir), examples)
    recipe = RECIPES[name]
    settings = TrainingSettings(
        epochs=recipe.epochs, learning_rate=recipe.learning_rate, use_dora=dora
    )
    train_adapter(model_dir, encoded, output, settings, log=_flushed)
    size = (output / "adapter_model.safetensors").stat().st_size
    print(f"  trained in {time.monotonic() - started:.0f} s; {size / 1e6:.2f} MB", flush=True)


def evaluate(model_dir: Path, adapters: dict[str, Path], replies_path: Path) -> None:
    """Each adapter's check on the held-out questions, for the adapter and for the base
    model; every reply is written to `replies_path` for reading."""
    models: list[str | None] = [None, *adapters]
    requests = [(question, model) for model in models for question in HELD_OUT_QUESTIONS]
    replies = generate(model_dir, adapters, requests, EVAL_MAX_TOKENS)
    total = len(HELD_OUT_QUESTIONS)
    by_model = {
        model or "base": replies[index * total : (index + 1) * total]
        for index, model in enumerate(models)
    }
    replies_path.write_text(json.dumps(by_model, indent=1, ensure_ascii=False) + "\n")
    for adapter in adapters:
        check = RECIPES[adapter].check
        passed, by_base = sum(map(check, by_model[adapter])), sum(map(check, by_model["base"]))
        print(f"{adapter:>8}: {passed}/{total} held-out replies {RECIPES[adapter].description} "
              f"(base model: {by_base}/{total})")  # fmt: skip
    shown = HELD_OUT_QUESTIONS.index(SHOWN_QUESTION)
    print(f"\n{SHOWN_QUESTION}")
    for model, answers in by_model.items():
        print(f"{model:>8}: {answers[shown]}")


def _flushed(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
