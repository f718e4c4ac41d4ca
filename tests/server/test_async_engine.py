"""The front end's handle on the engine-core process, on its own: deltas arrive, errors come
back to the caller, a cancelled consumer aborts its request and frees its pages, admin
calls run in the core, a dead core fails everyone instead of hanging, an idle core sleeps."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_harness import ENGINE_OPTIONS, Assets

from loraserve import SamplingParams
from loraserve.engine.client.async_engine import AsyncEngine
from loraserve.engine.core.config import (
    OPENMP_SPIN_COUNT,
    build_config,
    serving_openmp_environment,
)
from loraserve.engine.core.request import EngineRequest
from loraserve.errors import (
    AdapterError,
    EngineDeadError,
    EngineError,
    InvalidRequestError,
    QueueFullError,
    UnknownAdapterError,
)

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
LONG = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
OPENMP_VARIABLES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


@pytest.fixture
def engine(assets: Assets) -> Iterator[AsyncEngine]:
    engine = AsyncEngine(build_config(str(assets.model), **ENGINE_OPTIONS), assets.adapters)
    engine.start()
    yield engine
    engine.shutdown()


def prompt(engine: AsyncEngine, text: str = "hello") -> list[int]:
    return engine.tokenizer.encode(text)


def test_generate_streams_deltas_to_the_end(engine: AsyncEngine) -> None:
    async def run() -> None:
        deltas = [
            d async for d in engine.generate(EngineRequest("r", prompt(engine), GREEDY, "attn8"))
        ]
        assert [d.num_tokens for d in deltas] == list(range(1, 9))
        assert all(len(d.new_token_ids) == 1 for d in deltas)  # deltas, never the whole
        assert deltas[-1].finished and deltas[-1].finish_reason == "length"
        token_ids = [token for d in deltas for token in d.new_token_ids]
        assert "".join(d.new_text for d in deltas) == engine.tokenizer.decode(token_ids)

    asyncio.run(run())


def test_n_completions_arrive_with_their_index(engine: AsyncEngine) -> None:
    params = SamplingParams(n=3, max_tokens=4, temperature=1.0, seed=3)

    async def run() -> set[int]:
        stream = await engine.add_request(EngineRequest("r", prompt(engine), params, "mlp4"))
        async with stream:
            return {d.index async for deltas in stream for d in deltas if d.finished}

    assert asyncio.run(run()) == {0, 1, 2}


def test_add_errors_are_raised_in_the_caller(engine: AsyncEngine) -> None:
    async def run() -> None:
        with pytest.raises(UnknownAdapterError):
            await engine.add_request(EngineRequest("a", prompt(engine), GREEDY, "missing"))
        with pytest.raises(InvalidRequestError, match="maximum context length"):
            await engine.add_request(
                EngineRequest("b", prompt(engine, "hello " * 600), GREEDY, None)
            )
        stream = await engine.add_request(EngineRequest("c", prompt(engine), GREEDY))
        with pytest.raises(InvalidRequestError, match="already in use"):
            await engine.add_request(EngineRequest("c", prompt(engine), GREEDY))
        async with stream:
            assert [deltas async for deltas in stream][-1][-1].finished

    asyncio.run(run())


def test_a_cancelled_consumer_aborts_and_frees_its_pages(engine: AsyncEngine) -> None:
    async def run() -> tuple[int, int]:
        baseline = (await engine.stats()).num_kv_pages

        async def consume() -> None:
            async for _ in engine.generate(EngineRequest("long", prompt(engine), LONG, "all6")):
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


def test_admin_calls_change_the_core(engine: AsyncEngine, assets: Assets) -> None:
    async def run() -> None:
        await engine.register_adapter("extra", assets.spare_dir / "extra")
        with pytest.raises(AdapterError, match="already registered"):
            await engine.register_adapter("extra", assets.spare_dir / "extra")
        deltas = [
            d async for d in engine.generate(EngineRequest("x", prompt(engine), GREEDY, "extra"))
        ]
        assert deltas[-1].finish_reason == "length"
        await engine.unregister_adapter("extra")
        with pytest.raises(UnknownAdapterError):
            await engine.unregister_adapter("extra")

    asyncio.run(run())
    assert "extra" not in engine.adapters


def test_a_full_queue_is_refused_counting_every_completion(assets: Assets) -> None:
    config = build_config(
        str(assets.model), **ENGINE_OPTIONS, max_num_seqs=1, max_waiting_requests=2
    )
    engine = AsyncEngine(config)
    engine.start()

    async def run() -> None:
        first = await engine.add_request(EngineRequest("1", prompt(engine), LONG))
        while (await engine.stats()).num_running == 0:
            await asyncio.sleep(0.01)
        second = await engine.add_request(
            EngineRequest("2", prompt(engine), LONG)
        )  # waits: room for 1 more
        with pytest.raises(QueueFullError):  # two completions do not fit
            await engine.add_request(
                EngineRequest("3", prompt(engine), SamplingParams(n=2, max_tokens=2))
            )
        third = await engine.add_request(EngineRequest("4", prompt(engine), GREEDY))  # one does
        for stream in (first, second, third):
            stream.abort()

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()


def test_a_dead_core_fails_every_request_and_later_calls(engine: AsyncEngine) -> None:
    async def run() -> None:
        streams = [
            await engine.add_request(EngineRequest(str(i), prompt(engine), LONG, "attn8"))
            for i in range(3)
        ]
        await anext(streams[0])
        assert engine.client.process is not None and engine.client.process.pid is not None
        os.kill(engine.client.process.pid, signal.SIGKILL)
        for stream in streams:
            with pytest.raises(EngineError, match="exited"):
                async for _ in stream:
                    pass
        with pytest.raises(EngineDeadError):
            await engine.add_request(EngineRequest("late", prompt(engine), GREEDY))

    asyncio.run(asyncio.wait_for(run(), timeout=30))
    assert not engine.is_healthy


def test_an_idle_core_sleeps(engine: AsyncEngine) -> None:
    """No busy loop: over half a second idle, the core process uses (almost) no CPU."""
    asyncio.run(engine.stats())  # make sure it started and went idle
    assert engine.client.process is not None
    stat = Path(f"/proc/{engine.client.process.pid}/stat")
    if not stat.exists():
        pytest.skip("needs Linux /proc")

    def cpu_ticks() -> int:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    time.sleep(0.2)
    before = cpu_ticks()
    time.sleep(0.5)
    assert cpu_ticks() - before <= 2  # a spinning process would use ~50 ticks


def test_the_core_waits_briefly_at_openmp_barriers(engine: AsyncEngine) -> None:
    """The core shares the cores with the front end: its OpenMP threads spin briefly, then
    sleep, whether or not it ever reads an adapter on a loader thread (issue 27: a server
    whose adapters were all pinned spun 3,000 times longer and served 0.6x as fast). The
    variables are the core's own: this process's environment is left as it was."""
    assert engine.client.process is not None
    environ = Path(f"/proc/{engine.client.process.pid}/environ")
    if not environ.exists():
        pytest.skip("needs Linux /proc")
    variables = dict(
        entry.split("=", 1) for entry in environ.read_text().split("\0") if "=" in entry
    )
    expected = serving_openmp_environment(os.environ)
    if not expected:  # the user chose a wait policy: the core keeps it
        assert all(variables.get(k) == os.environ.get(k) for k in OPENMP_VARIABLES)
    else:
        assert variables["GOMP_SPINCOUNT"] == OPENMP_SPIN_COUNT
        assert "GOMP_SPINCOUNT" not in os.environ
