"""`bench.adapter_tiers sweep --repeats`: each point's median run and the per-repeat ratios,
on made-up throughputs (the servers' runs are the benchmark's business, not a test's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loraserve.bench import adapter_tiers

THROUGHPUT = {  # (count, pinned) -> the throughput of repeats 0, 1, 2
    (5, False): [80.0, 70.0, 90.0],
    (2000, False): [72.0, 56.0, 63.0],
    (5, True): [76.0, 77.0, 81.0],
    (2000, True): [60.0, 61.0, 62.0],
}


def test_repeats_report_medians_and_ratios_of_the_same_repeat(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: dict[tuple[int, bool], int] = {}

    def point(model: Path, folder: Path, count: int, pins: list[str], args: Any) -> dict:
        key = (count, bool(pins))
        repeat = calls[key] = calls.get(key, -1) + 1
        throughput = THROUGHPUT[key][repeat]
        return {
            "num_adapters": count,
            "pinned": len(pins),
            "throughput_req_s": throughput,
            "errors": 1 if key == (2000, False) else 0,
            "disk_reads": 0.0,
            "ttft_s": {"p99": 100.0 / throughput},
            "at_capacity": True,
        }

    adapter = tmp_path / "adapters" / "adapter-0000"
    monkeypatch.setattr(adapter_tiers, "ensure_assets", lambda *a: (tmp_path, {"a": adapter}))
    monkeypatch.setattr(adapter_tiers, "_sweep_point", point)
    args = adapter_tiers._parse_args(["sweep", "--counts", "5,2000", "--repeats", "3"])
    points = {(p["num_adapters"], bool(p["pinned"])): p for p in adapter_tiers.sweep(args)}

    assert calls == {key: 2 for key in THROUGHPUT}  # three runs of each point
    many = points[(2000, False)]
    assert many["throughput_req_s"] == 63.0  # the median run, whole
    assert many["ttft_s"]["p99"] == pytest.approx(100.0 / 63.0)
    assert many["errors"] == 3  # every run's
    assert [run["throughput_req_s"] for run in many["runs"]] == THROUGHPUT[(2000, False)]
    # 72/80, 56/70, 63/90: each repeat against its own 5-adapter run, then the median
    assert many["throughput_vs_smallest_runs"] == [0.9, 0.8, 0.7]
    assert many["throughput_vs_smallest"] == 0.8
    assert points[(5, True)]["throughput_vs_unpinned"] == pytest.approx(0.95, abs=1e-3)
    assert "throughput_vs_unpinned" not in points[(5, False)]
