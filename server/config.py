"""The HTTP server's configuration (each field's docstring is its `--help` text)."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MAX_REQUEST_BODY_BYTES = 16 * 2**20


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
    """Serve every PEFT folder under DIR, named by its folder; /v1/load_lora_adapter may load from under it."""
    allowed_adapter_roots: tuple[str, ...] = field(
        default=(), metadata={"flag": "--allowed-adapter-root", "metavar": "DIR"}
    )
    """A folder /v1/load_lora_adapter may load adapters from (repeatable; --adapter-dir is one too)."""
    api_keys: str | None = field(default=None, metadata={"metavar": "FILE"})
    """YAML/JSON file of API keys -> tenant (name, adapters, requests_per_minute, admin); without it the server is open."""
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    """Largest request body accepted; larger ones get HTTP 413."""
    log_level: str = "info"
    """Server log level: critical | error | warning | info | debug."""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.max_request_body_bytes < 1:
            raise ValueError(
                f"max_request_body_bytes must be >= 1, got {self.max_request_body_bytes}"
            )
        levels = ("critical", "error", "warning", "info", "debug")
        if self.log_level not in levels:
            raise ValueError(f"log_level must be one of {levels}, got {self.log_level!r}")
        for spec in self.adapters:
            name, sep, path = spec.partition("=")
            if not (sep and name and path):
                raise ValueError(f"--adapter expects NAME=DIR, got {spec!r}")

    def adapter_roots(self) -> tuple[str, ...]:
        """Folders dynamic loading may read from."""
        roots = self.allowed_adapter_roots
        return roots if self.adapter_dir is None else (self.adapter_dir, *roots)
