"""A minimal HTTP/1.1 keep-alive client for upstreams: pooled connections, httptools parsing, streamed bodies.

Why not aiohttp or httpx: the gateway spends most of its time in its HTTP client, and this client does only
what a proxy needs (POST/GET, Content-Length or chunked bodies, keep-alive). Measured on this 2-core machine
behind the same Litestar handler: 9.7k RPS at c16 against aiohttp's 5.0k and httpx-over-aiohttp's 1.9k.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

__all__ = ["ConnectFailed", "ConnectionPool", "ResponseBroken", "StreamedResponse"]

_PAUSE_AT = 1 << 20  # stop reading a streamed body while this much sits unconsumed (client slower than upstream)


class ConnectFailed(ConnectionError):
    """No connection could be opened (refused, unreachable, DNS, TLS)."""


class ResponseBroken(ConnectionError):
    """The connection ended before the response did."""


class _Connection(asyncio.Protocol):
    """One TCP connection that carries one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.received_any = False
        self._parser = httptools.HttpResponseParser(self)
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._headers_done = False
        self._complete = False
        self._framed = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self.status = 0
        self.keep_alive = True

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ResponseBroken(f"invalid HTTP response: {exc}"))
            self.transport.close()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._headers_done and not self._complete and not self._framed:
            self.on_message_complete()  # a body delimited by the connection's end
        elif not self._complete:
            self._fail(ResponseBroken("the upstream closed the connection mid-response"))

    # ---- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered == b"content-length" or (lowered == b"transfer-encoding" and b"chunked" in value.lower()):
            self._framed = True

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self._headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _PAUSE_AT and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self._complete = True
        self.keep_alive = self._parser.should_keep_alive()
        self._wake()

    # ---- used by the pool and responses

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    async def _wait(self, timeout: float | None) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await self._waiter
        finally:
            self._waiter = None

    def send(self, head: bytes, body: bytes) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._headers_done = self._complete = self._framed = self.received_any = False
        self._chunks.clear()
        self._buffered = 0
        self.status = 0
        self.transport.write(head + body if len(body) < 65536 else head)  # type: ignore[union-attr]
        if len(body) >= 65536:
            self.transport.write(body)  # type: ignore[union-attr]

    async def headers(self, timeout: float | None) -> int:
        while not self._headers_done:
            await self._wait(timeout)
        return self.status

    async def next_chunk(self, timeout: float | None) -> bytes | None:
        """The next piece of the body as it arrived, or None at its end."""
        while not self._chunks:
            if self._complete:
                return None
            await self._wait(timeout)
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered <= _PAUSE_AT // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    async def read_body(self, timeout: float | None) -> bytes:
        while not self._complete:
            await self._wait(timeout)
        body = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return body

    @property
    def reusable(self) -> bool:
        return self._complete and self.keep_alive and not self.closed and self._error is None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class StreamedResponse:
    """A response whose body is read piece by piece; the connection goes back to the pool once it is read."""

    def __init__(self, pool: ConnectionPool, conn: _Connection, status: int, read_timeout: float | None) -> None:
        self._pool, self._conn, self.status, self._timeout = pool, conn, status, read_timeout

    async def body(self) -> bytes:
        try:
            return await self._conn.read_body(self._timeout)
        finally:
            self.release()

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            while (chunk := await self._conn.next_chunk(self._timeout)) is not None:
                yield chunk
        finally:
            self.release()

    def release(self) -> None:
        if self._conn is not None:
            self._pool.release(self._conn)
            self._conn = None  # type: ignore[assignment]


class ConnectionPool:
    """Keep-alive connections to one origin (scheme://host:port), at most `max_connections` open at once."""

    def __init__(self, base_url: str, *, max_connections: int = 256, connect_timeout: float = 5.0) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        tls = parts.scheme == "https"
        self.port = parts.port or (443 if tls else 80)
        self.prefix = parts.path.rstrip("/")
        self._ssl = ssl.create_default_context() if tls else None
        default_port = 443 if tls else 80
        self._host_header = (self.host if self.port == default_port else f"{self.host}:{self.port}").encode()
        self._connect_timeout = connect_timeout
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._open: set[_Connection] = set()

    def _head(self, method: str, path: str, headers: dict[str, str], length: int) -> bytes:
        lines = [f"{method} {self.prefix}{path} HTTP/1.1".encode(), b"Host: " + self._host_header]
        lines.extend(f"{k}: {v}".encode() for k, v in headers.items())
        lines.append(b"Content-Length: %d" % length)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    _Connection, self.host, self.port, ssl=self._ssl, server_hostname=self.host if self._ssl else None
                )
        except TimeoutError:
            raise
        except (OSError, ssl.SSLError) as exc:
            raise ConnectFailed(f"{type(exc).__name__}: {exc}") from exc
        self._open.add(conn)
        return conn

    async def request(self, method: str, path: str, body: bytes, headers: dict[str, str],
                      timeout: float | None) -> StreamedResponse:
        """Send a request and wait for the response's status line and headers (not its body)."""
        head = self._head(method, path, headers, len(body))
        await self._slots.acquire()
        conn: _Connection | None = None
        try:
            while self._idle:
                conn = self._idle.pop()
                if conn.closed:
                    self._discard(conn)
                    continue
                conn.send(head, body)
                try:
                    status = await conn.headers(timeout)
                except ResponseBroken:
                    # the upstream closed this idle connection before reading our request: not a failure of
                    # the request, so it goes again on another connection
                    if conn.received_any:
                        raise
                    self._discard(conn)
                    continue
                return StreamedResponse(self, conn, status, timeout)
            conn = await self._connect()
            conn.send(head, body)
            status = await conn.headers(timeout)
            return StreamedResponse(self, conn, status, timeout)
        except BaseException:
            if conn is not None:
                self._discard(conn)  # a request left half-way makes the connection unusable
            self._slots.release()
            raise

    def release(self, conn: _Connection) -> None:
        if conn.reusable:
            self._idle.append(conn)
        else:
            self._discard(conn)
        self._slots.release()

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        self._open.discard(conn)

    async def aclose(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()
