"""Test set-up shared by every test.

TRITON_INTERPRET must be set before any `@triton.jit` function is defined, so it
is set here, at import, whenever no CUDA device is present: the Triton kernels
then run on the CPU through Triton's interpreter.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TESTS = Path(__file__).parent
# importlib mode (pyproject.toml) puts no test folder on sys.path; the folders whose modules
# tests import by name go on it here: helpers/ (`import factories` from any test) and each
# package's folder (its fakes and harnesses). tests/ itself never does: its folders are named
# like the repository's (kernels/, server/, ...) and would shadow installed packages.
sys.path[:0] = [
    str(folder)
    for folder in sorted(TESTS.iterdir())
    if folder.is_dir() and folder.name.isidentifier() and not folder.name.startswith("_")
]


# The files of tests/demo that start the real demo (demo_harness.py's session fixtures).
REAL_DEMO = {"test_demo.py", "test_demo_agents.py"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `make test` (pytest-xdist, --dist loadgroup): each file's tests run on one worker,
    so a module's fixtures are built once, and the real demo's files share one (it converts
    the model and starts the server once per worker). CUDA-only tests are skipped on a CPU."""
    for item in items:
        path = item.path.relative_to(TESTS)
        group = "real-demo" if path.name in REAL_DEMO else path.as_posix()
        item.add_marker(pytest.mark.xdist_group(group))
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
