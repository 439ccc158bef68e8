"""retry_after_s: an upstream 429's wait, from Retry-After (seconds or a date), retry-after-ms or OpenAI's resets."""

from __future__ import annotations

import email.utils

import pytest

from routing.retry_after import retry_after_s

NOW = 1_800_000_000.0


@pytest.mark.parametrize(("headers", "wait"), [
    ({"retry-after": "7"}, 7.0),
    ({"retry-after": " 2.5 "}, 2.5),
    ({"retry-after": email.utils.formatdate(NOW + 30, usegmt=True)}, 30.0),
    ({"retry-after-ms": "2500", "retry-after": "3"}, 2.5),  # the finer one wins, as OpenAI's SDK reads them
    ({"retry-after-ms": "1s", "retry-after": "3"}, 3.0),  # milliseconds are a number: "1s" is none (not 1 ms)
    ({"retry-after": "5, 7"}, 7.0),  # sent twice, joined: the longer
    ({"x-ratelimit-reset-requests": "6m0s", "x-ratelimit-remaining-requests": "0"}, 360.0),
    ({"x-ratelimit-reset-requests": "1s", "x-ratelimit-remaining-requests": "0",
      "x-ratelimit-reset-tokens": "20ms", "x-ratelimit-remaining-tokens": "5000"}, 1.0),  # the limit that is spent
    ({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "1m2.5s"}, 62.5),  # none says: the longest
    ({"retry-after": "soon", "x-ratelimit-reset-tokens": "250ms"}, 0.25),
])
def test_waits(headers, wait) -> None:
    assert retry_after_s(headers, now=NOW) == pytest.approx(wait)


@pytest.mark.parametrize("headers", [
    {}, {"retry-after": "0"}, {"retry-after": "-5"}, {"retry-after": "nan"}, {"retry-after": "soon"},
    {"retry-after": email.utils.formatdate(NOW - 30, usegmt=True)},  # a date gone by
    {"retry-after": "Wed, 21 Oct 2015 07:28:00"},  # no zone: no way to tell when
    {"x-ratelimit-reset-requests": "1x"}, {"x-ratelimit-reset-requests": "1s2"},
    {"x-ratelimit-reset-requests": "5s", "x-ratelimit-remaining-requests": "12"},  # not what was exhausted
])
def test_nothing_to_wait_for(headers) -> None:
    assert retry_after_s(headers, now=NOW) is None


def test_infinity_is_left_to_the_caller_to_cap() -> None:
    assert retry_after_s({"retry-after": "1e999"}) == float("inf")
