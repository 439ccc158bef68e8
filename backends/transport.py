"""One small transport contract for upstream HTTP, its error tree, and its aiohttp implementation.

Modelled on httpx's AsyncBaseTransport: one request method plus `aclose`. `open_transport` (openai_upstream)
picks: plain http:// without a proxy goes through `backends/http1.py` (the hot path, about twice aiohttp's
throughput); https:// and proxied upstreams go through aiohttp (ten times httpx's throughput over TLS here:
bench/RESULTS.md, "HTTPS transport"), so TLS and CONNECT stay a well-kept library's job. httpx serves the calls
off the hot path (health probes, /metrics).
"""

from __future__ import annotations

import asyncio
import functools
import re
import ssl
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import httpx

from config.schema import TLSConfig

__all__ = [
    "AiohttpTransport",
    "ConnectError",
    "InvalidHeader",
    "MAX_RELAYED",
    "MAX_RELAYED_VALUE",
    "RELAYED_PREFIXES",
    "PoolTimeout",
    "ReadError",
    "Response",
    "Transport",
    "TransportError",
    "TransportTimeout",
    "check_headers",
    "shown_url",
    "environment_proxy",
    "open_httpx_client",
    "ssl_context",
]


class TransportError(Exception):
    """Base of every failure below HTTP: the request got no complete response."""


class ConnectError(TransportError):
    """No connection could be opened (refused, unreachable, DNS, TLS handshake, proxy refused)."""


class ReadError(TransportError):
    """The connection ended, or sent something that is not HTTP, before the response did."""


class TransportTimeout(TransportError):
    """Connecting, or the wait for the next bytes of the response, took longer than allowed."""


class PoolTimeout(TransportError):
    """Every connection of the pool stayed busy for longer than `pool_timeout`."""


class InvalidHeader(ValueError):
    """A header name that is not an HTTP token, or a value holding CR, LF or NUL (a request splitter)."""


# response headers a gateway hands back to its client (name prefixes, lowercase): Retry-After(-Ms), x-ratelimit-*;
# at most MAX_RELAYED of them, none longer than MAX_RELAYED_VALUE (the rest dropped): an upstream that sends
# thousands, or one of 60 KB, made a head the client's HTTP parser refused (OpenAI sends seven, all short)
RELAYED_PREFIXES = (b"retry-after", b"x-ratelimit-")
MAX_RELAYED = 32
MAX_RELAYED_VALUE = 256
_RELAYED_NAMES = tuple(prefix.decode() for prefix in RELAYED_PREFIXES)
# a relayed value the gateway's server can write: latin-1 text (aiohttp decodes bytes that are not UTF-8 to
# surrogates) without the control characters uvicorn refuses in a value (tab is allowed). An upstream's
# x-ratelimit-* holding \x01 or \x7f made uvicorn raise once the response had started (the client got no status
# line), one holding \xff\xfe a 500: such a header is dropped and the response goes out. Names need no check: aiohttp's
# parser refuses a name that is not a token
_SENDABLE = re.compile("[\t\x20-\x7e\x80-\xff]*")


class Response(Protocol):
    """Status and headers of an upstream response; its body is read once, whole or in pieces."""

    status: int

    @property
    def headers(self) -> Mapping[str, str]:
        """Lowercase names; repeated headers joined with ", "."""

    def relayed_headers(self) -> dict[str, str]:
        """Only the headers named by RELAYED_PREFIXES (collected while parsing: this runs on every response)."""

    async def body(self) -> bytes:
        """The whole body; releases the connection."""

    def chunks(self) -> AsyncIterator[bytes]:
        """The body piece by piece as it arrives; releases the connection at its end or when closed."""

    async def aclose(self) -> None:
        """Give the connection up without reading (the rest of) the body."""


class Transport(Protocol):
    """Requests to one origin and base path (`base_url`), with the headers given at construction on each."""

    async def request(self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None,
                      timeout: float | None = None, total: float | None = None) -> Response:
        """Send and wait for the status line and headers. `timeout` bounds each wait for bytes; `total`, when
        given, the whole answer, headers and body, from this call on (getting a connection keeps its own
        pool and connect timeouts). Either one running out raises TransportTimeout."""

    async def aclose(self) -> None: ...


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def shown_url(url: str) -> str:
    """`url` as errors, logs, metrics and /v1/route show it: without the user and password a URL may carry, its
    query (an `api-key=` parameter) and its fragment."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


_TOKENS: set[str] = set()  # names that passed: the same few (a request's traceparent) come again and again
_MAX_TOKENS = 256


def check_headers(headers: Mapping[str, str]) -> None:
    """Raise InvalidHeader for a name that is not a token or a value with CR/LF/NUL; never echoes the value. A name
    seen before is not matched again (the regex call is ~4k machine instructions, on every traced request)."""
    for name, value in headers.items():
        if name not in _TOKENS:
            if not _TOKEN.fullmatch(name):
                raise InvalidHeader(f"invalid header name {name!r}")
            if len(_TOKENS) < _MAX_TOKENS:
                _TOKENS.add(name)
        if "\r" in value or "\n" in value or "\0" in value:  # three scans: cheaper than a regex search here
            raise InvalidHeader(f"header {name!r} has a CR, LF or NUL in its value (a key file's trailing newline?)")


@functools.lru_cache(maxsize=32)
def ssl_context(tls: TLSConfig | None) -> ssl.SSLContext:
    """One SSLContext per distinct TLS config (loading a CA bundle costs milliseconds): httpx's defaults
    (certifi, or SSL_CERT_FILE / SSL_CERT_DIR) unless `ca_bundle` is set."""
    tls = tls or TLSConfig()
    if not tls.verify:
        ctx = httpx.create_ssl_context(verify=False)
    elif tls.ca_bundle:
        ctx = ssl.create_default_context(cafile=tls.ca_bundle)
    else:
        ctx = httpx.create_ssl_context()
    if tls.client_cert:
        ctx.load_cert_chain(tls.client_cert, tls.client_key)
    return ctx


def environment_proxy(url: str) -> str | None:
    """The proxy the environment names for `url`, as httpx's trust_env reads it: HTTPS_PROXY / HTTP_PROXY
    (lowercase wins), else ALL_PROXY, unless NO_PROXY covers the host ("*", a host, a domain suffix)."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass_environment(parts.hostname or "", proxies):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def open_httpx_client(*, tls: TLSConfig | None = None, proxy: str | None = None, max_connections: int = 2,
                      connect_timeout: float = 5.0, pool_timeout: float | None = None,
                      timeout: float | None = None) -> httpx.AsyncClient:
    """An httpx client for calls off the hot path (health probes, /metrics), with the upstream's TLS settings and
    its already resolved proxy: the environment is not read again, so a transport and its probe agree."""
    return httpx.AsyncClient(
        verify=ssl_context(tls), proxy=proxy, trust_env=False,
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        timeout=httpx.Timeout(timeout, connect=connect_timeout, pool=pool_timeout),
    )


def _translate(exc: BaseException) -> TransportError:
    message = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, TimeoutError):  # aiohttp's ServerTimeoutError and ConnectionTimeoutError included
        return TransportTimeout(message)
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ClientProxyConnectionError | aiohttp.InvalidURL):
        return ConnectError(message)
    return ReadError(message)  # disconnected, payload errors, bad HTTP


_AIOHTTP_ERRORS = (aiohttp.ClientError, TimeoutError)


class _AiohttpResponse:
    __slots__ = ("_release", "_response", "status")

    def __init__(self, response: aiohttp.ClientResponse, release: Callable[[], None]) -> None:
        self._response, self._release = response, release
        self.status = response.status

    @property
    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, value in self._response.headers.items():
            key = name.lower()
            out[key] = f"{out[key]}, {value}" if key in out else value
        return out

    def relayed_headers(self) -> dict[str, str]:
        found = [(k, v) for k, v in self.headers.items()
                 if k.startswith(_RELAYED_NAMES) and len(v) <= MAX_RELAYED_VALUE and _SENDABLE.fullmatch(v)]
        return dict(found[:MAX_RELAYED])

    async def body(self) -> bytes:
        try:
            return await self._response.read()
        except _AIOHTTP_ERRORS as exc:
            raise _translate(exc) from exc
        finally:
            self._done()

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except _AIOHTTP_ERRORS as exc:
            raise _translate(exc) from exc
        finally:
            self._done()

    def _done(self) -> None:
        if self._response.content.at_eof():
            self._response.release()  # read to the end: the connection goes back to aiohttp's pool
        else:
            self._response.close()
        release, self._release = self._release, None
        if release is not None:
            release()

    async def aclose(self) -> None:
        self._done()


class AiohttpTransport:
    """aiohttp behind the Transport contract, for https:// and proxied upstreams (TLS options, CONNECT).

    The pool wait is bounded here (aiohttp has no separate pool timeout): at most `max_connections` requests
    in flight, a request that finds them all busy for `pool_timeout` s fails with PoolTimeout.
    """

    def __init__(self, base_url: str, *, headers: Mapping[str, str] | None = None, tls: TLSConfig | None = None,
                 proxy: str | None = None, max_connections: int = 256, connect_timeout: float = 5.0,
                 pool_timeout: float | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._shown = shown_url(self.base_url)  # in errors: no credentials
        self._headers = dict(headers or {})
        check_headers(self._headers)
        self._ssl = ssl_context(tls) if urlsplit(base_url).scheme == "https" else None
        self._proxy = proxy
        self._max, self._connect_timeout, self._pool_timeout = max_connections, connect_timeout, pool_timeout
        self._slots = asyncio.Semaphore(max_connections)
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[float | None, float | None], aiohttp.ClientTimeout] = {}

    def _open(self) -> aiohttp.ClientSession:  # in the running loop, as aiohttp wants
        connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True, limit=self._max)
        self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        return self._session

    def _timeout(self, timeout: float | None, total: float | None) -> aiohttp.ClientTimeout:
        found = self._timeouts.get((timeout, total))
        if found is None:
            found = aiohttp.ClientTimeout(total=total, sock_connect=self._connect_timeout, sock_read=timeout)
            self._timeouts[(timeout, total)] = found
        return found

    async def _acquire(self) -> None:
        if not self._slots.locked():
            await self._slots.acquire()
            return
        try:
            async with asyncio.timeout(self._pool_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise PoolTimeout(f"all connections to {self._shown} busy for {self._pool_timeout} s") from None

    async def request(self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None,
                      timeout: float | None = None, total: float | None = None) -> _AiohttpResponse:
        if headers:
            check_headers(headers)
            headers = {**self._headers, **headers}
        session = self._session or self._open()
        await self._acquire()
        try:
            response = await session.request(method, self.base_url + path, data=body, headers=headers or self._headers,
                                             proxy=self._proxy, timeout=self._timeout(timeout, total))
        except BaseException as exc:
            self._slots.release()
            if isinstance(exc, _AIOHTTP_ERRORS):
                raise _translate(exc) from exc
            raise
        return _AiohttpResponse(response, self._slots.release)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
