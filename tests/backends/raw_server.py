"""A raw HTTP/1.1 server for the upstream client's tests: real sockets, answers written byte by byte."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable

__all__ = ["Handler", "RawServer", "answer", "keep_alive", "read_request", "wait_for"]

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """An asyncio TCP server on a free port whose connections run `handler`; counts connections."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", ssl: ssl.SSLContext | None = None) -> None:
        self.handler, self.host, self.ssl = handler, host, ssl
        self.connections = 0
        self.port = 0
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
                pass  # the client went away, or the test ended
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, self.host, 0, limit=1 << 24, ssl=self.ssl)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()  # type: ignore[union-attr]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.ssl else 'http'}://{host}:{self.port}"


async def read_request(reader: asyncio.StreamReader, log: list[bytes] | None = None) -> bytes:
    """One request's head and body (Content-Length framed), or b"" at the connection's end."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return b""
    if log is not None:
        log.append(head)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


def answer(body: bytes, *extra: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (len(body), b"".join(e + b"\r\n" for e in extra)) + body


def keep_alive(response: bytes | Callable[[], bytes], log: list[bytes] | None = None) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader, log):
            writer.write(response() if callable(response) else response)
            await writer.drain()

    return handler


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until `condition` holds (checked on each loop turn), or fail the test."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0)
