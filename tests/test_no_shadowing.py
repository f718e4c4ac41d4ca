"""No folder of the repository is a top-level module: neither in this test process nor in a
benchmark run as the README says (`python -m bench.NAME` from the root). Were one, it would
shadow the installed package of that name (transformers imports Hugging Face's `kernels`)."""

from __future__ import annotations

import os
import subprocess
import sys

from loraserve.bench.import_check import ROOT, shadowing, top_level_names


def test_the_repository_names_our_folders() -> None:
    assert {"kernels", "server", "models", "bench"} <= set(top_level_names())


def test_no_top_level_folder_imports_in_the_test_process() -> None:
    # `tests` is pytest's own: importlib mode registers each test module as tests.FOLDER.NAME.
    assert shadowing(name for name in top_level_names() if name != "tests") == {}


def test_no_top_level_folder_but_bench_imports_in_a_benchmark() -> None:
    # As a user runs it: the current folder first on the path (no PYTHONSAFEPATH).
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    result = subprocess.run(
        [sys.executable, "-m", "bench.import_check"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 of the repository's top-level names import from it" in result.stdout
