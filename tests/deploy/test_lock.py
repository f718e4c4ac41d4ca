"""The lock files pin everything pyproject.toml asks for, so that an install from a clone
(`make setup`, the image) takes no version that nobody chose; `make lock` refreshes them."""

from __future__ import annotations

import re
import tomllib

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


def test_make_setup_installs_the_cpu_lock() -> None:
    script = (REPO / "deploy/install.sh").read_text()
    assert "lock=${LORASERVE_LOCK-requirements/cpu.txt}" in script
    assert pins("requirements/cpu.txt")["torch"] == "2.13.0+cpu"
