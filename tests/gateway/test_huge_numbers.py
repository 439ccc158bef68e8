"""Integers past the float range (JSON allows any number of digits) and times past the year 9999 are refused with a
400 naming the field where the request is decoded, never reaching the float and date arithmetic of rate limits,
budgets, routing costs, key expiries and analytics windows (which raised OverflowError: a 500)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.admin_analytics import parse_time
from policies.api_keys import KeySpec
from policies.cache import _MAX_TTL_S, _ttl_override
from protocol.anthropic import decode_messages
from protocol.errors import BadRequest
from protocol.openai import (
    MAX_COUNT,
    ChatCompletionRequest,
    CompletionRequest,
    decode_embedding_request,
    decode_request,
    decode_struct,
)
from protocol.responses_api import decode_responses_request

HUGE = "1" + "0" * 309  # past float's range: float(10**309) raises OverflowError
CHAT = '{"model": "m", "messages": [{"role": "user", "content": "hi"}], "%s": %s}'


@pytest.mark.parametrize("value", [HUGE, str(2**64), str(MAX_COUNT + 1)])
@pytest.mark.parametrize(("decode", "body", "param"), [
    (lambda b: decode_request(b, ChatCompletionRequest), CHAT % ("max_tokens", "{}"), "max_tokens"),
    (lambda b: decode_request(b, ChatCompletionRequest), CHAT % ("max_completion_tokens", "{}"),
     "max_completion_tokens"),
    (lambda b: decode_request(b, CompletionRequest), '{"model": "m", "prompt": "x", "best_of": {}}', "best_of"),
    (lambda b: decode_request(b, CompletionRequest), '{"model": "m", "prompt": "x", "max_tokens": {}}', "max_tokens"),
    (decode_messages, '{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": {}}',
     "max_tokens"),
    (decode_responses_request, '{"model": "m", "input": "x", "max_output_tokens": {}}', "max_output_tokens"),
    (decode_embedding_request, '{"model": "m", "input": "x", "dimensions": {}}', "dimensions"),
])
def test_a_count_past_64_bits_is_a_400(decode, body, param, value):
    with pytest.raises(BadRequest) as caught:
        decode(body.replace("{}", value).encode())
    assert caught.value.param == param


def test_the_largest_64_bit_count_is_still_accepted():
    parsed = decode_request((CHAT % ("max_tokens", MAX_COUNT)).encode(), ChatCompletionRequest)
    assert parsed.max_new_tokens == MAX_COUNT
    float(parsed.max_new_tokens * 128)  # n at its most: still a float


@pytest.mark.parametrize("body", [
    f'{{"rate_limit": {{"rpm": {HUGE}}}}}', f'{{"rate_limit": {{"tpm": {HUGE}}}}}',
    f'{{"budget": {{"period": "day", "max_tokens": {HUGE}}}}}',
    '{"expires_in_s": 1000000000000}', f'{{"expires_in_s": {HUGE}}}',
    '{"expires_at": "9999-12-31T23:59:59-12:00"}',
])
def test_a_key_whose_limits_or_expiry_cannot_be_kept_is_a_400(body):
    with pytest.raises(BadRequest):
        decode_struct(body.encode(), KeySpec)


@pytest.mark.parametrize("value", ["-99999999999999999999w", "-1000000d", "-" + "9" * 400 + "s",
                                   "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-12:00"])
def test_an_analytics_time_out_of_range_is_a_400(value):
    with pytest.raises(BadRequest) as caught:
        parse_time(value, "since", datetime.now(UTC))
    assert caught.value.param == "since"


@pytest.mark.parametrize(("header", "ttl"), [("1e308", _MAX_TTL_S), ("1e20", _MAX_TTL_S), ("60", 60.0),
                                             ("inf", None), ("nan", None), ("-1", None)])
def test_the_cache_ttl_header_is_clamped(header, ttl):
    assert _ttl_override({"x-pointsman-cache-ttl": header}) == ttl
