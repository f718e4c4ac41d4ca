"""Where a request comes from, beyond its tokens and params (no torch: both processes use it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestOrigin:
    """Who sent a request, and where its adapter's folder is."""

    tenant: str | None = None
    """The API key's tenant (fairness is per tenant); None is the anonymous tenant."""
    tenant_weight: float = 1.0
    """The tenant's share of service relative to others (the API-keys file's `weight`)."""
    adapter_path: str | None = None
    """The adapter's folder, as the front end found it in the adapter dir; the engine
    registers the adapter from it if it does not know it yet."""
