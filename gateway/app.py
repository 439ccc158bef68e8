"""The Litestar app factory: OpenAI-compatible routes, health/readiness, one OpenAI-shaped error handler."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import msgspec
from litestar import Litestar, MediaType, Request, Response, Router, get, post
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.response import Stream
from litestar.types import ASGIApp, Receive, Scope, Send

from backends.base import Backend
from config.schema import Config
from gateway.auth import KeyCheck
from gateway.errors import BadRequest, GatewayError, error_body
from gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    decode_object,
    decode_request,
)
from gateway.service import Gateway
from gateway.sse import sse_events

__all__ = ["create_app"]

log = logging.getLogger("pointsman")
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


class JSONBody:
    """An already-encoded JSON response, sent as a plain ASGI app: Litestar passes a handler's ASGI app through
    untouched, which skips its response pipeline on the hottest path (measured: see bench/RESULTS.md)."""

    __slots__ = ("body", "headers")

    def __init__(self, body: bytes, headers: dict[str, str]) -> None:
        self.body = body
        self.headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        self.headers.extend((k.encode(), v.encode()) for k, v in headers.items())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


async def _generate(request: Request, kind: type[ChatCompletionRequest] | type[CompletionRequest]) -> ASGIApp:
    gateway = _gateway(request)
    parsed = decode_request(await request.body(), kind)
    if parsed.body.stream:
        started = await gateway.stream(parsed)
        stream = Stream(
            sse_events(started.first, started.rest),
            media_type="text/event-stream",
            headers={**_SSE_HEADERS, **started.headers},
        )
        return stream.to_asgi_response(app=None, request=request)
    served = await gateway.complete(parsed)
    return JSONBody(served.body, served.headers)


_RESPONSES = {200: ResponseSpec(data_container=dict, description="A chat.completion (JSON) or, with stream, SSE")}


@post("/chat/completions", status_code=200, responses=_RESPONSES, summary="Create a chat completion (OpenAI)")
async def chat_completions(request: Request) -> ASGIApp:
    return await _generate(request, ChatCompletionRequest)


@post("/completions", status_code=200, responses=_RESPONSES, summary="Create a text completion (OpenAI, legacy)")
async def completions(request: Request) -> ASGIApp:
    return await _generate(request, CompletionRequest)


async def _explain(request: Request) -> dict:
    """The routing decision for a chat request (or `{"prompt": ...}`); `model` defaults to `auto`."""
    data = await request.body()
    raw = decode_object(data) if data else {}
    if "messages" not in raw:
        prompt = raw.pop("prompt", None)
        if not isinstance(prompt, str):
            raise BadRequest("Send a chat request's 'messages', or a 'prompt' string.", param="messages")
        raw["messages"] = [{"role": "user", "content": prompt}]
    if not any(k in raw for k in ("model", "auto_select", "preferred_model", "models")):
        raw["model"] = "auto"
    decision = await _gateway(request).decide(decode_request(raw, ChatCompletionRequest), explain=True)
    return decision.explain()


@post("/route", status_code=200, summary="Explain the routing decision for a chat request, without calling a model")
async def explain_route(request: Request) -> dict:
    return await _explain(request)


@post(["/models/recommend"], status_code=200, summary="Recommend a model for a prompt (earlier prototype's shape)")
async def recommend(request: Request) -> dict:
    explanation = await _explain(request)
    eligible = [c for c in explanation["candidates"] if c["eligible"]]
    chosen = explanation["model"]
    best = next((c for c in eligible if c["model"] == chosen), None)
    task = explanation["task"]
    reasoning = (
        f"task '{task}' (confidence {explanation['task_confidence']}), complexity {explanation['complexity']}, "
        f"~{explanation['prompt_tokens']} prompt tokens; "
        + (f"{chosen} scored {best['score']} ({', '.join(f'{k} {v}' for k, v in best['components'].items())})"
           if best else f"{chosen} chosen by {explanation['mode']} routing")
    )
    return {
        "recommended_model": chosen,
        "confidence": best["score"] if best else 1.0,
        "alternatives": [{"model": c["model"], "score": c["score"]} for c in eligible if c["model"] != chosen],
        "reasoning": reasoning,
        "task": task,
        "mode": explanation["mode"],
    }


@get("/models", summary="List the served models")
async def list_models(request: Request) -> ModelList:
    return _gateway(request).model_list


@get("/models/{model_id:path}", summary="Retrieve one model (ids may contain '/')")
async def retrieve_model(request: Request, model_id: str) -> ModelCard:
    return _gateway(request).model_card(model_id.lstrip("/"))


@get("/health", summary="Liveness: the process answers")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@get("/ready", summary="Readiness: every eager model loaded or its upstream reachable")
async def ready(request: Request) -> Response:
    states = await _gateway(request).ready()
    status = 200 if all(states.values()) else 503
    return Response({"ready": status == 200, "models": states}, status_code=status)


def _render_gateway_error(_: Request, exc: GatewayError) -> Response:
    return Response(exc.body(), status_code=exc.status, media_type=MediaType.JSON)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 401: "invalid_api_key"}


def _render_http_error(request: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    message = exc.detail if status != 404 else f"Unknown route: {request.method} {request.url.path}"
    type_ = "invalid_request_error" if status < 500 else "api_error"
    return Response(
        error_body(str(message), type_, _HTTP_CODES.get(status)),
        status_code=status,
        media_type=MediaType.JSON,
        headers=getattr(exc, "headers", None),
    )


def _render_unexpected(_: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return Response(
        error_body("The gateway failed to process the request.", "api_error", "internal_error"),
        status_code=500,
        media_type=MediaType.JSON,
    )


def create_app(config: Config, backends: Mapping[str, Backend] | None = None) -> Litestar:
    gateway = Gateway(config, backends)
    keys = KeyCheck(config.auth.api_keys)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        gateway.start()
        try:
            yield
        finally:
            await gateway.aclose()

    v1 = Router(
        path="/v1",
        route_handlers=[chat_completions, completions, explain_route, recommend, list_models, retrieve_model],
        guards=[keys] if keys.enabled else [],
    )
    # the earlier prototype served /models/recommend without the /v1 prefix; keep that path working
    legacy = Router(path="/", route_handlers=[recommend], guards=v1.guards)
    app = Litestar(
        route_handlers=[v1, legacy, health, ready],
        lifespan=[lifespan],
        exception_handlers={
            GatewayError: _render_gateway_error,
            HTTPException: _render_http_error,
            Exception: _render_unexpected,
        },
        openapi_config=OpenAPIConfig(title="pointsman", version="0.1.0", path="/openapi"),
        type_encoders={msgspec.Struct: msgspec.to_builtins},
        logging_config=None,
    )
    app.state.gateway = gateway
    return app
