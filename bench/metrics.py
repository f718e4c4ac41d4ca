"""What a trace run measured, per request and summed up, and where it was measured.

Shared by bench/replay.py (any OpenAI-compatible server) and bench/peft_baseline.py,
so both systems are scored by one function. Times are seconds on one clock that
starts with the run, the clock the trace's arrival times are on. TTFT counts from
the request's *scheduled* arrival, as the S-LoRA paper does: time a request spent
waiting, in the client or the server, is part of its latency.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)
MAX_ERROR_MESSAGES = 5
"""Distinct error messages kept in a summary, most frequent first."""


@dataclass
class RequestRecord:
    """One request's times (seconds from the start of the run) and outcome."""

    index: int
    adapter: str | None
    arrival_s: float
    """Scheduled arrival, from the trace."""
    sent_s: float | None = None
    first_token_s: float | None = None
    finish_s: float | None = None
    """When the request ended, completed or failed."""
    output_tokens: int = 0
    error: str | None = None
    """None when the request completed; otherwise what went wrong."""

    @property
    def completed(self) -> bool:
        return self.error is None and self.first_token_s is not None and self.finish_s is not None


def summarize(records: list[RequestRecord], duration_s: float, slo_ttft_s: float = 6.0) -> dict:
    """Throughput, latency percentiles and SLO attainment of a run.

    `duration_s` is the caller's (first arrival to last finish). TTFT, TPOT and
    end-to-end latency are over completed requests; TPOT is (finish - first token) /
    (tokens - 1) of each request with more than one token. `slo_attainment` is the
    fraction of *all* requests whose TTFT from scheduled arrival is at most
    `slo_ttft_s`; failed requests count as misses. A statistic over no requests
    is None (null in JSON)."""
    done = [record for record in records if record.completed]
    ttft = [_ttft(record) for record in done]
    tpot = [_tpot(record) for record in done if record.output_tokens > 1]
    errors = [record.error for record in records if record.error is not None]
    tokens = sum(record.output_tokens for record in done)
    return {
        "requests": len(records),
        "completed": len(done),
        "errors": len(errors),
        "error_messages": dict(Counter(errors).most_common(MAX_ERROR_MESSAGES)),
        "duration_s": duration_s,
        "throughput_req_s": len(done) / duration_s if duration_s > 0 else 0.0,
        "output_tokens_per_s": tokens / duration_s if duration_s > 0 else 0.0,
        "ttft_s": describe(ttft),
        "tpot_s": describe(tpot),
        "e2e_s": describe([_finish(record) - record.arrival_s for record in done]),
        "slo_ttft_s": slo_ttft_s,
        "slo_attainment": sum(t <= slo_ttft_s for t in ttft) / len(records) if records else None,
    }


def describe(values: list[float]) -> dict[str, float | None]:
    """Mean and percentiles (linear interpolation between order statistics)."""
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(array.mean()),
        **{f"p{p}": float(np.percentile(array, p)) for p in PERCENTILES},
    }


def _ttft(record: RequestRecord) -> float:
    assert record.first_token_s is not None  # only called on completed records
    return record.first_token_s - record.arrival_s


def _tpot(record: RequestRecord) -> float:
    assert record.first_token_s is not None and record.finish_s is not None
    return (record.finish_s - record.first_token_s) / (record.output_tokens - 1)


def _finish(record: RequestRecord) -> float:
    assert record.finish_s is not None  # only called on completed records
    return record.finish_s


def run_metadata() -> dict[str, Any]:
    """Where and when a result was measured: date, machine, packages, git commit."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "gpus": _gpu_names(),
            "python": platform.python_version(),
        },
        "packages": {name: _version(name) for name in ("loraserve", "torch", "triton")},
        **_git_state(),
    }


def _cpu_name() -> str:
    """The CPU's model name (Linux), else what `platform` knows (often just `x86_64`)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def _gpu_names() -> list[str]:
    """NVIDIA GPUs as nvidia-smi names them (none without the tool): no torch import."""
    names = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], Path.cwd())
    return names.splitlines() if names else []


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_state() -> dict[str, Any]:
    """The commit of the working tree and whether it had changes (results are often
    measured before the commit that records them)."""
    root = Path(__file__).resolve().parent.parent
    commit = _run(["git", "rev-parse", "HEAD"], root)
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], root)
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def _run(command: list[str], cwd: Path) -> str | None:
    """A command's stripped output, or None when it is missing or fails."""
    try:
        result = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()
