"""deploy/k8s/generate_adapters.py: names adapters as the server does, writes valid object
names, and wrote the committed deploy/k8s/inference/adapters.yaml (for the demo's adapters)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from deploy_files import K8S

from loraserve.demo.recipes import RECIPES
from loraserve.memory.adapter_dir import CONFIG_FILE, list_adapter_folders


def load_generator() -> ModuleType:
    """The script as a module (deploy/ is not a package)."""
    spec = importlib.util.spec_from_file_location("generate_adapters", K8S / "generate_adapters.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generator = load_generator()


def adapter_folder(root: Path, names: list[str]) -> Path:
    """Folders that look like PEFT adapters to the server (their config file is enough)."""
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / CONFIG_FILE).write_text("{}")
    return root


def test_names_adapters_as_the_server_does(tmp_path: Path) -> None:
    root = adapter_folder(tmp_path / "adapters", ["sql", "Customer_42", "fr.v2"])
    (root / "notes").mkdir()  # no adapter config: not an adapter
    (root / "README").write_text("not a folder")
    served = list(list_adapter_folders(root))
    assert generator.adapter_names(root) == served == ["Customer_42", "fr.v2", "sql"]


@pytest.mark.parametrize(
    "adapter, name",
    [("sql", "sql"), ("Customer_42", "customer-42"), ("fr.v2", "fr.v2"), ("-a b-", "a-b")],
)
def test_object_names_are_rfc_1123(adapter: str, name: str) -> None:
    assert generator.object_name(adapter) == name


def test_rewrite_keeps_the_adapter_name_and_refuses_clashes() -> None:
    (rewrite,) = generator.model_rewrites(["Customer_42"], "pool")
    rule = rewrite["spec"]["rules"][0]
    assert rule["matches"][0]["model"]["value"] == "Customer_42"
    assert rule["targets"] == [{"modelRewrite": "Customer_42", "weight": 100}]
    assert rewrite["spec"]["poolRef"]["name"] == "pool"
    with pytest.raises(ValueError, match="both map to"):
        generator.model_rewrites(["a_b", "a-b"], "pool")
    with pytest.raises(ValueError, match="no valid"):
        generator.object_name("__")


def test_committed_file_is_the_generators_output_for_the_demo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = adapter_folder(tmp_path, list(RECIPES))
    assert generator.main([str(root)]) == 0
    assert capsys.readouterr().out == (K8S / "inference" / "adapters.yaml").read_text()


def test_refuses_a_folder_without_adapters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert generator.main([str(tmp_path)]) == 2
    assert "no adapter folder" in capsys.readouterr().err
