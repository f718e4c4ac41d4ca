"""Tokenizer: ids and text as transformers' fast tokenizer, chat templates rendered as transformers does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from factories import CORPUS, make_tokenizer

from loraserve.errors import InvalidRequestError, ModelLoadError
from loraserve.models.tokenizer import Tokenizer

TEXTS = [
    *CORPUS,
    "",
    "  leading and trailing spaces  ",
    "unseen: Grüße, 日本語, emoji 🦙\n\ttabs",
    "<|user|>special tokens in text<|end|></s>",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "hello world"},
    {"role": "assistant", "content": "Bonjour"},
    {"role": "user", "content": "SELECT name FROM users;"},
]
# A Llama-3-like template: bos_token, namespace, loop controls, tojson, whitespace control,
# raise_exception, strftime_now and a `{% generation %}` block.
LLAMA_LIKE = """{{- bos_token }}
{%- set ns = namespace(system='', turns=0) %}
{%- if messages[0]['role'] == 'system' %}
    {%- set ns.system = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- endif %}
<|system|>Today: {{ strftime_now('%Y') }}. {{ ns.system }}
{%- if tools is not none %} Tools: {{ tools | tojson(indent=2) }}{% endif %}<|end|>
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}
    {%- endif %}
    {%- if message['role'] == 'assistant' %}
<|assistant|>{% generation %}{{ message['content'] | trim }}{% endgeneration %}<|end|>
    {%- else %}
<|{{ message['role'] }}|>{{ message['content'] | trim }}<|end|>
    {%- endif %}
    {%- set ns.turns = ns.turns + 1 %}
    {%- if loop.index > 20 %}{% break %}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
<|assistant|>
{%- endif %}
"""
# Trailing newlines and indentation that trim_blocks / lstrip_blocks remove, a dict() global,
# a variable passed through **extra, and a key whose value is None (dropped before rendering).
WHITESPACE = """{% for message in messages %}
    {% if message.content is string %}
[{{ message.role }}] {{ message.content }}
    {% endif %}
    {% if message.tool_calls is defined %}tool_calls={{ message.tool_calls | tojson }}{% endif %}
{% endfor %}
{% set d = dict(a=1, b=[1, 2]) %}{{ d | tojson }} {{ d.keys() | list | length }}
{% if enable_thinking is defined and enable_thinking %}<think>{% endif %}
{{ eos_token }}"""
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(folder: Path) -> Tokenizer:
    return Tokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def reference(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def with_config(folder: Path, target: Path, **changes: Any) -> Path:
    """A copy of `folder` with tokenizer_config.json keys set (value) or removed (None)."""
    shutil.copytree(folder, target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_equals_transformers(
    tokenizer: Tokenizer, reference: Any, add_special_tokens: bool
) -> None:
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
        assert ids == reference.encode(text, add_special_tokens=add_special_tokens), text
    assert tokenizer.encode("hello")[0] == tokenizer.bos_token_id
    assert tokenizer.bos_token_id not in tokenizer.encode("hello", add_special_tokens=False)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_equals_transformers(
    tokenizer: Tokenizer, reference: Any, skip_special_tokens: bool
) -> None:
    for text in TEXTS:
        ids = tokenizer.encode(text)
        decoded = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        assert decoded == reference.decode(ids, skip_special_tokens=skip_special_tokens), text
    assert tokenizer.decode(tokenizer.encode(CORPUS[1])) == CORPUS[1]


def test_vocabulary_and_special_ids(tokenizer: Tokenizer, reference: Any) -> None:
    assert tokenizer.vocab_size == len(reference)
    assert tokenizer.bos_token_id == reference.bos_token_id == 0
    assert tokenizer.eos_token_ids == (reference.eos_token_id,) == (1,)
    assert set(reference.all_special_ids) <= set(tokenizer.all_special_ids)
    assert tokenizer.all_special_ids == list(range(6))  # the factory's six special tokens
    ids = tokenizer.encode(TEXTS[-1])
    assert tokenizer.convert_ids_to_tokens(ids) == reference.convert_ids_to_tokens(ids)
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        tokenizer.convert_ids_to_tokens([tokenizer.vocab_size])


def test_special_tokens_written_as_dicts(folder: Path, tmp_path: Path) -> None:
    eos = {"content": "<|end|>", "special": True, "__type": "AddedToken"}
    tokenizer = Tokenizer.from_folder(with_config(folder, tmp_path / "t", eos_token=eos))
    assert tokenizer.eos_token_ids == (tokenizer.encode("<|end|>", add_special_tokens=False)[0],)
    no_eos = Tokenizer.from_folder(with_config(folder, tmp_path / "u", eos_token=None))
    assert no_eos.eos_token_ids == ()


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_factory_template_equals_transformers(
    tokenizer: Tokenizer, reference: Any, add_generation_prompt: bool
) -> None:
    ours = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
    theirs = reference.apply_chat_template(
        MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert ours == theirs
    assert ours.startswith("<|system|>You are terse.<|end|><|user|>hello world")
    ids = tokenizer.encode(ours, add_special_tokens=False)
    assert ids == reference.apply_chat_template(
        MESSAGES, add_generation_prompt=add_generation_prompt, return_dict=False
    )


@pytest.mark.parametrize("template", [LLAMA_LIKE, WHITESPACE], ids=["llama-like", "whitespace"])
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no-tools", "tools"])
def test_hand_written_templates_equal_transformers(
    folder: Path, tmp_path: Path, reference: Any, template: str, tools: Any
) -> None:
    target = with_config(folder, tmp_path / "model")
    (target / "chat_template.jinja").write_text(template)  # wins over tokenizer_config's
    messages = [*MESSAGES, {"role": "assistant", "content": "42", "tool_calls": None}]
    for add_generation_prompt in (True, False):
        kwargs = {"add_generation_prompt": add_generation_prompt, "tools": tools}
        ours = Tokenizer.from_folder(target).apply_chat_template(
            messages, enable_thinking=True, **kwargs
        )
        theirs = reference.apply_chat_template(
            messages, chat_template=template, tokenize=False, enable_thinking=True, **kwargs
        )
        assert ours == theirs
    assert "tool_calls=" not in ours  # `tool_calls: null` was dropped before rendering


def test_named_templates_in_tokenizer_config(folder: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    templates = [
        {"name": "default", "template": "default:{{ messages[0].content }}"},
        {"name": "tool_use", "template": "tools:{{ tools | length }}"},
    ]
    target = with_config(folder, tmp_path / "model", chat_template=templates)
    ours, theirs = Tokenizer.from_folder(target), AutoTokenizer.from_pretrained(target)
    tool_choices: tuple[Any, ...] = (None, TOOLS)
    for tools in tool_choices:
        expected = theirs.apply_chat_template(MESSAGES, tools=tools, tokenize=False)
        assert ours.apply_chat_template(MESSAGES, tools=tools) == expected
    assert ours.apply_chat_template(MESSAGES) == "default:You are terse."
    assert ours.apply_chat_template(MESSAGES, tools=TOOLS) == "tools:1"


def test_no_template_is_a_request_error(folder: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_folder(with_config(folder, tmp_path / "t", chat_template=None))
    with pytest.raises(InvalidRequestError) as error:
        tokenizer.apply_chat_template(MESSAGES)
    assert str(error.value) == "this model has no chat template; use /v1/completions"


def test_raise_exception_becomes_the_request_error(tokenizer: Tokenizer) -> None:
    templated = Tokenizer(tokenizer.backend, tokenizer.special_tokens, {"default": LLAMA_LIKE})
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(InvalidRequestError, match="roles must alternate user/assistant"):
        templated.apply_chat_template(bad)


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{% set ns = namespace() %}{% set ns._secret = 1 %}",
        "{{ cycler.__init__.__globals__.os }}",
    ],
)
def test_sandbox_refuses_python_internals(tokenizer: Tokenizer, template: str) -> None:
    import jinja2.exceptions
    from transformers.utils.chat_template_utils import render_jinja_template

    with pytest.raises(jinja2.exceptions.SecurityError):
        render_jinja_template([MESSAGES], chat_template=template)
    sandboxed = Tokenizer(tokenizer.backend, tokenizer.special_tokens, {"default": template})
    with pytest.raises(InvalidRequestError, match="chat template error"):
        sandboxed.apply_chat_template(MESSAGES)


def test_template_that_does_not_compile(tokenizer: Tokenizer) -> None:
    broken = Tokenizer(tokenizer.backend, tokenizer.special_tokens, {"default": "{% if %}"})
    with pytest.raises(InvalidRequestError, match="does not compile"):
        broken.apply_chat_template(MESSAGES)


def test_missing_tokenizer_json(folder: Path, tmp_path: Path) -> None:
    target = with_config(folder, tmp_path / "t")
    (target / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json not found"):
        Tokenizer.from_folder(target)
    with pytest.raises(ModelLoadError, match="huggingface-cli download"):
        Tokenizer.from_folder(tmp_path / "absent")


@pytest.mark.parametrize("text", [*TEXTS, "hello world, " * 12_000])  # the last: 156k chars
def test_encode_at_most_equals_encode_within_the_limit(tokenizer: Tokenizer, text: str) -> None:
    for special in (True, False):
        ids = tokenizer.encode(text, add_special_tokens=special)
        encoded = tokenizer.encode_at_most(text, len(ids), add_special_tokens=special)
        assert (encoded.ids, encoded.num_tokens, encoded.exact) == (ids, len(ids), True)
        over = tokenizer.encode_at_most(text, len(ids) - 1, add_special_tokens=special)
        assert over.ids is None and over.num_tokens <= len(ids)


def test_a_long_text_far_over_the_limit_is_counted_in_chunks(tokenizer: Tokenizer) -> None:
    text = "SELECT name FROM users WHERE id = 42; " * 20_000  # 760k chars
    exact = len(tokenizer.encode(text))
    encoded = tokenizer.encode_at_most(text, 1000)
    assert encoded.ids is None and not encoded.exact
    assert 1000 < encoded.num_tokens <= exact  # a lower bound, found in the first chunks
    assert encoded.num_tokens < exact / 4


def test_longest_token_chars_bounds_every_token(tokenizer: Tokenizer) -> None:
    longest = tokenizer.longest_token_chars
    for text in TEXTS:
        for token_id in tokenizer.encode(text):
            assert len(tokenizer.decode([token_id], skip_special_tokens=False)) <= longest
