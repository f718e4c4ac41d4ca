"""bench.hostile's issue-25 cases, without a server: the `n-x-prompts` body is the case the
issue found (each limit passed alone, the product refused), and the tenant probe's keys file
and counter reading mean what the probe says they mean."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraserve.bench.hostile import CASES
from loraserve.bench.tenant_probe import (
    ADMIN_KEY,
    MODES,
    TENANT_KEYS,
    counter_totals,
    keys_file,
)
from loraserve.errors import InvalidRequestError
from loraserve.server.auth import Tenants
from loraserve.server.limits import RequestLimits


def test_n_x_prompts_passes_each_limit_alone_and_not_together() -> None:
    body = CASES["n-x-prompts"]()
    num_prompts, n = len(body["prompt"]), body["n"]
    assert (num_prompts, n) == (256, 128)
    limits = RequestLimits()  # the server's defaults, as bench.hostile starts it
    limits.check_n(n, 1)
    limits.check_n(1, num_prompts)
    with pytest.raises(InvalidRequestError, match="32768"):
        limits.check_n(n, num_prompts)


@pytest.mark.parametrize("mode", [mode for mode, extra in MODES.items() if extra is not None])
def test_tenant_keys_file_puts_a_and_b_apart_or_in_one_group(mode: str, tmp_path: Path) -> None:
    extra = MODES[mode]
    assert extra is not None
    tenants = Tenants.from_file(keys_file(tmp_path, extra))
    a, b = (tenants.authenticate(f"Bearer {TENANT_KEYS[name]}") for name in ("A", "B"))
    assert a.name != b.name, "two tenants"
    same_scope = a.cache_scope_of(None) == b.cache_scope_of(None)
    assert same_scope == (mode == "group")
    assert tenants.authenticate(f"Bearer {ADMIN_KEY}").admin, "it reads /metrics"


def test_counter_totals_sum_every_label_set_and_refuse_a_missing_counter() -> None:
    exposition = "\n".join(
        [
            "# HELP vllm:prefix_cache_queries_total Prompt tokens looked up.",
            "# TYPE vllm:prefix_cache_queries_total counter",
            'vllm:prefix_cache_queries_total{model_name="base"} 1320.0',
            'vllm:prefix_cache_queries_total{model_name="other"} 10.0',
            'vllm:prefix_cache_hits_total{model_name="base"} 656.0',
            "vllm:prefix_cache_hits_total_other 5.0",
        ]
    )
    assert counter_totals(exposition) == (1330.0, 656.0)
    with pytest.raises(RuntimeError, match="hits_total"):
        counter_totals(exposition.replace("hits_total{", "hit_total{"))
