"""Tenants: who may call the server, which adapters each may use, how often.

The `--api-keys` file (YAML or JSON) maps each API key to its tenant:

    sk-alpha-1:
      tenant: alpha
      adapters: [caps, pirate]     # or "*" for every adapter, present and future
      requests_per_minute: 60      # optional; shared by all keys of the tenant
    sk-ops:
      tenant: ops
      adapters: "*"
      admin: true                  # may call /v1/load_lora_adapter and unload

Every tenant may use the base model unless `base_model: false`. Without the file
the server is open: every caller is the anonymous admin tenant.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loraserve.server.errors import APIError


class _KeyEntry(BaseModel):
    """One key's line of the file, validated."""

    model_config = ConfigDict(extra="forbid", strict=True)

    tenant: str = Field(min_length=1)
    adapters: list[str] | Literal["*"] = []
    base_model: bool = True
    admin: bool = False
    requests_per_minute: int | None = Field(default=None, ge=1)


@dataclass(eq=False)
class RateLimiter:
    """A token bucket: `per_minute` requests a minute, bursts up to `per_minute`."""

    per_minute: int
    tokens: float = field(init=False)
    updated: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.tokens = float(self.per_minute)

    def acquire(self) -> float:
        """Take one request's token; 0 on success, else the seconds until one is free."""
        with self.lock:
            now = time.monotonic()
            rate = self.per_minute / 60.0
            self.tokens = min(self.per_minute, self.tokens + (now - self.updated) * rate)
            self.updated = now
            if self.tokens >= 1:
                self.tokens -= 1
                return 0.0
            return (1 - self.tokens) / rate


@dataclass
class Tenant:
    """A caller of the API and what it may do."""

    name: str
    adapters: frozenset[str] | None = None
    """Adapters it may use; None = all."""
    base_model: bool = True
    admin: bool = False
    limiter: RateLimiter | None = None

    def may_use(self, adapter: str | None) -> bool:
        """Whether this tenant may call `adapter` (None = the base model)."""
        if adapter is None:
            return self.base_model
        return self.adapters is None or adapter in self.adapters

    def check_rate(self) -> None:
        """Count one request; APIError 429 with Retry-After above the tenant's rate."""
        if self.limiter is None:
            return
        wait = self.limiter.acquire()
        if wait > 0:
            raise APIError(
                429,
                f"tenant {self.name!r} is over its limit of "
                f"{self.limiter.per_minute} requests per minute",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(math.ceil(wait))},
            )


OPEN_TENANT = Tenant("anonymous", admin=True)
"""Every caller, when the server runs without --api-keys."""


class Tenants:
    """API keys -> tenants; keys are kept only as SHA-256 digests."""

    def __init__(self, by_digest: dict[str, Tenant]) -> None:
        self._by_digest = by_digest

    @classmethod
    def from_file(cls, path: str | Path) -> Tenants:
        """Read the --api-keys file; ValueError naming the bad entry."""
        text = Path(path).read_text(encoding="utf-8")
        try:
            raw = yaml.safe_load(text)  # YAML is a superset of JSON
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML/JSON: {error}") from error
        if not isinstance(raw, dict) or not raw:
            raise ValueError(f"{path}: expected a mapping of API key -> tenant")
        return cls(_tenants_by_digest(raw, path))

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant of an `Authorization: Bearer KEY` header; APIError 401 otherwise."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(
                401,
                "Missing API key: send `Authorization: Bearer YOUR_KEY`.",
                code="missing_api_key",
            )
        tenant = self._by_digest.get(_digest(key.strip()))
        if tenant is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return tenant


def _digest(key: str) -> str:
    # Looking up a digest, not the key, keeps lookup timing independent of the key's text.
    return hashlib.sha256(key.encode()).hexdigest()


def _tenants_by_digest(raw: dict[Any, Any], path: str | Path) -> dict[str, Tenant]:
    """One Tenant object per tenant name (its keys share it, and its rate limit)."""
    entries: dict[str, _KeyEntry] = {}
    tenants: dict[str, Tenant] = {}
    by_digest: dict[str, Tenant] = {}
    for key, value in raw.items():
        try:
            entry = _KeyEntry.model_validate(value)
        except ValidationError as error:
            # Name the entry by the start of its key only: the file holds secrets.
            raise ValueError(f"{path}: key {str(key)[:6]}...: {error}") from error
        if entries.setdefault(entry.tenant, entry) != entry:
            raise ValueError(f"{path}: keys of tenant {entry.tenant!r} disagree on its settings")
        if entry.tenant not in tenants:
            tenants[entry.tenant] = _tenant(entry)
        by_digest[_digest(str(key))] = tenants[entry.tenant]
    return by_digest


def _tenant(entry: _KeyEntry) -> Tenant:
    adapters = None if entry.adapters == "*" else frozenset(entry.adapters)
    rate = entry.requests_per_minute
    limiter = None if rate is None else RateLimiter(rate)
    return Tenant(entry.tenant, adapters, entry.base_model, entry.admin, limiter)
