"""The asyncio bridge on its own: outputs arrive, errors come back to the caller,
a cancelled consumer aborts its request and frees its pages, admin calls run on the
engine thread, a failing step fails everyone instead of hanging, an idle thread sleeps."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_harness import ENGINE_OPTIONS, Assets

from loraserve import SamplingParams
from loraserve.engine.async_engine import AsyncEngine, EngineDeadError, EngineError, QueueFullError
from loraserve.engine.engine import LLMEngine
from loraserve.engine.llm import build_config
from loraserve.errors import InvalidRequestError, UnknownAdapterError

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
LONG = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)


@pytest.fixture
def engine(assets: Assets) -> Iterator[AsyncEngine]:
    engine = AsyncEngine(
        LLMEngine(build_config(str(assets.model), **ENGINE_OPTIONS)), assets.adapters
    )
    engine.start()
    yield engine
    engine.shutdown()


def test_generate_streams_to_the_end(engine: AsyncEngine) -> None:
    async def run() -> list[int]:
        outputs = [out async for out in engine.generate("r", "hello", GREEDY, "attn8")]
        assert [len(out.token_ids) for out in outputs] == list(range(1, 9))
        assert outputs[-1].finished and outputs[-1].finish_reason == "length"
        assert "".join(out.outputs[0].new_text for out in outputs) == outputs[-1].text
        return outputs[-1].token_ids

    assert len(asyncio.run(run())) == 8
    assert not engine.engine.has_unfinished_requests()  # the thread is idle: safe to read


def test_n_completions_arrive_with_their_index(engine: AsyncEngine) -> None:
    params = SamplingParams(n=3, max_tokens=4, temperature=1.0, seed=3)

    async def run() -> set[int]:
        stream = await engine.add_request("r", "hello", params, "mlp4")
        async with stream:
            return {out.outputs[0].index async for out in stream if out.finished}

    assert asyncio.run(run()) == {0, 1, 2}


def test_add_errors_are_raised_in_the_caller(engine: AsyncEngine) -> None:
    async def run() -> None:
        with pytest.raises(UnknownAdapterError):
            await engine.add_request("a", "hello", GREEDY, "missing")
        with pytest.raises(InvalidRequestError):
            await engine.add_request("b", "hello " * 600, GREEDY, None)
        stream = await engine.add_request("c", "hello", GREEDY)
        with pytest.raises(InvalidRequestError, match="already in use"):
            await engine.add_request("c", "hello", GREEDY)
        async with stream:
            assert [out async for out in stream][-1].finished

    asyncio.run(run())


def test_a_cancelled_consumer_aborts_and_frees_its_pages(engine: AsyncEngine) -> None:
    async def run() -> tuple[int, int]:
        baseline = (await engine.stats()).num_kv_pages

        async def consume() -> None:
            async for _ in engine.generate("long", "hello", LONG, "all6"):
                pass

        task = asyncio.create_task(consume())
        while (await engine.stats()).num_running == 0:
            await asyncio.sleep(0.01)
        assert (await engine.stats()).num_kv_pages > baseline
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stats = await engine.stats()
        return baseline, stats.num_kv_pages + stats.num_running

    baseline, after = asyncio.run(run())
    assert after == baseline


def test_admin_calls_run_on_the_engine_thread(engine: AsyncEngine, assets: Assets) -> None:
    async def run() -> str:
        await engine.register_adapter("extra", assets.spare_dir / "extra")
        with pytest.raises(InvalidRequestError):
            await engine.register_adapter("extra", assets.spare_dir / "extra")
        name = await engine.call(lambda _: threading.current_thread().name)
        await engine.unregister_adapter("extra")
        with pytest.raises(UnknownAdapterError):
            await engine.unregister_adapter("extra")
        return name

    assert asyncio.run(run()) == "loraserve-engine"
    assert "extra" not in engine.adapters


def test_a_full_queue_is_refused(assets: Assets) -> None:
    config = build_config(
        str(assets.model), **ENGINE_OPTIONS, max_num_seqs=1, max_waiting_requests=1
    )
    engine = AsyncEngine(LLMEngine(config))
    engine.start()

    async def run() -> None:
        first = await engine.add_request("1", "hello", LONG)
        second = await engine.add_request("2", "hello", LONG)
        with pytest.raises(QueueFullError):
            await engine.add_request("3", "hello", GREEDY)
        first.abort()
        second.abort()

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()


def test_a_failing_step_fails_every_request_and_later_calls(engine: AsyncEngine) -> None:
    real_step = engine.engine.step
    fail = threading.Event()

    def step():  # type: ignore[no-untyped-def]
        if fail.is_set():
            raise RuntimeError("injected")
        return real_step()

    engine.engine.step = step  # type: ignore[method-assign]

    async def run() -> None:
        streams = [await engine.add_request(str(i), "hello", LONG, "attn8") for i in range(3)]
        await anext(streams[0])
        fail.set()
        for stream in streams:
            with pytest.raises(EngineError, match="injected"):
                async for _ in stream:
                    pass
        with pytest.raises(EngineDeadError):
            await engine.add_request("late", "hello", GREEDY)

    asyncio.run(asyncio.wait_for(run(), timeout=30))
    assert not engine.is_healthy


def test_an_idle_engine_thread_sleeps(engine: AsyncEngine) -> None:
    """No busy loop: over half a second idle, the thread uses (almost) no CPU."""
    asyncio.run(engine.stats())  # make sure it started and went idle
    stat = Path(f"/proc/self/task/{engine._thread.native_id}/stat")
    if not stat.exists():
        pytest.skip("needs Linux /proc")

    def cpu_ticks() -> int:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    before = cpu_ticks()
    time.sleep(0.5)
    assert cpu_ticks() - before <= 2  # a spinning thread would use ~50 ticks
