"""CircuitBreaker transitions on a fake clock: closed -> open -> half_open -> closed / open again."""

from __future__ import annotations

import pytest

from routing.breaker import CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(**kwargs: float) -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock()
    return CircuitBreaker(clock=clock, **kwargs), clock  # type: ignore[arg-type]


def trip(b: CircuitBreaker, n: int = 5) -> None:
    for _ in range(n):
        assert b.allow()
        b.record_failure()


def test_starts_closed_and_allows() -> None:
    b, _ = breaker()
    assert b.state == "closed" and b.allow()
    assert b.snapshot()["state"] == "closed"


def test_closed_to_open_by_consecutive_failures() -> None:
    b, _ = breaker(failures=3)
    b.record_failure()
    b.record_failure()
    b.record_success()  # a success resets the streak
    b.record_failure()
    b.record_failure()
    assert b.state == "closed"
    b.record_failure()
    assert b.state == "open" and not b.allow()
    assert b.opened_count == 1


def test_closed_to_open_by_error_rate() -> None:
    b, clock = breaker(failures=100, error_rate=0.5, window_s=30.0, min_requests=10)
    for _ in range(4):  # alternating, so never two failures in a row
        b.record_success()
        b.record_failure()
        clock.now += 1.0
    b.record_success()
    assert b.snapshot()["window_requests"] == 9 and b.state == "closed"  # 4/9 failed
    b.record_failure()  # 10 requests, 5 failed: 0.5 >= error_rate
    assert b.state == "open" and b.snapshot()["consecutive_failures"] == 1


def test_error_rate_needs_min_requests() -> None:
    b, _ = breaker(failures=100, min_requests=10)
    for _ in range(4):
        b.record_failure()
        b.record_success()
    assert b.snapshot()["window_requests"] == 8 and b.snapshot()["window_error_rate"] == 0.5
    assert b.state == "closed"  # a 50% rate over 8 requests is not enough evidence


def test_error_rate_window_slides() -> None:
    b, clock = breaker(failures=100, error_rate=0.5, window_s=30.0, min_requests=10)
    for _ in range(4):
        b.record_failure()
        b.record_success()
    clock.now += 31.0  # those 8 results age out of the window
    for _ in range(5):
        b.record_success()
    b.record_failure()
    snap = b.snapshot()
    assert (snap["window_requests"], snap["window_failures"]) == (6, 1) and b.state == "closed"
    for _ in range(3):
        b.record_failure()
    assert b.state == "closed"  # 9 in the window, 4 failed
    b.record_failure()  # 10 in the window, 5 failed; the aged-out 4 would have tripped it long ago
    assert b.state == "open"


def test_open_to_half_open_after_cooldown() -> None:
    b, clock = breaker(cooldown_s=10.0)
    trip(b)
    assert b.state == "open"
    clock.now += 9.99
    assert b.state == "open" and not b.allow()
    assert b.snapshot()["retry_in_s"] == pytest.approx(0.01)
    clock.now += 0.01
    assert b.state == "half_open"


def test_half_open_lets_exactly_one_probe() -> None:
    b, clock = breaker(cooldown_s=10.0)
    trip(b)
    clock.now += 10.0
    assert b.allow() is True  # the probe
    assert b.allow() is False  # a concurrent caller
    assert b.allow() is False
    assert b.state == "half_open" and b.snapshot()["probe_in_flight"] is True


def test_half_open_to_closed_on_probe_success() -> None:
    b, clock = breaker(failures=5, cooldown_s=10.0)
    trip(b)
    clock.now += 10.0
    assert b.allow()
    b.record_success()
    assert b.state == "closed" and b.allow() and b.allow()
    snap = b.snapshot()
    assert (snap["consecutive_failures"], snap["window_requests"]) == (0, 0)  # counts reset
    for _ in range(4):  # a fresh streak is needed to trip again
        b.record_failure()
    assert b.state == "closed"


def test_half_open_to_open_on_probe_failure() -> None:
    b, clock = breaker(cooldown_s=10.0)
    trip(b)
    clock.now += 10.0
    assert b.allow()
    b.record_failure()
    assert b.state == "open" and not b.allow()
    assert b.opened_count == 2
    clock.now += 9.0
    assert b.state == "open"  # another full cooldown, counted from the probe's failure
    clock.now += 1.0
    assert b.state == "half_open" and b.allow()


def test_results_from_before_the_trip_are_ignored() -> None:
    b, clock = breaker(cooldown_s=10.0)
    trip(b)
    b.record_success()  # a request sent while closed finishes while open
    assert b.state == "open"
    clock.now += 10.0
    b.record_success()  # half-open but no probe out: a straggler, not the probe
    assert b.state == "half_open"
    b.record_failure()
    assert b.state == "half_open" and b.opened_count == 1
    assert b.allow()


def test_a_lost_probe_is_given_up_after_probe_timeout() -> None:
    b, clock = breaker(cooldown_s=10.0, probe_timeout_s=60.0)
    trip(b)
    clock.now += 10.0
    assert b.allow()
    clock.now += 59.0
    assert not b.allow()
    clock.now += 1.0
    assert b.allow()  # the first probe never reported: a new one may go


def test_snapshot_shape() -> None:
    b, _ = breaker()
    b.record_failure()
    snap = b.snapshot()
    assert snap == {
        "state": "closed",
        "consecutive_failures": 1,
        "window_requests": 1,
        "window_failures": 1,
        "window_error_rate": 1.0,
        "retry_in_s": None,
        "probe_in_flight": False,
        "rate_limited_for_s": None,
        "opened_count": 0,
        "failures": 5,
        "cooldown_s": 10.0,
        "error_rate": 0.5,
        "window_s": 30.0,
        "min_requests": 10,
    }


def test_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failures=0)
    with pytest.raises(ValueError):
        CircuitBreaker(error_rate=0.0)


def test_a_cancelled_probe_hands_its_slot_back() -> None:
    """A probe whose client gave up says nothing about the upstream: the next request probes at once, instead of
    the breaker refusing everything until probe_timeout_s."""
    b, clock = breaker(cooldown_s=10.0, probe_timeout_s=60.0)
    trip(b)
    assert b.probe() is None  # open: no probe out
    clock.now += 10.0
    assert b.allow()
    first = b.probe()
    assert first is not None and not b.allow()
    b.release(first)
    assert b.state == "half_open" and b.opened_count == 1  # neither a success nor a failure
    assert b.allow()  # the next probe
    second = b.probe()
    b.release(first)  # a stale id leaves the newer probe's slot alone
    assert not b.allow()
    b.release(None)  # a lease that held no probe
    assert not b.allow()
    b.record_success()
    assert b.state == "closed"
    b.release(second)  # too late to matter: closed stays closed
    assert b.state == "closed" and b.allow()


def test_retry_in_s_says_how_soon_allow_may_say_yes() -> None:
    b, clock = breaker(cooldown_s=10.0)
    assert b.retry_in_s() is None  # closed
    trip(b)
    clock.now += 2.5
    assert b.retry_in_s() == pytest.approx(7.5)
    clock.now += 7.5
    assert b.retry_in_s() is None  # half-open, the probe slot free
    assert b.allow()
    assert b.retry_in_s() == 0.0  # a probe out: its answer may come any moment


def test_a_hold_refuses_requests_until_it_passes_and_is_no_verdict() -> None:
    b, clock = breaker()
    b.record_failure()
    b.hold(7.0)
    assert not b.allow() and b.state == "closed"  # a hold is no breaker state: nothing to probe after it
    assert b.retry_in_s() == pytest.approx(7.0) and b.held_s() == pytest.approx(7.0)
    assert b.snapshot()["rate_limited_for_s"] == pytest.approx(7.0)
    b.record_success()  # a request sent before the 429 still counts
    assert b.snapshot()["consecutive_failures"] == 0
    b.hold(2.0)  # a shorter hold keeps the longer one
    b.hold(0.0)
    clock.now += 6.5
    assert not b.allow() and b.retry_in_s() == pytest.approx(0.5)
    clock.now += 0.5
    assert b.allow() and b.retry_in_s() is None and b.held_s() is None
    assert b.snapshot()["rate_limited_for_s"] is None


def test_a_hold_on_an_open_breaker_waits_for_the_later_of_the_two() -> None:
    b, clock = breaker(cooldown_s=10.0)
    trip(b)
    b.hold(30.0)
    assert b.retry_in_s() == pytest.approx(30.0)
    clock.now += 10.0
    assert b.state == "half_open" and not b.allow()  # the hold outlasts the cooldown: no probe yet
    assert b.probe() is None
    clock.now += 20.0
    assert b.allow() and b.probe() is not None
