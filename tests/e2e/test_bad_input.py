"""Bad input against a live gateway: hypothesis-made bodies for the three wire formats never get a 5xx and every
error comes in its format's shape; a body over server.max_body_mb gets 413 on every POST route, sized or chunked,
and over the WebSocket; a client that sends its body a byte a second does not hold up anyone else."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosedError
from websockets.sync.client import connect

from tests.conftest import Process, start_gateway
from tests.e2e.raw_upstream import RawUpstream
from tests.gateway.wire_bodies import body_bytes, raw_bytes
from tests.spec.openai import validate

MAX_BODY_MB = 0.05  # 52,428 bytes
LIMIT = int(MAX_BODY_MB * 2**20)
MODEL = "m"
# each format's route (completions: the legacy half of the first)
ROUTES = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "responses": "/v1/responses",
          "messages": "/v1/messages"}
# the POST routes that read a body, each with its error shape: OpenAI's, or Anthropic's
BODY_ROUTES = {"/v1/chat/completions": "openai", "/v1/completions": "openai", "/v1/embeddings": "openai",
               "/v1/responses": "openai", "/v1/route": "openai", "/v1/models/recommend": "openai",
               "/models/recommend": "openai", "/v1/feedback": "openai", "/v1/messages": "anthropic",
               "/v1/messages/count_tokens": "anthropic"}


def bad_input_config(upstream_url: str, max_body_mb: float = MAX_BODY_MB) -> str:
    return f"""
server: {{max_body_mb: {max_body_mb}}}
models:
  - id: {MODEL}
    backend: openai
    base_url: {upstream_url}
routing: {{health_check_s: 0}}
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator[Process]:
    with RawUpstream() as upstream:  # answers every request with a well-formed chat answer
        server = start_gateway(tmp_path_factory.mktemp("bad-input"), bad_input_config(upstream.url))
        yield server
        server.stop()


def check_error(shape: str, response: httpx.Response) -> dict:
    """The error object of an error response in `shape`; fails unless the body is that shape."""
    body = response.json()
    if shape == "anthropic":
        assert body["type"] == "error" and isinstance(body["error"]["message"], str), body
        assert isinstance(body["error"]["type"], str), body
        return body["error"]
    validate(body, "ErrorResponse")
    return body["error"]


def check_answer(fmt: str, response: httpx.Response) -> None:
    """Any answer: below 500; an error in the format's shape; a stream that ends without an error event."""
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        check_error("anthropic" if fmt == "messages" else "openai", response)
        return
    assert response.status_code == 200
    if not response.headers["content-type"].startswith("text/event-stream"):
        response.json()
        return
    text = response.text
    if fmt == "messages":
        assert "event: error" not in text and text.rstrip().split("\n\n")[-1].startswith("event: message_stop")
    elif fmt == "responses":
        last = json.loads(text.rstrip().split("\n\n")[-1].split("data: ", 1)[1])
        assert last["type"] == "response.completed", last
    else:
        assert text.endswith("data: [DONE]\n\n") and '"error"' not in text, text[-500:]


def post(gateway: Process, path: str, content, timeout: float = 60) -> httpx.Response:
    return httpx.post(gateway.url + path, content=content, timeout=timeout,
                      headers={"content-type": "application/json"})


FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("fmt", list(ROUTES))
def test_fuzzed_bodies_never_get_a_5xx(gateway, fmt):
    strategy = body_bytes(fmt, MODEL)

    @FUZZ
    @given(data=st.one_of(strategy, strategy, raw_bytes(fmt, MODEL)))
    def run(data: bytes) -> None:
        check_answer(fmt, post(gateway, ROUTES[fmt], data))

    run()
    assert httpx.get(gateway.url + "/health").status_code == 200


def test_the_fuzzed_formats_are_served_when_valid(gateway):
    """The fuzzing starts near valid bodies: the valid ones are answered, plain and streamed, by every route."""
    from tests.gateway.wire_bodies import BASES

    for fmt, path in ROUTES.items():
        for base in BASES[fmt]:
            response = post(gateway, path, json.dumps({**base, "model": MODEL}).encode())
            assert response.status_code == 200, (path, response.text[:300])
            check_answer(fmt, response)


def _oversized() -> bytes:
    return b'{"model": "m", "messages": [{"role": "user", "content": "' + b"a" * LIMIT + b'"}]}'


@pytest.mark.parametrize("framing", ["sized", "chunked"])
@pytest.mark.parametrize("path", list(BODY_ROUTES))
def test_a_body_over_max_body_mb_is_413(gateway, path, framing):
    body = _oversized()
    content = body if framing == "sized" else iter([body[i:i + 8192] for i in range(0, len(body), 8192)])
    response = post(gateway, path, content)
    assert response.status_code == 413, (response.status_code, response.text[:300])
    error = check_error(BODY_ROUTES[path], response)
    if BODY_ROUTES[path] == "anthropic":
        assert error["type"] == "request_too_large"
    else:
        assert error["code"] == "request_too_large"
    assert httpx.get(gateway.url + "/health").status_code == 200


def test_a_body_just_under_max_body_mb_is_served(gateway):
    content = "a" * (LIMIT - 200)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}]}).encode()
    assert len(body) <= LIMIT
    assert post(gateway, "/v1/chat/completions", body).status_code == 200


def test_every_post_route_refuses_an_oversized_body_without_a_5xx(gateway):
    """Whatever the route (admin ones included): 413 if it reads the body, else its own answer, never a 5xx."""
    document = httpx.get(gateway.url + "/openapi/openapi.json").json()
    posts = [p for p, ops in document["paths"].items() if "post" in ops]
    assert set(BODY_ROUTES) <= set(posts)
    for path in posts:
        response = post(gateway, path.replace("{", "").replace("}", ""), _oversized())
        assert response.status_code < 500, (path, response.status_code, response.text[:300])


def test_an_oversized_websocket_message_closes_the_socket(gateway):
    url = gateway.url.replace("http://", "ws://") + "/v1/chat/completions/ws"
    with connect(url, max_size=None) as ws:
        ws.send(json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
        answer = [json.loads(ws.recv(timeout=30))]
        while "done" not in answer[-1]:
            answer.append(json.loads(ws.recv(timeout=30)))
        ws.send(_oversized().decode())
        with pytest.raises(ConnectionClosedError) as info:
            ws.recv(timeout=30)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009  # message too big
    assert httpx.get(gateway.url + "/health").status_code == 200


HOLD_S = 90  # how long the slow client holds its last byte back for the others
BODIES = {
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "slow"}]},
    "/v1/responses": {"model": MODEL, "input": "slow", "store": False},
    "/v1/messages": {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "slow"}]},
}


def slow_request(address: tuple[str, int], path: str, body: bytes, dribbling: threading.Event,
                 others_done: threading.Event) -> bytes:
    """POST `body` whose last bytes go a byte a second while the others run (`dribbling` is set once the first
    went), the very last only once `others_done` is set: it is in flight for as long as they take. Returns the raw
    response."""
    with socket.create_connection(address, timeout=HOLD_S + 30) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n" % (path.encode(), len(body)) + body[:-5])
        for byte in body[-5:-1]:
            sock.sendall(bytes([byte]))
            dribbling.set()
            others_done.wait(1.0)  # a byte a second, until the others are done
        others_done.wait(HOLD_S)  # were the server blocked, the others would time out long before this
        sock.sendall(body[-1:])
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


@pytest.mark.parametrize("path", list(BODIES))
def test_a_slow_client_does_not_block_others(gateway, path):
    body = json.dumps(BODIES[path]).encode()
    dribbling, others_done = threading.Event(), threading.Event()
    result: list[bytes] = []
    slow = threading.Thread(target=lambda: result.append(slow_request(("127.0.0.1", gateway.port), path, body,
                                                                      dribbling, others_done)))
    slow.start()
    try:
        assert dribbling.wait(30)
        # while the slow client dribbles: normal requests on every format are answered
        for other, other_body in BODIES.items():
            response = post(gateway, other, json.dumps(other_body).encode(), timeout=HOLD_S / 3)
            assert response.status_code == 200, response.text[:300]
    finally:
        others_done.set()
        slow.join(HOLD_S)
    assert result and result[0].startswith(b"HTTP/1.1 200 "), result[:1]
