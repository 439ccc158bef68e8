"""Rate limits through two live replicas sharing Redis: one global limit, OpenAI's headers, 429 with Retry-After."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.conftest import redis_url, require_redis, start_gateway

REDIS = redis_url(14)  # a database of this xdist worker's own


@pytest.fixture(scope="module")
def replicas(upstream, tmp_path_factory):
    require_redis(REDIS)
    tmp = tmp_path_factory.mktemp("ratelimit")
    team = uuid.uuid4().hex  # a bucket of this run's own, whatever Redis holds from earlier runs
    config = f"""
models:
  - {{id: remote-a, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model}}
routing: {{health_check_s: 0}}
storage: {{redis_url: "{REDIS}", database_url: ""}}
policies:
  rate_limits: [{{scope: user, match: "{team}", rpm: 6}}]
"""
    first, second = start_gateway(tmp, config), start_gateway(tmp, config)
    yield first, second, team
    first.stop()
    second.stop()


def test_one_limit_across_two_replicas_with_openai_headers(replicas):
    first, second, user = replicas
    body = {"model": "remote-a", "user": user, "messages": [{"role": "user", "content": "hi"}]}
    answers = [httpx.post(g.url + "/v1/chat/completions", json=body) for g in (first, second) * 4]
    statuses = [a.status_code for a in answers]
    assert statuses.count(200) == 6 and statuses.count(429) == 2  # rpm 6, shared by both replicas
    ok = answers[0]
    assert ok.headers["x-ratelimit-limit-requests"] == "6" and ok.headers["x-ratelimit-remaining-requests"] == "5"
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded" and int(refused.headers["retry-after"]) >= 1
    # another user is not limited
    other = {**body, "user": "someone-else"}
    assert httpx.post(first.url + "/v1/chat/completions", json=other).status_code == 200
