"""Transports and the factory that picks one: TLS (trustme certificates), CONNECT proxies from config and env."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trustme
from uvicorn.protocols.http.httptools_impl import HEADER_VALUE_RE

from backends.http1 import ConnectionPool
from backends.openai_upstream import open_transport
from backends.transport import (
    AiohttpTransport,
    ConnectError,
    InvalidHeader,
    PoolTimeout,
    ReadError,
    Transport,
    TransportTimeout,
    environment_proxy,
    open_httpx_client,
)
from config.schema import TLSConfig
from tests.backends.raw_server import RawServer, answer, keep_alive, read_request, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="session")  # the fixtures' servers and pools live in this loop

PROXY_ENV = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY", "https_proxy", "http_proxy", "all_proxy",
             "no_proxy")


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch) -> None:
    for name in PROXY_ENV:  # the host's own proxy settings must not leak into these tests
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def pki(ca: trustme.CA, tmp_path_factory) -> dict[str, str]:
    """PEM files: the CA, and a client certificate and key signed by it."""
    tmp: Path = tmp_path_factory.mktemp("pki")
    client = ca.issue_cert("client@pointsman.test")
    paths = {"ca": str(tmp / "ca.pem"), "client_cert": str(tmp / "client.pem"), "client_key": str(tmp / "client.key")}
    ca.cert_pem.write_to_path(paths["ca"])
    client.cert_chain_pems[0].write_to_path(paths["client_cert"])
    client.private_key_pem.write_to_path(paths["client_key"])
    return paths


def server_context(ca: trustme.CA, *, require_client_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ca.configure_trust(ctx)
    return ctx


@pytest.fixture
async def transports() -> AsyncIterator[list[Transport]]:
    opened: list[Transport] = []
    yield opened
    for transport in opened:
        await transport.aclose()


def opened(transports: list[Transport], base_url: str, **kwargs) -> Transport:
    transport = open_transport(base_url, **kwargs)
    transports.append(transport)
    return transport


class ConnectProxy:
    """A tiny HTTP proxy: CONNECT tunnels, and absolute-form requests forwarded as they are; logs each target."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> ConnectProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()  # type: ignore[union-attr]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ")
            if method == "CONNECT":
                host, port = target.rsplit(":", 1)
                first = b""
            else:  # http://host:port/path: forward the request to the origin unchanged
                host, port = target.split("/")[2].rsplit(":", 1)
                first = head
            self.targets.append(f"{method} {target}")
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            if method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            up_writer.write(first)

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                try:
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                finally:
                    dst.close()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


# -- the factory --


async def test_factory_picks_http1_for_plain_http_and_aiohttp_for_tls_or_proxies(monkeypatch) -> None:
    assert isinstance(open_transport("http://127.0.0.1:9/v1"), ConnectionPool)
    assert isinstance(open_transport("https://127.0.0.1:9/v1"), AiohttpTransport)
    assert isinstance(open_transport("http://127.0.0.1:9/v1", proxy="http://127.0.0.1:3128"), AiohttpTransport)
    monkeypatch.setenv("HTTP_PROXY", "127.0.0.1:3128")
    assert environment_proxy("http://10.0.0.1:8000/v1") == "http://127.0.0.1:3128"
    assert environment_proxy("https://10.0.0.1/v1") is None  # HTTPS_PROXY is not set
    assert isinstance(open_transport("http://10.0.0.1:8000/v1"), AiohttpTransport)
    monkeypatch.setenv("NO_PROXY", "localhost,.internal,10.0.0.1")
    for url in ("http://10.0.0.1:8000/v1", "http://vllm.internal:8000/v1", "http://localhost:8000"):
        assert environment_proxy(url) is None and isinstance(open_transport(url), ConnectionPool), url
    assert environment_proxy("http://10.0.0.2:8000/v1") == "http://127.0.0.1:3128"
    with pytest.raises(InvalidHeader):
        open_transport("https://127.0.0.1:9", headers={"Authorization": "Bearer k\r\n"})


# -- TLS --


async def test_tls_verified_against_the_trustme_ca(ca, pki, transports) -> None:
    async with RawServer(keep_alive(answer(b'{"tls":1}', b"X-RateLimit-Limit-Requests: 5")),
                         ssl=server_context(ca)) as server:
        good = opened(transports, server.url + "/v1", tls=TLSConfig(ca_bundle=pki["ca"]))
        response = await good.request("POST", "/chat/completions", b"{}", None, 5.0)
        assert response.status == 200 and response.headers["x-ratelimit-limit-requests"] == "5"
        assert await response.body() == b'{"tls":1}'
        with pytest.raises(ConnectError, match="(?i)certificate"):  # the default trust store lacks the test CA
            await opened(transports, server.url).request("GET", "/", b"", None, 5.0)
        insecure = opened(transports, server.url, tls=TLSConfig(verify=False))
        assert await (await insecure.request("GET", "/", b"", None, 5.0)).body() == b'{"tls":1}'
        # the probe client gets the same TLS settings
        async with open_httpx_client(tls=TLSConfig(ca_bundle=pki["ca"]), timeout=5.0) as client:
            assert (await client.get(server.url + "/")).content == b'{"tls":1}'


async def test_tls_client_certificate(ca, pki, transports) -> None:
    async with RawServer(keep_alive(answer(b"mtls")), ssl=server_context(ca, require_client_cert=True)) as server:
        tls = TLSConfig(ca_bundle=pki["ca"], client_cert=pki["client_cert"], client_key=pki["client_key"])
        assert await (await opened(transports, server.url, tls=tls).request("GET", "/", timeout=5.0)).body() == b"mtls"
        without = opened(transports, server.url, tls=TLSConfig(ca_bundle=pki["ca"]))
        with pytest.raises((ConnectError, ReadError)):  # TLS 1.3 reports a missing client cert after the handshake
            await (await without.request("GET", "/", timeout=5.0)).body()


# -- proxies --


async def test_connect_proxy_from_config_and_from_env(ca, pki, transports, monkeypatch) -> None:
    tls = TLSConfig(ca_bundle=pki["ca"])
    async with RawServer(keep_alive(answer(b"via")), ssl=server_context(ca)) as server, ConnectProxy() as proxy:
        origin = f"127.0.0.1:{server.port}"
        configured = opened(transports, server.url, tls=tls, proxy=proxy.url)
        assert await (await configured.request("GET", "/", timeout=5.0)).body() == b"via"
        assert proxy.targets == [f"CONNECT {origin}"]

        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        from_env = opened(transports, server.url, tls=tls)
        assert await (await from_env.request("GET", "/", timeout=5.0)).body() == b"via"
        assert proxy.targets == [f"CONNECT {origin}"] * 2

        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        bypass = opened(transports, server.url, tls=tls)
        assert await (await bypass.request("GET", "/", timeout=5.0)).body() == b"via"
        assert len(proxy.targets) == 2  # went direct

        async with open_httpx_client(tls=tls, proxy=proxy.url, timeout=5.0) as client:  # probes follow suit
            assert (await client.get(server.url + "/")).content == b"via"
        assert len(proxy.targets) == 3


async def test_plain_http_through_a_proxy_from_env(transports, monkeypatch) -> None:
    async with RawServer(keep_alive(answer(b"plain"))) as server, ConnectProxy() as proxy:
        monkeypatch.setenv("http_proxy", proxy.url)
        transport = opened(transports, server.url + "/v1")
        assert isinstance(transport, AiohttpTransport)
        assert await (await transport.request("POST", "/completions", b"{}", timeout=5.0)).body() == b"plain"
        assert proxy.targets == [f"POST {server.url}/v1/completions"]


# -- the aiohttp transport's pool, timeouts and streaming --


async def test_aiohttp_transport_pool_timeout_timeouts_and_chunks(ca, pki, transports) -> None:
    release = asyncio.Event()
    pieces = [b"data: %d\n\n" % i for i in range(50)]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while request := await read_request(reader):
            if b"/slow" in request:
                await release.wait()
            if b"/stream" in request:
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                for p in pieces:
                    writer.write(b"%x\r\n%s\r\n" % (len(p), p))
                writer.write(b"0\r\n\r\n")
            else:
                writer.write(answer(b"done"))
            await writer.drain()

    async with RawServer(handler, ssl=server_context(ca)) as server:
        tls = TLSConfig(ca_bundle=pki["ca"])
        transport = opened(transports, server.url, tls=tls, max_connections=1, pool_timeout=0.2)
        response = await transport.request("GET", "/stream", timeout=5.0)
        assert b"".join([c async for c in response.chunks()]) == b"".join(pieces)
        first = asyncio.ensure_future(transport.request("GET", "/slow", timeout=5.0))
        await wait_for(lambda: server.connections == 1 and not transport._slots._value)
        start = time.perf_counter()
        with pytest.raises(PoolTimeout):
            await transport.request("GET", "/", timeout=5.0)
        assert time.perf_counter() - start < 2.0
        release.set()
        assert await (await first).body() == b"done"
        assert await (await transport.request("GET", "/", timeout=5.0)).body() == b"done"

        release.clear()
        with pytest.raises(TransportTimeout):
            await opened(transports, server.url, tls=tls).request("GET", "/slow", timeout=0.2)
        release.set()


@pytest.mark.parametrize("kind", ["http1", "aiohttp"])
async def test_total_bounds_the_whole_answer_while_each_wait_stays_short(kind: str, transports) -> None:
    """A body that trickles in for ~1 s, each piece well within the read timeout: a 0.4 s `total` ends it with
    TransportTimeout; without a total it is read whole."""
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n")
            for _ in range(10):
                writer.write(b"ab")
                await writer.drain()
                await asyncio.sleep(0.1)

    async with RawServer(trickle) as server:
        transport: Transport = ConnectionPool(server.url) if kind == "http1" else AiohttpTransport(server.url)
        transports.append(transport)
        with pytest.raises(TransportTimeout):
            await (await transport.request("GET", "/", b"", None, 0.5, 0.4)).body()
        assert await (await transport.request("GET", "/", b"", None, 0.5)).body() == b"ab" * 10


@pytest.fixture
def unused_port_url(unused_tcp_port: int) -> Iterator[str]:
    yield f"https://127.0.0.1:{unused_tcp_port}"


async def test_aiohttp_transport_connect_refused(unused_port_url: str, transports) -> None:
    with pytest.raises(ConnectError):
        await opened(transports, unused_port_url).request("GET", "/", timeout=2.0)


async def test_aiohttp_relays_only_header_values_the_server_can_write(transports) -> None:
    """Control bytes (uvicorn refuses them once the response has started: the client got no status line) and
    bytes that are not UTF-8 (a surrogate no latin-1 head can hold: a 500) drop that header; a tab stays."""
    odd = [b"x-ratelimit-remaining-requests: 9\x01", b"x-ratelimit-limit-requests: 5\x7f", b"retry-after: \xff\xfe",
           b"x-ratelimit-reset-requests: 1s\t2", b"x-ratelimit-limit-tokens: 7"]
    async with RawServer(keep_alive(answer(b"ok", *odd))) as server:
        transport = AiohttpTransport(server.url)
        transports.append(transport)
        response = await transport.request("GET", "/", timeout=5.0)
        relayed = response.relayed_headers()
        assert await response.body() == b"ok"
    assert relayed == {"x-ratelimit-reset-requests": "1s\t2", "x-ratelimit-limit-tokens": "7"}
    for name, value in relayed.items():  # what the gateway's server writes: latin-1, none of uvicorn's refused bytes
        assert not HEADER_VALUE_RE.search(value.encode("latin-1")), name
