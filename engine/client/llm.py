"""`LLM`: the offline Python API. Every prompt of one `generate` call, whatever its
adapter, runs through the same continuous-batching engine the server uses, spoken to with
the server's messages: `InprocClient` hands them to the same `CoreService` in this process."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from loraserve.engine.client.adapter_names import AdapterNames, adapters_read_at_start
from loraserve.engine.client.inproc_client import InprocClient
from loraserve.engine.client.output_processor import OutputProcessor, sub_request_ids
from loraserve.engine.core import ipc
from loraserve.engine.core.config import build_config
from loraserve.engine.core.outputs import CompletionOutput, RequestOutput
from loraserve.engine.core.request import EngineRequest
from loraserve.engine.core.sampling_params import SamplingParams
from loraserve.models.tokenizer import Tokenizer

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - a dependency of ours, but only for the progress bar
    tqdm = None

if TYPE_CHECKING:
    from loraserve.engine.core.core import EngineCore

T = TypeVar("T")
OFFLINE_MAX_WAITING_REQUESTS = 2**62
Prompt = str | Mapping[str, Any]
"""Text, or vLLM's prompt dicts: {"prompt": text} or {"prompt_token_ids": ids}."""
Message = Mapping[str, Any]


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's way to name an adapter per prompt (`vllm.lora.request.LoRARequest`): the name
    it is served under and its PEFT folder, read on first use. `lora_int_id` is accepted
    for vLLM's signature; names are what identify adapters here."""

    lora_name: str
    lora_int_id: int = 0
    lora_path: str = ""


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
        config = build_config(str(model), device=device, dtype=dtype, **options)
        self.names = AdapterNames(adapter_dir)
        """The adapter dir's folders (the engine's catalog holds those registered)."""
        at_start = adapters_read_at_start(adapters or {}, pinned_adapters, self.names.listed())
        self.client = InprocClient(config, at_start, self._on_message)
        self.tokenizer = Tokenizer.from_folder(model)
        self._processor = OutputProcessor(
            self.tokenizer, lambda sub_ids: self.client.send(ipc.Abort(sub_ids))
        )
        self._ids = itertools.count()
        self._results: dict[str, RequestOutput] = {}
        """The running `generate` call's outputs, by request id."""
        self._refusal: Exception | None = None
        """The first error the core answered one of them with."""
        self._progress: Any = None

    @property
    def engine(self) -> EngineCore:
        """The engine core (this process's): its pool, catalog and counters."""
        return self.client.core

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapter: str | Sequence[str | None] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        *,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text, vLLM's prompt dicts, or `prompt_token_ids`), all
        batched together.

        `sampling_params` and `adapter` (or vLLM's `lora_request`) are one for all prompts
        or one per prompt; adapter None is the base model. Returns outputs in prompt order.
        A prompt the engine refuses (or whose adapter's folder cannot be read) raises its
        error, and none of the others runs on. `use_tqdm`: a progress bar on a terminal."""
        pairs = [self._prompt(prompt) for prompt in _listed(prompts, prompt_token_ids)]
        params = _per_prompt(sampling_params, len(pairs), SamplingParams(), "sampling_params")
        adapters, folders = _adapters_of(adapter, lora_request, len(pairs))
        results = [
            RequestOutput(str(next(self._ids)), text, token_ids, name, [])
            for (text, token_ids), name in zip(pairs, adapters, strict=True)
        ]
        self._run(results, params, folders, use_tqdm)
        return results

    def _run(
        self,
        results: list[RequestOutput],
        params: list[SamplingParams],
        folders: list[str | None],
        use_tqdm: bool,
    ) -> None:
        """Send every prompt, then turn the core's loop until all have finished (or one
        was refused: then all are withdrawn and its error raised)."""
        self._results, self._refusal = {result.request_id: result for result in results}, None
        self._progress = _progress_bar(len(results), use_tqdm)
        try:
            for result, param, folder in zip(results, params, folders, strict=True):
                self._add(result, param, folder)
            while self._refusal is None and self.client.has_unfinished_requests():
                self.client.run_turn()
            if self._refusal is not None:
                raise self._refusal
        except BaseException:
            self._withdraw()
            raise
        finally:
            self._results = {}
            if self._progress is not None:
                self._progress.close()

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapter: str | Sequence[str | None] | None = None,
        *,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        """`generate` for one conversation (a list of messages) or several, each rendered
        with the model's chat template (or `chat_template`, a Jinja source), as vLLM's
        `LLM.chat` and the server's /v1/chat/completions render it."""
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else messages
        token_ids = [
            self.tokenizer.encode(
                self.tokenizer.apply_chat_template(
                    [dict(m) for m in conversation],  # type: ignore[union-attr,arg-type]
                    add_generation_prompt,
                    tools,
                    template=chat_template,
                ),
                add_special_tokens=False,  # the template writes BOS
            )
            for conversation in conversations
        ]
        return self.generate(
            None,
            sampling_params,
            adapter,
            token_ids,
            lora_request=lora_request,
            use_tqdm=use_tqdm,
        )

    def _prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """(text, token ids) of one prompt."""
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), [int(token) for token in prompt["prompt_token_ids"]]
        if isinstance(prompt.get("prompt"), str):
            return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        raise ValueError(f"a prompt is text, or a dict with prompt or prompt_token_ids: {prompt!r}")

    def _add(self, result: RequestOutput, params: SamplingParams, folder: str | None) -> None:
        """Send one prompt's completions as one `AddRequest` (the server's message)."""
        if folder is None and result.adapter is not None:
            listed = self.names.folder(result.adapter)
            folder = None if listed is None else str(listed)
        request = EngineRequest(
            result.request_id,
            result.prompt_token_ids,
            params,
            result.adapter,
            folder,
        )
        subs = self._processor.add_request(request)
        result.outputs = [CompletionOutput(index) for index in range(len(subs))]
        self.client.send(ipc.AddRequest(self.client.next_call_id(), subs))

    def _withdraw(self) -> None:
        """Abort every completion of the call (all or none: a refused prompt stops all)."""
        sub_ids = [
            sub_id
            for result in self._results.values()
            for sub_id in sub_request_ids(result.request_id, len(result.outputs))
        ]
        self._processor.forget(sub_ids)
        self.client.send(ipc.Abort(sub_ids))

    def _on_message(self, message: ipc.ToFrontEnd) -> None:
        """What the core says, as the server's `AsyncEngine` hears it."""
        if isinstance(message, ipc.CallResult):
            if message.error is not None and self._refusal is None:
                self._refusal = ipc.rebuild_error(*message.error)
        elif isinstance(message, ipc.Outputs):
            for request_id, delta in self._processor.process(message.outputs):
                result = self._results.get(request_id)
                if result is None:
                    continue
                result.outputs[delta.index].add(delta)
                if self._progress is not None and delta.finished and _all_finished(result):
                    self._progress.update(1)


def _listed(
    prompts: Prompt | Sequence[Prompt] | None, prompt_token_ids: Sequence[Sequence[int]] | None
) -> Sequence[Prompt]:
    if prompt_token_ids is not None:
        return [{"prompt_token_ids": list(ids)} for ids in prompt_token_ids]
    if prompts is None:
        raise ValueError("generate needs prompts or prompt_token_ids")
    return [prompts] if isinstance(prompts, str | Mapping) else prompts


def _adapters_of(
    adapter: str | Sequence[str | None] | None,
    lora_request: LoRARequest | Sequence[LoRARequest | None] | None,
    count: int,
) -> tuple[list[str | None], list[str | None]]:
    """Each prompt's adapter name and folder (None: the adapter dir's, or the registered)."""
    if lora_request is None:
        return _per_prompt(adapter, count, None, "adapter"), [None] * count  # type: ignore[arg-type]
    if adapter is not None:
        raise ValueError("give adapter or lora_request, not both")
    loras = _per_prompt(lora_request, count, None, "lora_request")
    names = [None if lora is None else lora.lora_name for lora in loras]
    return names, [None if lora is None else lora.lora_path or None for lora in loras]


def _all_finished(result: RequestOutput) -> bool:
    return all(output.finish_reason is not None for output in result.outputs)


def _progress_bar(total: int, wanted: bool) -> Any:
    """tqdm's bar over finished prompts, shown on a terminal only (None when not wanted)."""
    if not wanted or tqdm is None:
        return None
    return tqdm(total=total, desc="Processed prompts", unit="prompt", disable=None)
