"""Which of the repository's top-level names a process would import from the repository.

The repository keeps loraserve's subpackages as top-level folders (`kernels/`, `server/`,
`models/`, ...; the install maps them to `loraserve.*`). Were the root on sys.path, each
would shadow an installed package of that name: transformers imports Hugging Face's
`kernels`. `python -m bench.import_check`, run from the root as every benchmark is, imports
transformers and prints every name that resolves into the repository; it exits 1 if any
does (`bench` itself excepted: it is what runs). tests/test_no_shadowing.py runs it, and
makes the same check inside the test process.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def top_level_names(root: Path = ROOT) -> list[str]:
    """The repository's folders that an import statement could name, but `loraserve`."""
    return sorted(
        folder.name
        for folder in root.iterdir()
        if folder.is_dir() and folder.name.isidentifier() and folder.name != "loraserve"
    )


def shadowing(names: Iterable[str], root: Path = ROOT) -> dict[str, str]:
    """{name: the place in the repository's folders it imports from}, for the names that
    would (a virtual environment inside the clone, `.venv/`, is no such folder)."""
    folders = [root / name for name in top_level_names(root)]
    found = {}
    for name in names:
        module = sys.modules.get(name)
        spec = module.__spec__ if module is not None else importlib.util.find_spec(name)
        if spec is None:
            continue
        places = [
            Path(place).resolve()
            for place in (spec.origin, *(spec.submodule_search_locations or []))
            if place
        ]
        inside = [place for place in places if any(place.is_relative_to(f) for f in folders)]
        if inside:
            found[name] = str(inside[0])
    return found


def main() -> None:
    import transformers  # noqa: F401 (the import that a shadowing `kernels/` broke)

    found = shadowing(name for name in top_level_names() if name != __package__)
    for name, place in found.items():
        print(f"{name}: imported from {place}")
    print(f"{len(found)} of the repository's top-level names import from it")
    raise SystemExit(1 if found else 0)


if __name__ == "__main__":
    main()
