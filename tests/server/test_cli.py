"""`loraserve serve` / `loraserve demo`: options come from the config dataclasses with
their docstrings as help; unknown, abbreviated or invalid options are refused; the
installed command serves a model folder and an --adapter-dir."""

from __future__ import annotations

import dataclasses
import shutil
import signal
import socket
from pathlib import Path

import openai
import pytest
import torch
from server_harness import ADAPTERS, Assets, free_port, start_process

from loraserve.engine.client.adapter_names import AdapterNames, adapters_read_at_start
from loraserve.server import cli
from loraserve.server.config import ServerConfig

CONFIGS = (*cli.ENGINE_CONFIGS, *cli.SERVER_CONFIGS)


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


def test_adapters_read_at_start_are_the_named_and_the_pinned(
    assets: Assets, tmp_path: Path
) -> None:
    """--adapter-dir's folders are only listed (the server reads them on first use), except
    those pinned; a name given twice, or a pin of nothing, is refused."""
    (assets.adapter_dir / "not-an-adapter").mkdir(exist_ok=True)
    config = ServerConfig(
        adapter_dir=str(assets.adapter_dir),
        adapters=(f"other={assets.spare_dir / 'extra'}",),
        pin_adapters=("attn8", "other"),
    )
    found = read_at_start(config)
    assert found == {
        "other": (str(assets.spare_dir / "extra"), True),
        "attn8": (str(assets.adapter_dir / "attn8"), True),
    }
    twice = ServerConfig(adapter_dir=str(assets.adapter_dir), adapters=(f"attn8={tmp_path}",))
    with pytest.raises(ValueError, match="twice"):
        read_at_start(twice)
    with pytest.raises(ValueError, match="--pin-adapter nope: no such adapter"):
        read_at_start(ServerConfig(adapter_dir=str(assets.adapter_dir), pin_adapters=("nope",)))


def read_at_start(config: ServerConfig) -> dict[str, tuple[str, bool]]:
    listed = AdapterNames(config.adapter_dir).listed()
    return adapters_read_at_start(cli.adapters_of(config), config.pin_adapters, listed)


def test_the_installed_command_serves_a_folder_and_its_adapters(assets: Assets) -> None:
    process, url = start_process(assets, "--served-model-name", "tiny", "--log-level", "warning")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert {m.id for m in client.models.list().data} == {"tiny", *ADAPTERS}
        answer = client.completions.create(
            model="mlp4", prompt="hello", max_tokens=3, extra_body={"ignore_eos": True}
        )
        assert answer.usage is not None and answer.usage.completion_tokens == 3
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "open" in output  # it said it runs without API keys


def descendant_commands(pid: int) -> list[str]:
    """The command lines of a process's descendants (Linux /proc)."""
    commands = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        commands.append(Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        commands += descendant_commands(int(child))
    return commands


@pytest.mark.parametrize("ranks", ["1", "2"])
def test_serve_ignores_modules_in_the_folder_it_is_started_from(
    assets: Assets, tmp_path: Path, ranks: str
) -> None:
    """A `struct.py` and folders named like ours or like installed packages, where the user
    runs `loraserve serve`, are never imported: not by the front end, not by the engine core
    (which `spawn` starts as `python -c`, the current folder first on its path), not by a
    tensor-parallel worker (`-tp 2`: `python -P -m ...`)."""
    junk = "raise SystemExit('imported from the current folder')\n"
    (tmp_path / "struct.py").write_text(junk)
    for name in ("kernels", "server", "engine", "memory", "models", "scheduler", "loraserve"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(junk)
    process, url = start_process(assets, "--log-level", "warning", "-tp", ranks, cwd=tmp_path)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        answer = client.completions.create(
            model="mlp4", prompt="hello", max_tokens=3, extra_body={"ignore_eos": True}
        )
        assert answer.usage is not None and answer.usage.completion_tokens == 3
        # A constraint is checked in a spawned process of its own: the same holds there.
        choice = {"guided_choice": ["yes", "no"]}
        constrained = client.completions.create(
            model="mlp4", prompt="hello", max_tokens=3, extra_body=choice
        )
        assert constrained.choices[0].text in ("yes", "no")
        workers = [c for c in descendant_commands(process.pid) if "tp_worker" in c]
        assert len(workers) == int(ranks) - 1, workers
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "imported from the current folder" not in output


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

    def serve(*args: object) -> int:
        served["args"] = args
        return 0

    monkeypatch.setattr(cli, "serve", serve)
    assert cli.main(["demo", "--port", "8123", "--max-n", "4"]) == 0
    engine_config, server_config, adapters, limits = served["args"]
    assert limits.max_n == 4
    assert engine_config.model.model == str(assets.model)
    assert engine_config.model.device == "cpu"
    assert engine_config.model.served_model_name == (demo_assets.BASE_MODEL_NAME,)
    assert server_config.port == 8123 and server_config.host == "127.0.0.1"
    assert adapters == assets.adapters
    assert samples == [("127.0.0.1", 8123, [demo_assets.BASE_MODEL_NAME, *assets.adapters])]


def run_and_fail(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """`loraserve` refuses to start: status 1 and one `loraserve: error:` line, no traceback."""
    assert cli.main([*argv, "--log-level", "error", "--port", str(free_port())]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loraserve: error: "), lines
    return lines[0]


def test_a_truncated_model_file_is_one_error_line(
    assets: Assets, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(assets.model, tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = run_and_fail(["serve", "--model", str(tmp_path / "model"), "--device", "cpu"], capsys)
    assert "model.safetensors" in line and "truncated" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA devices")
def test_cuda_without_a_cuda_device_is_one_error_line(
    assets: Assets, capsys: pytest.CaptureFixture[str]
) -> None:
    line = run_and_fail(["serve", "--model", str(assets.model), "--device", "cuda"], capsys)
    assert "no CUDA device" in line and "--device cpu" in line


@pytest.mark.parametrize("what", ["missing", "file", "empty"])
def test_a_bad_model_folder_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str
) -> None:
    folder = tmp_path / "model"
    if what == "file":
        folder.write_text("not a folder")
    elif what == "empty":
        folder.mkdir()
    line = run_and_fail(["serve", "--model", str(folder), "--device", "cpu"], capsys)
    assert str(folder) in line


def test_a_port_in_use_is_one_error_line_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["serve", "--model", str(tmp_path / "no-model"), "--log-level", "error"]
        assert cli.main([*argv, "--port", str(port)]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("loraserve: error: ") and f"127.0.0.1:{port}" in line
    assert "\n" not in line and "no-model" not in line  # the port was checked first


def test_an_adapter_named_like_the_base_model_is_one_error_line(
    assets: Assets, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["serve", "--model", str(assets.model), "--device", "cpu", "--pool-pages", "32"]
    argv += ["--adapter-dir", str(assets.adapter_dir), "--served-model-name", "attn8"]
    assert "base model" in run_and_fail(argv, capsys)


def test_an_empty_metrics_key_file_is_one_error_line(
    assets: Assets, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "key").write_text("\n")
    argv = ["serve", "--model", str(assets.model), "--device", "cpu", "--pool-pages", "32"]
    line = run_and_fail([*argv, "--metrics-key-file", str(tmp_path / "key")], capsys)
    assert "one token" in line


def test_demo_prints_no_sample_with_api_keys(
    assets: Assets, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from loraserve.demo import assets as demo_assets
    from loraserve.demo import sample

    monkeypatch.setattr(demo_assets, "ensure_demo", lambda **_: (assets.model, assets.adapters))
    monkeypatch.setattr(sample, "start_sample", _fail_if_called)
    monkeypatch.setattr(cli, "serve", lambda *args: 0)
    keys = tmp_path / "keys.yaml"
    keys.write_text("sk-test:\n  tenant: a\n  adapters: '*'\n")
    assert cli.main(["demo", "--api-keys", str(keys)]) == 0


def _fail_if_called(*args: object) -> None:
    raise AssertionError("called")


@pytest.mark.parametrize(
    ("options", "enabled"),
    [
        ([], None),  # the config's default: on
        (["--no-prefix-caching"], False),
        (["--prefix-caching"], True),
        (["--no-enable-prefix-caching"], False),  # vLLM's spelling
        (["--enable-prefix-caching"], True),
    ],
)
def test_prefix_caching_is_on_unless_turned_off(options: list[str], enabled: bool | None) -> None:
    args = vars(cli.build_parser().parse_args(["serve", "--model", "m", *options]))
    assert args.get("enable_prefix_caching") is enabled
    config = cli.build_config(
        "m", **{k: v for k, v in args.items() if k == "enable_prefix_caching"}
    )
    assert config.cache.enable_prefix_caching is (enabled is not False)
