"""JSON schemas of custom resources, generated from their CRDs (tests/deploy/crds/).

A CRD's `openAPIV3Schema` is a JSON schema with Kubernetes extensions; the API server
prunes unknown fields, so a manifest with a misspelt field applies silently and loses
it. Checked here strictly instead: every object schema that lists its properties and
does not preserve unknown fields refuses others (`additionalProperties: false`), as
`kubectl apply --validate=strict` would against a live server. CEL rules
(`x-kubernetes-validations`) are not evaluated.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

CRDS = Path(__file__).parent / "crds"
Schema = dict[str, Any]


def crd_schemas(folder: Path = CRDS) -> dict[tuple[str, str], Schema]:
    """(apiVersion, kind) -> strict schema of the whole object, for every served version."""
    schemas = {}
    for path in sorted(folder.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        spec = crd["spec"]
        for version in spec["versions"]:
            if version.get("served"):
                api_version = f"{spec['group']}/{version['name']}"
                schema = strict(version["schema"]["openAPIV3Schema"])
                schemas[api_version, spec["names"]["kind"]] = schema
    return schemas


def strict(schema: Schema) -> Schema:
    """`schema` with unknown properties refused wherever the CRD lists them."""
    schema = copy.deepcopy(schema)
    _tighten(schema)
    return schema


def _tighten(node: Any) -> None:
    if isinstance(node, list):
        for item in node:
            _tighten(item)
        return
    if not isinstance(node, dict):
        return
    preserves = node.get("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in node and "additionalProperties" not in node and not preserves:
        node["additionalProperties"] = False
    for key, value in node.items():
        if key != "default":  # defaults are values, not schemas
            _tighten(value)
