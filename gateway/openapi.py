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
from litestar.openapi.spec import Components, OpenAPIMediaType, OpenAPIResponse, Operation, RequestBody

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
           "ROUTE", "add_schemas", "documented", "openapi_config"]

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


def add_schemas(components: Components) -> None:
    """Add the JSON Schemas of the request and response Structs and of the error body, as msgspec makes them,
    to the document Litestar built (which replaces the config's components with its own while building)."""
    _, schemas = msgspec.json.schema_components(
        [ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ChatCompletion, Completion,
         CreateEmbeddingResponse, ErrorResponse], ref_template=_REF
    )
    components.schemas.update(schemas)


def documented(body: dict[str, Any], errors: tuple[int, ...], ok: dict[str, Any] | None = None,
               ) -> type[Operation]:
    """An Operation class for a route decorator's `operation_class`: the request body, the success content
    (when `ok` maps media types to schemas) and the error responses."""

    @dataclass
    class Documented(Operation):
        def __post_init__(self) -> None:
            self.request_body = RequestBody(
                content={"application/json": OpenAPIMediaType(schema=body)}, required=True  # type: ignore[arg-type]
            )
            responses = dict(self.responses or {})
            if ok is not None:
                responses["200"] = OpenAPIResponse(
                    description="Success",
                    content={media: OpenAPIMediaType(schema=schema) for media, schema in ok.items()},  # type: ignore[arg-type]
                )
            for status in errors:
                responses[str(status)] = OpenAPIResponse(
                    description=_WHY[status],
                    content={"application/json": OpenAPIMediaType(schema=_ERROR)},  # type: ignore[arg-type]
                )
            self.responses = responses

    return Documented
