"""A load balancer like a Kubernetes Service: round-robin over the backends whose GET /ready answered 200 at the
last poll, each request relayed chunk by chunk, retried elsewhere only where the backend cannot have seen it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from urllib.parse import urlsplit

import aiohttp
import httptools
from aiohttp import web

__all__ = ["Backend", "Balancer"]

# hop-by-hop headers (RFC 9110 7.6.1) and the framing the balancer sets itself
_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
        "content-length", "host"}


class _Conn:
    """One HTTP/1.1 connection to a backend; `reused` once it has carried a whole exchange."""

    __slots__ = ("reader", "reused", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.reused = reader, writer, False

    def stale(self) -> bool:  # the backend closed it while it sat idle, and the loop has seen that
        return self.reader.at_eof() or self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


class Backend:
    """An endpoint: its address, its readiness at the last poll, its idle keep-alive connections, the requests
    sent to it and not yet answered in full, and how many it answered in full."""

    __slots__ = ("dropped_out", "host", "idle", "in_flight", "port", "ready", "served", "timeouts", "url")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.url, self.host, self.port = url.rstrip("/"), parts.hostname or "127.0.0.1", parts.port or 80
        self.ready = False
        self.served = self.in_flight = 0
        self.timeouts = 0  # probes in a row that got no answer in time
        self.dropped_out = 0  # times it went from ready to not ready
        self.idle: list[_Conn] = []

    def drop_idle(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


class _Reply:
    """httptools callbacks: the response's headers and the body pieces parsed so far."""

    __slots__ = ("body", "complete", "head_done", "headers", "keep_alive", "parser")

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.keep_alive = False
        self.headers: list[tuple[str, str]] = []
        self.body: list[bytes] = []
        self.head_done = self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()  # asked now: the parser forgets once the call returns


class _Unsent(Exception):
    """The backend cannot have acted on the request: safe to send it to another backend."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _ClientGone(Exception):
    """The client hung up while its response was being relayed."""


class Balancer:
    """Round-robin over ready backends (GET /ready polled every `poll_s`), like a Kubernetes Service whose
    endpoints follow a readiness probe.

    A request is retried on another ready backend (at most `max_retries` times) in exactly two cases, the ones
    Envoy's `connect-failure` and `reset-before-request` cover, where the backend cannot have acted on it:
    - "connect": the TCP connect failed (refused, reset, timed out), so not one byte of the request was sent;
    - "reused": a keep-alive connection that had already carried an exchange was closed by the backend and not one
      byte of a response came back: the race of a request sent just as the backend closes the connection as idle
      (its keep-alive timeout, or its shutdown), when it has not read the request. A backend that read it and
      died before answering looks the same; that would run the request twice, which the rolling restart's usage
      rows (one per request id) would show.
    Anything else is never retried: a fresh connection that dies before answering (the backend may have read the
    request) gets a 502; once a response byte has come back, a break cuts the client's connection, so the client
    sees an incomplete response, never a spliced one. `retried` counts the retries by case, `failed` the requests
    the balancer could not answer in full (502, 503 for no ready backend, or a response cut off)."""

    def __init__(self, backends: list[str], *, poll_s: float = 0.1, max_retries: int = 2) -> None:
        self.backends = [Backend(url) for url in backends]
        self.poll_s = poll_s
        self.max_retries = max_retries
        self.retried = {"connect": 0, "reused": 0}
        self.failed = {"no ready backend": 0, "no answer": 0, "cut off": 0}
        self._next = 0
        self._runner: web.AppRunner | None = None
        self._pollers: list[asyncio.Task[None]] = []
        self._probes: aiohttp.ClientSession | None = None
        self.url = ""

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen (a free port by default), poll readiness, and return the base URL."""
        self._probes = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                             timeout=aiohttp.ClientTimeout(total=2.0))
        await asyncio.gather(*(self._probe(b) for b in self.backends))
        self._pollers = [asyncio.create_task(self._poll(b)) for b in self.backends]
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{host}:{bound}"
        return self.url

    async def stop(self) -> None:
        for poller in self._pollers:
            poller.cancel()
        await asyncio.gather(*self._pollers, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._probes is not None:
            await self._probes.close()
        for backend in self.backends:
            backend.drop_idle()

    async def _poll(self, backend: Backend) -> None:  # one loop per backend: a slow probe delays no other
        while True:
            await asyncio.sleep(self.poll_s)
            await self._probe(backend)

    async def _probe(self, backend: Backend) -> None:
        """An answer other than 200, or a refused connection, takes the backend out at once (a drain must be
        seen within a poll); a probe that times out on a busy machine only after three in a row, as a
        Kubernetes readiness probe's failureThreshold does."""
        assert self._probes is not None
        try:
            async with self._probes.get(backend.url + "/ready") as response:
                ready = response.status == 200
            backend.timeouts = 0
        except TimeoutError:
            backend.timeouts += 1
            ready = backend.ready and backend.timeouts < 3
        except aiohttp.ClientError:
            ready = False
        if backend.ready and not ready:  # out of the endpoints: its pooled connections are of no more use
            backend.drop_idle()
            backend.dropped_out += 1
        backend.ready = ready

    def _pick(self, tried: list[Backend]) -> Backend | None:
        ready = [b for b in self.backends if b.ready]
        fresh = [b for b in ready if b not in tried] or ready  # another backend if there is one
        if not fresh:
            return None
        self._next += 1
        return fresh[self._next % len(fresh)]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        lines = [f"{request.method} {request.path_qs} HTTP/1.1"]
        lines += [f"{k}: {v}" for k, v in request.headers.items() if k.lower() not in _HOP]
        tried: list[Backend] = []
        while True:
            backend = self._pick(tried)
            if backend is None:
                self.failed["no ready backend"] += 1
                return _error(503, "no ready backend")
            tried.append(backend)
            head = "\r\n".join([*lines, f"host: {backend.host}:{backend.port}", f"content-length: {len(body)}"])
            backend.in_flight += 1
            try:
                return await self._exchange(request, backend, head.encode("latin-1") + b"\r\n\r\n" + body)
            except _Unsent as unsent:
                if len(tried) > self.max_retries:
                    self.failed["no answer"] += 1
                    return _error(502, f"backend {backend.url}: {unsent.reason}")
                self.retried[unsent.reason] += 1
            finally:
                backend.in_flight -= 1

    async def _connection(self, backend: Backend) -> _Conn:
        while backend.idle:
            conn = backend.idle.pop()
            if not conn.stale():
                return conn
            conn.close()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(backend.host, backend.port), 5)
        except OSError as exc:  # refused, reset, timed out
            raise _Unsent("connect") from exc
        return _Conn(reader, writer)

    async def _exchange(self, request: web.Request, backend: Backend, message: bytes) -> web.StreamResponse:
        conn = await self._connection(backend)
        try:
            conn.writer.write(message)
            await conn.writer.drain()
            data = await conn.reader.read(65536)
        except OSError:
            data = b""
        if not data:  # closed before a single response byte
            conn.close()
            if conn.reused:
                raise _Unsent("reused")
            self.failed["no answer"] += 1
            return _error(502, f"backend {backend.url} closed the connection without answering")
        reply = _Reply()
        parser = reply.parser
        response: web.StreamResponse | None = None
        try:
            while True:  # from here on never retried: the backend has answered
                parser.feed_data(data)
                if response is None and reply.head_done:
                    response = _response_for(parser.get_status_code(), reply.headers)
                    await response.prepare(request)
                if response is not None and reply.body:
                    await _relay(response, reply.body)
                if reply.complete:
                    break
                data = await conn.reader.read(65536)
                if not data:
                    raise ConnectionResetError("the backend closed the connection mid-response")
        except _ClientGone:
            conn.close()  # the client left: its stream is its own business, not a failure of the balancer
            raise
        except (OSError, httptools.HttpParserError) as exc:
            conn.close()
            if response is None:
                self.failed["no answer"] += 1
                return _error(502, f"backend {backend.url}: {exc}")
            self.failed["cut off"] += 1
            if request.transport is not None:
                request.transport.close()  # the client must see an incomplete response, not a complete-looking one
            return response
        assert response is not None
        if reply.keep_alive:
            conn.reused = True
            backend.idle.append(conn)
        else:
            conn.close()
        backend.served += 1
        await response.write_eof()
        return response


async def _relay(response: web.StreamResponse, pieces: list[bytes]) -> None:
    try:
        for piece in pieces:
            await response.write(piece)
    except OSError as exc:
        raise _ClientGone from exc
    pieces.clear()


def _response_for(status: int, headers: list[tuple[str, str]]) -> web.StreamResponse:
    response = web.StreamResponse(status=status)
    for name, value in headers:
        if name.lower() == "content-length":
            response.content_length = int(value)
        elif name.lower() not in _HOP:
            response.headers.add(name, value)
    return response


def _error(status: int, message: str) -> web.Response:
    error = {"message": message, "type": "balancer_error", "param": None, "code": f"balancer_{status}"}
    return web.Response(status=status, text=json.dumps({"error": error}), content_type="application/json")


async def _serve(port: int, backends: list[str]) -> None:
    balancer = Balancer(backends)
    print("balancing on", await balancer.start(port=port), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await balancer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="readiness-driven round-robin HTTP load balancer")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("backends", nargs="+", help="base URLs, e.g. http://127.0.0.1:8000")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.port, args.backends))


if __name__ == "__main__":
    main()
