"""bench/lora_bytes.py: the byte arithmetic checked by hand, and a dry run at a tiny shape
(so the command cannot rot; its figures are not asserted)."""

from __future__ import annotations

import json

from loraserve.bench import lora_bytes
from loraserve.bench.models import SHAPES


def test_llama2_adapter_bytes_by_hand() -> None:
    # Per layer and adapter, rank x (in + out) of each module: q, k, v, o 4096 + 4096;
    # gate, up 4096 + 11008; down 11008 + 4096 -> 78,080 per unit of rank.
    per_rank = 4 * 8192 + 3 * 15104
    step = lora_bytes.lora_step_bytes(SHAPES["llama-2-7b"], 32, 16, 32, element_bytes=2)
    assert step["adapter_weights"] == 32 * 32 * 16 * per_rank * 2 == 2_558_525_440
    # y: every token, slice and rank in float32, written then read: 7 slices a layer.
    assert step["y"] == 32 * 2 * 32 * 7 * 16 * 4
    assert step["total"] == step["adapter_weights"] + step["activations"] + step["y"]


def test_a_dry_run_writes_its_result(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(lora_bytes, "copy_bandwidth", lambda device, numel: 1e9)
    output = tmp_path / "result.json"
    argv = ["--shape", "cpu", "--batch", "3", "--rank", "4", "--layers", "1", "--repeats", "1"]
    lora_bytes.main([*argv, "--output", str(output)])
    result = json.loads(output.read_text())
    assert result["cpu_native"]["seconds_per_step"] > 0
    assert set(result["gpu"]) == set(lora_bytes.GPU_BANDWIDTH)
    assert [launch["group"] for launch in result["triton_decode_grid"]] == list(
        lora_bytes.GROUP_NAMES
    )
