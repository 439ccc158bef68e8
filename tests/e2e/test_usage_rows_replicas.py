"""Usage rows and experiment assignment through two replicas sharing Redis and PostgreSQL: one row per request
(x-request-id), however it ended, and the same arm for a user on either replica."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx

from tests.e2e.replicas import replicas


def _config(upstream: str, redis: str, database: str) -> str:
    return f"""
models:
  - {{id: remote-a, backend: openai, base_url: "{upstream}", upstream_model: mock-model}}
  - {{id: remote-b, backend: openai, base_url: "{upstream}", upstream_model: mock-model}}
routing: {{health_check_s: 0}}
storage: {{redis_url: "{redis}", database_url: "{database}"}}
policies:
  rate_limits:
    - {{scope: user, rpm: 1000}}
  budgets:
    - {{scope: global, period: day, max_tokens: 1000000}}
experiments:
  - name: ab
    target: chat
    variants:
      - {{name: control, model: remote-a, weight: 50}}
      - {{name: other, model: remote-b, weight: 50}}
"""


async def _one(client: httpx.AsyncClient, url: str, i: int, request_id: str) -> tuple[str, str | None, int]:
    user = f"user-{i % 20}"
    body = {"model": "chat", "user": user, "max_tokens": 5,
            "messages": [{"role": "user", "content": f"hi {i}" + (" gap:0.2" if i % 3 else "")}]}
    headers = {"x-request-id": request_id}
    if i % 3 == 0:
        response = await client.post(url + "/v1/chat/completions", json=body, headers=headers)
        return user, response.headers.get("x-pointsman-experiment"), response.status_code
    body["stream"] = True
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as response:
        experiment = response.headers.get("x-pointsman-experiment")
        if i % 3 == 1:  # leave after the first payload
            async for _ in response.aiter_lines():
                break
        else:
            await response.aread()
        return user, experiment, response.status_code


async def _drive(urls: list[str], ids: list[str]) -> list[tuple[str, str | None, int]]:
    async with httpx.AsyncClient(timeout=30) as client:
        return await asyncio.gather(*(_one(client, urls[i % 2], i, ids[i]) for i in range(len(ids))))


def test_one_usage_row_per_request_and_one_arm_per_user(tmp_path):
    with replicas(tmp_path, _config) as (first, second, _):
        ids = [f"rows-{i}-{uuid.uuid4().hex[:8]}" for i in range(60)]
        results = asyncio.run(_drive([first.url, second.url], ids))
        assert all(status == 200 for _, _, status in results)
        arms: dict[str, set[str | None]] = {}
        for user, experiment, _ in results:
            arms.setdefault(user, set()).add(experiment)
        assert all(len(a) == 1 and None not in a for a in arms.values()), arms
        deadline = time.monotonic() + 30
        while True:
            rows = httpx.get(first.url + "/admin/usage", params={"limit": 1000}).json()["data"]
            found = [r["request_id"] for r in rows if r["request_id"] in set(ids)]
            if len(set(found)) == len(ids) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert sorted(found) == sorted(ids)  # each once
        by_id = {r["request_id"]: r for r in rows}
        for i, request_id in enumerate(ids):
            assert by_id[request_id]["experiment"] == results[i][1].split("=")[0], by_id[request_id]
