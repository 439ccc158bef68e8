"""/v1/chat/completions/ws against a live gateway and the mock upstream: several requests on one connection,
errors that keep it open, auth on the upgrade and again before each request (a key revoked meanwhile ends the
socket), and a client that leaves mid-stream (settled as cancelled)."""

from __future__ import annotations

import json
import signal
import sqlite3

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.conftest import http, start_gateway

KEY = "sk-ws-test"


def _config(url: str, db) -> str:
    return f"""
models:
  - id: remote-a
    backend: openai
    base_url: {url}
    upstream_model: mock-model
routing: {{health_check_s: 0}}
auth: {{api_keys: ["{KEY}"]}}
storage: {{database_url: 'sqlite+aiosqlite:///{db}'}}
"""


def _answer(ws) -> tuple[list[dict], dict]:
    """The chunks of one answer and the message that ended it (`done`, or an error)."""
    chunks = []
    while True:
        message = json.loads(ws.recv(timeout=30))
        if "done" in message or "error" in message:
            return chunks, message
        chunks.append(message)


def _text(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def _rows(db) -> dict[str, dict]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return {r["request_id"]: dict(r) for r in conn.execute("SELECT * FROM usage_rows")}


@pytest.fixture(scope="module")
def ws_gateway(upstream, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ws")
    db = tmp / "usage.db"
    server = start_gateway(tmp, _config(upstream.url, db))
    server.extra["db"] = db
    yield server
    server.stop()


def _connect(gateway, **headers):
    return connect(gateway.url.replace("http://", "ws://") + "/v1/chat/completions/ws",
                   additional_headers={"authorization": f"Bearer {KEY}", **headers}, open_timeout=10)


def test_requests_one_after_another_and_errors_keep_the_connection(ws_gateway):
    with _connect(ws_gateway, **{"x-request-id": "ws-first"}) as ws:
        ws.send(json.dumps({"model": "remote-a", "messages": [{"role": "user", "content": "one two three"}]}))
        chunks, done = _answer(ws)
        assert done["done"] is True and done["request_id"] == "ws-first"
        assert _text(chunks) == "echo: one two three"
        assert all(c["object"] == "chat.completion.chunk" and c["model"] == "remote-a" for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

        ws.send("not json")  # a bad request: an OpenAI error message, and the connection stays usable
        assert json.loads(ws.recv(timeout=30))["error"]["code"] == "invalid_json"
        ws.send(json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}))
        assert json.loads(ws.recv(timeout=30))["error"]["code"] == "model_not_found"
        ws.send(json.dumps({"model": "remote-a", "messages": [{"role": "user", "content": "status:400"}]}))
        assert json.loads(ws.recv(timeout=30))["error"]["code"] == "mock_400"  # the upstream's error, relayed

        ws.send(json.dumps({"model": "remote-a", "stream_options": {"include_usage": True},
                            "messages": [{"role": "user", "content": "four five"}]}))
        chunks, done = _answer(ws)
        assert done["done"] is True and done["request_id"] != "ws-first"
        assert _text(chunks) == "echo: four five"
        assert chunks[-1]["usage"]["completion_tokens"] == 3  # include_usage honoured: the usage chunk comes last


def test_auth_is_refused_without_a_key(ws_gateway):
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_gateway.url.replace("http://", "ws://") + "/v1/chat/completions/ws", open_timeout=10)
    assert refused.value.response.status_code == 401
    assert json.loads(refused.value.response.body)["error"]["code"] == "invalid_api_key"
    with pytest.raises(InvalidStatus):
        _connect(ws_gateway, authorization="Bearer wrong")


def test_a_refused_upgrade_gets_its_error_and_logs_nothing(ws_gateway):
    """uvicorn 0.54's WebSocket protocol logged an ERROR ("ASGI callable returned without completing handshake")
    and an INFO line, with the client's path, per refused upgrade (gateway/websocket.py's WebSocketProtocol)."""
    logged = len(ws_gateway.output())
    url = ws_gateway.url.replace("http://", "ws://") + "/v1/chat/completions/ws%0aINJECTED?q=%0a"
    for headers in ({}, {"authorization": "Bearer wrong"}):
        with pytest.raises(InvalidStatus) as refused:
            connect(url.replace("ws%0aINJECTED", "ws"), additional_headers=headers, open_timeout=10)
        assert refused.value.response.status_code == 401
        assert json.loads(refused.value.response.body)["error"]["code"] == "invalid_api_key"
    with pytest.raises(InvalidStatus):
        connect(url, open_timeout=10)  # no such route
    with _connect(ws_gateway) as ws:  # accepted: still no line of its own; answered after the refusals' lines
        ws.send(json.dumps({"model": "remote-a", "messages": [{"role": "user", "content": "hi"}]}))
        assert _answer(ws)[1]["done"] is True
    assert ws_gateway.output()[logged:] == ""


def test_a_text_message_that_is_not_utf8_closes_the_socket_and_logs_nothing(ws_gateway):
    """uvicorn logged an ERROR with a traceback for each such message: a client could fill the log."""
    logged = len(ws_gateway.output())
    with _connect(ws_gateway) as ws:
        ws.send(b"\xff\xfe not utf-8", text=True)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007
    with _connect(ws_gateway) as ws:  # the server goes on
        ws.send(json.dumps({"model": "remote-a", "messages": [{"role": "user", "content": "hi"}]}))
        assert _answer(ws)[1]["done"] is True
    assert ws_gateway.output()[logged:] == ""


def test_a_key_revoked_while_its_socket_is_open_is_refused_at_its_next_request(ws_gateway):
    admin = {"authorization": f"Bearer {KEY}"}  # the static keys are admins
    status, _, raw = http("POST", ws_gateway.url + "/admin/keys", {"role": "user"}, headers=admin)
    assert status in (200, 201), raw
    key = json.loads(raw)
    with _connect(ws_gateway, authorization=f"Bearer {key['key']}") as ws:
        ws.send(json.dumps({"model": "remote-a", "messages": [{"role": "user", "content": "before"}]}))
        assert _answer(ws)[1]["done"] is True
        assert http("DELETE", f"{ws_gateway.url}/admin/keys/{key['id']}", headers=admin)[0] == 200
        ws.send(json.dumps({"model": "remote-a", "messages": [{"role": "user", "content": "after"}]}))
        error = json.loads(ws.recv(timeout=30))["error"]
        assert error["code"] == "invalid_api_key" and "revoked" in error["message"]
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


def test_client_leaving_mid_stream_cancels_its_request(ws_gateway):
    words = " ".join(f"w{i}" for i in range(200))
    with _connect(ws_gateway, **{"x-request-id": "ws-left"}) as ws:
        ws.send(json.dumps({"model": "remote-a", "messages": [{"role": "user", "content": f"gap:0.05 {words}"}]}))
        received = ""
        while "w2" not in received:
            received += _text([json.loads(ws.recv(timeout=30))])
    # the gateway still serves, and a new connection works
    assert http("GET", ws_gateway.url + "/health")[0] == 200
    with _connect(ws_gateway, **{"x-request-id": "ws-after"}) as ws:
        ws.send(json.dumps({"model": "remote-a", "messages": [{"role": "user", "content": "still here"}]}))
        assert _text(_answer(ws)[0]) == "echo: still here"
    # the usage row says cancelled, with fewer tokens than the whole answer (rows are flushed on shutdown)
    assert ws_gateway.stop(signal.SIGTERM) == 0
    rows = _rows(ws_gateway.extra["db"])
    left = rows["ws-left"]
    assert left["status"] == "cancelled" and left["completion_tokens"] < 200
    assert "Traceback" not in ws_gateway.output()
    assert rows["ws-after"]["status"] == "ok" and rows["ws-after"]["completion_tokens"] == 3
