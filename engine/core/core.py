"""The engine core: requests, the scheduler, the pool's bookkeeping, the model runner.

One step is three calls, and no part reaches back into another:

    plan = scheduler.schedule()       which chunks run, grouped by adapter, adapters to load
    sampled = runner.execute(plan)    copies, metadata, forward, sampling (the device side)
    outputs = postprocess(plan, sampled)   tokens appended, stops and lengths, pages freed

The core works in token ids: tokenizing, detokenizing and stop strings are the
front end's (engine/client/output_processor.py), in the server's process or in `LLM`.
It is not thread-safe: one thread drives it (the engine-core process's loop, or
`LLM.generate`).

A failure that belongs to one request (the sampler could not sample its row, its
adapter's folder was refused when read from disk) ends that request alone with
`finish_reason` `error` (`fail_request`); the step goes on for the others. Anything
else a step raises is an engine fault and propagates.

Adapters come from three tiers (engine/core/adapter_manager.py): a request naming an
adapter that is on disk only is queued at once, its folder is read off the engine
thread, and the scheduler skips it until the read is in; the others keep running.

A request with structured output owns a `RequestGrammar` (engine/sampling/structured.py): the
runner reads its mask, postprocess advances it with the chosen token, and the request
stops (`stop`) once its grammar is complete and admits nothing more.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from functools import cached_property
from pathlib import Path

import msgspec

from loraserve.engine.core.adapter_manager import AdapterManager, Waiter
from loraserve.engine.core.admission import Admission
from loraserve.engine.core.config import EngineConfig, RuntimeInfo, resolve_max_model_len
from loraserve.engine.core.outputs import (
    ACTIVATE_TRANSITION,
    LOAD_TRANSITION,
    EngineOutput,
    EngineStats,
)
from loraserve.engine.core.request import EngineRequest, RequestState, Step
from loraserve.engine.runner.runner import ModelRunner, TorchModelRunner
from loraserve.engine.runner.tensor_parallel import TensorParallelRunner
from loraserve.engine.sampling.sampler import SamplerOutput
from loraserve.engine.sampling.structured import GrammarCompiler
from loraserve.errors import InvalidRequestError, QueueFullError
from loraserve.memory.adapter_catalog import AdapterCatalog
from loraserve.memory.adapter_loader import AdapterLoader
from loraserve.memory.adapter_store import AdapterReader
from loraserve.memory.geometry import PoolGeometry
from loraserve.memory.latency_log import LatencyLog
from loraserve.memory.pool import UnifiedPool
from loraserve.models.arch import ModelArch
from loraserve.models.hf_config import load_arch
from loraserve.models.tensor_parallel import shard_arch
from loraserve.models.tokenizer import Tokenizer
from loraserve.scheduler.request import SequenceState, SequenceStatus
from loraserve.scheduler.scheduler import Scheduler, SchedulerOutput

IDLE_RETRY_S = 0.01
"""Pause when requests wait but none could be scheduled (pages all taken), so no loop spins."""
READ_RETRY_S = 0.001
"""The same pause while adapters are being read from disk (a finished read may end it sooner)."""
FINISHED = {"stop": SequenceStatus.FINISHED_STOPPED, "length": SequenceStatus.FINISHED_LENGTH}
RunnerFactory = Callable[[EngineConfig, ModelArch, PoolGeometry, tuple[int, ...]], ModelRunner]


class EngineCore:
    """Many requests of many adapters, batched together step by step."""

    def __init__(self, config: EngineConfig, runner_factory: RunnerFactory = TorchModelRunner):
        self.config = config
        folder = config.model.model
        self.arch = load_arch(folder)
        tokenizer = self.tokenizer = Tokenizer.from_folder(folder)
        eos = tuple(sorted({*self.arch.eos_token_ids, *tokenizer.eos_token_ids}))
        lora = config.lora
        ranks = config.model.tensor_parallel_size
        self.geometry = PoolGeometry.for_model(  # every rank's: its shard of a page
            shard_arch(self.arch, ranks), config.cache.block_size, lora.max_lora_rank
        )
        if ranks > 1 and runner_factory is TorchModelRunner:
            runner_factory = TensorParallelRunner
        self.runner = runner_factory(config, self.arch, self.geometry, eos)
        runner = self.runner
        reader = AdapterReader(
            self.arch,
            self.geometry,
            lora.max_lora_rank,
            runner.dtype,
            pin_memory=runner.device.type == "cuda",  # host-to-device copies from pinned pages
            max_weight=lora.max_adapter_weight,
            base_weights=runner,
            shards=ranks,
            native_copies=runner.kernel_backend == "native",
        )
        self.catalog = AdapterCatalog(
            AdapterLoader(
                reader,
                lora.adapter_load_workers,
                torch_threads=1 if runner.device.type == "cpu" else None,
            ),
            lora.max_cpu_loras,
            lora.max_cpu_lora_bytes,
        )
        self.memory = UnifiedPool(
            self.runner.num_pages,
            config.cache.block_size,
            config.resident_adapter_slots,
            self.catalog,
            enable_prefix_caching=config.cache.enable_prefix_caching,
        )
        self.adapters = AdapterManager(self.catalog, self.memory)
        self.scheduler = Scheduler(config.scheduler, self.memory)
        self.info = RuntimeInfo(
            device=str(runner.device),
            dtype=str(runner.dtype).removeprefix("torch."),
            kernel_backend=self.runner.kernel_backend,
            num_pages=self.runner.num_pages,
            page_numel=self.geometry.page_numel,
            max_model_len=resolve_max_model_len(self.arch, config.model.max_model_len),
            vocab_size=self.arch.vocab_size,
            eos_token_ids=eos,
            served_model_names=config.model.served_model_names(),
            warmup_seconds=self.runner.warmup_seconds,
        )
        self.admission = Admission(self.arch.vocab_size, self.info, self.geometry.block_size)
        self.requests: dict[str, RequestState] = {}
        self._started: dict[str, RequestState] = {}
        """Requests added since the last step the runner executed (it learns of them then)."""
        self._finished: list[str] = []
        """Requests the runner knows that ended since its last step."""
        self.num_preemptions = 0
        """Preemptions since start (each one recomputes a request's KV later)."""
        self.step_seconds = LatencyLog()
        """Wall time of each step that ran a plan, since the stats were last read."""

    @cached_property
    def grammars(self) -> GrammarCompiler:
        """Built on the first structured request (reading the vocabulary takes a moment)."""
        vocab_size = max(self.arch.vocab_size, self.tokenizer.vocab_size)
        return GrammarCompiler(self.tokenizer.backend.to_str(), vocab_size, self.info.eos_token_ids)

    # -- adapters --------------------------------------------------------------------------

    def register_adapter(
        self, name: str, path: str | Path, pinned: bool = False, wait: bool = True
    ) -> None:
        """Register a PEFT folder, read into host RAM (and kept in the pool if `pinned`).
        With `wait` it is read now (AdapterError if refused; nothing registered); without,
        it is read in the background (see `when_adapter_ready`)."""
        self.adapters.register(name, path, pinned, wait)

    def unregister_adapter(self, name: str) -> None:
        """Forget an adapter. With requests in flight, new requests for it are refused at
        once and it is forgotten when the last of them ends (refuse new, then unload)."""
        self.adapters.unregister(name)

    @property
    def retiring(self) -> set[str]:
        """Adapters being unloaded: refused to new requests, forgotten once their last ends."""
        return self.adapters.retiring

    def when_adapter_ready(self, name: str, waiter: Waiter) -> bool:
        """True if adapter `name` is ready now; else `waiter` is called between two steps
        once it is (with None) or once it failed (with the error)."""
        return self.adapters.when_ready(name, waiter)

    # -- requests --------------------------------------------------------------------------

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request; raises InvalidRequestError / UnknownAdapterError if it cannot run,
        AdapterError if its adapter's folder was refused before (and has not changed).
        An adapter on disk only starts being read now; the request waits for it."""
        request_id, prompt, params, adapter = (
            request.request_id,
            request.prompt_token_ids,
            request.params,
            request.adapter,
        )
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if adapter is not None:
            self.adapters.ensure(adapter, request.adapter_path)
        adapter_pages = 0 if adapter is None else self.adapters.num_pages(adapter)
        max_tokens = self.admission.max_tokens(
            prompt, params, adapter_pages, self.memory.num_pages_for_requests
        )
        self.admission.check_token_ids(params)
        stops = self.admission.stop_token_ids(params)
        if max_tokens != params.max_tokens:
            request = msgspec.structs.replace(
                request, params=replace(params, max_tokens=max_tokens)
            )
        grammar = None
        if params.structured_outputs is not None:
            grammar = self.grammars.grammar_for(params.structured_outputs)
        seq = SequenceState(
            request_id=request_id,
            adapter=adapter,
            token_ids=prompt,
            tenant=request.tenant,
            tenant_weight=request.tenant_weight,
            cache_scope=request.cache_scope,
            # Cached blocks have no logits: a request that reports prompt logprobs computes all.
            reuse_cached_prefix=params.prompt_logprobs is None,
        )
        prompt_logprobs = None if params.prompt_logprobs is None else [None]
        state = RequestState(request, seq, stops, grammar, prompt_logprobs)
        self.requests[request_id] = self._started[request_id] = state
        self.scheduler.add(seq)
        self.adapters.hold(adapter)

    def add_requests(self, requests: list[EngineRequest]) -> None:
        """Queue the completions of one request, all or none; QueueFullError if the waiting
        queue has no room for all of them (each completion counts)."""
        if self.scheduler.is_full(len(requests)):
            room = self.config.scheduler.max_waiting_requests - self.scheduler.num_waiting()
            raise QueueFullError(
                f"the server has {self.scheduler.num_waiting()} requests waiting and room for "
                f"{max(room, 0)} more; this one needs {len(requests)}: retry later"
            )
        added: list[str] = []
        try:
            for request in requests:
                self.add_request(request)
                added.append(request.request_id)
        except BaseException:
            for request_id in added:
                self.abort_request(request_id)
            raise

    def fail_request(self, request_id: str, message: str) -> EngineOutput:
        """End one request with an error (its pages go back to the pool); the engine and
        every other request go on. Its last output says why."""
        self.abort_request(request_id)
        return EngineOutput(request_id, [], finish_reason="error", error=message)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now; its pages go back to the pool. False if it was not running."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return False
        self.scheduler.abort(request_id)
        self._forget(request_id)
        self.adapters.release(state.seq.adapter)
        return True

    def _forget(self, request_id: str) -> None:
        """Tell the runner, with its next step, that a request it knows has ended."""
        if self._started.pop(request_id, None) is None:
            self._finished.append(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def is_reading_adapters(self) -> bool:
        """Whether adapter folders are being read (a step collects the finished ones)."""
        return self.catalog.loader.num_in_flight > 0

    def wait_for_adapter_reads(self, timeout: float) -> None:
        """Block until an adapter read in flight finishes (at most `timeout` seconds): the
        in-process driver's wait in `step_or_wait`, which calls it only when nothing runs."""
        if self.is_reading_adapters():
            self.catalog.loader.wait(timeout)

    def check(self) -> None:
        """EngineError when the engine can no longer step (a tensor-parallel rank died)."""
        self.runner.check()

    def step_or_wait(self, wait: Callable[[float], object]) -> list[EngineOutput]:
        """One turn of the loop that every driver runs (the core process's, `LLM`'s): a step;
        if it produced nothing and nothing runs, `wait(seconds)` for news
        rather than spin: briefly while adapters are read from disk (a finished read lets
        their requests start), longer when none could be admitted. The driver says how it
        waits (the core process on its inbox, `LLM` on the reads); the core, for how long."""
        outputs = self.step()
        if not outputs and self.scheduler.num_running() == 0:
            wait(READ_RETRY_S if self.is_reading_adapters() else IDLE_RETRY_S)
        return outputs

    # -- the step ---------------------------------------------------------------------------

    def step(self) -> list[EngineOutput]:
        """Take the adapter reads that finished, then run one forward pass over the
        scheduled chunks; outputs of requests that advanced (or failed)."""
        started = time.perf_counter()
        failed = self._collect_adapter_reads()
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return failed
        step = Step(plan, list(self._started.values()), self._finished)
        self._started, self._finished = {}, []
        self._stamp_scheduled(plan)
        sampled = self.runner.execute(step)
        outputs = failed + self._postprocess(plan, sampled)
        self.step_seconds.record(time.perf_counter() - started)
        return outputs

    def _stamp_scheduled(self, plan: SchedulerOutput) -> None:
        """Note when each request first runs: its queue time ends (reported with its first
        token, for the metrics)."""
        now = time.monotonic()
        for chunk in plan.chunks:
            if chunk.seq.num_output_tokens:  # decoding: scheduled long ago (most chunks)
                continue
            state = self.requests.get(chunk.seq.request_id)
            if state is not None and state.scheduled_at is None:
                state.scheduled_at = now

    def _collect_adapter_reads(self) -> list[EngineOutput]:
        """Requests whose adapter's folder was refused fail with its error."""
        outputs = []
        for name, error in self.adapters.collect():
            doomed = [rid for rid, state in self.requests.items() if state.seq.adapter == name]
            outputs += [self.fail_request(request_id, str(error)) for request_id in doomed]
        return outputs

    def _postprocess(self, plan: SchedulerOutput, sampled: SamplerOutput) -> list[EngineOutput]:
        """Append each sampled token, finish the requests that stop, report what changed.

        A row the sampler could not sample fails its request alone (`fail_request`)."""
        self.num_preemptions += len(plan.preempted)
        rows = zip(
            (chunk.seq for chunk in plan.chunks if chunk.samples),
            sampled.token_ids,
            sampled.logprobs,
            sampled.failures,
            strict=True,
        )
        for request_id, entries in sampled.prompt_logprobs.items():
            state = self.requests.get(request_id)
            if state is not None and state.prompt_logprobs is not None:
                state.prompt_logprobs += entries
        outputs, good = [], []
        for seq, token, logprobs, failure in rows:
            state = self.requests[seq.request_id]
            if failure is None and state.grammar is not None and not state.grammar.accept(token):
                failure = f"the output grammar refused token {token}: {state.grammar.error}"
            if failure is None:
                good.append((seq, token, logprobs))
            else:
                outputs.append(self.fail_request(seq.request_id, f"sampling failed: {failure}"))
        tokens = {seq.request_id: token for seq, token, _ in good}
        self.scheduler.update_after_step(plan, tokens)
        for seq, token, logprobs in good:
            state = self.requests[seq.request_id]
            output = EngineOutput(seq.request_id, [token], None if logprobs is None else [logprobs])
            output.prompt_logprobs, state.prompt_logprobs = state.prompt_logprobs, None
            if seq.num_output_tokens == 1 and state.scheduled_at is not None:
                output.queue_seconds = state.scheduled_at - state.queued_at
                output.prefill_seconds = time.monotonic() - state.scheduled_at
            output.finish_reason = self._finish_reason(state, token, output)
            if output.finish_reason is not None:
                self._finish(state, FINISHED[output.finish_reason])
            outputs.append(output)
        return outputs

    def _finish_reason(self, state: RequestState, token: int, output: EngineOutput) -> str | None:
        """`stop` for EOS / stop tokens and for a complete grammar, `length` at max_tokens
        or the context limit."""
        seq, params = state.seq, state.params
        num_outputs = seq.num_output_tokens
        if num_outputs > params.min_tokens and token in state.stop_token_ids:
            output.stop_reason = None if token in self.info.eos_token_ids else token
            output.stopped_on_token = True
            return "stop"
        if state.grammar is not None and state.grammar.finished:
            return "stop"
        if num_outputs >= (params.max_tokens or 0) or seq.num_tokens >= self.info.max_model_len:
            return "length"
        return None

    def _finish(self, state: RequestState, status: SequenceStatus) -> None:
        request_id = state.seq.request_id
        self.scheduler.finish(request_id, status)
        self._forget(request_id)
        del self.requests[request_id]
        self.adapters.release(state.seq.adapter)

    # -- statistics ------------------------------------------------------------------------

    def adapter_names(self) -> list[str]:
        """Registered adapters, in registration order."""
        return self.catalog.names()

    def stats(self) -> EngineStats:
        """Counts for /metrics, between two steps."""
        memory, scheduler = self.memory, self.scheduler
        return EngineStats(
            num_running=scheduler.num_running(),
            num_waiting=scheduler.num_waiting(),
            running_adapters=tuple(scheduler.running_adapters()),
            waiting_adapters=tuple(scheduler.waiting_adapters()),
            num_total_pages=memory.num_total_pages,
            num_kv_pages=memory.num_kv_pages,
            num_cached_kv_pages=memory.num_cached_pages,
            num_adapter_pages=memory.num_adapter_pages,
            num_free_pages=memory.num_free_pages,
            num_pinned_adapter_pages=memory.num_pinned_adapter_pages,
            loaded_adapters=tuple(
                (r.name, r.level, r.pinned, r.rank) for r in self.adapters.residency()
            ),
            num_host_adapters=len(self.catalog.host_adapters()),
            num_adapter_loads=memory.stats.adapter_loads,
            num_adapter_evictions=memory.stats.adapter_evictions,
            num_preemptions=self.num_preemptions,
            prefix_cache_queries=memory.stats.prefix_cache_queries,
            prefix_cache_hits=memory.stats.prefix_cache_hits,
            new_adapter_load_seconds=tuple(
                [(LOAD_TRANSITION, seconds) for seconds in self.catalog.drain_load_seconds()]
                + [(ACTIVATE_TRANSITION, seconds) for seconds in self.runner.drain_load_seconds()]
            ),
            new_step_seconds=tuple(self.step_seconds.drain()),
        )
