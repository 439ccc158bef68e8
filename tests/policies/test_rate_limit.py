"""RateLimitPolicy over LocalStore and RedisStore: rpm and tpm buckets, members, headers, replicas, outages."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from config.schema import RateLimitConfig
from policies.context import Outcome, Principal, RequestContext
from policies.rate_limit import RateLimitPolicy, estimate_tokens, reset_text
from policies.redis_state import RedisStore
from policies.state import LocalStore, StateStore
from protocol.errors import RateLimited, ServiceUnavailable
from protocol.openai import ChatCompletionRequest, CompletionRequest, decode_request

pytestmark = pytest.mark.asyncio(loop_scope="session")  # the stores' pools live in the fixtures' loop

OK = Outcome("ok")


def ctx(key: str | None = "k1", *, team: str | None = None, user: str | None = None, model: str = "m",
        text: str = "hi", max_tokens: int | None = None) -> RequestContext:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return RequestContext(decode_request(body, ChatCompletionRequest), principal=Principal(key_id=key, team=team),
                          user=user)


async def refused(policy: RateLimitPolicy, context: RequestContext) -> RateLimited:
    with pytest.raises(RateLimited) as info:
        await policy.admit(context)
    return info.value


async def test_rpm_allows_its_burst_then_refuses_with_retry_after(store: StateStore) -> None:
    policy = RateLimitPolicy([RateLimitConfig(scope="key", rpm=3)], store)
    for left in (2, 1, 0):
        context = ctx()
        assert await policy.admit(context) is None
        assert context.headers["x-ratelimit-limit-requests"] == "3"
        assert context.headers["x-ratelimit-remaining-requests"] == str(left)
    error = await refused(policy, ctx())
    assert (error.status, error.type, error.code) == (429, "requests", "rate_limit_exceeded")
    assert "key 'k1'" in error.message and "3 requests per minute" in error.message
    assert error.headers["retry-after"] in ("19", "20")  # one request every 20 s
    assert error.headers["x-ratelimit-limit-requests"] == "3"
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    assert error.headers["x-ratelimit-reset-requests"].endswith("s")
    assert "x-ratelimit-limit-tokens" not in error.headers


async def test_remaining_reads_each_limit_of_the_caller_without_charging_it(store: StateStore) -> None:
    """/v1/usage's rate limits: the config's that apply to the caller and the key's own, not `model` ones."""
    policy = RateLimitPolicy([RateLimitConfig(scope="key", rpm=3, tpm=1000),
                              RateLimitConfig(scope="model", match="m", rpm=5)], store)
    own = Principal(key_id="k1", rate_limit=RateLimitConfig(scope="key", match="k1", rpm=2))
    usage = RequestContext(decode_request({"prompt": ""}, CompletionRequest), principal=own)
    for _ in range(3):  # read three times: nothing charged
        assert await policy.remaining(usage) == [
            {"scope": "key", "member": "k1", "rpm": 3, "remaining_requests": 3, "tpm": 1000, "remaining_tokens": 1000},
            {"scope": "key", "member": "k1", "rpm": 2, "remaining_requests": 2}]
    asked = ctx(max_tokens=10)
    asked.principal = own
    assert await policy.admit(asked) is None
    config, key = await policy.remaining(usage)
    assert (config["remaining_requests"], key["remaining_requests"]) == (2, 1)
    assert config["remaining_tokens"] == 1000 - estimate_tokens(asked.request)
    assert await RateLimitPolicy([], store).remaining(ctx()) == []


async def test_each_member_has_its_own_bucket(store: StateStore) -> None:
    policy = RateLimitPolicy([RateLimitConfig(scope="key", rpm=2), RateLimitConfig(scope="team", rpm=3),
                              RateLimitConfig(scope="user", rpm=1)], store)
    for _ in range(2):
        assert await policy.admit(ctx("k1")) is None
    assert "key 'k1'" in (await refused(policy, ctx("k1"))).message
    assert await policy.admit(ctx("k2")) is None  # another key, no team, no user: only its own key bucket
    assert await policy.admit(ctx(None)) is None  # anonymous is a member of its own
    assert await policy.admit(ctx("k3", team="t")) is None
    assert await policy.admit(ctx("k4", team="t")) is None
    assert await policy.admit(ctx("k5", team="t", user="u")) is None  # the team's third
    error = await refused(policy, ctx("k6", team="t"))
    assert "team 't'" in error.message
    assert "user 'u'" in (await refused(policy, ctx("k7", user="u"))).message


async def test_match_limits_only_that_member(store: StateStore) -> None:
    policy = RateLimitPolicy([RateLimitConfig(scope="model", match="big", rpm=1)], store)
    assert await policy.admit(ctx(model="big")) is None
    assert "model 'big'" in (await refused(policy, ctx("other", model="big"))).message
    for _ in range(5):
        context = ctx(model="small")
        assert await policy.admit(context) is None
        assert context.headers == {}  # no applicable limit, no headers


async def test_global_scope_is_one_bucket_and_headers_come_from_the_tightest(store: StateStore) -> None:
    policy = RateLimitPolicy([RateLimitConfig(scope="key", rpm=100, tpm=1000),
                              RateLimitConfig(scope="global", rpm=5, tpm=10_000)], store)
    context = ctx("a", text="x" * 40, max_tokens=90)  # 10 + 90 tokens
    assert await policy.admit(context) is None
    assert context.headers["x-ratelimit-limit-requests"] == "5"
    assert context.headers["x-ratelimit-remaining-requests"] == "4"
    assert context.headers["x-ratelimit-reset-requests"] in ("12s", "11.999s")
    assert context.headers["x-ratelimit-limit-tokens"] == "1000"
    assert context.headers["x-ratelimit-remaining-tokens"] == "900"
    assert context.headers["x-ratelimit-reset-tokens"] in ("6s", "5.999s")
    assert context.state["rate_limit"].estimate == 100
    for key in "bcde":
        assert await policy.admit(ctx(key)) is None
    assert "global" in (await refused(policy, ctx("f"))).message


async def test_tpm_refuses_an_estimate_over_budget_and_settle_charges_actual_usage(store: StateStore) -> None:
    policy = RateLimitPolicy([RateLimitConfig(scope="key", tpm=100)], store)
    first = ctx(text="x" * 40, max_tokens=10)  # an estimated 20 tokens
    assert await policy.admit(first) is None
    assert first.headers["x-ratelimit-remaining-tokens"] == "80"
    first.prompt_tokens, first.completion_tokens = 10, 50  # 40 more than estimated
    await policy.settle(first, OK)
    error = await refused(policy, ctx(text="x" * 40, max_tokens=40))  # 50 tokens, 40 left
    assert (error.status, error.type) == (429, "tokens")
    assert "100 tokens per minute" in error.message and "50 tokens" in error.message
    assert error.headers["retry-after"] in ("6", "7")  # 10 tokens at 100/60 a second
    assert error.headers["x-ratelimit-remaining-tokens"] == "40"
    second = ctx(text="x" * 40, max_tokens=30)  # exactly the 40 left
    assert await policy.admit(second) is None
    assert second.headers["x-ratelimit-remaining-tokens"] == "0"
    second.prompt_tokens, second.completion_tokens = 5, 5  # less than estimated: no refund
    await policy.settle(second, OK)
    assert (await refused(policy, ctx(max_tokens=1))).type == "tokens"


async def test_settle_drains_the_bucket_when_usage_overshoots_it(store: StateStore) -> None:
    policy = RateLimitPolicy([RateLimitConfig(scope="key", tpm=100)], store)
    context = ctx(max_tokens=10)
    assert await policy.admit(context) is None
    context.prompt_tokens, context.completion_tokens = 400, 100  # far more than the bucket holds
    await policy.settle(context, OK)
    assert (await refused(policy, ctx(max_tokens=1))).headers["x-ratelimit-remaining-tokens"] == "0"
    assert await policy.admit(ctx("k2", max_tokens=10)) is None  # other keys are unaffected


async def test_a_request_larger_than_the_tpm_limit_is_told_not_to_retry(store: StateStore) -> None:
    policy = RateLimitPolicy([RateLimitConfig(scope="key", rpm=10, tpm=100)], store)
    error = await refused(policy, ctx(max_tokens=500))
    assert "Request too large" in error.message and "500" in error.message
    assert error.headers["x-should-retry"] == "false" and "retry-after" not in error.headers
    assert error.headers["x-ratelimit-remaining-requests"] == "9"  # its request unit was spent, as documented


async def test_settle_without_usage_or_admission_charges_nothing(store: StateStore) -> None:
    policy = RateLimitPolicy([RateLimitConfig(scope="key", tpm=100)], store)
    context = ctx(max_tokens=50)
    assert await policy.admit(context) is None
    await policy.settle(context, Outcome("cancelled"))  # no usage known
    await policy.settle(ctx(), OK)  # never admitted by this policy
    assert await policy.approve(context, None) is None
    last = ctx(max_tokens=50)
    assert await policy.admit(last) is None
    assert last.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_a_request_no_model_ran_gets_its_token_estimate_back_but_not_its_request(store: StateStore) -> None:
    """A cache hit (a policy's answer, whose usage is the stored answer's) and a later policy's refusal before any
    model was tried cost no tokens: the estimate admit charged is given back; the rpm unit stays spent. A refund
    never fills a bucket past its burst."""
    policy = RateLimitPolicy([RateLimitConfig(scope="key", rpm=10, tpm=100)], store)
    hit = ctx(max_tokens=60)
    assert await policy.admit(hit) is None
    hit.prompt_tokens, hit.completion_tokens = 30, 30  # the stored answer's usage
    await policy.settle(hit, Outcome("answered"))
    refused_later = ctx(max_tokens=60)
    assert await policy.admit(refused_later) is None
    await policy.settle(refused_later, Outcome("error", error=RateLimited("a budget's 429")))
    last = ctx(max_tokens=60)
    assert await policy.admit(last) is None
    assert last.headers["x-ratelimit-remaining-tokens"] == "40"  # 100 - 60: nothing left of the two before
    assert last.headers["x-ratelimit-remaining-requests"] == "7"


async def test_two_replicas_sharing_a_store_share_the_limit_exactly(store: StateStore) -> None:
    limits = [RateLimitConfig(scope="key", rpm=10)]
    replicas = (RateLimitPolicy(limits, store), RateLimitPolicy(limits, store))
    results = await asyncio.gather(*(replicas[i % 2].admit(ctx()) for i in range(20)), return_exceptions=True)
    assert sum(result is None for result in results) == 10
    assert sum(isinstance(result, RateLimited) for result in results) == 10


async def test_store_down_with_allow_lets_requests_through_and_warns_once(
    dead_store: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    policy = RateLimitPolicy([RateLimitConfig(scope="key", rpm=1, tpm=10)], dead_store)
    with caplog.at_level(logging.WARNING, logger="pointsman.policies"):
        for _ in range(3):
            context = ctx(max_tokens=5)
            assert await policy.admit(context) is None
            assert context.headers == {}
            context.prompt_tokens, context.completion_tokens = 500, 500
            await policy.settle(context, OK)  # nothing was charged: nothing to settle, nothing raised
    warned = [r for r in caplog.records if r.name == "pointsman.policies" and "not enforced" in r.getMessage()]
    assert len(warned) == 1


async def test_store_down_with_deny_refuses_with_503(dead_store: RedisStore) -> None:
    policy = RateLimitPolicy([RateLimitConfig(scope="key", rpm=1, on_store_error="allow"),
                              RateLimitConfig(scope="team", rpm=1, on_store_error="deny")], dead_store)
    assert await policy.admit(ctx(team=None)) is None  # only the allow limit applies
    with pytest.raises(ServiceUnavailable) as info:
        await policy.admit(ctx(team="t"))
    assert info.value.status == 503 and "on_store_error: deny" in info.value.message


async def test_settle_never_raises_when_the_store_is_gone(dead_store: RedisStore) -> None:
    live = LocalStore()
    context = ctx(max_tokens=5)
    assert await RateLimitPolicy([RateLimitConfig(scope="key", tpm=100)], live).admit(context) is None
    context.prompt_tokens, context.completion_tokens = 50, 50
    await RateLimitPolicy([RateLimitConfig(scope="key", tpm=100)], dead_store).settle(context, OK)


async def test_estimate_counts_text_and_what_may_be_generated() -> None:
    chat = decode_request({"model": "m", "n": 2, "max_completion_tokens": 7, "messages": [
        {"role": "system", "content": "x" * 8},
        {"role": "user", "content": [{"type": "text", "text": "y" * 11}, {"type": "image_url", "image_url": {}}]},
    ]}, ChatCompletionRequest)
    assert estimate_tokens(chat) == (8 + 11) // 4 + 2 * 7
    assert estimate_tokens(decode_request({"model": "m", "prompt": "z" * 9}, CompletionRequest)) == 2
    tokens = decode_request({"model": "m", "prompt": [[1, 2, 3]], "max_tokens": 4}, CompletionRequest)
    assert estimate_tokens(tokens) == 3 + 4


async def test_reset_text_reads_like_openai() -> None:
    assert [reset_text(s) for s in (0.5, 1, 12.3456, 59.9994, 360, 3723, -1)] == [
        "0.5s", "1s", "12.346s", "59.999s", "6m0s", "1h2m3s", "0s"]
