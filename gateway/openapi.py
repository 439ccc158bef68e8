"""The OpenAPI document's request bodies and error responses: the handlers read raw bodies (to pass unknown
fields on), so Litestar cannot infer them; they are generated here from the msgspec Structs instead."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
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
           "ROUTE", "add_schemas", "documented"]

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
