"""The prefix cache as a timing channel between tenants (issue 25): does tenant B learn, from
its time to first token, that tenant A sent the same prompt?

    python -m bench.hostile --case tenant-timing

One fresh `loraserve serve` per mode, on the CPU benchmark model (bench/models.py):
- `open`: no `--api-keys`, every request shares the cache (vLLM's behaviour): the leak;
- `isolated`: `--api-keys` with A and B two tenants: each tenant's cache is its own (the
  default);
- `group`: A and B name the same `prefix_cache_group` (sharing opted into).
On each: a warm-up request sharing nothing, then one prompt of `PROMPT_TOKENS` random token
ids on the base model, sent by A (cold), by B, then by A again, one at a time. For each
request, its TTFT (the first streamed token) and, read from /metrics rather than the clock,
the prompt tokens it found cached (the growth of `vllm:prefix_cache_hits_total`). Expected:
B finds nothing cached when isolated and the prompt's whole blocks otherwise; A's second
request finds them everywhere.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import httpx
import yaml

from .servers import BASE_MODEL_NAME, loraserve_server

PROMPT_TOKENS = 660
"""The issue's probe: 660 tokens, 146 ms on a hit and 1.2-1.7 s on a miss where it was found."""
ADMIN_KEY = "sk-probe-admin"
"""Reads /metrics (which `--api-keys` guards); sends nothing."""
TENANT_KEYS = {"A": "sk-probe-a", "B": "sk-probe-b"}
MODES: dict[str, dict[str, Any] | None] = {
    "open": None,
    "isolated": {},
    "group": {"prefix_cache_group": "probe"},
}
"""mode -> what A's and B's entries of the keys file add (None: no keys file)."""
COUNTERS = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total")
COUNTER_WAIT_S = 10.0


def keys_file(folder: Path, extra: dict[str, Any]) -> Path:
    """An `--api-keys` file: tenants a and b (each with `extra`) and an admin."""
    entries: dict[str, Any] = {
        key: {"tenant": name.lower(), **extra} for name, key in TENANT_KEYS.items()
    }
    entries[ADMIN_KEY] = {"tenant": "ops", "adapters": "*", "admin": True}
    path = folder / "keys.yaml"
    path.write_text(yaml.safe_dump(entries))
    return path


def counter_totals(exposition: str) -> tuple[float, float]:
    """(prompt tokens looked up, of those found cached) summed over every label set."""
    totals = []
    for name in COUNTERS:
        pattern = rf"^{re.escape(name)}(?:\{{[^}}]*\}})?\s+(\S+)$"
        values = re.findall(pattern, exposition, re.MULTILINE)
        if not values:
            raise RuntimeError(f"{name} is not in /metrics")
        totals.append(sum(float(value) for value in values))
    return totals[0], totals[1]


def _headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _ttft(http: httpx.Client, key: str | None, prompt: list[int]) -> float:
    """Seconds to the first streamed token of a one-token greedy completion."""
    body = {"model": BASE_MODEL_NAME, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    start = time.perf_counter()
    ttft = None
    with http.stream(
        "POST", "/v1/completions", json={**body, "stream": True}, headers=_headers(key)
    ) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if ttft is None and line.startswith("data: {"):
                ttft = time.perf_counter() - start
    if ttft is None:
        raise RuntimeError("no token came back")
    return ttft


def _counters_after(
    http: httpx.Client, key: str | None, queries_before: float
) -> tuple[float, float]:
    """The counters once they count the request just answered (the engine publishes them
    after its step; the lookup is counted when the request is admitted)."""
    deadline = time.monotonic() + COUNTER_WAIT_S
    while True:
        text = http.get("/metrics", headers=_headers(key)).raise_for_status().text
        queries, hits = counter_totals(text)
        if queries > queries_before or time.monotonic() > deadline:
            return queries, hits
        time.sleep(0.02)


def probe(url: str, keys: bool, seed: int) -> list[dict[str, Any]]:
    """A, B, then A again send the same prompt; TTFT and hit tokens of each."""
    rng = random.Random(seed)
    prompt = [rng.randrange(3, 900) for _ in range(PROMPT_TOKENS)]
    metrics_key = ADMIN_KEY if keys else None
    rows = []
    with httpx.Client(base_url=url, timeout=120) as http:
        warm_up = [rng.randrange(3, 900) for _ in range(PROMPT_TOKENS)]
        _ttft(http, TENANT_KEYS["A"] if keys else None, warm_up)
        queries, hits = counter_totals(http.get("/metrics", headers=_headers(metrics_key)).text)
        for step, tenant in enumerate(("A", "B", "A")):
            ttft = _ttft(http, TENANT_KEYS[tenant] if keys else None, prompt)
            new_queries, new_hits = _counters_after(http, metrics_key, queries)
            rows.append(
                {
                    "step": step + 1,
                    "tenant": tenant,
                    "ttft_s": round(ttft, 4),
                    "prompt_tokens_looked_up": int(new_queries - queries),
                    "hit_tokens": int(new_hits - hits),
                }
            )
            queries, hits = new_queries, new_hits
    return rows


def run(model: Path, server_args: list[str], seed: int = 0) -> list[dict[str, Any]]:
    """Every mode on a fresh server: one result per mode."""
    results = []
    for mode, extra in MODES.items():
        with TemporaryDirectory() as folder:
            args = list(server_args)
            if extra is not None:
                args += ["--api-keys", str(keys_file(Path(folder), extra))]
            with loraserve_server(model, {}, args) as url:
                rows = probe(url, keys=extra is not None, seed=seed)
        b_hits = rows[1]["hit_tokens"]
        results.append(
            {
                "case": f"tenant-timing-{mode}",
                "prompt_tokens": PROMPT_TOKENS,
                "requests": rows,
                "b_reuses_a": b_hits > 0,
                "a_reuses_a": rows[2]["hit_tokens"] > 0,
            }
        )
    return results
