"""Render a kustomization in Python, for the tests of deploy/k8s where kubectl is absent.

Only what deploy/k8s uses, and a kustomization using anything else is refused rather than
half-rendered: `resources` (files, or folders with their own kustomization), `patches` that
are strategic-merge patches given by `path`, `images` (as `kustomize edit set image` writes
them) and `namespace`. The strategic merge is the
subset those patches need: maps merge, lists of named maps (containers, volumes, env) merge
by `name`, other lists are replaced. test_k8s.py checks the result equals `kubectl kustomize`
wherever kubectl is installed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "patches", "images", "namespace"}
CLUSTER_SCOPED_KINDS = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
}

Object = dict[str, Any]


def load_documents(path: Path) -> list[Object]:
    """The non-empty YAML documents of a file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def render(folder: Path) -> list[Object]:
    """The objects `kubectl kustomize folder` would print (in file order, not kustomize's)."""
    (kustomization,) = load_documents(folder / "kustomization.yaml")
    unsupported = set(kustomization) - SUPPORTED_KEYS
    if unsupported:
        raise ValueError(f"{folder}: k8s_render does not support {sorted(unsupported)}")
    objects: list[Object] = []
    for resource in kustomization.get("resources", []):
        path = folder / resource
        objects += render(path) if path.is_dir() else load_documents(path)
    for patch in kustomization.get("patches", []):
        if set(patch) != {"path"}:
            raise ValueError(f"{folder}: only `path` patches are supported, got {patch}")
        for document in load_documents(folder / patch["path"]):
            target = find(objects, document["kind"], document["metadata"]["name"])
            objects[objects.index(target)] = merge(target, document)
    for image in kustomization.get("images", []):
        objects = [set_image(obj, image) for obj in objects]
    if "namespace" in kustomization:
        objects = [set_namespace(obj, kustomization["namespace"]) for obj in objects]
    return objects


def find(objects: list[Object], kind: str, name: str) -> Object:
    """The one object of that kind and name."""
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def merge(base: Any, patch: Any) -> Any:
    """`patch` strategically merged into `base` (the subset described in the module doc)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            merged[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    if _named_list(base) and _named_list(patch):
        merged_list = copy.deepcopy(base)
        names = [item["name"] for item in base]
        for item in patch:
            if item["name"] in names:
                index = names.index(item["name"])
                merged_list[index] = merge(base[index], item)
            else:
                merged_list.append(copy.deepcopy(item))
        return merged_list
    return copy.deepcopy(patch)


def _named_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(i, dict) and "name" in i for i in value)


def set_namespace(obj: Object, namespace: str) -> Object:
    """kustomize's namespace transformer: the namespace of namespaced objects, and that of
    RoleBinding subjects that are ServiceAccounts without one."""
    if obj["kind"] in CLUSTER_SCOPED_KINDS:
        return obj
    obj = copy.deepcopy(obj)
    obj["metadata"]["namespace"] = namespace
    if obj["kind"] == "RoleBinding":
        for subject in obj.get("subjects", []):
            if subject["kind"] == "ServiceAccount":
                subject.setdefault("namespace", namespace)
    return obj


def set_image(obj: Object, image: dict[str, str]) -> Object:
    """kustomize's image transformer: containers whose image is `name` (any tag) get
    `newName` and `newTag`."""
    if obj["kind"] != "Deployment":
        return obj
    obj = copy.deepcopy(obj)
    for container in obj["spec"]["template"]["spec"]["containers"]:
        name, _, tag = container["image"].partition(":")
        if name == image["name"]:
            tag = image.get("newTag", tag)
            container["image"] = image.get("newName", name) + (f":{tag}" if tag else "")
    return obj
