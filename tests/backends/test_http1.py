"""backends/http1.py against real sockets: framing, big bodies, keep-alive, the pool's limits, 1xx, headers, IPv6."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import pytest

from backends import http1
from backends.http1 import ConnectionPool
from backends.transport import ConnectError, InvalidHeader, PoolTimeout, ReadError, TransportTimeout
from tests.backends.raw_server import RawServer, answer, keep_alive, read_request, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="session")  # the fixtures' servers and pools live in this loop

@pytest.fixture
async def pools() -> AsyncIterator[list[ConnectionPool]]:
    opened: list[ConnectionPool] = []
    yield opened
    for pool in opened:
        await pool.aclose()


def pool_for(pools: list[ConnectionPool], url: str, **kwargs) -> ConnectionPool:
    pool = ConnectionPool(url, **kwargs)
    pools.append(pool)
    return pool


# -- framing and size --


async def test_content_length_body_and_keep_alive(pools) -> None:
    async with RawServer(keep_alive(answer(b'{"ok":true}'))) as server:
        pool = pool_for(pools, server.url)
        for _ in range(3):
            response = await pool.request("POST", "/x", b"{}", None, 5.0)
            assert response.status == 200 and await response.body() == b'{"ok":true}'
        assert server.connections == 1


async def test_chunked_body_streamed_in_pieces(pools) -> None:
    pieces = [b"data: one\n\n", b"data: two\n\n", b"x" * 100_000]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    async with RawServer(keep_alive(head + chunked)) as server:
        pool = pool_for(pools, server.url)
        response = await pool.request("GET", "/s", b"", None, 5.0)
        assert b"".join([c async for c in response.chunks()]) == b"".join(pieces)
        response = await pool.request("GET", "/s", b"", None, 5.0)
        assert await response.body() == b"".join(pieces)
        assert server.connections == 1


async def test_close_delimited_body(pools) -> None:
    body = b"z" * 300_000

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()

    async with RawServer(handler) as server:
        pool = pool_for(pools, server.url)
        for _ in range(2):  # the closed connection is not reused
            response = await pool.request("GET", "/", b"", None, 5.0)
            assert await response.body() == body
        assert server.connections == 2


@pytest.mark.parametrize("size", [3 << 20, 10_000_000], ids=["3MiB", "10MB"])
async def test_big_non_streamed_body_is_read_fast(pools, size: int) -> None:
    body = bytes(range(256)) * (size // 256) + b"!" * (size % 256)
    async with RawServer(keep_alive(answer(body))) as server:
        pool = pool_for(pools, server.url)
        for _ in range(2):  # and the connection is reusable afterwards
            start = time.perf_counter()
            response = await pool.request("POST", "/big", b"{}", None, 5.0)
            assert await response.body() == body
            assert time.perf_counter() - start < 1.0
        assert server.connections == 1


async def test_big_streamed_body_pauses_and_resumes(pools) -> None:
    body = b"s" * (5 << 20)
    async with RawServer(keep_alive(answer(body))) as server:
        pool = pool_for(pools, server.url)
        response = await pool.request("GET", "/", b"", None, 5.0)
        conn = response._conn
        await wait_for(lambda: conn._paused)  # the reader is slower than the upstream: back-pressure
        assert conn._buffered <= http1._PAUSE_AT + (1 << 20)
        assert b"".join([c async for c in response.chunks()]) == body


async def test_connection_released_while_paused_is_reusable(pools, monkeypatch) -> None:
    monkeypatch.setattr(http1, "_PAUSE_AT", 10)  # any body pauses reading, even one that is already complete
    async with RawServer(keep_alive(answer(b"0123456789" * 10))) as server:
        pool = pool_for(pools, server.url)
        response = await pool.request("GET", "/", b"", None, 5.0)
        conn = response._conn
        await wait_for(lambda: conn._complete)
        assert conn._paused
        await response.aclose()  # complete but unread: back to the pool
        response = await pool.request("GET", "/", b"", None, 2.0)
        assert response._conn is conn and await response.body() == b"0123456789" * 10
        assert server.connections == 1


# -- keep-alive and the pool --


async def test_idle_connection_closed_by_the_server_is_retried_on_a_new_one(pools) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"first"))
        await writer.drain()
        await read_request(reader)  # the next request on this connection: dropped unanswered (an idle timeout race)

    async with RawServer(handler) as server:
        pool = pool_for(pools, server.url)
        assert await (await pool.request("POST", "/", b"{}", None, 5.0)).body() == b"first"
        assert await (await pool.request("POST", "/", b"{}", None, 5.0)).body() == b"first"
        assert server.connections == 2  # the request dropped on the first went again on a second

    async def closes_after_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"once"))
        await writer.drain()

    async with RawServer(closes_after_one) as server:
        pool = pool_for(pools, server.url)
        response = await pool.request("GET", "/", b"", None, 5.0)
        conn = response._conn
        assert await response.body() == b"once"
        await wait_for(lambda: conn.closed)  # the idle connection saw the close (it keeps reading while idle)
        assert await (await pool.request("GET", "/", b"", None, 5.0)).body() == b"once"
        assert server.connections == 2


async def test_a_full_pool_waits_at_most_pool_timeout(pools) -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader):
            await release.wait()
            writer.write(answer(b"late"))
            await writer.drain()

    async with RawServer(handler) as server:
        pool = pool_for(pools, server.url, max_connections=1, pool_timeout=0.2)
        first = asyncio.ensure_future(pool.request("GET", "/", b"", None, 5.0))
        await wait_for(lambda: server.connections == 1)
        start = time.perf_counter()
        with pytest.raises(PoolTimeout):
            await pool.request("GET", "/", b"", None, 5.0)
        assert 0.15 < time.perf_counter() - start < 2.0
        release.set()
        assert await (await first).body() == b"late"
        assert await (await pool.request("GET", "/", b"", None, 5.0)).body() == b"late"  # the slot came back


async def test_timeouts_and_broken_responses(pools, unused_tcp_port: int) -> None:
    never = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await never.wait()

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()

    async with RawServer(silent) as s1, RawServer(cut) as s2, RawServer(garbage) as s3:
        with pytest.raises(TransportTimeout):
            await pool_for(pools, s1.url).request("GET", "/", b"", None, 0.2)
        response = await pool_for(pools, s2.url).request("GET", "/", b"", None, 5.0)
        with pytest.raises(ReadError):
            await response.body()
        with pytest.raises(ReadError):
            await pool_for(pools, s3.url).request("GET", "/", b"", None, 5.0)
        never.set()
    with pytest.raises(ConnectError):
        await pool_for(pools, f"http://127.0.0.1:{unused_tcp_port}").request("GET", "/", b"", None, 5.0)


async def test_read_timeouts_on_a_reused_connection(pools) -> None:
    """One timer per connection serves every wait (see _Connection): each wait still gets its own timeout,
    whatever the waits before it on the same connection had."""
    never = asyncio.Event()

    async def scripted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while request := await read_request(reader):
            path = request.split(b" ", 2)[1]
            if path == b"/slow":
                await asyncio.sleep(0.5)
            if path == b"/drip":  # a chunk every 50 ms for 0.5 s, then silence
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                for _ in range(10):
                    writer.write(b"2\r\nok\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.05)
                await never.wait()
            if path == b"/stall":
                await never.wait()
            writer.write(answer(b"done"))
            await writer.drain()

    async with RawServer(scripted) as server:
        pool = pool_for(pools, server.url, max_connections=1)
        assert await (await pool.request("GET", "/fast", b"", None, 0.3)).body() == b"done"
        await asyncio.sleep(0.4)  # idle past the timeout: the timer lapses and the connection is still fine
        assert await (await pool.request("GET", "/fast", b"", None, 0.3)).body() == b"done"
        # no timeout after a wait that had one: the armed timer must not cut this one off
        assert await (await pool.request("GET", "/slow", b"", None, None)).body() == b"done"
        # each chunk's wait restarts the clock: 0.5 s of chunks under a 0.3 s timeout, then the silence times out
        response = await pool.request("GET", "/drip", b"", None, 0.3)
        received = []
        with pytest.raises(TransportTimeout):
            async for chunk in response.chunks():
                received.append(chunk)
        assert b"".join(received) == b"ok" * 10
        never.set()
        never.clear()
        # a short timeout after a long one (here on the next connection: that one was dropped) is kept
        assert await (await pool.request("GET", "/fast", b"", None, 30.0)).body() == b"done"
        with pytest.raises(TransportTimeout):
            async with asyncio.timeout(5):  # the 30 s wait's timer would end this with TimeoutError instead
                await pool.request("GET", "/stall", b"", None, 0.2)
        never.set()


# -- the protocol's corners --


async def test_interim_1xx_replies_are_skipped(pools) -> None:
    reply = (b"HTTP/1.1 100 Continue\r\n\r\n"
             b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
             + answer(b'{"final":1}', b"X-Final: yes"))
    async with RawServer(keep_alive(reply)) as server:
        pool = pool_for(pools, server.url)
        for _ in range(2):
            response = await pool.request("POST", "/", b"{}", None, 5.0)
            assert response.status == 200
            assert response.headers.get("x-final") == "yes" and "link" not in response.headers
            assert await response.body() == b'{"final":1}'


async def test_response_headers_are_kept(pools) -> None:
    reply = answer(b"{}", b"Retry-After: 7", b"X-RateLimit-Remaining-Requests: 99", b"Set-Cookie: a=1",
                   b"Set-Cookie: b=2")
    async with RawServer(keep_alive(reply)) as server:
        response = await pool_for(pools, server.url).request("GET", "/", b"", None, 5.0)
        headers = response.headers
        await response.body()
        assert headers["retry-after"] == "7" and headers["x-ratelimit-remaining-requests"] == "99"
        assert headers["set-cookie"] == "a=1, b=2" and headers["content-length"] == "2"


async def test_relayed_headers_are_bounded(pools) -> None:
    """Thousands of x-ratelimit-* headers, or a Retry-After of 60 KB, made a response head the client's parser
    refused (h11, under httpx and the openai SDK): at most MAX_RELAYED are relayed, none longer than
    MAX_RELAYED_VALUE; all are still in `headers`."""
    many = [b"X-RateLimit-H%d: %s" % (i, b"v" * 100) for i in range(3 * http1.MAX_RELAYED)]
    reply = answer(b"{}", b"Retry-After: " + b"9" * 60_000, *many)
    async with RawServer(keep_alive(reply)) as server:
        response = await pool_for(pools, server.url).request("GET", "/", b"", None, 5.0)
        relayed = response.relayed_headers()
        assert len(response.headers) > 3 * http1.MAX_RELAYED
        await response.body()
        assert len(relayed) == http1.MAX_RELAYED and "retry-after" not in relayed
        assert all(len(value) <= http1.MAX_RELAYED_VALUE for value in relayed.values())


@pytest.mark.parametrize("endless", [b"X-Pad: v\r\n", b"v"], ids=["headers", "one-value"])
async def test_a_head_that_never_ends_fails_at_max_head(pools, monkeypatch, endless: bytes) -> None:
    """Header lines (or one header's value) sent without end: a ReadError once MAX_HEAD bytes have come, not
    a header list that grows until the request's timeout (hundreds of MB a second here)."""
    monkeypatch.setattr(http1, "MAX_HEAD", 64 * 1024)
    sent = 0

    async def endless_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n" + (b"" if endless.startswith(b"X") else b"X-Pad: "))
        while not writer.is_closing() and sent < 64 << 20:  # until the client closes (or 64 MB: the test fails)
            writer.write(endless * 4096)
            sent += len(endless) * 4096
            await writer.drain()

    async with RawServer(endless_head) as server:
        with pytest.raises(ReadError, match="head over 65536 bytes"):
            await pool_for(pools, server.url).request("GET", "/", b"", None, 30.0)
    assert sent < 16 << 20


async def test_headers_are_checked_at_construction(pools) -> None:
    with pytest.raises(InvalidHeader, match="CR, LF or NUL") as info:
        ConnectionPool("http://127.0.0.1:1", headers={"Authorization": "Bearer sk-secret\n"})
    assert "sk-secret" not in str(info.value)  # never echo a key
    with pytest.raises(InvalidHeader, match="invalid header name"):
        ConnectionPool("http://127.0.0.1:1", headers={"Bad Name": "x"})
    with pytest.raises(InvalidHeader):
        ConnectionPool("http://127.0.0.1:1", headers={"X-A": "a\r\nX-Injected: 1"})
    pool = pool_for(pools, "http://127.0.0.1:1")
    with pytest.raises(InvalidHeader):
        await pool.request("GET", "/", b"", {"X-A": "a\x00b"}, 1.0)


async def test_host_header_and_prefix(pools) -> None:
    log: list[bytes] = []
    async with RawServer(keep_alive(answer(b"{}"), log)) as server:
        pool = pool_for(pools, server.url + "/v1/", headers={"Authorization": "Bearer k"})
        await (await pool.request("POST", "/chat/completions", b"{}", {"X-Extra": "1"}, 5.0)).body()
    lines = log[0].split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions HTTP/1.1"
    assert f"Host: 127.0.0.1:{server.port}".encode() in lines
    assert b"Authorization: Bearer k" in lines and b"X-Extra: 1" in lines and b"Content-Length: 2" in lines


def _has_ipv6() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


async def test_ipv6_literal_base_url(pools) -> None:
    if not _has_ipv6():
        pytest.skip("this host has no IPv6 loopback (::1): the IPv6 base URL test did not run")
    log: list[bytes] = []
    async with RawServer(keep_alive(answer(b"six"), log), host="::1") as server:
        pool = pool_for(pools, server.url)
        assert await (await pool.request("GET", "/", b"", None, 5.0)).body() == b"six"
    assert f"Host: [::1]:{server.port}".encode() in log[0].split(b"\r\n")
