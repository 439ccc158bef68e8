"""/v1/chat/completions/ws against the mock upstream, in process: requests sent back to back on one connection
answered in order with the SSE route's chunks, refusals and bad messages that keep the socket usable, and a client
that closes right after `{"done": true}` (its request still settled in full: cache, budget, metrics)."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from config.loader import parse_config
from gateway.app import create_app
from gateway.websocket import WebSocketProtocol
from tests.gateway.live import serve, wait_for
from tests.spec.openai import validate

KEY = "sk-ws-hunt"
AUTH = {"authorization": f"Bearer {KEY}"}


def _config(url: str, tmp_path, extra: str = ""):
    return parse_config(f"""
models:
  - id: remote-a
    backend: openai
    base_url: {url}
    upstream_model: mock-model
  - id: limited
    backend: openai
    base_url: {url}
    upstream_model: mock-model
  - id: capped
    backend: openai
    base_url: {url}
    upstream_model: mock-model
routing: {{health_check_s: 0}}
auth: {{api_keys: ["{KEY}"]}}
metrics: {{enabled: true}}
{extra}
policies:
  cache: {{mode: deterministic}}
  rate_limits: [{{scope: model, match: limited, rpm: 1}}]
  budgets:
    - {{scope: global, period: day, max_tokens: 100000000}}
    - {{scope: model, match: capped, period: day, max_tokens: 1}}
""")


def _socket(url: str, **headers):
    return connect(url.replace("http://", "ws://") + "/v1/chat/completions/ws",
                   additional_headers={**AUTH, **headers}, open_timeout=10)


def _answer(ws) -> list[dict]:
    """One answer's messages, the last one `done` or an error."""
    received = []
    while True:
        received.append(message := json.loads(ws.recv(timeout=30)))
        if "done" in message or "error" in message:
            return received


def _chat(content: str, model: str = "remote-a", **fields) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], **fields}


def _text(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


def _counted(url: str) -> dict[tuple, float]:
    page = httpx.get(url + "/metrics", headers=AUTH, timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(page)
            for s in family.samples if s.name in ("pointsman_requests_total", "pointsman_cache_requests_total")}


def _requests(url: str) -> float:
    return sum(v for (name, _), v in _counted(url).items() if name == "pointsman_requests_total")


def test_a_client_closing_right_after_done_still_has_its_request_settled(upstream, tmp_path, redis_server):
    """The reader cancelled the connection's task whenever the client left, the settle after `done` included:
    a client that closed as soon as it read `done` cut its request's settle short (the cache's store and the
    budget's booking in Redis under way, the metrics and usage row never reached): uncounted, not cached."""
    storage = f'storage: {{redis_url: "{redis_server.url}", database_url: "sqlite+aiosqlite:///{tmp_path}/u.db"}}'
    app = create_app(_config(upstream.url, tmp_path, storage))
    prompts = [f"leave after done {i}" for i in range(10)]
    with serve(app) as url:
        for prompt in prompts:  # each a cacheable miss, on a socket closed the moment `done` arrives
            with _socket(url) as ws:
                ws.send(json.dumps(_chat(prompt, temperature=0)))
                assert _answer(ws)[-1]["done"] is True
        wait_for(lambda: _requests(url) == len(prompts), what="every request counted")
        with _socket(url) as ws:  # each answer was stored: now a hit
            for prompt in prompts:
                ws.send(json.dumps(_chat(prompt, temperature=0)))
                assert _text(_answer(ws)) == f"echo: {prompt}"
        wait_for(lambda: _requests(url) == 2 * len(prompts), what="the hits counted")
        counted = _counted(url)
    assert counted[("pointsman_cache_requests_total", (("result", "miss"),))] == len(prompts)
    assert counted[("pointsman_cache_requests_total", (("result", "hit"),))] == len(prompts)


@pytest.fixture(scope="module")
def url(upstream, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ws-hunt")  # the database keeps the readonly key
    app = create_app(_config(upstream.url, tmp, f"storage: {{database_url: 'sqlite+aiosqlite:///{tmp}/u.db'}}"))
    with serve(app, ws=WebSocketProtocol, ws_max_size=10_000) as base:  # as `pointsman serve` runs it
        yield base


def test_requests_sent_back_to_back_are_answered_in_order_with_the_sse_chunks(url):
    with _socket(url) as ws:
        for i in range(8):  # all sent before any answer is read
            ws.send(json.dumps(_chat(f"back to back {i}", stream_options={"include_usage": True})))
        answers = [_answer(ws) for _ in range(8)]
    assert [_text(a[:-1]) for a in answers] == [f"echo: back to back {i}" for i in range(8)]
    assert len({a[-1]["request_id"] for a in answers}) == 8 and all(a[-1]["done"] is True for a in answers)
    for answer in answers:
        for chunk in answer[:-1]:
            validate(chunk, "CreateChatCompletionStreamResponse")
    sse = httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=30, json=_chat(
        "back to back 0", stream=True, stream_options={"include_usage": True}))
    events = [json.loads(line[6:]) for line in sse.text.splitlines() if line.startswith("data: {")]

    def shape(chunk: dict) -> dict:
        return {k: v for k, v in chunk.items() if k not in ("id", "created")}

    assert [shape(c) for c in answers[0][:-1]] == [shape(c) for c in events]


@pytest.mark.parametrize(("message", "code", "param"), [
    ("not json", "invalid_json", None),
    ("", "invalid_json", None),
    ("[]", "invalid_request", None),
    ('"text"', "invalid_request", None),
    ("null", "invalid_request", None),
    ('{"model": "remote-a"}', None, "messages"),
    ('{"model": "remote-a", "messages": "hi"}', None, "messages"),
    ('{"model": "remote-a", "messages": [{"role": "user", "content": "hi"}], "n": "two"}', None, "n"),
    (b"\xff\xfe", "invalid_json", None),  # a binary frame that is not JSON
])
def test_a_bad_message_is_one_openai_error_and_the_socket_goes_on(url, message, code, param):
    with _socket(url) as ws:
        ws.send(message)
        (error,) = _answer(ws)
        assert error["error"]["type"] == "invalid_request_error"
        assert (error["error"]["code"], error["error"]["param"]) == (code, param)
        ws.send(json.dumps(_chat("still here")))
        assert _text(_answer(ws)) == "echo: still here"


def test_limits_budgets_and_roles_apply_as_over_http(url):
    with _socket(url) as ws:
        ws.send(json.dumps(_chat("one", "limited")))
        assert _answer(ws)[-1]["done"] is True
        ws.send(json.dumps(_chat("two", "limited")))
        assert _answer(ws)[-1]["error"]["code"] == "rate_limit_exceeded"
        ws.send(json.dumps(_chat("three", "capped")))
        assert _answer(ws)[-1]["error"]["code"] == "budget_exceeded"
        ws.send(json.dumps(_chat("four")))
        assert _answer(ws)[-1]["done"] is True
    status = httpx.post(url + "/admin/keys", headers=AUTH, json={"role": "readonly"}, timeout=10)
    assert status.status_code in (200, 201), status.text
    with pytest.raises(InvalidStatus) as refused:
        _socket(url, authorization=f"Bearer {status.json()['key']}")
    assert refused.value.response.status_code == 403
    assert json.loads(refused.value.response.body)["error"]["code"] == "permission_denied"


def test_a_message_over_the_size_limit_closes_the_socket_with_1009(url):
    with _socket(url) as ws:
        ws.send(json.dumps(_chat("x" * 20_000)))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    with _socket(url) as ws:
        ws.send(json.dumps(_chat("after")))
        assert _text(_answer(ws)) == "echo: after"
