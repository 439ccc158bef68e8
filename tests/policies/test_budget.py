"""BudgetPolicy over LocalStore and RedisStore: reservations, refusals, model budgets, periods, replicas, outages."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

from config.loader import parse_config
from config.schema import BudgetConfig, ModelConfig
from policies.budget import BudgetPolicy, estimate_prompt_tokens, period_window, worst_case_tokens
from policies.context import Outcome, Principal, RequestContext, scope_member
from policies.redis_state import RedisStore
from policies.state import StateStore
from protocol.errors import BudgetExceeded, ServiceUnavailable
from protocol.openai import ChatCompletionRequest, CompletionRequest, decode_request
from tests.policies.conftest import REDIS_URL

pytestmark = pytest.mark.asyncio(loop_scope="session")  # the stores' pools live in the fixtures' loop

OK = Outcome("ok")
NOON = datetime(2024, 5, 1, 12, 0, tzinfo=UTC).timestamp()
DAY_START = int(datetime(2024, 5, 1, tzinfo=UTC).timestamp())

MODELS = {m.id: m for m in parse_config("""
models:
  - id: cheap
    backend: openai
    pricing: {input_per_mtok: 1.0, output_per_mtok: 2.0}
    deployments: [{base_url: "http://127.0.0.1:1/v1"}]
  - id: big
    backend: openai
    pricing: {input_per_mtok: 10.0, output_per_mtok: 30.0}
    deployments: [{base_url: "http://127.0.0.1:2/v1"}]
  - id: unpriced
    backend: openai
    deployments: [{base_url: "http://127.0.0.1:3/v1"}]
  - id: local
    backend: transformers
    source: /nonexistent/weights
    load: lazy
    max_new_tokens_default: 100
""").models}


@dataclass
class FakeAttempt:
    model: ModelConfig
    route: str


@dataclass
class FakeDecision:
    attempts: list[FakeAttempt]
    skipped: dict[str, str] = field(default_factory=dict)


def decision(*models: str) -> FakeDecision:
    return FakeDecision([FakeAttempt(MODELS[m], "manual" if i == 0 else "fallback") for i, m in enumerate(models)])


def ctx(key: str | None = "k1", *, team: str | None = None, user: str | None = None, text: str = "x" * 40,
        max_tokens: int | None = 100) -> RequestContext:
    """A chat request whose prompt estimate is 40 // 4 + 4 = 14 tokens; worst case 114 with max_tokens 100."""
    body: dict[str, Any] = {"model": "cheap", "messages": [{"role": "user", "content": text}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return RequestContext(decode_request(body, ChatCompletionRequest), principal=Principal(key_id=key, team=team),
                          user=user)


def policy(store: StateStore, *budgets: BudgetConfig, now: float = NOON) -> BudgetPolicy:
    return BudgetPolicy(budgets, store, clock=lambda: now)


def key(index: int, member: str, kind: str = "tokens", start: int = DAY_START) -> str:
    return f"budget:{index}:{member}:{kind}:{start}"


async def refused(p: BudgetPolicy, context: RequestContext, d: FakeDecision | None = None) -> BudgetExceeded:
    with pytest.raises(BudgetExceeded) as info:
        await p.approve(context, d or decision("cheap"))
    return info.value


async def test_worst_case_estimates() -> None:
    assert estimate_prompt_tokens(ctx().request) == 14
    two = decode_request({"model": "m", "messages": [{"role": "system", "content": "abcdefgh"},
                                                     {"role": "user", "content": "abcd"}]}, ChatCompletionRequest)
    assert estimate_prompt_tokens(two) == (2 + 4) + (1 + 4)
    completion = decode_request({"model": "m", "prompt": "y" * 80, "max_tokens": 5, "n": 2}, CompletionRequest)
    assert worst_case_tokens(completion, MODELS["cheap"]) == (20, 10)
    no_limit = ctx(max_tokens=None).request
    assert worst_case_tokens(no_limit, MODELS["cheap"]) == (14, 256)  # a remote model: 256 assumed
    assert worst_case_tokens(no_limit, MODELS["local"]) == (14, 100)  # a transformers model: its own default


async def test_period_windows_are_calendar_aligned_in_utc() -> None:
    t = datetime(2024, 12, 31, 23, 59, 30, tzinfo=UTC).timestamp()
    at = lambda *args: int(datetime(*args, tzinfo=UTC).timestamp())  # noqa: E731
    assert period_window("minute", t) == (at(2024, 12, 31, 23, 59), at(2025, 1, 1))
    assert period_window("hour", t) == (at(2024, 12, 31, 23), at(2025, 1, 1))
    assert period_window("day", t) == (at(2024, 12, 31), at(2025, 1, 1))
    assert period_window("month", t) == (at(2024, 12, 1), at(2025, 1, 1))
    assert period_window("month", at(2024, 2, 10)) == (at(2024, 2, 1), at(2024, 3, 1))
    assert period_window("total", t) == (0, None)


async def test_within_budget_reserves_the_worst_case_and_settle_adjusts_to_actual(store: StateStore) -> None:
    p = policy(store, BudgetConfig(scope="key", max_tokens=10_000))
    assert await p.admit(ctx()) is None
    context = ctx()
    d = decision("cheap", "big")
    await p.approve(context, d)
    assert [a.model.id for a in d.attempts] == ["cheap", "big"] and d.skipped == {}
    assert context.state["budget"].model == "cheap"
    assert await store.counter(key(0, "k1")) == 114
    context.record_usage(MODELS["cheap"], 12, 30)
    await p.settle(context, OK)
    assert await store.counter(key(0, "k1")) == 42
    await p.settle(ctx(), OK)  # nothing reserved: nothing to do
    assert await store.counter(key(0, "k1")) == 42


async def test_a_worst_case_over_a_key_budget_is_refused_with_429(store: StateStore) -> None:
    p = policy(store, BudgetConfig(scope="key", max_tokens=200))
    await p.approve(ctx(), decision("cheap"))  # 114 of 200
    error = await refused(p, ctx())
    assert (error.status, error.type, error.code) == (429, "insufficient_quota", "budget_exceeded")
    for part in ("key budget 'k1'", "200 tokens per day", "114 tokens used", "up to 114 tokens",
                 "resets at 2024-05-02T00:00:00Z"):
        assert part in error.message
    assert error.headers == {"retry-after": str(12 * 3600)}
    assert await store.counter(key(0, "k1")) == 114  # the refused reservation added nothing
    await p.approve(ctx("k2"), decision("cheap"))  # another key has its own budget
    total = policy(store, BudgetConfig(scope="global", period="total", max_tokens=150))
    await total.approve(ctx(), decision("cheap"))  # 114 of 150, for good
    error = await refused(total, ctx())
    assert "global budget of 150 tokens in total" in error.message and "resets never" in error.message
    assert "retry-after" not in error.headers


async def test_a_worst_case_over_the_whole_budget_is_refused_as_never_retryable(store: StateStore) -> None:
    # no period will ever hold it: as the rate limit answers a request over a tpm limit, x-should-retry: false
    for budget in (BudgetConfig(scope="key", max_tokens=100), BudgetConfig(scope="global", period="total",
                                                                            max_tokens=50)):
        error = await refused(policy(store, budget), ctx())
        assert (error.status, error.code) == (429, "budget_exceeded")
        assert error.headers == {"x-should-retry": "false"}
        assert "Request too large for the" in error.message and "up to 114 tokens" in error.message


async def test_scopes_and_match(store: StateStore) -> None:
    p = policy(store, BudgetConfig(scope="team", max_tokens=1000), BudgetConfig(scope="user", max_tokens=1000),
               BudgetConfig(scope="key", match="vip", max_tokens=1000))
    await p.approve(ctx("k1"), decision("cheap"))  # no team, no user, not vip: nothing applies
    assert "budget" not in ctx().state
    context = ctx("vip", team="red", user="alice")
    await p.approve(context, decision("cheap"))
    assert [c.key for c in context.state["budget"].counters] == [key(0, "red"), key(1, "alice"), key(2, "vip")]
    anonymous = policy(store, BudgetConfig(scope="key", max_tokens=1000))
    await anonymous.approve(ctx(None), decision("cheap"))
    assert await store.counter(key(0, "anonymous")) == 114


async def test_concurrent_cycles_never_exceed_the_budget(store: StateStore) -> None:
    p = policy(store, BudgetConfig(scope="key", max_tokens=1000))
    outcomes = await asyncio.gather(*(_cycle(p, used=(14, 100)) for _ in range(300)))
    assert sum(outcomes) == 1000 // 114
    assert await store.counter(key(0, "k1")) == (1000 // 114) * 114 <= 1000


async def test_concurrent_cycles_with_refunds_stay_within_the_budget(store: StateStore) -> None:
    p = policy(store, BudgetConfig(scope="key", max_tokens=1000))
    outcomes = await asyncio.gather(*(_cycle(p, used=(10, 20)) for _ in range(300)))
    assert sum(outcomes) >= 1000 // 114
    assert await store.counter(key(0, "k1")) == sum(outcomes) * 30 <= 1000


async def test_two_replicas_sharing_redis_never_exceed_the_budget(store: StateStore) -> None:
    if not isinstance(store, RedisStore):
        pytest.skip("replicas share a budget through Redis only")
    other = RedisStore(REDIS_URL, prefix=store.prefix)  # a second replica: its own connections, the same keys
    try:
        budget = BudgetConfig(scope="global", max_tokens=5000)
        replicas = [policy(store, budget), policy(other, budget)]
        outcomes = await asyncio.gather(*(_cycle(replicas[i % 2], used=(14, 100)) for i in range(300)))
        assert sum(outcomes) == 5000 // 114
        assert await other.counter(key(0, "*")) == (5000 // 114) * 114
    finally:
        await other.aclose()


async def _cycle(p: BudgetPolicy, used: tuple[int, int]) -> bool:
    context = ctx()
    try:
        await p.approve(context, decision("cheap"))
    except BudgetExceeded:
        await p.settle(context, Outcome("error", error=BudgetExceeded("refused")))
        return False
    context.record_usage(MODELS["cheap"], *used)
    await p.settle(context, OK)
    return True


async def test_a_spent_model_budget_removes_that_model_and_the_next_is_reserved(store: StateStore) -> None:
    p = policy(store, BudgetConfig(scope="model", match="big", max_tokens=100),
               BudgetConfig(scope="key", max_tokens=10_000))
    context = ctx()
    d = decision("big", "cheap")
    await p.approve(context, d)
    assert [a.model.id for a in d.attempts] == ["cheap"]
    assert d.skipped["big"].startswith("budget exceeded: ") and "model budget 'big' of 100 tokens" in d.skipped["big"]
    assert context.state["budget"].model == "cheap"
    assert await store.counter(key(1, "k1")) == 114  # the key budget, reserved once, for cheap
    assert await store.counter(key(0, "big")) == 0
    d = decision("big")
    with pytest.raises(BudgetExceeded, match="model budget 'big'"):  # no attempt left
        await p.approve(ctx(), d)
    assert d.attempts == [] and "big" in d.skipped
    assert await store.counter(key(1, "k1")) == 114


async def test_a_later_fallback_whose_budget_is_spent_is_removed(store: StateStore) -> None:
    p = policy(store, BudgetConfig(scope="model", max_tokens=150))
    await p.approve(ctx(), decision("big"))  # big: 114 of 150, another 114 does not fit
    d = decision("cheap", "big")
    context = ctx()
    await p.approve(context, d)
    assert [a.model.id for a in d.attempts] == ["cheap"] and "big" in d.skipped
    assert await store.counter(key(0, "big")) == 114 and await store.counter(key(0, "cheap")) == 114


async def test_a_fallback_that_served_is_charged_its_own_model_budget(store: StateStore) -> None:
    p = policy(store, BudgetConfig(scope="model", max_tokens=1000), BudgetConfig(scope="key", max_tokens=1000))
    context = ctx()
    await p.approve(context, decision("cheap", "big"))
    context.record_usage(MODELS["big"], 10, 40)  # cheap failed, big served
    await p.settle(context, OK)
    assert await store.counter(key(0, "cheap")) == 0
    assert await store.counter(key(0, "big")) == 50
    assert await store.counter(key(1, "k1")) == 50


async def test_usd_budgets_use_the_models_pricing(store: StateStore, caplog: pytest.LogCaptureFixture) -> None:
    p = policy(store, BudgetConfig(scope="key", max_cost_usd=0.001))
    error = await refused(p, ctx(), decision("big"))  # (14 * 10 + 100 * 30) / 1e6 = 0.00314 USD
    assert "0.001 USD per day" in error.message and "up to 0.00314 USD" in error.message
    context = ctx()
    await p.approve(context, decision("cheap"))  # (14 * 1 + 100 * 2) / 1e6
    assert await store.counter(key(0, "k1", "usd")) == pytest.approx(0.000214)
    context.record_usage(MODELS["cheap"], 10, 20)
    await p.settle(context, OK)
    assert await store.counter(key(0, "k1", "usd")) == pytest.approx(0.00005)
    with caplog.at_level(logging.WARNING, "pointsman.policies"):
        for _ in range(2):
            unpriced = ctx()
            await p.approve(unpriced, decision("unpriced"))  # unknown price: counted as 0 USD
            assert unpriced.state["budget"].amounts == (0.0,)
    assert sum("'unpriced' has no pricing" in r.getMessage() for r in caplog.records) == 1


async def test_period_keys_differ_across_a_day_boundary(store: StateStore) -> None:
    now = [datetime(2024, 5, 1, 23, 59, 30, tzinfo=UTC).timestamp()]
    p = BudgetPolicy([BudgetConfig(scope="key", max_tokens=200)], store, clock=lambda: now[0])
    await p.approve(ctx(), decision("cheap"))
    error = await refused(p, ctx())
    assert error.headers == {"retry-after": "30"} and "resets at 2024-05-02T00:00:00Z" in error.message
    now[0] += 60  # 2024-05-02 00:00:30: a new day, a new counter
    await p.approve(ctx(), decision("cheap"))
    next_day = DAY_START + 86400
    assert await store.counter(key(0, "k1")) == 114 and await store.counter(key(0, "k1", start=next_day)) == 114


async def test_settle_counts_what_the_context_reports(store: StateStore) -> None:
    p = policy(store, BudgetConfig(scope="key", max_tokens=10_000))
    cancelled = ctx()
    await p.approve(cancelled, decision("cheap"))
    cancelled.record_usage(MODELS["cheap"], 14, 3)  # the client left after 3 tokens
    await p.settle(cancelled, Outcome("cancelled"))
    assert await store.counter(key(0, "k1")) == 17
    failed = ctx()
    await p.approve(failed, decision("cheap"))
    await p.settle(failed, Outcome("error"))  # failed before any output: nothing used
    assert await store.counter(key(0, "k1")) == 17
    hit = ctx()
    await p.approve(hit, decision("cheap"))
    hit.record_usage(MODELS["cheap"], 14, 50)
    hit.cache = "hit"
    await p.settle(hit, Outcome("answered"))
    assert await store.counter(key(0, "k1")) == 17


async def test_on_store_error_deny_refuses_and_allow_lets_through(dead_store: RedisStore,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    deny = policy(dead_store, BudgetConfig(scope="key", max_tokens=1000))
    with pytest.raises(ServiceUnavailable) as info:
        await deny.approve(ctx(), decision("cheap"))
    assert info.value.status == 503 and "key budget 'k1' of 1000 tokens per day" in info.value.message
    allow = policy(dead_store, BudgetConfig(scope="key", max_tokens=1000, on_store_error="allow"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, "pointsman.policies"):
        for _ in range(3):
            context = ctx()
            d = decision("cheap")
            await allow.approve(context, d)
            assert "budget" not in context.state and [a.model.id for a in d.attempts] == ["cheap"]
            await allow.settle(context, OK)
    assert sum("budgets not enforced" in r.getMessage() for r in caplog.records) == 1
    mixed = policy(dead_store, BudgetConfig(scope="key", max_tokens=1000, on_store_error="allow"),
                   BudgetConfig(scope="global", max_cost_usd=1.0))
    with pytest.raises(ServiceUnavailable, match="global budget of 1 USD"):
        await mixed.approve(ctx(), decision("cheap"))


async def test_settle_never_raises_when_the_store_is_gone(dead_store: RedisStore, store: StateStore) -> None:
    p = policy(store, BudgetConfig(scope="key", max_tokens=1000))
    context = ctx()
    await p.approve(context, decision("cheap"))
    p.store = dead_store
    context.record_usage(MODELS["cheap"], 1, 1)
    await p.settle(context, OK)  # logged, not raised; the worst case stays counted
    assert await store.counter(key(0, "k1")) == 114


async def test_remaining_lists_the_callers_budgets(store: StateStore) -> None:
    p = policy(store, BudgetConfig(scope="key", max_tokens=1000, max_cost_usd=1.0),
               BudgetConfig(scope="team", period="month", max_tokens=5000),
               BudgetConfig(scope="user", period="total", max_tokens=100),
               BudgetConfig(scope="model", match="big", max_tokens=10))
    context = ctx(team="red")
    await p.approve(context, decision("cheap"))
    context.record_usage(MODELS["cheap"], 10, 20)
    await p.settle(context, OK)
    rows = await p.remaining(ctx(team="red"))
    assert rows == [
        {"scope": "key", "member": "k1", "period": "day", "resets_at": "2024-05-02T00:00:00Z",
         "limit_tokens": 1000, "used_tokens": 30.0, "remaining_tokens": 970.0,
         "limit_usd": 1.0, "used_usd": pytest.approx(0.00005), "remaining_usd": pytest.approx(0.99995)},
        {"scope": "team", "member": "red", "period": "month", "resets_at": "2024-06-01T00:00:00Z",
         "limit_tokens": 5000, "used_tokens": 30.0, "remaining_tokens": 4970.0},
    ]
    with pytest.raises(BudgetExceeded):  # the model budget of 10 is not listed but is enforced
        await p.approve(ctx(user="bob"), decision("big"))


async def test_a_model_scope_counts_every_version_as_the_model() -> None:
    ctx = RequestContext(decode_request(b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}]}',
                                        ChatCompletionRequest))
    assert scope_member("model", "chat", ctx, "chat@2.0.0") == "chat"
    assert scope_member("model", None, ctx, "chat@2.0.0") == "chat"
    assert scope_member("model", "chat", ctx, "other") is None


async def test_a_settle_after_its_period_is_over_makes_no_counter(caplog: pytest.LogCaptureFixture) -> None:
    """A stream that ends more than a minute after its hour made a settled counter with a negative TTL: a
    ValueError, logged as a failed settle, which also skipped the alerts."""
    from policies.state import LocalStore

    now = [datetime(2024, 5, 1, 12, 59, 50, tzinfo=UTC).timestamp()]
    store = LocalStore(clock=lambda: now[0])
    policy = BudgetPolicy([BudgetConfig(scope="key", period="hour", max_tokens=100_000)], store,
                          clock=lambda: now[0])
    context = ctx()
    await policy.approve(context, decision("cheap"))
    now[0] += 130  # the stream ends at 13:02:00
    context.record_usage(MODELS["cheap"], 14, 300)
    with caplog.at_level(logging.WARNING, logger="pointsman.policies"):
        await policy.settle(context, Outcome("ok"))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
