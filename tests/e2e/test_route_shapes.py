"""Errors and usage as /v1/messages and the WebSocket route give them, with today's routing rules: upstream 429 holds,
routing.request_timeout_s, a model that sends no stream usage, null fields; and the HTTP layer's own refusals
under /v1/messages, in Anthropic's shape."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import anthropic
import httpx
import pytest
from websockets.sync.client import connect

from tests.conftest import start_gateway, start_upstream
from tests.e2e.test_websocket import _answer


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shapes")
    first, second, solo = start_upstream(tmp, name="a"), start_upstream(tmp, name="b"), start_upstream(tmp)
    config = f"""
models:
  - {{id: pair, backend: openai, upstream_model: mock-model,
      deployments: [{{base_url: "{first.url}"}}, {{base_url: "{second.url}"}}]}}
  - {{id: solo, backend: openai, base_url: "{solo.url}", upstream_model: mock-model}}
  - {{id: nousage, backend: openai, base_url: "{solo.url}", upstream_model: mock-model, stream_usage: false}}
routing: {{health_check_s: 0, request_timeout_s: 1, circuit_breaker: {{failures: 1000, cooldown_s: 1}}}}
"""
    server = start_gateway(tmp, config)
    yield server
    server.stop()
    for u in (first, second, solo):
        u.stop()


def _client(gw):
    return anthropic.Anthropic(base_url=gw.url, api_key="x", max_retries=0)


def _post(gw, body):
    return httpx.post(gw.url + "/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"}, timeout=30)


def test_pair_held_429_is_rate_limit_error_with_retry_after(gw):
    with pytest.raises(anthropic.RateLimitError):
        _client(gw).messages.create(model="pair", max_tokens=16, messages=[{"role": "user", "content": "status:429"}])
    r = _post(gw, {"model": "pair", "max_tokens": 16, "messages": [{"role": "user", "content": "hello"}]})
    assert r.status_code == 429, r.text
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert r.headers.get("retry-after")


def test_pair_held_429_stream(gw):
    with pytest.raises(anthropic.RateLimitError):
        _client(gw).messages.create(model="pair", max_tokens=16, messages=[{"role": "user", "content": "status:429"}])
    r = _post(gw, {"model": "pair", "max_tokens": 16, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 429, r.text
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert r.headers.get("retry-after")


def test_solo_429_relayed_with_retry_after(gw):
    r = _post(gw, {"model": "solo", "max_tokens": 16, "messages": [{"role": "user", "content": "status:429"}]})
    assert r.status_code == 429, r.text
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert r.headers.get("retry-after") == "7"


@pytest.mark.parametrize("status,kind", [(503, "overloaded_error"), (500, "api_error"), (502, "api_error")])
def test_solo_5xx_type(gw, status, kind):
    r = _post(gw, {"model": "solo", "max_tokens": 16, "messages": [{"role": "user", "content": f"status:{status}"}]})
    assert r.json()["type"] == "error", r.text
    assert r.json()["error"]["type"] == kind, (r.status_code, r.text)


@pytest.mark.parametrize("stream", [False, True])
def test_request_timeout_is_timeout_error(gw, stream):
    r = _post(gw, {"model": "solo", "max_tokens": 16, "stream": stream,
                   "messages": [{"role": "user", "content": "sleep:3 hi"}]})
    assert r.status_code == 504, r.text
    assert r.json()["error"]["type"] == "timeout_error", r.text


def test_stream_without_upstream_usage_reports_input_tokens(gw):
    """A model with stream_usage: false: the upstream sends no usage; message_delta should still carry an
    input_tokens count (the estimate the gateway charges), not leave the SDK's total at 0."""
    prompt = " ".join(["word"] * 200)
    with _client(gw).messages.stream(model="nousage", max_tokens=16,
                                     messages=[{"role": "user", "content": prompt}]) as stream:
        final = stream.get_final_message()
    assert final.usage.input_tokens > 0, final.usage


def test_stream_with_upstream_usage_reports_input_tokens(gw):
    prompt = " ".join(["word"] * 200)
    with _client(gw).messages.stream(model="solo", max_tokens=16,
                                     messages=[{"role": "user", "content": prompt}]) as stream:
        final = stream.get_final_message()
    assert final.usage.input_tokens > 0, final.usage


@pytest.mark.parametrize("field", ["stream", "temperature", "stop_sequences", "metadata", "system", "tools",
                                   "tool_choice", "top_k", "top_p"])
def test_null_field_means_default(gw, field):
    r = _post(gw, {"model": "solo", "max_tokens": 16, field: None, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text


def test_sdk_stream_none_means_plain(gw):
    """The anthropic SDK sends `"stream": null` for stream=None (as the openai SDK sends n=None); the gateway
    takes null as the default on chat completions since 91854c2, but /v1/messages answers 400."""
    message = _client(gw).messages.create(model="solo", max_tokens=16, stream=None,
                                          messages=[{"role": "user", "content": "hi"}])
    assert message.type == "message"


def _raw(gw, head: bytes) -> tuple[int, dict]:
    parts = urlsplit(gw.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(head)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_unsupported_transfer_coding_on_messages_is_anthropic_shaped(gw):
    status, body = _raw(gw, b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n")
    assert status == 501
    assert body.get("type") == "error" and body["error"]["type"] == "api_error", body


def test_missing_host_on_messages_is_anthropic_shaped(gw):
    status, body = _raw(gw, b"POST /v1/messages HTTP/1.1\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
    assert status == 400
    assert body.get("type") == "error" and body["error"]["type"] == "invalid_request_error", body


def _ws(gw):
    return connect(gw.url.replace("http", "ws") + "/v1/chat/completions/ws")


def _ws_request(model, content, **extra):
    return json.dumps({"model": model, "messages": [{"role": "user", "content": content}], **extra})


def test_held_pair_is_rate_limit_exceeded_and_socket_goes_on(gw):
    with _ws(gw) as ws:
        ws.send(_ws_request("pair", "status:429"))
        _, end = _answer(ws)
        assert "error" in end, end
        ws.send(_ws_request("pair", "hello"))
        _, end = _answer(ws)
        http = httpx.post(gw.url + "/v1/chat/completions", json={"model": "pair", "stream": True,
                          "messages": [{"role": "user", "content": "hello"}]})
        assert http.status_code == 429, http.text
        assert end == http.json(), (end, http.text)
        assert end["error"]["code"] == "rate_limit_exceeded"
        ws.send(_ws_request("solo", "after"))
        chunks, end = _answer(ws)
        assert end.get("done") is True, end


def test_timeout_is_upstream_timeout_and_socket_goes_on(gw):
    with _ws(gw) as ws:
        ws.send(_ws_request("solo", "sleep:3 hi"))
        _, end = _answer(ws)
        assert end["error"]["code"] == "upstream_timeout", end
        ws.send(_ws_request("solo", "after"))
        _, end = _answer(ws)
        assert end.get("done") is True, end


def test_stream_false_with_stream_options(gw):
    with _ws(gw) as ws:
        ws.send(_ws_request("solo", "hi there", stream=False, stream_options={"include_usage": True}))
        chunks, end = _answer(ws)
        assert end.get("done") is True, end
        assert chunks[-1]["usage"]["prompt_tokens"] > 0


def test_stream_null_and_n_null(gw):
    with _ws(gw) as ws:
        ws.send(_ws_request("solo", "hi there", stream=None, n=None, stream_options=None))
        chunks, end = _answer(ws)
        assert end.get("done") is True, end


def test_stream_options_without_usage_request(gw):
    with _ws(gw) as ws:
        ws.send(_ws_request("solo", "hi there", stream_options={"include_usage": False}))
        chunks, end = _answer(ws)
        assert end.get("done") is True, end
        assert all(c.get("usage") is None for c in chunks), chunks


def test_nousage_model_include_usage(gw):
    with _ws(gw) as ws:
        ws.send(_ws_request("nousage", "hi there", stream_options={"include_usage": True}))
        chunks, end = _answer(ws)
        assert end.get("done") is True, end
