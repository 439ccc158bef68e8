"""Budget alerts over LocalStore and RedisStore: once per period across replicas, the webhook, its retries."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web

from config.loader import parse_config
from config.schema import BudgetConfig
from policies.alerts import BudgetAlerts
from policies.budget import BudgetPolicy
from policies.context import Outcome, Principal, RequestContext
from policies.state import LocalStore, StateStore
from protocol.openai import ChatCompletionRequest, decode_request
from tests.conftest import free_port
from tests.policies.conftest import eventually


async def eventually_5s(check) -> float:
    """Webhook deliveries retry with backoff: up to 5 s."""
    return await eventually(check, within_s=5.0, every_s=0.01)


pytestmark = pytest.mark.asyncio(loop_scope="session")  # the stores' pools live in the fixtures' loop

NOON = datetime(2024, 5, 1, 12, 0, tzinfo=UTC).timestamp()
NEXT_NOON = NOON + 86400
MODEL = parse_config("""
models:
  - id: cheap
    backend: openai
    deployments: [{base_url: "http://127.0.0.1:1/v1"}]
""").models[0]


class _Attempt:
    def __init__(self) -> None:
        self.model, self.route = MODEL, "manual"


class _Decision:
    def __init__(self) -> None:
        self.attempts, self.skipped = [_Attempt()], {}


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def charge(policy: BudgetPolicy, user: str, tokens: int) -> None:
    """One request of `user` through approve (worst case 4 + 1 tokens) and settle, having used `tokens`."""
    body = {"model": "cheap", "max_tokens": 1, "messages": [{"role": "user", "content": ""}]}
    ctx = RequestContext(decode_request(body, ChatCompletionRequest), principal=Principal(key_id="k"), user=user)
    await policy.approve(ctx, _Decision())
    ctx.model, ctx.prompt_tokens, ctx.completion_tokens = "cheap", tokens, 0
    await policy.settle(ctx, Outcome("ok"))


def alerts_logged(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "pointsman.alerts"
            and r.getMessage().startswith("{")]


async def test_thresholds_alert_once_per_period_across_replicas(store: StateStore,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pointsman.alerts")
    user = uuid.uuid4().hex
    budget = BudgetConfig(scope="user", match=user, period="day", max_tokens=100)
    assert budget.alert_at == [0.5, 0.8, 1.0]
    clock = _Clock(NOON)
    replicas = [BudgetPolicy([budget], store, clock=clock, alerts=BudgetAlerts(None, store, clock=clock))
                for _ in range(2)]
    steps = [(30, []), (30, [0.5]), (10, []), (20, [0.8]), (5, []), (5, [1.0])]
    for i, (tokens, fired) in enumerate(steps):
        caplog.clear()
        await charge(replicas[i % 2], user, tokens)  # the two replicas take turns
        assert [a["threshold"] for a in alerts_logged(caplog)] == fired, f"step {i}"
    caplog.clear()
    await asyncio.gather(*(charge(r, "someone else", 90) for r in replicas))  # not under this budget
    assert alerts_logged(caplog) == []

    clock.now = NEXT_NOON  # a new period: each threshold alerts again, once
    caplog.clear()
    await asyncio.gather(*(charge(r, user, 50) for r in replicas))  # both land together: 0.5, 0.8 and 1.0 once
    alerts = alerts_logged(caplog)
    assert sorted(a["threshold"] for a in alerts) == [0.5, 0.8, 1.0]
    assert {a["period_start"] for a in alerts} == {"2024-05-02T00:00:00Z"}
    first = alerts[0]
    assert (first["budget"], first["member"], first["kind"], first["limit"], first["resets_at"]) == (
        0, user, "tokens", 100.0, "2024-05-03T00:00:00Z")
    assert next(a["used"] for a in alerts if a["threshold"] == 1.0) == 100.0


async def test_budget_without_thresholds_never_alerts(store: StateStore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pointsman.alerts")
    user = uuid.uuid4().hex
    budget = BudgetConfig(scope="user", match=user, max_tokens=100, alert_at=[])
    policy = BudgetPolicy([budget], store, clock=lambda: NOON, alerts=BudgetAlerts(None, store))
    await charge(policy, user, 95)
    assert alerts_logged(caplog) == []


class _Webhook:
    """A tiny aiohttp server on a free 127.0.0.1 port that answers `fail_first` requests with 503, then 204."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.bodies: list[dict[str, Any]] = []
        self.attempts = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/alerts"
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        if self.attempts <= self.fail_first:
            return web.Response(status=503)
        self.bodies.append(await request.json())
        return web.Response(status=204)

    async def __aenter__(self) -> _Webhook:
        app = web.Application()
        app.router.add_post("/alerts", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def test_the_webhook_receives_each_alert() -> None:
    store = LocalStore()
    user = uuid.uuid4().hex
    async with _Webhook() as hook:
        alerts = BudgetAlerts(hook.url, store)
        policy = BudgetPolicy([BudgetConfig(scope="user", max_tokens=10, alert_at=[0.5])], store,
                              clock=lambda: NOON, alerts=alerts)
        await charge(policy, user, 6)
        await eventually_5s(lambda: len(hook.bodies) == 1)
        body = hook.bodies[0]
        assert (body["event"], body["member"], body["threshold"], body["used"], body["limit"]) == (
            "budget_alert", user, 0.5, 6.0, 10.0)
        await alerts.aclose()
    await store.aclose()


async def test_a_failing_webhook_is_retried_and_never_raises_into_settle(caplog: pytest.LogCaptureFixture) -> None:
    store = LocalStore()
    async with _Webhook(fail_first=2) as hook:  # two 503s, then accepted on the third try
        alerts = BudgetAlerts(hook.url, store, backoff_s=0.01)
        policy = BudgetPolicy([BudgetConfig(scope="user", max_tokens=10, alert_at=[0.5])], store,
                              clock=lambda: NOON, alerts=alerts)
        started = time.monotonic()
        await charge(policy, "u1", 6)
        assert time.monotonic() - started < 0.5  # settle did not wait for the deliveries
        await eventually_5s(lambda: len(hook.bodies) == 1)
        assert hook.attempts == 3
        await alerts.aclose()

    caplog.set_level(logging.INFO, logger="pointsman.alerts")
    caplog.clear()
    dead = f"http://127.0.0.1:{free_port()}/alerts"  # nothing listens: every try fails
    alerts = BudgetAlerts(dead, store, backoff_s=0.01)
    policy = BudgetPolicy([BudgetConfig(scope="user", max_tokens=10, alert_at=[0.5])], store, clock=lambda: NOON,
                          alerts=alerts)
    await charge(policy, "u2", 6)  # does not raise
    await eventually_5s(lambda: any("failed after 3 tries" in r.getMessage() for r in caplog.records))
    assert [a["member"] for a in alerts_logged(caplog)] == ["u2"]  # the alert is logged all the same
    await alerts.aclose()
    await store.aclose()


async def test_another_requests_reservation_in_flight_is_not_use(store: StateStore,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A request that settles while another holds its worst case alerts on settled use alone (no false 50%)."""
    caplog.set_level(logging.INFO, logger="pointsman.alerts")
    user = uuid.uuid4().hex
    policy = BudgetPolicy([BudgetConfig(scope="user", match=user, period="day", max_tokens=1000, alert_at=[0.5])],
                          store, clock=lambda: NOON, alerts=BudgetAlerts(None, store, clock=lambda: NOON))
    body = {"model": "cheap", "max_tokens": 600, "messages": [{"role": "user", "content": ""}]}
    slow = RequestContext(decode_request(body, ChatCompletionRequest), principal=Principal(key_id="k"), user=user)
    await policy.approve(slow, _Decision())  # 604 tokens reserved, still running
    await charge(policy, user, 5)  # settles while the reservation is held
    assert alerts_logged(caplog) == []
    slow.model, slow.prompt_tokens, slow.completion_tokens = "cheap", 4, 4
    await policy.settle(slow, Outcome("ok"))
    assert alerts_logged(caplog) == []  # 13 tokens used in all
    await charge(policy, user, 500)
    assert [(a["threshold"], a["used"]) for a in alerts_logged(caplog)] == [(0.5, 513.0)]
