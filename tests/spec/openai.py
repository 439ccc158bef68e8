"""Validate gateway output against the schemas extracted from OpenAI's published OpenAPI spec."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import jsonschema

__all__ = ["validate"]


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
