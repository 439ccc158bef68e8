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

    answer = _ask(first.url, "u0")
    answer_id, request_id = answer.json()["id"], answer.headers["x-request-id"]
    # the mock upstream gives every answer the id mock-1: it names no one answer, the request id does
    shared = httpx.post(first.url + "/v1/feedback", json={"id": answer_id, "score": 5, "metric": "quality"})
    assert shared.status_code == 409 and shared.json()["error"]["code"] == "ambiguous_id", shared.text
    score = {"id": request_id, "score": 5, "metric": "quality"}
    stored = httpx.post(first.url + "/v1/feedback", json=score)
    assert stored.status_code == 201, stored.text
    assert stored.json()["experiment"] == name and stored.json()["request_id"] == request_id
    assert stored.json()["variant"] == answer.headers["x-pointsman-experiment"].split("=", 1)[1]
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


def test_experiments_must_name_served_models_and_a_gone_arm_falls_back_to_the_control(replicas):
    """An experiment naming `no-such-model` was created (201); a reload that removed an arm's model was taken,
    and that arm's units then got 404 "The model ... does not exist"."""
    first, _, name = replicas
    variants = [{"name": "control", "model": "remote-a", "weight": 0}, {"name": "ghost", "model": "no-such-model"}]
    created = httpx.post(first.url + "/admin/experiments", json={"name": "ghost", "target": "t-ghost",
                                                                 "variants": variants})
    assert created.status_code == 400, created.text
    message = created.json()["error"]["message"]
    assert "'ghost'" in message and "unknown model 'no-such-model'" in message
    assert httpx.get(first.url + "/admin/experiments/ghost").status_code == 404

    path = first.extra["config"]
    good = path.read_text()
    try:
        # the config's own experiment uses remote-b: a reload without it is refused, the old config kept
        path.write_text(good.replace("  - {id: remote-b,", "  - {id: remote-c,"))
        refused = httpx.post(first.url + "/admin/reload", timeout=30)
        assert refused.status_code == 400, refused.text
        assert f"experiment {name!r}, variant 'treatment': unknown model 'remote-b'" in refused.text
        assert httpx.post(first.url + "/v1/chat/completions", timeout=30, json={
            "model": "remote-b", "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
        # an experiment made through the admin API is not in the file: the reload goes through, and the units
        # of its arm whose model is gone are served by the control, outside the experiment
        made = httpx.post(first.url + "/admin/experiments", json={
            "name": "gone-arm", "target": "t-gone",
            "variants": [{"name": "control", "model": "remote-a", "weight": 0},
                         {"name": "moved", "model": "remote-c"}]})
        assert made.status_code == 400  # remote-c is no model yet
        path.write_text(good.replace("routing:", "  - {id: remote-c, backend: openai, base_url: "
                                     f"\"{_base_url(good)}\", upstream_model: mock-model}}\nrouting:", 1))
        assert httpx.post(first.url + "/admin/reload", timeout=30).status_code == 200
        made = httpx.post(first.url + "/admin/experiments", json={
            "name": "gone-arm", "target": "t-gone",
            "variants": [{"name": "control", "model": "remote-a", "weight": 0},
                         {"name": "moved", "model": "remote-c"}]})
        assert made.status_code == 201, made.text
        before = _ask_target(first.url, "t-gone")
        assert before.status_code == 200 and before.headers["x-pointsman-experiment"] == "gone-arm=moved"
        path.write_text(good)
        assert httpx.post(first.url + "/admin/reload", timeout=30).status_code == 200
        after = _ask_target(first.url, "t-gone")
        assert after.status_code == 200, after.text
        assert after.headers["x-pointsman-model"] == "remote-a" and "x-pointsman-experiment" not in after.headers
    finally:
        path.write_text(good)
        httpx.post(first.url + "/admin/experiments/gone-arm/stop")


def _base_url(config: str) -> str:
    return config.split('base_url: "', 1)[1].split('"', 1)[0]


def _ask_target(url: str, target: str) -> httpx.Response:
    body = {"model": target, "user": "someone", "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
