"""Write one InferenceModelRewrite per adapter folder, for the llm-d router's endpoint picker.

    python deploy/k8s/generate_adapters.py ADAPTER_DIR [--pool loraserve] \
        > deploy/k8s/inference/adapters.yaml

An adapter is a folder of ADAPTER_DIR that holds `adapter_config.json`, named by the folder:
the rule of `loraserve serve --adapter-dir`, so the names are the `model` values requests
carry. Each object sends its adapter's name to that adapter (weight 100); to move an
adapter's traffic to a new version, add a target to its rule (`sql` 90, `sql-v2` 10).

Routing by adapter affinity needs none of these objects (the endpoint picker reads `model`
from the request); they are where traffic splits between adapter versions are written.
Needs only PyYAML.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

PEFT_CONFIG_FILE = "adapter_config.json"
REWRITE_API_VERSION = "llm-d.ai/v1alpha2"
"""The llm-d router's InferenceModelRewrite (it moved there from the Inference Extension)."""
POOL_GROUP = "inference.networking.k8s.io"
MAX_OBJECT_NAME_LENGTH = 253
"""Object names are RFC 1123 subdomains: at most 253 characters of [a-z0-9.-]."""
HEADER = """\
# One InferenceModelRewrite per adapter, written by deploy/k8s/generate_adapters.py from the
# adapter folders. Write it again when adapters change; edit a rule's targets to split an
# adapter's traffic between versions.
"""


def adapter_names(adapter_dir: Path) -> list[str]:
    """The adapters under `adapter_dir`, in the order the server registers them."""
    if not adapter_dir.is_dir():
        raise ValueError(f"{adapter_dir} is not a folder")
    return [
        folder.name
        for folder in sorted(adapter_dir.iterdir())
        if (folder / PEFT_CONFIG_FILE).is_file()
    ]


def object_name(adapter: str) -> str:
    """A valid object name for `adapter`: lower case, other characters replaced by '-'."""
    name = re.sub(r"[^a-z0-9.-]+", "-", adapter.lower()).strip("-.")[:MAX_OBJECT_NAME_LENGTH]
    if not name:
        raise ValueError(f"adapter name {adapter!r} leaves no valid Kubernetes object name")
    return name.rstrip("-.")


def model_rewrite(adapter: str, pool: str) -> dict[str, Any]:
    """The InferenceModelRewrite that routes model `adapter` to the adapter itself."""
    return {
        "apiVersion": REWRITE_API_VERSION,
        "kind": "InferenceModelRewrite",
        "metadata": {"name": object_name(adapter)},
        "spec": {
            "poolRef": {"group": POOL_GROUP, "kind": "InferencePool", "name": pool},
            "rules": [
                {
                    "matches": [{"model": {"type": "Exact", "value": adapter}}],
                    "targets": [{"modelRewrite": adapter, "weight": 100}],
                }
            ],
        },
    }


def model_rewrites(adapters: Sequence[str], pool: str) -> list[dict[str, Any]]:
    """One rewrite per adapter; two adapters whose object names coincide are an error."""
    objects = [model_rewrite(adapter, pool) for adapter in adapters]
    seen: dict[str, str] = {}
    for adapter, obj in zip(adapters, objects, strict=True):
        name = obj["metadata"]["name"]
        if name in seen:
            raise ValueError(f"adapters {seen[name]!r} and {adapter!r} both map to object {name!r}")
        seen[name] = adapter
    return objects


def render(objects: Sequence[dict[str, Any]]) -> str:
    """The objects as one multi-document YAML file, fields in the order written."""
    return HEADER + "---\n" + yaml.safe_dump_all(objects, sort_keys=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter_dir", type=Path, help="the folder given to --adapter-dir")
    parser.add_argument("--pool", default="loraserve", help="the InferencePool's name")
    args = parser.parse_args(argv)
    try:
        adapters = adapter_names(args.adapter_dir)
        if not adapters:
            raise ValueError(f"no adapter folder ({PEFT_CONFIG_FILE}) under {args.adapter_dir}")
        sys.stdout.write(render(model_rewrites(adapters, args.pool)))
    except ValueError as error:
        print(f"generate_adapters: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
