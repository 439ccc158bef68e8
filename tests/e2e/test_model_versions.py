"""Model versions on live gateways: promote and rollback during a running load with no failed request, the
answers switching upstream; Deprecation and 410 model_archived; versions in /v1/models and /v1/route; the stages
surviving a restart; two replicas sharing Redis and PostgreSQL agreeing on the stage."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import httpx
import pytest

from tests.conftest import redis_url, require_redis, start_gateway, start_upstream
from tests.gateway.live import wait_for

REDIS = redis_url(14)  # a database of this xdist worker's own


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("versions-upstreams")
    one, two = start_upstream(tmp, "one"), start_upstream(tmp, "two")
    yield one, two
    one.stop()
    two.stop()


def _config(upstreams, storage: str) -> str:
    one, two = upstreams
    return f"""
models:
  - id: chat
    backend: openai
    base_url: "{one.url}"
    upstream_model: one
    aliases: [talk]
    versions:
      - {{version: 1.0.0, stage: production}}
      - {{version: 2.0.0, stage: staging, base_url: "{two.url}", upstream_model: two,
          sunset: "2030-01-01T00:00:00Z"}}
routing: {{health_check_s: 0}}
storage: {storage}
"""


def _chat(url: str, model: str = "chat") -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=30,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}]})


def _stage(url: str, version: str, stage: str, **extra) -> httpx.Response:
    return httpx.post(f"{url}/admin/models/chat/versions/{version}/stage", json={"stage": stage, **extra}, timeout=30)


def _serving(url: str) -> str:
    return httpx.post(url + "/v1/route", json={"model": "chat", "prompt": "hi"}, timeout=30).json()["model"]


async def _load(url: str, total: int = 300, concurrency: int = 24) -> tuple[list[tuple], int, list[float]]:
    """Requests `concurrency` at a time, each answered after ~20 ms (so some are always in flight); promote 2.0.0
    after a third of `total` have been answered, roll back after two thirds; sent until `total` have been sent and
    `concurrency` more after the rollback returned. Returns (sent, done, status, served version, upstream model) per
    request, how many were sent, and the times the promote and rollback calls returned."""
    results: list[tuple] = []
    switches: list[float] = []
    asked: list[str] = []
    sent_in_all = sent_after_rollback = 0
    body = {"model": "chat", "messages": [{"role": "user", "content": "sleep:0.02"}]}
    async with aiohttp.ClientSession() as session:
        async def admin(path: str, payload: dict | None) -> None:
            async with session.post(url + path, json=payload) as response:
                assert response.status == 200, await response.text()
            switches.append(time.monotonic())

        async def worker() -> None:
            nonlocal sent_in_all, sent_after_rollback
            # the load lasts until both switches are done, however long a loaded machine takes over them: the whole
            # run is about 0.5 s on an idle one, a promote alone about 0.1 s
            while sent_in_all < total or sent_after_rollback < concurrency:
                sent_in_all += 1
                if len(switches) == 2:
                    sent_after_rollback += 1
                sent = time.monotonic()
                async with session.post(url + "/v1/chat/completions", json=body) as response:
                    answer = await response.json()
                    served = response.headers.get("x-pointsman-model")
                results.append((sent, time.monotonic(), response.status, served,
                                answer.get("x_received", {}).get("body", {}).get("model")))
                # `asked` is set before the call: while one is in flight no other worker asks again, and a slow
                # promote only delays the rollback instead of skipping it; nor does the rollback come before a
                # request sent after the promote returned has been answered
                if len(results) >= total // 3 and not asked:
                    asked.append("promote")
                    await admin("/admin/models/chat/versions/2.0.0/stage", {"stage": "production"})
                elif (len(results) >= 2 * total // 3 and len(switches) == 1 and len(asked) == 1
                      and sent > switches[0]):
                    asked.append("rollback")
                    await admin("/admin/models/chat/rollback", None)

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), 120)
    return results, sent_in_all, switches


def test_a_cache_hit_from_a_deprecated_version_says_so_too(upstreams, tmp_path):
    config = _config(upstreams, "{database_url: ''}")
    config += "policies:\n  cache: {mode: always, ttl_s: 60}\n"
    gateway = start_gateway(tmp_path, config)
    try:
        assert _stage(gateway.url, "2.0.0", "production").status_code == 200  # 1.0.0 deprecated
        first, hit = _chat(gateway.url, "chat@1.0.0"), _chat(gateway.url, "chat@1.0.0")
        assert (first.headers["x-pointsman-cache"], hit.headers["x-pointsman-cache"]) == ("miss", "hit")
        assert hit.headers["deprecation"] == first.headers["deprecation"]  # a hit said nothing of it
        assert "deprecation" not in _chat(gateway.url).headers  # 2.0.0's answers, hit or not
    finally:
        gateway.stop()


def test_promote_and_rollback_under_load_fail_no_request_and_survive_a_restart(upstreams, tmp_path):
    config = _config(upstreams, f"{{database_url: 'sqlite+aiosqlite:///{tmp_path}/versions.db'}}")
    gateway = start_gateway(tmp_path, config)
    try:
        assert _serving(gateway.url) == "chat@1.0.0"
        results, sent_in_all, (promoted, rolled_back) = asyncio.run(_load(gateway.url))
        assert len(results) == sent_in_all >= 300 and {r[2] for r in results} == {200}  # not one failed request
        for sent, done, _, served, upstream_model in results:
            assert upstream_model == {"chat@1.0.0": "one", "chat@2.0.0": "two"}[served]  # its own upstream
            if promoted < sent and done < rolled_back:
                assert served == "chat@2.0.0"  # sent after the promotion, done before the rollback began
            elif sent > rolled_back or done < promoted:
                assert served == "chat@1.0.0"
        assert {r[3] for r in results} == {"chat@1.0.0", "chat@2.0.0"}

        # a rollback put 2.0.0 back in staging; a forced-free promote again deprecates 1.0.0
        assert _stage(gateway.url, "2.0.0", "production").status_code == 200
        old = _chat(gateway.url, "chat@1.0.0")
        assert old.status_code == 200 and old.headers["deprecation"].startswith("@")
        assert "sunset" not in old.headers  # 1.0.0 names no sunset
        assert "deprecation" not in _chat(gateway.url).headers
        refused = _stage(gateway.url, "1.0.0", "dev")
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "invalid_transition"
        assert _stage(gateway.url, "1.0.0", "archived").status_code == 200
        gone = _chat(gateway.url, "chat@1.0.0")
        assert gone.status_code == 410 and gone.json()["error"]["code"] == "model_archived"

        card = httpx.get(gateway.url + "/v1/models").json()["data"][0]
        assert card["id"] == "chat" and card["pointsman"]["version"] == "2.0.0"
        assert card["pointsman"]["versions"] == [{"version": "1.0.0", "stage": "archived"},
                                                 {"version": "2.0.0", "stage": "production"}]
        route = httpx.post(gateway.url + "/v1/route", json={"model": "talk", "prompt": "hi"}).json()
        assert route["version"] == {"model": "chat", "version": "2.0.0", "stage": "production"}
        history = httpx.get(gateway.url + "/admin/models/chat/versions").json()["transitions"]
        assert [(h["version"], h["to"], h["reason"]) for h in history][-3:] == [
            ("1.0.0", "deprecated", "replaced"), ("2.0.0", "production", "promoted"), ("1.0.0", "archived", "stage")]
    finally:
        gateway.stop()
    again = start_gateway(tmp_path, config)  # the same config, which still says 1.0.0 is in production
    try:
        assert _serving(again.url) == "chat@2.0.0"
        assert _chat(again.url, "chat@1.0.0").status_code == 410
    finally:
        again.stop()


def test_two_replicas_sharing_redis_and_postgresql_agree_on_the_stage(upstreams, tmp_path, pg_database):
    require_redis(REDIS)
    database = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{pg_database}"
    config = _config(upstreams, f'{{redis_url: "{REDIS}", database_url: "{database}"}}')
    first, second = start_gateway(tmp_path, config), start_gateway(tmp_path, config)
    try:
        assert _serving(first.url) == _serving(second.url) == "chat@1.0.0"
        assert _stage(first.url, "2.0.0", "production").status_code == 200
        assert _serving(first.url) == "chat@2.0.0"  # at once on the replica that made the change
        wait_for(lambda: _serving(second.url) == "chat@2.0.0", what="the other replica on 2.0.0")
        assert _chat(second.url).json()["x_received"]["body"]["model"] == "two"
        assert httpx.post(second.url + "/admin/models/chat/rollback").status_code == 200
        wait_for(lambda: _serving(first.url) == "chat@1.0.0", what="the first replica back on 1.0.0")
        second.stop()
        second = start_gateway(tmp_path, config)
        assert _serving(second.url) == "chat@1.0.0"
        stages = httpx.get(second.url + "/admin/models/chat/versions").json()["data"]
        assert [(v["version"], v["stage"]) for v in stages] == [("1.0.0", "production"), ("2.0.0", "staging")]
    finally:
        first.stop()
        second.stop()
