"""The official openai SDK, sync and async, streaming and not, against a live gateway (real model + upstream)."""

from __future__ import annotations

import json

import openai
import pytest

from tests.conftest import http
from tests.spec.openai import validate

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)


@pytest.fixture
def aclient(gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)


def test_local_model_answers_coherently_with_exact_usage(client, gateway):
    response = client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, max_tokens=20,
                                              temperature=0)
    validate(response.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionResponse")
    assert "Paris" in response.choices[0].message.content
    assert response.model == "smollm2-135m-instruct"
    assert response.choices[0].finish_reason == "stop"
    usage = response.usage
    assert usage.prompt_tokens > 10 and usage.completion_tokens > 3
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # the alias resolves to the same model, and the body names the served model
    raw = client.chat.completions.with_raw_response.create(model="small", messages=QUESTION, max_tokens=3)
    assert raw.headers["x-pointsman-model"] == "smollm2-135m-instruct"
    assert raw.headers["x-pointsman-route"] == "manual"
    assert raw.parse().model == "smollm2-135m-instruct"


def test_local_model_stream_event_sequence(gateway):
    body = {"model": "smollm2-135m-instruct", "messages": QUESTION, "max_tokens": 20, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    status, headers, raw = http("POST", gateway.url + "/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = raw.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
        assert chunk["object"] == "chat.completion.chunk" and chunk["id"] == chunks[0]["id"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert "Paris" in text
    assert chunks[-1]["usage"]["completion_tokens"] > 3


def test_sdk_stream_sync(client):
    stream = client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, max_tokens=12,
                                            temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert "Paris" in text


async def test_sdk_async_plain_and_stream(aclient):
    response = await aclient.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION,
                                                     max_tokens=12, temperature=0)
    assert "Paris" in response.choices[0].message.content
    stream = await aclient.chat.completions.create(model="remote-a", messages=[{"role": "user", "content": "x y"}],
                                                   stream=True)
    parts = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices]
    assert "".join(p or "" for p in parts) == "echo: x y"


def test_upstream_proxied_unchanged_but_model(client):
    raw = client.chat.completions.with_raw_response.create(
        model="remote", messages=[{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
        temperature=0.3, seed=7, stop=["\n"], user="u1",
        extra_body={"top_k": 5, "guided_json": {"type": "object"}, "chat_template_kwargs": {"x": 1}},
        extra_headers={"Authorization": "Bearer client-key-must-not-leak"},
    )
    body = json.loads(raw.text)
    validate(body, "CreateChatCompletionResponse")
    assert body["model"] == "remote-a" and raw.headers["x-pointsman-model"] == "remote-a"
    sent = body["x_received"]["body"]
    assert sent["model"] == "mock-model"  # upstream_model is what the upstream sees
    assert sent["top_k"] == 5 and sent["guided_json"] == {"type": "object"} and sent["chat_template_kwargs"] == {"x": 1}
    assert sent["seed"] == 7 and sent["stop"] == ["\n"] and sent["temperature"] == 0.3 and sent["user"] == "u1"
    assert body["x_received"]["authorization"] == "Bearer upstream-secret"


def test_upstream_stream_relayed_with_usage(gateway):
    body = {"model": "remote-a", "messages": [{"role": "user", "content": "one two"}], "stream": True,
            "stream_options": {"include_usage": True}}
    status, _, raw = http("POST", gateway.url + "/v1/chat/completions", body)
    assert status == 200
    events = raw.decode().split("\n\n")
    assert events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
        assert chunk["model"] == "remote-a"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 5


def test_text_completions_local_and_upstream(client):
    local = client.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is",
                                      max_tokens=5, temperature=0)
    validate(local.model_dump(mode="json", exclude_unset=True), "CreateCompletionResponse")
    assert local.choices[0].text and local.usage.completion_tokens <= 5
    remote = client.completions.create(model="remote-a", prompt="abc")
    assert remote.choices[0].text == "echo: abc" and remote.model == "remote-a"
    chunks = list(client.completions.create(model="remote-a", prompt="a b", stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "echo: a b"


def test_models_endpoints(client, gateway):
    listing = client.models.list()
    ids = [m.id for m in listing.data]
    assert ids == ["smollm2-135m-instruct", "remote-a", "slow", "dead"]
    status, _, raw = http("GET", gateway.url + "/v1/models")
    validate(json.loads(raw), "ListModelsResponse")
    assert client.models.retrieve("remote-a").id == "remote-a"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("nope")
    assert err.value.code == "model_not_found"


def test_health_ready_and_openapi(gateway):
    assert http("GET", gateway.url + "/health")[0] == 200
    status, _, raw = http("GET", gateway.url + "/ready")
    assert status == 200 and json.loads(raw)["models"]["smollm2-135m-instruct"] is True
    status, _, raw = http("GET", gateway.url + "/openapi/openapi.json")
    assert status == 200 and "/v1/chat/completions" in json.loads(raw)["paths"]
