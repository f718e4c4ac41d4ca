"""bench/lora_scatter.py: the step it times, and a dry run at a tiny pool (so the command
cannot rot; its figures are not asserted)."""

from __future__ import annotations

import itertools
import json

import pytest

from loraserve.bench import lora_scatter
from loraserve.kernels import native

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler")


def test_a_step_holds_the_prefill_chunks_and_the_decodes() -> None:
    batch = lora_scatter.step_batch([7, 3, 9, 1, 0, 4, 8, 2])
    lengths = batch.segment_starts.diff().tolist()
    assert batch.segment_slots.tolist() == [7, 3, 9, 1, 0, 4, 8, 2]
    assert sum(lengths) == 6 * 40 + 250
    assert lengths[:6] == [40 + 32] * 2 + [40 + 31] * 4 and lengths[6:] == [31, 31]


def test_every_adapter_matrix_lies_in_its_own_place_in_the_pool() -> None:
    pool = lora_scatter.ScatteredPool(6, seed=1)
    starts = sorted(
        int(offset)
        for groups in pool.layers
        for group in groups
        for table in (group.a_offsets, group.b_offsets)
        for offset in table.flatten()
    )
    assert len(starts) == 6 * 4 * 8 == len(set(starts))
    assert starts[-1] + lora_scatter.MATRIX <= pool.pool.numel()
    assert all(b - a >= lora_scatter.MATRIX for a, b in itertools.pairwise(starts))


def test_a_dry_run_writes_its_rows(tmp_path) -> None:
    output = tmp_path / "result.json"
    argv = ["--pool-adapters", "8", "--adapters", "2,5", "--threads", "1", "--steps", "1"]
    lora_scatter.main([*argv, "--json", str(output)])
    rows = json.loads(output.read_text())["rows"]
    assert [(row["threads"], row["adapters"]) for row in rows] == [(1, 2), (1, 5)]
    assert all(row["step_ms_median"] > 0 for row in rows)
