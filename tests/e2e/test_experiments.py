"""Experiments through two live replicas sharing PostgreSQL and Redis: the same unit gets the same arm on both,
the header names it, feedback is stored once, an admin change on one replica reaches the other, results answer."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from tests.conftest import fresh_pg_database, redis_url, require_redis, start_gateway

REDIS = redis_url(14)  # a database of this xdist worker's own


@pytest.fixture(scope="module")
def replicas(upstream, tmp_path_factory):
    require_redis(REDIS)
    with fresh_pg_database() as database:
        yield from _replicas(upstream, tmp_path_factory.mktemp("experiments"), database)


def _replicas(upstream, tmp, database):
    name = f"exp-{uuid.uuid4().hex[:8]}"
    config = f"""
models:
  - {{id: remote-a, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model}}
  - {{id: remote-b, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model}}
routing: {{health_check_s: 0}}
storage: {{redis_url: "{REDIS}", database_url: "postgresql+asyncpg://postgres@127.0.0.1:5432/{database}"}}
experiments:
  - name: {name}
    target: chat-default
    primary_metric: feedback:quality
    min_samples: 10
    variants:
      - {{name: control, model: remote-a, weight: 50}}
      - {{name: treatment, model: remote-b, weight: 50, params: {{max_tokens: 3}}}}
"""
    first = start_gateway(tmp, config)
    try:
        second = start_gateway(tmp, config)
        try:
            yield first, second, name
        finally:
            second.stop()
    finally:
        first.stop()


def _ask(url: str, user: str) -> httpx.Response:
    body = {"model": "chat-default", "user": user, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=30)


def test_two_replicas_agree_and_feedback_and_admin_changes_work(replicas):
    first, second, name = replicas
    seen: dict[str, str] = {}
    for i in range(30):
        user = f"u{i}"
        a, b = _ask(first.url, user), _ask(second.url, user)
        assert a.status_code == b.status_code == 200
        assert a.headers["x-pointsman-experiment"] == b.headers["x-pointsman-experiment"]
        arm = a.headers["x-pointsman-experiment"].split("=", 1)[1]
        assert a.headers["x-pointsman-model"] == {"control": "remote-a", "treatment": "remote-b"}[arm]
        seen[user] = arm
    assert set(seen.values()) == {"control", "treatment"}
    # no user, no key: served (by the control, since chat-default is no model of its own) but not enrolled
    anonymous = httpx.post(first.url + "/v1/chat/completions", timeout=30,
                           json={"model": "chat-default", "messages": [{"role": "user", "content": "hi"}]})
    assert anonymous.status_code == 200 and "x-pointsman-experiment" not in anonymous.headers

    answer_id = _ask(first.url, "u0").json()["id"]
    score = {"id": answer_id, "score": 5, "metric": "quality"}
    stored = httpx.post(first.url + "/v1/feedback", json=score)
    assert stored.status_code == 201, stored.text
    assert stored.json()["experiment"] == name
    again = httpx.post(second.url + "/v1/feedback", json=score)
    assert again.status_code == 409 and again.json()["error"]["code"] == "feedback_exists"
    unknown = httpx.post(first.url + "/v1/feedback", json={**score, "id": "chatcmpl-never"})
    assert unknown.status_code == 404
    bad = httpx.post(first.url + "/v1/feedback", json={"id": answer_id, "score": "great", "metric": "quality"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"

    changed = httpx.patch(f"{first.url}/admin/experiments/{name}", json={"weights": {"control": 0}})
    assert changed.status_code == 200, changed.text
    deadline = time.monotonic() + 5
    was_control = next(u for u, arm in seen.items() if arm == "control")
    while _ask(second.url, was_control).headers["x-pointsman-experiment"] != f"{name}=treatment":
        assert time.monotonic() < deadline, "the second replica never saw the new weights"
    assert all(_ask(second.url, u).headers["x-pointsman-experiment"] == f"{name}=treatment" for u in seen)

    results = httpx.get(f"{second.url}/admin/experiments/{name}/results")
    assert results.status_code == 200, results.text
    report = results.json()
    assert report["variants"]["control"]["requests"] >= 1 and "latency_s" in report["metrics"]
    assert report["winner"] is None  # one feedback score: nowhere near min_samples
    listed = httpx.get(first.url + "/admin/experiments").json()["data"]
    assert [e["name"] for e in listed] == [name]
    assert httpx.get(f"{first.url}/admin/experiments/missing/results").status_code == 404
    assert httpx.post(first.url + "/admin/experiments", json={"name": "x"}).status_code == 400
    paused = httpx.post(f"{first.url}/admin/experiments/{name}/pause")
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
