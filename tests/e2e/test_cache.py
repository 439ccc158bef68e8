"""The exact cache through live gateways and the openai SDK: a hit served by a second replica sharing Redis,
streamed replays, tenant isolation between API keys, request controls and the usage row of a hit."""

from __future__ import annotations

import time
import uuid

import httpx
import openai
import pytest

from tests.conftest import redis_url, require_redis, start_gateway
from tests.spec.openai import validate

REDIS = redis_url(14)  # a database of this xdist worker's own


@pytest.fixture(scope="module")
def replicas(upstream, tmp_path_factory):
    require_redis(REDIS)
    tmp = tmp_path_factory.mktemp("cache")
    config = f"""
auth: {{api_keys: [key-a, key-b]}}
models:
  - {{id: remote-a, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model, aliases: [ra]}}
routing: {{health_check_s: 0}}
storage: {{redis_url: "{REDIS}", database_url: ""}}
policies:
  cache: {{mode: deterministic, ttl_s: 120}}
"""
    first, second = start_gateway(tmp, config), start_gateway(tmp, config)
    yield first, second
    first.stop()
    second.stop()


def _client(gateway, key: str = "key-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


def _ask(client: openai.OpenAI, content: str, model: str = "remote-a", **extra):
    return client.chat.completions.with_raw_response.create(
        model=model, temperature=0, messages=[{"role": "user", "content": content}], **extra)


def _hit(ask):
    """`ask()` until it is a cache hit: the entry is stored right after the answer that made it was sent."""
    deadline = time.monotonic() + 5
    while (response := ask()).headers["x-pointsman-cache"] != "hit":
        assert time.monotonic() < deadline, "never a hit"
    return response


def test_an_entry_written_through_one_replica_is_a_hit_on_the_other(replicas):
    first, second = replicas
    prompt = f"cache me {uuid.uuid4().hex}"
    miss = _ask(_client(first), prompt)
    assert miss.headers["x-pointsman-cache"] == "miss"
    hit = _hit(lambda: _ask(_client(second), prompt, model="ra"))  # the alias resolves to the same entry
    a, b = miss.parse(), hit.parse()
    assert b.choices[0].message.content == a.choices[0].message.content and b.id != a.id
    validate(b.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionResponse")


def test_a_hit_replays_as_a_stream_the_sdk_reads(replicas):
    first, second = replicas
    prompt = f"stream me {uuid.uuid4().hex}"
    stored = _ask(_client(first), prompt).parse().choices[0].message.content
    _hit(lambda: _ask(_client(second), prompt))
    stream = _client(second).chat.completions.create(model="remote-a", temperature=0, stream=True,
                                                     stream_options={"include_usage": True},
                                                     messages=[{"role": "user", "content": prompt}])
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == stored
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_tenants_never_see_each_others_entries(replicas):
    first, _ = replicas
    prompt = f"private {uuid.uuid4().hex}"
    assert _ask(_client(first, "key-a"), prompt).headers["x-pointsman-cache"] == "miss"
    assert _ask(_client(first, "key-b"), prompt).headers["x-pointsman-cache"] == "miss"
    _hit(lambda: _ask(_client(first, "key-b"), prompt))


def test_request_controls_and_non_deterministic_requests(replicas):
    first, _ = replicas
    prompt = f"controls {uuid.uuid4().hex}"
    url, auth = first.url + "/v1/chat/completions", {"authorization": "Bearer key-a"}
    body = {"model": "remote-a", "temperature": 0, "messages": [{"role": "user", "content": prompt}]}
    assert httpx.post(url, json=body, headers={**auth, "cache-control": "no-store"}).headers[
        "x-pointsman-cache"] == "miss"
    assert httpx.post(url, json=body, headers=auth).headers["x-pointsman-cache"] == "miss"  # nothing was stored
    assert httpx.post(url, json=body, headers={**auth, "cache-control": "no-cache"}).headers[
        "x-pointsman-cache"] == "bypass"
    _hit(lambda: httpx.post(url, json=body, headers=auth))
    warm = {**body, "temperature": 0.7}
    assert httpx.post(url, json=warm, headers=auth).headers["x-pointsman-cache"] == "bypass"


def test_a_streamed_answer_is_stored_and_served_plain(replicas):
    first, second = replicas
    prompt = f"streamed first {uuid.uuid4().hex}"
    stream = _client(first).chat.completions.with_raw_response.create(
        model="remote-a", temperature=0, stream=True, messages=[{"role": "user", "content": prompt}])
    assert stream.headers["x-pointsman-cache"] == "miss"
    text = "".join(c.choices[0].delta.content or "" for c in stream.parse() if c.choices)
    hit = _hit(lambda: _ask(_client(second), prompt))
    assert hit.parse().choices[0].message.content == text
    assert hit.parse().choices[0].finish_reason == "stop"


@pytest.fixture(scope="module")
def semantic_replicas(upstream, tmp_path_factory):
    require_redis(REDIS)
    tmp = tmp_path_factory.mktemp("semantic")
    config = f"""
models:
  - {{id: remote-a, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model}}
routing: {{health_check_s: 0}}
storage: {{redis_url: "{REDIS}", database_url: ""}}
policies:
  cache: {{mode: deterministic, ttl_s: 120, semantic: {{enabled: true, similarity: 0.9}}}}
"""
    first, second = start_gateway(tmp, config), start_gateway(tmp, config)
    yield first, second
    first.stop()
    second.stop()


def test_a_paraphrase_is_a_semantic_hit_on_the_other_replica(semantic_replicas):
    first, second = semantic_replicas
    topic = uuid.uuid4().hex[:8]
    url = "/v1/chat/completions"
    # a seed of this run's own: its own bucket, whatever earlier runs left in Redis
    ask = {"model": "remote-a", "temperature": 0, "seed": uuid.uuid4().int % 2**31,
           "messages": [{"role": "user", "content": f"What is the capital city of France? (ref {topic})"}]}
    miss = httpx.post(first.url + url, json=ask, timeout=60)
    assert miss.status_code == 200 and miss.headers["x-pointsman-cache"] == "miss"
    tries = iter(range(1000))  # each try words it a little differently, so a miss never turns into an exact hit

    def paraphrase() -> httpx.Response:
        text = f"Which city is the capital of France? (ref {topic}){'!' * next(tries)}"
        return httpx.post(second.url + url, json={**ask, "messages": [{"role": "user", "content": text}]},
                          timeout=60)

    hit = _hit_kind(paraphrase, "semantic-hit")
    assert hit.json()["choices"][0]["message"]["content"] == miss.json()["choices"][0]["message"]["content"]
    unrelated = {**ask, "messages": [{"role": "user", "content": f"Write a haiku about rain (ref {topic})"}]}
    assert httpx.post(second.url + url, json=unrelated, timeout=60).headers["x-pointsman-cache"] == "miss"


def _hit_kind(ask, kind: str):
    deadline = time.monotonic() + 10
    while (response := ask()).headers["x-pointsman-cache"] != kind:
        assert time.monotonic() < deadline, f"never a {kind}: {response.headers['x-pointsman-cache']}"
    return response
