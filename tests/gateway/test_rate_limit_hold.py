"""An upstream's 429 with a Retry-After keeps that deployment of a model with several out of routing until it has
passed (at most routing.rate_limit_hold_max_s): the others serve meanwhile; with none left the gateway answers 429."""

from __future__ import annotations

import json

import pytest

from config.loader import parse_config
from gateway.app import create_app
from tests.conftest import http, start_upstream
from tests.gateway.live import Capture, serve, wait_for


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("holds")
    a, b = start_upstream(tmp, "dep-a"), start_upstream(tmp, "dep-b")  # the mock's errors carry Retry-After: 7
    deployments = f"[{{base_url: '{a.url}'}}, {{base_url: '{b.url}'}}]"
    config = parse_config(f"""
models:
  - {{id: pair, backend: openai, upstream_model: mock-model, deployments: {deployments}, auto: false}}
  - {{id: both, backend: openai, upstream_model: mock-model, deployments: {deployments}}}
  - {{id: solo, backend: openai, upstream_model: mock-model, base_url: '{a.url}', auto: false}}
routing: {{health_check_s: 0, rate_limit_hold_max_s: 5}}
storage: {{database_url: ''}}
""")
    capture = Capture()
    app = create_app(config, policies=[capture])
    try:
        with serve(app) as url:
            yield url, capture, app.state.gateway
    finally:
        a.stop()
        b.stop()


def _chat(url: str, rid: str, model: str, content: str):
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    status, headers, raw = http("POST", url + "/v1/chat/completions", body, headers={"x-request-id": rid})
    return status, headers, json.loads(raw)


def _deployments(live, rid: str, model: str = "pair") -> list[tuple[str, str | None]]:
    """The request's attempts: which deployment (a or b) and its error."""
    url, capture, gateway = live
    ctx = wait_for(lambda: capture.settled.get(rid), what="settle")
    keys = [state.key for state in gateway.pools[model].states]
    return [("ab"[keys.index(a.deployment)], a.error) for a in ctx.attempts]


def test_a_429_holds_its_deployment_out_while_the_others_serve(live):
    url, _, gateway = live
    status, _, _ = _chat(url, "hold-1", "pair", "status:429@dep-a hello")
    assert status == 200
    assert _deployments(live, "hold-1") == [("a", "mock_429"), ("b", None)]
    held = gateway.pools["pair"].breakers[0]
    assert 0 < held.held_s() <= 5  # Retry-After: 7, capped by rate_limit_hold_max_s
    for n in range(3):  # least_outstanding would pick a first: it is skipped until the Retry-After passes
        status, _, _ = _chat(url, f"hold-2-{n}", "pair", "hello again")
        assert status == 200 and _deployments(live, f"hold-2-{n}") == [("b", None)]
    status, _, raw = http("POST", url + "/v1/route", {"model": "pair", "messages": [{"role": "user", "content": "hi"}]})
    shown = [d["breaker"]["rate_limited_for_s"] for d in json.loads(raw)["deployments"]["pair"]]
    assert status == 200 and 0 < shown[0] <= 5 and shown[1] is None


def test_with_every_deployment_held_the_gateway_answers_429_with_retry_after(live):
    url, _, gateway = live
    status, headers, body = _chat(url, "both-1", "both", "status:429")
    assert status == 429 and body["error"]["code"] == "mock_429"  # the upstream's own, relayed
    status, headers, body = _chat(url, "both-2", "both", "hello")  # nothing tried: both are held
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert "rate limited by its upstream" in body["error"]["message"]
    assert 1 <= int(headers["retry-after"]) <= 5
    assert _deployments(live, "both-2", "both") == []
    status, _, raw = http("POST", url + "/v1/route", {"model": "both", "messages": [{"role": "user", "content": "hi"}]})
    assert "rate limited by the upstream" in json.loads(raw)["skipped"]["both"]


def test_a_models_only_deployment_is_not_held(live):
    """As LiteLLM does: with nowhere else to send it, the next request goes upstream (the 429 and its Retry-After
    were relayed to the client that got them)."""
    url, _, gateway = live
    status, headers, _ = _chat(url, "solo-1", "solo", "status:429")
    assert status == 429 and headers["retry-after"] == "7"
    assert gateway.pools["solo"].breakers[0].held_s() is None
    assert _chat(url, "solo-2", "solo", "hello")[0] == 200


def test_automatic_routing_with_every_candidate_held_answers_429_too(live):
    """`auto` finds the held model unavailable, so its decision has no attempts: it was a 503 blaming breakers,
    without retry-after."""
    url, _, _ = live
    assert _chat(url, "auto-1", "both", "status:429")[0] == 429  # both deployments held (again)
    status, headers, body = _chat(url, "auto-2", "auto", "hello")
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded" and "both" in body["error"]["message"]
    assert 1 <= int(headers["retry-after"]) <= 5
    status, _, raw = http("POST", url + "/v1/route", {"model": "auto", "messages": [{"role": "user", "content": "hi"}]})
    [candidate] = [c for c in json.loads(raw)["candidates"] if c["model"] == "both"]
    assert not candidate["eligible"] and "rate limited by its upstream" in candidate["reason"]
