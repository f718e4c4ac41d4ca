"""What reading one adapter into host RAM costs, per read and per MB, against a plain copy.

    python -m bench.adapter_read
    python -m bench.adapter_read --reads 200 --threads 1 --json out.json

A read is what the engine's loader thread does for an adapter on disk
(memory/adapter_store.AdapterReader.read): its PEFT folder parsed and checked, its
matrices converted into the pool's layout (scaling folded into B) in page-sized slabs,
and the identity that names its KV: the file's version, once the file has settled (the
bench waits for adapters it has just built, as a server's have long settled; a file
changed in the last `SETTLED_SECONDS` would be named by SHA-256 of its pages). The
folder's files are in the page cache after the warm-up read, so what is timed is CPU
work, not the disk; and the reader's layout cache
holds the folder's layout, as it holds that of the sweep's 2000 adapters trained alike after
the first: what is timed is a read through the cached layout (memory/adapter_layout.py).
Two adapters of the bench's CPU model (bench/models.py), float32 pool: the sweep's (rank 8
on q/k/v/o, the S1 point of `bench.adapter_tiers sweep`) and the cold one of
`bench.adapter_tiers cold` (rank 64 on every module).

Each adapter is read twice over: its copies done by torch's ops, and in C (the
`native_copies` of a CPU engine running the native kernels; skipped where they cannot be
built). Reported per adapter and way: the median microseconds per read, the safetensors file's size,
µs per MB of it, and the same for one copy of that many bytes in RAM (`torch`'s copy
of a buffer already allocated, the floor a read could reach): the ratio says how many
copies a read costs; and the Python function calls one read makes (cProfile's count, after
the timed reads: the reader's per-tensor and per-module overhead, independent of the machine).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time
from pathlib import Path

import torch

from loraserve.kernels import native
from loraserve.memory.adapter_store import SETTLED_SECONDS, AdapterReader
from loraserve.memory.geometry import PoolGeometry
from loraserve.memory.peft_format import SAFETENSORS_FILE
from loraserve.models.arch import LORA_MODULES
from loraserve.models.hf_config import load_arch

from .assets import default_cache_dir, ensure_assets
from .metrics import run_metadata
from .models import SHAPES, build_adapter

BLOCK_SIZE = 16
MAX_LORA_RANK = 64


def _adapters(cache_dir: Path) -> tuple[Path, dict[str, Path]]:
    """The bench model, and the two adapters read (built on first use)."""
    model, sweep = ensure_assets("cpu", (8,), 1, cache_dir, "float32")
    cold = cache_dir / "cpu-float32" / "adapters-cold" / "cold-0000"  # bench.adapter_tiers'
    if not (cold / "adapter_config.json").is_file():
        build_adapter(cold, SHAPES["cpu"], 64, LORA_MODULES, seed=1000)
    adapters = {"rank 8, q/k/v/o": next(iter(sweep.values())), "rank 64, all modules": cold}
    last_change = max((folder / SAFETENSORS_FILE).stat().st_ctime for folder in adapters.values())
    time.sleep(max(0.0, last_change + SETTLED_SECONDS + 0.1 - time.time()))  # settled
    return model, adapters


def _median_seconds(work, repeats: int) -> float:  # type: ignore[no-untyped-def]
    work()  # warm-up: the files in the page cache, the allocator warm
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure(reader: AdapterReader, folder: Path, repeats: int) -> dict[str, float]:
    megabytes = (folder / SAFETENSORS_FILE).stat().st_size / 1e6
    read = _median_seconds(lambda: reader.read("bench", folder), repeats)
    source = torch.empty(int(megabytes * 1e6), dtype=torch.uint8).random_(0, 255)
    target = torch.empty_like(source)
    copy = _median_seconds(lambda: target.copy_(source), repeats)
    return {
        "python_calls_per_read": _calls(lambda: reader.read("bench", folder)),
        "file_mb": round(megabytes, 3),
        "read_us": round(read * 1e6, 1),
        "read_us_per_mb": round(read * 1e6 / megabytes, 1),
        "copy_us_per_mb": round(copy * 1e6 / megabytes, 1),
        "reads_per_copy": round(read / copy, 1),
    }


def _calls(work) -> int:  # type: ignore[no-untyped-def]
    profile = cProfile.Profile()
    profile.runcall(work)
    return int(pstats.Stats(profile).total_calls)  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reads", type=int, default=100, help="timed reads per adapter")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--json", type=Path, help="write the rows and the machine here too")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, adapters = _adapters(args.cache_dir)
    arch = load_arch(model)
    geometry = PoolGeometry.for_model(arch, BLOCK_SIZE, MAX_LORA_RANK)
    rows = []
    for native_copies in (False, True) if native.available() else (False,):
        reader = AdapterReader(
            arch, geometry, MAX_LORA_RANK, torch.float32, native_copies=native_copies
        )
        for label, folder in adapters.items():
            row: dict[str, object] = {
                "adapter": label,
                "copies": "native" if native_copies else "torch",
                "threads": torch.get_num_threads(),
            }
            rows.append(row | measure(reader, folder, args.reads))
            print(json.dumps(rows[-1]), flush=True)
    if args.json is not None:
        results = {"run": run_metadata(), "reads": args.reads, "rows": rows}
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
