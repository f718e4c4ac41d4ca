"""`loraserve serve` / `loraserve demo`: options come from the config dataclasses with
their docstrings as help; unknown, abbreviated or invalid options are refused; the
installed command serves a model folder and an --adapter-dir."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from server_harness import ADAPTERS, Assets, wait_for

from loraserve.server import cli
from loraserve.server.config import ServerConfig

CONFIGS = (*cli.ENGINE_CONFIGS, ServerConfig)


def help_text(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_every_config_field_is_an_option_with_its_docstring(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = help_text(command, capsys)
    for config in CONFIGS:
        docs = cli.field_docs(config)
        for field in dataclasses.fields(config):
            if command == "demo" and field.name == "model":
                assert "--model " not in text
                continue
            flag = field.metadata.get("flag", "--" + field.name.replace("_", "-"))
            assert flag in text, flag
            assert docs[field.name] in text, field.name


@pytest.mark.parametrize(
    "options",
    [
        ["--no-such-option", "1"],
        ["--max-lora", "8"],  # an abbreviation of --max-lora-rank
        ["--block-size", "7"],  # refused by CacheConfig
        ["--max-lora-rank", "eight"],
        ["--adapter", "no-equals-sign"],
        ["--port", "0"],
    ],
)
def test_bad_options_are_refused(
    options: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--model", str(tmp_path), *options])
    assert exited.value.code == 2
    assert "error" in capsys.readouterr().err


def test_serve_needs_a_model(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve"])
    assert exited.value.code == 2
    assert "--model" in capsys.readouterr().err


def test_adapter_dir_registers_every_peft_folder_by_name(assets: Assets, tmp_path: Path) -> None:
    (assets.adapter_dir / "not-an-adapter").mkdir(exist_ok=True)
    config = ServerConfig(
        adapter_dir=str(assets.adapter_dir), adapters=(f"other={assets.spare_dir / 'extra'}",)
    )
    found = cli.adapters_of(config)
    assert found == {"other": assets.spare_dir / "extra", **assets.adapters}
    twice = ServerConfig(adapter_dir=str(assets.adapter_dir), adapters=(f"attn8={tmp_path}",))
    with pytest.raises(ValueError, match="twice"):
        cli.adapters_of(twice)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_installed_command_serves_a_folder_and_its_adapters(assets: Assets) -> None:
    port = free_port()
    command = [sys.executable, "-m", "loraserve.server.cli", "serve"]
    options = ["--model", str(assets.model), "--adapter-dir", str(assets.adapter_dir)]
    options += ["--port", str(port), "--device", "cpu", "--pool-pages", "64"]
    options += ["--served-model-name", "tiny", "--log-level", "warning"]
    process = subprocess.Popen(
        [*command, *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _healthy(url) or process.poll() is not None, timeout_s=90)
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert {m.id for m in client.models.list().data} == {"tiny", *ADAPTERS}
        answer = client.completions.create(model="mlp4", prompt="hello", max_tokens=3)
        assert answer.usage is not None and answer.usage.completion_tokens == 3
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "open" in output  # it said it runs without API keys


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_demo_serves_the_demo_assets_on_the_cpu(
    assets: Assets, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`demo` = `serve` over what ensure_demo returns (built elsewhere, slowly), and a
    sample exchange with the base model and every adapter once it serves."""
    from loraserve.demo import assets as demo_assets
    from loraserve.demo import sample

    monkeypatch.setattr(demo_assets, "ensure_demo", lambda **_: (assets.model, assets.adapters))
    samples = []
    monkeypatch.setattr(sample, "start_sample", lambda *args: samples.append(args[:3]))
    served = {}
    monkeypatch.setattr(cli, "serve", lambda *args: served.setdefault("args", args))
    assert cli.main(["demo", "--port", "8123"]) == 0
    engine_config, server_config, adapters = served["args"]
    assert engine_config.model.model == str(assets.model)
    assert engine_config.model.device == "cpu"
    assert engine_config.model.served_model_name == demo_assets.BASE_MODEL_NAME
    assert server_config.port == 8123 and server_config.host == "127.0.0.1"
    assert adapters == assets.adapters
    assert samples == [("127.0.0.1", 8123, [demo_assets.BASE_MODEL_NAME, *assets.adapters])]


def test_demo_prints_no_sample_with_api_keys(
    assets: Assets, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from loraserve.demo import assets as demo_assets
    from loraserve.demo import sample

    monkeypatch.setattr(demo_assets, "ensure_demo", lambda **_: (assets.model, assets.adapters))
    monkeypatch.setattr(sample, "start_sample", _fail_if_called)
    monkeypatch.setattr(cli, "serve", lambda *args: None)
    keys = tmp_path / "keys.yaml"
    keys.write_text("sk-test:\n  tenant: a\n  adapters: '*'\n")
    assert cli.main(["demo", "--api-keys", str(keys)]) == 0


def _fail_if_called(*args: object) -> None:
    raise AssertionError("called")
