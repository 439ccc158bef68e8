"""The deployment pool and its lease: one place books in-flight counts, EWMAs, breakers and attempt records."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from backends.base import build_backend
from config.loader import ConfigError, parse_config
from gateway.deployments import DeploymentPool
from protocol.errors import UpstreamStatusError, UpstreamUnavailable

CONFIG = """
routing: {retries: 1, circuit_breaker: {failures: 2, cooldown_s: 60}}
models:
  - id: m
    backend: openai
    load_balancing: round_robin
    deployments: [{base_url: "http://127.0.0.1:1/v1"}, {base_url: "http://127.0.0.1:2/v1"},
                  {base_url: "http://127.0.0.1:3/v1"}]
"""


@pytest.fixture
def pool() -> DeploymentPool:
    config = parse_config(CONFIG)
    return DeploymentPool(config.models[0], build_backend(config.models[0]), config)


def test_ok_books_latency_tokens_and_a_breaker_success(pool):
    lease = pool.lease(0)
    assert pool.states[0].in_flight == 1 and lease.record.deployment == "http://127.0.0.1:1/v1"
    lease.ok(ttft_s=0.01, completion_tokens=5)
    state = pool.states[0]
    assert state.in_flight == 0 and state.ewma_latency_s is not None and state.ewma_ttft_s == 0.01
    assert (lease.record.ok, lease.record.error, lease.record.ttft_s) == (True, None, 0.01)
    assert lease.record.ended >= lease.record.started
    assert pool.breakers[0].snapshot()["window_requests"] == 1


def test_only_upstream_faults_count_against_the_breaker(pool):
    pool.lease(0).fail(UpstreamStatusError(400, b'{"error": {"message": "bad", "type": "x"}}'))
    pool.lease(0).fail(asyncio.CancelledError())  # the client left: neither success nor failure
    assert pool.breakers[0].snapshot()["window_failures"] == 0 and pool.breakers[0].state == "closed"
    for _ in range(2):
        lease = pool.lease(0)
        lease.fail(UpstreamUnavailable("refused"))
    assert lease.record.error == "upstream_unavailable" and lease.record.ok is False
    assert pool.breakers[0].state == "open" and pool.states[0].in_flight == 0
    assert pool.states[0].ewma_latency_s is None  # failures say nothing about speed


def test_a_cancelled_attempt_is_recorded_as_cancelled(pool):
    lease = pool.lease(1)
    lease.fail(asyncio.CancelledError())
    assert (lease.record.ok, lease.record.error) == (False, "cancelled")


def test_attempts_stop_at_retries_and_skip_open_breakers(pool):
    rng = random.Random(1)
    assert len(list(pool.attempts(rng))) == 2  # retries: 1
    for _ in range(2):
        pool.lease(1).fail(UpstreamUnavailable("down"))
    for _ in range(6):
        assert 1 not in list(pool.attempts(rng))
    assert pool.available()


def test_each_gateway_draws_its_own_random_sequence():
    """Workers must not all make the same power-of-two choices: the balancer's generator is seeded per process."""
    from gateway.service import Gateway

    config = parse_config(CONFIG)
    first, second = Gateway(config), Gateway(config)
    assert [first.rng.random() for _ in range(4)] != [second.rng.random() for _ in range(4)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def clocked_pool(yaml: str = CONFIG) -> tuple[DeploymentPool, FakeClock]:
    config, clock = parse_config(yaml), FakeClock()
    return DeploymentPool(config.models[0], build_backend(config.models[0]), config, clock=clock), clock


@pytest.mark.parametrize("exc", [asyncio.CancelledError(), GeneratorExit(), RuntimeError("a gateway bug")])
def test_a_cancelled_probe_lets_the_next_request_probe(exc):
    """The half-open probe's client leaves (or a streaming client disconnects): no verdict on the upstream, so the
    breaker's probe slot is handed back at once, not after probe_timeout_s."""
    pool, clock = clocked_pool()
    for _ in range(2):
        pool.lease(0).fail(UpstreamUnavailable("down"))
    clock.now += 60.0  # the cooldown: half-open
    breaker = pool.breakers[0]
    assert breaker.allow()
    probe = pool.lease(0)
    assert not breaker.allow()  # the probe is out
    probe.fail(exc)
    assert breaker.state == "half_open" and breaker.opened_count == 1
    assert breaker.allow()  # the next request probes
    pool.lease(0).ok()
    assert breaker.state == "closed"


def test_a_cancelled_attempt_from_before_the_trip_frees_no_probe():
    pool, clock = clocked_pool()
    straggler = pool.lease(0)  # sent while closed
    for _ in range(2):
        pool.lease(0).fail(UpstreamUnavailable("down"))
    clock.now += 60.0
    assert pool.breakers[0].allow()
    pool.lease(0)  # the probe, still out
    straggler.fail(asyncio.CancelledError())
    assert not pool.breakers[0].allow()


WEIGHTED = """
routing: {retries: 1, circuit_breaker: {failures: 1, cooldown_s: 60}}
models:
  - id: m
    backend: openai
    load_balancing: weighted
    deployments: [{base_url: "http://127.0.0.1:1/v1", weight: 1}, {base_url: "http://127.0.0.1:2/v1", weight: 2},
                  {base_url: "http://127.0.0.1:3/v1", weight: 3}]
"""


@pytest.mark.parametrize(("yaml", "opened", "shares"), [
    (CONFIG, 1, {0: 150, 2: 150}),  # round robin: an open deployment's turn does not all go to its successor
    (CONFIG, 0, {1: 150, 2: 150}),
    (WEIGHTED, 2, {0: 100, 1: 200}),  # weighted: the rest share in proportion to their weights
    (WEIGHTED, 0, {1: 120, 2: 180}),
])
def test_the_rotation_skips_an_open_deployment(yaml, opened, shares):
    pool, _ = clocked_pool(yaml)
    for _ in range(pool.breakers[opened].failures):
        pool.lease(opened).fail(UpstreamUnavailable("down"))
    rng = random.Random(1)
    firsts = Counter(next(pool.attempts(rng)) for _ in range(300))
    assert firsts == shares
    assert pool.targets(rng)[-1] == opened  # still a candidate, last


def test_the_rotation_resumes_when_every_breaker_refuses():
    pool, clock = clocked_pool()
    for index in range(3):
        for _ in range(2):
            pool.lease(index).fail(UpstreamUnavailable("down"))
    rng = random.Random(1)
    assert list(pool.attempts(rng)) == [] and sorted(pool.targets(rng)) == [0, 1, 2]
    clock.now += 60.0
    assert len(list(pool.attempts(rng))) == 2  # half-open: probes go out


def test_nothing_to_try_says_when_to_retry():
    """Every deployment's breaker open: the 503 carries Retry-After, the time until the first one half-opens."""
    from gateway.service import Gateway
    from protocol.openai import ChatCompletionRequest, decode_request

    gateway = Gateway(parse_config(CONFIG))
    pool = gateway.pools["m"]
    for index in range(3):
        for _ in range(2):
            pool.lease(index).fail(UpstreamUnavailable("down"))
    request = decode_request({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, ChatCompletionRequest)
    decision = asyncio.run(gateway.decide(request))
    assert list(pool.attempts(gateway.rng)) == []
    error = gateway.nothing_to_try(decision)
    assert error.status == 503 and 1 <= int(error.headers["retry-after"]) <= 60  # cooldown_s: 60
    explained = asyncio.run(gateway.decide(request, explain=True)).explain()
    assert explained["model"] is None and "circuit breakers open" in explained["skipped"]["m"]


@pytest.mark.parametrize("weights", [(".inf", "1"), ("1e308", "1e308")])
def test_deployment_weights_must_be_finite_and_sum_finitely(weights):
    deployments = ", ".join(f'{{base_url: "http://127.0.0.1:{n}/v1", weight: {w}}}' for n, w in enumerate(weights, 1))
    with pytest.raises(ConfigError, match="model 'm'.*(finite|float can hold)"):
        parse_config(f"models: [{{id: m, backend: openai, deployments: [{deployments}]}}]")


def test_a_model_whose_deployments_are_all_held_by_429s_is_not_available(pool):
    """/v1/models' status and automatic routing's eligibility read this: a held model takes no request."""
    *others, last = pool.breakers
    for breaker in others:
        breaker.hold(30)
    assert pool.available()  # the last deployment takes requests
    last.hold(30)
    assert not pool.available()
