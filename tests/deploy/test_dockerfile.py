"""The two images, `Dockerfile` (CUDA) and `Dockerfile.cpu`: hadolint passes; each installs
with the same script as `make setup` (the README's install) from its own lock file; each runs
loraserve as a non-root user with the model mounted, not baked in; the final stages carry what
runs there compiles (Triton's launcher on CUDA, the native CPU kernels), and nothing else.
The images themselves cannot be built here (no daemon, no registry): deploy/README.md."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
from typing import Any

import pytest
from deploy_files import REPO, tool

from loraserve.server.cli import build_parser

INSTALL_SCRIPT = "deploy/install.sh"
# Dockerfile -> the lock file its builder installs
IMAGES = {"Dockerfile": "requirements/cuda.txt", "Dockerfile.cpu": "requirements/cpu.txt"}
LOCK_FILES = (*IMAGES.values(), "requirements/tools.in")
# What only a build needs, never the final stage of either image.
BUILD_ONLY = ("python3-venv", "python3-pip", "build-essential", "git", "curl", "wget")


def dockerfile(name: str = "Dockerfile") -> str:
    return (REPO / name).read_text()


def pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    words = [line.strip().partition(" ") for line in joined.splitlines()]
    return [(word.upper(), rest.strip()) for word, _, rest in words if word]


def stages(name: str = "Dockerfile") -> list[list[tuple[str, str]]]:
    """The instructions of each build stage (ARGs before the first FROM are left out)."""
    result: list[list[tuple[str, str]]] = []
    for instruction in instructions(dockerfile(name)):
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def apt_installs(stage: list[tuple[str, str]]) -> set[str]:
    """The packages a stage's RUNs give to `apt-get install`."""
    packages: set[str] = set()
    for name, args in stage:
        for command in args.split("&&") if name == "RUN" else ():
            words = command.split()
            if words[:2] == ["apt-get", "install"]:
                packages |= {word for word in words[2:] if not word.startswith("-")}
    return packages


@pytest.mark.parametrize("image", IMAGES)
def test_hadolint_passes(image: str) -> None:
    command = [tool("hadolint"), "--no-color", "--failure-threshold", "style", image]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_hadolint_would_catch_a_mistake(tmp_path) -> None:
    """The check above can fail: an unpinned base and a root user are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install gcc\n")
    command = [tool("hadolint"), "--no-color", "--failure-threshold", "style", str(bad)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3015" in result.stdout


@pytest.mark.parametrize("image", IMAGES)
def test_image_and_make_setup_install_with_the_same_script(image: str) -> None:
    builder, _ = stages(image)
    runs = [args for name, args in builder if name == "RUN"]
    assert f'sh {INSTALL_SCRIPT} /opt/venv ".${{EXTRAS}}"' in runs
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^\$\(VENV\)/\.installed:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert recipe is not None
    assert recipe.group(1).splitlines()[0] == f"\tsh {INSTALL_SCRIPT} $(VENV) -e '.[test,demo]'"
    # Nothing installs Python packages around the script, in either place.
    for text in (dockerfile(image), recipe.group(1)):
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
    license_files = set(pyproject()["project"]["license-files"])
    assert allowed == packages | {"pyproject.toml", "README.md", INSTALL_SCRIPT, *LOCK_FILES} | (
        license_files
    )


@pytest.mark.parametrize(
    ("image", "torch"), [("Dockerfile", "2.13.0"), ("Dockerfile.cpu", "2.13.0+cpu")]
)
def test_image_installs_its_lock_file(image: str, torch: str) -> None:
    builder, _ = stages(image)
    environment = " ".join(args for name, args in builder if name == "ENV")
    assert f"LORASERVE_LOCK={IMAGES[image]}" in environment
    assert (REPO / IMAGES[image]).read_text().count(f"\ntorch=={torch}\n") == 1


def test_cpu_image_gets_torch_from_pytorchs_cpu_index_for_the_locked_python() -> None:
    """PyPI's Linux torch is the CUDA build: the CPU image must look in PyTorch's CPU index,
    and run the Python that `make lock` resolved requirements/cpu.txt for."""
    builder, _ = stages("Dockerfile.cpu")
    environment = " ".join(args for name, args in builder if name == "ENV")
    assert "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu" in environment
    (base,) = re.findall(
        r"^ARG PYTHON_IMAGE=python:(\d+\.\d+)-slim-\w+$", dockerfile("Dockerfile.cpu"), re.M
    )
    locked = re.search(
        r"--python-version (\S+)\s*\\?\s*\n?.*-o requirements/cpu.txt",
        (REPO / "Makefile").read_text(),
    )
    assert locked is not None and locked.group(1) == base


def test_cuda_image_can_compile_tritons_launcher() -> None:
    """Triton (in requirements/cuda.txt) builds a C launcher at first use with gcc and the
    headers of the Python running it: the final stage installs both beside that Python, in
    the same apt transaction, so python3-dev is the python3 of the image."""
    assert re.search(r"^triton==", (REPO / "requirements/cuda.txt").read_text(), re.M)
    _, final = stages("Dockerfile")
    assert {"python3", "python3-dev", "gcc", "libc6-dev"} <= apt_installs(final)
    (run,) = [args for name, args in final if name == "RUN" and "python3-dev" in args]
    assert "--no-install-recommends" in run


def test_cpu_image_leaves_triton_out_and_the_cuda_image_gets_it_from_torch() -> None:
    """Triton is a gigabyte that a CPU never runs: neither the base requirements nor the demo
    extra name it, torch's CPU build (this machine's) does not require it, and the CUDA lock
    has it through torch."""
    project = pyproject()["project"]
    image_requirements = project["dependencies"] + project["optional-dependencies"]["demo"]
    assert not [r for r in image_requirements if r.lower().startswith("triton")]
    assert "triton" in project["optional-dependencies"]["test"], "the interpreter tests"
    torch_requires = importlib.metadata.requires("torch") or []
    if importlib.metadata.version("torch").endswith("+cpu"):
        assert not [r for r in torch_requires if r.lower().startswith("triton")]
    cuda_lock = (REPO / "requirements/cuda.txt").read_text()
    assert re.search(r"^triton==.*\n(?:\s+#.*\n)*?\s+#\s+(?:via )?torch$", cuda_lock, re.M)


def test_cpu_image_can_compile_the_native_kernels() -> None:
    """kernels/native_build.py compiles with gcc -fopenmp (omp.h comes with gcc's own
    libgcc-dev); every other header the C sources include is the C library's (libc6-dev,
    which --no-install-recommends would leave out). The python image has its own headers."""
    _, final = stages("Dockerfile.cpu")
    assert {"gcc", "libc6-dev"} == apt_installs(final)
    libc = {"math.h", "stdint.h", "stdlib.h", "string.h", "stddef.h", "stdbool.h", "float.h"}
    kernels = REPO / "kernels"
    sources = [*kernels.glob("native_*.c"), *kernels.glob("native_*.h")]
    assert sources
    included = {h for path in sources for h in re.findall(r"#include <(\S+)>", path.read_text())}
    assert included <= libc, f"headers beyond libc6-dev: {included - libc}"


@pytest.mark.parametrize("image", IMAGES)
def test_final_stage_is_small_and_runs_as_a_non_root_user(image: str) -> None:
    builder, final = stages(image)
    assert builder[0][1].split()[0] == final[0][1].split()[0], "one base, one Python path"
    final_text = " ".join(args for _, args in final)
    for build_only in BUILD_ONLY:
        assert build_only not in apt_installs(final)
    if image == "Dockerfile.cpu":
        assert "cuda" not in final_text.lower() and "nvidia" not in final_text.lower()
    assert "rm -rf /var/lib/apt/lists/*" in final_text
    copies = [args for name, args in final if name == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"], "only the venv reaches the image"
    (user,) = [args for name, args in final if name == "USER"]
    assert int(user.split(":")[0]) > 0
    assert not [args for name, args in final if name == "VOLUME"], "mounts are the runner's"


@pytest.mark.parametrize("image", IMAGES)
def test_serves_mounted_folders_on_port_8000_with_a_health_check(image: str) -> None:
    _, final = stages(image)
    by_name = dict(final)
    assert json.loads(by_name["ENTRYPOINT"]) == ["loraserve", "serve"]
    options = vars(build_parser().parse_args(["serve", *json.loads(by_name["CMD"])]))
    assert (options["host"], options["port"]) == ("0.0.0.0", 8000)
    assert (options["model"], options["adapter_dir"]) == ("/model", "/adapters")
    if image == "Dockerfile.cpu":
        assert options["device"] == "cpu"
    assert by_name["EXPOSE"] == "8000"
    assert "http://127.0.0.1:8000/health" in by_name["HEALTHCHECK"]
