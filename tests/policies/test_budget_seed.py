"""Budget counters in an in-process store seeded from the usage rows, so that a restart does not reset budgets; on
real SQLite and PostgreSQL."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import msgspec
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from config.loader import parse_config
from config.schema import BudgetConfig, ModelConfig
from gateway.storage import Storage
from policies.alerts import BudgetAlerts
from policies.analytics import forecast
from policies.api_keys import KeyBudget, KeySpec, KeyStore
from policies.budget import BudgetPolicy
from policies.context import Outcome, Principal, RequestContext
from policies.database import open_engine
from policies.state import LocalStore
from policies.usage import row_of
from policies.usage_log import UsageLog, charged_usage
from protocol.errors import BudgetExceeded
from tests.conftest import free_port
from tests.policies.test_budget import DAY_START, MODELS, NOON, FakeAttempt, FakeDecision, ctx, decision, key

pytestmark = pytest.mark.asyncio(loop_scope="session")  # fixtures and tests share one loop

YESTERDAY = NOON - 86400
CHEAP_V2 = msgspec.structs.replace(MODELS["cheap"], id="cheap@2.0.0")  # a version of cheap: counts as cheap


class Replica:
    """One gateway process: a budget policy on its own in-process store, and the usage log on the shared database,
    both fed by the same requests as the pipeline feeds them."""

    def __init__(self, engine: AsyncEngine, budgets: list[BudgetConfig], now: float = NOON,
                 alerts: bool = False, store: LocalStore | None = None) -> None:
        self.store = store or LocalStore()
        self.alerts = BudgetAlerts(None, self.store) if alerts else None
        self.policy = BudgetPolicy(budgets, self.store, clock=lambda: now, alerts=self.alerts)
        self.log = UsageLog(engine)
        self.now = now

    async def serve(self, context: RequestContext, d: FakeDecision, model: ModelConfig | None,
                    used: tuple[int, int] = (0, 0), status: str = "ok") -> None:
        """approve, the model's usage, settle, and the usage row (created at this replica's clock)."""
        await self.policy.approve(context, d)
        if model is not None:
            context.record_usage(model, *used)
        await self.settled(context, Outcome(status))  # type: ignore[arg-type]

    async def settled(self, context: RequestContext, outcome: Outcome) -> None:
        await self.policy.settle(context, outcome)
        self.log.add(msgspec.structs.replace(row_of(context, outcome),
                                             created_at=datetime.fromtimestamp(self.now - 1, UTC)))
        await self.log.flush()

    def counters(self) -> dict[str, float]:
        """Every budget counter of the current periods (day and month from DAY_START, `total`) that is not 0."""
        return {k: round(value, 12) for k, (value, _) in self.store._counters.items()
                if k.startswith("budget:") and k.split(":")[4] in (str(DAY_START), "0") and value}

    async def aclose(self) -> None:
        await self.log.aclose()
        if self.alerts is not None:
            await self.alerts.aclose()
        await self.store.aclose()


BUDGETS = [
    BudgetConfig(scope="global", max_tokens=300),
    BudgetConfig(scope="key", max_cost_usd=1.0),
    BudgetConfig(scope="user", period="month", max_tokens=10_000),
    BudgetConfig(scope="team", match="red", max_tokens=10_000),
    BudgetConfig(scope="model", max_tokens=10_000),
    BudgetConfig(scope="model", match="big", period="total", max_tokens=10_000),
    BudgetConfig(scope="key", period="total", max_tokens=10_000, max_cost_usd=1.0),
]


async def test_a_restart_seeds_every_counter_with_what_it_held(engine: AsyncEngine) -> None:
    before = Replica(engine, BUDGETS)
    old = Replica(engine, BUDGETS, now=YESTERDAY, store=before.store)  # yesterday: counted by `total` budgets
    after = fresh = None
    try:
        await old.serve(ctx("k1"), decision("big"), MODELS["big"], (100, 100))
        await before.serve(ctx("k1", team="red", user="alice"), decision("cheap"), MODELS["cheap"], (14, 30))
        await before.serve(ctx("k1", user="bob"), decision("cheap", "big"), MODELS["big"], (10, 40))  # a fallback
        await before.serve(ctx("k2"), FakeDecision([FakeAttempt(CHEAP_V2, "manual")]), CHEAP_V2, (20, 5))
        await before.serve(ctx("k1", user="alice"), decision("cheap"), MODELS["cheap"], (14, 3), "cancelled")
        await before.serve(ctx("k2"), decision("cheap"), None, status="error")  # failed before any output
        await before.serve(ctx(None), decision("cheap"), MODELS["cheap"], (5, 5))  # counts as "anonymous"
        await before.serve(ctx("k1"), decision("unpriced"), MODELS["unpriced"], (7, 7))  # 0 USD
        hit = ctx("k1", user="alice")  # answered from the cache at admit: never reserved, never charged
        hit.cache, _ = "hit", hit.record_usage(MODELS["cheap"], 14, 50)
        await before.settled(hit, Outcome("answered"))
        refused = ctx("k1", max_tokens=1000)  # over the global budget: refused at approve, a row all the same
        with pytest.raises(BudgetExceeded) as info:
            await before.policy.approve(refused, decision("cheap"))
        await before.settled(refused, Outcome("error", info.value))
        held = before.counters()
        assert held[key(0, "*")] == 44 + 50 + 25 + 17 + 10 + 14
        assert held[key(4, "cheap")] == 44 + 25 + 17 + 10 and held[key(4, "big")] == 50
        assert held[key(6, "k1", start=0)] == 200 + 44 + 50 + 17 + 14  # yesterday's too

        after = Replica(engine, BUDGETS)  # the restart: a fresh in-process store over the same database
        assert await after.policy.seed(engine) == len(held) // 2
        assert after.counters() == pytest.approx(held, rel=1e-9)
        with pytest.raises(BudgetExceeded) as info:  # 160 of 300 used: a worst case of 214 no longer fits
            await after.policy.approve(ctx("k3", max_tokens=200), decision("cheap"))
        assert (info.value.status, info.value.code) == (429, "budget_exceeded")
        assert "160 tokens used" in info.value.message
        fresh = Replica(engine, BUDGETS)  # what a restart did before: every counter at zero, the request let through
        await fresh.policy.approve(ctx("k3", max_tokens=200), decision("cheap"))
    finally:
        await old.log.aclose()
        for replica in (before, after, fresh):
            if replica is not None:
                await replica.aclose()


async def test_forecast_and_alerts_read_the_seeded_use(engine: AsyncEngine, caplog: pytest.LogCaptureFixture) -> None:
    budgets = [BudgetConfig(scope="global", max_tokens=1000, alert_at=[0.5])]
    noon = datetime.fromtimestamp(NOON, UTC)
    before, after = Replica(engine, budgets, alerts=True), Replica(engine, budgets, alerts=True)
    try:
        await before.serve(ctx(), decision("cheap"), MODELS["cheap"], (100, 300))  # 40%: no alert yet
        assert await after.policy.seed(engine) == 1
        [row] = await forecast(engine, budgets, after.policy, noon)
        assert (row["used"], row["source"]) == (400, "store")
        with caplog.at_level(logging.WARNING, logger="pointsman.alerts"):
            context = ctx()
            await after.policy.approve(context, decision("cheap"))
            context.record_usage(MODELS["cheap"], 14, 136)
            await after.policy.settle(context, Outcome("ok"))  # 550 of 1000 across the restart: the 50% alert
        [alert] = [msgspec.json.decode(r.getMessage()) for r in caplog.records if r.name == "pointsman.alerts"]
        assert (alert["threshold"], alert["used"]) == (0.5, 550)
        [row] = await forecast(engine, budgets, after.policy, noon)  # the counter leads the rows not yet written
        assert (row["used"], row["source"]) == (550, "store")
    finally:
        await before.aclose()
        await after.aclose()


async def test_a_threshold_passed_before_the_restart_does_not_alert_again(engine: AsyncEngine,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    budgets = [BudgetConfig(scope="global", max_tokens=1000, alert_at=[0.5, 0.8])]
    before, after = Replica(engine, budgets, alerts=True), Replica(engine, budgets, alerts=True)
    try:
        with caplog.at_level(logging.WARNING, logger="pointsman.alerts"):
            await before.serve(ctx(), decision("cheap"), MODELS["cheap"], (200, 400))  # 60%: the 50% alert
            assert await after.policy.seed(engine) == 1
            context = ctx()
            await after.policy.approve(context, decision("cheap"))
            context.record_usage(MODELS["cheap"], 50, 200)
            await after.policy.settle(context, Outcome("ok"))  # 850 of 1000: only the 80% alert is new
        alerts = [msgspec.json.decode(r.getMessage()) for r in caplog.records if r.name == "pointsman.alerts"]
        assert [(a["threshold"], a["used"]) for a in alerts] == [(0.5, 600), (0.8, 850)]
    finally:
        await before.aclose()
        await after.aclose()


async def test_api_keys_own_budgets_are_seeded(engine: AsyncEngine) -> None:
    keys = KeyStore(engine)
    spec = KeySpec(budget=KeyBudget(period="day", max_tokens=500, max_cost_usd=1.0))
    own, _ = await keys.create(spec, None)
    gone, _ = await keys.create(spec, None)
    await keys.revoke(gone["id"])
    budget = BudgetConfig(scope="key", match=own["id"], period="day", max_tokens=500, max_cost_usd=1.0)
    before = Replica(engine, [])
    after = unkeyed = None
    try:
        for key_id in (own["id"], gone["id"]):
            context = RequestContext(ctx().request, principal=Principal(key_id=key_id, budget=budget))
            await before.serve(context, decision("cheap"), MODELS["cheap"], (100, 300))
        assert await charged_usage(engine, "key", None, datetime.fromtimestamp(DAY_START, UTC),
                                   datetime.fromtimestamp(NOON, UTC)) == {own["id"]: (400, 0.0007),
                                                                          gone["id"]: (400, 0.0007)}
        after, unkeyed = Replica(engine, []), Replica(engine, [])
        assert await after.policy.seed(engine, keys=True) == 2  # the revoked key's budget can no longer apply
        assert await after.store.counter(key("key", own["id"])) == 400  # type: ignore[arg-type]
        assert await after.store.counter(key("key", own["id"], "usd")) == pytest.approx(0.0007)  # type: ignore[arg-type]
        assert await after.store.counter(key("key", gone["id"])) == 0  # type: ignore[arg-type]
        with pytest.raises(BudgetExceeded):  # 400 of 500: a worst case of 114 no longer fits
            await after.policy.approve(RequestContext(ctx().request, principal=Principal(key_id=own["id"],
                                                                                         budget=budget)),
                                       decision("cheap"))
        assert await unkeyed.policy.seed(engine) == 0  # no database keys in use: nothing of theirs seeded
    finally:
        for replica in (before, after, unkeyed):
            if replica is not None:
                await replica.aclose()


async def test_an_unreachable_database_leaves_the_counters_at_zero(caplog: pytest.LogCaptureFixture) -> None:
    dead = open_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/test")
    store = LocalStore()
    policy = BudgetPolicy([BudgetConfig(scope="global", max_tokens=300)], store, clock=lambda: NOON)
    try:
        with caplog.at_level(logging.WARNING, logger="pointsman.policies"):
            assert await policy.seed(dead, keys=True) == 0
        [warning] = [r for r in caplog.records if r.name == "pointsman.policies"]
        assert "counters start at zero" in warning.getMessage()
        await policy.approve(ctx(), decision("cheap"))  # requests go on, counted from zero as before
        assert await store.counter(key(0, "*")) == 114
    finally:
        await dead.dispose()
        await store.aclose()


async def test_a_restarted_gateway_refuses_what_the_period_already_spent(tmp_path) -> None:
    """Through Storage, as the app builds and starts it: the second start finds the first one's rows."""
    config = parse_config(f"""
models: [{{id: cheap, backend: openai, base_url: "http://127.0.0.1:1/v1", pricing: {{input_per_mtok: 1.0,
          output_per_mtok: 2.0}}}}]
storage: {{database_url: "sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"}}
policies:
  budgets: [{{scope: key, period: total, max_tokens: 500}}]
""")
    first = Storage(config.storage)
    chain = first.policies(config.policies, lambda name: name)
    await first.start()
    context = ctx()
    for policy in chain:
        await policy.approve(context, decision("cheap"))
    context.record_usage(MODELS["cheap"], 100, 300)
    for policy in chain:
        await policy.settle(context, Outcome("ok"))
    await first.aclose()  # writes the usage rows
    second = Storage(config.storage)
    second.policies(config.policies, lambda name: name)
    await second.start()
    try:
        assert second.budgets is not None
        with pytest.raises(BudgetExceeded) as info:
            await second.budgets.approve(ctx(), decision("cheap"))
        assert (info.value.status, info.value.code) == (429, "budget_exceeded")
        await second.budgets.approve(ctx("k2"), decision("cheap"))  # another key has its own
    finally:
        await second.aclose()


async def test_a_version_that_served_is_charged_its_models_budget() -> None:
    """A model budget counts every version as the model; settle compared the counter's member ("cheap") with the
    version that served ("cheap@2.0.0") and refunded it all."""
    store = LocalStore()
    policy = BudgetPolicy([BudgetConfig(scope="model", max_tokens=1000)], store, clock=lambda: NOON)
    context = ctx()
    await policy.approve(context, FakeDecision([FakeAttempt(CHEAP_V2, "manual")]))
    context.record_usage(CHEAP_V2, 10, 40)
    await policy.settle(context, Outcome("ok"))
    assert await store.counter(key(0, "cheap")) == 50
    fallback = ctx()  # reserved on a version, served by the model itself: charged once
    await policy.approve(fallback, FakeDecision([FakeAttempt(CHEAP_V2, "manual"),
                                                 FakeAttempt(MODELS["cheap"], "fallback")]))
    fallback.record_usage(MODELS["cheap"], 10, 40)
    await policy.settle(fallback, Outcome("ok"))
    assert await store.counter(key(0, "cheap")) == 100


async def test_a_fallback_is_charged_when_the_first_model_had_no_budget() -> None:
    """Nothing applied to the first attempt, so nothing was reserved, and settle did not charge the fallback that
    served its own model budget (the usage rows did: a seeded counter would have differed)."""
    store = LocalStore()
    policy = BudgetPolicy([BudgetConfig(scope="model", match="big", max_tokens=1000)], store, clock=lambda: NOON)
    context = ctx()
    await policy.approve(context, decision("cheap", "big"))
    context.record_usage(MODELS["big"], 10, 40)
    await policy.settle(context, Outcome("ok"))
    assert await store.counter(key(0, "big")) == 50
    alone = ctx()  # no fallback: nothing kept for settle
    await policy.approve(alone, decision("cheap"))
    assert "budget" not in alone.state
