"""The PEFT baseline of the S-LoRA paper: a trace through transformers + peft, one process.

Served the way the paper serves it, which is the way Hugging Face PEFT allows:
one adapter is active at a time. When the model is free, the oldest waiting
request picks the adapter (FCFS); the waiting requests of that adapter, up to
`max_batch_size`, run together as one padded batch to the end of the longest;
then the next adapter. Requests that arrive meanwhile wait for the next batch
(no continuous batching). Every adapter is loaded into the PeftModel up front,
so a switch is `set_adapter` and costs nothing: a generous baseline, which only
makes the comparison harder for loraserve.

Times are taken as replay.py takes them for a server: TTFT from the request's
scheduled arrival to its first token, so time spent queued counts.

    python -m bench.peft_baseline --trace trace.jsonl --model DIR --adapter-dir DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import torch

from .metrics import RequestRecord, run_metadata, summarize
from .trace import TraceRequest, read_trace


class PeftBaseline:
    """transformers' model with every adapter loaded into one PeftModel."""

    def __init__(
        self,
        model_folder: Path,
        adapters: dict[str, Path],
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch_size: int = 32,
    ) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        base = AutoModelForCausalLM.from_pretrained(str(model_folder), dtype=dtype)
        base = base.to(self.device).eval()  # type: ignore[arg-type]
        if not adapters:
            self.model = base
            return
        names = list(adapters)
        self.model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(str(adapters[name]), adapter_name=name)
        self.model.eval()

    def run(self, requests: list[TraceRequest]) -> tuple[list[RequestRecord], float]:
        """Serve `requests` in real time (each arrives at its `arrival_s`); (records, duration)."""
        records = [RequestRecord(r.index, r.adapter, r.arrival_s) for r in requests]
        arrivals = deque(
            sorted(zip(requests, records, strict=True), key=lambda pair: pair[0].arrival_s)
        )
        waiting: list[tuple[TraceRequest, RequestRecord]] = []
        start = time.perf_counter()
        clock = lambda: time.perf_counter() - start  # noqa: E731
        while arrivals or waiting:
            while arrivals and arrivals[0][0].arrival_s <= clock():
                waiting.append(arrivals.popleft())
            if not waiting:
                time.sleep(max(0.0, arrivals[0][0].arrival_s - clock()))
                continue
            adapter = waiting[0][0].adapter  # FCFS: the oldest request picks the adapter
            batch = [pair for pair in waiting if pair[0].adapter == adapter]
            batch = batch[: self.max_batch_size]
            chosen = {id(record) for _, record in batch}
            waiting = [pair for pair in waiting if id(pair[1]) not in chosen]
            for _, record in batch:
                record.sent_s = clock()
            with self._active(adapter):
                self._generate(batch, clock)
        return records, clock()

    @contextlib.contextmanager
    def _active(self, adapter: str | None) -> Iterator[None]:
        if adapter is None:
            disable = getattr(self.model, "disable_adapter", None)
            with disable() if disable else contextlib.nullcontext():
                yield
        else:
            self.model.set_adapter(adapter)
            yield

    @torch.inference_mode()
    def _generate(self, batch: list[tuple[TraceRequest, RequestRecord]], clock) -> None:
        """Greedy decoding of one left-padded batch with the KV cache, as `generate` does,
        but timing each request's first and last token."""
        prompts = [request.prompt_token_ids for request, _ in batch]
        longest = max(len(prompt) for prompt in prompts)
        input_ids = torch.zeros(len(batch), longest, dtype=torch.long)  # [batch, longest]
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, longest - len(prompt) :] = torch.tensor(prompt)
            mask[row, longest - len(prompt) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        past = None
        lengths = [request.output_len for request, _ in batch]
        for step in range(max(lengths)):
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
            input_ids = out.logits[:, -1].argmax(-1, keepdim=True)  # [batch, 1]
            if self.device.type == "cuda":
                torch.cuda.synchronize()  # the token exists now, as a streamed one would
            now = clock()
            for (_, record), length in zip(batch, lengths, strict=True):
                if step == 0:
                    record.first_token_s = now
                if step < length:
                    record.output_tokens += 1
                if step == length - 1:
                    record.finish_s = now
            mask = torch.cat([mask, mask.new_ones(len(batch), 1)], dim=1)
            positions = positions[:, -1:] + 1


def adapters_under(folder: Path) -> dict[str, Path]:
    """{folder name: folder} for every PEFT adapter folder directly under `folder`."""
    return {
        path.name: path
        for path in sorted(folder.iterdir())
        if (path / "adapter_config.json").is_file()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--adapter-dir", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--slo-ttft", type=float, default=6.0)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    _, requests = read_trace(args.trace)
    adapters = adapters_under(args.adapter_dir) if args.adapter_dir else {}
    baseline = PeftBaseline(
        args.model, adapters, args.device, getattr(torch, args.dtype), args.max_batch_size
    )
    records, duration = baseline.run(requests)
    summary = summarize(records, duration, args.slo_ttft)
    print(json.dumps(summary, indent=2))
    if args.output:
        result = {**run_metadata(), "system": "peft", "summary": summary}
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
