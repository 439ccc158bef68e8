"""The deployment pool and its lease: one place books in-flight counts, EWMAs, breakers and attempt records."""

from __future__ import annotations

import asyncio
import random

import pytest

from backends.base import build_backend
from config.loader import parse_config
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
