"""`LLM`: the offline Python API. Every prompt of one `generate` call, whatever its
adapter, runs through the same continuous-batching engine the server uses."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from loraserve.engine.client.adapter_names import AdapterNames, adapters_read_at_start
from loraserve.engine.client.output_processor import OutputProcessor, sub_request_ids
from loraserve.engine.core.config import build_config
from loraserve.engine.core.core import EngineCore
from loraserve.engine.core.outputs import CompletionOutput, RequestOutput
from loraserve.engine.core.request import EngineRequest
from loraserve.engine.core.sampling_params import SamplingParams
from loraserve.models.tokenizer import Tokenizer

T = TypeVar("T")
OFFLINE_MAX_WAITING_REQUESTS = 2**62


def _per_prompt(value: T | Sequence[T] | None, count: int, default: T, name: str) -> list[T]:
    if value is None:
        return [default] * count
    if isinstance(value, list | tuple):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries for {count} prompts")
        return list(value)
    return [value] * count  # type: ignore[list-item]


class LLM:
    """A base model and its adapters, for batch generation in one process."""

    def __init__(
        self,
        model: str | Path,
        adapters: dict[str, str | Path] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        adapter_dir: str | Path | None = None,
        pinned_adapters: Sequence[str] = (),
        **options: Any,
    ) -> None:
        """`adapters` (name -> PEFT folder) are read now; the folders under `adapter_dir`
        are listed, each read when a prompt first names it (within the host-RAM budget of
        `max_cpu_loras` / `max_cpu_lora_memory_gib`). `pinned_adapters` stay in the pool."""
        # Every prompt of a `generate` call is queued at once: no waiting-queue limit offline.
        options.setdefault("max_waiting_requests", OFFLINE_MAX_WAITING_REQUESTS)
        self.engine = EngineCore(build_config(str(model), device=device, dtype=dtype, **options))
        self.names = AdapterNames(adapter_dir)
        """The adapter dir's folders (the engine's catalog holds those registered)."""
        at_start = adapters_read_at_start(adapters or {}, pinned_adapters, self.names.listed())
        for name, (path, pinned) in at_start.items():
            self.engine.register_adapter(name, path, pinned=pinned)
        self.tokenizer = Tokenizer.from_folder(model)
        self._processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapter: str | Sequence[str | None] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text, or token ids), all batched together.

        `sampling_params` and `adapter` are one for all prompts or one per prompt;
        adapter None is the base model. Returns outputs in prompt order."""
        if prompt_token_ids is not None:
            texts: list[str | None] = [None] * len(prompt_token_ids)
            ids = [list(p) for p in prompt_token_ids]
        elif prompts is not None:
            texts = [prompts] if isinstance(prompts, str) else list(prompts)
            ids = [self.tokenizer.encode(text) for text in texts]  # type: ignore[arg-type]
        else:
            raise ValueError("generate needs prompts or prompt_token_ids")
        params = _per_prompt(sampling_params, len(texts), SamplingParams(), "sampling_params")
        adapters: list[str | None] = _per_prompt(adapter, len(texts), None, "adapter")  # type: ignore[arg-type]
        results = [
            RequestOutput(str(next(self._ids)), text, prompt, name, [])
            for text, prompt, name in zip(texts, ids, adapters, strict=True)
        ]
        self._add_all(results, params)
        return self._run(results)

    def _add_all(self, results: list[RequestOutput], params: list[SamplingParams]) -> None:
        """Queue every prompt's completions; on a refused one, withdraw all and raise."""
        added: list[EngineRequest] = []
        try:
            for result, param in zip(results, params, strict=True):
                folder = None if result.adapter is None else self.names.folder(result.adapter)
                request = EngineRequest(
                    result.request_id,
                    result.prompt_token_ids,
                    param,
                    result.adapter,
                    None if folder is None else str(folder),
                )
                subs = self._processor.add_request(request)
                result.outputs = [CompletionOutput(index) for index in range(len(subs))]
                self.engine.add_requests(subs)  # all or none
                added += subs
        except Exception:
            for result in results:
                self._processor.forget(sub_request_ids(result.request_id, len(result.outputs)))
            for sub in added:
                self.engine.abort_request(sub.request_id)
            raise

    def _run(self, results: list[RequestOutput]) -> list[RequestOutput]:
        """The core process's loop, in this process: step (or wait, as the core hints)
        until every request has finished."""
        by_id = {result.request_id: result for result in results}
        while self.engine.has_unfinished_requests():
            outputs = self.engine.step_or_wait(self.engine.wait_for_adapter_reads)
            processed = self._processor.process(outputs)
            for sub_id in processed.aborts:
                self.engine.abort_request(sub_id)
            for request_id, delta in processed.deltas:
                by_id[request_id].outputs[delta.index].add(delta)
        return results
