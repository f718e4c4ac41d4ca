"""Compile the native (C) kernels on first use, cache the library, load it with ctypes.

The sources ship with the package (`native_*.c`, `native_*.h`). The first process
that needs them compiles them with the system C compiler (`$CC`, else `cc`, else
`gcc`) into `$XDG_CACHE_HOME/loraserve/native/` (default `~/.cache/...`), under a
name keyed by a hash of the sources, the flags, the compiler's version and the
machine (architecture and CPU flags: `-march=native` code must not be loaded on
another CPU sharing a home directory). It compiles to a temporary file and renames
it into place, so processes building at once each get a whole library.

Flags: `-O3 -march=native -fopenmp -fno-math-errno`. The library links the
`libgomp.so.1` that torch has already loaded (same soname), so its parallel
regions run on torch's OpenMP thread pool and follow `torch.set_num_threads`.
Where the compiler has no OpenMP or no `-march=native` (Apple clang) the build is
retried without them: the kernels then run on one thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from loraserve.kernels.constants import NO_ADAPTER

SOURCES = ("native_lora.c", "native_attention.c", "native_pack.c")
HEADERS = ("native_common.h", "native_tiles.h")
COMMON_FLAGS = ("-O3", "-fno-math-errno", "-shared", "-fPIC", f"-DNO_ADAPTER={NO_ADAPTER}")
FLAG_SETS = (  # tried in order
    ("-march=native", "-fopenmp", *COMMON_FLAGS),
    COMMON_FLAGS,
)
COMPILE_TIMEOUT_S = 300


class NativeKernelsUnavailable(RuntimeError):
    """The native kernels cannot be built here (no C compiler, or it failed)."""


_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_error: NativeKernelsUnavailable | None = None


def load() -> ctypes.CDLL:
    """The library, built on the first call of this process if no cached build fits.

    Raises NativeKernelsUnavailable, with the compiler's message, when it cannot be built."""
    global _library, _error
    with _lock:
        if _library is None and _error is None:
            try:
                _library = ctypes.CDLL(str(build()))
            except NativeKernelsUnavailable as error:
                _error = error
        if _error is not None:
            raise _error
        assert _library is not None
        return _library


def cache_dir() -> Path:
    """Where built libraries are kept."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "loraserve" / "native"


def _compiler() -> str:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise NativeKernelsUnavailable(
            "the native kernels need a C compiler (cc or gcc, or $CC) and none was found: "
            "install gcc, or use kernel_backend=torch"
        )
    return compiler


def _machine() -> str:
    """The architecture and CPU features the build is specific to."""
    features = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                features = line
                break
    except OSError:
        features = platform.processor()
    return f"{platform.system()} {platform.machine()} {features}"


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise NativeKernelsUnavailable(f"{command[0]} could not run: {error}") from error


def build() -> Path:
    """Path of a library built from the current sources for this machine and compiler."""
    compiler = _compiler()
    version = _run([compiler, "--version"]).stdout
    folder = Path(__file__).parent
    sources = [folder / name for name in SOURCES]
    code = b"".join((folder / name).read_bytes() for name in (*SOURCES, *HEADERS))
    errors = []
    for flags in FLAG_SETS:
        key = code + repr((flags, compiler, version, _machine())).encode()
        target = cache_dir() / f"libloraserve_native-{hashlib.sha256(key).hexdigest()[:20]}.so"
        if target.exists():
            return target
        error = _compile(compiler, flags, sources, target)
        if error is None:
            return target
        errors.append(f"{compiler} {' '.join(flags)}:\n{error}")
    raise NativeKernelsUnavailable(
        "the native kernels failed to compile; use kernel_backend=torch.\n" + "\n".join(errors)
    )


def _compile(
    compiler: str, flags: tuple[str, ...], sources: list[Path], target: Path
) -> str | None:
    """Compile into `target` atomically; the compiler's message on failure, else None."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=".so")
    except OSError as error:
        return f"cannot write to {target.parent}: {error}"
    os.close(handle)
    try:
        result = _run([compiler, *flags, *map(str, sources), "-o", temporary])
        if result.returncode != 0:
            return result.stderr.strip() or f"exit status {result.returncode}"
        os.chmod(temporary, 0o755)  # mkstemp made it private; a library is shared
        os.replace(temporary, target)  # atomic: another process sees no library or a whole one
        return None
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
