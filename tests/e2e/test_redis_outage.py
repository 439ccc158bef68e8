"""A Redis outage under load through a live gateway: the cache bypasses, the rate limit allows, a `deny` budget
answers 503 at once, the gateway reconnects by itself when Redis is back, and no usage row is lost."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tests.conftest import Process, start_gateway
from tests.services import RedisServer

BUDGETED, OTHER = "budgeted-user", "other-user"
CONCURRENCY = 8
DEADLINE_S = 30.0  # for any one phase to finish


@dataclass(frozen=True)
class Result:
    request_id: str
    user: str
    status: int
    cache: str | None  # x-pointsman-cache
    started: float
    seconds: float


async def _send(session: aiohttp.ClientSession, url: str, ids: range, tag: str,
                results: list[Result] | None = None) -> list[Result]:
    """Requests `ids` at CONCURRENCY: even ids from the budgeted user, odd ones from the other; every third at
    temperature 0 (cacheable) with a prompt that repeats. Each result is appended to `results` as it comes."""
    queue = list(ids)
    results = [] if results is None else results

    async def worker() -> None:
        while queue:
            i = queue.pop(0)
            user = BUDGETED if i % 2 == 0 else OTHER
            body: dict = {"model": "remote-a", "user": user, "max_tokens": 5,
                          "messages": [{"role": "user", "content": f"hello {i % 6}" if i % 3 == 0 else f"hi {i}"}]}
            if i % 3 == 0:
                body["temperature"] = 0
            request_id = f"outage-{tag}-{i}"
            started = time.monotonic()
            async with session.post(url + "/v1/chat/completions", json=body,
                                    headers={"x-request-id": request_id}) as response:
                await response.read()
                results.append(Result(request_id, user, response.status, response.headers.get("x-pointsman-cache"),
                                      started, time.monotonic() - started))

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(CONCURRENCY))), DEADLINE_S)
    return results


async def _run(gateway: Process, redis_server: RedisServer) -> tuple[dict[str, list[Result]], float]:
    """The requests of each phase, and when Redis was killed."""
    phases: dict[str, list[Result]] = {}
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        phases["healthy"] = await _send(session, gateway.url, range(40), "healthy")

        # Redis dies while 60 requests are flowing: killed once the first 10 of them have been answered
        dying: list[Result] = []
        flowing = asyncio.ensure_future(_send(session, gateway.url, range(60), "dying", dying))
        deadline = time.monotonic() + DEADLINE_S
        while len(dying) < 10 and not flowing.done():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        await asyncio.to_thread(redis_server.kill)
        killed = time.monotonic()
        phases["dying"] = await flowing

        phases["outage"] = await _send(session, gateway.url, range(60), "outage")  # every one started after

        await asyncio.to_thread(redis_server.start)  # the same port
        # the gateway reconnects by itself: batches until one is answered in full, within bounds
        phases["recovering"] = []
        for batch in range(10):
            results = await _send(session, gateway.url, range(batch * 8, batch * 8 + 8), "recovering")
            phases["recovering"] += results
            if all(r.status == 200 for r in results):
                break
        phases["recovered"] = await _send(session, gateway.url, range(40), "recovered")
    return phases, killed


def test_redis_outage_under_load(upstream, redis_server: RedisServer, tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    config = f"""
models:
  - {{id: remote-a, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model}}
routing: {{health_check_s: 0}}
storage: {{redis_url: "redis://127.0.0.1:{redis_server.port}/0", database_url: "sqlite+aiosqlite:///{db}"}}
policies:
  cache: {{mode: deterministic}}
  rate_limits: [{{scope: user, rpm: 1000000, on_store_error: allow}}]
  budgets: [{{scope: user, match: "{BUDGETED}", period: day, max_tokens: 100000000, on_store_error: deny}}]
"""
    gateway = start_gateway(tmp_path, config)
    try:
        phases, killed = asyncio.run(_run(gateway, redis_server))
    finally:
        exit_code = gateway.stop(signal.SIGTERM)  # the rows still queued are written on the way out
    log = gateway.output()
    assert exit_code == 0, log

    every = [r for results in phases.values() for r in results]
    # the other user is never refused: the cache bypasses and the rate limit allows while Redis is away
    assert {r.status for r in every if r.user == OTHER} == {200}, log
    assert {r.status for r in phases["healthy"]} == {200}
    assert "hit" in {r.cache for r in phases["healthy"]}  # the cache works while Redis does
    assert any(r.started > killed for r in phases["dying"])  # Redis died while the load was flowing
    assert {r.status for r in phases["dying"]} <= {200, 503}
    outage = phases["outage"]
    refused = [r for r in outage if r.user == BUDGETED]
    assert refused and {r.status for r in refused} == {503}  # on_store_error: deny
    assert max(r.seconds for r in refused) < 1.0, sorted(r.seconds for r in refused)[-5:]  # no hang
    assert {r.cache for r in outage if r.status == 200} == {"bypass"}  # the cache is bypassed, not failed
    assert phases["recovering"][-8:] and {r.status for r in phases["recovering"][-8:]} == {200}, log
    assert len(phases["recovering"]) < 80, "the gateway did not reconnect to Redis by itself"
    assert {r.status for r in phases["recovered"]} == {200}
    assert "state store" in log  # the outage was logged

    # one usage row per request sent, none lost, none doubled, each with the status its client saw
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT request_id, http_status FROM usage_rows").fetchall()
    sent = {r.request_id: r.status for r in every}
    assert len(sent) == len(every)
    assert len(rows) == len(sent), (len(rows), len(sent))
    assert dict(rows) == sent
