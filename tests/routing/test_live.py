"""DeploymentState and ModelLive: in-flight counts, EWMAs on a fake clock, vLLM signals, the load blend."""

from __future__ import annotations

import pytest

from routing.breaker import CircuitBreaker
from routing.live import ALPHA, SOFT_IN_FLIGHT, DeploymentState, ModelLive


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_begin_end_counts_and_never_goes_negative() -> None:
    clock = FakeClock()
    s = DeploymentState("http://a/v1", clock=clock)
    t1, t2 = s.begin(), s.begin()
    assert s.in_flight == 2 and t1 == t2 == 100.0
    s.end(t1, ok=True)
    s.end(t2, ok=False)
    s.end(t2, ok=False)  # a double end must not drive the count below zero
    assert s.in_flight == 0


def test_latency_ewma_seeds_from_the_second_sample_then_blends_with_alpha() -> None:
    clock = FakeClock()
    s = DeploymentState("a", clock=clock)
    for seconds in (2.0, 1.0, 2.0):
        started = s.begin()
        clock.now += seconds
        s.end(started, ok=True)
        if s.samples == 1:
            assert s.ewma_latency_s == 2.0  # the first sample stands in until the second
        elif s.samples == 2:
            assert s.ewma_latency_s == 1.0  # the second replaces it: the first often paid for connection setup
    assert ALPHA == 0.3 and s.samples == 3
    assert s.ewma_latency_s == pytest.approx(1.0 + 0.3 * (2.0 - 1.0))


def test_a_first_sample_outlier_does_not_dominate_the_estimate() -> None:
    """An idle deployment's first request pays for TCP/TLS setup (3 s); its next ones take 0.2 s, then it slows
    to 0.5 s: the estimate follows the later samples, not the outlier (blending it in from the start left 0.67 s
    after five 0.2 s samples)."""
    clock = FakeClock()
    s = DeploymentState("a", clock=clock)

    def serve(seconds: float) -> None:
        started = s.begin()
        clock.now += seconds
        s.end(started, ok=True, ttft_s=seconds / 2)

    serve(3.0)
    for _ in range(5):
        serve(0.2)
    assert s.ewma_latency_s == pytest.approx(0.2) and s.ewma_ttft_s == pytest.approx(0.1)
    for _ in range(10):
        serve(0.5)
    assert s.ewma_latency_s == pytest.approx(0.5, abs=0.01)


def test_failures_do_not_touch_the_ewmas() -> None:
    clock = FakeClock()
    s = DeploymentState("a", clock=clock)
    started = s.begin()
    clock.now += 30.0
    s.end(started, ok=False, ttft_s=29.0, completion_tokens=10)
    assert s.ewma_latency_s is s.ewma_ttft_s is s.ewma_tokens_per_s is None


def test_ttft_and_decode_speed() -> None:
    clock = FakeClock()
    s = DeploymentState("a", clock=clock)
    started = s.begin()
    clock.now += 3.0
    s.end(started, ok=True, ttft_s=1.0, completion_tokens=100)
    assert s.ewma_ttft_s == 1.0
    assert s.ewma_tokens_per_s == pytest.approx(100 / 2.0)  # tokens over the time after the first token
    started = s.begin()
    clock.now += 4.0
    s.end(started, ok=True, completion_tokens=200)  # non-streaming: no TTFT, the whole request is decode
    assert s.ewma_tokens_per_s == pytest.approx(50 + 0.3 * (50 - 50))
    assert s.ewma_ttft_s == 1.0
    started = s.begin()
    s.end(started, ok=True, completion_tokens=5)  # zero elapsed: no division by zero, no speed sample
    assert s.ewma_tokens_per_s == pytest.approx(50.0)


def test_signals_apply_clamp_and_clear() -> None:
    s = DeploymentState("a")
    assert not s.has_signals
    s.apply_signals(running=3.0, waiting=1.0, kv_cache_usage=1.7, now=5.0)
    assert (s.running, s.waiting, s.kv_cache_usage, s.signals_at) == (3.0, 1.0, 1.0, 5.0)
    assert s.has_signals
    s.clear_signals()
    assert (s.running, s.waiting, s.kv_cache_usage, s.signals_at) == (None, None, None, None)


def test_deployment_load_blend() -> None:
    s = DeploymentState("a")
    assert s.load() == 0.0
    s.in_flight = int(SOFT_IN_FLIGHT)
    assert s.load() == pytest.approx(0.5)  # the soft capacity reads as half loaded
    s.in_flight = 0
    s.apply_signals(running=0.0, waiting=0.0, kv_cache_usage=0.9, now=0.0)
    assert s.load() == pytest.approx(0.9)
    s.apply_signals(running=0.0, waiting=4.0, kv_cache_usage=0.0, now=0.0)
    assert s.load() == pytest.approx(0.5)  # a queue alone
    s.apply_signals(running=0.0, waiting=4.0, kv_cache_usage=0.5, now=0.0)
    assert s.load() == pytest.approx(1 - 0.5 * 0.5)  # queue and KV compound
    s.apply_signals(running=1000.0, waiting=1000.0, kv_cache_usage=1.0, now=0.0)
    assert 0.0 <= s.load() <= 1.0
    # vLLM idle but the gateway has requests out (the poll lags): the larger view wins
    s.apply_signals(running=0.0, waiting=0.0, kv_cache_usage=0.0, now=0.0)
    s.in_flight = 48
    assert s.load() == pytest.approx(48 / (48 + SOFT_IN_FLIGHT))


def test_load_is_monotonic_in_each_input() -> None:
    s = DeploymentState("a")
    loads = []
    for n in range(0, 100, 7):
        s.in_flight = n
        loads.append(s.load())
    assert loads == sorted(loads) and loads[-1] < 1.0


def test_model_live_aggregates() -> None:
    a, b, c = DeploymentState("a", 1.0), DeploymentState("b", 3.0), DeploymentState("c", 1.0)
    live = ModelLive([a, b, c])
    assert (live.ttft_s, live.latency_s, live.load) == (None, None, 0.0)
    a.in_flight, b.in_flight = 2, 5
    a.apply_signals(running=2.0, waiting=3.0, kv_cache_usage=0.2, now=0.0)
    c.apply_signals(running=0.0, waiting=1.5, kv_cache_usage=None, now=0.0)
    a.ewma_ttft_s, b.ewma_ttft_s = 1.0, 2.0  # c unknown: left out, not counted as 0
    a.ewma_latency_s = 4.0
    assert live.ttft_s == pytest.approx((1 * 1.0 + 3 * 2.0) / 4)
    assert live.latency_s == 4.0
    assert live.load == pytest.approx((1 * a.load() + 3 * b.load() + 1 * c.load()) / 5)
    assert 0.0 < live.load < 1.0


def test_model_live_retry_in_s_is_the_soonest_breaker() -> None:
    now = [0.0]
    breakers = [CircuitBreaker(failures=1, cooldown_s=c, clock=lambda: now[0]) for c in (30.0, 10.0)]
    live = ModelLive([DeploymentState("a"), DeploymentState("b")], breakers)
    assert ModelLive([DeploymentState("a")]).retry_in_s() is None  # no breakers known
    breakers[0].record_failure()
    assert live.retry_in_s() is None  # b still takes requests
    breakers[1].record_failure()
    assert live.retry_in_s() == 10.0
    now[0] = 12.0
    assert live.retry_in_s() is None  # b half-open: it takes a probe
