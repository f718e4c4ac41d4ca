"""`LLM`: the offline Python API. Every prompt of one `generate` call, whatever its
adapter, runs through the same continuous-batching engine the server uses."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from loraserve.engine.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig
from loraserve.engine.engine import LLMEngine
from loraserve.engine.outputs import RequestOutput
from loraserve.engine.sampling_params import SamplingParams, per_completion
from loraserve.scheduler.config import SchedulerConfig

T = TypeVar("T")


def build_config(model: str, **options: Any) -> EngineConfig:
    """An EngineConfig from flat keyword options, each routed to the part that owns it."""
    parts: dict[str, Any] = {}
    for name, cls in (("cache", CacheConfig), ("lora", LoraConfig), ("scheduler", SchedulerConfig)):
        fields = {f.name for f in dataclasses.fields(cls)}
        parts[name] = cls(**{k: options.pop(k) for k in list(options) if k in fields})
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(options) - model_fields)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}")
    return EngineConfig(model=ModelConfig(model=model, **options), **parts)


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
        **options: Any,
    ) -> None:
        self.engine = LLMEngine(build_config(str(model), device=device, dtype=dtype, **options))
        for name, path in (adapters or {}).items():
            self.engine.register_adapter(name, path)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

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
            ids: list[list[int] | None] = [list(p) for p in prompt_token_ids]
        elif prompts is not None:
            texts = [prompts] if isinstance(prompts, str) else list(prompts)
            ids = [None] * len(texts)
        else:
            raise ValueError("generate needs prompts or prompt_token_ids")
        params = _per_prompt(sampling_params, len(texts), SamplingParams(), "sampling_params")
        adapters: list[str | None] = _per_prompt(adapter, len(texts), None, "adapter")  # type: ignore[arg-type]
        request_ids = self._add_all(texts, ids, params, adapters)
        return self._run(request_ids)

    def _add_all(self, texts, ids, params, adapters) -> list[list[str]]:
        """Queue every prompt (n sub-requests each); on a bad one, withdraw all and raise."""
        request_ids: list[list[str]] = []
        try:
            for text, prompt_ids, param, name in zip(texts, ids, params, adapters, strict=True):
                base = str(next(self._ids))
                subs = [f"{base}-{i}" for i in range(param.n)]
                for sub, sub_params in zip(subs, per_completion(param), strict=True):
                    self.engine.add_request(sub, text, sub_params, name, prompt_ids)
                request_ids.append(subs)
        except Exception:
            for sub in itertools.chain.from_iterable(request_ids):
                self.engine.abort_request(sub)
            raise
        return request_ids

    def _run(self, request_ids: list[list[str]]) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
        results = []
        for subs in request_ids:
            first = finished[subs[0]]
            completions = [finished[sub].outputs[0] for sub in subs]
            for index, completion in enumerate(completions):
                completion.index = index
            results.append(
                RequestOutput(
                    subs[0].rsplit("-", 1)[0],
                    first.prompt,
                    first.prompt_token_ids,
                    first.adapter,
                    completions,
                    True,
                )
            )
        return results
