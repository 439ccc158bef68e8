"""The OpenAPI document's request bodies and error responses: the handlers read raw bodies (to pass unknown
fields on), so Litestar cannot infer them; they are generated here from the msgspec Structs instead."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Response, Router
from litestar.exceptions import NotFoundException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, OpenAPI, OpenAPIMediaType, OpenAPIResponse, Operation, RequestBody

from protocol.openai import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    CreateEmbeddingResponse,
    EmbeddingRequest,
    ErrorResponse,
)

__all__ = ["CHAT", "CHAT_OK", "COMPLETION", "COMPLETION_OK", "EMBEDDINGS", "EMBEDDINGS_ERRORS", "EMBEDDINGS_OK",
           "ROUTE", "add_schemas", "document_errors", "documented", "openapi_config", "takes"]

_REF = "#/components/schemas/{name}"
CHAT = {"$ref": _REF.format(name="ChatCompletionRequest")}
COMPLETION = {"$ref": _REF.format(name="CompletionRequest")}
EMBEDDINGS = {"$ref": _REF.format(name="EmbeddingRequest")}
EMBEDDINGS_OK = {"application/json": {"$ref": _REF.format(name="CreateEmbeddingResponse")}}
# /v1/route and /models/recommend: a chat request, or just a prompt (model defaults to auto)
ROUTE = {"anyOf": [CHAT, {"type": "object", "required": ["prompt"],
                          "properties": {"prompt": {"type": "string"}, "model": {"type": "string"}}}]}
_ERROR = {"$ref": _REF.format(name="ErrorResponse")}
_SSE = {"type": "string", "description": "with stream: true, server-sent events: `data: {chunk}` lines, then "
                                        "`data: [DONE]`"}
CHAT_OK = {"application/json": {"$ref": _REF.format(name="ChatCompletion")}, "text/event-stream": _SSE}
COMPLETION_OK = {"application/json": {"$ref": _REF.format(name="Completion")}, "text/event-stream": _SSE}
_WHY = {
    400: "Invalid request (bad JSON, a field out of range, a prompt too long for every model)",
    401: "Missing or wrong API key (when auth.api_keys is set)",
    404: "Unknown model",
    429: "Rate limited (by a policy, or relayed from the upstream with its Retry-After)",
    500: "The gateway failed (a bug: please report it)",
    502: "The upstream failed or answered something that is not valid",
    503: "No model or deployment can take the request now",
    504: "The upstream timed out",
}
# what every other route may answer, besides what it documents itself (see document_errors)
_ANY = {
    400: "Invalid request (a parameter, the body, or what this gateway's config lacks, such as a database)",
    401: "Missing or wrong API key (when auth is on)",
    403: "The API key's role may not use this route",
    404: "Nothing by that name or id",
}
# the routes that answer 409 when the change conflicts with the current state
_CONFLICTS = {
    ("post", "/admin/experiments"): "An experiment by that name exists, or its target is another's",
    ("patch", "/admin/experiments/{name}"): "The change conflicts with another experiment",
    ("post", "/admin/templates"): "That template version exists already (versions are immutable)",
    ("post", "/admin/templates/{name}/versions/{version}/stage"): "A stage transition that is not allowed",
    ("post", "/admin/models/{model_id}/versions"): "That version exists already",
    ("post", "/admin/models/{model_id}/versions/{version}/stage"): "A stage transition that is not allowed",
    ("post", "/admin/models/{model_id}/rollback"): "No earlier production version to roll back to",
    ("post", "/admin/models/{model_id}/unload"): "Requests still in flight on the model",
    ("post", "/admin/reload"): "Several workers: only SIGHUP reaches them all",
    ("post", "/v1/feedback"): "The answer has that metric's score already, or its id is ambiguous",
}
_PROBES = ("/health", "/ready")  # answer without a key
GENERATE_ERRORS = (400, 401, 404, 429, 500, 502, 503, 504)
ROUTE_ERRORS = (400, 401, 404, 500, 503)
EMBEDDINGS_ERRORS = (400, 401, 404, 429, 500, 502, 503, 504)


def openapi_config(guards: Sequence[Any], middleware: Sequence[Any]) -> OpenAPIConfig:
    """/openapi (the document as JSON and YAML, and its viewers) behind `guards`: with auth on, a key of any role,
    as the README says of every route but /health, /ready and /dashboard. A path under it that is none of them
    gets the OpenAI error's 404, as any unknown route, not the HTML page Litestar answers there."""
    router = Router("/openapi", route_handlers=[], guards=list(guards), middleware=list(middleware),
                    after_request=_no_html_404, include_in_schema=False)
    return OpenAPIConfig(title="pointsman", version="0.1.0", path="/openapi", openapi_router=router)


async def _no_html_404(response: Response) -> Response:
    if response.status_code == 404:  # only Litestar's catch-all under /openapi answers one
        raise NotFoundException
    return response


_BODIES: list[type] = []  # the request Structs of routes that read their body themselves (see `takes`)


def add_schemas(components: Components) -> None:
    """Add the JSON Schemas of the request and response Structs and of the error body, as msgspec makes them,
    to the document Litestar built (which replaces the config's components with its own while building)."""
    _, schemas = msgspec.json.schema_components(
        [ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ChatCompletion, Completion,
         CreateEmbeddingResponse, ErrorResponse, *_BODIES], ref_template=_REF
    )
    components.schemas.update(schemas)


def takes(body: type | dict[str, Any]) -> type[Operation]:
    """An Operation class for a route decorator's `operation_class`, for a route that reads its JSON body itself
    (Litestar then documents none): `body`, a msgspec Struct whose schema joins the components, or a JSON
    Schema."""
    if isinstance(body, type):
        _BODIES.append(body)
        schema: dict[str, Any] = {"$ref": _REF.format(name=body.__name__)}
    else:
        schema = body

    @dataclass
    class Takes(Operation):
        def __post_init__(self) -> None:
            self.request_body = RequestBody(
                content={"application/json": OpenAPIMediaType(schema=schema)}, required=True  # type: ignore[arg-type]
            )

    return Takes


def document_errors(schema: OpenAPI) -> None:
    """Give every operation the error responses it may answer, each in OpenAI's error shape (the one body every
    error of the gateway has, but for /v1/messages, which documents its own): Litestar documents only a 400 for a
    route with parameters, and in its own shape. 400 on every route (an invalid Host header, a route that needs a
    database the config lacks), 401 and 403 on every route but the probes, 404 where its path names something,
    409 where a change can conflict (`_CONFLICTS`)."""
    for path, item in (schema.paths or {}).items():
        for method in ("get", "post", "patch", "delete"):
            operation: Operation | None = getattr(item, method)
            if operation is None:
                continue
            responses = dict(operation.responses or {})
            wanted = {400: _ANY[400]} if path in _PROBES else {400: _ANY[400], 401: _ANY[401], 403: _ANY[403]}
            if "{" in path:
                wanted[404] = _ANY[404]
            if (conflict := _CONFLICTS.get((method, path))) is not None:
                wanted[409] = conflict
            for status, why in wanted.items():
                held = responses.get(str(status))
                if held is None or _litestars(held):
                    responses[str(status)] = _error(why)
            operation.responses = responses


def _litestars(response: Any) -> bool:
    """Whether `response` is Litestar's validation error ({status_code, detail, extra}), which no route answers."""
    media = (getattr(response, "content", None) or {}).get("application/json")
    properties = getattr(getattr(media, "schema", None), "properties", None) or {}
    return "detail" in properties and "status_code" in properties


def _error(why: str) -> OpenAPIResponse:
    return OpenAPIResponse(description=why, content={"application/json": OpenAPIMediaType(schema=_ERROR)})  # type: ignore[arg-type]


def documented(body: dict[str, Any], errors: tuple[int, ...], ok: dict[str, Any] | None = None,
               ) -> type[Operation]:
    """An Operation class for a route decorator's `operation_class`: the request body, the success content
    (when `ok` maps media types to schemas) and the error responses."""

    @dataclass
    class Documented(takes(body)):  # type: ignore[misc]
        def __post_init__(self) -> None:
            super().__post_init__()
            responses = dict(self.responses or {})
            if ok is not None:
                responses["200"] = OpenAPIResponse(
                    description="Success",
                    content={media: OpenAPIMediaType(schema=schema) for media, schema in ok.items()},  # type: ignore[arg-type]
                )
            for status in errors:
                responses[str(status)] = _error(_WHY[status])
            self.responses = responses

    return Documented
