"""Validate gateway output against the schemas extracted from OpenAI's published OpenAPI spec."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import jsonschema

__all__ = ["RESPONSES_EVENT_SCHEMAS", "validate"]


@cache
def _document() -> dict:
    return json.loads(Path(__file__).with_name("openai_schemas.json").read_text())


@cache
def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema = {"$ref": f"#/components/schemas/{name}", **_document()}
    return jsonschema.Draft202012Validator(schema)


def validate(obj: dict, name: str) -> None:
    """Raise jsonschema.ValidationError unless `obj` satisfies the spec's schema `name`."""
    _validator(name).validate(obj)


# each Responses API stream event's type -> the spec schema it must satisfy
RESPONSES_EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent",
    "error": "ResponseErrorEvent",
}
