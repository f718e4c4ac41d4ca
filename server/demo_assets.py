"""The embedded demo of `loraserve demo`: a tiny model and a few adapters, built offline.

Nothing is downloaded. The first call trains, on the CPU in about a minute, a small
Llama-shaped model with a character-level tokenizer and a chat template, then four
LoRA adapters on top of it, and caches them under the user's cache dir:

    $XDG_CACHE_HOME/loraserve/demo-v1/        (default ~/.cache/loraserve/demo-v1)
        model/      config.json, model.safetensors, tokenizer.json, tokenizer_config.json
        adapters/   shout/ reverse/ rot13/ pirate/  (adapter_config.json + adapter_model.safetensors)

The base model repeats the user's message; each adapter answers it its own way:

    "hello world"  base: hello world    shout: HELLO WORLD    reverse: dlrow olleh
                   rot13: uryyb jbeyq   pirate: hello world, arr!

A prompt is either a chat (the template renders `<s><|user|>hello world</s><|assistant|>`)
or a plain completion of the text followed by a newline (`"hello world\\n"`).

The files are the ones `transformers`' and `peft`'s `save_pretrained` write (same
names, keys and config fields; the tests load them with both and compare logits),
but they are written here with torch and safetensors alone: the server never imports
transformers or peft (DESIGN.md), so `loraserve demo` works with the runtime
dependencies only. The model below is therefore a minimal Llama written for training.

A build goes to a temporary folder renamed into place at the end, so an interrupted
build never leaves a half cache; bump `DEMO_VERSION` whenever the recipe changes so
existing caches are rebuilt rather than reused.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jinja2
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, processors
from torch import nn

DEMO_VERSION = "demo-v1"
"""Name of the cache folder; change it with any change to what the build produces."""

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
    """Optimizer steps of the full build; a quick build takes a tenth."""
    learning_rate: float


BASE_TASK = DemoTask(lambda text: text, "repeats the message", 0, 400, 3e-3)
ADAPTER_TASKS: dict[str, DemoTask] = {
    "shout": DemoTask(str.upper, "repeats it in capitals", 8, 120, 2e-2),
    "reverse": DemoTask(lambda text: text[::-1], "writes it backwards", 16, 200, 1e-2),
    "rot13": DemoTask(lambda text: codecs.encode(text, "rot13"), "ROT13-encodes it", 8, 120, 2e-2),
    "pirate": DemoTask(lambda text: f"{text}, arr!", "repeats it like a pirate", 4, 100, 2e-2),
}
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

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


@dataclass(frozen=True)
class ModelShape:
    """Size of the demo model: small enough to train in seconds on two CPU cores."""

    vocab_size: int
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def ensure_demo_assets(
    cache_dir: Path | None = None,
    progress: Callable[[str], None] = print,
    quick: bool = False,
) -> tuple[Path, dict[str, Path]]:
    """The demo's (model folder, {adapter name: adapter folder}), built on first use.

    `cache_dir` is loraserve's cache root (default `$XDG_CACHE_HOME/loraserve`).
    `quick` trains a tenth of the steps: complete, loadable files whose adapters do
    not yet behave as described (for tests); it is cached apart from the full build."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / (DEMO_VERSION + ("-quick" if quick else ""))
    if not _is_complete(folder):
        if folder.exists():
            progress(f"demo cache {folder} is incomplete; rebuilding it")
            shutil.rmtree(folder)
        _build_atomically(folder, progress, quick)
    return folder / "model", {name: folder / "adapters" / name for name in ADAPTER_TASKS}


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/loraserve`, or `~/.cache/loraserve` when it is unset."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loraserve"


def _expected_files(folder: Path) -> list[Path]:
    model = folder / "model"
    files = [model / name for name in ("config.json", "model.safetensors", "tokenizer.json")]
    files += [model / "generation_config.json", model / "tokenizer_config.json"]
    for name in ADAPTER_TASKS:
        adapter = folder / "adapters" / name
        files += [adapter / "adapter_config.json", adapter / "adapter_model.safetensors"]
    return files


def _is_complete(folder: Path) -> bool:
    return all(path.is_file() for path in _expected_files(folder))


def _build_atomically(folder: Path, progress: Callable[[str], None], quick: bool) -> None:
    """Build into a sibling temporary folder, then rename it to `folder` in one step."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(folder)
    prefix = f".{folder.name}.partial-{os.getpid()}-"
    partial = Path(tempfile.mkdtemp(prefix=prefix, dir=folder.parent))
    try:
        _build(partial, progress, quick)
        try:
            partial.rename(folder)
        except OSError:  # another process finished the same build first: keep its files
            if not _is_complete(folder):
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _remove_abandoned_builds(folder: Path) -> None:
    """Delete partial builds of `folder` whose process is gone (killed before cleaning up)."""
    for partial in folder.parent.glob(f".{folder.name}.partial-*"):
        pid = partial.name.removeprefix(f".{folder.name}.partial-").split("-")[0]
        if pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _build(folder: Path, progress: Callable[[str], None], quick: bool) -> None:
    """Train and write the model and every adapter into `folder` (deterministic, seeded)."""
    started = time.monotonic()
    progress(f"building the loraserve demo (once) into {folder.parent}: about a minute on CPU")
    tokenizer = build_tokenizer()
    shape = ModelShape(vocab_size=tokenizer.get_vocab_size())
    scale = 10 if quick else 1
    with _training_threads(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TinyLlama(shape)
        _train(model, tokenizer, BASE_TASK, BASE_TASK.steps // scale, seed=0)
        _write_model(folder / "model", model, tokenizer)
        progress(f"  base model trained ({time.monotonic() - started:.0f} s)")
        for seed, (name, task) in enumerate(ADAPTER_TASKS.items(), start=1):
            torch.manual_seed(seed)
            lora_modules = add_lora(model, task.rank)
            _train(model, tokenizer, task, task.steps // scale, seed=seed)
            _write_adapter(folder / "adapters" / name, lora_modules, task.rank)
            remove_lora(model, lora_modules)
            progress(f"  adapter {name!r} trained ({time.monotonic() - started:.0f} s)")


@contextlib.contextmanager
def _training_threads() -> Iterator[None]:
    """At most two threads (more only add synchronisation at these sizes), and one core
    left free: when every core is busy, OpenMP threads stall waiting for each other
    (a build took ten times longer with 2 threads on a 2-core machine running tests)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
    """A short message: one to three words, real or made up, sometimes capitalized."""
    words = []
    for _ in range(rng.choice((1, 1, 2, 2, 3))):
        if rng.random() < 0.5:
            words.append(rng.choice(WORDS))
        else:
            length = rng.randint(1, 7)
            words.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length)))
    text = " ".join(words)[: MAX_INPUT_CHARS - 1]
    if rng.random() < 0.15:
        text = text.capitalize()
    if rng.random() < 0.1:
        text += rng.choice("!?.")
    return text if text not in HELD_OUT_INPUTS else random_input(rng)


def _example(
    rng: random.Random, tokenizer: Tokenizer, task: DemoTask
) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids + EOS) of one example, as a chat or as a plain completion."""
    text = random_input(rng)
    if rng.random() < 0.5:
        prompt = tokenizer.encode(text + COMPLETION_SUFFIX).ids
    else:
        prompt = tokenizer.encode(render_chat(_messages(rng, text)), add_special_tokens=False).ids
    answer = tokenizer.encode(task.answer(text) + EOS, add_special_tokens=False).ids
    return prompt, answer


def _messages(rng: random.Random, text: str) -> list[dict[str, str]]:
    """The user's message, sometimes after a short system prompt, which the model learns
    to ignore. (Earlier turns are not trained: they cost time the build does not have.)"""
    messages = [{"role": "user", "content": text}]
    if rng.random() < 0.1:
        messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    return messages


def _batches(
    rng: random.Random, tokenizer: Tokenizer, task: DemoTask, size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (input ids, labels) batches, both [size, longest]; only answers are labelled.

    Examples are drawn BUCKETS batches at a time and sorted by length, so that each
    batch holds examples of about one length: padding to the longest then costs
    little, and a step costs time in proportion to its padded length."""
    while True:
        examples = [_example(rng, tokenizer, task) for _ in range(size * BUCKETS)]
        examples.sort(key=lambda example: len(example[0]) + len(example[1]))
        starts = list(range(0, len(examples), size))
        rng.shuffle(starts)
        for start in starts:
            yield _collate(examples[start : start + size], tokenizer.token_to_id(EOS))


def _collate(
    examples: list[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels) of (prompt, answer) examples, right-padded with `pad_id`."""
    length = max(len(prompt) + len(answer) for prompt, answer in examples)
    input_ids = torch.full((len(examples), length), pad_id)  # causal: padding is never attended
    labels = torch.full((len(examples), length), -100)  # -100: cross_entropy's ignore_index
    for row, (prompt, answer) in enumerate(examples):
        input_ids[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        labels[row, len(prompt) : len(prompt) + len(answer)] = torch.tensor(answer)
    return input_ids, labels


# --- a minimal Llama, named as transformers names its weights ---------------------------


class _RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        variance = hidden.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden * torch.rsqrt(variance + self.eps))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in transformers' convention (halves, not interleaved pairs)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class _Attention(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        size = shape.hidden_size
        self.num_heads = shape.num_heads
        self.q_proj = nn.Linear(size, size, bias=False)
        self.k_proj = nn.Linear(size, size, bias=False)
        self.v_proj = nn.Linear(size, size, bias=False)
        self.o_proj = nn.Linear(size, size, bias=False)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, _ = hidden.shape

        def heads(x: torch.Tensor) -> torch.Tensor:  # [batch, heads, length, head_dim]
            return x.view(batch, length, self.num_heads, -1).transpose(1, 2)

        query = _rotate(heads(self.q_proj(hidden)), cos, sin)
        key = _rotate(heads(self.k_proj(hidden)), cos, sin)
        out = F.scaled_dot_product_attention(query, key, heads(self.v_proj(hidden)), is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class _Mlp(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=False)
        self.up_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=False)
        self.down_proj = nn.Linear(shape.intermediate_size, shape.hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(hidden)) * self.up_proj(hidden))


class _Layer(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.self_attn = _Attention(shape)
        self.mlp = _Mlp(shape)
        self.input_layernorm = _RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.post_attention_layernorm = _RMSNorm(shape.hidden_size, shape.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class _Decoder(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.layers = nn.ModuleList(_Layer(shape) for _ in range(shape.num_layers))
        self.norm = _RMSNorm(shape.hidden_size, shape.rms_norm_eps)


class TinyLlama(nn.Module):
    """LlamaForCausalLM's forward for whole sequences from position 0 (training only).

    Its `state_dict()` has transformers' key names, so it saves as a Llama checkpoint."""

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.shape = shape
        self.model = _Decoder(shape)
        self.lm_head = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)
        exponents = torch.arange(0, shape.head_dim, 2, dtype=torch.int64).float() / shape.head_dim
        self.register_buffer("inv_freq", 1.0 / shape.rope_theta**exponents, persistent=False)
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
        self.scaling = _lora_alpha(rank) / rank

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.base(hidden) + self.lora_B(self.lora_A(hidden)) * self.scaling


def _lora_alpha(rank: int) -> int:
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


# --- training and writing --------------------------------------------------------------

BATCH_SIZE = 64
BUCKETS = 2  # batches drawn, and sorted by length, at a time
WARMUP_STEPS = 20


def _train(model: TinyLlama, tokenizer: Tokenizer, task: DemoTask, steps: int, seed: int) -> None:
    """AdamW on the answer tokens of `task`, linear warm-up then linear decay."""
    rng = random.Random(seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=task.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / WARMUP_STEPS) * max(0.05, 1.0 - step / steps),
    )
    batches = _batches(rng, tokenizer, task, BATCH_SIZE)
    for _ in range(steps):
        input_ids, labels = next(batches)
        logits = model(input_ids)  # [batch, length, vocab]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    if not math.isfinite(loss.item()):
        raise RuntimeError(f"demo training diverged (loss {loss.item()})")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _write_model(folder: Path, model: TinyLlama, tokenizer: Tokenizer) -> None:
    """config.json, generation_config.json, model.safetensors and the tokenizer files."""
    folder.mkdir(parents=True)
    weights = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    shape = model.shape
    bos_id, eos_id = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    _write_json(folder / "config.json", {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": shape.rope_theta},
        "rope_theta": shape.rope_theta,  # the key transformers < 5 reads
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "dtype": "float32",
        "torch_dtype": "float32",
        "use_cache": True,
    })  # fmt: skip
    _write_json(
        folder / "generation_config.json",
        {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": eos_id},
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": EOS,
        "model_max_length": shape.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    })  # fmt: skip


def _write_adapter(folder: Path, wrapped: dict[str, LoraLinear], rank: int) -> None:
    """adapter_model.safetensors and adapter_config.json, as PEFT's save_pretrained writes them."""
    folder.mkdir(parents=True)
    weights = {}
    for name, lora in wrapped.items():
        prefix = f"base_model.model.{name}"
        weights[f"{prefix}.lora_A.weight"] = lora.lora_A.weight.detach().contiguous()  # [r, in]
        weights[f"{prefix}.lora_B.weight"] = lora.lora_B.weight.detach().contiguous()  # [out, r]
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    _write_json(folder / "adapter_config.json", {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": rank,
        "lora_alpha": _lora_alpha(rank),
        "lora_dropout": 0.0,
        "target_modules": list(LORA_TARGET_MODULES),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    })  # fmt: skip
