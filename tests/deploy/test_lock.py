"""The lock files pin everything pyproject.toml asks for, so that an install from a clone
(`make setup`, the image) takes no version that nobody chose; `make lock` refreshes them."""

from __future__ import annotations

import re
import shutil
import tomllib
import warnings
from pathlib import Path

import pytest
from deploy_files import REPO

# lock file -> the extras it serves (the image installs the base package and `demo`)
LOCKS = {"requirements/cpu.txt": ("test", "demo", "bench"), "requirements/cuda.txt": ("demo",)}


def pins(lock: str) -> dict[str, str]:
    """{normalized name: version} of a lock file's requirement lines."""
    lines = (REPO / lock).read_text().splitlines()
    pairs = (line.split("==") for line in lines if re.match(r"^[A-Za-z0-9]", line))
    return {normalized(name): version.strip() for name, version in pairs}


def normalized(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9._-]+", requirement.strip())
    assert name is not None, requirement
    return re.sub(r"[-_.]+", "-", name.group(0)).lower()


@pytest.mark.parametrize("lock", LOCKS)
def test_the_lock_pins_every_requirement_of_pyproject(lock: str) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in LOCKS[lock]:
        wanted += project["optional-dependencies"][extra]
    wanted += (REPO / "requirements/tools.in").read_text().split("\n")
    names = {normalized(r) for r in wanted if r.strip() and not r.startswith("#")} - {"loraserve"}
    locked = pins(lock)
    assert names - set(locked) == set(), f"not in {lock}: run `make lock`"
    assert locked["torch"].startswith("2.13.0")


def test_the_cuda_lock_brings_nccl_for_tensor_parallelism() -> None:
    """`--tensor-parallel-size` runs its ranks over NCCL, which the CUDA image has only as
    torch's Linux wheel's nvidia-nccl dependency, built for the CUDA of the image's base:
    with none, or one for another CUDA, the image's ranks cannot start."""
    base = re.search(
        r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.", (REPO / "Dockerfile").read_text(), re.M
    )
    assert base is not None
    locked = pins("requirements/cuda.txt")
    nccl = [name for name in locked if name.startswith("nvidia-nccl-")]
    assert nccl == [f"nvidia-nccl-cu{base.group(1)}"]


def test_make_setup_installs_the_cpu_lock() -> None:
    script = (REPO / "deploy/install.sh").read_text()
    assert "lock=${LORASERVE_LOCK-requirements/cpu.txt}" in script
    assert pins("requirements/cpu.txt")["torch"] == "2.13.0+cpu"


def _setuptools_warnings(pyproject: Path) -> list[str]:
    """What setuptools warns while reading a pyproject.toml's metadata (as every install does)."""
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_configuration(Distribution(), pyproject)
    return [f"{w.category.__name__}: {str(w.message).splitlines()[0]}" for w in caught]


def test_the_metadata_reads_without_setuptools_warnings(tmp_path: Path) -> None:
    """`make setup` printed setuptools' license deprecation box on every install: the license
    is an SPDX expression with its file, and the old table form is what warned."""
    assert _setuptools_warnings(REPO / "pyproject.toml") == []
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert all((REPO / name).is_file() for name in project["license-files"])
    for name in ("README.md", *project["license-files"]):
        shutil.copy(REPO / name, tmp_path / name)
    old = (REPO / "pyproject.toml").read_text()
    old = old.replace('license = "Apache-2.0"', 'license = { text = "Apache-2.0" }')
    old = re.sub(r"^license-files = .*\n", "", old, flags=re.MULTILINE)
    (tmp_path / "pyproject.toml").write_text(old)
    assert any(
        "license" in warning for warning in _setuptools_warnings(tmp_path / "pyproject.toml")
    )
