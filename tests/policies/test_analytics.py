"""Analytics on real databases (SQLite in a temp file, PostgreSQL in a schema of its own): known usage rows in,
exact totals, groups, series, percentiles, budget forecasts and cheaper-model advice out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import msgspec
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from config.schema import BudgetConfig, Config, Pricing
from policies import analytics
from policies.analytics import budget_usage, forecast, recommend, summarize, usage_page
from policies.budget import BudgetPolicy, period_window
from policies.database import migrate, open_engine, usage_rows
from policies.state import LocalStore, Reservation
from policies.usage_log import UsageLog, UsageRow
from tests.policies.conftest import PG_URL, new_schema, pg

pytestmark = pytest.mark.asyncio(loop_scope="session")  # fixtures and tests share one loop

T0 = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)


def _at(hours: int, minutes: int) -> datetime:
    return datetime(2026, 1, 5, hours, minutes, tzinfo=UTC)


# prices per million tokens: a 10 in / 20 out, b 1 / 2 (costs below are those prices applied)
ROWS = [
    UsageRow(request_id="r1", created_at=_at(10, 5), status="ok", key_id="k1", user="alice", team="t1",
             model_requested="auto", model_served="a", route="auto", task="code", prompt_tokens=100,
             completion_tokens=50, cost_usd=0.002, latency_ms=100.0, ttft_ms=10.0, cache="miss"),
    UsageRow(request_id="r2", created_at=_at(10, 20), status="ok", key_id="k1", user="alice", team="t1",
             model_requested="auto", model_served="a", route="auto", task="code", prompt_tokens=200,
             completion_tokens=100, cost_usd=0.004, latency_ms=200.0, ttft_ms=30.0, cache="semantic-hit"),
    UsageRow(request_id="r3", created_at=_at(10, 40), status="error", key_id="k2", team="t2", model_requested="b",
             model_served="b", route="manual", task="chat", prompt_tokens=10, completion_tokens=0,
             latency_ms=300.0, http_status=502),
    UsageRow(request_id="r4", created_at=_at(11, 10), status="ok", key_id="k1", team="t1", model_requested="a",
             model_served="a", route="manual", prompt_tokens=100, completion_tokens=50, cost_usd=0.0,
             latency_ms=400.0, cache="hit"),
    UsageRow(request_id="r5", created_at=_at(11, 30), status="error", model_requested="gpt-9", latency_ms=500.0,
             http_status=404),
    # outside the summaries' window [10:00, 12:00): before it, and at its end
    UsageRow(request_id="r6", created_at=_at(9, 59), status="ok", key_id="k1", team="t1", model_requested="auto",
             model_served="a@1.0.0", route="auto", task="code", prompt_tokens=200, completion_tokens=100,
             cost_usd=0.004, latency_ms=1.0),
    UsageRow(request_id="r7", created_at=_at(12, 0), status="ok", key_id="k2", team="t2", model_requested="auto",
             model_served="b", route="auto", task="chat", prompt_tokens=40, completion_tokens=0, cost_usd=0.00004,
             latency_ms=1.0),
]


@pytest.fixture(params=["sqlite", "postgresql"])
async def engine(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[AsyncEngine]:
    schema = None
    if request.param == "sqlite":
        db = open_engine(f"sqlite+aiosqlite:///{tmp_path}/analytics.db")
    else:
        schema = await new_schema()
        db = open_engine(PG_URL, schema=schema)
    try:
        await migrate(db, schema=schema)
        log = UsageLog(db)  # the real writer
        for row in ROWS:
            log.add(row)
        await log.flush()
        yield db
    finally:
        await db.dispose()
        if schema is not None:
            await pg(f"DROP SCHEMA {schema} CASCADE")


def _m(requests, errors, prompt, completion, cost, lat_avg, p50, p95, ttft, hits) -> dict:
    return {"requests": requests, "errors": errors, "prompt_tokens": prompt, "completion_tokens": completion,
            "cost_usd": pytest.approx(cost), "latency_ms_avg": pytest.approx(lat_avg),
            "latency_ms_p50": pytest.approx(p50), "latency_ms_p95": pytest.approx(p95),
            "ttft_ms_avg": None if ttft is None else pytest.approx(ttft), "cache_hits": hits,
            "cache_hit_rate": pytest.approx(hits / requests)}


async def test_totals_groups_series_and_routes(engine):
    report = await summarize(engine, since=T0, until=_at(12, 0), group_by="model", bucket="hour")
    assert (report["object"], report["since"], report["until"], report["group_by"], report["bucket"]) == (
        "analytics", "2026-01-05T10:00:00Z", "2026-01-05T12:00:00Z", "model", "hour")
    assert report["sampled"] is False
    # latencies 100..500: p50 300, p95 at rank 3.8 = 400 + 0.8 * 100; TTFT only on r1 and r2; hits: r2, r4
    assert report["totals"] == _m(5, 2, 410, 200, 0.006, 300, 300, 480, 20, 2)
    groups = {g["key"]: g for g in report["groups"]}
    assert [g["key"] for g in report["groups"]] == ["a", "b", "gpt-9"]  # most requests first; gpt-9 never served
    assert groups["a"] == {"key": "a", **_m(3, 0, 400, 200, 0.006, 700 / 3, 200, 380, 20, 2)}
    assert groups["b"] == {"key": "b", **_m(1, 1, 10, 0, 0.0, 300, 300, 300, None, 0)}
    assert groups["gpt-9"]["requests"] == 1 and groups["gpt-9"]["prompt_tokens"] == 0
    assert [(s["bucket"], s["key"], s["requests"], s["latency_ms_p50"]) for s in report["series"]] == [
        ("2026-01-05T10:00:00Z", "a", 2, 150.0), ("2026-01-05T10:00:00Z", "b", 1, 300.0),
        ("2026-01-05T11:00:00Z", "a", 1, 400.0), ("2026-01-05T11:00:00Z", "gpt-9", 1, 500.0)]
    assert report["routes"] == [{"route": "auto", "model": "a", "requests": 2},
                                {"route": "manual", "model": "a", "requests": 1},
                                {"route": "manual", "model": "b", "requests": 1},
                                {"route": None, "model": "gpt-9", "requests": 1}]


async def test_other_groupings_days_and_no_series(engine):
    report = await summarize(engine, since=_at(0, 0), until=_at(23, 0), group_by="team", bucket="day")
    assert {g["key"]: g["requests"] for g in report["groups"]} == {"t1": 4, "t2": 2, None: 1}
    assert [(s["bucket"], s["key"], s["requests"]) for s in report["series"]] == [
        ("2026-01-05T00:00:00Z", "t1", 4), ("2026-01-05T00:00:00Z", "t2", 2), ("2026-01-05T00:00:00Z", None, 1)]
    by_status = await summarize(engine, since=T0, until=_at(12, 0), group_by="status", bucket=None)
    assert {g["key"]: (g["requests"], g["errors"]) for g in by_status["groups"]} == {"ok": (3, 0), "error": (2, 2)}
    assert by_status["series"] == []
    minutes = await summarize(engine, since=_at(10, 0), until=_at(10, 30), group_by=None, bucket="minute")
    assert [(s["bucket"], s["key"], s["requests"]) for s in minutes["series"]] == [
        ("2026-01-05T10:05:00Z", None, 1), ("2026-01-05T10:20:00Z", None, 1)]
    assert minutes["groups"] == []
    empty = await summarize(engine, since=_at(20, 0), until=_at(21, 0), group_by="key", bucket="hour")
    assert empty["totals"]["requests"] == 0 and empty["totals"]["latency_ms_p50"] is None
    assert empty["totals"]["cache_hit_rate"] is None and empty["groups"] == empty["series"] == []
    with pytest.raises(ValueError, match="group_by"):
        await summarize(engine, since=T0, until=_at(12, 0), group_by="colour", bucket=None)
    with pytest.raises(ValueError, match="bucket"):
        await summarize(engine, since=T0, until=_at(12, 0), group_by=None, bucket="week")


async def test_percentiles_from_the_latest_rows_when_capped(engine, monkeypatch):
    monkeypatch.setattr(analytics, "SAMPLE_ROWS", 3)
    report = await summarize(engine, since=T0, until=_at(12, 0), group_by=None, bucket=None)
    assert report["sampled"] is True
    assert report["totals"]["requests"] == 5 and report["totals"]["latency_ms_avg"] == pytest.approx(300)  # all
    assert report["totals"]["latency_ms_p50"] == pytest.approx(400)  # of r3, r4, r5 only


async def test_usage_rows_page_by_page_newest_first(engine):
    first = await usage_page(engine, limit=3)
    assert [r["request_id"] for r in first["data"]] == ["r7", "r6", "r5"]  # by id: the order they were written
    assert first["has_more"] is True and first["last_id"] == first["data"][-1]["id"]
    row = first["data"][0]
    assert (row["created_at"], row["model_served"], row["prompt_tokens"], row["cost_usd"]) == (
        "2026-01-05T12:00:00Z", "b", 40, pytest.approx(0.00004))
    rest = await usage_page(engine, limit=3, after_id=first["last_id"])
    assert [r["request_id"] for r in rest["data"]] == ["r4", "r3", "r2"] and rest["has_more"] is True
    last = await usage_page(engine, limit=3, after_id=rest["last_id"])
    assert [r["request_id"] for r in last["data"]] == ["r1"] and last["has_more"] is False
    nothing = await usage_page(engine, after_id=last["last_id"])
    assert (nothing["data"], nothing["has_more"], nothing["last_id"]) == ([], False, None)
    picked = await usage_page(engine, since=T0, until=_at(12, 0), team="t1", key_id="k1", model="a")
    assert [r["request_id"] for r in picked["data"]] == ["r4", "r2", "r1"]  # r6 (a@1.0.0, 09:59) is outside
    assert [r["request_id"] for r in (await usage_page(engine, model="gpt-9"))["data"]] == ["r5"]  # asked for


BUDGETS = [
    BudgetConfig(scope="global", period="day", max_tokens=900, max_cost_usd=1.0),
    BudgetConfig(scope="team", period="day", max_tokens=500),
    BudgetConfig(scope="key", match="k9", period="day", max_cost_usd=0.5),
    BudgetConfig(scope="model", period="total", max_tokens=10_000),
]
NOW = _at(12, 0)  # half the day gone


def _rows(report: list[dict]) -> dict[tuple, dict]:
    return {(r["budget"], r["member"], r["kind"]): r for r in report}


async def test_forecast_from_the_usage_rows(engine):
    report = _rows(await forecast(engine, BUDGETS, None, NOW))
    assert set(report) == {(0, "*", "tokens"), (0, "*", "usd"), (1, "t1", "tokens"), (1, "t2", "tokens"),
                           (2, "k9", "usd"), (3, "a", "tokens"), (3, "b", "tokens")}
    # cache hits (r2, r4) cost nothing: 150 (r1) + 10 (r3) + 300 (r6) + 40 (r7) = 500 tokens in 12 h
    glob = report[(0, "*", "tokens")]
    assert (glob["used"], glob["limit"], glob["source"]) == (500, 900, "usage_rows")
    assert glob["rate_per_hour"] == pytest.approx(500 / 12) and glob["projected"] == pytest.approx(1000)
    # 400 tokens left at 41.67 an hour: 9.6 h after noon
    assert glob["alert"] is True and glob["runs_out_at"] == "2026-01-05T21:36:00Z"
    assert (glob["period_start"], glob["resets_at"]) == ("2026-01-05T00:00:00Z", "2026-01-06T00:00:00Z")
    usd = report[(0, "*", "usd")]
    assert usd["used"] == pytest.approx(0.00604) and usd["projected"] == pytest.approx(0.01208)
    assert (usd["alert"], usd["runs_out_at"]) == (False, None)
    t1, t2 = report[(1, "t1", "tokens")], report[(1, "t2", "tokens")]
    assert (t1["used"], t1["alert"], t1["runs_out_at"]) == (450, True, "2026-01-05T13:20:00Z")  # 50 at 37.5/h
    assert (t2["used"], t2["projected"], t2["alert"]) == (50, pytest.approx(100), False)
    quiet = report[(2, "k9", "usd")]  # a `match` budget with no traffic: its one member, nothing used
    assert (quiet["used"], quiet["rate_per_hour"], quiet["projected"], quiet["alert"]) == (0, 0, 0, False)
    model = report[(3, "a", "tokens")]  # a and a@1.0.0 are one model; `total`: the rate runs from its first row
    assert (model["used"], model["projected"], model["resets_at"], model["alert"]) == (450, None, "never", False)
    assert model["rate_per_hour"] == pytest.approx(450 / (121 / 60))


async def test_a_total_budget_says_when_it_would_run_out(engine):
    # no period end: no projection and no alert before the limit is spent, but the run-out at its rate is known:
    # model a used 450 tokens since its first row (r6, 09:59), 9,550 left at 450 / 121 min
    model = _rows(await forecast(engine, BUDGETS, None, NOW))[(3, "a", "tokens")]
    assert (model["projected"], model["alert"], model["runs_out_at"]) == (None, False, "2026-01-07T06:47:53Z")


async def test_a_live_counter_equal_to_the_rows_but_for_rounding_is_the_store(engine):
    # Redis adds costs in long double: 0.1 + 0.2 is 0.3 there, 0.30000000000000004 summed from the rows
    budgets = [BudgetConfig(scope="team", match="t1", period="day", max_cost_usd=1.0)]
    async with engine.begin() as connection:
        await connection.execute(usage_rows.delete())
    log = UsageLog(engine)
    for i, cost in enumerate((0.1, 0.2)):
        log.add(UsageRow(request_id=f"c{i}", created_at=_at(11, i), status="ok", team="t1", cost_usd=cost))
    await log.flush()
    store = LocalStore()
    start, _ = period_window("day", NOW.timestamp())
    await store.reserve([Reservation(f"budget:0:t1:usd:{start}:settled", 0.3, 10)])
    (budget,) = await budget_usage(engine, budgets, BudgetPolicy(budgets, store), NOW)
    assert budget["members"] == [{"member": "t1", "source": "store", "used_usd": 0.3, "remaining_usd": 0.7}]


async def test_forecast_and_budgets_read_the_live_counters(engine, dead_store):
    store = LocalStore()
    policy = BudgetPolicy(BUDGETS, store)
    start, _ = period_window("day", NOW.timestamp())
    await store.reserve([Reservation(f"budget:0:*:tokens:{start}:settled", 800, 10_000)])
    await store.reserve([Reservation(f"budget:0:*:usd:{start}:settled", 0.5, 10_000)])
    await store.reserve([Reservation(f"budget:1:t1:tokens:{start}:settled", 470, 10_000)])
    await store.reserve([Reservation(f"budget:1:t1:tokens:{start}", 5000, 10_000)])  # in flight: not use
    report = _rows(await forecast(engine, BUDGETS, policy, NOW))
    glob = report[(0, "*", "tokens")]
    assert (glob["used"], glob["source"], glob["projected"]) == (800, "store", pytest.approx(1600))
    assert glob["runs_out_at"] == "2026-01-05T13:30:00Z"  # 100 left at 66.7 an hour
    assert report[(0, "*", "usd")]["used"] == 0.5
    assert (report[(1, "t1", "tokens")]["used"], report[(1, "t1", "tokens")]["alert"]) == (470, True)
    budgets = await budget_usage(engine, BUDGETS, policy, NOW)
    assert [b["budget"] for b in budgets] == [0, 1, 2, 3]
    team = budgets[1]
    assert (team["scope"], team["period"], team["limit_tokens"], team["resets_at"]) == (
        "team", "day", 500, "2026-01-06T00:00:00Z")
    assert team["members"] == [
        {"member": "t1", "source": "store", "used_tokens": 470, "remaining_tokens": 30},
        {"member": "t2", "source": "usage_rows", "used_tokens": 50, "remaining_tokens": 450}]
    # a store that cannot be reached: the usage rows answer instead
    down = _rows(await forecast(engine, BUDGETS, BudgetPolicy(BUDGETS, dead_store), NOW))
    assert (down[(0, "*", "tokens")]["used"], down[(0, "*", "tokens")]["source"]) == (500, "usage_rows")


async def test_budgets_without_a_database_show_the_members_known_without_rows():
    store = LocalStore()
    start, _ = period_window("day", NOW.timestamp())
    await store.reserve([Reservation(f"budget:2:k9:usd:{start}:settled", 0.25, 10)])
    budgets = await budget_usage(None, BUDGETS, BudgetPolicy(BUDGETS, store), NOW)
    assert [[m["member"] for m in b["members"]] for b in budgets] == [["*"], [], ["k9"], []]
    assert budgets[2]["members"][0] == {"member": "k9", "source": "store", "used_usd": 0.25, "remaining_usd": 0.25}


def _model(model_id: str, code: float, price: tuple[float, float] | None) -> dict:
    pricing = None if price is None else {"input_per_mtok": price[0], "output_per_mtok": price[1]}
    return {"id": model_id, "backend": "openai", "base_url": "http://x/v1", "pricing": pricing,
            "capabilities": {"code": code}}


CONFIG = msgspec.convert({"models": [_model("a", 0.9, (10, 20)), _model("b", 0.87, (1, 2)),
                                     _model("c", 0.5, (0.1, 0.1)), _model("unpriced", 1.0, None)]}, Config)
_MODELS = {m.id: m for m in CONFIG.models}
PRICED = {m.id: m.known_pricing for m in CONFIG.models}


def _capability(model_id: str, task: str) -> float:
    return _MODELS[model_id.partition("@")[0]].capabilities.get(task, 0.5)


async def test_recommendations_name_the_cheapest_model_about_as_capable(engine):
    advice = await recommend(engine, PRICED, _capability, _at(9, 0), _at(13, 0), min_requests=1)
    # code on a: b (0.87, within 0.05 of 0.9) at a tenth of the price; c is cheaper but far less capable, and an
    # unpriced model is never advised. chat on b: both score the neutral 0.5, c is cheapest. Cache hits (r2, r4)
    # and errors (r3) are not counted.
    assert [(a["task"], a["from_model"], a["to_model"], a["requests"]) for a in advice] == [
        ("code", "a@1.0.0", "b", 1), ("code", "a", "b", 1), ("chat", "b", "c", 1)]
    first = advice[0]
    assert (first["prompt_tokens"], first["completion_tokens"]) == (200, 100)
    assert first["current_cost_usd"] == pytest.approx(0.004) and first["projected_cost_usd"] == pytest.approx(0.0004)
    assert first["savings_usd"] == pytest.approx(0.0036) and first["savings_pct"] == pytest.approx(90)
    assert (first["from_capability"], first["to_capability"]) == (0.9, 0.87)
    assert advice[2]["savings_usd"] == pytest.approx(0.00004 - 0.000004)
    strict = await recommend(engine, PRICED, _capability, _at(9, 0), _at(13, 0), tolerance=0.01,
                             min_requests=1)
    assert [a["from_model"] for a in strict] == ["b"]  # b is no longer close enough to a
    assert await recommend(engine, PRICED, _capability, _at(20, 0), _at(21, 0), min_requests=1) == []



async def test_recommendations_of_one_team_or_key_count_only_its_traffic(engine):
    def advised(**whose):
        return recommend(engine, PRICED, _capability, _at(9, 0), _at(13, 0), min_requests=1, **whose)

    # t1 and k1 sent the code traffic on a (r1, r6), t2 and k2 the chat traffic on b (r7)
    assert [(a["task"], a["from_model"]) for a in await advised(team="t1")] == [("code", "a@1.0.0"), ("code", "a")]
    assert [(a["task"], a["from_model"]) for a in await advised(key_id="k2")] == [("chat", "b")]
    assert [a["from_model"] for a in await advised(team="t1", key_id="k1")] == ["a@1.0.0", "a"]
    assert await advised(team="t1", key_id="k2") == [] and await advised(team="nobody") == []


async def test_recommendations_price_each_model_as_it_is_served_and_need_enough_requests(engine):
    # b's production version costs 50 / 100 per million tokens: dearer than a, never advised for a's traffic
    served = {**PRICED, "b": msgspec.convert({"input_per_mtok": 50, "output_per_mtok": 100}, Pricing)}
    advice = await recommend(engine, served, _capability, _at(9, 0), _at(13, 0), min_requests=1)
    assert [(a["task"], a["from_model"], a["to_model"]) for a in advice] == [("chat", "b", "c")]
    # one request per (task, model) is too little to advise on by default
    assert await recommend(engine, PRICED, _capability, _at(9, 0), _at(13, 0)) == []
    assert [a["requests"] for a in await recommend(engine, PRICED, _capability, _at(9, 0), _at(13, 0),
                                                     min_requests=2)] == []


async def test_a_counter_the_store_lost_does_not_hide_the_usage_rows(engine):
    """After a restart the in-process store's counters start from zero: the rows of the period still count."""
    policy = BudgetPolicy(BUDGETS, LocalStore())  # a new process: no counter at all
    report = _rows(await forecast(engine, BUDGETS, policy, NOW))
    glob = report[(0, "*", "tokens")]
    assert (glob["used"], glob["source"], glob["alert"]) == (500, "usage_rows", True)
    assert report[(1, "t1", "tokens")]["used"] == 450
    budgets = await budget_usage(engine, BUDGETS, policy, NOW)
    assert budgets[1]["members"][0] == {"member": "t1", "source": "usage_rows", "used_tokens": 450,
                                        "remaining_tokens": 50}
