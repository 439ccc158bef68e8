"""Prometheus metrics and JSON request lines: the policy's series in process, then GET /metrics on a live gateway."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from config.loader import parse_config
from gateway.metrics import GatewayCollector, Metrics
from gateway.service import Gateway
from policies.context import AttemptRecord, Outcome, RequestContext
from policies.metrics import REQUEST_LOG, MetricsPolicy, RequestMetrics
from protocol.errors import BadRequest
from protocol.openai import ChatCompletionRequest, ParsedRequest
from tests.conftest import http, start_gateway


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus page, keyed by (name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _ctx(model: str | None = "m1", stream: bool = False) -> RequestContext:
    body = ChatCompletionRequest(model="whatever-the-client-sent", messages=[{"role": "user", "content": "hi"}],
                                 stream=stream)
    ctx = RequestContext(ParsedRequest(body, {}), request_id="req-1")
    ctx.model, ctx.route = model, "manual" if model else None
    return ctx


async def test_settle_counts_bounded_series_and_logs_json(caplog) -> None:
    registry = CollectorRegistry()
    policy = MetricsPolicy(RequestMetrics(registry), log_requests=True)
    ok = _ctx(stream=True)
    ok.prompt_tokens, ok.completion_tokens, ok.cost_usd, ok.cache = 7, 5, 0.25, "miss"
    ok.attempts.append(AttemptRecord("m1", "d0", ok.started, ended=ok.started + 0.05, ok=True, ttft_s=0.01))
    with caplog.at_level(logging.INFO, logger=REQUEST_LOG):
        await policy.settle(ok, Outcome("ok"))
        await policy.settle(_ctx(), Outcome("ok"))
        await policy.settle(_ctx(model=None), Outcome("error", error=BadRequest("bad")))
        await policy.settle(_ctx(), Outcome("cancelled"))
    got = samples(generate_latest(registry).decode())
    assert got[("pointsman_requests_total", (("model", "m1"), ("route", "manual"), ("status", "2xx")))] == 2
    assert got[("pointsman_requests_total", (("model", "none"), ("route", "none"), ("status", "4xx")))] == 1
    assert got[("pointsman_requests_total", (("model", "m1"), ("route", "manual"), ("status", "cancelled")))] == 1
    assert got[("pointsman_tokens_total", (("kind", "prompt"), ("model", "m1")))] == 7
    assert got[("pointsman_tokens_total", (("kind", "completion"), ("model", "m1")))] == 5
    assert got[("pointsman_cost_usd_total", (("model", "m1"),))] == 0.25
    assert got[("pointsman_cache_requests_total", (("result", "miss"),))] == 1
    assert got[("pointsman_time_to_first_token_seconds_count", (("model", "m1"),))] == 1
    assert got[("pointsman_request_duration_seconds_count", (("model", "m1"), ("route", "manual")))] == 3
    assert got[("pointsman_gateway_overhead_seconds_count", ())] == 4
    assert not any("whatever-the-client-sent" in str(key) for key in got)  # the client's name is no label
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == REQUEST_LOG]
    assert [line["status"] for line in lines] == ["ok", "ok", "error", "cancelled"]
    assert lines[0] | {"latency_ms": 0} == {
        "request_id": "req-1", "key_id": None, "model": "m1", "route": "manual", "status": "ok", "http_status": 200,
        "error": None, "latency_ms": 0, "prompt_tokens": 7, "completion_tokens": 5, "cost_usd": 0.25,
        "cache": "miss"}
    assert lines[2]["http_status"] == 400


async def test_event_loop_tasks_gauge_follows_the_loop() -> None:
    metrics = Metrics(SimpleNamespace(pools={}))  # type: ignore[arg-type]

    async def tasks() -> float:
        return samples((await metrics.render()).decode())[("pointsman_event_loop_tasks", ())]

    before = await tasks()
    waiting = [asyncio.ensure_future(asyncio.sleep(3600)) for _ in range(5)]
    assert await tasks() == before + 5
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert await tasks() == before  # gone again: the gauge counts live tasks, not tasks ever made


CONFIG = """
models:
  - id: remote-a
    backend: openai
    base_url: {url}
    upstream_model: mock-model
    pricing: {{input_per_mtok: 1000000, output_per_mtok: 2000000}}
  - id: dead
    backend: openai
    base_url: http://127.0.0.1:9/v1
    load: lazy
metrics: {{enabled: true}}
logging: {{requests: true}}
policies:
  budgets:
    - {{scope: global, period: day, max_tokens: 1000000}}
    - {{scope: model, period: month, max_cost_usd: 100000000}}
"""


def scrape_until(url: str, done, timeout: float = 20.0) -> dict:
    """GET /metrics until `done(samples)`: a plain answer's settle runs just after its body is written."""
    deadline = time.monotonic() + timeout
    while True:
        status, headers, page = http("GET", url + "/metrics")
        assert status == 200 and {k.lower(): v for k, v in headers.items()}["content-type"].startswith("text/plain")
        got = samples(page.decode())
        if done(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_after_known_traffic(upstream, tmp_path, workers: int, request: pytest.FixtureRequest) -> None:
    config = CONFIG.format(url=upstream.url)
    if workers > 1:  # several workers share their budgets through Redis (serve refuses them without it)
        config += f"storage: {{redis_url: \"{request.getfixturevalue('redis_server').url}\"}}\n"
    server = start_gateway(tmp_path, config, args=("--workers", str(workers)))
    try:
        chat = {"model": "remote-a", "messages": [{"role": "user", "content": "one two three"}]}
        answers = [http("POST", server.url + "/v1/chat/completions", chat) for _ in range(4)]
        assert {status for status, _, _ in answers} == {200}
        usage = json.loads(answers[0][2])["usage"]
        streamed = http("POST", server.url + "/v1/chat/completions", {**chat, "stream": True})
        assert streamed[0] == 200
        assert http("POST", server.url + "/v1/chat/completions", {**chat, "model": "nope"})[0] == 404
        ok = (("model", "remote-a"), ("route", "manual"), ("status", "2xx"))
        got = scrape_until(server.url, lambda got: got.get(("pointsman_gateway_overhead_seconds_count", ())) == 6)
        assert got[("pointsman_requests_total", ok)] == 5
        assert got[("pointsman_requests_total", (("model", "none"), ("route", "none"), ("status", "4xx")))] == 1
        assert got[("pointsman_tokens_total", (("kind", "prompt"), ("model", "remote-a")))] >= 4 * usage[
            "prompt_tokens"]
        assert got[("pointsman_cost_usd_total", (("model", "remote-a"),))] == pytest.approx(
            4 * usage["prompt_tokens"] + 8 * usage["completion_tokens"], rel=0.5)
        assert got[("pointsman_request_duration_seconds_count", (("model", "remote-a"), ("route", "manual")))] == 5
        assert got[("pointsman_time_to_first_token_seconds_count", (("model", "remote-a"),))] == 1
        assert got[("pointsman_gateway_overhead_seconds_count", ())] == 6
        assert got[("pointsman_upstream_in_flight", (("model", "remote-a"),))] == 0
        breakers = {k[1]: v for k, v in got.items() if k[0] == "pointsman_circuit_breaker_state"}
        assert {dict(labels)["model"] for labels in breakers} == {"remote-a", "dead"} and set(breakers.values()) == {0}
        # the budget gauges: the global budget, and the model budget's member charged in this period
        spent = 4 * (usage["prompt_tokens"] + usage["completion_tokens"])
        tokens = (("budget", "0"), ("kind", "tokens"), ("member", "*"), ("period", "day"), ("scope", "global"))
        assert got[("pointsman_budget_limit", tokens)] == 1_000_000
        assert got[("pointsman_budget_remaining", tokens)] <= 1_000_000 - (spent if workers == 1 else 0)
        if workers == 1:  # a worker shows the members it has charged itself: with two, the other may have all
            usd = (("budget", "1"), ("kind", "usd"), ("member", "remote-a"), ("period", "month"), ("scope", "model"))
            assert got[("pointsman_budget_limit", usd)] == 100_000_000
            assert got[("pointsman_budget_remaining", usd)] < 100_000_000
        lines = [json.loads(line) for line in server.output().splitlines() if line.startswith('{"request_id"')]
        assert len(lines) == 6 and {line["model"] for line in lines} == {"remote-a", "none"}
    finally:
        server.stop()


async def test_a_deployment_held_by_an_upstream_429_shows_in_its_gauge():
    gateway = Gateway(parse_config("""
routing: {health_check_s: 0}
models:
  - {id: pair, backend: openai, deployments: [{base_url: "http://127.0.0.1:1/v1"}, {base_url: "http://127.0.0.1:2/v1"}]}
"""))
    gateway.pools["pair"].breakers[1].hold(30)
    (held,) = [m for m in GatewayCollector(gateway).collect() if m.name == "pointsman_upstream_rate_limited_seconds"]
    await gateway.aclose()
    seconds = {s.labels["deployment"]: s.value for s in held.samples}
    assert len(seconds) == 2 and sorted(seconds.values())[0] == 0.0 and 29 < sorted(seconds.values())[1] <= 30
