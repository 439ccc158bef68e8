"""Anthropic's Messages API in front of the same models: POST /v1/messages and /v1/messages/count_tokens,
translated onto chat completions at the edge (protocol/anthropic.py), every error in Anthropic's shape."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import MediaType, Request, Response, Router, post
from litestar.exceptions import HTTPException
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, Operation
from litestar.types import ASGIApp

from gateway.auth import principal_of
from gateway.generate import generate
from gateway.openapi import takes
from gateway.request_id import request_id_of
from gateway.service import Gateway
from policies.budget import estimate_prompt_tokens
from protocol.anthropic import (
    CountTokensRequest,
    MessageResponse,
    MessagesDialect,
    MessagesRequest,
    decode_count_tokens,
    decode_messages,
    error_body,
    to_chat,
)
from protocol.errors import INTERNAL_FAILURE, GatewayError
from protocol.openai import ChatCompletionRequest, ParsedRequest, decode_request

__all__ = ["MESSAGES_PATH", "anthropic_error", "anthropic_router", "estimate_input_tokens", "under_messages"]

log = logging.getLogger("pointsman")
MESSAGES_PATH = "/v1/messages"  # under it, every error is in Anthropic's shape, the router's own 404 and 405 too


def under_messages(path: str) -> bool:
    """Whether `path` is /v1/messages or under it, where errors take Anthropic's shape."""
    return path == MESSAGES_PATH or path.startswith(MESSAGES_PATH + "/")


def _ids(request: Request) -> dict[str, str]:
    """The request id, under pointsman's header and Anthropic's (the SDKs read `request-id`)."""
    rid = request_id_of(request.scope)
    return {"x-request-id": rid, "request-id": rid}


def estimate_input_tokens(parsed: ParsedRequest) -> int:
    """The prompt's tokens as budgets estimate them (4 characters a token, 4 per message), plus the tool
    definitions and earlier tool calls' arguments at the same rate."""
    body = parsed.body
    assert isinstance(body, ChatCompletionRequest)  # what to_chat makes
    extra = len(msgspec.json.encode(body.tools)) // 4 if body.tools else 0
    for message in body.messages:
        for call in message.tool_calls or ():
            extra += len(str((call.get("function") or {}).get("arguments") or "")) // 4
    return estimate_prompt_tokens(parsed) + extra


def _inlined(kind: type) -> dict[str, Any]:
    """`kind`'s JSON Schema with its definitions inlined (the OpenAPI document has no room for msgspec's)."""
    schema = msgspec.json.schema(kind)
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                return resolve(defs[ref.rsplit("/", 1)[1]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


_ERROR = {"type": "object", "required": ["type", "error"], "properties": {
    "type": {"const": "error"},
    "error": {"type": "object", "required": ["type", "message"],
              "properties": {"type": {"type": "string"}, "message": {"type": "string"}}},
    "request_id": {"type": "string"}}}
_SSE = {"type": "string", "description": "with stream: true, Anthropic's events: message_start, content_block_start, "
                                        "content_block_delta, content_block_stop, message_delta, message_stop"}


def _documented(kind: type, ok: dict[str, Any]) -> type[Operation]:
    """The route's request body, answer and error responses (Anthropic's error shape) in the OpenAPI document."""
    body, errors = _inlined(kind), (400, 401, 403, 404, 429, 500, 502, 503, 504)

    @dataclass
    class Documented(takes(body)):  # type: ignore[misc]
        def __post_init__(self) -> None:
            super().__post_init__()
            responses = dict(self.responses or {})
            responses["200"] = OpenAPIResponse(description="Success", content={
                media: OpenAPIMediaType(schema=schema) for media, schema in ok.items()})  # type: ignore[arg-type]
            for status in errors:
                responses[str(status)] = OpenAPIResponse(description="An error, in Anthropic's shape", content={
                    "application/json": OpenAPIMediaType(schema=_ERROR)})  # type: ignore[arg-type]
            self.responses = responses

    return Documented


_MESSAGE_OK = {"application/json": _inlined(MessageResponse), "text/event-stream": _SSE}
_COUNT_OK = {"application/json": {"type": "object", "required": ["input_tokens"],
                                  "properties": {"input_tokens": {"type": "integer"}}}}


@post("/messages", status_code=200, summary="Create a message (Anthropic Messages API)",
      operation_class=_documented(MessagesRequest, _MESSAGE_OK))
async def create_message(request: Request) -> ASGIApp:
    body, raw = decode_messages(await request.body())
    parsed = decode_request(to_chat(body, raw), ChatCompletionRequest)
    dialect = MessagesDialect(body.model, body.stop_sequences, lambda: estimate_prompt_tokens(parsed))
    return await generate(request.scope, request.receive, parsed, dialect, {"request-id": request_id_of(request.scope)})


@post("/messages/count_tokens", status_code=200,
      summary="Count a message's input tokens (Anthropic Messages API; an estimate, see the README)",
      operation_class=_documented(CountTokensRequest, _COUNT_OK))
async def count_tokens(request: Request) -> Response:
    body, raw = decode_count_tokens(await request.body())
    parsed = decode_request(to_chat(body, raw), ChatCompletionRequest)
    gateway: Gateway = request.app.state.gateway
    await gateway.decide(parsed, False, principal_of(request.scope))  # an unknown (404) or refused (403) model
    return Response({"input_tokens": estimate_input_tokens(parsed)}, headers=_ids(request))


def anthropic_error(request: Request, status: int, message: str, headers: dict[str, str] | None = None,
                    ) -> Response:
    """An error in Anthropic's shape, with the request id as Anthropic's `request-id` and ours."""
    ids = _ids(request)
    return Response(error_body(status, message, ids["request-id"]), status_code=status, media_type=MediaType.JSON,
                    headers={**(headers or {}), **ids})


def _render_gateway_error(request: Request, exc: GatewayError) -> Response:
    return anthropic_error(request, exc.status, exc.message, exc.headers)


def _render_http_error(request: Request, exc: HTTPException) -> Response:
    return anthropic_error(request, exc.status_code, str(exc.detail), getattr(exc, "headers", None))


def _render_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return anthropic_error(request, 500, INTERNAL_FAILURE)


def anthropic_router(guards: list) -> Router:
    """/v1/messages and /v1/messages/count_tokens behind `guards` (the completions'), with an exception handler
    of their own: every error, the guards' 401/403 included, in Anthropic's shape with the gateway's status."""
    return Router(path="/v1", route_handlers=[create_message, count_tokens], guards=guards,
                  exception_handlers={GatewayError: _render_gateway_error, HTTPException: _render_http_error,
                                      Exception: _render_unexpected})
