"""The generation routes as ASGI handlers: their body is read as Litestar's Request reads it (413 announced or
received, 400 for a bad content-length, nothing answered to a client that left), other methods get a 405 in
OpenAI's error shape, and their operations stay in the OpenAPI document."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from litestar.exceptions import ClientException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge

from config.loader import parse_config
from gateway.app import HOT_ROUTES, create_app
from gateway.hot_routes import read_body
from tests.conftest import free_port
from tests.gateway.live import Capture, serve, wait_for


def _receiver(*messages: dict[str, Any]):
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        return queue.pop(0)

    return receive


def _read(messages: list[dict[str, Any]], limit: int | None, headers: list[tuple[bytes, bytes]] | None = None):
    return asyncio.run(read_body({"headers": headers or []}, _receiver(*messages), limit))


def test_a_body_in_pieces_is_joined():
    pieces = [{"type": "http.request", "body": b"ab", "more_body": True},
              {"type": "http.request", "body": b"", "more_body": True},
              {"type": "http.request", "body": b"cd"}]
    assert _read(pieces, 4) == b"abcd"
    assert _read([{"type": "http.request"}], 4) == b""


def test_a_body_over_the_limit_is_413_whether_announced_or_received():
    with pytest.raises(RequestEntityTooLarge):  # announced: refused before anything is read
        _read([], 4, [(b"content-length", b"5")])
    with pytest.raises(RequestEntityTooLarge):  # chunked: refused once it passes the limit
        _read([{"type": "http.request", "body": b"abc", "more_body": True},
               {"type": "http.request", "body": b"de", "more_body": True}], 4)
    assert _read([{"type": "http.request", "body": b"abcd"}], 4, [(b"content-length", b"4")]) == b"abcd"
    assert _read([{"type": "http.request", "body": b"abcde"}], None) == b"abcde"


def test_a_bad_content_length_is_a_client_error():
    with pytest.raises(ClientException) as caught:
        _read([], 4, [(b"content-length", b"12x")])
    assert caught.value.status_code == 400 and "12x" in caught.value.detail


def test_a_client_that_leaves_while_sending_gets_nothing():
    assert _read([{"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.disconnect"}], 8) is None


def _app(upstream, extra: str = ""):
    return create_app(parse_config(f"""
models:
  - {{id: remote-a, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model}}
server: {{max_body_mb: 0.001}}
routing: {{health_check_s: 0}}
storage: {{database_url: ''}}
{extra}"""))


def _routed(app):
    """`app` with every request going through Litestar's router, as before route_directly."""
    from litestar._asgi.utils import wrap_in_exception_handler

    app.asgi_handler = wrap_in_exception_handler(app.asgi_router)
    return app


@pytest.fixture(scope="module")
def app_url(upstream):
    app = _app(upstream)
    with serve(app) as url:
        yield app, url


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_other_methods_are_405_in_openai_shape(app_url, path, method):
    response = httpx.request(method, app_url[1] + path)
    assert response.status_code == 405
    assert response.headers["allow"] == "POST, OPTIONS" and response.headers["x-request-id"]
    assert response.json()["error"]["type"] == "invalid_request_error"
    options = httpx.request("OPTIONS", app_url[1] + path)
    assert options.status_code == 204 and options.headers["allow"] == "OPTIONS, POST" and not options.content


def test_a_chat_request_is_served_and_an_oversized_one_refused(app_url):
    url = app_url[1] + "/v1/chat/completions"
    small = httpx.post(url, json={"model": "remote-a", "messages": [{"role": "user", "content": "hi"}]})
    assert small.status_code == 200 and small.json()["object"] == "chat.completion"
    large = httpx.post(url, json={"model": "remote-a", "messages": [{"role": "user", "content": "x" * 2000}]})
    assert large.status_code == 413 and large.json()["error"]["type"] == "invalid_request_error"


class _Users(Capture):
    """Capture on embeddings too: the user each request's context carries."""

    endpoints = frozenset({"chat", "completion", "embeddings"})


def test_an_embeddings_request_takes_its_user_from_the_body_else_the_header(upstream):
    """As the route did with Litestar's Request: the body's `user`, and the x-pointsman-user header when that is
    missing or empty."""
    capture = _Users()
    app = create_app(parse_config(f"""
models:
  - {{id: emb, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model}}
routing: {{health_check_s: 0}}
storage: {{database_url: ''}}
"""), policies=[capture])
    with serve(app) as url:
        for rid, body_user, expected in (("e1", "body", "body"), ("e2", "", "header"), ("e3", None, "header")):
            body = {"model": "emb", "input": "hi", **({} if body_user is None else {"user": body_user})}
            answer = httpx.post(url + "/v1/embeddings", json=body,
                                headers={"x-request-id": rid, "x-pointsman-user": "header"})
            assert answer.status_code == 200, answer.text
            assert wait_for(lambda r=rid: capture.settled.get(r), what="settle").user == expected, rid


def test_the_openapi_document_keeps_each_operation(app_url):
    document = httpx.get(app_url[1] + "/openapi/openapi.json").json()
    for route in HOT_ROUTES:
        operation = document["paths"]["/v1" + route.path]["post"]
        assert operation["operationId"] == route.handler.name
        assert set(operation) >= {"summary", "requestBody", "responses"}
        assert {"200", "400", "429", "500"} <= set(operation["responses"])


@pytest.fixture(scope="module")
def routed_url(upstream):
    """The same app with every request routed by Litestar's router: what route_directly must answer alike."""
    app = _routed(_app(upstream))
    with serve(app) as url:
        yield url


def _seen(response: httpx.Response) -> tuple:
    body = response.json() if response.content else None
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in ("id", "created")}
    return (response.status_code, response.headers.get("content-type"), response.headers.get("allow"),
            body, "x-request-id" in response.headers)


@pytest.mark.parametrize("method,path,headers,payload", [
    ("POST", "/v1/chat/completions", {}, {"model": "remote-a", "temperature": 0,
                                          "messages": [{"role": "user", "content": "same"}]}),
    ("POST", "/v1/chat/completions/", {}, {"model": "remote-a", "messages": [{"role": "user", "content": "x"}]}),
    ("POST", "/v1/chat/completions", {"host": "bad host/"}, {"model": "remote-a", "messages": []}),
    ("POST", "/v1/chat/completions", {}, {"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
    ("POST", "/v1/completions", {"content-type": "application/json"}, "{not json"),
    ("POST", "/v1/embeddings", {}, {"model": "remote-a"}),
    ("GET", "/v1/completions", {}, None),
    ("OPTIONS", "/v1/embeddings", {}, None),
    ("POST", "/v1//chat/completions", {}, {"model": "remote-a", "messages": [{"role": "user", "content": "x"}]}),
])
def test_routed_directly_as_litestar_routes(app_url, routed_url, method, path, headers, payload):
    """Requests for the generation routes skip Litestar's router (route_directly): each is answered as the
    router answers it, whatever its path's spelling, Host or body."""
    def send(base: str) -> httpx.Response:
        content = payload if isinstance(payload, str) else None
        return httpx.request(method, base + path, headers=headers, content=content,
                             json=payload if not isinstance(payload, str) else None)

    assert _seen(send(app_url[1])) == _seen(send(routed_url))


@pytest.fixture(scope="module")
def guarded_urls(upstream):
    """An app that asks for a key, its generation routes routed directly and by Litestar's router."""
    urls = []
    with contextlib.ExitStack() as stack:
        for direct in (True, False):
            app = _app(upstream, "auth: {api_keys: [sk-hot]}")
            urls.append(stack.enter_context(serve(app if direct else _routed(app))))
        yield urls


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer sk-wrong"}, {"authorization": "Basic x"},
                                     {"authorization": "Bearer sk-hot"}])
def test_guards_answer_directly_as_through_litestar(guarded_urls, headers):
    """route_directly runs a route's guards as Litestar's router does: the same 401, or the same answer."""
    payload = {"model": "remote-a", "temperature": 0, "messages": [{"role": "user", "content": "guarded"}]}
    direct, routed = (httpx.post(url + "/v1/chat/completions", headers=headers, json=payload)
                      for url in guarded_urls)
    assert _seen(direct) == _seen(routed)
    assert direct.status_code == (200 if headers.get("authorization") == "Bearer sk-hot" else 401)


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_stream_options_without_a_stream_is_refused_to_the_sdk(app_url, kind):
    """OpenAI's 400 for `stream_options` on a request that does not stream, through the openai SDK."""
    client = openai.OpenAI(base_url=app_url[1] + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        if kind == "chat":
            client.chat.completions.create(model="remote-a", messages=[{"role": "user", "content": "hi"}],
                                           stream_options={"include_usage": True})
        else:
            client.completions.create(model="remote-a", prompt="hi", stream_options={"include_usage": True})
    assert caught.value.param == "stream_options" and caught.value.type == "invalid_request_error"
    assert "only allowed when 'stream' is enabled" in caught.value.message


@pytest.fixture(scope="module")
def served_guarded(upstream):
    """The app behind the gateway's own HTTP protocol (gateway/server.py), as `pointsman serve` runs it."""
    from gateway.server import http_protocol

    port = free_port()
    config = uvicorn.Config(_app(upstream, "metrics: {enabled: true}"), host="127.0.0.1", port=port, loop="uvloop",
                            http=http_protocol(), lifespan="on", log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 20, "the server to start")
    yield "127.0.0.1", port
    server.should_exit = True
    thread.join(20)


def _exchange(sock: socket.socket, buffer: bytes, method: str, path: str) -> tuple[bytes, dict[bytes, bytes], bytes,
                                                                                   bytes]:
    """One request on a kept-alive connection: its status line, headers and body (none for HEAD, whatever its
    content-length says), and what was read past them."""
    sock.sendall(b"%s %s HTTP/1.1\r\nHost: x\r\n\r\n" % (method.encode(), path.encode()))
    while b"\r\n\r\n" not in buffer:
        buffer += sock.recv(65536)
    head, _, rest = buffer.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in lines)
    size = 0 if method == "HEAD" else int(headers[b"content-length"])
    while len(rest) < size:
        rest += sock.recv(65536)
    return status, headers, rest[:size], rest[size:]


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/remote-a", "/health", "/ready", "/metrics", "/dashboard/",
                                  "/dashboard/nope", "/v1/nowhere", "/v1/chat/completions", "/openapi/openapi.json"])
def test_head_is_answered_as_get_without_a_body(served_guarded, path):
    """RFC 9110 9.3.2: HEAD answers as GET would, with no content (Litestar alone answered 405 for a route with no
    HEAD handler). A body sent after the head would be read as the start of the next response on the connection."""
    with socket.create_connection(served_guarded, timeout=10) as sock:
        status, headers, body, rest = _exchange(sock, b"", "HEAD", path)
        assert body == b""
        got_status, got_headers, got_body, rest = _exchange(sock, rest, "GET", path)
        assert rest == b""
        again, *_ = _exchange(sock, b"", "HEAD", path)  # and the connection stays usable
    assert status == got_status == again and got_status.startswith(b"HTTP/1.1 ")
    assert headers.get(b"content-type") == got_headers.get(b"content-type")
    assert headers.get(b"allow") == got_headers.get(b"allow")
    # /metrics: its counters move between the two requests; /v1/nowhere: its 404 names the method it was sent
    if path not in ("/metrics", "/v1/nowhere"):
        assert int(headers[b"content-length"]) == len(got_body)


@pytest.mark.parametrize("payload,param", [({}, "messages"), ({"prompt": 5}, "prompt"), ({"prompt": ["a"]}, "prompt")])
def test_route_explanations_name_the_field_at_fault(app_url, payload, param):
    response = httpx.post(app_url[1] + "/v1/route", json=payload)
    assert response.status_code == 400 and response.json()["error"]["param"] == param
