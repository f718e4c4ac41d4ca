"""Each folder imports only what it may (docs/architecture.md: arrows point down only).

    server -> engine -> {scheduler, memory, models} -> kernels

Read from the source (every `import`, module-level or inside a function), so that a
forbidden import fails here rather than in a review. The front-end process must not
load torch: that is checked by importing the server in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("server", "engine", "scheduler", "memory", "models", "kernels", "demo", "loraserve")
THIRD_PARTY_HEAVY = ("torch", "triton", "transformers", "peft")

# folder -> the loraserve subpackages it may import (itself always may)
ALLOWED: dict[str, set[str]] = {
    "kernels": set(),
    "scheduler": set(),
    "models": {"kernels", "errors"},
    "memory": {"kernels", "models", "errors"},
    "engine": {"scheduler", "memory", "models", "kernels", "errors"},
    "server": {"engine", "models", "scheduler", "errors", "demo"},
    "demo": {"loraserve", "engine", "models", "errors"},
    "loraserve": {"engine", "errors"},
}
# folder -> heavy third-party packages it must not import at all
FORBIDDEN_THIRD_PARTY: dict[str, tuple[str, ...]] = {
    "scheduler": THIRD_PARTY_HEAVY,
    "server": THIRD_PARTY_HEAVY,
}
PURE_PYTHON_MODULES = (
    "memory/pool.py",
    "memory/residency.py",
    "memory/allocator.py",
    "memory/geometry.py",
)
"""Pool bookkeeping: the scheduler's accounting, tested with fakes, no torch."""


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(module name, line) of every import in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
    return found


def python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py")) if (ROOT / folder).is_dir() else []


def subpackage(module: str) -> str | None:
    """`loraserve.engine.core.core` -> `engine`; `loraserve.errors` -> `errors`; else None."""
    parts = module.split(".")
    if parts[0] != "loraserve":
        return None
    return parts[1] if len(parts) > 1 else "loraserve"


@pytest.mark.parametrize("folder", FOLDERS)
def test_a_folder_imports_only_what_it_may(folder: str) -> None:
    wrong = []
    for path in python_files(folder):
        for module, line in imports_of(path):
            target = subpackage(module)
            if target is not None and target != folder and target not in ALLOWED[folder]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
            if module.split(".")[0] in FORBIDDEN_THIRD_PARTY.get(folder, ()):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("relative", PURE_PYTHON_MODULES)
def test_the_pool_bookkeeping_is_pure_python(relative: str) -> None:
    heavy = [
        f"{relative}:{line} imports {module}"
        for module, line in imports_of(ROOT / relative)
        if module.split(".")[0] in THIRD_PARTY_HEAVY
        or subpackage(module) not in (None, "memory", "errors", "kernels", "models")
        or module in ("loraserve.memory.adapter_store", "loraserve.memory.peft_format")
    ]
    assert not heavy, "\n".join(heavy)


def test_the_front_end_process_loads_no_torch() -> None:
    """What the server process imports to serve (the app, the CLI, the engine's handle)."""
    code = (
        "import sys\n"
        "import loraserve.server.app, loraserve.server.cli, loraserve.engine.client.async_engine\n"
        "import loraserve.memory.pool, loraserve.scheduler\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {THIRD_PARTY_HEAVY!r}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]", result.stdout


# engine/'s rooms (engine/*/__init__.py say what each holds): room -> rooms it must not import.
# The client runs in the front end's process: no runner, no sampling (so no torch there);
# the runner and sampling never reach back up into the client, sampling never into the runner.
ROOM_FORBIDDEN: dict[str, set[str]] = {
    "client": {"runner", "sampling"},
    "core": {"client"},
    "runner": {"client"},
    "sampling": {"client", "runner"},
}
CLIENT_MODELS = {"loraserve.models.tokenizer", "loraserve.models.chat_template"}
"""What the client may import of models/: the tokenizer (and its chat template), never compute."""


def engine_room(module: str) -> str | None:
    """`loraserve.engine.runner.device_pool` -> `runner`; else None."""
    parts = module.split(".")
    return parts[2] if parts[:2] == ["loraserve", "engine"] and len(parts) > 2 else None


def test_engine_has_exactly_the_rooms_the_rules_name() -> None:
    rooms = {p.name for p in (ROOT / "engine").iterdir() if (p / "__init__.py").is_file()}
    assert rooms == set(ROOM_FORBIDDEN)
    assert [p.name for p in (ROOT / "engine").glob("*.py")] == ["__init__.py"]


@pytest.mark.parametrize("room", ROOM_FORBIDDEN)
def test_an_engine_room_imports_only_what_it_may(room: str) -> None:
    wrong = []
    for path in python_files(f"engine/{room}"):
        for module, line in imports_of(path):
            target = engine_room(module)
            models_compute = module.startswith("loraserve.models") and module not in CLIENT_MODELS
            forbidden = target in ROOM_FORBIDDEN[room] or (
                room == "client" and (module.startswith("loraserve.kernels") or models_compute)
            )
            if forbidden:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not wrong, "\n".join(wrong)
