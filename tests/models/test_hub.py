"""models/hub.py: what reads as a Hugging Face repo id, and where its snapshot is found."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraserve.models.hub import ModelNotFoundError, cached_snapshot, is_repo_id, resolve_model


@pytest.mark.parametrize(
    "model, expected",
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
        ("meta-llama/Llama-3.1-8B", True),
        ("org/name.v2", True),
        ("/abs/path", False),
        ("./org/name", False),
        ("org/name/sub", False),
        ("just-a-folder", False),
        ("org/", False),
        ("~/org", False),
    ],
)
def test_what_reads_as_a_repo_id(model: str, expected: bool) -> None:
    assert is_repo_id(model) is expected


def test_an_existing_folder_is_a_path_even_when_it_reads_as_an_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not is_repo_id("org/name")
    assert resolve_model("org/name") == "org/name"


def test_the_snapshot_main_points_at_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$HF_HUB_CACHE first, else $HF_HOME/hub; refs/main names the snapshot; a snapshot
    without config.json (an interrupted download) is not one."""
    repo = tmp_path / "home" / "hub" / "models--org--name"
    for commit in ("aaaa", "bbbb"):
        (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / "bbbb" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("bbbb\n")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cached_snapshot("org/name") == repo / "snapshots" / "bbbb"
    assert resolve_model("org/name") == str(repo / "snapshots" / "bbbb")
    assert cached_snapshot("org/name", "aaaa") is None  # no config.json
    (repo / "refs" / "main").write_text("aaaa")
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_model("org/name")
