"""/metrics with several workers (prometheus-client's multiprocess files): known traffic spread over both workers
adds up exactly whichever worker answers a scrape, through a SIGHUP's rolling restart and a killed worker; metrics
turned on by a SIGHUP's new workers add up too; a launched engine's own series stay out of the gateway's page."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.mmap_dict import MmapedDict

from tests.conftest import free_port, http, start_gateway
from tests.e2e.test_managed_engine import children
from tests.gateway.live import wait_for
from tests.gateway.test_metrics import samples

# gauges: the answering worker's own (README); everything else must add up over the workers
_GAUGES = ("pointsman_event_loop_tasks", "pointsman_upstream_in_flight", "pointsman_circuit_breaker_state",
           "pointsman_upstream_rate_limited_seconds", "pointsman_budget_")


def _workers(gateway) -> list[int]:
    """The gateway's worker processes (uvicorn spawns them; the resource tracker is no worker)."""
    found = []
    for pid in children(gateway.proc.pid):
        try:
            command = (Path("/proc") / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in command:
            found.append(pid)
    return sorted(found)


def _environ(pid: int) -> dict[str, str]:
    raw = (Path("/proc") / str(pid) / "environ").read_bytes().decode(errors="replace")
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def _scrape(url: str) -> dict:
    """One scrape on a fresh connection (either worker may answer it), without the per-worker gauges."""
    status, _, page = http("GET", url + "/metrics")
    assert status == 200
    return {k: v for k, v in samples(page.decode()).items() if not k[0].startswith(_GAUGES)}


def _settled(url: str, requests: int) -> dict:
    """Scrapes until every request is counted, then ten more: each must be the same page."""
    got = wait_for(lambda: (page := _scrape(url)).get(("pointsman_gateway_overhead_seconds_count", ())) == requests
                and page, 60.0, f"{requests} requests counted")
    for _ in range(10):
        again = _scrape(url)
        assert again == got, {k: (got.get(k), again.get(k)) for k in {*got, *again} if got.get(k) != again.get(k)}
    return got


def _restarted(gateway, old: list[int]) -> None:
    """Two workers again, none of `old` among them, and serving."""
    wait_for(lambda: len(now := _workers(gateway)) == 2 and not set(now) & set(old), 60.0, "two new workers")
    wait_for(lambda: http("GET", gateway.url + "/ready", timeout=5)[0] == 200, 60.0, "ready")


def _served(directory: Path) -> set[int]:
    """The workers (pids) whose own counter file has counted a request."""
    served = set()
    for path in directory.glob("counter_*.db"):
        values = MmapedDict.read_all_values_from_file(str(path))
        if any(json.loads(key)[1] == "pointsman_requests_total" and value for key, value, *_ in values):
            served.add(int(path.stem.removeprefix("counter_")))
    return served


def _traffic(url: str, rounds: int, start: int = 0) -> None:
    """Per round, each on a connection of its own: a plain answer, a stream, a cacheable request (a miss, then
    hits), an upstream 400 and an unknown model's 404."""
    for i in range(start, start + rounds):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                               http_client=httpx.Client(limits=httpx.Limits(max_keepalive_connections=0)))
        with client:
            client.chat.completions.create(model="remote-a", messages=[{"role": "user", "content": f"one two {i}"}])
            list(client.chat.completions.create(model="remote-a", stream=True,
                                                messages=[{"role": "user", "content": f"three four {i}"}]))
            client.chat.completions.create(model="remote-a", temperature=0,
                                           messages=[{"role": "user", "content": "cached"}])
            with pytest.raises(openai.BadRequestError):
                client.chat.completions.create(model="remote-a", messages=[{"role": "user", "content": "status:400"}])
            with pytest.raises(openai.NotFoundError):
                client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def _expected(rounds: int) -> dict:
    """The counters `rounds` rounds of _traffic make (the mock upstream: a token per word, "echo: " one more)."""
    ok, hit, upstream_400, unknown = ("remote-a", "manual", "2xx"), ("remote-a", "none", "2xx"), (
        "remote-a", "manual", "4xx"), ("none", "none", "4xx")
    requests = {ok: 2 * rounds + 1, hit: rounds - 1, upstream_400: rounds, unknown: rounds}
    prompt, completion = 6 * rounds + rounds, 8 * rounds + 2 * rounds  # a hit counts its stored answer's tokens
    return {
        **{("pointsman_requests_total", (("model", m), ("route", r), ("status", s))): float(n)
           for (m, r, s), n in requests.items()},
        ("pointsman_tokens_total", (("kind", "prompt"), ("model", "remote-a"))): float(prompt),
        ("pointsman_tokens_total", (("kind", "completion"), ("model", "remote-a"))): float(completion),
        # $1 a prompt token, $2 a completion token; a hit costs nothing
        ("pointsman_cost_usd_total", (("model", "remote-a"),)): float(prompt - (rounds - 1)
                                                                      + 2 * (completion - 2 * (rounds - 1))),
        ("pointsman_cache_requests_total", (("result", "hit"),)): float(rounds - 1),
        ("pointsman_cache_requests_total", (("result", "miss"),)): 1.0,
        ("pointsman_time_to_first_token_seconds_count", (("model", "remote-a"),)): float(rounds),
        ("pointsman_request_duration_seconds_count", (("model", "remote-a"), ("route", "manual"))): float(3 * rounds
                                                                                                        + 1),
        ("pointsman_request_duration_seconds_count", (("model", "remote-a"), ("route", "none"))): float(rounds - 1),
        ("pointsman_request_duration_seconds_count", (("model", "none"), ("route", "none"))): float(rounds),
        ("pointsman_gateway_overhead_seconds_count", ()): float(5 * rounds),
    }


def _check(got: dict, rounds: int) -> None:
    for key, value in _expected(rounds).items():
        assert got.get(key) == value, (key, got.get(key), value)
    for (name, labels), count in got.items():  # each histogram: +Inf holds them all, buckets never fall
        if name.endswith("_count"):
            family = name.removesuffix("_count")
            buckets = sorted((float(dict(k[1])["le"]), v) for k, v in got.items() if k[0] == family + "_bucket"
                             and tuple(p for p in k[1] if p[0] != "le") == labels)
            assert buckets[-1] == (float("inf"), count)
            assert [v for _, v in buckets] == sorted(v for _, v in buckets)


def test_counters_add_up_across_workers_through_restarts(upstream, tmp_path, redis_server):
    config = f"""
models:
  - id: remote-a
    backend: openai
    base_url: {upstream.url}
    upstream_model: mock-model
    pricing: {{input_per_mtok: 1000000, output_per_mtok: 2000000}}
routing: {{health_check_s: 0}}
metrics: {{enabled: true}}
storage: {{redis_url: "{redis_server.url}", database_url: ''}}
policies:
  cache: {{mode: deterministic}}
"""
    gateway = start_gateway(tmp_path, config, args=("--workers", "2"))
    try:
        first = _workers(gateway)
        directory = Path(_environ(first[0])["PROMETHEUS_MULTIPROC_DIR"])
        # both workers up (each makes its counter file as its app starts), then rounds until both have served
        wait_for(lambda: {p.name for p in directory.glob("counter_*.db")} == {f"counter_{pid}.db" for pid in first},
                 60.0, "both workers started")
        rounds = 0
        while rounds < 6 or _served(directory) != set(first):
            assert rounds < 30, f"one worker answered {rounds * 5} requests alone"
            _traffic(gateway.url, 1, rounds)
            rounds += 1
        before = _settled(gateway.url, 5 * rounds)
        _check(before, rounds)

        gateway.proc.send_signal(signal.SIGHUP)  # a rolling restart: the old workers' counts stay
        _restarted(gateway, first)
        assert _settled(gateway.url, 5 * rounds) == before
        second = _workers(gateway)
        os.kill(second[0], signal.SIGKILL)  # uvicorn starts another
        _restarted(gateway, second[:1])
        assert _settled(gateway.url, 5 * rounds) == before

        _traffic(gateway.url, 2, rounds)  # counted once more, not twice (the cache's entry is still there: hits)
        after = _settled(gateway.url, 5 * rounds + 10)
        assert after[("pointsman_requests_total", (("model", "remote-a"), ("route", "none"), ("status", "2xx")))] == (
            before[("pointsman_requests_total", (("model", "remote-a"), ("route", "none"), ("status", "2xx")))] + 2)
        # files per worker process that ever ran, never per request or per scrape
        pids = set(first) | set(second) | set(_workers(gateway))
        assert {p.name for p in directory.iterdir()} <= {f"{kind}_{pid}.db" for pid in pids
                                                           for kind in ("counter", "histogram")}
        assert not [k for k in after if {"key", "user", "key_id"} & {name for name, _ in k[1]}]
    finally:
        assert gateway.stop() == 0
    assert not directory.exists()  # removed on exit


def test_metrics_turned_on_by_a_sighups_new_workers_add_up_across_them(upstream, tmp_path):
    """`pointsman serve` made the multiprocess directory only when metrics were on at start: a SIGHUP's new
    workers read the file again, and with metrics on there each counted its own requests alone, so a scrape
    showed whichever worker answered it."""
    models = f"""
models:
  - id: remote-a
    backend: openai
    base_url: {upstream.url}
    upstream_model: mock-model
routing: {{health_check_s: 0}}
storage: {{database_url: ''}}
"""
    gateway = start_gateway(tmp_path, models, args=("--workers", "2"))
    try:
        assert http("GET", gateway.url + "/metrics")[0] == 404  # off
        old = _workers(gateway)
        gateway.extra["config"].write_text(models + "metrics: {enabled: true}\n")
        gateway.proc.send_signal(signal.SIGHUP)
        _restarted(gateway, old)
        assert all(_environ(pid).get("PROMETHEUS_MULTIPROC_DIR") for pid in _workers(gateway))
        for i in range(20):  # each on a connection of its own: both workers answer some
            status, _, body = http("POST", gateway.url + "/v1/chat/completions",
                                   {"model": "remote-a", "messages": [{"role": "user", "content": f"hi {i}"}]})
            assert status == 200, body
        got = _settled(gateway.url, 20)
        assert got[("pointsman_requests_total", (("model", "remote-a"), ("route", "manual"), ("status", "2xx")))] == 20
    finally:
        assert gateway.stop() == 0


def test_a_restarted_engine_keeps_its_series_out_of_the_gateways_metrics(upstream, tmp_path):
    """An engine the parent launches (again, after a crash) inherited PROMETHEUS_MULTIPROC_DIR: a `pointsman
    engine` with metrics on (or vLLM, which uses prometheus-client too) wrote its series into the workers'
    directory, and the gateway's /metrics showed them: a model it does not serve, each request counted twice."""
    port = free_port()
    engine_yaml = tmp_path / "engine.yaml"
    engine_yaml.write_text(f"""
models:
  - id: relay
    backend: openai
    base_url: {upstream.url}
    upstream_model: mock-model
metrics: {{enabled: true}}
""")
    config = f"""
models:
  - id: managed
    backend: openai
    upstream_model: relay
    launch:
      command: [{sys.executable}, -m, gateway.cli, engine, --model, relay, --config, {engine_yaml}]
      args: [--port, "{port}"]
      port: {port}
routing: {{health_check_s: 0}}
metrics: {{enabled: true}}
storage: {{database_url: ''}}
"""
    gateway = start_gateway(tmp_path, config, args=("--workers", "2"))
    chat = {"model": "managed", "messages": [{"role": "user", "content": "hi"}]}

    def engine() -> int | None:
        found = [pid for pid in children(gateway.proc.pid) if b"engine" in (Path("/proc") / str(pid) / "cmdline"
                                                                              ).read_bytes()]
        return found[0] if len(found) == 1 else None

    try:
        first = wait_for(engine, 60.0, "the engine")
        os.kill(first, signal.SIGKILL)  # its supervisor starts it again, after the workers' directory exists
        again = wait_for(lambda: (pid := engine()) not in (None, first) and pid, 60.0, "the engine started again")
        wait_for(lambda: http("POST", gateway.url + "/v1/chat/completions", chat)[0] == 200, 60.0,
                 "the engine answering")
        assert "PROMETHEUS_MULTIPROC_DIR" not in _environ(again)
        for _ in range(4):  # the other worker may still hold the engine's deployment out for a moment: a 503
            wait_for(lambda: http("POST", gateway.url + "/v1/chat/completions", chat)[0] == 200, 60.0, "an answer")
        served = ("pointsman_requests_total", (("model", "managed"), ("route", "manual"), ("status", "2xx")))
        got = wait_for(lambda: (page := _scrape(gateway.url)).get(served, 0) >= 5 and page, 60.0,
                       "the requests counted")
        assert not [key for key in got if ("model", "relay") in key[1]]
    finally:
        assert gateway.stop() == 0
