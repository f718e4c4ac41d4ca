"""The routes vLLM users script against besides generation: a model card by id,
/tokenize and /detokenize (vLLM's bodies and answers), /version and /ping."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from loraserve.errors import InvalidRequestError
from loraserve.server.auth import Tenant
from loraserve.server.prompts import ChatRendering, Tokenizing
from loraserve.server.protocol import DetokenizeRequest, TokenizeRequest
from loraserve.server.responses import ModelCard
from loraserve.server.serving import Served, served_of, tenant_of, unavailable


def add_extra_routes(app: FastAPI) -> None:
    @app.get("/v1/models/{model_id:path}", response_model=None)
    async def model_card(model_id: str, request: Request) -> JSONResponse:
        """One model (the base model or an adapter), as OpenAI's `models.retrieve` reads it."""
        served = served_of(request)
        adapter = served.resolve_adapter(model_id, tenant_of(request))  # 404 if not theirs
        path = None if adapter is None else served.adapter_path(adapter)
        return JSONResponse(_card(served, model_id, path, tenant_of(request)).dump())

    @app.post("/tokenize", response_model=None)
    async def tokenize(body: TokenizeRequest, request: Request) -> JSONResponse:
        """A prompt's (or a conversation's) token ids, as the generation routes make them."""
        served = served_of(request)
        served.resolve_adapter(body.model, tenant_of(request))
        prompt = await _tokenize(served, body)
        answer: dict[str, Any] = {
            "count": len(prompt),
            "max_model_len": served.max_model_len,
            "tokens": prompt,
        }
        if body.return_token_strs:
            answer["token_strs"] = served.tokenizer.convert_ids_to_tokens(prompt)
        return JSONResponse(answer)

    @app.post("/detokenize", response_model=None)
    async def detokenize(body: DetokenizeRequest, request: Request) -> JSONResponse:
        served = served_of(request)
        served.resolve_adapter(body.model, tenant_of(request))
        vocab = served.tokenizer.vocab_size
        if any(token >= vocab for token in body.tokens):
            raise InvalidRequestError(f"tokens must be in [0, {vocab})", "tokens")
        return JSONResponse({"prompt": served.tokenizer.decode(body.tokens)})

    @app.get("/version")
    async def server_version() -> dict[str, str]:
        return {"version": _version()}

    @app.api_route("/ping", methods=["GET", "POST"], response_model=None)
    async def ping(request: Request) -> Response:
        """200 while the engine runs and the server is not draining (SageMaker's and
        vLLM's health route), else 503."""
        return Response(status_code=200 if unavailable(request) is None else 503)


async def _tokenize(served: Served, body: TokenizeRequest) -> list[int]:
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("send exactly one of prompt and messages", "prompt")
    if body.messages is not None:
        rendering = ChatRendering(add_generation_prompt=body.add_generation_prompt is not False)
        tokenizing = Tokenizing(add_special_tokens=bool(body.add_special_tokens))
        messages = [message.template_dict() for message in body.messages]
        prompt = await served.prompts.chat_prompt(messages, rendering, tokenizing)
    else:
        tokenizing = Tokenizing(add_special_tokens=body.add_special_tokens is not False)
        (prompt,) = await served.prompts.completion_prompts(str(body.prompt), tokenizing)
    return prompt.token_ids


def model_cards(served: Served, tenant: Tenant) -> list[ModelCard]:
    """The base model (each of its names) and the adapters this tenant may use (adapters name
    their parent, the base model's first name).
    Only admins see an adapter's folder (`root`): it tells a tenant about the server's disk."""
    cards = []
    if tenant.may_use(None):  # every name of the base model, as vLLM lists them
        cards = [_card(served, name, None, tenant) for name in served.base_model_names]
    for name, path in sorted(served.engine.adapters.items()):
        if tenant.may_use(name):
            cards.append(_card(served, name, path, tenant))
    return cards


def _card(served: Served, name: str, path: Path | None, tenant: Tenant) -> ModelCard:
    """The base model's card (`path` None) or an adapter's."""
    if path is None:
        return ModelCard(id=name, max_model_len=served.max_model_len)
    return ModelCard(
        id=name,
        root=str(path) if tenant.admin else None,
        parent=served.base_model,
        max_model_len=served.max_model_len,
    )


def _version() -> str:
    try:
        return version("loraserve")
    except PackageNotFoundError:
        return "unknown"
