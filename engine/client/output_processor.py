"""The front end's side of the engine's outputs: `n` fan-out, detokenizing, stop strings.

Shared by `LLM` (in-process) and the server's front-end process. A request with
`n` completions runs in the engine core as `n` requests, `{request_id}-{index}`
(the one id scheme of both), seeded apart (`per_completion`). The core reports token
deltas (`EngineOutput`); this turns each into a `CompletionDelta` of text, and
ends a completion when one of its stop strings appears: the core, which knows
nothing of text, is then told to abort it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import msgspec

from loraserve.engine.client.detokenizer import IncrementalDetokenizer, TokenDecoder
from loraserve.engine.core.outputs import CompletionDelta, EngineOutput
from loraserve.engine.core.request import EngineRequest
from loraserve.engine.core.sampling_params import per_completion

logger = logging.getLogger(__name__)


def sub_request_ids(request_id: str, n: int) -> list[str]:
    """The engine-core ids of a request's `n` completions."""
    return [f"{request_id}-{index}" for index in range(n)]


@dataclass
class _Completion:
    request_id: str
    index: int
    detokenizer: IncrementalDetokenizer
    num_tokens: int = 0


class OutputProcessor:
    """Text deltas of every running completion."""

    def __init__(self, tokenizer: TokenDecoder, abort: Callable[[list[str]], None]) -> None:
        """`abort(engine-core ids)`: tell the core to stop completions this side ended (a stop
        string, a failure), which the core cannot know of."""
        self.tokenizer = tokenizer
        self.abort = abort
        self._completions: dict[str, _Completion] = {}  # engine-core id -> its state

    def add_request(self, request: EngineRequest) -> list[EngineRequest]:
        """Fan a request out into its completions: the engine-core record of each (its own
        id and params, the rest of `request` shared)."""
        request_id, prompt = request.request_id, request.prompt_token_ids
        ids = sub_request_ids(request_id, request.params.n)
        subs = [
            msgspec.structs.replace(request, request_id=sub_id, params=params)
            for sub_id, params in zip(ids, per_completion(request.params), strict=True)
        ]
        for index, sub in enumerate(subs):
            detokenizer = IncrementalDetokenizer.from_params(self.tokenizer, prompt, sub.params)
            self._completions[sub.request_id] = _Completion(request_id, index, detokenizer)
        return subs

    def forget(self, sub_ids: Iterable[str]) -> None:
        """Drop completions (aborted, or refused by the core)."""
        for sub_id in sub_ids:
            self._completions.pop(sub_id, None)

    def process(self, outputs: Iterable[EngineOutput]) -> list[tuple[str, CompletionDelta]]:
        """(request id, delta of one of its completions) of a step's outputs, in the order the
        core reported them; outputs of forgotten completions are skipped (a completion the
        front end ended may still advance one step in the core). Completions ended here
        are aborted in the core through `abort`."""
        deltas, aborts = [], []
        for output in outputs:
            completion = self._completions.get(output.request_id)
            if completion is None:
                continue
            try:
                delta = self._delta(completion, output)
            except Exception as error:  # this completion's text broke down: it fails alone
                logger.exception("request %s failed while detokenizing", output.request_id)
                delta = _failed(completion, f"internal error: {error!r}")
            if delta.finished:
                del self._completions[output.request_id]
                if output.finish_reason is None:  # a stop string or a failure: tell the core
                    aborts.append(output.request_id)
            deltas.append((completion.request_id, delta))
        if aborts:
            self.abort(aborts)
        return deltas

    def _delta(self, completion: _Completion, output: EngineOutput) -> CompletionDelta:
        detokenizer = completion.detokenizer
        text, token_ids = "", []
        shown = output.new_token_ids
        if output.stopped_on_token and not detokenizer.include_stop_str_in_output:
            shown = shown[:-1]  # the stop token's text is not output (vLLM's rule)
        for token in output.new_token_ids:
            token_ids.append(token)
            if len(token_ids) > len(shown):
                break
            text += detokenizer.add_token(token)
            if detokenizer.stopped:
                break
        finish_reason, stop_reason = output.finish_reason, output.stop_reason
        if detokenizer.stopped:
            finish_reason, stop_reason = "stop", detokenizer.stop_reason
        elif finish_reason is not None:
            text += detokenizer.flush()
        logprobs = output.new_logprobs
        if logprobs is not None:
            logprobs = logprobs[: len(token_ids)]
        completion.num_tokens += len(token_ids)
        return CompletionDelta(
            index=completion.index,
            new_text=text,
            new_token_ids=token_ids,
            new_logprobs=logprobs,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
            num_tokens=completion.num_tokens,
            error=output.error,
            prompt_logprobs=output.prompt_logprobs,
            queue_seconds=output.queue_seconds,
            prefill_seconds=output.prefill_seconds,
        )


def _failed(completion: _Completion, message: str) -> CompletionDelta:
    """The last delta of a completion that failed in the front end."""
    return CompletionDelta(
        index=completion.index,
        new_text="",
        new_token_ids=[],
        new_logprobs=None,
        finish_reason="error",
        stop_reason=None,
        num_tokens=completion.num_tokens,
        error=message,
    )
