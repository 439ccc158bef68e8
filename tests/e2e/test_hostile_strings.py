"""Client text PostgreSQL cannot hold (NUL, longer than a column) on a live gateway: every request keeps its usage
row, and every endpoint answers 400 or 404, never a 500 or a 503."""

from __future__ import annotations

import signal
import uuid

import httpx
import pytest

from tests.conftest import fresh_pg_database, start_gateway

ADMIN = "bootstrap-" + uuid.uuid4().hex
HEADERS = {"authorization": f"Bearer {ADMIN}"}
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def gateway(upstream, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    with fresh_pg_database() as name:
        config = f"""
models:
  - {{id: chat-a, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model}}
  - {{id: embed-a, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model}}
routing: {{health_check_s: 0}}
storage: {{database_url: "postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"}}
"""
        process = start_gateway(tmp, config, env={"POINTSMAN_ADMIN_KEY": ADMIN})
        yield process
        process.stop(signal.SIGTERM)


def _post(gateway, path: str, body: dict, request_id: str | None = None) -> httpx.Response:
    headers = {**HEADERS, **({"x-request-id": request_id} if request_id else {})}
    return httpx.post(gateway.url + path, json=body, headers=headers, timeout=30)


def _usage(gateway, **query) -> httpx.Response:
    return httpx.get(gateway.url + "/admin/usage", params=query, headers=HEADERS, timeout=30)


def test_request_ids_are_echoed_only_up_to_the_columns_length(gateway):
    fits, too_long = "f" * 64, "g" * 65
    for rid in (fits, too_long):
        answer = _post(gateway, "/v1/chat/completions", {"model": "chat-a", "messages": HI}, rid)
        assert answer.status_code == 200
    assert answer.headers["x-request-id"] != too_long  # a fresh id instead
    seen = {r["request_id"] for r in _usage(gateway, limit=1000).json()["data"]}
    assert {fits, answer.headers["x-request-id"]} <= seen


def test_nul_in_client_text_keeps_every_usage_row(gateway):
    tag = uuid.uuid4().hex[:8]
    cases = [
        ("/v1/chat/completions", {"model": "chat-a", "user": "a\x00b", "messages": HI}, 200),
        ("/v1/chat/completions", {"model": "chat-a\x00", "messages": HI}, 404),
        ("/v1/embeddings", {"model": "embed-a", "user": "a\x00b", "input": "x"}, 200),
        ("/v1/responses", {"model": "chat-a", "user": "a\x00b", "input": "hi"}, 200),
        ("/v1/messages", {"model": "chat-a", "max_tokens": 3, "metadata": {"user_id": "a\x00b"}, "messages": HI},
         200),
    ]
    for i, (path, body, status) in enumerate(cases):
        assert _post(gateway, path, body, f"nul-{tag}-{i}").status_code == status, path
    seen = {r["request_id"] for r in _usage(gateway, limit=1000).json()["data"]}
    assert {f"nul-{tag}-{i}" for i in range(len(cases))} <= seen
    assert "refused row" not in gateway.output()


@pytest.mark.parametrize("param", ["team", "model", "key_id"])
def test_usage_filter_with_nul_is_a_400(gateway, param):
    answer = _usage(gateway, **{param: "a\x00b"})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param


@pytest.mark.parametrize("field", ["team", "name"])
def test_key_with_nul_is_a_400(gateway, field):
    answer = _post(gateway, "/admin/keys", {field: "a\x00b"})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == field


@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize("key_id", ["a%00b", "k" * 33])
def test_key_ids_that_cannot_exist_are_404(gateway, method, key_id):
    answer = httpx.request(method, f"{gateway.url}/admin/keys/{key_id}", headers=HEADERS)
    assert answer.status_code == 404 and answer.json()["error"]["param"] == "id"


def test_feedback_for_an_id_with_nul_is_a_404(gateway):
    answer = _post(gateway, "/v1/feedback", {"id": "a\x00", "score": 1, "metric": "q"})
    assert answer.status_code == 404 and answer.json()["error"]["param"] == "id"


def test_template_history_with_nul_is_empty(gateway):
    answer = httpx.get(gateway.url + "/admin/templates/a%00/history", headers=HEADERS)
    assert answer.status_code == 200 and answer.json()["data"] == []


def test_template_name_longer_than_its_column_is_a_400(gateway):
    body = {"name": "t" * 129, "version": "1.0.0", "stage": "dev", "messages": [{"role": "system", "content": "x"}]}
    answer = _post(gateway, "/admin/templates", body)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "name"


def test_model_version_longer_than_its_column_is_a_400(gateway):
    answer = _post(gateway, "/admin/models/chat-a/versions", {"version": "1.0.0-" + "a" * 100, "stage": "dev"})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "version"
    assert "Traceback" not in gateway.output()


@pytest.mark.parametrize(("method", "suffix"), [("GET", ""), ("PATCH", ""), ("POST", "/pause"), ("POST", "/stop"),
                                                ("POST", "/promote"), ("GET", "/results")])
def test_experiment_names_with_nul_are_404(gateway, method, suffix):
    body = {"variant": "a"} if suffix == "/promote" else {"status": "paused"} if method == "PATCH" else None
    answer = httpx.request(method, f"{gateway.url}/admin/experiments/e%00x{suffix}", json=body, headers=HEADERS)
    assert answer.status_code == 404 and answer.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("hostile", [{"name": "e\x00x"}, {"variants": [{"name": "a\x00", "model": "chat-a"},
                                                                      {"name": "b", "model": "chat-a"}]},
                                     {"primary_metric": "feedback:q\x00"}, {"target": "chat-a\x00"}])
def test_experiments_with_nul_in_their_text_are_refused_or_kept_whole(gateway, hostile):
    name = "nul-" + uuid.uuid4().hex[:8]
    body = {"name": name, "target": "chat-a", "status": "draft",
            "variants": [{"name": "a", "model": "chat-a"}, {"name": "b", "model": "chat-a"}], **hostile}
    answer = _post(gateway, "/admin/experiments", body)
    if answer.status_code == 201:  # kept: then read back whole
        created = answer.json()
        again = httpx.get(f"{gateway.url}/admin/experiments/{created['name']}", headers=HEADERS)
        assert again.status_code == 200 and again.json() == created
    else:
        assert answer.status_code == 400, answer.text
    assert "Traceback" not in gateway.output()
