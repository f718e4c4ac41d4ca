"""The device script's dry run (tiny shapes on the CPU): every section's code runs and
writes its file, so that the script a GPU machine runs once cannot have rotted."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from loraserve.bench import gpu_check
from loraserve.bench.kernel_profile import kernel_class

REPOSITORY = Path(__file__).parents[2]


@pytest.mark.slow
def test_the_dry_run_runs_every_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPOSITORY)  # the GPU tests' paths are the repository's
    gpu_check.main(["--out", str(tmp_path), "--dry-run"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["statuses"] == dict.fromkeys(summary["statuses"], "ok"), summary
    files = {path.name: json.loads(path.read_text()) for path in tmp_path.glob("0*.json")}
    assert len(files) == len(summary["statuses"]) == 7
    assert len(list(tmp_path.iterdir())) == 8, "a device run brings back 8 files of $OUT"
    decode = files["03-decode-tiny.json"]
    batches = gpu_check.DRY_RUN.batches
    assert [(p["batch"], p["adapters"]) for p in decode["points"]] == [
        (batch, targets) for batch in batches for targets in ("base", "qkvo", "all7")
    ]
    assert all(p["eager_ms"] > 0 and p["floor_ms"] > 0 for p in decode["points"])
    profile = files["04-profile.json"]
    assert profile["all7-eager"]["launches_per_step"] > profile["base-eager"]["launches_per_step"]
    assert files["05-gpu-tests.json"]["result"]["returncode"] == 0
    peft = files["07-s2-vs-peft.json"]["points"][0]
    assert peft["loraserve"]["completed"] == peft["num_requests"]


def test_sections_record_their_failure_and_the_run_goes_on(tmp_path: Path) -> None:
    def broken(section: gpu_check.Section) -> None:
        section.record("before", 1)
        raise ValueError("no such kernel")

    section = gpu_check.Section(tmp_path / "01-broken.json")
    status = gpu_check._run_section(section, broken, gpu_check.Budget(60), 0)
    written = json.loads((tmp_path / "01-broken.json").read_text())
    assert status == "failed" and written["before"] == 1
    assert written["error"] == "ValueError: no such kernel" and "Traceback" in written["traceback"]
    skipped = gpu_check.Section(tmp_path / "02-late.json")
    assert gpu_check._run_section(skipped, broken, gpu_check.Budget(5), 30).startswith("skipped")


def test_kernel_classes() -> None:
    assert kernel_class("_lora_shrink_kernel") == "lora_shrink"
    assert kernel_class("_add_rms_norm_shrink_kernel") == "norm_shrink"
    assert kernel_class("_gated_activation_shrink_kernel") == "activation_shrink"
    assert kernel_class("_paged_attention_kernel") == "attention"
    assert kernel_class("nvjet_tst_128x64_64x4") == "gemm"
    assert kernel_class("void at::native::vectorized_elementwise_kernel") == ("elementwise")


def test_a_command_past_its_timeout_is_ended_with_its_children(tmp_path: Path) -> None:
    """A timed-out section (a server under bench.compare, say) leaves no process behind."""
    marker = tmp_path / "child-pid"
    script = f"sleep 30 & echo $! > {marker}; echo started; wait"
    result = gpu_check._command(["sh", "-c", script], timeout=2)
    assert result["returncode"] is None and result["timeout_s"] == 2
    assert "started" in result["tail"]
    status = Path(f"/proc/{int(marker.read_text())}/status")
    for _ in range(50):  # killed: gone, or a zombie until its new parent reaps it
        if not status.exists() or "State:\tZ" in status.read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail("the command's child outlived its timeout")
