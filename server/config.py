"""The HTTP server's configuration (each field's docstring is its `--help` text)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")
"""`--tool-call-parser` choices (server/tools.py has a scanner for each)."""
MIN_DEFAULT_BODY_BYTES = 2**20
BODY_BYTES_PER_CONTEXT_TOKEN = 16
"""JSON bytes a prompt token may take: a token id is at most 7 ("128255,"), a token of
text a few characters, or 6 per `\\uXXXX` escape of a client that escapes non-ASCII."""


@dataclass(frozen=True)
class ServerConfig:
    """Where the server listens, who may call it, where adapters come from."""

    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 to accept connections from other machines)."""
    port: int = 8000
    """TCP port to listen on."""
    adapters: tuple[str, ...] = field(
        default=(), metadata={"flag": "--adapter", "metavar": "NAME=DIR"}
    )
    """Serve the PEFT adapter in folder DIR as model NAME (repeatable)."""
    adapter_dir: str | None = field(default=None, metadata={"metavar": "DIR"})
    """Serve every PEFT folder under DIR, named by its folder: listed at start and when DIR changes, read on first use (thousands are fine); /v1/load_lora_adapter may load from under it."""
    pin_adapters: tuple[str, ...] = field(
        default=(), metadata={"flag": "--pin-adapter", "metavar": "NAME"}
    )
    """Keep adapter NAME (from --adapter or --adapter-dir) resident in the pool, read at start (repeatable)."""
    allowed_adapter_roots: tuple[str, ...] = field(
        default=(), metadata={"flag": "--allowed-adapter-root", "metavar": "DIR"}
    )
    """A folder /v1/load_lora_adapter may load adapters from (repeatable; --adapter-dir is one too)."""
    api_keys: str | None = field(default=None, metadata={"metavar": "FILE"})
    """YAML/JSON file of API keys -> tenant (name, adapters, requests_per_minute, admin); without it the server is open."""
    api_key: str | None = field(default=None, metadata={"metavar": "KEY"})
    """One API key that callers must send as `Authorization: Bearer KEY` (vLLM's simple mode; also read from VLLM_API_KEY): it may do everything, as an admin key of --api-keys; with --api-keys, one key more."""
    max_request_body_bytes: int | None = None
    """Largest request body accepted; larger ones get HTTP 413 (default: 16 bytes per token of the model's context, at least 1 MiB: parsing a body holds the event loop, about 10 ms per MiB)."""
    metrics_key_file: str | None = field(default=None, metadata={"metavar": "FILE"})
    """File holding a bearer token that may read /metrics (and nothing else), for Prometheus; with it, or with API keys, /metrics needs that token or an admin key."""
    metrics_port: int | None = None
    """Also serve /metrics and /health, without a key, on this port (for scrapers that cannot send a key, such as the Gateway API Inference Extension's endpoint picker); keep it reachable by them only."""
    drain_timeout_seconds: float = 20.0
    """On SIGTERM: /health turns 503, new requests get 503, requests in flight get this long to finish before the process exits (keep it below Kubernetes' terminationGracePeriodSeconds minus the preStop hook)."""
    log_level: str = "info"
    """Server log level: critical | error | warning | info | debug."""
    uvicorn_log_level: str | None = None
    """uvicorn's log level (its access log lines are at info): critical | error | warning | info | debug | trace (default: --log-level)."""
    tool_call_parser: str | None = None
    """How `tool_choice: auto` finds tool calls in the output: hermes (Hermes, Qwen) | llama3_json | mistral; without it only `required` and named tool choices work."""
    enable_auto_tool_choice: bool = False
    """vLLM's switch for `tool_choice: auto`, accepted for vLLM's command lines; here a tool call parser alone enables it (and this switch needs one)."""
    chat_template: str | None = field(default=None, metadata={"metavar": "FILE_OR_TEMPLATE"})
    """A Jinja chat template (a file, or the template itself) used instead of the model's."""
    trust_request_chat_template: bool = False
    """Let requests bring their own `chat_template` (run in the same sandbox as the model's)."""
    allowed_origins: tuple[str, ...] = field(default=(), metadata={"metavar": "ORIGIN"})
    """CORS: an origin browsers may call from (repeatable, or a JSON list as vLLM takes it; `*` for any); none: no CORS headers (vLLM's default is `*`: browser pages of any site could use an open server)."""
    allowed_methods: tuple[str, ...] = field(default=(), metadata={"metavar": "METHOD"})
    """CORS: methods allowed (repeatable or a JSON list; default all)."""
    allowed_headers: tuple[str, ...] = field(default=(), metadata={"metavar": "HEADER"})
    """CORS: request headers allowed (repeatable or a JSON list; default all)."""
    allow_credentials: bool = False
    """CORS: allow credentials (cookies, HTTP authentication) in cross-origin requests."""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.max_request_body_bytes is not None and self.max_request_body_bytes < 1:
            raise ValueError(
                f"max_request_body_bytes must be >= 1, got {self.max_request_body_bytes}"
            )
        if self.metrics_port is not None and not (
            0 < self.metrics_port < 65536 and self.metrics_port != self.port
        ):
            raise ValueError(
                f"metrics_port must be in 1..65535 and differ from port, got {self.metrics_port}"
            )
        if not 0 <= self.drain_timeout_seconds <= 3600:
            raise ValueError(
                f"drain_timeout_seconds must be in [0, 3600], got {self.drain_timeout_seconds}"
            )
        levels = ("critical", "error", "warning", "info", "debug")
        if self.log_level not in levels:
            raise ValueError(f"log_level must be one of {levels}, got {self.log_level!r}")
        if self.uvicorn_log_level not in (None, *levels, "trace"):
            raise ValueError(
                f"uvicorn_log_level must be one of {(*levels, 'trace')}, "
                f"got {self.uvicorn_log_level!r}"
            )
        if self.api_key is not None and (not self.api_key or self.api_key != self.api_key.strip()):
            raise ValueError("api_key must be non-empty, without surrounding spaces")
        for spec in self.adapters:
            name, sep, path = spec.partition("=")
            if not (sep and name and path):
                raise ValueError(f"--adapter expects NAME=DIR, got {spec!r}")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(
                f"tool_call_parser must be one of {TOOL_CALL_PARSERS}, "
                f"got {self.tool_call_parser!r}"
            )
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
        for name in ("allowed_origins", "allowed_methods", "allowed_headers"):
            object.__setattr__(self, name, _json_lists(name, getattr(self, name)))

    def body_limit(self, max_model_len: int) -> int:
        """max_request_body_bytes, or its default for a model of this context length."""
        if self.max_request_body_bytes is not None:
            return self.max_request_body_bytes
        return max(MIN_DEFAULT_BODY_BYTES, BODY_BYTES_PER_CONTEXT_TOKEN * max_model_len)

    def chat_template_source(self) -> str | None:
        """--chat-template's template: the file's text, or the value itself."""
        value = self.chat_template
        if value is None or "{" in value:
            return value
        try:
            return Path(value).read_text(encoding="utf-8")
        except OSError as error:
            raise ValueError(f"--chat-template {value}: {error}") from None

    def adapter_roots(self) -> tuple[str, ...]:
        """Folders dynamic loading may read from."""
        roots = self.allowed_adapter_roots
        return roots if self.adapter_dir is None else (self.adapter_dir, *roots)


def _json_lists(name: str, values: tuple[str, ...]) -> tuple[str, ...]:
    """Values given one per option, or as a JSON list (`--allowed-origins '["*"]'`, vLLM's
    spelling)."""
    result: list[str] = []
    for value in values:
        if value.startswith("["):
            try:
                items = json.loads(value)
            except ValueError:
                raise ValueError(f"{name}: not a JSON list: {value!r}") from None
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise ValueError(f"{name}: expected a JSON list of strings, got {value!r}")
            result += items
        else:
            result.append(value)
    return tuple(result)
