"""The Dockerfile: hadolint passes; it installs with the same script as `make setup` (the
README's install); it runs loraserve as a non-root user with the model mounted, not baked in.
The image itself cannot be built here (no daemon, no registry): deploy/README.md."""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

import pytest
from deploy_files import REPO, tool

from loraserve.server.cli import build_parser

INSTALL_SCRIPT = "deploy/install.sh"
LOCK_FILES = ("requirements/cuda.txt", "requirements/tools.in")


def dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    words = [line.strip().partition(" ") for line in joined.splitlines()]
    return [(word.upper(), rest.strip()) for word, _, rest in words if word]


def stages() -> list[list[tuple[str, str]]]:
    """The instructions of each build stage (ARGs before the first FROM are left out)."""
    result: list[list[tuple[str, str]]] = []
    for instruction in instructions(dockerfile()):
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def test_hadolint_passes() -> None:
    command = [tool("hadolint"), "--no-color", "--failure-threshold", "style", "Dockerfile"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_image_and_make_setup_install_with_the_same_script() -> None:
    builder, _ = stages()
    runs = [args for name, args in builder if name == "RUN"]
    assert f'sh {INSTALL_SCRIPT} /opt/venv ".${{EXTRAS}}"' in runs
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^\$\(VENV\)/\.installed:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert recipe is not None
    assert recipe.group(1).splitlines()[0] == f"\tsh {INSTALL_SCRIPT} $(VENV) -e '.[test,demo]'"
    # Nothing installs Python packages around the script, in either place.
    for text in (dockerfile(), recipe.group(1)):
        assert "pip install" not in text
    readme = (REPO / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
    assert re.search(r"^test: setup", makefile, re.MULTILINE)
    assert re.search(r"^demo: setup", makefile, re.MULTILINE)


def test_install_gets_the_pinned_torch() -> None:
    assert "torch==2.13.0" in pyproject()["project"]["dependencies"]


def test_build_context_is_what_the_install_reads() -> None:
    setuptools = pyproject()["tool"]["setuptools"]
    allowed = {
        line.removeprefix("!")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    packages = set(setuptools["package-dir"].values())
    assert allowed == packages | {"pyproject.toml", "README.md", INSTALL_SCRIPT, *LOCK_FILES}


def test_image_installs_its_lock_file() -> None:
    builder, _ = stages()
    environment = " ".join(args for name, args in builder if name == "ENV")
    assert "LORASERVE_LOCK=requirements/cuda.txt" in environment
    assert (REPO / "requirements/cuda.txt").read_text().count("\ntorch==2.13.0\n") == 1


def test_final_stage_is_small_and_runs_as_a_non_root_user() -> None:
    builder, final = stages()
    assert builder[0][1].split()[0] == final[0][1].split()[0], "one base, one Python path"
    final_text = " ".join(args for _, args in final)
    for build_only in ("python3-venv", "python3-pip", "build-essential", "gcc", "git"):
        assert build_only not in final_text
    assert "rm -rf /var/lib/apt/lists/*" in final_text
    copies = [args for name, args in final if name == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"], "only the venv reaches the image"
    (user,) = [args for name, args in final if name == "USER"]
    assert int(user.split(":")[0]) > 0
    assert not [args for name, args in final if name == "VOLUME"], "mounts are the runner's"


def test_serves_mounted_folders_on_port_8000_with_a_health_check() -> None:
    _, final = stages()
    by_name = dict(final)
    assert json.loads(by_name["ENTRYPOINT"]) == ["loraserve", "serve"]
    options = vars(build_parser().parse_args(["serve", *json.loads(by_name["CMD"])]))
    assert (options["host"], options["port"]) == ("0.0.0.0", 8000)
    assert (options["model"], options["adapter_dir"]) == ("/model", "/adapters")
    assert by_name["EXPOSE"] == "8000"
    assert "http://127.0.0.1:8000/health" in by_name["HEALTHCHECK"]
