"""A base model named by its Hugging Face repo id (`--model org/name`, as vLLM takes it).

The id is looked up in the local Hugging Face cache first, in the layout huggingface_hub
writes (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`):

    models--org--name/refs/main            the commit `main` points at
    models--org--name/snapshots/<commit>/  config.json, *.safetensors, tokenizer.json, ...

so a model that `huggingface-cli download` (or vLLM, or transformers) fetched before is
served with no network and without huggingface_hub installed. A model not in the cache is
downloaded into it with huggingface_hub, when that is installed and `HF_HUB_OFFLINE` is not
set; otherwise the error says what to do. Only the files loraserve reads are fetched
(safetensors weights, JSON configs and tokenizer, chat templates), not `*.bin` or `*.pt`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from loraserve.errors import LoraserveError

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]")
"""`org/name`: one slash, Hugging Face's characters, not starting with `.` (a relative path)."""
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]
"""What loraserve reads of a model repository (tokenizer.model and merges.txt included)."""


class ModelNotFoundError(LoraserveError):
    """`--model` is neither a local folder nor a repo id that can be had."""


def is_repo_id(model: str) -> bool:
    """Whether `model` reads as a repo id rather than a path (an existing path is a path)."""
    return REPO_ID.fullmatch(model) is not None and not Path(model).exists()


def hub_cache() -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub finds it."""
    if "HF_HUB_CACHE" in os.environ:
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if "HF_HOME" in os.environ:
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache_home = os.environ.get("XDG_CACHE_HOME", "~/.cache")
    return Path(cache_home).expanduser() / "huggingface" / "hub"


def cached_snapshot(repo_id: str, revision: str = "main") -> Path | None:
    """The cached snapshot folder of `repo_id` at `revision` (a branch or a commit), or None."""
    repo = hub_cache() / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / revision
    try:
        commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
    except OSError:
        return None
    snapshot = repo / "snapshots" / commit
    return snapshot if (snapshot / "config.json").is_file() else None


def resolve_model(model: str) -> str:
    """The local folder of `model`: `model` itself unless it is a repo id, whose cached
    snapshot (downloaded first if need be) it is then. ModelNotFoundError if it cannot be had."""
    if not is_repo_id(model):
        return model
    snapshot = cached_snapshot(model)
    if snapshot is None:
        snapshot = _download(model)
    return str(snapshot)


def _download(repo_id: str) -> Path:
    where = f"{repo_id!r} is not a local folder, nor in the Hugging Face cache at {hub_cache()}"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ModelNotFoundError(f"{where}, and HF_HUB_OFFLINE forbids downloading it")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelNotFoundError(
            f"{where}; install huggingface_hub to download it, or download it elsewhere "
            f"(`huggingface-cli download {repo_id}`) and give its folder"
        ) from None
    try:
        folder = snapshot_download(
            repo_id, allow_patterns=DOWNLOAD_PATTERNS, cache_dir=str(hub_cache())
        )
    except Exception as error:  # no network, a gated or missing repository, a full disk
        raise ModelNotFoundError(
            f"{where}, and downloading it failed: {type(error).__name__}: {error}"
        ) from None
    return Path(folder)
