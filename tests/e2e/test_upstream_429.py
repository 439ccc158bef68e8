"""Upstream 429s as clients see them: embeddings on a model whose every deployment is held by upstream 429s, or
whose breakers are open, get 429 rate_limit_exceeded, or 503, with retry-after, as the chat routes do (it was a
503 without retry-after); a model's only deployment answering 429 stays a 429."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import start_gateway, start_upstream


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("emb429")
    first, second = start_upstream(tmp, name="a"), start_upstream(tmp, name="b")
    config = f"""
models:
  - id: pair
    backend: openai
    upstream_model: mock-model
    deployments:
      - {{base_url: "{first.url}"}}
      - {{base_url: "{second.url}"}}
"""
    server = start_gateway(tmp, config)
    yield server
    server.stop()
    first.stop()
    second.stop()


def test_embeddings_with_every_deployment_held_is_429_with_retry_after(gateway):
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    # both deployments answer 429 with Retry-After: 7, so both are held for 7 s
    with pytest.raises(openai.RateLimitError):
        client.embeddings.create(model="pair", input="status:429")
    # the chat route, on the same held deployments: 429 rate_limit_exceeded with retry-after
    with pytest.raises(openai.RateLimitError) as chat:
        client.chat.completions.create(model="pair", messages=[{"role": "user", "content": "hello"}])
    assert chat.value.response.headers.get("retry-after") is not None
    # the embeddings route: the same, not a 503 "circuit breakers are open" without retry-after
    with pytest.raises(openai.APIStatusError) as embeddings:
        client.embeddings.create(model="pair", input="hello")
    assert embeddings.value.status_code == 429, embeddings.value.message
    assert embeddings.value.code == "rate_limit_exceeded"
    assert embeddings.value.response.headers.get("retry-after") is not None


@pytest.fixture(scope="module")
def fragile(tmp_path_factory):
    """One deployment whose breaker opens on its first failure."""
    tmp = tmp_path_factory.mktemp("fragile")
    upstream = start_upstream(tmp)
    config = f"""
models:
  - {{id: solo, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model}}
routing:
  circuit_breaker: {{failures: 1, cooldown_s: 30, error_rate: 1.0, window_s: 30, min_requests: 1000}}
"""
    server = start_gateway(tmp, config)
    yield server
    server.stop()
    upstream.stop()


def test_a_rate_limited_only_deployment_stays_429_for_the_sdk(fragile):
    """Its 429 and Retry-After reach the client, request after request: an upstream 429 is no breaker failure
    (it counted as one, so the model then answered 503 "circuit breakers are open" while the upstream was
    merely rate limiting)."""
    client = openai.OpenAI(base_url=fragile.url + "/v1", api_key="x", max_retries=0)
    limited = [{"role": "user", "content": "status:429"}]
    for _ in range(3):
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="solo", messages=limited)


def test_embeddings_with_open_breakers_carries_retry_after(fragile):
    client = openai.OpenAI(base_url=fragile.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError):
        client.embeddings.create(model="solo", input="status:503")  # one failure opens the only breaker
    with pytest.raises(openai.InternalServerError) as chat:
        client.chat.completions.create(model="solo", messages=[{"role": "user", "content": "hello"}])
    assert chat.value.status_code == 503 and chat.value.response.headers.get("retry-after") is not None
    with pytest.raises(openai.InternalServerError) as embeddings:
        client.embeddings.create(model="solo", input="hello")
    assert embeddings.value.status_code == 503
    # the chat route tells the client when the breaker half-opens; embeddings should too
    assert embeddings.value.response.headers.get("retry-after") is not None
