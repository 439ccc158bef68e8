"""The admin API's keys and analytics on a live gateway over PostgreSQL and Redis, driven by the openai SDK with
known traffic: every number the analytics, forecasts, advice and `pointsman admin` give checked against the
traffic, and the edges an operator meets (keys that may use nothing, filters that match nothing, a total budget,
the key database gone)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from datetime import UTC, datetime, timedelta

import httpx
import openai
import pytest

from tests.conftest import POINTSMAN, ROOT, free_port, fresh_pg_database, http, start_gateway
from tests.gateway.live import wait_for
from tests.services import REDIS_SERVER, RedisServer, pg_admin

ADMIN_KEY = "sk-hunt-admin"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
TASKS = ("code", "reasoning", "creative", "summarization", "translation", "extraction", "qa", "chat")
HELLO = [{"role": "user", "content": "hello there"}]  # the fake upstream: 2 prompt tokens, 3 completion tokens
BIG, CHAT_X, SMALL = 80e-6, 18e-6, 8e-6  # that answer priced on each model: (2 x in + 3 x out) / 1e6


def _served_config(upstream_url: str, database: str, redis_url: str) -> str:
    def capabilities(score: float) -> str:
        return "{" + ", ".join(f"{t}: {score}" for t in TASKS) + "}"

    return f"""
auth: {{api_keys: ["{ADMIN_KEY}"]}}
models:
  - {{id: big, backend: openai, base_url: "{upstream_url}", upstream_model: mock-model,
     pricing: {{input_per_mtok: 10.0, output_per_mtok: 20.0}}, capabilities: {capabilities(0.9)}}}
  - {{id: small, backend: openai, base_url: "{upstream_url}", upstream_model: mock-model, auto: false,
     pricing: {{input_per_mtok: 1.0, output_per_mtok: 2.0}}, capabilities: {capabilities(0.88)}}}
  - {{id: chat-x, backend: openai, base_url: "{upstream_url}", upstream_model: mock-model, auto: false,
     pricing: {{input_per_mtok: 3.0, output_per_mtok: 4.0}}}}
routing: {{health_check_s: 0}}
policies:
  cache: {{mode: deterministic}}
  budgets:
    - {{scope: key, period: day, max_tokens: 1000000}}
    - {{scope: global, period: month, max_cost_usd: 10.0}}
    - {{scope: model, match: big, period: total, max_cost_usd: 1.0}}
storage: {{redis_url: "{redis_url}", database_url: "postgresql+asyncpg://postgres@127.0.0.1:5432/{database}"}}
"""


def _get(url: str, headers: dict | None = None) -> tuple[int, dict]:
    status, _, raw = http("GET", url, headers=ADMIN if headers is None else headers)
    return status, json.loads(raw)


@pytest.fixture(scope="module")
def live(upstream, tmp_path_factory):
    """A gateway on PostgreSQL and a Redis of its own that has served, through the openai SDK: 4 auto requests
    of the admin key (big), 3 identical chat-x requests of team t1's key (a miss, then 2 cache hits), 2 auto
    requests of team t2's key (big), and 1 auto request of a key that may use no model (403)."""
    if not os.path.exists(REDIS_SERVER):
        pytest.skip(f"{REDIS_SERVER} not found")
    tmp = tmp_path_factory.mktemp("hunt")
    redis = RedisServer(free_port(), tmp / "redis.log")
    redis.start()
    with fresh_pg_database() as database:
        server = start_gateway(tmp, _served_config(upstream.url, database, f"redis://127.0.0.1:{redis.port}/0"))
        try:
            def create(**spec) -> dict:
                answer = httpx.post(server.url + "/admin/keys", json=spec, headers=ADMIN)
                assert answer.status_code == 201, answer.text
                return answer.json()

            keys = {"t1": create(role="user", team="t1", models=["chat-*"]), "t2": create(role="user", team="t2"),
                    "none": create(role="user", team="t3", models=["nothing-*"])}

            def client(secret: str) -> openai.OpenAI:
                return openai.OpenAI(base_url=server.url + "/v1", api_key=secret, max_retries=0)

            for _ in range(4):
                answer = client(ADMIN_KEY).chat.completions.with_raw_response.create(
                    model="auto", messages=HELLO, max_tokens=10)
                assert answer.headers["x-pointsman-model"] == "big"
                server.extra["task"] = answer.headers["x-pointsman-task"]
            caches = [client(keys["t1"]["key"]).chat.completions.with_raw_response.create(
                model="chat-x", messages=HELLO, temperature=0, max_tokens=10).headers["x-pointsman-cache"]
                for _ in range(3)]
            assert caches == ["miss", "hit", "hit"]
            for _ in range(2):
                client(keys["t2"]["key"]).chat.completions.create(model="auto", messages=HELLO, max_tokens=10)
            with pytest.raises(openai.PermissionDeniedError):
                client(keys["none"]["key"]).chat.completions.create(model="auto", messages=HELLO, max_tokens=10)
            assert [m.id for m in client(keys["none"]["key"]).models.list()] == []
            wait_for(lambda: _get(server.url + "/admin/analytics?since=-1h")[1]["totals"]["requests"] == 10,
                     what="ten usage rows")
            server.extra["keys"] = keys
            yield server
        finally:
            server.stop()
            redis.kill()


def test_analytics_count_the_known_traffic(live):
    keys = live.extra["keys"]
    status, report = _get(live.url + "/admin/analytics?since=-1h&group_by=team&bucket=day")
    assert status == 200
    totals = report["totals"]
    assert (totals["requests"], totals["errors"], totals["prompt_tokens"], totals["completion_tokens"]) == (
        10, 1, 18, 27)
    assert totals["cost_usd"] == pytest.approx(6 * BIG + CHAT_X)  # the hits cost nothing
    assert (totals["cache_hits"], totals["cache_hit_rate"]) == (2, 0.2)
    teams = {g["key"]: (g["requests"], g["errors"], g["cost_usd"], g["cache_hit_rate"]) for g in report["groups"]}
    assert teams == {None: (4, 0, pytest.approx(4 * BIG), 0), "t1": (3, 0, pytest.approx(CHAT_X), 2 / 3),
                     "t2": (2, 0, pytest.approx(2 * BIG), 0), "t3": (1, 1, 0, 0)}
    # one day bucket (or two across midnight): the series adds up to the totals for every team
    for team, (requests, *_rest) in teams.items():
        assert sum(s["requests"] for s in report["series"] if s["key"] == team) == requests
    by_key = {g["key"]: g["requests"] for g in _get(live.url + "/admin/analytics?since=-1h&group_by=key")[1]["groups"]}
    assert by_key == {"static-0": 4, keys["t1"]["id"]: 3, keys["t2"]["id"]: 2, keys["none"]["id"]: 1}
    routes = {(r["route"], r["model"]): r["requests"] for r in report["routes"]}
    assert routes == {("auto", "big"): 6, ("manual", "chat-x"): 1, (None, "chat-x"): 2, (None, "auto"): 1}
    for query in ("team=nobody", "key_id=key_nobody", "model=nothing"):  # filters that match nothing
        assert _get(live.url + f"/admin/usage?{query}")[1] == {"object": "list", "data": [], "has_more": False,
                                                               "last_id": None}


def test_forecast_of_a_total_budget_says_when_it_runs_out(live):
    asked = datetime.now(UTC)
    forecasts = {(f["budget"], f["member"]): f for f in _get(live.url + "/admin/analytics/forecast")[1]["data"]}
    model = forecasts[(2, "big")]  # 6 requests served by big, 1 USD in total
    assert (model["used"], model["projected"], model["alert"]) == (pytest.approx(6 * BIG), None, False)
    assert model["rate_per_hour"] > 0 and model["runs_out_at"] is not None  # it was None until the limit was spent
    hours_left = (1.0 - model["used"]) / model["rate_per_hour"]
    runs_out = datetime.fromisoformat(model["runs_out_at"])
    assert abs(runs_out - (asked + timedelta(hours=hours_left))) < timedelta(seconds=30)


def test_the_live_counters_are_the_source_when_they_match_the_rows(live):
    # Redis adds the costs in long double, the database in double: sums that differ only in their last digits
    # read as the store having lost its counters ("usage_rows")
    def settled():
        data = _get(live.url + "/admin/budgets")[1]["data"]
        return data if data[0]["members"] and sum(m["used_tokens"] for m in data[0]["members"]) == 35 else None

    budgets = wait_for(settled, what="the budget counters settled")
    assert {m["member"]: (m["used_tokens"], m["source"]) for m in budgets[0]["members"]} == {
        "static-0": (20, "store"), live.extra["keys"]["t1"]["id"]: (5, "store"),
        live.extra["keys"]["t2"]["id"]: (10, "store"), live.extra["keys"]["none"]["id"]: (0, "store")}
    (glob,) = budgets[1]["members"]
    assert (glob["member"], glob["used_usd"], glob["source"]) == ("*", pytest.approx(6 * BIG + CHAT_X), "store")


def test_recommendations_of_one_team(live):
    status, advice = _get(live.url + "/admin/analytics/recommendations?since=-1h&min_requests=2&team=t2")
    assert status == 200
    assert [(a["task"], a["from_model"], a["to_model"], a["requests"]) for a in advice["data"]] == [
        (live.extra["task"], "big", "small", 2)]
    (one,) = advice["data"]
    assert (one["current_cost_usd"], one["projected_cost_usd"], one["savings_pct"]) == (
        pytest.approx(2 * BIG), pytest.approx(2 * SMALL), pytest.approx(90))
    assert _get(live.url + "/admin/analytics/recommendations?since=-1h&min_requests=1&team=t1")[1]["data"] == []


def _cli(server, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "POINTSMAN_URL": server.url, "POINTSMAN_ADMIN_KEY": ADMIN_KEY}
    return subprocess.run([*POINTSMAN, "admin", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


def test_cli_prints_the_same_numbers(live):
    done = _cli(live, "usage", "--since", "1h", "--group-by", "team")
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1:6] for line in done.stdout.splitlines()[1:] if line.strip()}
    assert rows["total"] == ["10", "1", "18", "27", "0.000498"]
    assert rows["t1"] == ["3", "0", "6", "9", "1.8e-05"] and rows["t3"] == ["1", "1", "0", "0", "0"]
    forecast = _cli(live, "forecast")
    assert forecast.returncode == 0, forecast.stderr
    (total,) = [line.split() for line in forecast.stdout.splitlines() if line.split()[:3] == ["2", "model", "big"]]
    assert total[-1] != "-"  # RUNS_OUT_AT
    listed = _cli(live, "keys", "list")
    assert listed.returncode == 0 and all(k["id"] in listed.stdout for k in live.extra["keys"].values())


def _config(upstream_url: str, database: str) -> str:
    return f"""
auth: {{api_keys: ["{ADMIN_KEY}"]}}
models:
  - id: chat-a
    backend: openai
    base_url: {upstream_url}
    upstream_model: mock-model
    pricing: {{input_per_mtok: 3.0, output_per_mtok: 4.0}}
routing: {{health_check_s: 0}}
storage: {{database_url: "postgresql+asyncpg://postgres@127.0.0.1:5432/{database}"}}
"""


def test_a_key_database_that_cannot_be_reached_is_a_503_not_a_500(upstream, tmp_path):
    # the key table's database goes away under a running gateway: a key it has not cached yet, and the admin
    # API of keys, answer 503 service_unavailable in OpenAI's shape (as analytics does), never a 500
    with fresh_pg_database() as database:
        server = start_gateway(tmp_path, _config(upstream.url, database))
        try:
            status, _, raw = http("POST", server.url + "/admin/keys", {"role": "user"}, headers=ADMIN)
            assert status == 201
            created = json.loads(raw)
            asyncio.run(pg_admin(f"DROP DATABASE {database} WITH (FORCE)"))
            client = openai.OpenAI(base_url=server.url + "/v1", api_key=created["key"], max_retries=0)
            with pytest.raises(openai.InternalServerError) as refused:
                client.chat.completions.create(model="chat-a", messages=[{"role": "user", "content": "hi"}])
            assert refused.value.status_code == 503 and refused.value.code == "service_unavailable"
            for method, path, body in (("GET", "/admin/keys", None), ("POST", "/admin/keys", {"role": "user"}),
                                       ("GET", f"/admin/keys/{created['id']}", None),
                                       ("DELETE", f"/admin/keys/{created['id']}", None)):
                status, _, raw = http(method, server.url + path, body, headers=ADMIN)
                error = json.loads(raw)["error"]
                assert (status, error["code"], error["type"]) == (503, "service_unavailable", "api_error"), path
        finally:
            server.stop()


def test_an_expiry_without_a_timezone_is_a_400_naming_it(live):
    answer = httpx.post(live.url + "/admin/keys", json={"expires_at": "2030-01-01T00:00:00"}, headers=ADMIN)
    error = answer.json()["error"]
    assert (answer.status_code, error["type"], error["param"]) == (400, "invalid_request_error", "expires_at")
    assert "timezone" in error["message"]
