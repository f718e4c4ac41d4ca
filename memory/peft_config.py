"""Reading and checking a PEFT adapter folder's `adapter_config.json` (memory/peft_format.py
reads the rest), and the error every refusal of a folder raises."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loraserve.errors import AdapterError
from loraserve.memory.adapter_dir import CONFIG_FILE

SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"

# Config fields that change what an adapter computes in ways loraserve does not
# implement; each is refused when set (truthy).
UNSUPPORTED_FEATURES: dict[str, str] = {
    "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
    "lora_bias": "a bias on lora_B (lora_bias) is not supported",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
    "layer_replication": "layer_replication is not supported",
    "fan_in_fan_out": "fan_in_fan_out (transposed, Conv1D-style weights) is not supported",
    "trainable_token_indices": "trainable_token_indices (embedding edits) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_qalora": "QALoRA (use_qalora) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "kasa_config": "KaSA (kasa_config) is not supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
}


def refuse(folder: Path, reason: str) -> AdapterError:
    """The error for a refused folder: names the folder, then the reason."""
    return AdapterError(f"adapter folder '{folder}': {reason}")


def read_config(folder: Path) -> dict[str, Any]:
    """adapter_config.json as a dict, once the folder holds a LoRA config and safetensors weights."""
    config_path = folder / CONFIG_FILE
    try:  # one open for a folder that reads (thousands of adapters are read at run time)
        text = config_path.read_text()
    except OSError:
        if not folder.exists():
            raise refuse(folder, "no such folder") from None
        if not folder.is_dir():
            raise refuse(folder, "not a folder") from None
        if not config_path.is_file():
            raise refuse(folder, f"{CONFIG_FILE} is missing") from None
        raise  # unreadable (permissions, I/O): the loader says so
    try:
        config = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise refuse(folder, f"{CONFIG_FILE} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise refuse(folder, f"{CONFIG_FILE} is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise refuse(folder, f"peft_type is {config.get('peft_type')!r}; only LORA is supported")
    if not (folder / SAFETENSORS_FILE).is_file():
        if (folder / PICKLE_FILE).is_file():
            # Never unpickle: a pickle runs arbitrary code on load.
            raise refuse(
                folder,
                f"only {PICKLE_FILE} found; convert it to {SAFETENSORS_FILE} "
                "(load it with PEFT where you trust it and save_pretrained again)",
            )
        raise refuse(folder, f"{SAFETENSORS_FILE} is missing")
    return config


def check_features(config: dict[str, Any], folder: Path) -> None:
    """Refuse configs that use a feature loraserve does not compute."""
    for field, reason in UNSUPPORTED_FEATURES.items():
        if config.get(field):
            raise refuse(folder, f"{reason} ({field} = {config[field]!r})")
    bias = config.get("bias", "none")
    if bias != "none":
        raise refuse(folder, f"bias {bias!r} is not supported (only 'none')")
