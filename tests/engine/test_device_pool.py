"""The device pool's adapter loads: pages copied straight into their pool pages (runs of
consecutive pages in one copy each), the slot's table rows pointing at them."""

from __future__ import annotations

from dataclasses import replace

import torch

from loraserve.bench.decode_step import random_adapter
from loraserve.bench.models import SHAPES
from loraserve.engine.runner.device_pool import DevicePool, page_runs
from loraserve.memory.geometry import PoolGeometry
from loraserve.memory.residency import AdapterLoad
from loraserve.models.arch import LORA_MODULES, MODULE_INDEX


def test_page_runs() -> None:
    assert page_runs([7, 8, 9, 2, 3]) == [(7, 0, 3), (2, 3, 2)]
    assert page_runs([4]) == [(4, 0, 1)]
    assert page_runs([5, 3, 4]) == [(5, 0, 1), (3, 1, 2)]


def test_a_load_lands_in_its_pages_and_table_rows() -> None:
    arch = replace(SHAPES["cpu"], num_layers=2)
    geometry = PoolGeometry.for_model(arch, block_size=4, max_lora_rank=8)
    pool = DevicePool(geometry, 40, 3, torch.float32, torch.device("cpu"))
    pool.pages.fill_(float("nan"))
    adapter = random_adapter("a", arch, geometry, 8, LORA_MODULES, torch.float32, pool.device)
    assert adapter.num_pages >= 3
    pages = (30, 31, *range(5, 5 + adapter.num_pages - 2))  # two runs
    pool.load([AdapterLoad("a", 1, pages, adapter)])
    assert torch.equal(pool.pages[list(pages)], adapter.pages[0])
    assert pool.slot_max_rank[1] == 8
    assert torch.equal(pool.lora_ranks[1], adapter.ranks)
    flat = pool.pages.view(-1)
    for layer in range(arch.num_layers):
        for module in ("q_proj", "down_proj"):
            a_offset, b_offset, g_offset = pool.lora_offsets[1, layer, MODULE_INDEX[module]]
            local_a = int(adapter.local_offsets[layer, MODULE_INDEX[module], 0])
            numel = 8 * arch.module_dims(module)[0]
            assert torch.equal(
                flat[int(a_offset) : int(a_offset) + numel],
                adapter.pages.view(-1)[local_a : local_a + numel],
            )
            assert int(b_offset) >= 0 and int(g_offset) == -1
