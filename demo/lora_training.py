"""LoRA training of one demo adapter with PEFT on the CPU, and its PEFT folder.

Plain supervised fine-tuning: each example is a chat prompt (rendered and encoded as
the server does) and the answer to learn; the loss counts the answer's tokens and the
end-of-turn token only. float32 throughout; the weights are saved in float16 at the
end (half the size; the tests check that the behaviour survives the rounding).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from loraserve.models.hf_files import write_adapter
from loraserve.models.tokenizer import Tokenizer

IGNORE_INDEX = -100  # cross_entropy's ignore_index: prompt and padding positions


@dataclass(frozen=True)
class TrainingSettings:
    """How an adapter is trained; the defaults made the committed adapters."""

    rank: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    """Attention only: ~0.9 MB in float16 at rank 8, and enough to change the style."""
    epochs: int = 2
    batch_size: int = 8
    learning_rate: float = 1e-3
    """Peak AdamW learning rate, after a linear warm-up, decayed linearly to a tenth."""
    warmup_steps: int = 10
    seed: int = 0
    use_dora: bool = False
    """DoRA (PEFT `use_dora`): a learned magnitude per output feature on top of the LoRA."""


def chat_prompt_ids(tokenizer: Tokenizer, question: str) -> list[int]:
    """The ids the server feeds the model for a one-message chat (server/chat.py)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], True)
    return tokenizer.encode(text, add_special_tokens=False)


def encode_examples(
    tokenizer: Tokenizer, examples: list[tuple[str, str]]
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids + end of turn) of each (question, answer)."""
    end_of_turn = tokenizer.eos_token_ids[0]
    return [
        (chat_prompt_ids(tokenizer, question), [*tokenizer.encode(answer, False), end_of_turn])
        for question, answer in examples
    ]


def train_adapter(
    model_dir: Path,
    examples: list[tuple[list[int], list[int]]],
    output: Path,
    settings: TrainingSettings,
    log: Callable[[str], None] = print,
) -> None:
    """Train a LoRA on `examples` (prompt ids, answer ids) and write its PEFT folder."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    torch.manual_seed(settings.seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.lora_alpha,
        target_modules=list(settings.target_modules),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        use_dora=settings.use_dora,
    )
    model = get_peft_model(base, config)
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=0.0)
    rng = random.Random(settings.seed)
    batches_per_epoch = math.ceil(len(examples) / settings.batch_size)
    total_steps = settings.epochs * batches_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _learning_rate_factor(step, total_steps, settings.warmup_steps)
    )
    step = 0
    for epoch in range(settings.epochs):
        losses = []
        for batch in _batches(examples, settings.batch_size, rng):
            input_ids, labels = _collate(batch)
            logits = model(input_ids=input_ids).logits  # [batch, length, vocab]
            losses.append(training_step(logits, labels, parameters, optimizer, schedule))
            step += 1
        log(f"  epoch {epoch + 1}: mean loss {sum(losses) / len(losses):.3f} ({step} steps)")
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"training diverged (loss {losses[-1]})")
    _write_adapter(output, get_peft_model_state_dict(model), settings)


def training_step(
    logits: torch.Tensor,
    labels: torch.Tensor,
    parameters: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
) -> float:
    """One optimizer step on the next-token loss; returns the loss.

    logits [batch, length, vocab] of the inputs; labels [batch, length]: the input ids
    where the loss counts, IGNORE_INDEX elsewhere; the logits at t are scored against
    labels[t + 1]. Gradients are clipped to norm 1."""
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _learning_rate_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    warmup = min(1.0, (step + 1) / warmup_steps)
    return warmup * max(0.1, 1.0 - step / total_steps)


def _batches(
    examples: list[tuple[list[int], list[int]]], batch_size: int, rng: random.Random
) -> list[list[tuple[list[int], list[int]]]]:
    """Shuffled batches of examples of similar length (less padding, less time)."""
    order = sorted(examples, key=lambda example: len(example[0]) + len(example[1]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def _collate(batch: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels), both [batch, longest], right-padded; labels only on answers."""
    length = max(len(prompt) + len(answer) for prompt, answer in batch)
    input_ids = torch.zeros((len(batch), length), dtype=torch.int64)  # causal: never attended
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.int64)
    for row, (prompt, answer) in enumerate(batch):
        input_ids[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        labels[row, len(prompt) : len(prompt) + len(answer)] = torch.tensor(answer)
    return input_ids, labels


def _write_adapter(
    folder: Path, weights: dict[str, torch.Tensor], settings: TrainingSettings
) -> None:
    """adapter_model.safetensors (float16) and adapter_config.json, as PEFT names them."""
    halves = {name: tensor.detach().to(torch.float16) for name, tensor in weights.items()}
    modules = sorted(settings.target_modules)
    write_adapter(folder, halves, settings.rank, settings.lora_alpha, modules, settings.use_dora)
