"""A request on /v1/chat/completions/ws that fails inside the gateway before its stream starts (a bug: anything but
a GatewayError) is answered with an internal_error message like the HTTP routes' 500; the socket and the requests
sent after it go on, where the whole connection used to close with 4500 and nothing was logged."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest
from websockets.sync.client import connect

from config.loader import parse_config
from gateway.app import create_app
from gateway.auth import Authenticator
from policies.context import Outcome, RequestContext
from tests.gateway.live import serve


class Exploding:
    """A policy that fails (not a GatewayError) on a request whose last message says 'explode'."""

    name: ClassVar[str] = "exploding"
    stage: ClassVar[int] = 10

    async def admit(self, ctx: RequestContext) -> None:
        if ctx.request.raw["messages"][-1]["content"] == "explode":
            raise RuntimeError("a bug")

    async def approve(self, ctx: RequestContext, decision) -> None:
        return None

    async def settle(self, ctx: RequestContext, outcome: Outcome) -> None:
        return None


def _config(upstream, extra: str = ""):
    return parse_config(f"""
models:
  - id: remote-a
    backend: openai
    base_url: {upstream.url}
    upstream_model: mock-model
routing: {{health_check_s: 0}}
storage: {{database_url: ''}}
{extra}""")


@pytest.fixture(scope="module")
def url(upstream):
    with serve(create_app(_config(upstream), policies=[Exploding()])) as base:
        yield base.replace("http://", "ws://") + "/v1/chat/completions/ws"


def _ask(socket, content: str) -> list[dict]:
    socket.send(json.dumps({"model": "remote-a", "messages": [{"role": "user", "content": content}]}))
    received = []
    while True:
        message = json.loads(socket.recv(timeout=10))
        received.append(message)
        if message.get("done") or "error" in message:
            return received


def test_a_failure_before_the_stream_is_one_error_message_and_the_socket_goes_on(url, caplog):
    with connect(url) as socket:
        assert _ask(socket, "hello")[-1]["done"] is True
        failed = _ask(socket, "explode")
        assert failed == [{"error": {"message": "The gateway failed to process the request.", "type": "api_error",
                                     "param": None, "code": "internal_error"}}]
        answered = _ask(socket, "hello again")
        assert answered[-1]["done"] is True and len(answered) > 1
    assert any("websocket request" in r.getMessage() and r.exc_info for r in caplog.records)


def test_a_failed_key_check_on_an_open_socket_answers_that_request_and_the_socket_goes_on(upstream, monkeypatch,
                                                                                          caplog):
    """The key is checked again before each request after the first; when that check itself fails (the key store
    unreadable), the request gets internal_error, it is logged, and the next request is checked and served."""
    config = _config(upstream, 'auth: {api_keys: ["sk-ws"]}\n')
    checks = {"n": 0}
    looked_up = Authenticator.principal

    async def flaky(self, header):
        checks["n"] += 1
        if checks["n"] == 2:  # the first re-check, at the socket's second request
            raise RuntimeError("the key store is down")
        return await looked_up(self, header)

    monkeypatch.setattr(Authenticator, "principal", flaky)
    with serve(create_app(config)) as base, connect(base.replace("http://", "ws://") + "/v1/chat/completions/ws",
                                                    additional_headers={"authorization": "Bearer sk-ws"}) as socket:
        assert _ask(socket, "one")[-1]["done"] is True
        assert _ask(socket, "two") == [{"error": {"message": "The gateway could not check the API key.",
                                                  "type": "api_error", "param": None, "code": "internal_error"}}]
        assert _ask(socket, "three")[-1]["done"] is True
    assert checks["n"] == 3
    assert any("checking the API key failed" in r.getMessage() and r.exc_info for r in caplog.records)
