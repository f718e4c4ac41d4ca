"""The FastAPI app: OpenAI-compatible routes over an `AsyncEngine`.

Routes are thin: they check who is calling and what was sent, then hand over to
the engine (completions.py, chat.py) or answer from its state (routes_extra.py: a model
by id, /tokenize, /detokenize, /version, /ping). The engine thread starts and stops with
the app (its lifespan). /docs and /redoc show the OpenAPI schema; CORS headers are sent
only for the origins `--allowed-origins` names.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from loraserve.engine.client.async_engine import AsyncEngine
from loraserve.server.auth import MetricsAccess, Tenant, Tenants, read_metrics_key
from loraserve.server.chat import create_chat_completion
from loraserve.server.completions import create_completion
from loraserve.server.config import ServerConfig
from loraserve.server.errors import APIError, install_error_handlers
from loraserve.server.lifecycle import Drain, DrainMiddleware
from loraserve.server.limits import RequestLimits
from loraserve.server.metrics import ServerMetrics, StaticInfo
from loraserve.server.middleware import AuthMiddleware, BodyLimitMiddleware, JsonBodyMiddleware
from loraserve.server.openapi import openapi_schema
from loraserve.server.prompts import PromptBuilder
from loraserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
)
from loraserve.server.responses import ModelList
from loraserve.server.responses_api import add_compat_routes
from loraserve.server.routes_extra import add_extra_routes, model_cards
from loraserve.server.serving import Served, served_of, tenant_of, unavailable

logger = logging.getLogger(__name__)


def create_app(
    engine: AsyncEngine,
    config: ServerConfig,
    tenants: Tenants | None = None,
    limits: RequestLimits | None = None,
) -> FastAPI:
    """The server for `engine` (started here if it is not yet: the routes need what it
    loaded); without `tenants` every caller may do everything. ValueError (or a
    LoraserveError) if the configuration cannot be served."""
    engine.start()
    served = _served(engine, config, limits or RequestLimits())
    metrics_key = (
        None if config.metrics_key_file is None else read_metrics_key(config.metrics_key_file)
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if tenants is None:
            logger.warning(
                "no --api-keys file nor --api-key: the server is open; anyone who can reach it may use "
                "every adapter and load or unload adapters"
            )
        yield
        served.grammars.close()
        engine.shutdown()

    app = FastAPI(title="loraserve", lifespan=lifespan)
    app.state.served = served
    app.state.adapter_roots = tuple(Path(root).resolve() for root in config.adapter_roots())
    app.state.drain = Drain(config.drain_timeout_seconds)
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    # Added innermost first: the catch-all of install_error_handlers is outermost.
    app.add_middleware(JsonBodyMiddleware)
    app.add_middleware(
        AuthMiddleware,
        tenants=tenants,
        metrics=MetricsAccess(tenants, metrics_key),
        metrics_port=config.metrics_port,
    )
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.body_limit(served.max_model_len))
    app.add_middleware(DrainMiddleware, drain=app.state.drain)
    install_error_handlers(app)
    if config.allowed_origins:  # outermost: preflights are answered before anything else
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allowed_origins),
            allow_methods=list(config.allowed_methods or ("*",)),
            allow_headers=list(config.allowed_headers or ("*",)),
            allow_credentials=config.allow_credentials,
        )
    _add_routes(app)
    add_extra_routes(app)
    add_compat_routes(app)
    return app


def _served(engine: AsyncEngine, config: ServerConfig, limits: RequestLimits) -> Served:
    info, engine_config = engine.info, engine.config
    assert info is not None, "the engine is started"
    directory = engine.names.directory
    if config.adapter_dir is not None and (
        directory is None or directory.root != Path(config.adapter_dir)
    ):
        raise ValueError("--adapter-dir is the engine's: give it to AsyncEngine(adapter_dir=...)")
    static = StaticInfo(
        block_size=engine_config.cache.block_size,
        num_pages=info.num_pages,
        max_lora=engine_config.resident_adapter_slots,
        gpu_memory_utilization=engine_config.cache.gpu_memory_utilization,
        dtype=str(info.dtype).removeprefix("torch."),
        model_name=info.served_model_name,
        max_model_len=info.max_model_len,
    )
    prompts = PromptBuilder(engine.tokenizer, info.max_model_len, config.chat_template_source())
    return Served(
        engine,
        ServerMetrics(static),
        info.served_model_name,
        info.max_model_len,
        limits,
        prompts,
        config.tool_call_parser,
        config.trust_request_chat_template,
    )


def admin_of(request: Request) -> Tenant:
    tenant = tenant_of(request)
    if not tenant.admin:
        raise APIError(403, "this route needs an admin key", code="admin_required")
    return tenant


CallerTenant = Annotated[Tenant, Depends(tenant_of)]
AdminTenant = Annotated[Tenant, Depends(admin_of)]


def _add_routes(app: FastAPI) -> None:
    @app.post("/v1/completions", response_model=None)
    async def completions(
        body: CompletionRequest, request: Request, tenant: CallerTenant
    ) -> Response:
        return await create_completion(served_of(request), body, tenant, request)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, tenant: CallerTenant
    ) -> Response:
        return await create_chat_completion(served_of(request), body, tenant, request)

    @app.get("/v1/models", response_model=ModelList)
    async def models(request: Request, tenant: CallerTenant) -> JSONResponse:
        return JSONResponse(ModelList(data=model_cards(served_of(request), tenant)).dump())

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
    async def load_lora_adapter(body: LoadAdapterRequest, request: Request, _: AdminTenant) -> str:
        served = served_of(request)
        served.check_adapter_name(body.lora_name)
        path = adapter_path(body.lora_path, request.app.state.adapter_roots)
        try:
            await served.engine.register_adapter(body.lora_name, path, body.pinned)
        except OSError as error:  # a file the server may not read, say
            message = f"cannot read the adapter at lora_path: {error}"
            raise APIError(400, message, "lora_path", "invalid_adapter") from None
        logger.info("loaded adapter %s from %s", body.lora_name, path)
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
    async def unload_lora_adapter(
        body: UnloadAdapterRequest, request: Request, _: AdminTenant
    ) -> str:
        """New requests for the adapter are refused at once; requests in flight finish,
        and the adapter is forgotten when the last of them ends."""
        await served_of(request).engine.unregister_adapter(body.lora_name)
        logger.info("unloaded adapter %s", body.lora_name)
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        """200 while the engine runs and the server is not draining, else 503."""
        reason = unavailable(request)
        if reason is not None:
            raise reason
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(request: Request) -> Response:
        """Prometheus text exposition."""
        served = served_of(request)
        served.metrics.update(await served.engine.stats(), served.engine.is_healthy)
        return Response(served.metrics.render(), media_type="text/plain; version=0.0.4")


def adapter_path(requested: str, roots: tuple[Path, ...]) -> Path:
    """The folder to load, which must lie under an allowed root (403 otherwise).
    A relative path is taken under the first root; `~` is not expanded (the server's
    home is none of the caller's business); links are resolved before the check, so
    a symlink cannot lead outside. A path that cannot be resolved (a NUL byte, a name
    too long, a symlink loop) is a 400."""
    if not roots:
        raise APIError(
            403,
            "loading adapters at run time is off: start the server with --adapter-dir "
            "or --allowed-adapter-root",
            "lora_path",
            "adapter_loading_disabled",
        )
    path = Path(requested)
    try:
        resolved = (path if path.is_absolute() else roots[0] / path).resolve()
        is_folder = resolved.is_dir()
    except (OSError, RuntimeError, ValueError) as error:  # RuntimeError: a symlink loop
        raise APIError(
            400, f"lora_path cannot be resolved: {error}", "lora_path", "invalid_path"
        ) from None
    if not any(resolved.is_relative_to(root) for root in roots):
        raise APIError(
            403,
            f"lora_path {requested!r} is outside the folders adapters may be loaded from",
            "lora_path",
            "path_not_allowed",
        )
    if not is_folder:  # said only of paths inside the roots
        raise APIError(
            404, f"lora_path {requested!r} is not a folder", "lora_path", "adapter_not_found"
        )
    return resolved
