"""Tenants: who may call the server, which adapters each may use, how often.

The `--api-keys` file (YAML or JSON) maps each API key to its tenant:

    sk-alpha-1:
      tenant: alpha
      adapters: [caps, pirate]     # or "*" for every adapter, present and future
      requests_per_minute: 60      # optional; completions (n counts n), shared by its keys
      weight: 2                    # optional (default 1): its share of service under load
      prefix_cache_group: shared   # optional: share cached prompt prefixes with this group
    sk-ops:
      tenant: ops
      adapters: "*"
      admin: true                  # may call /v1/load_lora_adapter and unload

Every tenant may use the base model unless `base_model: false`. `--api-key KEY` (vLLM's
simple mode) adds one key that may do everything, as an admin key with every adapter, with or
without the file. Without either the server is open: every caller is the anonymous admin
tenant.

The prefix cache is private to each tenant: a request reuses only KV blocks that requests
of its own tenant cached, so no tenant learns from the time to its first token whether
another sent the same prompt. Tenants that name the same `prefix_cache_group` share their
cached prefixes (a common system prompt, say), with each other only. A request's
`cache_salt` (as in vLLM) narrows it further: it shares only with requests of the same
tenant (or group) and the same salt. On an open server every request shares, as in vLLM.

`weight` is the tenant's share of service when the server is loaded: with the VTC
admission policy (scheduler/policy.py, the default), backlogged tenants receive
prompt and generated tokens in proportion to their weights; a tenant of weight 2 gets
twice the service of a tenant of weight 1 while both have requests waiting.

`/metrics` names every adapter in use and the load on the server, so with
`--api-keys` it needs a key too: an admin key, or the metrics key, a separate
bearer token for Prometheus read from `--metrics-key-file` (a file holding just the
token, as Prometheus' `credentials_file` and a Kubernetes Secret key hold it; it
grants /metrics and nothing else). `--metrics-key-file` without `--api-keys`
protects /metrics alone. Scrapers that cannot send a header (the Gateway API
Inference Extension's endpoint picker) read `--metrics-port` instead: a second
listener that serves only /metrics and /health, without a key, for a port that
only the cluster's scrapers can reach (deploy/k8s/base/networkpolicy.yaml).
`/health` never needs a key. Tenants never see adapters' folders in /v1/models;
admins (and everyone on an open server) do.
"""

from __future__ import annotations

import hashlib
import hmac
import json
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
    weight: float = Field(default=1.0, gt=0, le=1_000_000)
    prefix_cache_group: str | None = Field(default=None, min_length=1)


@dataclass(eq=False)
class RateLimiter:
    """A token bucket: `per_minute` completions a minute, bursts up to `per_minute`."""

    per_minute: int
    tokens: float = field(init=False)
    updated: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.tokens = float(self.per_minute)

    def acquire(self, cost: int = 1) -> float:
        """Take `cost` tokens (cost <= per_minute); 0 on success, else the seconds until
        there are enough."""
        with self.lock:
            now = time.monotonic()
            rate = self.per_minute / 60.0
            self.tokens = min(self.per_minute, self.tokens + (now - self.updated) * rate)
            self.updated = now
            if self.tokens >= cost:
                self.tokens -= cost
                return 0.0
            return (cost - self.tokens) / rate


@dataclass
class Tenant:
    """A caller of the API and what it may do."""

    name: str
    adapters: frozenset[str] | None = None
    """Adapters it may use; None = all."""
    base_model: bool = True
    admin: bool = False
    limiter: RateLimiter | None = None
    weight: float = 1.0
    """Share of service under load, relative to other tenants (VTC fairness)."""
    cache_scope: str | None = None
    """With whom its requests share cached prefixes: its group, itself, or (None, an open
    server) every request."""

    def cache_scope_of(self, cache_salt: str | None) -> str:
        """A request's `EngineRequest.cache_scope`: this tenant's, narrowed by its salt."""
        if self.cache_scope is None and cache_salt is None:
            return ""
        return json.dumps([self.cache_scope, cache_salt])

    def may_use(self, adapter: str | None) -> bool:
        """Whether this tenant may call `adapter` (None = the base model)."""
        if adapter is None:
            return self.base_model
        return self.adapters is None or adapter in self.adapters

    def check_rate(self, num_completions: int = 1) -> None:
        """Count a request of `num_completions` completions (n times its prompts);
        APIError 429 above the tenant's rate, with Retry-After when waiting would help."""
        if self.limiter is None:
            return
        per_minute = self.limiter.per_minute
        if num_completions > per_minute:
            raise APIError(
                429,
                f"this request asks for {num_completions} completions; tenant {self.name!r} "
                f"may have at most {per_minute} a minute",
                code="rate_limit_exceeded",
            )
        wait = self.limiter.acquire(num_completions)
        if wait > 0:
            raise APIError(
                429,
                f"tenant {self.name!r} is over its limit of {per_minute} completions per minute",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(math.ceil(wait))},
            )


OPEN_TENANT = Tenant("anonymous", admin=True)
"""Every caller, when the server runs without --api-keys and --api-key."""
API_KEY_TENANT = "--api-key"
"""The tenant of the `--api-key` key (not a name the keys file can clash with in effect:
its cache scope is its own)."""


def read_metrics_key(path: str | Path) -> str:
    """The token of a --metrics-key-file (surrounding whitespace and newline dropped)."""
    key = Path(path).read_text(encoding="utf-8").strip()
    if not key or any(char.isspace() for char in key):
        raise ValueError(f"{path}: expected one token (no spaces), as Prometheus reads it")
    return key


class MetricsAccess:
    """Who may read /metrics on the API port (see the module docstring)."""

    def __init__(self, tenants: Tenants | None, metrics_key: str | None) -> None:
        self._tenants = tenants
        self._metrics_digest = None if metrics_key is None else _digest(metrics_key)

    @property
    def is_open(self) -> bool:
        return self._tenants is None and self._metrics_digest is None

    def check(self, authorization: str | None) -> None:
        """Nothing if the caller may read the metrics; APIError 401/403 otherwise."""
        if self.is_open:
            return
        key = _bearer_key(authorization)
        if self._metrics_digest is not None and hmac.compare_digest(
            _digest(key), self._metrics_digest
        ):
            return
        if self._tenants is None:
            raise APIError(401, "Incorrect metrics key provided.", code="invalid_api_key")
        if not self._tenants.authenticate(authorization).admin:
            raise APIError(
                403, "/metrics needs an admin key or the metrics key", code="admin_required"
            )


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

    @classmethod
    def from_options(cls, api_keys: str | None, api_key: str | None) -> Tenants | None:
        """The tenants of `--api-keys FILE` and `--api-key KEY` (vLLM's one key, which may do
        everything, as an admin key with every adapter); None (an open server) without
        either. ValueError if the key is also in the file."""
        if api_keys is None and api_key is None:
            return None
        by_digest = {} if api_keys is None else cls.from_file(api_keys)._by_digest
        if api_key is not None:
            if _digest(api_key) in by_digest:
                raise ValueError("the --api-key key is in the --api-keys file too; give it once")
            # Its own cache scope: the file's scopes are all `tenant:...` or `group:...`.
            by_digest[_digest(api_key)] = Tenant(API_KEY_TENANT, admin=True, cache_scope="api-key")
        return cls(by_digest)

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant of an `Authorization: Bearer KEY` header; APIError 401 otherwise."""
        tenant = self._by_digest.get(_digest(_bearer_key(authorization)))
        if tenant is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return tenant


def _bearer_key(authorization: str | None) -> str:
    """KEY of `Authorization: Bearer KEY`; APIError 401 without one."""
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(
            401,
            "Missing API key: send `Authorization: Bearer YOUR_KEY`.",
            code="missing_api_key",
        )
    return key.strip()


def _digest(key: str) -> str:
    # Looking up a digest, not the key, keeps lookup timing independent of the key's text.
    # surrogatepass: a header is latin-1, but a key must never make this raise.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


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
    group = entry.prefix_cache_group
    scope = f"tenant:{entry.tenant}" if group is None else f"group:{group}"
    return Tenant(
        entry.tenant, adapters, entry.base_model, entry.admin, limiter, entry.weight, scope
    )
