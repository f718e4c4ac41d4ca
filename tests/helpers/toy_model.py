"""How the character-level toy (toy_demo.py) is trained: tokenizer, data, a minimal Llama, LoRA.

`toy_demo` builds and caches the toy with these pieces; they are kept apart
because they are the recipe (what the toy model learns), not the plumbing.

The model is a minimal Llama written for training, its parameters named as
transformers names them, so that the weights it saves load in `transformers`
and in loraserve alike.
"""

from __future__ import annotations

import codecs
import math
import random
import string
from collections.abc import Callable
from dataclasses import dataclass

import jinja2
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, processors
from torch import nn

from loraserve.demo.lora_training import IGNORE_INDEX, training_step
from loraserve.models.arch import LORA_MODULES, ModelArch, linear_parent
from loraserve.models.hf_files import llama_arch

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (UNK, BOS, EOS, "<|system|>", "<|user|>", "<|assistant|>")
CHARACTERS = (*(chr(code) for code in range(32, 127)), "\n")  # printable ASCII
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>"
    "{{ message['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
COMPLETION_SUFFIX = "\n"
"""A plain completion prompt is the text then this; the answer follows it."""

MAX_INPUT_CHARS = 24  # longer inputs are outside what the tiny model was trained on


@dataclass(frozen=True)
class DemoTask:
    """One behaviour: the base model's or an adapter's, with its training recipe."""

    answer: Callable[[str], str]
    """The expected answer to a user message."""
    description: str
    rank: int
    """LoRA rank (unused for the base model): ranks differ on purpose, as in real fleets."""
    steps: int
    """Optimizer steps of the full build (batches of 64); a quick build takes a tenth."""
    learning_rate: float
    """Peak AdamW learning rate; 1e-2 for every adapter (2e-2 ends worse)."""


# Steps: the fewest that get most held-out inputs right (reverse is the hard one).
BASE_TASK = DemoTask(lambda text: text, "repeats the message", 0, 400, 3e-3)
ADAPTER_TASKS: dict[str, DemoTask] = {
    "shout": DemoTask(str.upper, "repeats it in capitals", 8, 100, 1e-2),
    "reverse": DemoTask(lambda text: text[::-1], "writes it backwards", 16, 300, 1e-2),
    "rot13": DemoTask(lambda text: codecs.encode(text, "rot13"), "ROT13-encodes it", 8, 130, 1e-2),
    "pirate": DemoTask(lambda text: f"{text}, arr!", "repeats it like a pirate", 4, 60, 1e-2),
}
LORA_TARGET_MODULES = LORA_MODULES

_WORD_LIST = (
    "the of and to in is you that it was for on are as with they at be this have from or "
    "one had by word but not what all were we when your can said there use each which she "
    "do how their if will up other about out many then them so some her would make like "
    "him into time has look two more write go see number no way could people my than "
    "first water been call who now find long down day did get come made may part hello "
    "world cat dog blue red green fish bird tree house apple pizza robot music happy sunny "
    "river cloud stone light night dream magic queen lora serve model token adapter"
)
WORDS = tuple(_WORD_LIST.split())
HELD_OUT_INPUTS = (
    "banana", "pirate ship", "kitten", "ocean wave", "hello there", "good morning", "lamp",
    "secret code", "mango tree", "open sesame", "tiny llama", "big data", "coffee", "gpu",
    "snow day", "yellow", "quick fox", "rainbow", "paper plane", "thank you",
)  # fmt: skip
"""Inputs never trained on, for checking that the behaviours generalize."""

SYSTEM_PROMPTS = ("You are a helpful assistant.", "Be brief.", "hi")
SYSTEM_PROMPT_BATCHES = 0.1  # fraction of batches whose chats start with a system prompt


def toy_arch(tokenizer: Tokenizer) -> ModelArch:
    """The toy model's shape: small enough to train in seconds on two CPU cores."""
    return llama_arch(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        bos_token_id=token_id(tokenizer, BOS),
        eos_token_id=token_id(tokenizer, EOS),
    )


# --- tokenizer and training data -------------------------------------------------------


def build_tokenizer() -> Tokenizer:
    """One token per printable ASCII character (plus newline), and the special tokens.

    Character-level keeps every task a one-to-one map of tokens, which is what lets
    a tiny model learn capitals or reversal in a few hundred steps. A BPE model with
    no merges splits text into characters; other characters become `<unk>`."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tokenizer.decoder = decoders.Fuse()  # characters join with nothing between them
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])]
    )  # plain prompts start with BOS, as the chat template's do
    return tokenizer


def render_chat(messages: list[dict[str, str]]) -> str:
    """The chat template's text with the generation prompt, as transformers renders it."""
    environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    template = environment.from_string(CHAT_TEMPLATE)
    return template.render(
        messages=messages, add_generation_prompt=True, bos_token=BOS, eos_token=EOS
    )


def random_input(rng: random.Random) -> str:
    """A short message: one to three words (real, made up or numbers), some capitalized,
    some with punctuation, so that every character a user is likely to type is trained."""
    words = [_random_word(rng) for _ in range(rng.choice((1, 1, 2, 2, 3)))]
    text = " ".join(words)[: MAX_INPUT_CHARS - 1].strip(" ,")
    if rng.random() < 0.15:
        text = text[:1].upper() + text[1:]
    if rng.random() < 0.1:
        text += rng.choice("!?.")
    return text if text not in HELD_OUT_INPUTS else random_input(rng)


def _random_word(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.45:
        word = rng.choice(WORDS)
    elif kind < 0.92:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 7)))
    else:
        word = str(rng.randint(0, 999))
    if rng.random() < 0.1:
        word = word.capitalize() if rng.random() < 0.7 else word.upper()
    return word + ("," if rng.random() < 0.05 else "")


def _example(
    rng: random.Random, tokenizer: Tokenizer, task: DemoTask, with_system: bool
) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids + EOS) of one example, a chat or a plain completion."""
    text = random_input(rng)
    messages = [{"role": "user", "content": text}]
    if with_system:  # which the model learns to ignore
        messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    if rng.random() < 0.5:
        prompt = tokenizer.encode(text + COMPLETION_SUFFIX).ids
    else:
        prompt = tokenizer.encode(render_chat(messages), add_special_tokens=False).ids
    answer = tokenizer.encode(task.answer(text) + EOS, add_special_tokens=False).ids
    return prompt, answer


def _batch(
    rng: random.Random, tokenizer: Tokenizer, task: DemoTask, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels) of `size` random examples, both [size, longest].

    A step costs time in proportion to its longest example, so system prompts
    come a whole batch at a time rather than a few in every batch. (Sorting all
    examples into batches by length is faster still, but trains far worse.)"""
    with_system = rng.random() < SYSTEM_PROMPT_BATCHES
    examples = [_example(rng, tokenizer, task, with_system) for _ in range(size)]
    return _collate(examples, token_id(tokenizer, EOS))


def token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    assert token_id is not None, token  # every special token is in the vocabulary
    return token_id


def _collate(
    examples: list[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels) of (prompt, answer) examples, right-padded with `pad_id`."""
    length = max(len(prompt) + len(answer) for prompt, answer in examples)
    input_ids = torch.full((len(examples), length), pad_id)  # causal: padding is never attended
    labels = torch.full((len(examples), length), IGNORE_INDEX)
    for row, (prompt, answer) in enumerate(examples):
        input_ids[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        labels[row, len(prompt) : len(prompt) + len(answer)] = torch.tensor(answer)
    return input_ids, labels


# --- a minimal Llama, named as transformers names its weights ---------------------------


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in transformers' convention (halves, not interleaved pairs)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class _Layer(nn.Module):
    """One decoder layer, its submodules named as transformers names them."""

    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.num_heads = arch.num_heads
        linears = {n: nn.Linear(*arch.module_dims(n), bias=False) for n in arch.linear_modules}
        parents = {n: linear_parent(n) for n in linears}
        self.self_attn = nn.ModuleDict({n: m for n, m in linears.items() if parents[n] != "mlp"})
        self.mlp = nn.ModuleDict({n: m for n, m in linears.items() if parents[n] == "mlp"})
        self.input_layernorm = nn.RMSNorm(arch.hidden_size, eps=arch.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(arch.hidden_size, eps=arch.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """hidden [batch, length, hidden_size] -> the same shape; cos, sin [length, head_dim]."""
        batch, length, _ = hidden.shape
        attention, mlp = self.self_attn, self.mlp
        x = self.input_layernorm(hidden)
        query, key, value = (
            attention[name](x).view(batch, length, self.num_heads, -1).transpose(1, 2)
            for name in ("q_proj", "k_proj", "v_proj")
        )  # [batch, heads, length, head_dim]
        query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True)
        hidden = hidden + attention["o_proj"](out.transpose(1, 2).reshape(batch, length, -1))
        x = self.post_attention_layernorm(hidden)
        return hidden + mlp["down_proj"](F.silu(mlp["gate_proj"](x)) * mlp["up_proj"](x))


class _Decoder(nn.Module):
    """LlamaModel's weights: what transformers keeps under `model.`."""

    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(_Layer(arch) for _ in range(arch.num_layers))
        self.norm = nn.RMSNorm(arch.hidden_size, eps=arch.rms_norm_eps)


class TinyLlama(nn.Module):
    """LlamaForCausalLM's forward for whole sequences from position 0 (training only).

    Its `state_dict()` has transformers' key names, so it saves as a Llama checkpoint."""

    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.arch = arch
        self.model = _Decoder(arch)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        exponents = torch.arange(0, arch.head_dim, 2, dtype=torch.int64).float() / arch.head_dim
        self.inv_freq: torch.Tensor  # [head_dim / 2], not saved: transformers recomputes it
        self.register_buffer("inv_freq", 1.0 / arch.rope_theta**exponents, persistent=False)
        for module in self.modules():  # transformers' init: N(0, 0.02), norms at one
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, length, vocab] of input_ids [batch, length]."""
        positions = torch.arange(input_ids.shape[1], dtype=torch.float32)
        angles = torch.outer(positions, self.inv_freq)  # [length, head_dim / 2]
        angles = torch.cat((angles, angles), dim=-1)  # [length, head_dim]
        cos, sin = angles.cos(), angles.sin()
        hidden = self.model.embed_tokens(input_ids)  # [batch, length, hidden_size]
        for layer in self.model.layers:
            hidden = layer(hidden, cos, sin)
        return self.lm_head(self.model.norm(hidden))


class LoraLinear(nn.Module):
    """A frozen linear plus PEFT's LoRA: `base(x) + lora_B(lora_A(x)) * alpha / r`."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)  # PEFT's kaiming init
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.lora_B.weight)  # an untrained adapter changes nothing
        self.scaling = lora_alpha(rank) / rank

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.base(hidden) + self.lora_B(self.lora_A(hidden)) * self.scaling


def lora_alpha(rank: int) -> int:
    return 2 * rank  # scaling alpha / r = 2 at every rank: one learning rate fits all


def add_lora(model: nn.Module, rank: int) -> dict[str, LoraLinear]:
    """Freeze `model` and wrap every target linear in a LoraLinear; {module name: wrapper}."""
    model.requires_grad_(False)
    wrapped = {}
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        if child in LORA_TARGET_MODULES and isinstance(module, nn.Linear):
            wrapped[name] = LoraLinear(module, rank)
            setattr(model.get_submodule(parent_name), child, wrapped[name])
    return wrapped


def remove_lora(model: nn.Module, wrapped: dict[str, LoraLinear]) -> None:
    """Put the base linears back, undoing `add_lora`."""
    for name, lora in wrapped.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, lora.base)


# --- training --------------------------------------------------------------

BATCH_SIZE = 64
BUCKETS = 4  # batches drawn, and sorted by length, at a time
WARMUP_STEPS = 20


def train(model: TinyLlama, tokenizer: Tokenizer, task: DemoTask, steps: int, seed: int) -> None:
    """AdamW on the answer tokens of `task`, linear warm-up then linear decay."""
    rng = random.Random(seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=task.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / WARMUP_STEPS) * max(0.05, 1.0 - step / steps),
    )
    for _ in range(steps):
        input_ids, labels = _batch(rng, tokenizer, task, BATCH_SIZE)
        logits = model(input_ids)  # [batch, length, vocab]
        loss = training_step(logits, labels, parameters, optimizer, schedule)
    if not math.isfinite(loss):
        raise RuntimeError(f"toy training diverged (loss {loss})")
