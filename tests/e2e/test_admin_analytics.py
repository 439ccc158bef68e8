"""The analytics admin API and `pointsman admin` on a live gateway: known traffic through the fake upstream, then
exact totals, groups, rows, budgets, forecasts and advice; roles; and the CLI as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import POINTSMAN, ROOT, http, start_gateway
from tests.gateway.live import wait_for

ADMIN_KEY = "sk-analytics-admin"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
TASKS = ("code", "reasoning", "creative", "summarization", "translation", "extraction", "qa", "chat")
HELLO = [{"role": "user", "content": "hello there"}]  # the fake upstream: 2 prompt tokens, 3 completion tokens


def _config(upstream_url: str) -> str:
    def capabilities(score: float) -> str:
        return "{" + ", ".join(f"{t}: {score}" for t in TASKS) + "}"

    return f"""
auth: {{api_keys: ["{ADMIN_KEY}"]}}
models:
  - id: big
    backend: openai
    base_url: {upstream_url}
    upstream_model: mock-model
    pricing: {{input_per_mtok: 10.0, output_per_mtok: 20.0}}
    capabilities: {capabilities(0.9)}
  - id: small
    backend: openai
    base_url: {upstream_url}
    upstream_model: mock-model
    auto: false
    pricing: {{input_per_mtok: 1.0, output_per_mtok: 2.0}}
    capabilities: {capabilities(0.88)}
routing: {{health_check_s: 0}}
policies:
  budgets:
    - {{scope: key, period: day, max_tokens: 1000000}}
    - {{scope: global, period: month, max_cost_usd: 10.0}}
"""


def _get(url: str, headers: dict | None = None) -> tuple[int, dict]:
    status, _, raw = http("GET", url, headers=ADMIN if headers is None else headers)
    return status, json.loads(raw)


@pytest.fixture(scope="module")
def served(upstream, tmp_path_factory):
    """A gateway that has served 3 auto requests (all to big), 2 to small, and 1 that failed upstream."""
    server = start_gateway(tmp_path_factory.mktemp("analytics"), _config(upstream.url))
    tasks = set()
    try:
        for _ in range(3):
            status, headers, _ = http("POST", server.url + "/v1/chat/completions", {"model": "auto", "messages": HELLO},
                                      headers={**ADMIN, "x-pointsman-user": "alice"})
            assert status == 200 and headers["x-pointsman-model"] == "big"
            tasks.add(headers["x-pointsman-task"])
        for _ in range(2):
            assert http("POST", server.url + "/v1/chat/completions", {"model": "small", "messages": HELLO},
                        headers=ADMIN)[0] == 200
        bad = [{"role": "user", "content": "status:400"}]
        assert http("POST", server.url + "/v1/chat/completions", {"model": "big", "messages": bad},
                    headers=ADMIN)[0] == 400
        wait_for(lambda: _get(server.url + "/admin/analytics?since=-1h")[1]["totals"]["requests"] == 6,
                 what="six usage rows")
        server.extra["task"] = tasks.pop()
        yield server
    finally:
        server.stop()


def test_analytics_counts_the_traffic_exactly(served):
    status, report = _get(served.url + "/admin/analytics?since=-1h&group_by=model&bucket=minute")
    assert status == 200 and report["object"] == "analytics" and report["sampled"] is False
    totals = report["totals"]
    assert (totals["requests"], totals["errors"], totals["prompt_tokens"], totals["completion_tokens"]) == (
        6, 1, 10, 15)
    assert totals["cost_usd"] == pytest.approx(3 * 80e-6 + 2 * 8e-6)  # (2 x 10 + 3 x 20) / 1e6 on big, a tenth
    assert totals["latency_ms_p50"] > 0 and totals["cache_hits"] == 0 and totals["cache_hit_rate"] == 0
    assert {g["key"]: (g["requests"], g["errors"]) for g in report["groups"]} == {"big": (4, 1), "small": (2, 0)}
    assert sum(s["requests"] for s in report["series"]) == 6 and {s["key"] for s in report["series"]} == {
        "big", "small"}
    assert {(r["route"], r["model"]): r["requests"] for r in report["routes"]} == {
        ("auto", "big"): 3, ("manual", "small"): 2, (None, "big"): 1}  # a failed request records no route
    by_user = _get(served.url + "/admin/analytics?since=-1h&group_by=user")[1]
    assert {g["key"]: g["requests"] for g in by_user["groups"]} == {"alice": 3, None: 3}
    by_task = _get(served.url + "/admin/analytics?since=-1h&group_by=task")[1]
    assert {g["key"]: g["requests"] for g in by_task["groups"]} == {served.extra["task"]: 3, None: 3}  # manual: none
    later = _get(served.url + "/admin/analytics?since=2020-01-01T00:00:00Z&until=2020-01-02T00:00:00Z")[1]
    assert later["totals"]["requests"] == 0 and later["since"] == "2020-01-01T00:00:00Z"


@pytest.mark.parametrize(("query", "param"), [("group_by=colour", "group_by"), ("bucket=week", "bucket"),
                                              ("since=yesterday", "since"), ("until=-5x", "until"),
                                              ("since=-1h&until=-2h", "since")])
def test_bad_parameters_are_400s_naming_the_parameter(served, query, param):
    status, body = _get(served.url + f"/admin/analytics?{query}")
    assert status == 400 and body["error"]["param"] == param and body["error"]["type"] == "invalid_request_error"


def test_usage_rows_page_newest_first(served):
    status, first = _get(served.url + "/admin/usage?limit=4")
    assert status == 200 and len(first["data"]) == 4 and first["has_more"] is True
    assert first["data"][0]["status"] == "error" and first["data"][0]["http_status"] == 400  # the last one sent
    rest = _get(served.url + f"/admin/usage?limit=4&after_id={first['last_id']}")[1]
    assert len(rest["data"]) == 2 and rest["has_more"] is False
    ids = [r["id"] for r in first["data"] + rest["data"]]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 6
    small = _get(served.url + "/admin/usage?model=small&key_id=static-0")[1]["data"]
    assert [(r["model_served"], r["prompt_tokens"], r["completion_tokens"]) for r in small] == [("small", 2, 3)] * 2
    assert _get(served.url + "/admin/usage?team=nobody")[1]["data"] == []
    for query, param in (("limit=0", "limit"), ("limit=1001", "limit"), ("after_id=x", "after_id"),
                         ("since=-1h&until=-2h", "since")):  # it answered an empty page; analytics a 400
        status, body = _get(served.url + f"/admin/usage?{query}")
        assert status == 400 and body["error"]["param"] == param


def test_budgets_and_forecasts_read_the_live_counters(served):
    def settled():  # each request's settle replaces its reservation with what it used: 5 answers x 5 tokens
        data = _get(served.url + "/admin/budgets")[1]["data"]
        return data if data[0]["members"] and data[0]["members"][0]["used_tokens"] == 25 else None

    key, glob = wait_for(settled, what="the budget counters settled")
    assert (key["scope"], key["period"], key["limit_tokens"]) == ("key", "day", 1_000_000)
    assert key["members"] == [{"member": "static-0", "source": "store", "used_tokens": 25,
                               "remaining_tokens": 1_000_000 - 25}]
    assert glob["members"][0]["member"] == "*"
    assert glob["members"][0]["used_usd"] == pytest.approx(256e-6)
    forecasts = {(f["budget"], f["kind"]): f for f in _get(served.url + "/admin/analytics/forecast")[1]["data"]}
    assert set(forecasts) == {(0, "tokens"), (1, "usd")}
    tokens = forecasts[(0, "tokens")]
    assert (tokens["member"], tokens["used"], tokens["limit"], tokens["source"]) == ("static-0", 25, 1_000_000,
                                                                                   "store")
    assert tokens["rate_per_hour"] > 0 and tokens["projected"] >= 25


def test_recommendations_advise_the_cheaper_model(served):
    status, advice = _get(served.url + "/admin/analytics/recommendations?since=-1h&min_requests=3")
    assert status == 200 and len(advice["data"]) == 1
    (one,) = advice["data"]
    assert (one["task"], one["from_model"], one["to_model"], one["requests"]) == (
        served.extra["task"], "big", "small", 3)
    assert one["current_cost_usd"] == pytest.approx(240e-6) and one["projected_cost_usd"] == pytest.approx(24e-6)
    assert one["savings_pct"] == pytest.approx(90) and (one["from_capability"], one["to_capability"]) == (0.9, 0.88)
    # by default a (task, model) needs MIN_REQUESTS (10) answered requests before any advice
    assert _get(served.url + "/admin/analytics/recommendations?since=-1h")[1]["data"] == []
    status, bad = _get(served.url + "/admin/analytics/recommendations?min_requests=0")
    assert status == 400 and bad["error"]["param"] == "min_requests"
    # one key's or team's traffic: the requests came with the static admin key, which has no team
    mine = _get(served.url + "/admin/analytics/recommendations?since=-1h&min_requests=3&key_id=static-0")[1]
    assert [(a["from_model"], a["requests"]) for a in mine["data"]] == [("big", 3)]
    assert _get(served.url + "/admin/analytics/recommendations?since=-1h&min_requests=3&team=t9")[1]["data"] == []
    status, bad = _get(served.url + "/admin/analytics/recommendations?team=a%00b")
    assert status == 400 and bad["error"]["param"] == "team"


def test_recommendations_price_a_model_as_its_production_version(upstream, tmp_path):
    # small's production version costs 50 / 100 per million tokens: dearer than big, so nothing to advise
    config = _config(upstream.url).replace(
        "    capabilities: {code: 0.88", "    versions: [{version: 1.0.0, stage: production, pricing: "
        "{input_per_mtok: 50.0, output_per_mtok: 100.0}}]\n    capabilities: {code: 0.88")
    assert "version: 1.0.0" in config
    server = start_gateway(tmp_path, config)
    try:
        for _ in range(2):
            status, headers, _ = http("POST", server.url + "/v1/chat/completions", {"model": "auto", "messages": HELLO},
                                      headers=ADMIN)
            assert status == 200 and headers["x-pointsman-model"] == "big"
        wait_for(lambda: _get(server.url + "/admin/analytics?since=-1h")[1]["totals"]["requests"] == 2, what="two rows")
        status, advice = _get(server.url + "/admin/analytics/recommendations?since=-1h&min_requests=1")
        assert status == 200 and advice["data"] == []
    finally:
        server.stop()


def test_budgets_list_only_those_in_force_after_a_reload(upstream, tmp_path):
    # without a database, started without budgets, reloaded with two: a reload applies no policy, so none is in
    # force (it listed the file's two, enforced by nothing)
    config = _config(upstream.url)
    budgets = config[config.index("policies:"):]
    server = start_gateway(tmp_path, config.replace(budgets, "") + "storage: {database_url: ''}\n")
    try:
        file = server.extra["config"]
        file.write_text(file.read_text() + budgets)
        status, _, raw = http("POST", server.url + "/admin/reload", headers=ADMIN)
        assert status == 200 and json.loads(raw)["restart_required"] == ["policies"]
        for path in ("/admin/budgets", "/admin/analytics/forecast"):
            assert _get(server.url + path) == (200, {"object": "list", "data": []})
    finally:
        server.stop()


def test_readonly_keys_read_aggregates_but_not_rows(served):
    status, _, raw = http("POST", served.url + "/admin/keys", {"role": "readonly"}, headers=ADMIN)
    assert status == 201
    reader = {"authorization": f"Bearer {json.loads(raw)['key']}"}
    for path in ("/admin/analytics", "/admin/analytics/forecast", "/admin/analytics/recommendations",
                 "/admin/budgets"):
        assert _get(served.url + path, reader)[0] == 200, path
    status, body = _get(served.url + "/admin/usage", reader)
    assert status == 403 and body["error"]["code"] == "permission_denied"
    assert _get(served.url + "/admin/analytics", {})[0] == 401


def _cli(served, *args: str, key: str | None = ADMIN_KEY) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("POINTSMAN_URL", "POINTSMAN_ADMIN_KEY")}
    env["POINTSMAN_URL"] = served.url
    if key is not None:
        env["POINTSMAN_ADMIN_KEY"] = key
    return subprocess.run([*POINTSMAN, "admin", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


def test_cli_usage_forecast_and_recommendations(served):
    text = _cli(served, "usage", "--since", "1h", "--group-by", "model")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[1].split()[:3] == ["KEY", "REQUESTS", "ERRORS"] and lines[2].split()[:3] == ["total", "6", "1"]
    assert any(line.split()[:3] == ["big", "4", "1"] for line in lines)
    raw = _cli(served, "usage", "--since=-1h", "--group-by", "model", "--json")
    assert raw.returncode == 0 and json.loads(raw.stdout)["totals"]["requests"] == 6
    forecast = _cli(served, "forecast")
    assert forecast.returncode == 0 and "static-0" in forecast.stdout and "RUNS_OUT_AT" in forecast.stdout
    advice = _cli(served, "recommendations", "--json", "--since", "1h")
    assert advice.returncode == 0 and json.loads(advice.stdout)["data"] == []  # 3 requests: below MIN_REQUESTS
    advice = _cli(served, "recommendations", "--json", "--since", "1h", "--min-requests", "3")
    assert [(a["from_model"], a["to_model"]) for a in json.loads(advice.stdout)["data"]] == [("big", "small")]
    for whose, expected in ((["--key-id", "static-0"], 1), (["--team", "t9"], 0)):
        advice = _cli(served, "recommendations", "--json", "--since", "1h", "--min-requests", "3", *whose)
        assert advice.returncode == 0 and len(json.loads(advice.stdout)["data"]) == expected, advice.stderr
    bad = _cli(served, "usage", "--group-by", "colour")
    assert bad.returncode == 1 and "HTTP 400" in bad.stderr and "group_by" in bad.stderr and bad.stdout == ""
    nokey = _cli(served, "forecast", key=None)
    assert nokey.returncode == 1 and "HTTP 401" in nokey.stderr


def test_cli_models_and_keys(served):
    models = _cli(served, "models", "list")
    assert models.returncode == 0 and {line.split()[0] for line in models.stdout.splitlines()[1:]} == {"big", "small"}
    not_local = _cli(served, "models", "load", "big")
    assert not_local.returncode == 1 and "not a local engine" in not_local.stderr
    reloaded = _cli(served, "models", "reload", "--json")
    assert reloaded.returncode == 0 and json.loads(reloaded.stdout)["object"] == "reload"
    created = _cli(served, "keys", "create", "--role", "user", "--team", "t1", "--models", "*")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["key"].startswith("pm-") and (key["role"], key["team"], key["models"]) == ("user", "t1", ["*"])
    listed = _cli(served, "keys", "list")
    assert listed.returncode == 0 and any(line.startswith(key["id"]) for line in listed.stdout.splitlines())
    revoked = _cli(served, "keys", "revoke", key["id"], "--json")
    assert revoked.returncode == 0 and json.loads(revoked.stdout)["revoked"] is True
    # the revoked key no longer works
    assert http("GET", served.url + "/v1/models", headers={"authorization": f"Bearer {key['key']}"})[0] == 401


def test_analytics_without_a_database(upstream, tmp_path):
    config = _config(upstream.url) + "storage: {database_url: ''}\n"
    server = start_gateway(tmp_path, config)
    try:
        status, body = _get(server.url + "/admin/analytics")
        assert status == 400 and "storage.database_url" in body["error"]["message"]
        assert _get(server.url + "/admin/usage")[0] == 400
        budgets = _get(server.url + "/admin/budgets")[1]["data"]  # the live counters still answer
        assert [[m["member"] for m in b["members"]] for b in budgets] == [[], ["*"]]
    finally:
        server.stop()
