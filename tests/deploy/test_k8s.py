"""deploy/k8s: the GPU overlays (one GPU a pod, and two with tensor parallelism), each
rendered by the real kubectl and checked alike; their core objects pass
`kubernetes-validate --strict`; its InferencePool and InferenceModelRewrites match strict
schemas generated from the current CRDs (tests/deploy/crds: Gateway API Inference Extension
v1.6.0, llm-d router v0.10.0), its HTTPRoute and PodMonitor schemas written from Gateway
API's and Prometheus Operator's; the endpoint picker's config matches the llm-d router's
EndpointPickerConfig schema; the objects refer to each other and to loraserve's CLI; and a
pod has as many GPUs as tensor-parallel ranks, with a /dev/shm for NCCL past one."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from crd_schemas import crd_schemas
from deploy_files import K8S, REPO, tool
from epp_config_schema import ENDPOINT_PICKER_CONFIG
from k8s_render import Object, find, load_documents, render

from loraserve.server.auth import Tenants, read_metrics_key
from loraserve.server.cli import build_parser
from loraserve.server.config import ServerConfig

# The oldest Kubernetes deploy/README.md claims, and the newest kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.32.0", "1.37.0")
CRD_GROUPS = {
    "inference.networking.k8s.io",
    "llm-d.ai",
    "gateway.networking.k8s.io",
    "monitoring.coreos.com",
}
ENGINE_TYPE_LABEL = "llm-d.ai/engine-type"
"""The pod label the llm-d router's metrics extractor reads (vllm: vLLM's metric names)."""
GPU_OVERLAYS = ("overlays/gpu", "overlays/gpu-tp2")
"""What deploy/README.md says to apply: one GPU a pod, or two tensor-parallel ranks a pod."""
TENSOR_PARALLEL_SIZE = "--tensor-parallel-size"
"""The option overlays/gpu-tp2 gives."""


def shape(required: list[str], **properties: Any) -> dict[str, Any]:
    """A JSON schema of an object with these properties and no others."""
    return {
        "type": "object",
        "required": required,
        "properties": properties,
        "additionalProperties": False,
    }


NAME = {"type": "string", "minLength": 1, "maxLength": 253}
TEXT = {"type": "string"}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
LABELS = {"type": "object", "additionalProperties": TEXT}
# spec schemas by (apiVersion, kind) of the custom resources whose CRDs are not vendored in
# tests/deploy/crds (large, and not the router's): written from their openAPIV3Schema.
SPEC_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): shape(
        ["parentRefs", "rules"],
        parentRefs={
            "type": "array",
            "items": shape(["name"], group=TEXT, kind=TEXT, name=NAME, namespace=TEXT),
        },
        rules={
            "type": "array",
            "items": shape(
                ["backendRefs"],
                matches={
                    "type": "array",
                    "items": shape(
                        [],
                        path=shape(["value"], type={"enum": ["Exact", "PathPrefix"]}, value=TEXT),
                    ),
                },
                backendRefs={
                    "type": "array",
                    "items": shape(
                        ["name"], group=TEXT, kind=TEXT, name=NAME, weight={"type": "integer"}
                    ),
                },
                timeouts=shape([], request=TEXT, backendRequest=TEXT),
            ),
        },
    ),
    ("monitoring.coreos.com/v1", "PodMonitor"): shape(
        ["selector", "podMetricsEndpoints"],
        selector=shape(["matchLabels"], matchLabels=LABELS),
        podMetricsEndpoints={
            "type": "array",
            "items": shape(
                ["port"],
                port=TEXT,
                path=TEXT,
                interval=TEXT,
                authorization=shape(
                    ["credentials"],
                    type=TEXT,
                    credentials=shape(["key"], name=NAME, key=TEXT, optional={"type": "boolean"}),
                ),
            ),
        },
    ),
}


@pytest.fixture(scope="module", params=GPU_OVERLAYS)
def objects(request: pytest.FixtureRequest) -> list[Object]:
    return render(K8S / request.param)


def api_group(obj: Object) -> str:
    return obj["apiVersion"].rpartition("/")[0]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def pod_spec(objects: list[Object], name: str) -> dict[str, Any]:
    return find(objects, "Deployment", name)["spec"]["template"]["spec"]


def serve_options(args: list[str]) -> dict[str, Any]:
    """The options of `loraserve serve ARGS`, parsed by loraserve's own parser."""
    options, unknown = build_parser().parse_known_args(["serve", *args])
    assert not unknown, f"loraserve serve refuses {unknown}"
    return vars(options)


def gpu_count(container: dict[str, Any]) -> int:
    """The GPUs a container gets: its limit, which a request must equal where there is one."""
    resources = container["resources"]
    count = resources["limits"]["nvidia.com/gpu"]
    assert resources.get("requests", {}).get("nvidia.com/gpu", count) == count
    return int(count)


def quantity(text: str | int) -> int:
    """A Kubernetes quantity written as a whole number, with a binary suffix or none (`4Gi`,
    `16`)."""
    found = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", str(text))
    assert found is not None, f"not a whole-number quantity: {text!r}"
    number, suffix = found.groups()
    return int(number) * {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[suffix]


def epp_config(objects: list[Object]) -> dict[str, Any]:
    (text,) = find(objects, "ConfigMap", "loraserve-epp")["data"].values()
    return yaml.safe_load(text)  # type: ignore[no-any-return]


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_images_are_set_as_kustomize_edit_writes_them(overlay: str, tmp_path: Path) -> None:
    image = {"name": "loraserve", "newName": "registry.example/loraserve", "newTag": "1.2"}
    resource = os.path.relpath(K8S / overlay, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": [resource], "images": [image]})
    )
    objects = render(tmp_path)
    (server,) = pod_spec(objects, "loraserve")["containers"]
    (epp,) = pod_spec(objects, "loraserve-epp")["containers"]
    assert server["image"] == "registry.example/loraserve:1.2"
    assert epp["image"] == "ghcr.io/llm-d/llm-d-router-endpoint-picker:v0.10.0"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_pass_kubernetes_validate_strict(
    objects: list[Object], version: str, tmp_path: Path
) -> None:
    core = [o for o in objects if api_group(o) not in CRD_GROUPS]
    core += load_documents(K8S / "api-keys.example.yaml")
    assert {o["kind"] for o in core} >= {"Deployment", "Service", "HorizontalPodAutoscaler"}
    manifest = tmp_path / "core.yaml"
    manifest.write_text(yaml.safe_dump_all(core))
    validate = [tool("kubernetes-validate"), "--strict", "--kubernetes-version", version]
    result = subprocess.run([*validate, str(manifest)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_custom_resources_match_their_crds(objects: list[Object]) -> None:
    generated = crd_schemas()
    custom = [o for o in objects if api_group(o) in CRD_GROUPS]
    kinds = {(o["apiVersion"], o["kind"]) for o in custom}
    assert kinds == set(SPEC_SCHEMAS) | {
        ("inference.networking.k8s.io/v1", "InferencePool"),
        ("llm-d.ai/v1alpha2", "InferenceModelRewrite"),
    }
    for obj in custom:
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", obj["metadata"]["name"])
        key = (obj["apiVersion"], obj["kind"])
        if key in generated:
            jsonschema.validate(obj, generated[key])
        else:
            jsonschema.validate(obj["spec"], SPEC_SCHEMAS[key])


@pytest.mark.parametrize(
    "mistake",
    [
        {"spec": {"targetPort": [{"number": 8000}]}},  # a misspelt field
        {"spec": {"endpointPickerRef": {"port": {"number": 99999}}}},
        {"spec": {"appProtocol": "grpc"}},
    ],
)
def test_the_generated_schemas_are_strict(objects: list[Object], mistake: dict) -> None:
    pool = find(objects, "InferencePool", "loraserve")
    broken = merge(pool, mistake)
    schema = crd_schemas()[pool["apiVersion"], pool["kind"]]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: merge(base.get(k), v) for k, v in patch.items()}}
    return patch


def test_endpoint_picker_config_matches_its_schema_and_refers_to_its_plugins(
    objects: list[Object],
) -> None:
    config = epp_config(objects)
    jsonschema.validate(config, ENDPOINT_PICKER_CONFIG)
    declared = {plugin.get("name", plugin["type"]) for plugin in config["plugins"]}
    refs = [ref for profile in config["schedulingProfiles"] for ref in profile["plugins"]]
    for source in config["dataLayer"]["sources"]:
        refs += [source, *source["extractors"]]
    assert {ref["pluginRef"] for ref in refs} <= declared
    assert {"lora-affinity-scorer", "metrics-data-source", "core-metrics-extractor"} <= declared
    mistake = {**config, "plugins": [{"type": "queue-scorer", "parameters": {"weight": 2}}]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(mistake, ENDPOINT_PICKER_CONFIG)


def test_pool_selects_the_loraserve_pods_and_names_its_picker(objects: list[Object]) -> None:
    pool = find(objects, "InferencePool", "loraserve")["spec"]
    server = find(objects, "Deployment", "loraserve")["spec"]["template"]
    assert selects(pool["selector"]["matchLabels"], server["metadata"]["labels"])
    assert server["metadata"]["labels"][ENGINE_TYPE_LABEL] == "vllm"
    (container,) = server["spec"]["containers"]
    (target,) = pool["targetPorts"]
    assert target["number"] == serve_options(container["args"])["port"]
    assert target["number"] in [port["containerPort"] for port in container["ports"]]
    picker = pool["endpointPickerRef"]
    service = find(objects, "Service", picker["name"])["spec"]
    (epp,) = pod_spec(objects, "loraserve-epp")["containers"]
    epp_ports = {port["name"]: port["containerPort"] for port in epp["ports"]}
    (service_port,) = [p for p in service["ports"] if p["port"] == picker["port"]["number"]]
    assert epp_ports[service_port["targetPort"]] == picker["port"]["number"]
    epp_pods = find(objects, "Deployment", "loraserve-epp")["spec"]["template"]
    assert selects(service["selector"], epp_pods["metadata"]["labels"])
    assert "--pool-name=loraserve" in epp["args"]
    assert f"--grpc-port={picker['port']['number']}" in epp["args"]


def test_epp_reads_its_config_and_may_watch_what_it_needs(objects: list[Object]) -> None:
    spec = pod_spec(objects, "loraserve-epp")
    (epp,) = spec["containers"]
    (config_path,) = [a.partition("=")[2] for a in epp["args"] if a.startswith("--config-file=")]
    (mount,) = [m for m in epp["volumeMounts"] if config_path.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    data = find(objects, "ConfigMap", volume["configMap"]["name"])["data"]
    assert Path(config_path).name in data
    binding = find(objects, "RoleBinding", "loraserve-epp")
    account = {"kind": "ServiceAccount", "name": spec["serviceAccountName"]}
    assert {**account, "namespace": "loraserve"} in binding["subjects"]
    granted = set()
    for rule in find(objects, "Role", binding["roleRef"]["name"])["rules"]:
        if "watch" in rule["verbs"]:
            granted |= {(g, r) for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted >= {
        ("inference.networking.k8s.io", "inferencepools"),
        ("llm-d.ai", "inferencemodelrewrites"),
        ("llm-d.ai", "inferenceobjectives"),
        ("", "pods"),
    }


def test_route_and_rewrites_name_the_pool(objects: list[Object]) -> None:
    route = find(objects, "HTTPRoute", "loraserve")["spec"]
    refs = [ref for rule in route["rules"] for ref in rule["backendRefs"]]
    pool = {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "loraserve"}
    assert refs == [pool]
    rewrites = [o for o in objects if o["kind"] == "InferenceModelRewrite"]
    assert rewrites and all(o["spec"]["poolRef"]["name"] == "loraserve" for o in rewrites)


def test_gpu_pod(objects: list[Object]) -> None:
    """One GPU per tensor-parallel rank (one rank unless the option says more); past one, a
    memory-backed /dev/shm that NCCL's segments fit in, inside the memory limit."""
    spec = pod_spec(objects, "loraserve")
    (container,) = spec["containers"]
    options = serve_options(container["args"])
    assert (options["device"], options["host"]) == ("cuda", "0.0.0.0")
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    ranks = options.get("tensor_parallel_size", 1)
    assert gpu_count(container) == ranks
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    if ranks == 1:
        return
    (shm,) = [v["emptyDir"] for v in spec["volumes"] if v["name"] == mounts["/dev/shm"]]
    assert shm["medium"] == "Memory"
    # At least 1 GiB for NCCL's segments; a small part of the memory limit, which the tmpfs
    # pages count against.
    memory = quantity(container["resources"]["limits"]["memory"])
    assert 2**30 <= quantity(shm["sizeLimit"]) <= memory // 8


def test_the_tensor_parallel_overlay_runs_two_ranks_on_two_gpus() -> None:
    (container,) = pod_spec(render(K8S / "overlays" / "gpu-tp2"), "loraserve")["containers"]
    assert serve_options(container["args"])["tensor_parallel_size"] == 2 == gpu_count(container)
    assert container["args"].count(f"{TENSOR_PARALLEL_SIZE}=2") == 1
    # Everything else per GPU as the one-GPU pod has it (deployment-tp2.yaml says why).
    (one,) = pod_spec(render(K8S / "overlays" / "gpu"), "loraserve")["containers"]
    assert container["args"][:-1] == one["args"]
    for kind in ("requests", "limits"):
        for name in ("cpu", "memory"):
            if name in one["resources"][kind]:
                per_gpu = quantity(one["resources"][kind][name])
                assert quantity(container["resources"][kind][name]) == 2 * per_gpu


def test_loraserve_parses_the_tensor_parallel_size() -> None:
    """loraserve's own parser reads the option overlays/gpu-tp2 gives (issue 23)."""
    options, unknown = build_parser().parse_known_args(["serve", f"{TENSOR_PARALLEL_SIZE}=2"])
    assert not unknown and options.tensor_parallel_size == 2
    assert build_parser().parse_args(["serve", "-tp", "2"]).tensor_parallel_size == 2


def test_base_alone_serves_on_the_cpu() -> None:
    (deployment,) = [o for o in render(K8S / "base") if o["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert serve_options(container["args"])["device"] == "cpu"
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})


def test_probes_security_and_volumes(objects: list[Object]) -> None:
    spec = pod_spec(objects, "loraserve")
    (container,) = spec["containers"]
    port_names = {port["name"] for port in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
        assert container[probe]["httpGet"]["port"] in port_names
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # to load a model
    user = re.search(r"^USER (\d+)", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert user is not None and spec["securityContext"]["runAsUser"] == int(user.group(1))
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "/cache" in mounts and not mounts["/cache"].get("readOnly"), "the image's HOME"
    volumes = {v["name"]: v for v in spec["volumes"]}
    options = serve_options(container["args"])
    for path in (options["model"], options["adapter_dir"]):
        claim = volumes[mounts[path]["name"]]["persistentVolumeClaim"]
        assert mounts[path]["readOnly"] and claim["readOnly"]
        find(objects, "PersistentVolumeClaim", claim["claimName"])


def secret_of(spec: dict[str, Any], container: dict[str, Any], path: Path) -> str:
    """The Secret whose volume the container mounts at the folder of `path`."""
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    return volume["secret"]["secretName"]  # type: ignore[no-any-return]


def test_api_keys_and_the_metrics_key_come_from_the_secrets(
    objects: list[Object], tmp_path: Path
) -> None:
    spec = pod_spec(objects, "loraserve")
    (container,) = spec["containers"]
    options = serve_options(container["args"])
    examples = {o["metadata"]["name"]: o for o in load_documents(K8S / "api-keys.example.yaml")}
    keys, metrics_key = Path(options["api_keys"]), Path(options["metrics_key_file"])
    keys_secret = examples[secret_of(spec, container, keys)]
    (tmp_path / keys.name).write_text(keys_secret["stringData"][keys.name])
    Tenants.from_file(tmp_path / keys.name)  # the example is a file the server accepts
    metrics_secret = examples[secret_of(spec, container, metrics_key)]
    (tmp_path / metrics_key.name).write_text(metrics_secret["stringData"][metrics_key.name])
    read_metrics_key(tmp_path / metrics_key.name)
    # Prometheus sends that same key.
    (endpoint,) = find(objects, "PodMonitor", "loraserve")["spec"]["podMetricsEndpoints"]
    credentials = endpoint["authorization"]["credentials"]
    assert (credentials["name"], credentials["key"]) == (
        metrics_secret["metadata"]["name"],
        metrics_key.name,
    )
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports[endpoint["port"]] == options["port"]  # the API port, where the key counts


def test_the_endpoint_picker_alone_reads_the_keyless_metrics_port(objects: list[Object]) -> None:
    spec = pod_spec(objects, "loraserve")
    (container,) = spec["containers"]
    options = serve_options(container["args"])
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["metrics"] == options["metrics_port"] != options["port"]
    (source,) = [p for p in epp_config(objects)["plugins"] if p["type"] == "metrics-data-source"]
    assert source["parameters"]["port"] == options["metrics_port"]
    policy = find(objects, "NetworkPolicy", "loraserve")["spec"]
    labels = find(objects, "Deployment", "loraserve")["spec"]["template"]["metadata"]["labels"]
    assert selects(policy["podSelector"]["matchLabels"], labels) and policy["policyTypes"] == [
        "Ingress"
    ]
    epp_labels = find(objects, "Deployment", "loraserve-epp")["spec"]["template"]["metadata"]
    for rule in policy["ingress"]:
        (port,) = rule["ports"]
        if port["port"] == "metrics":
            (source,) = rule["from"]
            assert selects(source["podSelector"]["matchLabels"], epp_labels["labels"])
        else:
            assert port["port"] == "http" and "from" not in rule  # the API: from anywhere


@pytest.mark.parametrize("folder", ["base", *GPU_OVERLAYS])
def test_the_drain_fits_the_grace_period(folder: str) -> None:
    """preStop, then SIGTERM and loraserve's drain, all before Kubernetes kills the pod."""
    spec = pod_spec(render(K8S / folder), "loraserve")
    (container,) = spec["containers"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = serve_options(container["args"]).get(
        "drain_timeout_seconds", ServerConfig.drain_timeout_seconds
    )
    assert 0 < pre_stop + drain < spec["terminationGracePeriodSeconds"] <= 30


def test_monitoring_scaling_and_disruptions_target_the_pods(objects: list[Object]) -> None:
    template = find(objects, "Deployment", "loraserve")["spec"]["template"]
    labels = template["metadata"]["labels"]
    port_names = {p["name"] for p in template["spec"]["containers"][0]["ports"]}
    monitor = find(objects, "PodMonitor", "loraserve")["spec"]
    assert selects(monitor["selector"]["matchLabels"], labels)
    assert {e["port"] for e in monitor["podMetricsEndpoints"]} <= port_names
    budget = find(objects, "PodDisruptionBudget", "loraserve")["spec"]
    assert selects(budget["selector"]["matchLabels"], labels)
    service = find(objects, "Service", "loraserve")["spec"]
    assert selects(service["selector"], labels)
    assert {p["targetPort"] for p in service["ports"]} <= port_names
    target = find(objects, "HorizontalPodAutoscaler", "loraserve")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "loraserve")
