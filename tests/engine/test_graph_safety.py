"""Graph safety, checked on a CPU (CI has no GPU): the decode forward pass that a CUDA graph
captures makes no host sync, and replaying it over static buffers that the metadata builder
refills in place gives, batch after batch, the bits of an eager forward of a batch built
fresh (tests/engine/graph_harness.py says how both are emulated).

A tiny 2-layer model with the Triton kernels (interpreted on the CPU): the backend that
CUDA graphs capture."""

from __future__ import annotations

import pytest
import torch
from factories import make_model
from graph_harness import (
    DeviceSyncError,
    EmulatedGraphs,
    batch_scalars,
    batch_tensors,
    no_device_sync,
)
from test_exactness import REQUESTS, make_adapters

from loraserve import LLM, SamplingParams
from loraserve.engine.core.request import EngineRequest
from loraserve.engine.runner.batch_metadata import BatchMetadata
from loraserve.kernels.constants import NO_ADAPTER

BUCKET = 16


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("graph-safety")
    base = make_model(root / "model", "llama-gqa", seed=1)
    return root, make_adapters(base, root)


def make_llm(assets, kernel_backend: str = "triton") -> LLM:
    root, folders = assets
    return LLM(
        root / "model",
        adapters=folders,
        device="cpu",
        dtype="float32",
        kernel_backend=kernel_backend,
        pool_pages=256,
        max_num_seqs=BUCKET,
    )


def decode_plan(llm: LLM, texts_and_adapters) -> list:
    """The chunks of a decode step of these requests (prefilled, their adapters loaded)."""
    core, runner = llm.engine, llm.engine.runner
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    for index, (adapter, text) in enumerate(texts_and_adapters):
        request = EngineRequest(f"r{index}", llm.tokenizer.encode(text), params, adapter)
        core.add_request(request)
    while any(state.seq.num_output_tokens == 0 for state in core.requests.values()):
        core.step()  # the prefills
    plan = core.scheduler.schedule()
    runner.pool.load(plan.adapter_loads)
    assert all(chunk.num_tokens == 1 and chunk.samples for chunk in plan.chunks)
    return list(plan.chunks)


@pytest.mark.parametrize("with_adapters", [False, True], ids=["base", "adapters"])
def test_the_captured_decode_forward_makes_no_host_sync(assets, with_adapters: bool) -> None:
    llm = make_llm(assets)
    runner = llm.engine.runner
    requests = REQUESTS if with_adapters else [(None, text) for _, text in REQUESTS]
    chunks = decode_plan(llm, requests[:5])
    assert any(chunk.slot != NO_ADAPTER for chunk in chunks) == with_adapters
    batch = runner.metadata.build(chunks, runner.pool, pad_to=8)
    assert (batch.lora is not None) == with_adapters, "no adapter: no LoRA launch at all"
    assert batch.lora is None or batch.lora.tiles is not None  # Triton's kernels read the map
    with no_device_sync():
        logits = runner.model.forward(batch)
    assert logits.shape == (8, llm.engine.runner.arch.vocab_size)
    assert torch.isfinite(logits[: len(chunks)]).all()


def test_the_sync_guard_catches_each_kind_of_sync() -> None:
    """A guard that cannot fail proves nothing: each forbidden kind raises."""
    x = torch.arange(6.0)
    offences = [
        lambda: x[0].item(),
        lambda: int(x[1]),
        lambda: bool(x[2] > 0),
        lambda: x.nonzero(),
        lambda: x[x > 2],
        lambda: torch.unique(x),
        lambda: x.masked_select(x > 1),
        lambda: x.tolist(),
        lambda: x.repeat_interleave(x.long()),
    ]
    for offence in offences:
        with pytest.raises(DeviceSyncError), no_device_sync():
            offence()
    with no_device_sync():  # what a decode step does is allowed
        torch.where(x > 2, x, 0.0).cumsum(0)[torch.tensor([1, 3])]


def varied_batches(chunks: list, packed: bool) -> list[list]:
    """Decode batches of the same sequences: the full one, then a smaller one over its stale
    rows. The packed layout (an upload to get wrong) also gets the two that change which LoRA
    launches run: no adapter, then adapters only, in the plan's order (grouped by slot). Each
    batch is a few seconds of interpreted Triton."""
    batches = [chunks, chunks[1:4]]
    if packed:
        batches.append([chunk for chunk in chunks if chunk.slot == NO_ADAPTER])
        batches.append([chunk for chunk in chunks if chunk.slot != NO_ADAPTER][:5])
    return batches


def fresh_forward(llm: LLM, chunks: list, pad_to: int | None) -> torch.Tensor:
    """An eager forward of `chunks` built by a new builder (no earlier step's rows anywhere)."""
    runner = llm.engine.runner
    metadata = new_metadata(runner)
    return runner.model.forward(metadata.build(chunks, runner.pool, pad_to=pad_to))


def new_metadata(runner, packed: bool = False, tile_map: bool | None = None) -> BatchMetadata:
    """A builder like the runner's; `tile_map`: whether it builds the LoRA tile map (by
    default as the runner's does: when its kernels read one)."""
    old = runner.metadata
    return BatchMetadata(
        old.input_ids.host.shape[0], old.context_lens.host.shape[0], old.max_blocks_per_seq,
        old.block_size, old.max_lora_rank, runner.device, packed,
        old.tile_map if tile_map is None else tile_map,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True], ids=["host", "packed"])
def test_replays_over_refilled_buffers_equal_fresh_eager_forwards(assets, packed: bool) -> None:
    """`packed`: the metadata as CUDA builds it (one packed upload, the block table spread
    into its static twin), whose addresses must be the same for every batch of a bucket."""
    llm = make_llm(assets)
    runner = llm.engine.runner
    if packed:
        runner.metadata = new_metadata(runner, packed=True)
    graphs = EmulatedGraphs(runner.model.forward, runner.metadata, runner.pool)
    graphs.capture(BUCKET)
    chunks = decode_plan(llm, REQUESTS)
    kv_pool = runner.pool.kv_pages
    batches = varied_batches(chunks, packed)
    for index, batch in enumerate(batches):
        num_seqs = len(batch)
        before = kv_pool.clone()
        replayed = graphs.replay(BUCKET, batch)[:num_seqs].clone()
        _assert_writes_only_to(kv_pool, before, batch, runner.metadata.block_size)
        expected = fresh_forward(llm, batch, pad_to=BUCKET)[:num_seqs]
        assert torch.equal(replayed, expected), f"a replay of {num_seqs} sequences differs"
        if index == 0:  # padding changes no row (the bucket's spare rows are ignored)
            unpadded = fresh_forward(llm, batch, pad_to=None)
            torch.testing.assert_close(replayed, unpadded, rtol=1e-5, atol=1e-5)


def _assert_writes_only_to(
    kv_pool: torch.Tensor, before: torch.Tensor, chunks: list, block_size: int
) -> None:
    """The replay wrote K/V in its own sequences' pages only (a stale slot mapping of an
    earlier, larger batch would write in another sequence's)."""
    # Bits, not values: pages never written hold whatever the allocator left, NaNs included.
    changed = (kv_pool.view(torch.uint8) != before.view(torch.uint8)).flatten(1).any(1)
    changed = changed.nonzero().flatten().tolist()
    own_pages = {chunk.seq.block_table[chunk.start // block_size] for chunk in chunks}
    assert set(changed) <= own_pages, f"pages {set(changed) - own_pages} were written"


def test_the_emulation_fails_on_a_reallocated_buffer(assets) -> None:
    llm = make_llm(assets, "torch")
    runner = llm.engine.runner
    graphs = EmulatedGraphs(runner.model.forward, runner.metadata, runner.pool)
    graphs.capture(BUCKET)
    chunks = decode_plan(llm, REQUESTS[:3])
    graphs.replay(BUCKET, chunks)  # refilled in place: fine
    runner.metadata.context_lens.host_tensor = runner.metadata.context_lens.host_tensor.clone()
    runner.metadata.context_lens.host = runner.metadata.context_lens.host_tensor.numpy()
    with pytest.raises(AssertionError, match="context_lens moved"):
        graphs.replay(BUCKET, chunks)


def test_batch_tensors_lists_every_static_input(assets) -> None:
    """Every static input a captured graph reads, the Triton kernels' LoRA tile map included:
    the torch kernels' runner builds no map (they never read it), so this asks for one."""
    llm = make_llm(assets, "torch")
    runner = llm.engine.runner
    assert not runner.metadata.tile_map
    batch = new_metadata(runner, tile_map=True).build([], runner.pool, pad_to=4, with_lora=True)
    names = set(batch_tensors(batch))
    assert {"input_ids", "block_tables", "lora.segment_starts", "lora.tiles.table"} <= names
    assert {"max_context_len", "lora.tiles.num_tiles"} <= names
    assert {"lora.max_rank", "lora.tiles.max_tiles"} <= set(batch_scalars(batch))


def test_the_prefill_warm_up_batches_run_and_the_warm_up_is_reported(assets) -> None:
    """The warm-up runs its prefill batches on CUDA only (compiles are a GPU's cost): here
    they run once each, with and without LoRA, and the runner reports its warm-up time."""
    llm = make_llm(assets, "torch")
    runner = llm.engine.runner
    assert llm.engine.info.warmup_seconds == runner.warmup_seconds >= 0
    batches = runner._prefill_warmup_chunks()
    assert [chunks[0].num_tokens for chunks in batches][:3] == [1, 17, 128]
    for chunks in batches:
        for with_lora in (False, True):
            batch = runner.metadata.build(chunks, runner.pool, with_lora=with_lora)
            assert (batch.lora is not None) == with_lora
            assert torch.isfinite(runner.model.forward(batch)).all()
