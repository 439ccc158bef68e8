"""OpenAIBackend against a real aiohttp upstream: relayed headers, invalid bodies, big errors, stream endings."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import msgspec
import pytest
from aiohttp import web

from backends.openai_upstream import OpenAIBackend
from config.schema import Deployment, OpenAIModel
from protocol.errors import UpstreamInvalidResponse, UpstreamStatusError, UpstreamTimeout, UpstreamUnavailable
from protocol.openai import ChatCompletionRequest, decode_request
from tests.backends.raw_server import wait_for

pytestmark = pytest.mark.asyncio(loop_scope="session")  # the fixtures' servers and pools live in this loop

LIMITS = {"x-ratelimit-remaining-requests": "41", "x-ratelimit-reset-tokens": "6m0s"}
COMPLETION = {"id": "c", "object": "chat.completion", "created": 1, "model": "up-model",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}


def chunk(content: str | None, finish: str | None = None, index: int = 0) -> bytes:
    delta = {} if content is None else {"content": content}
    return json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
                       "choices": [{"index": index, "delta": delta, "finish_reason": finish}]},
                      separators=(",", ":")).encode()


class Upstream:
    """An aiohttp server whose /v1/chat/completions answer is chosen per test by `mode`."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.separators: tuple[str, str] = (",", ":")  # how the "ok" answer is written: compact, as vLLM does
        self.seen_auth: list[str] = []
        self.release = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.seen_auth.append(request.headers.get("Authorization", ""))
        mode = self.mode
        if mode == "ok":
            return web.json_response(COMPLETION, headers=LIMITS,
                                     dumps=lambda o: json.dumps(o, separators=self.separators))
        if mode == "429":
            return web.json_response({"error": {"message": "slow down", "type": "rate_limit", "code": "rl"}},
                                     status=429, headers={"Retry-After": "3", "retry-after-ms": "2500", **LIMITS,
                                                          "X-Other": "no"})
        if mode == "html":
            return web.Response(text="<html>captive portal</html>", content_type="text/html")
        if mode == "array":
            return web.json_response([1, 2])
        if mode == "big500":
            return web.json_response({"error": {"message": "x" * (2 << 20), "type": "server_error"}}, status=500)
        if mode == "slow":
            await self.release.wait()
            return web.json_response(COMPLETION)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **LIMITS})
        await response.prepare(request)
        await response.write(b"data: " + chunk("Hel") + b"\n\n")
        if mode == "stream-no-done":
            await response.write(b": keep-alive comment\n\ndata: " + chunk("lo", "stop") + b"\n\n")
        elif mode == "stream-n2-no-done":
            both = b"data: " + chunk("lo", "stop", 0) + b"\n\ndata: " + chunk("yo", "length", 1)
            await response.write(both + b"\n\n")
        elif mode == "stream-done":
            await response.write(b"data: " + chunk("lo", "stop") + b"\n\ndata: [DONE]\n\n")
        # "stream-broken": ends after the first token
        return response

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"data": []})

    async def __aenter__(self) -> Upstream:
        app = web.Application(client_max_size=1 << 24)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        self.runner = web.AppRunner(app, shutdown_timeout=0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        await self.runner.cleanup()  # type: ignore[union-attr]


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with Upstream() as server:
        yield server


def backend(url: str, **fields) -> OpenAIBackend:
    return OpenAIBackend(msgspec.convert({"id": "ours", "base_url": url, **fields}, OpenAIModel))


def request(n: int = 1, stream: bool = False):
    return decode_request({"model": "ours", "messages": [{"role": "user", "content": "hi"}], "n": n,
                           "stream": stream}, ChatCompletionRequest)


@pytest.mark.parametrize("rename", [False, True], ids=["same-name", "renamed"])
async def test_200_relays_rate_limit_headers_and_renames(upstream: Upstream, rename: bool) -> None:
    b = backend(upstream.url, upstream_model="up-model", api_key=" key-from-file\n") if rename else backend(
        upstream.url)
    headers: dict[str, str] = {}
    body = json.loads(await b.complete(request(), 0, headers))
    assert headers == LIMITS
    assert body["model"] == ("ours" if rename else "up-model")
    assert upstream.seen_auth == (["Bearer key-from-file"] if rename else [""])  # the key's whitespace stripped
    assert json.loads(await b.complete(request()))["choices"][0]["message"]["content"] == "hi"  # headers optional
    await b.aclose()


@pytest.mark.parametrize("separators", [(",", ":"), (", ", ": "), (",", " : ")], ids=["compact", "spaced", "odd"])
async def test_rename_keeps_the_answer_as_written_when_it_can(upstream: Upstream,
                                                              separators: tuple[str, str]) -> None:
    """Compact JSON (vLLM) and json.dumps's default spacing (OpenAI's style) get our model name in place, the
    rest byte for byte; any other spacing is decoded and re-encoded, with the same content."""
    upstream.separators = separators
    b = backend(upstream.url, upstream_model="up-model")
    body = await b.complete(request())
    expected = json.dumps({**COMPLETION, "model": "ours"}, separators=separators).encode()
    assert json.loads(body) == json.loads(expected)
    assert (body == expected) == (separators != (",", " : "))
    await b.aclose()


async def test_429_carries_retry_after_and_rate_limits(upstream: Upstream) -> None:
    upstream.mode = "429"
    b = backend(upstream.url)
    headers: dict[str, str] = {}
    with pytest.raises(UpstreamStatusError) as info:
        await b.complete(request(), 0, headers)
    err = info.value
    assert err.status == 429 and err.retryable and err.code == "rl"
    assert err.headers == {"retry-after": "3", "retry-after-ms": "2500", **LIMITS} == headers
    with pytest.raises(UpstreamStatusError) as info:  # the same for a stream, before any payload
        async for _ in b.stream(request(stream=True)):
            pass
    assert info.value.headers["retry-after"] == "3"
    await b.aclose()


@pytest.mark.parametrize("mode", ["html", "array"])
@pytest.mark.parametrize("rename", [False, True], ids=["same-name", "renamed"])
async def test_invalid_200_body_is_an_invalid_response(upstream: Upstream, mode: str, rename: bool) -> None:
    upstream.mode = mode
    b = backend(upstream.url, upstream_model="up-model") if rename else backend(upstream.url)
    with pytest.raises(UpstreamInvalidResponse) as info:
        await b.complete(request())
    assert info.value.status == 502 and info.value.code == "upstream_invalid_response" and info.value.retryable
    await b.aclose()


async def test_2mib_error_body_is_relayed_with_its_status(upstream: Upstream) -> None:
    upstream.mode = "big500"
    b = backend(upstream.url)
    with pytest.raises(UpstreamStatusError) as info:
        await b.complete(request())
    assert info.value.status == 500 and info.value.type == "server_error"
    assert len(info.value.body()) > 2 << 20
    await b.aclose()


async def test_stream_headers_arrive_before_the_first_payload(upstream: Upstream) -> None:
    upstream.mode = "stream-done"
    b = backend(upstream.url, upstream_model="up-model")
    headers: dict[str, str] = {}
    payloads = []
    async for payload in b.stream(request(stream=True), 0, headers):
        if not payloads:
            assert headers == LIMITS
        payloads.append(json.loads(payload))
    assert [p["model"] for p in payloads] == ["ours", "ours"]
    await b.aclose()


@pytest.mark.parametrize(("mode", "n"), [("stream-no-done", 1), ("stream-n2-no-done", 2)])
async def test_stream_finished_but_without_done_ends_cleanly(upstream: Upstream, mode: str, n: int) -> None:
    upstream.mode = mode
    b = backend(upstream.url)
    payloads = [json.loads(p) async for p in b.stream(request(n=n, stream=True))]
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    await b.aclose()


async def test_stream_cut_before_finish_is_broken(upstream: Upstream) -> None:
    upstream.mode = "stream-broken"
    b = backend(upstream.url)
    with pytest.raises(UpstreamUnavailable) as info:
        async for _ in b.stream(request(stream=True)):
            pass
    assert info.value.code == "upstream_stream_broken"
    upstream.mode = "stream-no-done"  # one of two choices finished is not finished
    with pytest.raises(UpstreamUnavailable, match="before \\[DONE\\]"):
        async for _ in b.stream(request(n=2, stream=True)):
            pass
    await b.aclose()


async def test_full_pool_fails_over_and_timeouts(upstream: Upstream, unused_tcp_port: int) -> None:
    upstream.mode = "slow"
    b = backend(upstream.url, max_connections=1, pool_timeout_s=0.2, timeout_s=5)
    first = asyncio.ensure_future(b.complete(request()))
    await wait_for(lambda: len(upstream.seen_auth) == 1)  # the first request holds the only connection
    with pytest.raises(UpstreamUnavailable) as info:
        await b.complete(request())
    assert info.value.code == "upstream_pool_timeout" and info.value.retryable and info.value.status == 502
    upstream.release.set()
    assert json.loads(await first)["model"] == "up-model"
    upstream.release.clear()
    slow = backend(upstream.url, timeout_s=0.2)
    with pytest.raises(UpstreamTimeout):
        await slow.complete(request())
    dead = backend(f"http://127.0.0.1:{unused_tcp_port}/v1")
    with pytest.raises(UpstreamUnavailable):
        await dead.complete(request())
    for each in (b, slow, dead):
        await each.aclose()


async def test_health_probe_uses_httpx_and_deployments_need_no_base_url(upstream: Upstream,
                                                                        unused_tcp_port: int) -> None:
    model = OpenAIModel(id="ours", deployments=[Deployment(base_url=upstream.url),
                                                Deployment(base_url=f"http://127.0.0.1:{unused_tcp_port}/v1")])
    b = OpenAIBackend(model)
    assert await b.upstreams[0].reachable() and not await b.upstreams[1].reachable()
    assert await b.health()
    await b.aclose()


async def test_a_urls_credentials_and_query_never_reach_errors_or_deployment_names() -> None:
    """The URL's password and api-key query reached clients' 502 bodies, /v1/route and the breaker metric's label."""
    from tests.conftest import free_port

    unreachable = backend(f"http://svc:S3CRET@127.0.0.1:{free_port()}/v1?api-key=QSECRET#frag")
    try:
        assert unreachable.deployments[0][0] == unreachable.upstreams[0].shown_url
        assert "S3CRET" not in unreachable.deployments[0][0] and "QSECRET" not in unreachable.deployments[0][0]
        for call in (unreachable.complete(request()), anext(aiter(unreachable.stream(request(stream=True))))):
            with pytest.raises(UpstreamUnavailable) as caught:
                await call
            assert "127.0.0.1" in caught.value.message
            assert "S3CRET" not in caught.value.message and "QSECRET" not in caught.value.message
    finally:
        await unreachable.aclose()


async def test_a_full_pool_names_the_upstream_without_its_password() -> None:
    """The aiohttp transport (https, proxies) named base_url, password and all, in its PoolTimeout."""
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, never answers: the TLS handshake waits

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    held = backend(f"https://svc:S3CRET@127.0.0.1:{port}/v1", max_connections=1, pool_timeout_s=0.2,
                   connect_timeout_s=30)
    first = asyncio.ensure_future(held.complete(request()))
    try:
        await wait_for(lambda: held.upstreams[0].transport._slots.locked())  # the one connection is taken
        with pytest.raises(UpstreamUnavailable) as caught:
            await held.complete(request())
        assert "busy" in caught.value.message and "S3CRET" not in caught.value.message
    finally:
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await held.aclose()
        server.close()


async def test_stream_usage_false_sends_no_stream_options() -> None:
    """A server that refuses fields it does not know (as Mistral's 422s do): `stream_usage: false` keeps the
    gateway's `stream_options` (every stream asks for usage) from it, and the stream goes through."""
    bodies: list[dict] = []

    async def strict(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        bodies.append(body)
        if "stream_options" in body:
            return web.json_response({"detail": "extra fields not permitted: stream_options"}, status=422)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: " + chunk("hi", "stop") + b"\n\ndata: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", strict)
    runner = web.AppRunner(app, shutdown_timeout=0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"  # type: ignore[union-attr]
    asked = request(stream=True).asking_usage()  # as the pipeline sends every stream
    try:
        sends, holds = backend(url), backend(url, stream_usage=False)
        with pytest.raises(UpstreamStatusError) as refused:
            [p async for p in sends.stream(asked)]
        assert refused.value.status == 422
        payloads = [json.loads(p) async for p in holds.stream(asked)]
        assert payloads[0]["choices"][0]["delta"]["content"] == "hi"
        assert "stream_options" in bodies[0] and "stream_options" not in bodies[1]
        await sends.aclose()
        await holds.aclose()
    finally:
        await runner.cleanup()
