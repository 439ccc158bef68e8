"""The generation routes as ASGI handlers: their body is read as Litestar's Request reads it (413 announced or
received, 400 for a bad content-length, nothing answered to a client that left), other methods get a 405 in
OpenAI's error shape, and their operations stay in the OpenAPI document."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httpx
import pytest
from litestar.exceptions import ClientException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge

from config.loader import parse_config
from gateway.app import HOT_ROUTES, create_app
from gateway.hot_routes import read_body
from tests.gateway.live import serve


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
