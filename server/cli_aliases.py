"""vLLM's spellings of loraserve's options, so that vLLM command lines start loraserve.

    --enable-lora                 accepted (LoRA is always on)
    --lora-modules NAME=DIR ...   (or vLLM's JSON form '{"name": ..., "path": ...}') = --adapter
    --max-loras N                 = --max-resident-adapters
    --[no-]enable-prefix-caching  = --[no-]prefix-caching
    --disable-log-requests, --disable-log-stats, --enable-log-requests
                                  accepted (loraserve logs no line per request; its stats
                                  are at /metrics)
    --quantization/-q METHOD      refused, saying what is served (unquantized checkpoints)
    VLLM_API_KEY (environment)    = --api-key, when --api-key is not given
(`serve MODEL`, `--max-cpu-loras`, `--max-lora-rank`, `--served-model-name NAME...`, `--api-key`,
`--uvicorn-log-level`, `--chat-template`, `--tool-call-parser`, `--enable-auto-tool-choice` and
`--allowed-origins` are loraserve's own spellings too.)
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

ALIASES_TITLE = "vLLM's spellings (accepted for vLLM command lines)"


def add_vllm_aliases(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(ALIASES_TITLE)
    group.add_argument(
        "--enable-lora",
        action="store_true",
        default=argparse.SUPPRESS,
        help="Accepted; LoRA is always on.",
    )
    group.add_argument(
        "--lora-modules",
        nargs="+",
        action="extend",
        default=argparse.SUPPRESS,
        metavar="NAME=DIR",
        help="Same as --adapter NAME=DIR (several at once; also vLLM's JSON form).",
    )
    group.add_argument(
        "--max-loras", type=int, default=argparse.SUPPRESS, help="Same as --max-resident-adapters."
    )
    group.add_argument(
        "--enable-prefix-caching",
        dest="enable_prefix_caching",
        action=argparse.BooleanOptionalAction,
        default=argparse.SUPPRESS,
        help="Same as --prefix-caching / --no-prefix-caching.",
    )

    for flag in ("--disable-log-requests", "--disable-log-stats", "--enable-log-requests"):
        group.add_argument(
            flag,
            dest="log_switches",
            action="append_const",
            const=flag,
            default=argparse.SUPPRESS,
            help="Accepted; loraserve logs no line per request, and its stats are at /metrics.",
        )
    group.add_argument(
        "--quantization",
        "-q",
        default=argparse.SUPPRESS,
        metavar="METHOD",
        help="Refused: loraserve serves unquantized checkpoints (float32, float16, bfloat16).",
    )


def apply_vllm_aliases(args: dict[str, Any]) -> None:
    """Turn parsed aliases into loraserve's options, in place; ValueError on a conflict."""
    args.pop("enable_lora", None)
    args.pop("log_switches", None)
    quantization = args.pop("quantization", None)
    if quantization is not None and quantization.lower() != "none":
        raise ValueError(
            f"--quantization {quantization}: quantized models are not supported; loraserve "
            "serves unquantized safetensors checkpoints in float32, float16 or bfloat16 "
            "(--dtype), with LoRA adapters in the same dtype"
        )
    if "api_key" not in args and os.environ.get("VLLM_API_KEY"):
        args["api_key"] = os.environ["VLLM_API_KEY"]
    modules = args.pop("lora_modules", None)
    if modules:
        args["adapters"] = [*args.get("adapters", []), *(_module(spec) for spec in modules)]
    max_loras = args.pop("max_loras", None)
    if max_loras is not None:
        if "max_resident_adapters" in args:
            raise ValueError("give --max-loras or --max-resident-adapters, not both")
        args["max_resident_adapters"] = max_loras


def _module(spec: str) -> str:
    """NAME=DIR from either of vLLM's forms."""
    if spec.lstrip().startswith("{"):
        try:
            entry = json.loads(spec)
            return f"{entry['name']}={entry['path']}"
        except (ValueError, KeyError, TypeError):
            raise ValueError(
                f'--lora-modules expects NAME=DIR or {{"name": ..., "path": ...}}, got {spec!r}'
            ) from None
    return spec
