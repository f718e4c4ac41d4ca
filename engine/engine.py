"""The synchronous engine: one step = schedule, make resident, forward, sample, update.

`LLMEngine` is used as is by the `LLM` class and, on its own thread, by the async
engine behind the HTTP server. It is not thread-safe: one thread drives it.

A failure that belongs to one request (the sampler could not sample its row, its
output could not be recorded) ends that request alone with `finish_reason`
`error` (see `fail_request`); the step goes on for the others. Anything else a
step raises is an engine fault and propagates.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraserve.engine.batch_builder import build_batch, order_by_adapter
from loraserve.engine.config import EngineConfig, RuntimeInfo
from loraserve.engine.detokenizer import IncrementalDetokenizer
from loraserve.engine.outputs import CompletionOutput, RequestOutput
from loraserve.engine.sampler import TokenLogprobs, make_generator, sample
from loraserve.engine.sampling_params import SamplingParams
from loraserve.errors import InvalidRequestError, UnknownAdapterError
from loraserve.kernels.dispatch import select_kernels
from loraserve.memory.adapter_store import AdapterStore, HostAdapter
from loraserve.memory.geometry import PoolGeometry
from loraserve.memory.manager import MemoryManager
from loraserve.models.arch import ModelArch
from loraserve.models.config import load_arch
from loraserve.models.llama import LlamaModel
from loraserve.models.tokenizer import Tokenizer
from loraserve.models.weights import load_weights
from loraserve.scheduler.request import SequenceState, SequenceStatus
from loraserve.scheduler.scheduler import Scheduler

logger = logging.getLogger(__name__)

CPU_DEFAULT_POOL_GIB = 1.0
FINISHED = {"stop": SequenceStatus.FINISHED_STOPPED, "length": SequenceStatus.FINISHED_LENGTH}


@dataclass
class RequestState:
    """The engine's side of a request: what the scheduler does not need to know."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seq: SequenceState
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    completion: CompletionOutput = field(default_factory=lambda: CompletionOutput(index=0))

    @property
    def output_token_ids(self) -> list[int]:
        return self.seq.output_token_ids


class LLMEngine:
    """Many requests of many adapters, batched together step by step."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        folder = config.model.model
        self.arch = load_arch(folder)
        self.tokenizer = Tokenizer.from_folder(folder)
        device = config.model.torch_device()
        dtype = config.model.torch_dtype(self.arch.torch_dtype)
        weights = load_weights(folder, self.arch, dtype, device)
        self.kernels = select_kernels(config.model.kernel_backend, device)
        self.model = LlamaModel(self.arch, weights, self.kernels)
        del weights
        lora = config.lora
        self.geometry = PoolGeometry.for_model(
            self.arch, config.cache.block_size, lora.max_lora_rank
        )
        num_pages = self._num_pages(device, dtype)
        self.store = AdapterStore(
            self.arch, self.geometry, lora.max_lora_rank, dtype, pin_memory=device.type == "cuda"
        )
        self.memory = MemoryManager(
            self.geometry, num_pages, self.store, dtype, device, lora.max_resident_adapters
        )
        self.scheduler = Scheduler(config.scheduler, self.memory)
        self.info = RuntimeInfo(
            device=device,
            dtype=dtype,
            num_pages=num_pages,
            page_numel=self.geometry.page_numel,
            max_model_len=max_model_len(self.arch, config.model.max_model_len),
            eos_token_ids=tuple(sorted({*self.arch.eos_token_ids, *self.tokenizer.eos_token_ids})),
            served_model_name=config.model.served_model_name or Path(folder).resolve().name,
        )
        self.requests: dict[str, RequestState] = {}
        self.num_preemptions = 0
        """Preemptions since start (each one recomputes a request's KV later)."""

    # -- adapters --------------------------------------------------------------------------

    def register_adapter(self, name: str, path: str | Path) -> HostAdapter:
        """Load a PEFT folder into host RAM (AdapterError if refused; nothing registered)."""
        return self.store.register(name, path)

    def unregister_adapter(self, name: str) -> None:
        """Forget an adapter; refused while requests use it."""
        if name not in self.store:
            raise UnknownAdapterError(f"adapter {name!r} is not registered")
        if self.memory.is_in_use(name) or any(
            r.seq.adapter == name for r in self.requests.values()
        ):
            raise InvalidRequestError(f"adapter {name!r} has requests in flight; unload it later")
        self.memory.evict_if_idle(name)
        self.store.unregister(name)

    # -- requests --------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        params: SamplingParams,
        adapter: str | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> None:
        """Queue a request; raises InvalidRequestError / UnknownAdapterError if it cannot run."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if adapter is not None and adapter not in self.store:
            raise UnknownAdapterError(f"adapter {adapter!r} is not registered")
        if prompt_token_ids is None:
            if prompt is None:
                raise InvalidRequestError("a request needs a prompt or prompt_token_ids", "prompt")
            prompt_token_ids = self.tokenizer.encode(prompt)
        max_tokens = self._check_lengths(prompt_token_ids, params, adapter)
        self._check_stop_token_ids(params)
        if max_tokens != params.max_tokens:
            params = _with_max_tokens(params, max_tokens)
        seq = SequenceState(
            request_id=request_id, adapter=adapter, token_ids=list(prompt_token_ids)
        )
        generator = None if params.seed is None else make_generator(params.seed, self.info.device)
        detokenizer = IncrementalDetokenizer.from_params(self.tokenizer, prompt_token_ids, params)
        self.requests[request_id] = RequestState(
            request_id, prompt, list(prompt_token_ids), params, seq, detokenizer, generator
        )
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now; its pages go back to the pool. False if it was not running."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return False
        self.scheduler.abort(request_id)
        return True

    def fail_request(self, request_id: str, message: str) -> RequestOutput | None:
        """End one request with an error (its pages go back to the pool); the engine and
        every other request go on. Returns its last output, finished with
        `finish_reason` `error` and `error` = message; None if it was not running."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        self.scheduler.abort(request_id)
        completion = state.completion
        completion.finish_reason, completion.error = "error", message
        completion.new_text, completion.new_token_ids = "", []
        return RequestOutput(
            request_id,
            state.prompt,
            state.prompt_token_ids,
            state.seq.adapter,
            [completion],
            finished=True,
        )

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- the step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one forward pass over the scheduled chunks; outputs of requests that advanced."""
        scheduled = self.scheduler.schedule()
        if not scheduled.chunks:
            return []
        self.memory.prepare()
        chunks = order_by_adapter(scheduled.chunks, self.memory)
        batch = build_batch(chunks, self.memory, self.info.device)
        logits = self.model.forward(batch, self.memory.kv_pages)  # [num_sampling_chunks, vocab]
        sampling = [self.requests[chunk.seq.request_id] for chunk in chunks if chunk.samples]
        result = sample(
            logits,
            [state.params for state in sampling],
            sampling,
            [state.generator for state in sampling],
            self.info.eos_token_ids,
        )
        self.num_preemptions += len(scheduled.preempted)
        failed = [
            self.fail_request(state.request_id, f"sampling failed: {failure}")
            for state, failure in zip(sampling, result.failures, strict=True)
            if failure is not None
        ]
        sampled = [
            (state, token, logprobs)
            for state, token, logprobs, failure in zip(
                sampling, result.token_ids, result.logprobs, result.failures, strict=True
            )
            if failure is None
        ]
        tokens = {state.request_id: token for state, token, _ in sampled}
        self.scheduler.update_after_step(scheduled, tokens)
        outputs = [self._record_or_fail(*row) for row in sampled]
        return [output for output in failed + outputs if output is not None]

    def _record_or_fail(
        self, state: RequestState, token: int, logprobs: TokenLogprobs | None
    ) -> RequestOutput | None:
        """`_record_token`, but an error there (the detokenizer, a stop check) ends this
        request alone."""
        try:
            return self._record_token(state, token, logprobs)
        except Exception as error:
            logger.exception("request %s failed after a step", state.request_id)
            # It may be finished already; failing it anyway is what ends its stream.
            self.requests.setdefault(state.request_id, state)
            return self.fail_request(state.request_id, f"internal error: {error!r}")

    def _record_token(
        self, state: RequestState, token: int, logprobs: TokenLogprobs | None
    ) -> RequestOutput:
        """Record a sampled token, its text and logprobs; finish the request if it stops."""
        completion = state.completion
        completion.token_ids.append(token)
        completion.new_token_ids = [token]
        if logprobs is not None:
            completion.logprobs = [*(completion.logprobs or []), logprobs]
        completion.new_text = state.detokenizer.add_token(token)
        reason = self._stop_reason(state, token)
        if state.detokenizer.stopped:
            reason, completion.stop_reason = "stop", state.detokenizer.stop_reason
        elif reason is not None:
            completion.new_text += state.detokenizer.flush()
        completion.text += completion.new_text
        if reason is not None:
            completion.finish_reason = reason
            status = FINISHED[reason]
            self.scheduler.finish(state.request_id, status)
            del self.requests[state.request_id]
        return RequestOutput(
            state.request_id,
            state.prompt,
            state.prompt_token_ids,
            state.seq.adapter,
            [completion],
            finished=reason is not None,
        )

    # -- helpers ---------------------------------------------------------------------------

    def _stop_ids_of(self, params: SamplingParams) -> set[int]:
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids.update(self.info.eos_token_ids)
        return ids

    def _stop_reason(self, state: RequestState, token: int) -> str | None:
        """`stop` for EOS / stop tokens, `length` at max_tokens or the context limit."""
        num_outputs = len(state.seq.output_token_ids)
        if num_outputs > state.params.min_tokens and token in self._stop_ids_of(state.params):
            state.completion.stop_reason = None if token in self.info.eos_token_ids else token
            return "stop"
        if num_outputs >= (state.params.max_tokens or 0):
            return "length"
        if state.seq.num_tokens >= self.info.max_model_len:
            return "length"
        return None

    def _check_stop_token_ids(self, params: SamplingParams) -> None:
        """Within the vocabulary, and leaving a token to sample before `min_tokens`."""
        vocab = self.arch.vocab_size
        if any(not token_id < vocab for token_id in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be in [0, {vocab})", "stop_token_ids")
        if params.min_tokens and len(self._stop_ids_of(params)) >= vocab:
            raise InvalidRequestError(
                "stop_token_ids (with EOS) cover the whole vocabulary: with min_tokens, no "
                "token could ever be generated",
                "stop_token_ids",
            )

    def _check_lengths(self, prompt: list[int], params: SamplingParams, adapter: str | None) -> int:
        """Validate the prompt against the context and the pool; returns max_tokens."""
        limit, vocab = self.info.max_model_len, self.arch.vocab_size
        if not prompt:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if len(prompt) >= limit:  # before looking at each token: the list may be huge
            raise InvalidRequestError(
                f"the prompt has {len(prompt)} tokens; this model's maximum context length is "
                f"{limit} tokens, prompt and output together",
                "prompt",
            )
        if any(not 0 <= token < vocab for token in prompt):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - len(prompt)
        if len(prompt) + max_tokens > limit:
            raise InvalidRequestError(
                f"this model's maximum context length is {limit} tokens; you asked for "
                f"{len(prompt) + max_tokens} ({len(prompt)} in the prompt, {max_tokens} to generate)",
                "max_tokens",
            )
        pages = math.ceil((len(prompt) + max_tokens) / self.geometry.block_size)
        if adapter is not None:
            pages += self.store.get(adapter).num_pages
        if pages > self.info.num_pages:
            raise InvalidRequestError(
                f"the request needs {pages} pages of the pool at most, which has only "
                f"{self.info.num_pages}; send a shorter prompt or fewer max_tokens",
                "max_tokens",
            )
        return max_tokens

    def _num_pages(self, device: torch.device, dtype: torch.dtype) -> int:
        """Pages in the pool: as configured, or what memory allows."""
        cache = self.config.cache
        page_bytes = self.geometry.page_numel * torch.empty((), dtype=dtype).element_size()
        if cache.pool_pages is not None:
            return cache.pool_pages
        if cache.pool_memory_gib is not None or device.type != "cuda":
            gib = cache.pool_memory_gib or CPU_DEFAULT_POOL_GIB
            return max(2, int(gib * 2**30) // page_bytes)
        free, total = torch.cuda.mem_get_info(device)
        budget = total * cache.gpu_memory_utilization - (total - free)
        budget -= self._activation_reserve_bytes()
        if budget < 2 * page_bytes:
            raise ValueError(
                f"gpu_memory_utilization={cache.gpu_memory_utilization} leaves no room for the pool "
                f"after the weights ({(total - free) / 2**30:.1f} GiB used of {total / 2**30:.1f})"
            )
        return int(budget // page_bytes)

    def _activation_reserve_bytes(self) -> int:
        """A generous bound on one step's activations (float32 logits included)."""
        arch, tokens = self.arch, self.config.scheduler.max_num_batched_tokens
        per_token = 4 * (6 * arch.hidden_size + 4 * arch.intermediate_size + arch.vocab_size)
        return tokens * per_token + 512 * 2**20


def max_model_len(arch: ModelArch, requested: int | None) -> int:
    """The context limit: as asked, within the model's positions and sliding window."""
    limit = arch.max_position_embeddings
    if arch.sliding_window is not None:
        # Beyond the window, attention would differ from the model's; loraserve
        # does not implement the window, so it does not let contexts grow past it.
        limit = min(limit, arch.sliding_window)
    if requested is not None and requested > limit:
        raise ValueError(f"max_model_len={requested} is above the model's limit of {limit} tokens")
    return requested or limit


def _with_max_tokens(params: SamplingParams, max_tokens: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, max_tokens=max_tokens)
