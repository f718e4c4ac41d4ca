"""A live server's /metrics for the tests that check the names the deployment files query.

The server comes from tests/server's harness (a tiny model on 127.0.0.1), not a copy of it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import yaml
from deploy_files import DEPLOY
from server_harness import ADAPTERS, Running, assets, start_server

from loraserve.server.auth import read_metrics_key

__all__ = ["assets", "exposition"]


@pytest.fixture(scope="module")
def exposition(assets) -> Iterator[str]:
    """/metrics of a server that has served one adapter request and one base one (so that
    labelled series and histogram buckets exist), scraped as the compose stack's Prometheus
    scrapes: at its path, with the demo metrics key the stack gives both."""
    (scrape,) = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())[
        "scrape_configs"
    ]
    key_file = DEPLOY / "prometheus" / "demo-metrics-key"
    running: Running = start_server(assets, metrics_key_file=str(key_file))
    try:
        client = running.server.client()
        base = running.engine.info.served_model_name
        for model in (next(iter(ADAPTERS)), base):
            client.completions.create(
                model=model,
                prompt="hello",
                max_tokens=4,
                temperature=0,
                extra_body={"ignore_eos": True},  # 4 tokens: gaps between tokens to observe
            )
        headers = {"Authorization": f"Bearer {read_metrics_key(key_file)}"}
        with running.server.http() as http:
            path = scrape.get("metrics_path", "/metrics")
            assert http.get(path).status_code == 401  # the key is needed, and enough
            yield http.get(path, headers=headers).raise_for_status().text
    finally:
        running.server.stop()
