"""Operators' signals against known traffic: /metrics samples, JSON request lines, spans and x-request-id."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from config.loader import parse_config
from gateway.app import create_app
from gateway.tracing import Tracing
from policies.metrics import REQUEST_LOG
from tests.gateway.live import serve, wait_for

KEY = "sk-signals"
AUTH = {"authorization": f"Bearer {KEY}"}


def _config(url: str, tmp_path):
    return parse_config(f"""
models:
  - id: remote-a
    backend: openai
    base_url: {url}
    upstream_model: mock-model
    pricing: {{input_per_mtok: 1000000, output_per_mtok: 2000000}}
  - id: flaky
    backend: openai
    upstream_model: mock-model
    deployments: [{{base_url: {url}}}, {{base_url: {url}}}]
  - id: limited
    backend: openai
    base_url: {url}
    upstream_model: mock-model
  - id: capped
    backend: openai
    base_url: {url}
    upstream_model: mock-model
  - id: emb
    backend: openai
    base_url: {url}
    upstream_model: mock-model
routing: {{health_check_s: 0, retries: 1}}
auth: {{api_keys: ["{KEY}"]}}
storage: {{database_url: "sqlite+aiosqlite:///{tmp_path}/usage.db"}}
metrics: {{enabled: true}}
logging: {{requests: true}}
tracing: {{enabled: true, exporter: none}}
policies:
  cache: {{mode: deterministic}}
  rate_limits: [{{scope: model, match: limited, rpm: 1}}]
  budgets: [{{scope: model, match: capped, period: day, max_tokens: 1}}]
""")


def _samples(url: str) -> dict:
    page = httpx.get(url + "/metrics", headers=AUTH, timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(page) for s in family.samples}


def _requests(got: dict) -> dict:
    return {dict(k[1])["model"] + "/" + dict(k[1])["route"] + "/" + dict(k[1])["status"]: v
            for k, v in got.items() if k[0] == "pointsman_requests_total"}


def _traced(url: str, tmp_path):
    config = _config(url, tmp_path)
    exporter = InMemorySpanExporter()
    return create_app(config, tracing=Tracing(config.tracing, SimpleSpanProcessor(exporter))), exporter


def _lines(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == REQUEST_LOG]


@pytest.fixture
def request_lines(caplog):
    """The JSON request lines, caught by caplog (the gateway's own handler does not propagate them)."""
    logger = logging.getLogger(REQUEST_LOG)
    caplog.set_level(logging.INFO, logger=REQUEST_LOG)
    yield lambda: _lines(caplog)
    logger.propagate = False


def test_each_request_is_counted_once_logged_once_and_traced(upstream, tmp_path, request_lines, caplog):
    app, exporter = _traced(upstream.url, tmp_path)
    logging.getLogger(REQUEST_LOG).propagate = True  # create_app's handler stops them; caplog reads the root's
    chat = {"model": "remote-a", "messages": [{"role": "user", "content": "one two three"}]}
    ids: list[str] = []
    with serve(app) as url:
        def post(path: str, body: dict, status: int = 200) -> httpx.Response:
            answer = httpx.post(url + path, json=body, headers=AUTH, timeout=20)
            assert answer.status_code == status, answer.text
            ids.append(answer.headers["x-request-id"])
            wait_for(lambda: ids[-1] in {line["request_id"] for line in request_lines()}, what=path)
            return answer

        plain = post("/v1/chat/completions", chat).json()["usage"]
        post("/v1/chat/completions", {**chat, "stream": True})
        post("/v1/chat/completions", {**chat, "stream": True, "stream_options": {"include_usage": True}})
        post("/v1/chat/completions", {**chat, "temperature": 0})  # a cache miss, then two hits
        post("/v1/chat/completions", {**chat, "temperature": 0})
        post("/v1/chat/completions", {**chat, "temperature": 0, "stream": True})
        post("/v1/chat/completions", {"model": "flaky", "messages": [{"role": "user", "content": "status:503"}]},
             503)  # both deployments tried
        post("/v1/chat/completions", {**chat, "stream": True,
                                      "messages": [{"role": "user", "content": "break:1 a b c"}]})
        post("/v1/chat/completions", {**chat, "model": "limited"})
        post("/v1/chat/completions", {**chat, "model": "limited"}, 429)
        post("/v1/chat/completions", {**chat, "model": "capped"}, 429)
        post("/v1/embeddings", {"model": "emb", "input": "hello"})
        post("/v1/responses", {"model": "remote-a", "input": "hello"})
        post("/v1/messages", {"model": "remote-a", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})
        with httpx.stream("POST", url + "/v1/chat/completions", headers=AUTH, timeout=20, json={
                **chat, "stream": True, "messages": [{"role": "user", "content": "gap:0.3 a b c d e f"}]}) as left:
            next(left.iter_raw())  # the first chunk, then the client leaves
            ids.append(left.headers["x-request-id"])
        with connect(url.replace("http", "ws") + "/v1/chat/completions/ws", additional_headers=AUTH) as ws:
            ws.send(json.dumps(chat))
            while "done" not in (message := json.loads(ws.recv())):
                pass
            ids.append(message["request_id"])
        lines = wait_for(lambda: (got := request_lines()) and len(got) == len(ids) and got, what="every line")
        page = httpx.get(url + "/metrics", headers=AUTH, timeout=10).text
        spans = wait_for(lambda: (s := exporter.get_finished_spans()) and
                         sum(x.parent is None for x in s) == len(ids) and s, what="every request span")
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for family in text_string_to_metric_families(page) for s in family.samples}
    counted = {tuple(dict(k[1])[n] for n in ("model", "route", "status")): v
               for k, v in got.items() if k[0] == "pointsman_requests_total"}
    assert counted == {
        ("remote-a", "manual", "2xx"): 7,  # plain, 2 streamed, the miss, responses, messages, the WebSocket's
        ("remote-a", "none", "2xx"): 2,  # the cache's hits: no route taken
        ("flaky", "manual", "5xx"): 1,  # routed, then every attempt failed: still the route it was sent by
        ("remote-a", "manual", "5xx"): 1,  # the stream that broke after its first chunk
        ("remote-a", "manual", "cancelled"): 1,
        ("limited", "manual", "2xx"): 1,
        ("none", "none", "4xx"): 2,  # the rate limit's and the budget's refusals, before routing
        ("emb", "manual", "2xx"): 1,
    }
    assert sum(counted.values()) == len(ids) == len(lines)
    assert sorted(line["request_id"] for line in lines) == sorted(ids)  # one line per request, its answer's id
    assert got[("pointsman_cache_requests_total", (("result", "hit"),))] == 2
    assert got[("pointsman_cache_requests_total", (("result", "miss"),))] == 1
    hits = [line for line in lines if line["cache"] == "hit"]
    assert len(hits) == 2 and all(line["cost_usd"] == 0 for line in hits)
    assert lines[0]["prompt_tokens"] == plain["prompt_tokens"] and lines[0]["cost_usd"] == (
        plain["prompt_tokens"] + 2 * plain["completion_tokens"])
    for kind in ("prompt", "completion"):
        assert got[("pointsman_tokens_total", (("kind", kind), ("model", "remote-a")))] == sum(
            line[f"{kind}_tokens"] or 0 for line in lines if line["model"] == "remote-a")
    assert got[("pointsman_cost_usd_total", (("model", "remote-a"),))] == sum(
        line["cost_usd"] or 0 for line in lines if line["model"] == "remote-a")
    flaky = next(line for line in lines if line["model"] == "flaky")
    assert (flaky["route"], flaky["http_status"]) == ("manual", 503)
    assert [line["status"] for line in lines].count("cancelled") == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "flaky" not in r.getMessage()]
    roots = [s for s in spans if s.parent is None]
    # the embeddings request has its span too (it had none), its attempt's span under it
    (embedding,) = [s for s in roots if s.name == "embeddings emb"]
    assert embedding.attributes["gen_ai.operation.name"] == "embeddings" and embedding.status.is_ok
    assert embedding.attributes["gen_ai.usage.input_tokens"] > 0
    assert [s.name for s in spans if s.context.trace_id == embedding.context.trace_id and s.parent is not None] == [
        "upstream emb"]
    failed = {s.attributes.get("error.type") for s in roots if not s.status.is_ok}
    assert failed == {"mock_503", "upstream_unavailable", "rate_limit_exceeded", "budget_exceeded",
                      "CancelledError"}
    flaky_trace = next(s.context.trace_id for s in roots if s.name == "chat flaky")
    attempts = [s for s in spans if s.name == "upstream flaky" and s.context.trace_id == flaky_trace]
    assert len(attempts) == 2 and all(not s.status.is_ok for s in attempts)
