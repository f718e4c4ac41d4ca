"""vLLM's command-line habits, typed as a vLLM user types them: `serve MODEL` (a folder, or a
Hugging Face repo id found in the local Hugging Face cache), several `--served-model-name`
aliases, `--api-key`, `--uvicorn-log-level`, `--disable-log-requests`; `--quantization`
refused with a line that says what is served; the path as given is a name of the base model."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import openai
import pytest
from server_harness import ADAPTERS, Assets, Running, start_process

from loraserve.server import cli


def stop(process: subprocess.Popen[str]) -> str:
    process.terminate()
    return process.communicate(timeout=60)[0]


def test_vllm_serve_command_line_with_aliases_and_one_api_key(assets: Assets) -> None:
    """`serve MODEL --served-model-name a b --api-key KEY ...`: both names are listed and
    served (responses say the first, as vLLM's do); the key is needed, and is enough to
    load adapters (vLLM's one key may do everything)."""
    process, url = start_process(
        assets,
        *("--served-model-name", "tiny", "tiny-alias"),
        *("--api-key", "sk-only", "--uvicorn-log-level", "warning"),
        *("--disable-log-requests", "--disable-log-stats", "--log-level", "info"),
        model=(str(assets.model),),
    )
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-only", max_retries=0)
        ids = [model.id for model in client.models.list().data]
        assert ids[:2] == ["tiny", "tiny-alias"] and set(ids[2:]) == set(ADAPTERS)
        for name in ("tiny", "tiny-alias"):
            answer = client.completions.create(model=name, prompt="hi", max_tokens=2)
            assert answer.model == "tiny" and answer.usage.prompt_tokens > 0
        with pytest.raises(openai.NotFoundError):  # named otherwise, the path is no name
            client.completions.create(model=str(assets.model), prompt="hi", max_tokens=2)
        stranger = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-other", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()
        assert httpx.get(f"{url}/v1/models").status_code == 401
        body = {"lora_name": "again", "lora_path": str(assets.adapter_dir / "attn8")}
        headers = {"Authorization": "Bearer sk-only"}
        loaded = httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=headers)
        assert loaded.status_code == 200, loaded.text
    finally:
        log = stop(process)
    assert "serving tiny, tiny-alias on http" in log  # loraserve's info lines are there
    assert "POST /v1/completions" not in log  # uvicorn's access lines (info) are not


def test_the_model_path_as_given_names_the_base_model(running: Running) -> None:
    """vLLM's default name is `--model` as given: a client sending it gets the base model,
    listed under the folder's name (loraserve's default: a path would show tenants the disk)."""
    folder = running.engine.config.model.model
    client = running.server.client()
    ids = [model.id for model in client.models.list().data]
    assert ids[0] == Path(folder).name and folder not in ids
    answer = client.completions.create(model=folder, prompt="hi", max_tokens=2, temperature=0)
    assert answer.model == Path(folder).name
    alone = client.completions.create(
        model=Path(folder).name, prompt="hi", max_tokens=2, temperature=0
    )
    assert alone.choices[0].text == answer.choices[0].text  # greedy: the same model


def fake_hub_cache(root: Path, repo_id: str, model: Path) -> Path:
    """A Hugging Face hub cache holding `model` as `repo_id`'s snapshot, in the layout
    huggingface_hub writes (blobs linked from snapshots/<commit>/, refs/main)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for index, file in enumerate(sorted(model.iterdir())):
        blob = repo / "blobs" / f"blob{index}"
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


def test_a_repo_id_is_served_from_the_local_hugging_face_cache(
    assets: Assets, tmp_path: Path
) -> None:
    """`loraserve serve acme/tiny-llama` with no network: found in $HF_HUB_CACHE, named by the
    id (as vLLM names it)."""
    cache = fake_hub_cache(tmp_path / "hub", "acme/tiny-llama", assets.model)
    environment = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    process, url = start_process(
        assets, "--log-level", "warning", model=("acme/tiny-llama",), env=environment
    )
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert client.models.list().data[0].id == "acme/tiny-llama"
        answer = client.chat.completions.create(
            model="acme/tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert answer.model == "acme/tiny-llama" and answer.usage.completion_tokens > 0
    finally:
        stop(process)


def test_a_repo_id_that_cannot_be_had_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no folder acme/nothing-here here
    assert cli.main(["serve", "acme/nothing-here"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("loraserve: error: 'acme/nothing-here' is not a local folder")
    assert str(tmp_path / "empty-hub") in line and "HF_HUB_OFFLINE" in line


@pytest.mark.parametrize("method", ["awq", "gptq", "fp8", "bitsandbytes"])
def test_quantization_is_refused_saying_what_is_served(
    method: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", str(tmp_path), "--quantization", method])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert f"--quantization {method}: quantized models are not supported" in error
    assert "float16" in error and "unrecognized arguments" not in error


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve"], "MODEL (or --model MODEL)"),
        (["serve", "/a", "--model", "/b"], "two models given"),
        (["serve", "/a", "--served-model-name", ""], "served_model_name must not be empty"),
        (["serve", "/a", "--uvicorn-log-level", "loud"], "uvicorn_log_level must be one of"),
    ],
)
def test_model_and_name_mistakes_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_the_api_key_file_and_the_one_key_together(tmp_path: Path) -> None:
    """--api-key adds one admin key to the --api-keys file's; the same key twice is refused."""
    from loraserve.server.auth import Tenants

    keys = tmp_path / "keys.yaml"
    keys.write_text("sk-alpha: {tenant: alpha, adapters: [attn8]}\n")
    tenants = Tenants.from_options(str(keys), "sk-root")
    assert tenants is not None
    assert tenants.authenticate("Bearer sk-root").admin
    assert tenants.authenticate("Bearer sk-root").may_use("mlp4")
    assert not tenants.authenticate("Bearer sk-alpha").admin
    with pytest.raises(ValueError, match="give it once"):
        Tenants.from_options(str(keys), "sk-alpha")
    assert Tenants.from_options(None, None) is None
