"""Every load-balancing strategy and the breaker's transitions, against real upstream processes."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from routing.balancer import STRATEGIES
from tests.conftest import free_port, http, start_gateway, start_upstream


@pytest.fixture(scope="module")
def strategies(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("balancing")
    a, b = start_upstream(tmp, "dep-a"), start_upstream(tmp, "dep-b")
    models = "\n".join(
        f"""  - id: {name}
    backend: openai
    load_balancing: {name}
    deployments: [{{base_url: "{a.url}", weight: 1}}, {{base_url: "{b.url}", weight: 3}}]"""
        for name in STRATEGIES
    )
    gateway = start_gateway(tmp, f"routing: {{health_check_s: 0}}\nmodels:\n{models}\n")
    yield gateway, a, b
    gateway.stop()
    a.stop()
    b.stop()


def _requests(upstream) -> int:
    return json.loads(http("GET", upstream.url.removesuffix("/v1") + "/stats")[2])["requests"]


async def _burst(url: str, model: str, total: int, concurrency: int) -> list[str]:
    served: list[str] = []
    queue = iter(range(total))
    body = {"model": model, "messages": [{"role": "user", "content": "sleep:0.02"}]}
    async with aiohttp.ClientSession() as session:
        async def worker() -> None:
            for _ in queue:
                async with session.post(url + "/v1/chat/completions", json=body) as response:
                    assert response.status == 200
                    served.append((await response.json())["x_received"]["body"]["model"])
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return served


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_each_strategy_spreads_load_over_real_deployments(strategies, strategy):
    gateway, a, b = strategies
    before = _requests(a), _requests(b)
    served = asyncio.run(_burst(gateway.url, strategy, 40, 8))
    assert len(served) == 40
    on_a, on_b = _requests(a) - before[0], _requests(b) - before[1]
    assert on_a + on_b == 40
    assert on_a > 0 and on_b > 0, (strategy, on_a, on_b)
    if strategy == "weighted":
        assert (on_a, on_b) == (10, 30)  # smooth weighted round robin is exact over whole cycles
    if strategy == "round_robin":
        assert (on_a, on_b) == (20, 20)


def _breaker(gateway, model: str, index: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": "x"}]}
    return json.loads(http("POST", gateway.url + "/v1/route", body)[2])["deployments"][model][index]["breaker"]


def test_breaker_opens_half_opens_and_closes_on_a_real_restart(tmp_path):
    port = free_port()
    backup = start_upstream(tmp_path, "backup")
    config = f"""
routing:
  health_check_s: 0
  circuit_breaker: {{failures: 2, cooldown_s: 1}}
models:
  - id: flaky
    backend: openai
    deployments: [{{base_url: "http://127.0.0.1:{port}/v1"}}, {{base_url: "{backup.url}"}}]
"""
    gateway = start_gateway(tmp_path, config)
    body = {"model": "flaky", "messages": [{"role": "user", "content": "hi"}]}
    try:
        assert _breaker(gateway, "flaky", 0)["state"] == "closed"
        for _ in range(4):  # the first deployment is down: every request is retried on the backup
            assert http("POST", gateway.url + "/v1/chat/completions", body)[0] == 200
        assert _breaker(gateway, "flaky", 0)["state"] == "open"
        revived = start_upstream(tmp_path, "revived", port=port)
        deadline = time.monotonic() + 10  # the cooldown is 1 s
        while _breaker(gateway, "flaky", 0)["state"] != "half_open":
            assert time.monotonic() < deadline, "the breaker never half-opened"
        before = _requests(revived)
        for _ in range(3):
            assert http("POST", gateway.url + "/v1/chat/completions", body)[0] == 200
        assert _requests(revived) > before  # the probe went to the revived deployment
        assert _breaker(gateway, "flaky", 0)["state"] == "closed"
        revived.stop()
    finally:
        gateway.stop()
        backup.stop()
