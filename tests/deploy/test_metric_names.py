"""Every metric name the deployment files query is one a live server exports: the Grafana
dashboard's PromQL, the HPA's metric through the Prometheus adapter's rule, the vLLM
names deploy/README.md says the endpoint picker reads, and every panel of vLLM's own
example dashboard (deploy/grafana/vllm/), fed: its series exist with the `model_name` it
selects, and its histograms have observations."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from deploy_files import DEPLOY, K8S
from server_harness import Assets

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
PROMQL_KEYWORDS |= {"and", "or", "unless", "offset"}
# The dashboard's topics, each by the metric that shows it.
DASHBOARD_MUST_SHOW = {
    "loraserve_requests_total",
    "vllm:num_requests_waiting",
    "loraserve_time_to_first_token_seconds_bucket",
    "loraserve_time_per_output_token_seconds_bucket",
    "loraserve_pool_pages",
    "loraserve_adapter_loads_total",
    "loraserve_adapter_evictions_total",
    "vllm:num_gpu_loaded_lora_adapters",
    "vllm:num_cpu_loaded_lora_adapters",
    "vllm:lora_adapter_load_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:request_queue_time_seconds_bucket",
    "vllm:request_prefill_time_seconds_bucket",
    "vllm:request_decode_time_seconds_bucket",
    "vllm:request_prompt_tokens_bucket",
    "vllm:request_generation_tokens_bucket",
    "loraserve_engine_step_seconds_bucket",
}
VLLM_EXAMPLE_QUERIES = DEPLOY / "grafana" / "vllm" / "example-dashboard-queries.yaml"


def exported_names(exposition: str) -> set[str]:
    """Names of the samples in Prometheus text (histograms as their _bucket/_sum/_count)."""
    names = set()
    for line in exposition.splitlines():
        match = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line)
        if match and not line.startswith("#"):
            names.add(match.group())
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers outside strings, label
    matchers, ranges and label lists that are neither function calls nor keywords."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    # Not after a digit or a dot: the unit of a duration (5m) or part of a number.
    for match in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        is_call = expr[match.end() :].lstrip().startswith("(")
        if not is_call and match.group() not in PROMQL_KEYWORDS:
            names.add(match.group())
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "loraserve.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


@pytest.mark.parametrize(
    "expr, names",
    [
        (
            'histogram_quantile(0.9, sum by (le) (rate(a_bucket{x="y"}[$__rate_interval])))',
            {"a_bucket"},
        ),
        (
            "sum(vllm:num_requests_waiting) / on (pod) group_left max(b_total)",
            {"vllm:num_requests_waiting", "b_total"},
        ),
        ('sum without (use) (c{use=~"kv|free"}) offset 5m', {"c"}),
    ],
)
def test_metric_names_of_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_dashboard_queries_only_exported_metrics(exposition: str) -> None:
    exported = exported_names(exposition)
    for expr in dashboard_exprs():
        assert metric_names(expr), f"no metric in {expr!r}"
        assert metric_names(expr) <= exported, f"{expr!r} queries what /metrics lacks"


def test_dashboard_shows_every_topic() -> None:
    queried = set().union(*map(metric_names, dashboard_exprs()))
    assert queried >= DASHBOARD_MUST_SHOW


def test_hpa_metric_is_served_by_the_adapter_from_an_exported_series(exposition: str) -> None:
    hpa = yaml.safe_load((K8S / "base" / "hpa.yaml").read_text())
    (metric,) = hpa["spec"]["metrics"]
    wanted = metric["pods"]["metric"]["name"]
    adapter = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    (rule,) = [r for r in adapter["rules"]["custom"] if r["name"]["as"] == wanted]
    (series,) = metric_names(rule["seriesQuery"])
    assert re.fullmatch(rule["name"]["matches"], series)
    assert series == "vllm:num_requests_waiting"
    assert series in exported_names(exposition)


def test_metrics_the_endpoint_picker_reads_are_exported(exposition: str) -> None:
    readme = (DEPLOY / "README.md").read_text()
    named = set(re.findall(r"`(vllm:[a-z_]+)", readme))
    assert named >= {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"}
    assert {"vllm:lora_requests_info", "vllm:lora_adapter_loaded"} <= named
    exported = exported_names(exposition)
    for name in named:  # a histogram is exported as its _bucket, _sum and _count series
        assert name in exported or f"{name}_bucket" in exported, name


def samples(exposition: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample in Prometheus text."""
    found = []
    for line in exposition.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)", line)
        if match and not line.startswith("#"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            found.append((match.group(1), labels, float(match.group(3))))
    return found


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(metric name, its `label="value"` matchers) of each series an expression selects."""
    found = []
    for name in metric_names(expr):
        for match in re.finditer(
            r"(?<![\w:])" + re.escape(name) + r"(?![\w:])(?:\{([^}]*)\})?", expr
        ):
            found.append((name, dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', match.group(1) or ""))))
    return found


def vllm_example_panels() -> dict[str, list[str]]:
    panels: dict[str, list[str]] = yaml.safe_load(VLLM_EXAMPLE_QUERIES.read_text())["panels"]
    return panels


def test_the_vllm_example_dashboard_is_written_down_whole() -> None:
    panels = vllm_example_panels()
    assert len(panels) == 12 and all(panels.values())
    found = selectors('rate(a_sum{model_name="$model_name"}[1m]) / a + a_sum')
    assert sorted(found, key=str) == [
        ("a", {}),
        ("a_sum", {"model_name": "$model_name"}),
        ("a_sum", {}),
    ]


@pytest.mark.parametrize("panel", sorted(vllm_example_panels()))
def test_every_panel_of_vllms_example_dashboard_is_fed(
    panel: str, exposition: str, assets: Assets
) -> None:
    """Each series a panel selects, with $model_name = the served model's name (the value the
    dashboard's `label_values(model_name)` offers), is exported; a histogram has observations."""
    model_name = Path(assets.model).name
    exported = samples(exposition)
    for expr in vllm_example_panels()[panel]:
        for name, matchers in selectors(expr.replace("$model_name", model_name)):
            values = [
                value
                for sample, labels, value in exported
                if sample == name and all(labels.get(k) == v for k, v in matchers.items())
            ]
            assert values, f"{panel}: no series {name}{matchers} in /metrics"
            if name.endswith(("_bucket", "_count")):
                assert max(values) > 0, f"{panel}: {name} has no observations"


# What the llm-d router v0.10.0 (the version k8s/inference/epp.yaml pins) reads from a pod
# labelled llm-d.ai/engine-type: vllm, from its source on the release-0.10 branch:
# core-metrics-extractor's default vLLM engine config (datalayer/extractor/metrics/
# factories.go) and the labels extractor.go parses. series -> labels read (none: the value).
ROUTER_V0_10_READS: dict[str, set[str]] = {
    "vllm:num_requests_waiting": set(),
    "vllm:num_requests_running": set(),
    "vllm:kv_cache_usage_perc": set(),
    "vllm:lora_requests_info": {"running_lora_adapters", "waiting_lora_adapters", "max_lora"},
    "vllm:cache_config_info": {"block_size", "num_gpu_blocks"},
}
# The scorers of v0.10.0 that read those series (the rest of epp.yaml's plugins read none).
ROUTER_V0_10_SCORERS = {"lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer"}


def epp_plugins() -> set[str]:
    documents = yaml.safe_load_all((K8S / "inference" / "epp.yaml").read_text())
    (config_map,) = [d for d in documents if d["kind"] == "ConfigMap"]
    config = yaml.safe_load(config_map["data"]["epp.yaml"])
    return {plugin["type"] for plugin in config["plugins"]}


def test_what_the_pinned_router_reads_is_exported_as_it_parses_it(exposition: str) -> None:
    """Each series v0.10.0 reads is there once, with the labels it parses in the form it
    parses them: integers where it calls Atoi, and the LoRA info's value a recent Unix time
    (it keeps the series with the largest value)."""
    exported = samples(exposition)
    for name, labels in ROUTER_V0_10_READS.items():
        series = [found for sample, found, _ in exported if sample == name]
        assert len(series) == 1, f"{name}: {len(series)} series"
        (found,) = series
        assert labels <= set(found), f"{name} lacks {labels - set(found)}"
        for label in labels & {"max_lora", "block_size", "num_gpu_blocks"}:
            assert int(found[label]) > 0, (name, label, found[label])
    (reading,) = [value for name, _, value in exported if name == "vllm:lora_requests_info"]
    assert reading > 1.7e9, "the value is the time of the reading"
    assert epp_plugins() >= ROUTER_V0_10_SCORERS


def test_the_readme_names_as_readers_only_scorers_the_manifests_run() -> None:
    """deploy/README.md's table says which plugin reads each series: a scorer it names as a
    reader is one epp.yaml configures, unless the row says it is not in v0.10.0."""
    readme = (DEPLOY / "README.md").read_text()
    rows = re.findall(r"^\| `(vllm:[^|]*)\|[^|]*\| ([^|]*) \|$", readme, re.MULTILINE)
    assert len(rows) >= len(ROUTER_V0_10_READS)
    configured = epp_plugins()
    for metric, readers in rows:
        for scorer in re.findall(r"`([a-z-]+-scorer)`", readers):
            assert scorer in configured or "not v0.10.0" in readers, (metric, scorer)
    for metric in ROUTER_V0_10_READS:
        assert any(row.startswith(f"{metric}`") for row, _ in rows), metric


def test_load_time_histogram_is_labelled_by_transition_as_the_residency_scorer_reads_it(
    exposition: str,
) -> None:
    """llm-d-router PR #2792 reads vllm:lora_adapter_load_seconds by its `transition` label,
    `load` (disk into the host cache) and `activate` (host cache into a GPU slot). The
    fixture's adapter request did both once."""
    counts = {
        labels.get("transition"): value
        for name, labels, value in samples(exposition)
        if name == "vllm:lora_adapter_load_seconds_count"
    }
    assert set(counts) == {"load", "activate"}
    assert counts["load"] >= 1 and counts["activate"] >= 1
    buckets = [
        labels
        for name, labels, _ in samples(exposition)
        if name == "vllm:lora_adapter_load_seconds_bucket"
    ]
    assert buckets and all(set(labels) == {"le", "transition"} for labels in buckets)
