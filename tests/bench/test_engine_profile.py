"""bench/engine_profile.py at a tiny point (so the command cannot rot; its figures are not
asserted): every request of the trace runs, and the profile names the engine's functions."""

from __future__ import annotations

import json

from loraserve.bench import engine_profile


def test_a_tiny_point_runs_every_request_and_lists_the_engine(tmp_path) -> None:
    output = tmp_path / "profile.json"
    engine_profile.main(
        ["--count", "3", "--duration", "0.5", "--req-rate", "20", "--max-cpu-loras", "2",
         "--top", "200", "--cache-dir", str(tmp_path / "cache"), "--json", str(output)]
    )  # fmt: skip
    result = json.loads(output.read_text())
    assert result["requests"] > 0 and result["forward_passes"] > 0  # the loop ends when all did
    functions = [row["function"] for row in result["top"]]
    assert any(function.startswith("scheduler.py:") for function in functions)
    assert all(row["own_s"] <= row["cumulative_s"] + 1e-3 for row in result["top"])
