"""deploy/compose.yaml parses and holds together: loraserve's CPU demo, Prometheus scraping
it, Grafana with the dashboard provisioned. `docker compose config` is not available here
(no compose plugin), so the structure is checked in Python."""

from __future__ import annotations

import json
from typing import Any

import yaml
from deploy_files import DEPLOY, REPO

from loraserve.server.auth import read_metrics_key
from loraserve.server.cli import build_parser
from loraserve.server.config import ServerConfig

TOP_LEVEL_KEYS = {"name", "services", "volumes", "networks", "configs", "secrets"}


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """host path (relative to deploy/) -> container path, of the service's bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[source] = target
    return mounts


def test_structure() -> None:
    spec = compose()
    assert set(spec) <= TOP_LEVEL_KEYS
    services = spec["services"]
    assert set(services) == {"loraserve", "prometheus", "grafana"}
    for name, service in services.items():
        assert "image" in service, f"{name} has no pinned image"
        assert not service["image"].endswith(":latest")
        assert set(service.get("depends_on", [])) <= set(services)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith("."):
                assert source in spec["volumes"], f"undeclared volume {source}"
        for source in bind_mounts(service):
            assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), "a demo listens on this machine only"


def test_loraserve_runs_the_demo_from_the_repository_cpu_image() -> None:
    service = compose()["services"]["loraserve"]
    # The CPU demo builds the CPU image, not the multi-gigabyte CUDA one, for the platform
    # its lock file is resolved for.
    assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == (
        REPO / "Dockerfile.cpu"
    )
    assert service["platform"] == "linux/amd64"
    assert service["entrypoint"][1] == "demo"
    assert service["build"]["args"]["EXTRAS"] == "[demo]", "the image needs the demo extra"
    options = vars(build_parser().parse_args([service["entrypoint"][1], *service["command"]]))
    assert options["host"] == "0.0.0.0"
    assert service["ports"] == [f"127.0.0.1:{options['port']}:{options['port']}"]
    assert "demo-cache:/cache" in service["volumes"], "the image's writable folder"


def test_prometheus_scrapes_the_loraserve_service_with_its_metrics_key() -> None:
    spec = compose()
    prometheus = spec["services"]["prometheus"]
    mounts = bind_mounts(prometheus)
    (config_file,) = mounts
    assert f"--config.file={mounts[config_file]}" in prometheus["command"]
    config = yaml.safe_load((DEPLOY / config_file).read_text())
    (scrape,) = config["scrape_configs"]
    (static,) = scrape["static_configs"]
    demo = vars(build_parser().parse_args(["demo", *spec["services"]["loraserve"]["command"]]))
    assert static["targets"] == [f"loraserve:{demo['port']}"]
    # One compose secret: the file loraserve reads its key from, the file Prometheus sends.
    (secret,) = spec["services"]["loraserve"]["secrets"]
    assert demo["metrics_key_file"] == f"/run/secrets/{secret}"
    assert prometheus["secrets"] == [secret]
    assert scrape["authorization"]["credentials_file"] == f"/run/secrets/{secret}"
    read_metrics_key(DEPLOY / spec["secrets"][secret]["file"])


def test_docker_waits_for_the_drain() -> None:
    service = compose()["services"]["loraserve"]
    demo = vars(build_parser().parse_args(["demo", *service["command"]]))
    drain = demo.get("drain_timeout_seconds", ServerConfig.drain_timeout_seconds)
    assert float(service["stop_grace_period"].removesuffix("s")) > drain


def test_grafana_provisions_the_datasource_and_dashboard() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = bind_mounts(grafana)
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert datasource["url"] == "http://prometheus:9090" and datasource["isDefault"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "loraserve.yaml").read_text())[
        "providers"
    ]
    dashboard_path = mounts["./grafana/loraserve.json"]
    assert dashboard_path.rpartition("/")[0] == provider["options"]["path"]
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == dashboard_path


def test_dashboard_is_valid_grafana_json() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "loraserve.json").read_text())
    assert dashboard["uid"] == "loraserve" and dashboard["panels"]
    (variable,) = dashboard["templating"]["list"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${" + variable["name"] + "}"
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids))
