"""The device check: everything a bare H100/H200 should tell us, in one run of at most 8 minutes.

    python -P -m loraserve.bench.gpu_check --out DIR            # on the GPU machine
    python -P -m loraserve.bench.gpu_check --out DIR --dry-run  # tiny shapes on a CPU

Sections, in order (most wanted first), each written to `DIR/<n>-<name>.json` as soon as
it has anything (rewritten after every measurement, so a run cut short keeps what it had):

- environment: the card, driver, CUDA, torch and triton versions;
- ceilings: copy bandwidth (bench/bandwidth.py), a bf16 matmul's TFLOP/s, a decode-shaped
  matmul's weight-read GB/s;
- decode-llama-2-7b: the forward pass of one decode step (bench/decode_step.py), bf16,
  context 512, random weights, at batch 1/8/32/64: base, and with 32 distinct rank-16
  adapters on q,k,v,o and on all 7 modules, eager and as a CUDA-graph replay, each against
  its byte floor at the copy ceiling, and LoRA's overhead over base;
- profile: kernels per step and per layer, by kernel class (torch.profiler), at batch 32 of
  the same model, base and 7-module LoRA, eager and graph, with the profiler's table;
- gpu-tests: `pytest -m gpu` over tests/engine and tests/kernels (from the working
  directory: the repository's root), its summary and the tail of its output;
- decode-llama-3-8b: as for Llama-2-7B;
- s2-vs-peft: bench/compare.py's S2 preset on this card, loraserve then PEFT.

The files are the sections' and `summary.json`: 8 in all, as many as a device run brings
back from its $OUT (bench/README.md); nothing else is written there.

A section that fails records its exception and traceback, and the next one runs. A
section starts only while the time budget (`--budget-s`) has room for it; the decode
points stop when it runs out. `--dry-run` takes tiny shapes on the CPU (eager only: no
graphs there) and runs every section's code in well under a minute
(tests/bench/test_gpu_check.py runs it, so that it cannot rot).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .bandwidth import copy_bandwidth
from .decode_step import TARGETS, DecodeBench
from .kernel_profile import kernel_table
from .models import SHAPES


@dataclass(frozen=True)
class Plan:
    """The sizes of one run: the real ones, or the dry run's."""

    device: str
    dtype: torch.dtype
    kernel_backend: str
    shapes: dict[str, Any]
    batches: tuple[int, ...]
    context: int
    num_adapters: int
    rank: int
    steps: int
    copy_bytes: int
    matmul_size: int
    profile_batch: int
    test_paths: tuple[str, ...]
    test_timeout_s: int
    compare_args: tuple[str, ...]


FULL = Plan(
    device="cuda",
    dtype=torch.bfloat16,
    kernel_backend="triton",
    shapes={name: SHAPES[name] for name in ("llama-2-7b", "llama-3-8b")},
    batches=(1, 8, 32, 64),
    context=512,
    num_adapters=32,
    rank=16,
    steps=10,
    copy_bytes=2**30,
    matmul_size=8192,
    profile_batch=32,
    test_paths=("tests/engine", "tests/kernels"),
    test_timeout_s=200,
    compare_args=(
        "--preset", "7b-s2", "--num-adapters", "16", "--req-rate", "4", "--duration", "10",
        "--device", "cuda", "--dtype", "bfloat16",
    ),
)  # fmt: skip
DRY_RUN = Plan(
    device="cpu",
    dtype=torch.float32,
    kernel_backend="torch",
    shapes={  # MHA as Llama-2-7B, GQA as Llama-3-8B
        "tiny": replace(SHAPES["cpu"], num_layers=2),
        "tiny-gqa": replace(SHAPES["cpu"], num_layers=2, num_kv_heads=2),
    },
    batches=(1, 4),
    context=32,
    num_adapters=4,
    rank=8,
    steps=2,
    copy_bytes=2**24,
    matmul_size=128,
    profile_batch=4,
    test_paths=("tests/engine/test_gpu.py",),
    test_timeout_s=120,
    compare_args=(
        "--preset", "cpu-s2", "--num-adapters", "2", "--req-rate", "4", "--duration", "1",
        "--input-range", "4,16", "--output-range", "2,4", "--device", "cpu",
        "--dtype", "float32", "--peft-max-batch", "4",
    ),
)  # fmt: skip


class Section:
    """One section's result file, rewritten (flushed) whenever something is added."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.result: dict[str, Any] = {"status": "running"}

    def record(self, key: str, value: Any) -> None:
        self.result[key] = value
        self.write()

    def write(self) -> None:
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self.result, indent=2, default=str) + "\n")
        partial.replace(self.path)


class Budget:
    """The run's deadline."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def run_sections(plan: Plan, out: Path, budget: Budget) -> dict[str, str]:
    """Every section in order; returns each one's status."""
    first, *others = plan.shapes
    benches: dict[str, DecodeBench] = {}  # the first shape's, kept for the profile
    sections: list[tuple[str, Callable[[Section], None], float]] = [
        ("environment", lambda s: environment(s), 0),
        ("ceilings", lambda s: ceilings(s, plan), 10),
        (f"decode-{first}", lambda s: decode(s, plan, first, budget, benches), 60),
        ("profile", lambda s: profile(s, plan, benches.pop(first, None)), 30),
        ("gpu-tests", lambda s: gpu_tests(s, plan, budget), 30),
    ]
    for name in others:
        sections.append((f"decode-{name}", _decode_section(plan, name, budget), 60))
    sections.append(("s2-vs-peft", lambda s: s2_vs_peft(s, plan, budget), 60))
    statuses = {}
    for index, (name, run, needs_s) in enumerate(sections, 1):
        section = Section(out / f"{index:02d}-{name}.json")
        statuses[name] = _run_section(section, run, budget, needs_s)
        print(f"gpu_check: {name}: {statuses[name]}", flush=True)
    return statuses


def _decode_section(plan: Plan, shape: str, budget: Budget) -> Callable[[Section], None]:
    return lambda section: decode(section, plan, shape, budget, {})


def _run_section(
    section: Section, run: Callable[[Section], None], budget: Budget, needs_s: float
) -> str:
    if budget.left() < needs_s:
        section.result["status"] = f"skipped: {budget.left():.0f} s left of the budget"
        section.write()
        return section.result["status"]
    started = time.monotonic()
    try:
        run(section)
        section.result["status"] = "ok"
    except Exception as error:
        section.result["status"] = "failed"
        section.result["error"] = f"{type(error).__name__}: {error}"
        section.result["traceback"] = traceback.format_exc()
    section.result["seconds"] = round(time.monotonic() - started, 2)
    section.write()
    _release_memory()
    return str(section.result["status"])


def _release_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def environment(section: Section) -> None:
    from .metrics import run_metadata

    section.record("run", run_metadata())
    section.record("torch_cuda", torch.version.cuda)
    section.record("python", platform.python_version())
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        section.record(
            "device",
            {
                "name": properties.name,
                "capability": f"{properties.major}.{properties.minor}",
                "memory_gib": round(properties.total_memory / 2**30, 1),
                "multiprocessors": properties.multi_processor_count,
            },
        )
        section.record("nvidia_smi", _command(["nvidia-smi"], 20))


def ceilings(section: Section, plan: Plan) -> None:
    device = torch.device(plan.device)
    section.record("copy_gb_s", copy_bandwidth(device, plan.copy_bytes) / 1e9)
    n = plan.matmul_size
    a = torch.randn(n, n, device=device).to(plan.dtype)
    b = torch.randn(n, n, device=device).to(plan.dtype)
    seconds = _seconds(lambda: a @ b, device)
    section.record("matmul_tflop_s", 2 * n**3 / seconds / 1e12)
    arch = next(iter(plan.shapes.values()))
    x = torch.randn(max(plan.batches), arch.hidden_size, device=device).to(plan.dtype)
    weight = torch.randn(arch.intermediate_size, arch.hidden_size, device=device).to(plan.dtype)
    seconds = _seconds(lambda: x @ weight.T, device)
    section.record(
        "decode_matmul_weight_gb_s", weight.numel() * weight.element_size() / seconds / 1e9
    )


def decode(
    section: Section, plan: Plan, shape: str, budget: Budget, keep: dict[str, DecodeBench]
) -> None:
    """Step times of every (batch, adapters) point, eager and graph, as they come; the
    bench stays in `keep` (for the profile) when the section ends."""
    started = time.monotonic()
    bench = DecodeBench.build(
        plan.shapes[shape], plan.device, plan.dtype, plan.kernel_backend, max(plan.batches),
        plan.context, plan.num_adapters, plan.rank,
    )  # fmt: skip
    keep[shape] = bench
    section.record("build_s", round(time.monotonic() - started, 1))
    copy_bytes_per_s = copy_bandwidth(torch.device(plan.device), plan.copy_bytes)
    section.record("copy_gb_s", copy_bytes_per_s / 1e9)
    on_cuda = plan.device == "cuda"
    if on_cuda:
        started = time.monotonic()
        bench.capture(list(plan.batches))
        section.record("capture_s", round(time.monotonic() - started, 1))
    points: list[dict] = []
    for batch in plan.batches:
        for targets in TARGETS:
            if budget.left() < 30:
                section.record("stopped", f"budget: {budget.left():.0f} s left")
                return
            points.append(_decode_point(bench, plan, batch, targets, copy_bytes_per_s, on_cuda))
            section.record("points", points)
    _record_overheads(section, points)


def _decode_point(
    bench: DecodeBench, plan: Plan, batch: int, targets: str, copy_rate: float, graphs: bool
) -> dict:
    chunks = bench.chunks(batch, targets)
    floor_ms = 1e3 * bench.step_bytes(chunks) / copy_rate
    point: dict[str, Any] = {"batch": batch, "adapters": targets, "floor_ms": floor_ms}
    point["eager_ms"] = bench.eager_ms(chunks, plan.steps)
    point["build_ms"] = bench.build_ms(chunks, plan.steps)
    if graphs:
        point["graph_ms"] = bench.graph_ms(chunks, plan.steps)
    best = min(point.get("graph_ms", point["eager_ms"]), point["eager_ms"])
    point["fraction_of_ceiling"] = floor_ms / best
    return point


def _record_overheads(section: Section, points: list[dict]) -> None:
    """Each LoRA point's step time over the base step's of the same batch (best mode)."""
    best = {
        (p["batch"], p["adapters"]): min(p.get("graph_ms", p["eager_ms"]), p["eager_ms"])
        for p in points
    }
    section.record(
        "lora_overhead",
        {
            f"{targets}@{batch}": best[batch, targets] / best[batch, "base"] - 1
            for batch, targets in best
            if targets != "base" and (batch, "base") in best
        },
    )


def profile(section: Section, plan: Plan, bench: DecodeBench | None) -> None:
    """Launches per step and per layer, by kernel class, at the profile batch, on the
    decode section's bench (its graphs included)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    if bench is None:
        raise RuntimeError("the first decode section built no bench to profile")
    on_cuda = plan.device == "cuda"
    activity = ProfilerActivity.CUDA if on_cuda else ProfilerActivity.CPU
    steps = 3
    for targets in ("base", "all7"):
        chunks = bench.chunks(plan.profile_batch, targets)
        for graph in (False, True) if bench.graphs is not None else (False,):
            step = bench.forward_of(chunks, graph)
            step()
            with torch_profile(activities=[activity]) as profiler:
                for _ in range(steps):
                    step()
                if on_cuda:
                    torch.cuda.synchronize()
            label = f"{targets}-{'graph' if graph else 'eager'}"
            counts = kernel_table(profiler, on_cuda, steps, bench.arch.num_layers)
            sort = "cuda_time_total" if on_cuda else "cpu_time_total"
            table = profiler.key_averages().table(sort_by=sort, row_limit=30)
            section.record(label, {**counts, "table": table.splitlines()})


def gpu_tests(section: Section, plan: Plan, budget: Budget) -> None:
    """`pytest -m gpu` over the test paths, from the working directory (the repository)."""
    paths = [path for path in plan.test_paths if Path(path).exists()]
    if not paths:
        section.record("skipped", f"none of {plan.test_paths} under {Path.cwd()}")
        return
    command = [sys.executable, "-P", "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    timeout = int(min(plan.test_timeout_s, budget.left() - 5))
    result = _command([*command, *paths], timeout)
    section.record("command", " ".join([*command, *paths]))
    section.record("result", result)
    if result.get("returncode") not in (0, 5):  # 5: every test deselected
        raise RuntimeError(f"pytest exited {result.get('returncode')}: {result.get('summary')}")


def s2_vs_peft(section: Section, plan: Plan, budget: Budget) -> None:
    """bench/compare.py on this card: the S2 trace through loraserve, then through PEFT (its
    model folder in a temporary folder, not in the results)."""
    scratch = Path(tempfile.gettempdir()) / "loraserve-gpu-check"
    output = scratch / "s2-vs-peft.json"
    command = [
        sys.executable, "-P", "-m", "loraserve.bench.compare", *plan.compare_args,
        "--cache-dir", str(scratch / "bench-cache"), "--output", str(output),
    ]  # fmt: skip
    section.record("command", " ".join(command))
    result = _command(command, int(budget.left() - 5))
    section.record("result", result)
    if output.is_file():
        points = json.loads(output.read_text()).get("points", [])
        section.record("points", points)
    if result.get("returncode") != 0:
        raise RuntimeError(f"compare exited {result.get('returncode')}")


def _command(command: list[str], timeout: int) -> dict:
    """Run a command in its own process group (a server it starts is ended with it at the
    timeout); its exit code, the last lines of its output and pytest's summary line."""
    try:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
    except OSError as error:
        return {"returncode": None, "error": str(error)}
    try:
        output, _ = process.communicate(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return {"returncode": None, "timeout_s": timeout, "tail": output[-6000:]}
    lines = output.strip().splitlines()
    summary = next((line for line in reversed(lines) if _is_summary(line)), "")
    return {"returncode": process.returncode, "summary": summary, "tail": "\n".join(lines[-60:])}


def _is_summary(line: str) -> bool:
    """pytest's last line: `3 passed, 1 skipped in 4.2s`."""
    words = ("passed", "failed", "skipped", "error", "deselected")
    return " in " in line and any(word in line for word in words)


def _seconds(call: Callable[[], object], device: torch.device, repeats: int = 10) -> float:
    """Seconds per call, after a warm-up call."""
    call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where each section's JSON goes")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--budget-s", type=float, default=450, help="stop starting work after")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    plan = DRY_RUN if args.dry_run else FULL
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --dry-run on a CPU)")
    started = time.monotonic()
    statuses = run_sections(plan, args.out, Budget(args.budget_s))
    summary = {"statuses": statuses, "seconds": round(time.monotonic() - started, 1)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"gpu_check: done in {summary['seconds']} s, results in {args.out}", flush=True)


if __name__ == "__main__":
    main()
