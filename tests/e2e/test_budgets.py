"""Budgets through two live replicas sharing Redis: 300 concurrent requests never exceed a budget, refusals are
429 budget_exceeded naming the scope, /v1/usage reports what is left, and a spent model is skipped."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import httpx
import pytest

from tests.conftest import redis_url, require_redis, start_gateway

REDIS = redis_url(14)  # a database of this xdist worker's own
LIMIT = 300  # tokens; each answer below uses 3 (1 prompt word, 2 answer words) and may reserve 9


@pytest.fixture(scope="module")
def replicas(upstream, tmp_path_factory):
    require_redis(REDIS)
    tmp = tmp_path_factory.mktemp("budgets")
    user = uuid.uuid4().hex  # counters of this run's own
    config = f"""
models:
  - {{id: remote-a, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model}}
  - {{id: remote-b, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model}}
routing: {{health_check_s: 0}}
storage: {{redis_url: "{REDIS}", database_url: ""}}
policies:
  budgets:
    - {{scope: user, match: "{user}", period: day, max_tokens: {LIMIT}}}
    - {{scope: model, match: remote-a, period: total, max_tokens: 1}}
"""
    first, second = start_gateway(tmp, config), start_gateway(tmp, config)
    yield first, second, user
    first.stop()
    second.stop()


async def _flood(urls: list[str], body: dict, total: int) -> list[tuple[int, dict]]:
    async with aiohttp.ClientSession() as session:
        async def one(i: int) -> tuple[int, dict]:
            async with session.post(urls[i % len(urls)] + "/v1/chat/completions", json=body) as response:
                return response.status, await response.json()
        return await asyncio.gather(*(one(i) for i in range(total)))


def test_300_concurrent_requests_through_two_replicas_never_exceed_the_budget(replicas):
    first, second, user = replicas
    # remote-a's own budget (1 token) is spent by its first reservation: the chain goes on to remote-b
    body = {"model": "remote-b", "user": user, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    results = asyncio.run(_flood([first.url, second.url], body, 300))
    served = [r for s, r in results if s == 200]
    refused = [r for s, r in results if s == 429]
    assert len(served) + len(refused) == 300 and refused
    used = sum(r["usage"]["total_tokens"] for r in served)
    assert 0 < used <= LIMIT  # never over (worst cases are reserved up front, the actual usage settled after)
    error = refused[0]["error"]
    assert error["code"] == "budget_exceeded" and user in error["message"] and "300" in error["message"]
    usage = httpx.get(first.url + "/v1/usage", headers={"x-pointsman-user": user}).json()
    mine = next(b for b in usage["budgets"] if b["scope"] == "user")
    assert mine["used_tokens"] == used and mine["remaining_tokens"] == LIMIT - used


def test_a_model_whose_budget_is_spent_is_skipped(replicas):
    first, _, _ = replicas
    body = {"model": "remote-a:remote-b", "messages": [{"role": "user", "content": "hi"}]}
    first_answer = httpx.post(first.url + "/v1/chat/completions", json=body)
    answer = httpx.post(first.url + "/v1/chat/completions", json=body)
    assert first_answer.status_code == answer.status_code == 200
    assert answer.headers["x-pointsman-model"] == "remote-b"  # remote-a's 1-token budget cannot take a request


def test_route_explains_that_a_spent_model_is_not_tried(replicas):
    first, _, _ = replicas
    # remote-a's budget (1 token in total) cannot cover any request's worst case
    chain = httpx.post(first.url + "/v1/route", json={"model": "remote-a:remote-b", "prompt": "hi"}).json()
    assert chain["model"] == "remote-b" and chain["chain"] == ["remote-b"]
    assert chain["skipped"]["remote-a"].startswith("budget exceeded: ") and "remote-a" in chain["skipped"]["remote-a"]
    auto = httpx.post(first.url + "/v1/route", json={"model": "auto", "prompt": "hi"}).json()
    assert auto["model"] == "remote-b" and "remote-a" not in auto["chain"]
    spent = next(c for c in auto["candidates"] if c["model"] == "remote-a")
    assert spent["eligible"] is False and spent["reason"].startswith("budget exceeded: ")
