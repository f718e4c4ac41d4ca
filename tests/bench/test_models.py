"""bench/models.py: the shapes are ModelArch, and a built folder reads back as its shape."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import load_file

from loraserve.bench.assets import is_dora
from loraserve.bench.kernels_lora import lora_groups
from loraserve.bench.models import SHAPES, build_adapter, build_model
from loraserve.memory.adapter_store import AdapterReader
from loraserve.memory.geometry import PoolGeometry
from loraserve.models.arch import MODULE_INDEX, linear_parent
from loraserve.models.hf_config import load_arch


def test_a_built_model_reads_back_as_its_shape(tmp_path: Path) -> None:
    arch = SHAPES["cpu"]
    build_model(tmp_path / "model", arch, torch.bfloat16)
    assert load_arch(tmp_path / "model") == dataclasses.replace(arch, torch_dtype="bfloat16")
    weights = load_file(tmp_path / "model" / "model.safetensors")
    assert weights["model.layers.3.self_attn.o_proj.weight"].shape == (256, 256)
    assert weights["model.layers.0.mlp.down_proj.weight"].shape == (256, 688)
    build_adapter(tmp_path / "adapter", arch, rank=8)
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.k_proj"
    assert adapter[f"{prefix}.lora_A.weight"].shape == (8, 256)
    assert adapter[f"{prefix}.lora_B.weight"].shape == (256, 8)


def test_the_kernel_benchmark_groups_follow_the_arch() -> None:
    """Llama-3-8B's GQA: k and v are 8 heads of 128, a quarter of q."""
    groups = lora_groups(SHAPES["llama-3-8b"])
    assert groups == {
        "qkv": (4096, (4096, 1024, 1024)),
        "gate_up": (4096, (14336, 14336)),
        "down": (14336, (4096,)),
    }


def test_a_dora_bench_adapter_reads_back_with_g_near_one(tmp_path: Path) -> None:
    """bench.compare --dora-fraction: DoRA adapters of the bench shape, g = m / ||W + sBA||
    near 1 as a trained one's (the throughput figures are of a realistic computation)."""
    arch = SHAPES["cpu"]
    build_model(tmp_path / "model", arch, torch.float32)
    build_adapter(tmp_path / "dora", arch, rank=8, dora=True)
    weights = load_file(tmp_path / "model" / "model.safetensors")

    class Weights:
        def base_weight(self, layer: int, module: str) -> torch.Tensor:
            return weights[f"model.layers.{layer}.{linear_parent(module)}.{module}.weight"]

    geometry = PoolGeometry.for_model(arch, block_size=16, max_lora_rank=8)
    reader = AdapterReader(arch, geometry, 8, torch.float32, base_weights=Weights())
    host = reader.read("dora", tmp_path / "dora")
    assert host.is_dora
    offset = int(host.local_offsets[0, MODULE_INDEX["o_proj"], 2])
    g = host.pages.view(-1)[offset : offset + arch.hidden_size]
    assert float(g.min()) > 0.5 and float(g.max()) < 1.5 and float((g - 1).abs().max()) > 0.01
    assert [index for index in range(12) if is_dora(index, 0.25)] == [3, 7, 11]
    assert not any(is_dora(index, 0.0) for index in range(12))
