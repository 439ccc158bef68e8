"""routing.request_timeout_s: one deadline over a request's attempts. Each attempt gets only what is left, none
starts after it (504 in OpenAI's shape), a stream already sending runs on, and a deployment the deadline kept
from being tried hands back the half-open breaker's probe slot it was given."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from config.loader import parse_config
from gateway.app import create_app
from policies.context import RequestContext
from protocol.errors import UpstreamTimeout
from protocol.openai import ChatCompletionRequest, decode_request
from tests.conftest import http, start_upstream
from tests.gateway.live import Capture, serve, wait_for

DEADLINE_S = 1.6


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deadline")
    upstreams = [start_upstream(tmp, f"dep-{n}") for n in "abc"]
    trio = ", ".join(f"{{base_url: '{u.url}'}}" for u in upstreams)
    # three deployments at timeout_s 1: without the deadline, three slow ones answer 504 after 3 s
    config = parse_config(f"""
models:
  - {{id: trio, backend: openai, upstream_model: mock-model, timeout_s: 1, deployments: [{trio}]}}
  - {{id: patient, backend: openai, upstream_model: mock-model, timeout_s: 30, base_url: '{upstreams[0].url}'}}
  - {{id: probe, backend: openai, upstream_model: mock-model, base_url: '{upstreams[1].url}'}}
routing: {{health_check_s: 0, request_timeout_s: {DEADLINE_S}}}
storage: {{database_url: ''}}
""")
    capture = Capture()
    app = create_app(config, policies=[capture])
    try:
        with serve(app) as url:
            yield url, capture, app
    finally:
        for upstream in upstreams:
            upstream.stop()


def _chat(url: str, rid: str, model: str, content: str):
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    status, _, raw = http("POST", url + "/v1/chat/completions", body, headers={"x-request-id": rid}, timeout=30)
    return status, json.loads(raw)


def _attempts(live, rid: str) -> list[tuple[str, str | None]]:
    """The request's attempts: which deployment (a, b, c) and its error."""
    url, capture, app = live
    ctx = wait_for(lambda: capture.settled.get(rid), what="settle")
    keys = [state.key for state in app.state.gateway.pools[ctx.decision.attempts[0].model.id].states]
    return [("abc"[keys.index(a.deployment)], a.error) for a in ctx.attempts]


def test_no_attempt_starts_after_the_deadline_and_the_last_is_cut_to_what_is_left(live):
    url, _, app = live
    status, body = _chat(url, "d-1", "trio", "sleep:5")
    assert status == 504
    assert body["error"]["type"] == "api_error" and body["error"]["code"] == "upstream_timeout"
    assert "deadline" in body["error"]["message"] and "request_timeout_s: 1.6 s" in body["error"]["message"]
    # a: its own 1 s timeout; b: cut at the deadline, 0.6 s in; c: never started
    attempts = _attempts(live, "d-1")
    assert attempts == [(attempts[0][0], "upstream_timeout"), (attempts[1][0], "request_timeout")]
    breakers = app.state.gateway.pools["trio"].breakers
    failures = {"abc"[i]: b.snapshot()["consecutive_failures"] for i, b in enumerate(breakers)}
    assert failures[attempts[0][0]] == 1 and failures[attempts[1][0]] == 0  # a cut attempt is no verdict


def test_an_attempt_with_the_whole_deadline_is_cut_at_it_and_counts_as_a_timeout(live):
    url, _, app = live
    status, body = _chat(url, "d-2", "patient", "sleep:4")  # within its own timeout_s: 30, past the deadline
    assert status == 504 and body["error"]["code"] == "upstream_timeout"
    assert _attempts(live, "d-2") == [("a", "request_timeout")]
    assert app.state.gateway.pools["patient"].breakers[0].snapshot()["consecutive_failures"] == 1


def test_a_stream_already_sending_is_not_cut_by_the_deadline(live):
    url, _, _ = live
    body = {"model": "trio", "stream": True,
            "messages": [{"role": "user", "content": "gap:0.4 one two three four five six"}]}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events)
    text = "".join((json.loads(e[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
                   for e in events[:-1])
    assert "six" in text


def test_a_deployment_the_deadline_kept_from_being_tried_hands_back_its_probe_slot(live):
    _, _, app = live
    breaker = app.state.gateway.pools["probe"].breakers[0]
    breaker.cooldown_s = 0.0  # half-open as soon as it opens
    for _ in range(breaker.failures):
        breaker.record_failure()
    assert breaker.state == "half_open"
    request = decode_request({"model": "probe", "messages": [{"role": "user", "content": "hi"}]},
                             ChatCompletionRequest)
    ctx = RequestContext(request, request_id="d-4", deadline=time.monotonic() - 1.0)  # passed before routing
    with pytest.raises(UpstreamTimeout):
        asyncio.run(app.state.pipeline.complete(ctx))
    assert ctx.attempts == []
    assert breaker.probe() is None and breaker.allow()  # the next request probes, not one 60 s later
